// Elman RNN on the CPU: tanh, relu, and the identity recurrence of SimpleRNN.
#include "../rnnfast.h"
#include "common.h"
#include "kernels.h"

namespace rnnfast {

using namespace rnnfast::cpu;

namespace {

// One layer and direction over the steps of L: x [R, C] -> (y [R, H], hn [N, H]).
std::tuple<Tensor, Tensor> rnn_forward_rows(const Tensor& x, const StepRows& L, const Tensor& h0,
                                            const Tensor& w_ih, const Tensor& w_hh,
                                            const std::optional<Tensor>& b_ih,
                                            const std::optional<Tensor>& b_hh, int64_t activation,
                                            bool reverse, bool bf16_values) {
  if (is_half(h0)) {
    const bool keep = keeps_bf16(x);
    return in_float32(x.scalar_type(), -1, rnn_forward_rows, GemmInput{x, keep}, L, h0,
                      GemmInput{w_ih, keep}, GemmInput{w_hh, keep}, b_ih, b_hh, activation, reverse,
                      x.scalar_type() == at::kBFloat16);
  }
  const int64_t T = L.T, N = L.N, H = w_hh.size(1);
  const bool bf16 = bf16_gemms_of(bf16_values, x);
  // y starts as the pre-activations of every step and is overwritten in place with h_t
  const ProjectionBias bias(b_ih, b_hh);
  Tensor y = bf16 ? projection_bf16(x, pack_bf16_weights(w_ih, 1), 1, H, bias.summed(H))
                  : input_projection(x, w_ih, bias);
  // a generic lambda, so that `if constexpr` below discards the float-only path for double
  auto body = [&](auto zero) {
    using scalar_t = decltype(zero);
    scalar_t* yp = y.data_ptr<scalar_t>();
    const scalar_t* h0p = h0.data_ptr<scalar_t>();
    auto t_of = [&](int64_t s) { return time_index(s, T, reverse); };
    auto step = [&](int64_t s) { return yp + L.offset(t_of(s)) * H; };
    // row 0 of h_{t-1} for the rows of step s that continue (init: that start from h0)
    auto h_src = [&](int64_t s, bool init) -> const scalar_t* { return init ? h0p : step(s - 1); };
    if constexpr (std::is_same_v<scalar_t, float>) {
      const StepWeights wf = forward_step_weights(w_hh, 1, N, bf16);
      forward_steps(0, T, H, wf, N * H, [&](int64_t s, int64_t b0, int64_t b1) {
        float* pre = step(s);
        const int64_t n = L.rows(t_of(s));
        split_by_source(L, s, reverse, 0, n, [&](int64_t n0, int64_t rows, bool init) {
          recurrent_gates_blocks(wf, h_src(s, init) + n0 * H, rows, H, pre + n0 * H, b0, b1,
                                 /*accumulate=*/true, descending_step(s));
        });
        const UnitRange u = units_of(b0, b1, H, wf);
        elman_forward_block<float>(pre, n, H, u.u0, u.count, activation);
      });
    } else {
      const Tensor w_hh_t = w_hh.t();
      for (int64_t s = 0; s < T; ++s) {
        const int64_t t = t_of(s), n = L.rows(t);
        Tensor pre = y.narrow(0, L.offset(t), n);
        split_by_source(L, s, reverse, 0, n, [&](int64_t n0, int64_t rows, bool init) {
          const Tensor src = init ? h0 : y.narrow(0, L.offset(t_of(s - 1)), L.rows(t_of(s - 1)));
          pre.narrow(0, n0, rows).addmm_(src.narrow(0, n0, rows), w_hh_t);
        });
        scalar_t* p = step(s);
        parallel_rows(n, H, [&](int64_t b, int64_t e) {
          elman_forward_block<scalar_t>(p + b * H, e - b, H, 0, H, activation);
        });
      }
    }
  };
  AT_DISPATCH_FLOATING_TYPES(h0.scalar_type(), "rnn_forward_cpu", [&] { body(scalar_t(0)); });
  const char* yb = static_cast<const char*>(y.data_ptr());
  Tensor hn = final_state(L, reverse, h0, H, [&](int64_t s) {
    return yb + L.offset(time_index(s, T, reverse)) * H * y.element_size();
  });
  return {y, hn};
}

// returns (dx [R, C], dh0, dw_ih, dw_hh, db)
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> rnn_backward_rows(
    const Tensor& dy, const Tensor& dhn, const Tensor& x, const StepRows& L, const Tensor& h0,
    const Tensor& w_ih, const Tensor& w_hh, const Tensor& y, int64_t activation, bool reverse,
    bool bf16_values) {
  if (is_half(h0)) {
    const bool keep = keeps_bf16(x);
    return in_float32(x.scalar_type(), -1, rnn_backward_rows, dy, dhn, GemmInput{x, keep}, L, h0,
                      GemmInput{w_ih, keep}, w_hh, y, activation, reverse,
                      x.scalar_type() == at::kBFloat16);
  }
  const bool bf16 = bf16_gemms_of(bf16_values, x);
  const int64_t R = x.size(0), H = w_hh.size(1);
  Tensor dg = empty_large({R, H}, h0.options());
  Tensor dh_carry = dhn.clone();
  // the body for one dtype, dispatched below
  auto body = [&](auto zero) {
    using scalar_t = decltype(zero);
    scalar_t* dhc = dh_carry.data_ptr<scalar_t>();
    const scalar_t *dyp = dy.data_ptr<scalar_t>(), *yp = y.data_ptr<scalar_t>();
    scalar_t* dgp = dg.data_ptr<scalar_t>();
    // dg[t] = (dy[t] + dh_carry) * act'(y[t]) for rows [n0, n0 + rows), units [u0, u0 + count)
    auto gate_grads = [&](int64_t s, int64_t rows, int64_t n0, int64_t u0, int64_t count) {
      const int64_t o = (L.offset(time_index(s, L.T, reverse)) + n0) * H;
      elman_backward_block<scalar_t>(dyp + o, dhc + n0 * H, yp + o, dgp + o, rows, H, u0, count,
                                     activation);
    };
    reverse_time_loop<scalar_t>(dg, L, w_hh, reverse, dh_carry, /*accumulate=*/false, bf16,
                                gate_grads);
  };
  AT_DISPATCH_FLOATING_TYPES(h0.scalar_type(), "rnn_backward_cpu", [&] { body(scalar_t(0)); });
  if (R == 0 || H == 0) {
    return {at::zeros_like(x), dh_carry, at::zeros_like(w_ih), at::zeros_like(w_hh),
            at::zeros({H}, h0.options())};
  }
  // the GEMMs' operand, rounded to bfloat16 once for both where they run in bfloat16
  const Tensor dg_gemm = bf16 ? as_bf16(dg) : dg;
  InputGrads in = input_grads(dg_gemm, x, w_ih, bf16);
  return {in.dx, dh_carry, in.dw_ih, recurrent_weight_grad(dg_gemm, y, h0, L, reverse, bf16),
          bias_grad(dg)};
}

}  // namespace

std::tuple<Tensor, Tensor> rnn_forward_cpu(const Tensor& x, const Tensor& h0, const Tensor& w_ih,
                                           const Tensor& w_hh, const std::optional<Tensor>& b_ih,
                                           const std::optional<Tensor>& b_hh, int64_t activation,
                                           bool reverse, bool training) {
  RNNFAST_NO_AUTOCAST;
  (void)training;  // Elman saves nothing beyond y
  check_layer_inputs("rnnfast::rnn_forward", 1, x, h0, w_ih, w_hh, b_ih, b_hh);
  check_activation("rnnfast::rnn_forward", activation);
  const int64_t T = x.size(0), N = x.size(1), H = w_hh.size(1);
  auto [y, hn] = rnn_forward_rows(x.view({T * N, x.size(2)}), StepRows::dense(T, N), h0, w_ih,
                                  w_hh, b_ih, b_hh, activation, reverse, false);
  return {y.view({T, N, H}), hn};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> rnn_backward_cpu(
    const Tensor& dy, const Tensor& dhn, const Tensor& x, const Tensor& h0, const Tensor& w_ih,
    const Tensor& w_hh, const Tensor& y, int64_t activation, bool reverse) {
  RNNFAST_NO_AUTOCAST;
  const char* op = "rnnfast::rnn_backward";
  check_layer_inputs(op, 1, x, h0, w_ih, w_hh, std::nullopt, std::nullopt);
  check_activation(op, activation);
  const int64_t T = x.size(0), N = x.size(1), C = x.size(2), H = w_hh.size(1);
  check_same_shape(op, "y", y, {T, N, H}, x);
  check_same_shape(op, "dy", dy, {T, N, H}, x);
  check_same_shape(op, "dhn", dhn, {N, H}, x);
  auto g = rnn_backward_rows(dy.view({T * N, H}), dhn, x.view({T * N, C}), StepRows::dense(T, N),
                             h0, w_ih, w_hh, y.view({T * N, H}), activation, reverse, false);
  std::get<0>(g) = std::get<0>(g).view({T, N, C});
  return g;
}

std::tuple<Tensor, Tensor> rnn_packed_forward_cpu(
    const Tensor& x, const Tensor& batch_sizes, const Tensor& h0, const Tensor& w_ih,
    const Tensor& w_hh, const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh,
    int64_t activation, bool reverse, bool training) {
  RNNFAST_NO_AUTOCAST;
  (void)training;
  const char* op = "rnnfast::rnn_packed_forward";
  check_packed_inputs(op, 1, x, batch_sizes, h0, w_ih, w_hh, b_ih, b_hh);
  check_activation(op, activation);
  return rnn_forward_rows(x, StepRows::packed(batch_sizes), h0, w_ih, w_hh, b_ih, b_hh,
                          activation, reverse, false);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> rnn_packed_backward_cpu(
    const Tensor& dy, const Tensor& dhn, const Tensor& x, const Tensor& batch_sizes,
    const Tensor& h0, const Tensor& w_ih, const Tensor& w_hh, const Tensor& y, int64_t activation,
    bool reverse) {
  RNNFAST_NO_AUTOCAST;
  const char* op = "rnnfast::rnn_packed_backward";
  check_packed_inputs(op, 1, x, batch_sizes, h0, w_ih, w_hh, std::nullopt, std::nullopt);
  check_activation(op, activation);
  const int64_t R = x.size(0), N = h0.size(0), H = w_hh.size(1);
  check_same_shape(op, "y", y, {R, H}, x);
  check_same_shape(op, "dy", dy, {R, H}, x);
  check_same_shape(op, "dhn", dhn, {N, H}, x);
  return rnn_backward_rows(dy, dhn, x, StepRows::packed(batch_sizes), h0, w_ih, w_hh, y,
                           activation, reverse, false);
}

}  // namespace rnnfast
