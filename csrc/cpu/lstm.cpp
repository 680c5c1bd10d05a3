// LSTM on the CPU.
#include "../rnnfast.h"
#include "common.h"
#include "kernels.h"

namespace rnnfast {

using namespace rnnfast::cpu;

namespace {

// One layer and direction over the steps of L: x [R, C] -> (y [R, H], hn, cn [N, H],
// workspace [R or 0, 5H]).
std::tuple<Tensor, Tensor, Tensor, Tensor> lstm_forward_rows(
    const Tensor& x, const StepRows& L, const Tensor& h0, const Tensor& c0, const Tensor& w_ih,
    const Tensor& w_hh, const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh,
    bool reverse, bool training, bool bf16_values) {
  if (is_half(h0)) {
    const bool keep = keeps_bf16(x);
    return in_float32(x.scalar_type(), /*workspace=*/3, lstm_forward_rows, GemmInput{x, keep},
                      L, h0, c0, GemmInput{w_ih, keep}, GemmInput{w_hh, keep}, b_ih, b_hh,
                      reverse, training, x.scalar_type() == at::kBFloat16);
  }
  const int64_t T = L.T, N = L.N, R = x.size(0), H = w_hh.size(1);
  const bool bf16 = bf16_gemms_of(bf16_values, x);
  ProjectedChunks pre(x, L, w_ih, ProjectionBias(b_ih, b_hh), reverse, bf16 ? 4 : 0);
  Tensor y = empty_large({R, H}, h0.options());
  // Training keeps i, f, g, o and c of every step; inference only c of the last two
  // steps, in turns (the kernel's c_prev and c never alias). In a packed sequence a row
  // that has ended is not written again, so its last c stays in its turn's buffer.
  Tensor workspace = empty_large({training ? R : 0, 5 * H}, h0.options());
  Tensor c_turns = at::empty({training ? 0 : 2, N, H}, h0.options());
  // a generic lambda, so that `if constexpr` below discards the float-only path for double
  auto body = [&](auto zero) {
    using scalar_t = decltype(zero);
    scalar_t* yp = y.data_ptr<scalar_t>();
    scalar_t *wsp = workspace.data_ptr<scalar_t>(), *ctp = c_turns.data_ptr<scalar_t>();
    const scalar_t *h0p = h0.data_ptr<scalar_t>(), *c0p = c0.data_ptr<scalar_t>();
    auto t_of = [&](int64_t s) { return time_index(s, T, reverse); };
    // row 0 of h_{t-1} for the rows of step s that continue (init: that start from h0)
    auto h_src = [&](int64_t s, bool init) -> const scalar_t* {
      return init ? h0p : yp + L.offset(t_of(s - 1)) * H;
    };
    // the pointwise step for rows [n0, n0 + rows), units [u0, u0 + count)
    auto cell = [&](int64_t s, int64_t rows, int64_t n0, int64_t u0, int64_t count) {
      const int64_t off = L.offset(t_of(s));
      split_by_source(L, s, reverse, n0, rows, [&](int64_t m0, int64_t m, bool init) {
        const scalar_t* c_prev;
        int64_t ld_c_prev, ld_c;
        scalar_t *c_out, *cache = nullptr;
        if (training) {
          cache = wsp + (off + m0) * 5 * H;
          c_out = cache + 4 * H;
          ld_c = 5 * H;
          c_prev = init ? c0p + m0 * H : wsp + (L.offset(t_of(s - 1)) + m0) * 5 * H + 4 * H;
          ld_c_prev = init ? H : 5 * H;
        } else {
          c_out = ctp + ((s % 2) * N + m0) * H;
          ld_c = H;
          c_prev = init ? c0p + m0 * H : ctp + (((s - 1) % 2) * N + m0) * H;
          ld_c_prev = H;
        }
        lstm_forward_block<scalar_t>(pre.at_time<scalar_t>(t_of(s)) + m0 * 4 * H, c_prev,
                                     ld_c_prev, yp + (off + m0) * H, c_out, ld_c, cache, m, H, u0,
                                     count);
      });
    };
    const StepWeights wf =
        std::is_same_v<scalar_t, float> ? forward_step_weights(w_hh, 4, N, bf16) : StepWeights{};
    for (int64_t s0 = 0; s0 < T; s0 += pre.steps_per_chunk) {
      const int64_t s1 = std::min(T, s0 + pre.steps_per_chunk);
      pre.project(s0, s1);
      if constexpr (std::is_same_v<scalar_t, float>) {
        forward_steps(s0, s1, H, wf, N * 4 * H, [&](int64_t s, int64_t b0, int64_t b1) {
          const int64_t n = L.rows(t_of(s));
          float* out = pre.at_time<float>(t_of(s));
          split_by_source(L, s, reverse, 0, n, [&](int64_t n0, int64_t rows, bool init) {
            recurrent_gates_blocks(wf, h_src(s, init) + n0 * H, rows, H, out + n0 * 4 * H, b0,
                                   b1, /*accumulate=*/true, descending_step(s));
          });
          const UnitRange u = units_of(b0, b1, H, wf);
          cell(s, n, 0, u.u0, u.count);
        });
      } else {
        const Tensor w_hh_t = w_hh.t();
        for (int64_t s = s0; s < s1; ++s) {
          const int64_t n = L.rows(t_of(s));
          Tensor out = pre.step(t_of(s));
          split_by_source(L, s, reverse, 0, n, [&](int64_t n0, int64_t rows, bool init) {
            const Tensor src = init ? h0 : y.narrow(0, L.offset(t_of(s - 1)), L.rows(t_of(s - 1)));
            out.narrow(0, n0, rows).addmm_(src.narrow(0, n0, rows), w_hh_t);
          });
          parallel_rows(n, 4 * H, [&](int64_t b, int64_t e) { cell(s, e - b, b, 0, H); });
        }
      }
    }
  };
  AT_DISPATCH_FLOATING_TYPES(h0.scalar_type(), "lstm_forward_cpu", [&] { body(scalar_t(0)); });
  const int64_t es = y.element_size();
  const char *yb = static_cast<const char*>(y.data_ptr()),
             *wsb = static_cast<const char*>(workspace.data_ptr()),
             *ctb = static_cast<const char*>(c_turns.data_ptr());
  auto off = [&](int64_t s) { return L.offset(time_index(s, T, reverse)); };
  Tensor hn = final_state(L, reverse, h0, H, [&](int64_t s) { return yb + off(s) * H * es; });
  Tensor cn = training
                  ? final_state(L, reverse, c0, 5 * H,
                                [&](int64_t s) { return wsb + (off(s) * 5 * H + 4 * H) * es; })
                  : final_state(L, reverse, c0, H,
                                [&](int64_t s) { return ctb + (s % 2) * N * H * es; });
  return {y, hn, cn, workspace};
}

// returns (dx [R, C], dh0, dc0, dw_ih, dw_hh, db)
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_backward_rows(
    const Tensor& dy, const Tensor& dhn, const Tensor& dcn, const Tensor& x, const StepRows& L,
    const Tensor& h0, const Tensor& c0, const Tensor& w_ih, const Tensor& w_hh, const Tensor& y,
    const Tensor& workspace, bool reverse, bool bf16_values) {
  if (is_half(h0)) {
    const bool keep = keeps_bf16(x);
    return in_float32(x.scalar_type(), -1, lstm_backward_rows, dy, dhn, dcn, GemmInput{x, keep}, L,
                      h0, c0, GemmInput{w_ih, keep}, w_hh, GemmInput{y, keep}, workspace, reverse,
                      x.scalar_type() == at::kBFloat16);
  }
  const bool bf16 = bf16_gemms_of(bf16_values, x);
  const int64_t T = L.T, R = x.size(0), H = w_hh.size(1);
  Tensor dg = empty_large({R, 4 * H}, h0.options());
  Tensor dh_carry = dhn.clone();
  Tensor dc = dcn.clone();
  // the body for one dtype, dispatched below
  auto body = [&](auto zero) {
    using scalar_t = decltype(zero);
    scalar_t *dhc = dh_carry.data_ptr<scalar_t>(), *dcp = dc.data_ptr<scalar_t>();
    scalar_t* dgp = dg.data_ptr<scalar_t>();
    const scalar_t *dyp = dy.data_ptr<scalar_t>(), *wsp = workspace.data_ptr<scalar_t>();
    const scalar_t* c0p = c0.data_ptr<scalar_t>();
    auto t_of = [&](int64_t s) { return time_index(s, T, reverse); };
    // gate gradients of step s for rows [n0, n0 + rows), units [u0, u0 + count)
    auto gate_grads = [&](int64_t s, int64_t rows, int64_t n0, int64_t u0, int64_t count) {
      const int64_t off = L.offset(t_of(s));
      split_by_source(L, s, reverse, n0, rows, [&](int64_t m0, int64_t m, bool init) {
        const scalar_t* c_prev =
            init ? c0p + m0 * H : wsp + (L.offset(t_of(s - 1)) + m0) * 5 * H + 4 * H;
        const int64_t ld_c_prev = init ? H : 5 * H;
        lstm_backward_block<scalar_t>(dyp + (off + m0) * H, dhc + m0 * H, dcp + m0 * H,
                                      wsp + (off + m0) * 5 * H, c_prev, ld_c_prev,
                                      dgp + (off + m0) * 4 * H, m, H, u0, count);
      });
    };
    reverse_time_loop<scalar_t>(dg, L, w_hh, reverse, dh_carry, /*accumulate=*/false, bf16,
                                gate_grads);
  };
  AT_DISPATCH_FLOATING_TYPES(h0.scalar_type(), "lstm_backward_cpu", [&] { body(scalar_t(0)); });
  if (R == 0 || H == 0) {
    return {at::zeros_like(x), dh_carry, dc, at::zeros_like(w_ih), at::zeros_like(w_hh),
            at::zeros({4 * H}, h0.options())};
  }
  // the GEMMs' operand, rounded to bfloat16 once for both where they run in bfloat16
  const Tensor dg_gemm = bf16 ? as_bf16(dg) : dg;
  InputGrads in = input_grads(dg_gemm, x, w_ih, bf16);
  return {in.dx, dh_carry, dc, in.dw_ih, recurrent_weight_grad(dg_gemm, y, h0, L, reverse, bf16),
          bias_grad(dg)};
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor> lstm_forward_cpu(
    const Tensor& x, const Tensor& h0, const Tensor& c0, const Tensor& w_ih, const Tensor& w_hh,
    const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh, bool reverse,
    bool training) {
  RNNFAST_NO_AUTOCAST;
  const char* op = "rnnfast::lstm_forward";
  check_layer_inputs(op, 4, x, h0, w_ih, w_hh, b_ih, b_hh);
  check_same_shape(op, "c0", c0, h0.sizes(), x);
  const int64_t T = x.size(0), N = x.size(1), H = w_hh.size(1);
  auto [y, hn, cn, ws] = lstm_forward_rows(x.view({T * N, x.size(2)}), StepRows::dense(T, N), h0,
                                           c0, w_ih, w_hh, b_ih, b_hh, reverse, training, false);
  return {y.view({T, N, H}), hn, cn, ws.view({training ? T : 0, N, 5 * H})};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_backward_cpu(
    const Tensor& dy, const Tensor& dhn, const Tensor& dcn, const Tensor& x, const Tensor& h0,
    const Tensor& c0, const Tensor& w_ih, const Tensor& w_hh, const Tensor& y,
    const Tensor& workspace, bool reverse) {
  RNNFAST_NO_AUTOCAST;
  const char* op = "rnnfast::lstm_backward";
  check_layer_inputs(op, 4, x, h0, w_ih, w_hh, std::nullopt, std::nullopt);
  const int64_t T = x.size(0), N = x.size(1), C = x.size(2), H = w_hh.size(1);
  check_same_shape(op, "c0", c0, {N, H}, x);
  check_same_shape(op, "y", y, {T, N, H}, x);
  check_workspace(op, workspace, 5 * H, x);
  check_same_shape(op, "dy", dy, {T, N, H}, x);
  check_same_shape(op, "dhn", dhn, {N, H}, x);
  check_same_shape(op, "dcn", dcn, {N, H}, x);
  auto g = lstm_backward_rows(dy.view({T * N, H}), dhn, dcn, x.view({T * N, C}),
                              StepRows::dense(T, N), h0, c0, w_ih, w_hh, y.view({T * N, H}),
                              workspace.view({T * N, 5 * H}), reverse, false);
  std::get<0>(g) = std::get<0>(g).view({T, N, C});
  return g;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> lstm_packed_forward_cpu(
    const Tensor& x, const Tensor& batch_sizes, const Tensor& h0, const Tensor& c0,
    const Tensor& w_ih, const Tensor& w_hh, const std::optional<Tensor>& b_ih,
    const std::optional<Tensor>& b_hh, bool reverse, bool training) {
  RNNFAST_NO_AUTOCAST;
  const char* op = "rnnfast::lstm_packed_forward";
  check_packed_inputs(op, 4, x, batch_sizes, h0, w_ih, w_hh, b_ih, b_hh);
  check_same_shape(op, "c0", c0, h0.sizes(), x);
  return lstm_forward_rows(x, StepRows::packed(batch_sizes), h0, c0, w_ih, w_hh, b_ih, b_hh,
                           reverse, training, false);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_packed_backward_cpu(
    const Tensor& dy, const Tensor& dhn, const Tensor& dcn, const Tensor& x,
    const Tensor& batch_sizes, const Tensor& h0, const Tensor& c0, const Tensor& w_ih,
    const Tensor& w_hh, const Tensor& y, const Tensor& workspace, bool reverse) {
  RNNFAST_NO_AUTOCAST;
  const char* op = "rnnfast::lstm_packed_backward";
  check_packed_inputs(op, 4, x, batch_sizes, h0, w_ih, w_hh, std::nullopt, std::nullopt);
  const int64_t R = x.size(0), N = h0.size(0), H = w_hh.size(1);
  check_same_shape(op, "c0", c0, {N, H}, x);
  check_same_shape(op, "y", y, {R, H}, x);
  check_workspace(op, workspace, {R, 5 * H}, x);
  check_same_shape(op, "dy", dy, {R, H}, x);
  check_same_shape(op, "dhn", dhn, {N, H}, x);
  check_same_shape(op, "dcn", dcn, {N, H}, x);
  return lstm_backward_rows(dy, dhn, dcn, x, StepRows::packed(batch_sizes), h0, c0, w_ih, w_hh, y,
                            workspace, reverse, false);
}

}  // namespace rnnfast
