// GRU on CUDA: the persistent kernels (persistent.cuh) where they fit, else per step the
// recurrent GEMM and one fused pointwise kernel (common.cuh).
#include "persistent.cuh"

namespace rnnfast::cuda {

// The GRU's pointwise work inside the persistent kernels: the same math and workspace
// layout as gru_forward_step and gru_backward_step below.
struct GruCell {
  static constexpr int kGates = 3;
  static constexpr bool kDirectDh = true;  // dh_{t-1} = dg_hh W_hh + dh_t * z

  template <typename scalar_t, typename acc_t>
  __device__ static void forward(const PersistentParams<scalar_t, acc_t>& p, int64_t, int64_t t,
                                 int64_t, int64_t n, int64_t u, const acc_t (&hh)[3],
                                 acc_t h_prev) {
    const int64_t H = p.H, row = t * p.N + n;
    const scalar_t* xr = p.xp + row * 3 * H + u;
    const scalar_t* b = p.b_hh;
    const acc_t r = sigmoid_act(acc_t(xr[0]) + (hh[0] + (b ? acc_t(b[u]) : acc_t(0))));
    const acc_t z = sigmoid_act(acc_t(xr[H]) + (hh[1] + (b ? acc_t(b[H + u]) : acc_t(0))));
    const acc_t hn = hh[2] + (b ? acc_t(b[2 * H + u]) : acc_t(0));
    const acc_t nn = tanh_act(acc_t(xr[2 * H]) + r * hn);
    p.y[row * H + u] = scalar_t((acc_t(1) - z) * nn + z * h_prev);
    if (p.cache != nullptr) {
      acc_t* cr = p.cache + row * 4 * H + u;
      cr[0] = r;
      cr[H] = z;
      cr[2 * H] = nn;
      cr[3 * H] = hn;
    }
  }

  template <typename scalar_t, typename acc_t>
  __device__ static void backward(const PersistentParams<scalar_t, acc_t>& p, int64_t s,
                                  int64_t t, int64_t tp, int64_t n, int64_t u) {
    const int64_t H = p.H, N = p.N, row = t * N + n, idx = n * H + u;
    const acc_t* cr = p.cache + row * 4 * H + u;
    const acc_t r = cr[0], z = cr[H], nn = cr[2 * H], hn = cr[3 * H];
    const acc_t dh_total = acc_t(p.dy[row * H + u]) + p.dh[idx];
    const acc_t hp = acc_t(s == 0 ? p.h0[idx] : p.y[(tp * N + n) * H + u]);
    const acc_t dn = dh_total * (acc_t(1) - z) * (acc_t(1) - nn * nn);
    const acc_t dz = dh_total * (hp - nn) * z * (acc_t(1) - z);
    const acc_t dr = dn * hn * r * (acc_t(1) - r);
    acc_t* di = p.dg_ih + row * 3 * H + u;
    acc_t* dhh = p.dg_hh + row * 3 * H + u;
    di[0] = dr;
    di[H] = dz;
    di[2 * H] = dn;
    dhh[0] = dr;
    dhh[H] = dz;
    dhh[2 * H] = dn * r;
    p.dh[idx] = dh_total * z;
  }
};

// One step: xp = x W_ih^T + b_ih (all three gates), hh = h_{t-1} W_hh^T (b_hh added here,
// as b_hn must sit inside r * (...)):
//   r = sigma(xp_r + hh_r + b_hr), z = sigma(xp_z + hh_z + b_hz),
//   n = tanh(xp_n + r * (hh_n + b_hn)), h = (1 - z) * n + z * h_{t-1}.
// cache [N, 4H] = r, z, n, hh_n + b_hn when training.
template <typename scalar_t, typename acc_t>
__global__ void gru_forward_step(const scalar_t* __restrict__ xp, const scalar_t* __restrict__ hh,
                                 const scalar_t* __restrict__ b_hh,
                                 const scalar_t* __restrict__ h_prev, scalar_t* __restrict__ h,
                                 acc_t* __restrict__ cache, int64_t N, int64_t H) {
  RNNFAST_GRID_STRIDE(idx, N * H) {
    const int64_t n = idx / H, u = idx % H;
    const scalar_t* xr = xp + n * 3 * H + u;
    const scalar_t* hr = hh + n * 3 * H + u;
    const acc_t br = b_hh ? acc_t(b_hh[u]) : acc_t(0);
    const acc_t bz = b_hh ? acc_t(b_hh[H + u]) : acc_t(0);
    const acc_t bn = b_hh ? acc_t(b_hh[2 * H + u]) : acc_t(0);
    const acc_t r = sigmoid_act(acc_t(xr[0]) + (acc_t(hr[0]) + br));
    const acc_t z = sigmoid_act(acc_t(xr[H]) + (acc_t(hr[H]) + bz));
    const acc_t hn = acc_t(hr[2 * H]) + bn;
    const acc_t nn = tanh_act(acc_t(xr[2 * H]) + r * hn);
    const acc_t hp = acc_t(h_prev[idx]);
    h[idx] = scalar_t((acc_t(1) - z) * nn + z * hp);
    if (cache != nullptr) {
      acc_t* cr = cache + n * 4 * H + u;
      cr[0] = r;
      cr[H] = z;
      cr[2 * H] = nn;
      cr[3 * H] = hn;
    }
  }
}

// Backward of one step: gate gradients for the input side dg_ih [N, 3H] and the hidden
// side dg_hh [N, 3H] (they differ in the n gate: r scales the hidden side), and dh's
// direct term dh_total * z written into dh, to which the GEMM then adds dg_hh W_hh.
template <typename scalar_t, typename acc_t>
__global__ void gru_backward_step(const scalar_t* __restrict__ dy, acc_t* __restrict__ dh,
                                  const scalar_t* __restrict__ h_prev,
                                  const acc_t* __restrict__ cache, acc_t* __restrict__ dg_ih,
                                  acc_t* __restrict__ dg_hh, int64_t N, int64_t H) {
  RNNFAST_GRID_STRIDE(idx, N * H) {
    const int64_t n = idx / H, u = idx % H;
    const acc_t* cr = cache + n * 4 * H + u;
    const acc_t r = cr[0], z = cr[H], nn = cr[2 * H], hn = cr[3 * H];
    const acc_t dh_total = acc_t(dy[idx]) + dh[idx];
    const acc_t hp = acc_t(h_prev[idx]);
    const acc_t dn = dh_total * (acc_t(1) - z) * (acc_t(1) - nn * nn);
    const acc_t dz = dh_total * (hp - nn) * z * (acc_t(1) - z);
    const acc_t dr = dn * hn * r * (acc_t(1) - r);
    acc_t* di = dg_ih + n * 3 * H + u;
    acc_t* dhh = dg_hh + n * 3 * H + u;
    di[0] = dr;
    di[H] = dz;
    di[2 * H] = dn;
    dhh[0] = dr;
    dhh[H] = dz;
    dhh[2 * H] = dn * r;
    dh[idx] = dh_total * z;
  }
}

std::tuple<Tensor, Tensor, Tensor> gru_forward_cuda(const Tensor& x, const Tensor& h0,
                                                    const Tensor& w_ih, const Tensor& w_hh,
                                                    const std::optional<Tensor>& b_ih,
                                                    const std::optional<Tensor>& b_hh,
                                                    bool reverse, bool training) {
  RNNFAST_NO_AUTOCAST;
  const char* op = "rnnfast::gru_forward";
  check_layer_inputs(op, 3, x, h0, w_ih, w_hh, b_ih, b_hh);
  check_cuda(op, x);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t T = x.size(0), N = x.size(1), H = w_hh.size(1);
  const auto acc = workspace_dtype(x.scalar_type());
  Tensor y = at::empty({T, N, H}, x.options());
  Tensor workspace = at::empty({training ? T : 0, N, 4 * H}, x.options().dtype(acc));
  if (T == 0 || N == 0 || H == 0) return {y, h0.clone(), workspace};
  const Tensor xp = input_projection(x, w_ih, b_ih);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::Half, at::ScalarType::BFloat16, x.scalar_type(), "gru_forward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        scalar_t* yp = y.data_ptr<scalar_t>();
        acc_t* ws = workspace.data_ptr<acc_t>();
        const scalar_t* bp = b_hh ? b_hh->data_ptr<scalar_t>() : nullptr;
        const PersistentLaunch plan =
            plan_persistent<GruCell, scalar_t, acc_t, false>(op, N, H, x.scalar_type());
        if (plan.kernel != nullptr) {
          PersistentParams<scalar_t, acc_t> p{};
          p.T = T, p.N = N, p.H = H, p.reverse = reverse;
          p.xp = xp.data_ptr<scalar_t>(), p.w_hh = w_hh.data_ptr<scalar_t>(), p.b_hh = bp;
          p.h0 = h0.data_ptr<scalar_t>(), p.y = yp, p.cache = training ? ws : nullptr;
          launch_persistent(plan, p, x);
          return;
        }
        Tensor hh = at::empty({N, 3 * H}, x.options());
        const Tensor w_hh_t = w_hh.t();
        for (int64_t s = 0; s < T; ++s) {
          const int64_t t = time_index(s, T, reverse), tp = time_index(s - 1, T, reverse);
          const scalar_t* h_prev = s == 0 ? h0.data_ptr<scalar_t>() : yp + tp * N * H;
          gates_gemm(s == 0 ? h0 : y[tp], w_hh_t, hh);
          gru_forward_step<scalar_t, acc_t><<<grid_for(N * H), kThreads, 0, stream>>>(
              xp.data_ptr<scalar_t>() + t * N * 3 * H, hh.data_ptr<scalar_t>(), bp, h_prev,
              yp + t * N * H, training ? ws + t * N * 4 * H : nullptr, N, H);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      });
  return {y, y[time_index(T - 1, T, reverse)].clone(), workspace};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> gru_backward_cuda(
    const Tensor& dy, const Tensor& dhn, const Tensor& x, const Tensor& h0, const Tensor& w_ih,
    const Tensor& w_hh, const Tensor& y, const Tensor& workspace, bool reverse) {
  RNNFAST_NO_AUTOCAST;
  const char* op = "rnnfast::gru_backward";
  check_layer_inputs(op, 3, x, h0, w_ih, w_hh, std::nullopt, std::nullopt);
  check_cuda(op, x);
  const int64_t T = x.size(0), N = x.size(1), H = w_hh.size(1);
  const auto acc = workspace_dtype(x.scalar_type());
  check_same_shape(op, "y", y, {T, N, H}, x);
  check_same_shape(op, "dy", dy, {T, N, H}, x);
  check_same_shape(op, "dhn", dhn, {N, H}, x);
  check_workspace(op, workspace, 4 * H, x);
  const c10::cuda::CUDAGuard guard(x.device());
  Tensor dh = dhn.to(acc, false, /*copy=*/true);
  if (T == 0 || N == 0 || H == 0) {
    return {at::zeros_like(x), dh.to(x.scalar_type()), at::zeros_like(w_ih),
            at::zeros_like(w_hh), at::zeros({3 * H}, x.options()), at::zeros({3 * H}, x.options())};
  }
  Tensor dg_ih = at::empty({T, N, 3 * H}, x.options().dtype(acc));
  Tensor dg_hh = at::empty({T, N, 3 * H}, x.options().dtype(acc));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::Half, at::ScalarType::BFloat16, x.scalar_type(), "gru_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const acc_t* ws = workspace.data_ptr<acc_t>();
        const scalar_t* yp = y.data_ptr<scalar_t>();
        const PersistentLaunch plan =
            plan_persistent<GruCell, scalar_t, acc_t, true>(op, N, H, x.scalar_type());
        if (plan.kernel != nullptr) {
          PersistentParams<scalar_t, acc_t> p{};
          p.T = T, p.N = N, p.H = H, p.reverse = reverse;
          p.w_hh = w_hh.data_ptr<scalar_t>(), p.h0 = h0.data_ptr<scalar_t>();
          p.y = const_cast<scalar_t*>(yp), p.cache = const_cast<acc_t*>(ws);
          p.dy = dy.data_ptr<scalar_t>(), p.dh = dh.data_ptr<acc_t>();
          p.dg_ih = dg_ih.data_ptr<acc_t>(), p.dg_hh = dg_hh.data_ptr<acc_t>();
          launch_persistent(plan, p, x);
          return;
        }
        const Tensor w_hh_acc = w_hh.to(acc).contiguous();
        for (int64_t s = T - 1; s >= 0; --s) {
          const int64_t t = time_index(s, T, reverse), tp = time_index(s - 1, T, reverse);
          const scalar_t* h_prev = s == 0 ? h0.data_ptr<scalar_t>() : yp + tp * N * H;
          acc_t* dhh = dg_hh.data_ptr<acc_t>() + t * N * 3 * H;
          gru_backward_step<scalar_t, acc_t><<<grid_for(N * H), kThreads, 0, stream>>>(
              dy.data_ptr<scalar_t>() + t * N * H, dh.data_ptr<acc_t>(), h_prev,
              ws + t * N * 4 * H, dg_ih.data_ptr<acc_t>() + t * N * 3 * H, dhh, N, H);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          dh_gemm(dg_hh[t], w_hh_acc, dh, /*accumulate=*/true);
        }
      });
  const InputGrads in = input_grads(dg_ih, x, w_ih);
  return {in.dx,
          dh.to(x.scalar_type()),
          in.dw_ih,
          recurrent_weight_grad(dg_hh, y, h0, reverse).to(x.scalar_type()),
          bias_grad(dg_ih, x.scalar_type()),
          bias_grad(dg_hh, x.scalar_type())};
}

}  // namespace rnnfast::cuda

TORCH_LIBRARY_IMPL(rnnfast, CUDA, m) {
  m.impl("gru_forward", &rnnfast::cuda::gru_forward_cuda);
  m.impl("gru_backward", &rnnfast::cuda::gru_backward_cuda);
}
