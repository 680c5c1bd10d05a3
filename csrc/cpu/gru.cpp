// GRU on the CPU (b_hn inside r * (W_hn h + b_hn), as torch.nn).
#include "../rnnfast.h"
#include "common.h"
#include "pointwise.h"

namespace rnnfast {

using namespace rnnfast::cpu;

std::tuple<Tensor, Tensor, Tensor> gru_forward_cpu(const Tensor& x, const Tensor& h0,
                                                   const Tensor& w_ih, const Tensor& w_hh,
                                                   const std::optional<Tensor>& b_ih,
                                                   const std::optional<Tensor>& b_hh,
                                                   bool reverse, bool training) {
  check_layer_inputs("rnnfast::gru_forward", 3, x, h0, w_ih, w_hh, b_ih, b_hh);
  const int64_t T = x.size(0), N = x.size(1), H = w_hh.size(1);
  // b_hr and b_hz fold into the input projection; b_hn must stay inside r * (...).
  std::optional<Tensor> b_hrz;
  Tensor b_hn = at::zeros({H}, x.options());
  if (b_hh) {
    b_hrz = at::cat({b_hh->narrow(0, 0, 2 * H), b_hn});
    b_hn = b_hh->narrow(0, 2 * H, H);
  }
  const Tensor xp = input_projection(x, w_ih, sum_biases(b_ih, b_hrz));
  Tensor y = at::empty({T, N, H}, x.options());
  Tensor workspace = at::empty({training ? T : 0, N, 4 * H}, x.options());
  Tensor hh = at::empty({N, 3 * H}, x.options());
  const Tensor w_hh_t = w_hh.t();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gru_forward_cpu", [&] {
    const scalar_t* bn = b_hn.data_ptr<scalar_t>();
    const scalar_t* hhp = hh.data_ptr<scalar_t>();
    for (int64_t s = 0; s < T; ++s) {
      const int64_t t = time_index(s, T, reverse);
      const Tensor h_prev = s == 0 ? h0 : y[time_index(s - 1, T, reverse)];
      at::mm_out(hh, h_prev, w_hh_t);
      const scalar_t* xp_t = xp[t].data_ptr<scalar_t>();
      const scalar_t* hp = h_prev.data_ptr<scalar_t>();
      scalar_t* h = y[t].data_ptr<scalar_t>();
      scalar_t* cache = training ? workspace[t].data_ptr<scalar_t>() : nullptr;
      parallel_rows(N, 3 * H, [&](int64_t b, int64_t e) {
        gru_forward_block<scalar_t>(xp_t + b * 3 * H, hhp + b * 3 * H, bn, hp + b * H, h + b * H,
                                    cache ? cache + b * 4 * H : nullptr, e - b, H);
      });
    }
  });
  Tensor hn = T == 0 ? h0.clone() : y[time_index(T - 1, T, reverse)].clone();
  return {y, hn, workspace};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> gru_backward_cpu(
    const Tensor& dy, const Tensor& dhn, const Tensor& x, const Tensor& h0, const Tensor& w_ih,
    const Tensor& w_hh, const Tensor& y, const Tensor& workspace, bool reverse) {
  const char* op = "rnnfast::gru_backward";
  check_layer_inputs(op, 3, x, h0, w_ih, w_hh, std::nullopt, std::nullopt);
  const int64_t T = x.size(0), N = x.size(1), H = w_hh.size(1);
  check_same_shape(op, "y", y, {T, N, H}, x);
  check_same_shape(op, "workspace", workspace, {T, N, 4 * H}, x);
  check_same_shape(op, "dy", dy, {T, N, H}, x);
  check_same_shape(op, "dhn", dhn, {N, H}, x);
  Tensor dg_ih = at::empty({T, N, 3 * H}, x.options());
  Tensor dg_hh = at::empty({T, N, 3 * H}, x.options());
  Tensor dh_carry = dhn.clone();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gru_backward_cpu", [&] {
    scalar_t* dhc = dh_carry.data_ptr<scalar_t>();
    for (int64_t s = T - 1; s >= 0; --s) {
      const int64_t t = time_index(s, T, reverse);
      const scalar_t* hp = s == 0 ? h0.data_ptr<scalar_t>()
                                  : y[time_index(s - 1, T, reverse)].data_ptr<scalar_t>();
      const scalar_t* dy_t = dy[t].data_ptr<scalar_t>();
      const scalar_t* cache = workspace[t].data_ptr<scalar_t>();
      Tensor dgh_t = dg_hh[t];
      scalar_t* gi = dg_ih[t].data_ptr<scalar_t>();
      scalar_t* gh = dgh_t.data_ptr<scalar_t>();
      parallel_rows(N, 3 * H, [&](int64_t b, int64_t e) {
        gru_backward_block<scalar_t>(dy_t + b * H, dhc + b * H, hp + b * H, cache + b * 4 * H,
                                     gi + b * 3 * H, gh + b * 3 * H, e - b, H);
      });
      dh_carry.addmm_(dgh_t, w_hh);
    }
  });
  if (T == 0) {
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
