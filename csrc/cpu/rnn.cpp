// Elman RNN on the CPU: tanh, relu, and the identity recurrence of SimpleRNN.
#include "../rnnfast.h"
#include "common.h"
#include "kernels.h"

namespace rnnfast {

using namespace rnnfast::cpu;

std::tuple<Tensor, Tensor> rnn_forward_cpu(const Tensor& x, const Tensor& h0, const Tensor& w_ih,
                                           const Tensor& w_hh, const std::optional<Tensor>& b_ih,
                                           const std::optional<Tensor>& b_hh, int64_t activation,
                                           bool reverse, bool training) {
  RNNFAST_NO_AUTOCAST;
  (void)training;  // Elman saves nothing beyond y
  check_layer_inputs("rnnfast::rnn_forward", 1, x, h0, w_ih, w_hh, b_ih, b_hh);
  check_activation("rnnfast::rnn_forward", activation);
  if (is_half(x))
    return in_float32(x.scalar_type(), -1, rnn_forward_cpu, x, h0, w_ih, w_hh, b_ih, b_hh,
                      activation, reverse, training);
  const int64_t T = x.size(0), N = x.size(1), H = w_hh.size(1);
  // y starts as the pre-activations of every step and is overwritten in place with h_t
  Tensor y = input_projection(x, w_ih, ProjectionBias(b_ih, b_hh));
  // a generic lambda, so that `if constexpr` below discards the float-only path for double
  auto body = [&](auto zero) {
    using scalar_t = decltype(zero);
    scalar_t* yp = y.data_ptr<scalar_t>();
    const scalar_t* h0p = h0.data_ptr<scalar_t>();
    auto step = [&](int64_t s) { return yp + time_index(s, T, reverse) * N * H; };
    auto h_before = [&](int64_t s) -> const scalar_t* { return s == 0 ? h0p : step(s - 1); };
    if constexpr (std::is_same_v<scalar_t, float>) {
      const StepWeights wf = forward_step_weights(w_hh, 1, N);
      forward_steps(0, T, H, N * H * kUnitBlock, [&](int64_t s, int64_t b0, int64_t b1) {
        float* pre = step(s);
        recurrent_gates_blocks(wf, h_before(s), N, H, pre, b0, b1,
                               /*accumulate=*/true, descending_step(s));
        const UnitRange u = units_of(b0, b1, H);
        elman_forward_block<float>(pre, N, H, u.u0, u.count, activation);
      });
    } else {
      const Tensor w_hh_t = w_hh.t();
      for (int64_t s = 0; s < T; ++s) {
        Tensor y_t = y[time_index(s, T, reverse)];
        y_t.addmm_(s == 0 ? h0 : y[time_index(s - 1, T, reverse)], w_hh_t);
        scalar_t* p = step(s);
        parallel_rows(N, H, [&](int64_t b, int64_t e) {
          elman_forward_block<scalar_t>(p + b * H, e - b, H, 0, H, activation);
        });
      }
    }
  };
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rnn_forward_cpu", [&] { body(scalar_t(0)); });
  Tensor hn = T == 0 ? h0.clone() : copy_step(y, time_index(T - 1, T, reverse));
  return {y, hn};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> rnn_backward_cpu(
    const Tensor& dy, const Tensor& dhn, const Tensor& x, const Tensor& h0, const Tensor& w_ih,
    const Tensor& w_hh, const Tensor& y, int64_t activation, bool reverse) {
  RNNFAST_NO_AUTOCAST;
  const char* op = "rnnfast::rnn_backward";
  check_layer_inputs(op, 1, x, h0, w_ih, w_hh, std::nullopt, std::nullopt);
  check_activation(op, activation);
  const int64_t T = x.size(0), N = x.size(1), H = w_hh.size(1);
  check_same_shape(op, "y", y, {T, N, H}, x);
  check_same_shape(op, "dy", dy, {T, N, H}, x);
  check_same_shape(op, "dhn", dhn, {N, H}, x);
  if (is_half(x))
    return in_float32(x.scalar_type(), -1, rnn_backward_cpu, dy, dhn, x, h0, w_ih, w_hh, y,
                      activation, reverse);
  Tensor dg = at::empty({T, N, H}, x.options());
  Tensor dh_carry = dhn.clone();
  // the body for one dtype, dispatched below
  auto body = [&](auto zero) {
    using scalar_t = decltype(zero);
    scalar_t* dhc = dh_carry.data_ptr<scalar_t>();
    const scalar_t *dyp = dy.data_ptr<scalar_t>(), *yp = y.data_ptr<scalar_t>();
    scalar_t* dgp = dg.data_ptr<scalar_t>();
    // dg[t] = (dy[t] + dh_carry) * act'(y[t]) for rows [n0, n0 + rows), units [u0, u0 + count)
    auto gate_grads = [&](int64_t s, int64_t rows, int64_t n0, int64_t u0, int64_t count) {
      const int64_t o = time_index(s, T, reverse) * N * H + n0 * H;
      elman_backward_block<scalar_t>(dyp + o, dhc + n0 * H, yp + o, dgp + o, rows, H, u0, count,
                                     activation);
    };
    reverse_time_loop<scalar_t>(dg, w_hh, reverse, dh_carry, /*accumulate=*/false, gate_grads);
  };
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rnn_backward_cpu", [&] { body(scalar_t(0)); });
  if (T == 0 || N == 0 || H == 0) {
    return {at::zeros_like(x), dh_carry, at::zeros_like(w_ih), at::zeros_like(w_hh),
            at::zeros({H}, x.options())};
  }
  InputGrads in = input_grads(dg, x, w_ih);
  return {in.dx, dh_carry, in.dw_ih, recurrent_weight_grad(dg, y, h0, reverse), bias_grad(dg)};
}

}  // namespace rnnfast
