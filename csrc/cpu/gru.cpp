// GRU on the CPU (b_hn inside r * (W_hn h + b_hn), as torch.nn).
#include "../rnnfast.h"
#include "common.h"
#include "kernels.h"

namespace rnnfast {

using namespace rnnfast::cpu;

std::tuple<Tensor, Tensor, Tensor> gru_forward_cpu(const Tensor& x, const Tensor& h0,
                                                   const Tensor& w_ih, const Tensor& w_hh,
                                                   const std::optional<Tensor>& b_ih,
                                                   const std::optional<Tensor>& b_hh,
                                                   bool reverse, bool training) {
  RNNFAST_NO_AUTOCAST;
  check_layer_inputs("rnnfast::gru_forward", 3, x, h0, w_ih, w_hh, b_ih, b_hh);
  if (is_half(x))
    return in_float32(x.scalar_type(), /*workspace=*/2, gru_forward_cpu, x, h0, w_ih, w_hh,
                      b_ih, b_hh, reverse, training);
  const int64_t T = x.size(0), N = x.size(1), H = w_hh.size(1);
  // b_hr and b_hz fold into the input projection; b_hn must stay inside r * (...).
  const Tensor b_hn = b_hh ? b_hh->narrow(0, 2 * H, H) : at::zeros({H}, x.options());
  ProjectedChunks xp(x, w_ih, ProjectionBias(b_ih, b_hh, 2 * H), reverse);
  Tensor y = at::empty({T, N, H}, x.options());
  Tensor workspace = at::empty({training ? T : 0, N, 4 * H}, x.options());
  Tensor hh = at::empty({N, 3 * H}, x.options());  // W_hh h_{t-1}, no bias
  // a generic lambda, so that `if constexpr` below discards the float-only path for double
  auto body = [&](auto zero) {
    using scalar_t = decltype(zero);
    const scalar_t* bn = b_hn.data_ptr<scalar_t>();
    const scalar_t* h0p = h0.data_ptr<scalar_t>();
    scalar_t *yp = y.data_ptr<scalar_t>(), *hhp = hh.data_ptr<scalar_t>();
    scalar_t* wsp = workspace.data_ptr<scalar_t>();
    auto t_of = [&](int64_t s) { return time_index(s, T, reverse); };
    auto h_before = [&](int64_t s) -> const scalar_t* {
      return s == 0 ? h0p : yp + t_of(s - 1) * N * H;
    };
    // the pointwise step for rows [n0, n0 + rows), units [u0, u0 + count)
    auto cell = [&](int64_t s, int64_t rows, int64_t n0, int64_t u0, int64_t count) {
      const int64_t t = t_of(s);
      gru_forward_block<scalar_t>(xp.at_time<scalar_t>(t) + n0 * 3 * H, hhp + n0 * 3 * H, bn,
                                  h_before(s) + n0 * H, yp + (t * N + n0) * H,
                                  training ? wsp + (t * N + n0) * 4 * H : nullptr, rows, H, u0,
                                  count);
    };
    const StepWeights wf =
        std::is_same_v<scalar_t, float> ? forward_step_weights(w_hh, 3, N) : StepWeights{};
    for (int64_t s0 = 0; s0 < T; s0 += xp.steps_per_chunk) {
      const int64_t s1 = std::min(T, s0 + xp.steps_per_chunk);
      xp.project(s0, s1);
      if constexpr (std::is_same_v<scalar_t, float>) {
        forward_steps(s0, s1, H, N * 3 * H * kUnitBlock, [&](int64_t s, int64_t b0, int64_t b1) {
          recurrent_gates_blocks(wf, h_before(s), N, H, hhp, b0, b1,
                                 /*accumulate=*/false, descending_step(s));
          const UnitRange u = units_of(b0, b1, H);
          cell(s, N, 0, u.u0, u.count);
        });
      } else {
        const Tensor w_hh_t = w_hh.t();
        for (int64_t s = s0; s < s1; ++s) {
          at::mm_out(hh, s == 0 ? h0 : y[t_of(s - 1)], w_hh_t);
          parallel_rows(N, 3 * H, [&](int64_t b, int64_t e) { cell(s, e - b, b, 0, H); });
        }
      }
    }
  };
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gru_forward_cpu", [&] { body(scalar_t(0)); });
  Tensor hn = T == 0 ? h0.clone() : copy_step(y, time_index(T - 1, T, reverse));
  return {y, hn, workspace};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> gru_backward_cpu(
    const Tensor& dy, const Tensor& dhn, const Tensor& x, const Tensor& h0, const Tensor& w_ih,
    const Tensor& w_hh, const Tensor& y, const Tensor& workspace, bool reverse) {
  RNNFAST_NO_AUTOCAST;
  const char* op = "rnnfast::gru_backward";
  check_layer_inputs(op, 3, x, h0, w_ih, w_hh, std::nullopt, std::nullopt);
  const int64_t T = x.size(0), N = x.size(1), H = w_hh.size(1);
  check_same_shape(op, "y", y, {T, N, H}, x);
  check_workspace(op, workspace, 4 * H, x);
  check_same_shape(op, "dy", dy, {T, N, H}, x);
  check_same_shape(op, "dhn", dhn, {N, H}, x);
  if (is_half(x))
    return in_float32(x.scalar_type(), -1, gru_backward_cpu, dy, dhn, x, h0, w_ih, w_hh, y,
                      workspace, reverse);
  Tensor dg_ih = at::empty({T, N, 3 * H}, x.options());
  Tensor dg_hh = at::empty({T, N, 3 * H}, x.options());
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
      const int64_t t = t_of(s);
      const scalar_t* hp = s == 0 ? h0p : yp + t_of(s - 1) * N * H;
      gru_backward_block<scalar_t>(dyp + (t * N + n0) * H, dhc + n0 * H, hp + n0 * H,
                                   wsp + (t * N + n0) * 4 * H, gip + (t * N + n0) * 3 * H,
                                   ghp + (t * N + n0) * 3 * H, rows, H, u0, count);
    };
    reverse_time_loop<scalar_t>(dg_hh, w_hh, reverse, dh_carry, /*accumulate=*/true, gate_grads);
  };
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gru_backward_cpu", [&] { body(scalar_t(0)); });
  if (T == 0 || N == 0 || H == 0) {
    return {at::zeros_like(x),     dh_carry,
            at::zeros_like(w_ih),  at::zeros_like(w_hh),
            at::zeros({3 * H}, x.options()), at::zeros({3 * H}, x.options())};
  }
  InputGrads in = input_grads(dg_ih, x, w_ih);
  return {in.dx,
          dh_carry,
          in.dw_ih,
          recurrent_weight_grad(dg_hh, y, h0, reverse),
          bias_grad(dg_ih),
          bias_grad(dg_hh)};
}

}  // namespace rnnfast
