// LSTM on the CPU.
#include "../rnnfast.h"
#include "common.h"
#include "pointwise.h"

namespace rnnfast {

using namespace rnnfast::cpu;

std::tuple<Tensor, Tensor, Tensor, Tensor> lstm_forward_cpu(
    const Tensor& x, const Tensor& h0, const Tensor& c0, const Tensor& w_ih, const Tensor& w_hh,
    const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh, bool reverse,
    bool training) {
  const char* op = "rnnfast::lstm_forward";
  check_layer_inputs(op, 4, x, h0, w_ih, w_hh, b_ih, b_hh);
  check_same_shape(op, "c0", c0, h0.sizes(), x);
  const int64_t T = x.size(0), N = x.size(1), H = w_hh.size(1);
  Tensor pre = input_projection(x, w_ih, sum_biases(b_ih, b_hh));
  Tensor y = at::empty({T, N, H}, x.options());
  // Training keeps i, f, g, o and c of every step; inference only c of the last two
  // steps, in turns (the kernel's c_prev and c never alias).
  Tensor workspace = at::empty({training ? T : 0, N, 5 * H}, x.options());
  Tensor c_turns = at::empty({training ? 0 : 2, N, H}, x.options());
  const Tensor w_hh_t = w_hh.t();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lstm_forward_cpu", [&] {
    for (int64_t s = 0; s < T; ++s) {
      const int64_t t = time_index(s, T, reverse);
      const int64_t tp = time_index(s - 1, T, reverse);
      Tensor pre_t = pre[t];
      pre_t.addmm_(s == 0 ? h0 : y[tp], w_hh_t);
      const scalar_t* c_prev;
      int64_t ld_c_prev;
      scalar_t *c_out, *cache = nullptr;
      int64_t ld_c;
      if (training) {
        cache = workspace[t].data_ptr<scalar_t>();
        c_out = cache + 4 * H;
        ld_c = 5 * H;
        c_prev = s == 0 ? c0.data_ptr<scalar_t>() : workspace[tp].data_ptr<scalar_t>() + 4 * H;
        ld_c_prev = s == 0 ? H : 5 * H;
      } else {
        c_out = c_turns[s % 2].data_ptr<scalar_t>();
        ld_c = H;
        c_prev = s == 0 ? c0.data_ptr<scalar_t>() : c_turns[(s - 1) % 2].data_ptr<scalar_t>();
        ld_c_prev = H;
      }
      const scalar_t* p = pre_t.data_ptr<scalar_t>();
      scalar_t* h = y[t].data_ptr<scalar_t>();
      parallel_rows(N, 4 * H, [&](int64_t b, int64_t e) {
        lstm_forward_block<scalar_t>(p + b * 4 * H, c_prev + b * ld_c_prev, ld_c_prev, h + b * H,
                                     c_out + b * ld_c, ld_c, cache ? cache + b * 5 * H : nullptr,
                                     e - b, H);
      });
    }
  });
  if (T == 0) return {y, h0.clone(), c0.clone(), workspace};
  const int64_t last = time_index(T - 1, T, reverse);
  Tensor cn = training ? workspace[last].narrow(1, 4 * H, H).clone() : c_turns[(T - 1) % 2].clone();
  return {y, y[last].clone(), cn, workspace};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_backward_cpu(
    const Tensor& dy, const Tensor& dhn, const Tensor& dcn, const Tensor& x, const Tensor& h0,
    const Tensor& c0, const Tensor& w_ih, const Tensor& w_hh, const Tensor& y,
    const Tensor& workspace, bool reverse) {
  const char* op = "rnnfast::lstm_backward";
  check_layer_inputs(op, 4, x, h0, w_ih, w_hh, std::nullopt, std::nullopt);
  const int64_t T = x.size(0), N = x.size(1), H = w_hh.size(1);
  check_same_shape(op, "c0", c0, {N, H}, x);
  check_same_shape(op, "y", y, {T, N, H}, x);
  check_same_shape(op, "workspace", workspace, {T, N, 5 * H}, x);
  check_same_shape(op, "dy", dy, {T, N, H}, x);
  check_same_shape(op, "dhn", dhn, {N, H}, x);
  check_same_shape(op, "dcn", dcn, {N, H}, x);
  Tensor dg = at::empty({T, N, 4 * H}, x.options());
  Tensor dh_carry = dhn.clone();
  Tensor dc = dcn.clone();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lstm_backward_cpu", [&] {
    scalar_t* dhc = dh_carry.data_ptr<scalar_t>();
    scalar_t* dcp = dc.data_ptr<scalar_t>();
    for (int64_t s = T - 1; s >= 0; --s) {
      const int64_t t = time_index(s, T, reverse);
      const scalar_t* c_prev =
          s == 0 ? c0.data_ptr<scalar_t>()
                 : workspace[time_index(s - 1, T, reverse)].data_ptr<scalar_t>() + 4 * H;
      const int64_t ld_c_prev = s == 0 ? H : 5 * H;
      const scalar_t* dy_t = dy[t].data_ptr<scalar_t>();
      const scalar_t* cache = workspace[t].data_ptr<scalar_t>();
      Tensor dg_t = dg[t];
      scalar_t* g = dg_t.data_ptr<scalar_t>();
      parallel_rows(N, 4 * H, [&](int64_t b, int64_t e) {
        lstm_backward_block<scalar_t>(dy_t + b * H, dhc + b * H, dcp + b * H, cache + b * 5 * H,
                                      c_prev + b * ld_c_prev, ld_c_prev, g + b * 4 * H, e - b, H);
      });
      at::mm_out(dh_carry, dg_t, w_hh);
    }
  });
  if (T == 0) {
    return {at::zeros_like(x), dh_carry, dc, at::zeros_like(w_ih), at::zeros_like(w_hh),
            at::zeros({4 * H}, x.options())};
  }
  InputGrads in = input_grads(dg, x, w_ih);
  return {in.dx, dh_carry, dc, in.dw_ih, recurrent_weight_grad(dg, y, h0, reverse),
          bias_grad(dg)};
}

}  // namespace rnnfast
