// LSTM on the CPU.
#include "../rnnfast.h"
#include "common.h"
#include "kernels.h"

namespace rnnfast {

using namespace rnnfast::cpu;

std::tuple<Tensor, Tensor, Tensor, Tensor> lstm_forward_cpu(
    const Tensor& x, const Tensor& h0, const Tensor& c0, const Tensor& w_ih, const Tensor& w_hh,
    const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh, bool reverse,
    bool training) {
  RNNFAST_NO_AUTOCAST;
  const char* op = "rnnfast::lstm_forward";
  check_layer_inputs(op, 4, x, h0, w_ih, w_hh, b_ih, b_hh);
  check_same_shape(op, "c0", c0, h0.sizes(), x);
  if (is_half(x))
    return in_float32(x.scalar_type(), /*workspace=*/3, lstm_forward_cpu, x, h0, c0, w_ih, w_hh,
                      b_ih, b_hh, reverse, training);
  const int64_t T = x.size(0), N = x.size(1), H = w_hh.size(1);
  ProjectedChunks pre(x, w_ih, ProjectionBias(b_ih, b_hh), reverse);
  Tensor y = at::empty({T, N, H}, x.options());
  // Training keeps i, f, g, o and c of every step; inference only c of the last two
  // steps, in turns (the kernel's c_prev and c never alias).
  Tensor workspace = at::empty({training ? T : 0, N, 5 * H}, x.options());
  Tensor c_turns = at::empty({training ? 0 : 2, N, H}, x.options());
  // a generic lambda, so that `if constexpr` below discards the float-only path for double
  auto body = [&](auto zero) {
    using scalar_t = decltype(zero);
    scalar_t* yp = y.data_ptr<scalar_t>();
    scalar_t *wsp = workspace.data_ptr<scalar_t>(), *ctp = c_turns.data_ptr<scalar_t>();
    const scalar_t *h0p = h0.data_ptr<scalar_t>(), *c0p = c0.data_ptr<scalar_t>();
    auto t_of = [&](int64_t s) { return time_index(s, T, reverse); };
    auto h_before = [&](int64_t s) -> const scalar_t* {
      return s == 0 ? h0p : yp + t_of(s - 1) * N * H;
    };
    // the pointwise step for rows [n0, n0 + rows), units [u0, u0 + count)
    auto cell = [&](int64_t s, int64_t rows, int64_t n0, int64_t u0, int64_t count) {
      const int64_t t = t_of(s);
      const scalar_t* c_prev;
      int64_t ld_c_prev, ld_c;
      scalar_t *c_out, *cache = nullptr;
      if (training) {
        cache = wsp + t * N * 5 * H;
        c_out = cache + 4 * H;
        ld_c = 5 * H;
        c_prev = s == 0 ? c0p : wsp + t_of(s - 1) * N * 5 * H + 4 * H;
        ld_c_prev = s == 0 ? H : 5 * H;
      } else {
        c_out = ctp + (s % 2) * N * H;
        ld_c = H;
        c_prev = s == 0 ? c0p : ctp + ((s - 1) % 2) * N * H;
        ld_c_prev = H;
      }
      lstm_forward_block<scalar_t>(pre.at_time<scalar_t>(t) + n0 * 4 * H, c_prev + n0 * ld_c_prev, ld_c_prev,
                                   yp + (t * N + n0) * H, c_out + n0 * ld_c, ld_c,
                                   cache ? cache + n0 * 5 * H : nullptr, rows, H, u0, count);
    };
    const StepWeights wf =
        std::is_same_v<scalar_t, float> ? forward_step_weights(w_hh, 4, N) : StepWeights{};
    for (int64_t s0 = 0; s0 < T; s0 += pre.steps_per_chunk) {
      const int64_t s1 = std::min(T, s0 + pre.steps_per_chunk);
      pre.project(s0, s1);
      if constexpr (std::is_same_v<scalar_t, float>) {
        forward_steps(s0, s1, H, N * 4 * H * kUnitBlock, [&](int64_t s, int64_t b0, int64_t b1) {
          recurrent_gates_blocks(wf, h_before(s), N, H,
                                 pre.at_time<float>(t_of(s)), b0, b1, /*accumulate=*/true, descending_step(s));
          const UnitRange u = units_of(b0, b1, H);
          cell(s, N, 0, u.u0, u.count);
        });
      } else {
        const Tensor w_hh_t = w_hh.t();
        for (int64_t s = s0; s < s1; ++s) {
          pre.chunk()[t_of(s) - pre.t_lo()].addmm_(s == 0 ? h0 : y[t_of(s - 1)], w_hh_t);
          parallel_rows(N, 4 * H, [&](int64_t b, int64_t e) { cell(s, e - b, b, 0, H); });
        }
      }
    }
  };
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lstm_forward_cpu", [&] { body(scalar_t(0)); });
  if (T == 0) return {y, h0.clone(), c0.clone(), workspace};
  const int64_t last = time_index(T - 1, T, reverse);
  Tensor cn = training ? workspace[last].narrow(1, 4 * H, H).clone() : copy_step(c_turns, (T - 1) % 2);
  return {y, copy_step(y, last), cn, workspace};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_backward_cpu(
    const Tensor& dy, const Tensor& dhn, const Tensor& dcn, const Tensor& x, const Tensor& h0,
    const Tensor& c0, const Tensor& w_ih, const Tensor& w_hh, const Tensor& y,
    const Tensor& workspace, bool reverse) {
  RNNFAST_NO_AUTOCAST;
  const char* op = "rnnfast::lstm_backward";
  check_layer_inputs(op, 4, x, h0, w_ih, w_hh, std::nullopt, std::nullopt);
  const int64_t T = x.size(0), N = x.size(1), H = w_hh.size(1);
  check_same_shape(op, "c0", c0, {N, H}, x);
  check_same_shape(op, "y", y, {T, N, H}, x);
  check_workspace(op, workspace, 5 * H, x);
  check_same_shape(op, "dy", dy, {T, N, H}, x);
  check_same_shape(op, "dhn", dhn, {N, H}, x);
  check_same_shape(op, "dcn", dcn, {N, H}, x);
  if (is_half(x))
    return in_float32(x.scalar_type(), -1, lstm_backward_cpu, dy, dhn, dcn, x, h0, c0, w_ih,
                      w_hh, y, workspace, reverse);
  Tensor dg = at::empty({T, N, 4 * H}, x.options());
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
      const int64_t t = t_of(s);
      const scalar_t* c_prev = s == 0 ? c0p : wsp + t_of(s - 1) * N * 5 * H + 4 * H;
      const int64_t ld_c_prev = s == 0 ? H : 5 * H;
      lstm_backward_block<scalar_t>(dyp + (t * N + n0) * H, dhc + n0 * H, dcp + n0 * H,
                                    wsp + (t * N + n0) * 5 * H, c_prev + n0 * ld_c_prev,
                                    ld_c_prev, dgp + (t * N + n0) * 4 * H, rows, H, u0, count);
    };
    reverse_time_loop<scalar_t>(dg, w_hh, reverse, dh_carry, /*accumulate=*/false, gate_grads);
  };
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lstm_backward_cpu", [&] { body(scalar_t(0)); });
  if (T == 0 || N == 0 || H == 0) {
    return {at::zeros_like(x), dh_carry, dc, at::zeros_like(w_ih), at::zeros_like(w_hh),
            at::zeros({4 * H}, x.options())};
  }
  InputGrads in = input_grads(dg, x, w_ih);
  return {in.dx, dh_carry, dc, in.dw_ih, recurrent_weight_grad(dg, y, h0, reverse),
          bias_grad(dg)};
}

}  // namespace rnnfast
