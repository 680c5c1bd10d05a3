// GRU on the CPU (b_hn inside r * (W_hn h + b_hn), as torch.nn).
#include "../rnnfast.h"
#include "common.h"
#include "kernels.h"

namespace rnnfast {

using namespace rnnfast::cpu;

namespace {

// One layer and direction over the steps of L: x [R, C] -> (y [R, H], hn [N, H],
// workspace [R or 0, 4H]).
std::tuple<Tensor, Tensor, Tensor> gru_forward_rows(const Tensor& x, const StepRows& L,
                                                    const Tensor& h0, const Tensor& w_ih,
                                                    const Tensor& w_hh,
                                                    const std::optional<Tensor>& b_ih,
                                                    const std::optional<Tensor>& b_hh,
                                                    bool reverse, bool training,
                                                    bool bf16_values) {
  if (is_half(h0)) {
    const bool keep = keeps_bf16(x);
    return in_float32(x.scalar_type(), /*workspace=*/2, gru_forward_rows, GemmInput{x, keep}, L, h0,
                      GemmInput{w_ih, keep}, GemmInput{w_hh, keep}, b_ih, b_hh, reverse, training,
                      x.scalar_type() == at::kBFloat16);
  }
  const bool bf16 = bf16_gemms_of(bf16_values, x);
  const int64_t T = L.T, N = L.N, R = x.size(0), H = w_hh.size(1);
  // b_hr and b_hz fold into the input projection; b_hn must stay inside r * (...).
  const Tensor b_hn = b_hh ? b_hh->narrow(0, 2 * H, H) : at::zeros({H}, h0.options());
  ProjectedChunks xp(x, L, w_ih, ProjectionBias(b_ih, b_hh, 2 * H), reverse, bf16 ? 3 : 0);
  Tensor y = empty_large({R, H}, h0.options());
  Tensor workspace = empty_large({training ? R : 0, 4 * H}, h0.options());
  Tensor hh = at::empty({N, 3 * H}, h0.options());  // W_hh h_{t-1}, no bias
  // a generic lambda, so that `if constexpr` below discards the float-only path for double
  auto body = [&](auto zero) {
    using scalar_t = decltype(zero);
    const scalar_t* bn = b_hn.data_ptr<scalar_t>();
    const scalar_t* h0p = h0.data_ptr<scalar_t>();
    scalar_t *yp = y.data_ptr<scalar_t>(), *hhp = hh.data_ptr<scalar_t>();
    scalar_t* wsp = workspace.data_ptr<scalar_t>();
    auto t_of = [&](int64_t s) { return time_index(s, T, reverse); };
    // row 0 of h_{t-1} for the rows of step s that continue (init: that start from h0)
    auto h_src = [&](int64_t s, bool init) -> const scalar_t* {
      return init ? h0p : yp + L.offset(t_of(s - 1)) * H;
    };
    // the pointwise step for rows [n0, n0 + rows), units [u0, u0 + count)
    auto cell = [&](int64_t s, int64_t rows, int64_t n0, int64_t u0, int64_t count) {
      const int64_t t = t_of(s), off = L.offset(t);
      split_by_source(L, s, reverse, n0, rows, [&](int64_t m0, int64_t m, bool init) {
        gru_forward_block<scalar_t>(xp.at_time<scalar_t>(t) + m0 * 3 * H, hhp + m0 * 3 * H, bn,
                                    h_src(s, init) + m0 * H, yp + (off + m0) * H,
                                    training ? wsp + (off + m0) * 4 * H : nullptr, m, H, u0,
                                    count);
      });
    };
    const StepWeights wf =
        std::is_same_v<scalar_t, float> ? forward_step_weights(w_hh, 3, N, bf16) : StepWeights{};
    for (int64_t s0 = 0; s0 < T; s0 += xp.steps_per_chunk) {
      const int64_t s1 = std::min(T, s0 + xp.steps_per_chunk);
      xp.project(s0, s1);
      if constexpr (std::is_same_v<scalar_t, float>) {
        forward_steps(s0, s1, H, wf, N * 3 * H, [&](int64_t s, int64_t b0, int64_t b1) {
          const int64_t n = L.rows(t_of(s));
          split_by_source(L, s, reverse, 0, n, [&](int64_t n0, int64_t rows, bool init) {
            recurrent_gates_blocks(wf, h_src(s, init) + n0 * H, rows, H, hhp + n0 * 3 * H, b0,
                                   b1, /*accumulate=*/false, descending_step(s));
          });
          const UnitRange u = units_of(b0, b1, H, wf);
          cell(s, n, 0, u.u0, u.count);
        });
      } else {
        const Tensor w_hh_t = w_hh.t();
        for (int64_t s = s0; s < s1; ++s) {
          const int64_t n = L.rows(t_of(s));
          split_by_source(L, s, reverse, 0, n, [&](int64_t n0, int64_t rows, bool init) {
            const Tensor src = init ? h0 : y.narrow(0, L.offset(t_of(s - 1)), L.rows(t_of(s - 1)));
            Tensor out = hh.narrow(0, n0, rows);
            at::mm_out(out, src.narrow(0, n0, rows), w_hh_t);
          });
          parallel_rows(n, 3 * H, [&](int64_t b, int64_t e) { cell(s, e - b, b, 0, H); });
        }
      }
    }
  };
  AT_DISPATCH_FLOATING_TYPES(h0.scalar_type(), "gru_forward_cpu", [&] { body(scalar_t(0)); });
  const char* yb = static_cast<const char*>(y.data_ptr());
  Tensor hn = final_state(L, reverse, h0, H, [&](int64_t s) {
    return yb + L.offset(time_index(s, T, reverse)) * H * y.element_size();
  });
  return {y, hn, workspace};
}

// returns (dx [R, C], dh0, dw_ih, dw_hh, db_ih, db_hh)
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> gru_backward_rows(
    const Tensor& dy, const Tensor& dhn, const Tensor& x, const StepRows& L, const Tensor& h0,
    const Tensor& w_ih, const Tensor& w_hh, const Tensor& y, const Tensor& workspace,
    bool reverse, bool bf16_values) {
  if (is_half(h0)) {
    const bool keep = keeps_bf16(x);
    return in_float32(x.scalar_type(), -1, gru_backward_rows, dy, dhn, GemmInput{x, keep}, L, h0,
                      GemmInput{w_ih, keep}, w_hh, y, workspace, reverse,
                      x.scalar_type() == at::kBFloat16);
  }
  const bool bf16 = bf16_gemms_of(bf16_values, x);
  const int64_t T = L.T, R = x.size(0), H = w_hh.size(1);
  Tensor dg_ih = empty_large({R, 3 * H}, h0.options());
  Tensor dg_hh = empty_large({R, 3 * H}, h0.options());
  Tensor dh_carry = dhn.clone();
  // the body for one dtype, dispatched below
  auto body = [&](auto zero) {
    using scalar_t = decltype(zero);
    scalar_t* dhc = dh_carry.data_ptr<scalar_t>();
    scalar_t *gip = dg_ih.data_ptr<scalar_t>(), *ghp = dg_hh.data_ptr<scalar_t>();
    const scalar_t *dyp = dy.data_ptr<scalar_t>(), *yp = y.data_ptr<scalar_t>();
    const scalar_t *wsp = workspace.data_ptr<scalar_t>(), *h0p = h0.data_ptr<scalar_t>();
    auto t_of = [&](int64_t s) { return time_index(s, T, reverse); };
    // gate gradients of step s for rows [n0, n0 + rows), units [u0, u0 + count); leaves
    // z * dL/dh_t in dh_carry, to which the recurrent GEMM then adds
    auto gate_grads = [&](int64_t s, int64_t rows, int64_t n0, int64_t u0, int64_t count) {
      const int64_t off = L.offset(t_of(s));
      split_by_source(L, s, reverse, n0, rows, [&](int64_t m0, int64_t m, bool init) {
        const scalar_t* hp = init ? h0p + m0 * H : yp + (L.offset(t_of(s - 1)) + m0) * H;
        gru_backward_block<scalar_t>(dyp + (off + m0) * H, dhc + m0 * H, hp,
                                     wsp + (off + m0) * 4 * H, gip + (off + m0) * 3 * H,
                                     ghp + (off + m0) * 3 * H, m, H, u0, count);
      });
    };
    reverse_time_loop<scalar_t>(dg_hh, L, w_hh, reverse, dh_carry, /*accumulate=*/true, bf16,
                                gate_grads);
  };
  AT_DISPATCH_FLOATING_TYPES(h0.scalar_type(), "gru_backward_cpu", [&] { body(scalar_t(0)); });
  if (R == 0 || H == 0) {
    return {at::zeros_like(x),     dh_carry,
            at::zeros_like(w_ih),  at::zeros_like(w_hh),
            at::zeros({3 * H}, h0.options()), at::zeros({3 * H}, h0.options())};
  }
  InputGrads in = input_grads(dg_ih, x, w_ih, bf16);
  return {in.dx,
          dh_carry,
          in.dw_ih,
          recurrent_weight_grad(dg_hh, y, h0, L, reverse, bf16),
          bias_grad(dg_ih),
          bias_grad(dg_hh)};
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> gru_forward_cpu(const Tensor& x, const Tensor& h0,
                                                   const Tensor& w_ih, const Tensor& w_hh,
                                                   const std::optional<Tensor>& b_ih,
                                                   const std::optional<Tensor>& b_hh,
                                                   bool reverse, bool training) {
  RNNFAST_NO_AUTOCAST;
  check_layer_inputs("rnnfast::gru_forward", 3, x, h0, w_ih, w_hh, b_ih, b_hh);
  const int64_t T = x.size(0), N = x.size(1), H = w_hh.size(1);
  auto [y, hn, ws] = gru_forward_rows(x.view({T * N, x.size(2)}), StepRows::dense(T, N), h0, w_ih,
                                      w_hh, b_ih, b_hh, reverse, training, false);
  return {y.view({T, N, H}), hn, ws.view({training ? T : 0, N, 4 * H})};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> gru_backward_cpu(
    const Tensor& dy, const Tensor& dhn, const Tensor& x, const Tensor& h0, const Tensor& w_ih,
    const Tensor& w_hh, const Tensor& y, const Tensor& workspace, bool reverse) {
  RNNFAST_NO_AUTOCAST;
  const char* op = "rnnfast::gru_backward";
  check_layer_inputs(op, 3, x, h0, w_ih, w_hh, std::nullopt, std::nullopt);
  const int64_t T = x.size(0), N = x.size(1), C = x.size(2), H = w_hh.size(1);
  check_same_shape(op, "y", y, {T, N, H}, x);
  check_workspace(op, workspace, 4 * H, x);
  check_same_shape(op, "dy", dy, {T, N, H}, x);
  check_same_shape(op, "dhn", dhn, {N, H}, x);
  auto g = gru_backward_rows(dy.view({T * N, H}), dhn, x.view({T * N, C}), StepRows::dense(T, N),
                             h0, w_ih, w_hh, y.view({T * N, H}), workspace.view({T * N, 4 * H}),
                             reverse, false);
  std::get<0>(g) = std::get<0>(g).view({T, N, C});
  return g;
}

std::tuple<Tensor, Tensor, Tensor> gru_packed_forward_cpu(
    const Tensor& x, const Tensor& batch_sizes, const Tensor& h0, const Tensor& w_ih,
    const Tensor& w_hh, const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh,
    bool reverse, bool training) {
  RNNFAST_NO_AUTOCAST;
  check_packed_inputs("rnnfast::gru_packed_forward", 3, x, batch_sizes, h0, w_ih, w_hh, b_ih,
                      b_hh);
  return gru_forward_rows(x, StepRows::packed(batch_sizes), h0, w_ih, w_hh, b_ih, b_hh, reverse,
                          training, false);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> gru_packed_backward_cpu(
    const Tensor& dy, const Tensor& dhn, const Tensor& x, const Tensor& batch_sizes,
    const Tensor& h0, const Tensor& w_ih, const Tensor& w_hh, const Tensor& y,
    const Tensor& workspace, bool reverse) {
  RNNFAST_NO_AUTOCAST;
  const char* op = "rnnfast::gru_packed_backward";
  check_packed_inputs(op, 3, x, batch_sizes, h0, w_ih, w_hh, std::nullopt, std::nullopt);
  const int64_t R = x.size(0), N = h0.size(0), H = w_hh.size(1);
  check_same_shape(op, "y", y, {R, H}, x);
  check_workspace(op, workspace, {R, 4 * H}, x);
  check_same_shape(op, "dy", dy, {R, H}, x);
  check_same_shape(op, "dhn", dhn, {N, H}, x);
  return gru_backward_rows(dy, dhn, x, StepRows::packed(batch_sizes), h0, w_ih, w_hh, y,
                           workspace, reverse, false);
}

}  // namespace rnnfast
