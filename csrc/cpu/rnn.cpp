// Elman RNN on the CPU: tanh, relu, and the identity recurrence of SimpleRNN.
#include "../rnnfast.h"
#include "common.h"
#include "pointwise.h"

namespace rnnfast {

using namespace rnnfast::cpu;

static void check_activation(const char* op, int64_t activation) {
  TORCH_CHECK(activation >= 0 && activation <= 2, op,
              ": expected activation 0 (tanh), 1 (relu) or 2 (identity), but got ", activation);
}

std::tuple<Tensor, Tensor> rnn_forward_cpu(const Tensor& x, const Tensor& h0, const Tensor& w_ih,
                                           const Tensor& w_hh, const std::optional<Tensor>& b_ih,
                                           const std::optional<Tensor>& b_hh, int64_t activation,
                                           bool reverse, bool training) {
  (void)training;  // Elman saves nothing beyond y
  check_layer_inputs("rnnfast::rnn_forward", 1, x, h0, w_ih, w_hh, b_ih, b_hh);
  check_activation("rnnfast::rnn_forward", activation);
  const int64_t T = x.size(0), N = x.size(1), H = w_hh.size(1);
  // y starts as the pre-activations of every step and is overwritten in place with h_t
  Tensor y = input_projection(x, w_ih, sum_biases(b_ih, b_hh));
  const Tensor w_hh_t = w_hh.t();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rnn_forward_cpu", [&] {
    for (int64_t s = 0; s < T; ++s) {
      const int64_t t = time_index(s, T, reverse);
      Tensor y_t = y[t];
      y_t.addmm_(s == 0 ? h0 : y[time_index(s - 1, T, reverse)], w_hh_t);
      scalar_t* p = y_t.data_ptr<scalar_t>();
      parallel_rows(N, H, [&](int64_t b, int64_t e) {
        elman_forward_block<scalar_t>(p + b * H, (e - b) * H, activation);
      });
    }
  });
  Tensor hn = T == 0 ? h0.clone() : y[time_index(T - 1, T, reverse)].clone();
  return {y, hn};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> rnn_backward_cpu(
    const Tensor& dy, const Tensor& dhn, const Tensor& x, const Tensor& h0, const Tensor& w_ih,
    const Tensor& w_hh, const Tensor& y, int64_t activation, bool reverse) {
  const char* op = "rnnfast::rnn_backward";
  check_layer_inputs(op, 1, x, h0, w_ih, w_hh, std::nullopt, std::nullopt);
  check_activation(op, activation);
  const int64_t T = x.size(0), N = x.size(1), H = w_hh.size(1);
  check_same_shape(op, "y", y, {T, N, H}, x);
  check_same_shape(op, "dy", dy, {T, N, H}, x);
  check_same_shape(op, "dhn", dhn, {N, H}, x);
  Tensor dg = at::empty({T, N, H}, x.options());
  Tensor dh_carry = dhn.clone();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rnn_backward_cpu", [&] {
    scalar_t* dhc = dh_carry.data_ptr<scalar_t>();
    for (int64_t s = T - 1; s >= 0; --s) {
      const int64_t t = time_index(s, T, reverse);
      Tensor dg_t = dg[t];
      const scalar_t* dy_t = dy[t].data_ptr<scalar_t>();
      const scalar_t* h_t = y[t].data_ptr<scalar_t>();
      scalar_t* g = dg_t.data_ptr<scalar_t>();
      parallel_rows(N, H, [&](int64_t b, int64_t e) {
        elman_backward_block<scalar_t>(dy_t + b * H, dhc + b * H, h_t + b * H, g + b * H,
                                       (e - b) * H, activation);
      });
      at::mm_out(dh_carry, dg_t, w_hh);
    }
  });
  if (T == 0) {
    return {at::zeros_like(x), dh_carry, at::zeros_like(w_ih), at::zeros_like(w_hh),
            at::zeros({H}, x.options())};
  }
  InputGrads in = input_grads(dg, x, w_ih);
  return {in.dx, dh_carry, in.dw_ih, recurrent_weight_grad(dg, y, h0, reverse), bias_grad(dg)};
}

}  // namespace rnnfast
