// GRU on CUDA: the persistent kernels (persistent.cuh) where they fit, else per step the
// recurrent GEMM and one fused pointwise kernel (common.cuh).
#include "fused_step.cuh"
#include "persistent.cuh"
#include "step_graph.cuh"

namespace rnnfast::cuda {

// ---- the GRU's pointwise math, once, for both designs ----

// From the input side's pre-activations x_r, x_z, x_n (b_ih included) and the hidden side's
// hh_r, hh_z, hh_n (b_hh included):
//   r = sigma(x_r + hh_r), z = sigma(x_z + hh_z), n = tanh(x_n + r * hh_n),
// and hn = hh_n, which the backward needs.
template <typename acc_t>
struct GruGates {
  acc_t r, z, n, hn;
};
template <typename acc_t>
__device__ __forceinline__ GruGates<acc_t> gru_point(acc_t xr, acc_t xz, acc_t xn, acc_t hr,
                                                     acc_t hz, acc_t hn) {
  const acc_t r = sigmoid_act(xr + hr);
  const acc_t z = sigmoid_act(xz + hz);
  return {r, z, tanh_act(xn + r * hn), hn};
}

// h_t from the gates and h_{t-1}
template <typename acc_t>
__device__ __forceinline__ acc_t gru_h(const GruGates<acc_t>& s, acc_t h_prev) {
  return (acc_t(1) - s.z) * s.n + s.z * h_prev;
}

// r, z, n, hn into a workspace row (cr = its unit's first entry)
template <typename acc_t>
__device__ __forceinline__ void gru_store(acc_t* cr, int64_t H, const GruGates<acc_t>& s) {
  cr[0] = s.r;
  cr[H] = s.z;
  cr[2 * H] = s.n;
  cr[3 * H] = s.hn;
}

// Backward of one unit and row: from its saved r, z, n, hn (sv[0..4), gathered from its
// workspace row), the total dh and h_{t-1},
// the gate gradients of the input side di[0, H, 2H] and of the hidden side dhh[0, H, 2H]
// (they differ in the n gate: r scales the hidden side); returns dh_{t-1}'s direct term
// dh_total * z (the hidden side's GEMM adds the rest).
template <typename acc_t>
__device__ __forceinline__ acc_t gru_point_backward(const acc_t* sv, int64_t H,
                                                    acc_t dh_total, acc_t h_prev, acc_t* di,
                                                    acc_t* dhh) {
  const acc_t r = sv[0], z = sv[1], nn = sv[2], hn = sv[3];
  const acc_t dn = dh_total * (acc_t(1) - z) * (acc_t(1) - nn * nn);
  const acc_t dz = dh_total * (h_prev - nn) * z * (acc_t(1) - z);
  const acc_t dr = dn * hn * r * (acc_t(1) - r);
  di[0] = dr;
  di[H] = dz;
  di[2 * H] = dn;
  dhh[0] = dr;
  dhh[H] = dz;
  dhh[2 * H] = dn * r;
  return dh_total * z;
}

// b_hh's entry for gate g of unit u, or 0 without bias
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t gru_hidden_bias(const scalar_t* b_hh, int64_t H, int g,
                                                 int64_t u) {
  return b_hh ? acc_t(b_hh[g * H + u]) : acc_t(0);
}

// ---- persistent kernels: the GRU's part (see persistent.cuh) ----
struct GruCell {
  static constexpr int kGates = 3;
  static constexpr bool kDirectDh = true;  // dh_{t-1} = dg_hh W_hh + dh_t * z
  static constexpr bool kNeedsHPrev = true;  // forward reads h_{t-1} (the register tile)

  // the pointwise inputs of unit u, row n at step s: x_r, x_z, x_n (the input projection
  // with b_ih) and b_hr, b_hz, b_hn (zero without b_hh)
  static constexpr int kLoads = 6;
  template <typename scalar_t, typename acc_t>
  __device__ static void load(const PersistentParams<scalar_t, acc_t>& p, int64_t, int64_t t,
                              int64_t, int64_t n, int64_t u, acc_t (&in)[kLoads]) {
    const int64_t H = p.H;
    gather_gates<3>(p.xp + (t * p.N + n) * 3 * H + u, H, in);
#pragma unroll
    for (int g = 0; g < 3; ++g) in[3 + g] = gru_hidden_bias<scalar_t, acc_t>(p.b_hh, H, g, u);
  }

  template <typename scalar_t, typename acc_t>
  __device__ static scalar_t forward(const PersistentParams<scalar_t, acc_t>& p, int64_t,
                                     int64_t t, int64_t, int64_t n, int64_t u,
                                     const acc_t (&hh)[3], acc_t h_prev,
                                     const acc_t (&in)[kLoads]) {
    const int64_t H = p.H, row = t * p.N + n;
    const GruGates<acc_t> st =
        gru_point(in[0], in[1], in[2], hh[0] + in[3], hh[1] + in[4], hh[2] + in[5]);
    const scalar_t h = scalar_t(gru_h(st, h_prev));
    p.y[row * H + u] = h;
    if (p.cache != nullptr) gru_store(p.cache + row * 4 * H + u, H, st);
    return h;
  }

  // phase A's inputs of unit u, row n at step s but the carried dh (phase B writes it after
  // the barrier): the saved r, z, n, hn, then dy and h_{t-1}
  static constexpr int kBackwardLoads = 6;
  template <typename scalar_t, typename acc_t>
  __device__ static void load_backward(const PersistentParams<scalar_t, acc_t>& p, int64_t s,
                                       int64_t t, int64_t tp, int64_t n, int64_t u,
                                       acc_t (&in)[kBackwardLoads]) {
    const int64_t H = p.H, N = p.N, row = t * N + n;
    gather_gates<4>(p.cache + row * 4 * H + u, H, in);
    in[4] = acc_t(p.dy[row * H + u]);
    in[5] = acc_t(s == 0 ? p.h0[n * H + u] : p.y[(tp * N + n) * H + u]);
  }

  template <typename scalar_t, typename acc_t>
  __device__ static void backward(const PersistentParams<scalar_t, acc_t>& p, int64_t, int64_t t,
                                  int64_t, int64_t n, int64_t u,
                                  const acc_t (&in)[kBackwardLoads], acc_t (&dgh)[3]) {
    const int64_t H = p.H, row = t * p.N + n, idx = n * H + u;
    acc_t di[3];
    p.dh[idx] = gru_point_backward(in, 1, in[4] + p.dh[idx], in[5], di, dgh);
    acc_t *dgi = p.dg_ih + row * 3 * H + u, *dgr = p.dg_hh + row * 3 * H + u;
#pragma unroll
    for (int g = 0; g < 3; ++g) {
      dgi[g * H] = di[g];
      dgr[g * H] = dgh[g];
    }
  }
};

// ---- per-step kernels ----

// One step: xp = x W_ih^T + b_ih (all three gates), hh = h_{t-1} W_hh^T (b_hh added here,
// as b_hn must sit inside r * (...)); cache [N, 4H] = r, z, n, hh_n + b_hn when training.
template <typename scalar_t, typename acc_t>
__global__ void gru_forward_step(const scalar_t* __restrict__ xp, const scalar_t* __restrict__ hh,
                                 const scalar_t* __restrict__ b_hh,
                                 const scalar_t* __restrict__ h_prev, scalar_t* __restrict__ h,
                                 acc_t* __restrict__ cache, int64_t N, int64_t H) {
  RNNFAST_GRID_STRIDE(idx, N * H) {
    const int64_t n = idx / H, u = idx % H;
    const scalar_t* xr = xp + n * 3 * H + u;
    const scalar_t* hr = hh + n * 3 * H + u;
    const GruGates<acc_t> st = gru_point(
        acc_t(xr[0]), acc_t(xr[H]), acc_t(xr[2 * H]),
        acc_t(hr[0]) + gru_hidden_bias<scalar_t, acc_t>(b_hh, H, 0, u),
        acc_t(hr[H]) + gru_hidden_bias<scalar_t, acc_t>(b_hh, H, 1, u),
        acc_t(hr[2 * H]) + gru_hidden_bias<scalar_t, acc_t>(b_hh, H, 2, u));
    h[idx] = scalar_t(gru_h(st, acc_t(h_prev[idx])));
    if (cache != nullptr) gru_store(cache + n * 4 * H + u, H, st);
  }
}

// Backward of one step: the gate gradients dg_ih and dg_hh [N, 3H] (dg_hh also in dg16
// [N, 3H] in scalar_t, the dh GEMM's operand, unless null; see StepGemm::dg16), and dh's
// direct term written into dh, to which the GEMM then adds dg_hh W_hh.
template <typename scalar_t, typename acc_t>
__global__ void gru_backward_step(const scalar_t* __restrict__ dy, acc_t* __restrict__ dh,
                                  const scalar_t* __restrict__ h_prev,
                                  const acc_t* __restrict__ cache, acc_t* __restrict__ dg_ih,
                                  acc_t* __restrict__ dg_hh, scalar_t* __restrict__ dg16,
                                  int64_t N, int64_t H) {
  RNNFAST_GRID_STRIDE(idx, N * H) {
    const int64_t n = idx / H, u = idx % H;
    acc_t sv[4], di[3], dhh[3];
    gather_gates<4>(cache + n * 4 * H + u, H, sv);
    dh[idx] = gru_point_backward(sv, 1, acc_t(dy[idx]) + dh[idx], acc_t(h_prev[idx]), di, dhh);
#pragma unroll
    for (int k = 0; k < 3; ++k) {
      const int64_t pos = n * 3 * H + k * H + u;
      dg_ih[pos] = di[k];
      dg_hh[pos] = dhh[k];
      if (dg16 != nullptr) dg16[pos] = scalar_t(dhh[k]);
    }
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
  std::string refused;  // why the forced persistent path cannot run, or empty
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::Half, at::ScalarType::BFloat16, x.scalar_type(), "gru_forward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        scalar_t* yp = y.data_ptr<scalar_t>();
        acc_t* ws = workspace.data_ptr<acc_t>();
        const scalar_t* bp = b_hh ? b_hh->data_ptr<scalar_t>() : nullptr;
        const PersistentLaunch plan =
            plan_persistent<GruCell, scalar_t, acc_t, false>(N, H, x.scalar_type(), training);
        if (!plan.refused.empty()) {
          refused = plan.refused;  // thrown below, from C++ (see check_persistent_refusal)
          return;
        }
        // the per-step path fused or as a CUDA graph (a bad knob value raised below whichever
        // path runs)
        const auto [fused, graphed] =
            step_choice<scalar_t>(plan.kernel == nullptr, H, /*backward=*/false, refused);
        if (!refused.empty()) return;
        if (plan.kernel != nullptr || fused || graphed) {
          const Tensor h0a = fused ? aligned16(h0) : h0, w_hha = fused ? aligned16(w_hh) : w_hh;
          PersistentParams<scalar_t, acc_t> p{};
          p.T = T, p.N = N, p.H = H, p.reverse = reverse;
          p.xp = xp.data_ptr<scalar_t>(), p.w_hh = w_hha.data_ptr<scalar_t>(), p.b_hh = bp;
          p.h0 = h0a.data_ptr<scalar_t>(), p.y = yp, p.cache = training ? ws : nullptr;
          if (graphed) {
            if (run_step_graph_forward<GruCell>(p, w_hh, stream)) return;
          } else if (fused) {
            refused = run_fused_steps<GruCell>(p, stream);  // raised below
            return;
          } else {
            refused = launch_persistent(plan, p, x);  // a launch error, raised below
            return;
          }
        }
        Tensor hh = at::empty({N, 3 * H}, x.options());
        const StepGemm gemm(w_hh);
        for (int64_t s = 0; s < T; ++s) {
          const int64_t t = time_index(s, T, reverse), tp = time_index(s - 1, T, reverse);
          const scalar_t* h_prev = s == 0 ? h0.data_ptr<scalar_t>() : yp + tp * N * H;
          gemm.gates(h0, y, s == 0 ? -1 : tp, hh);
          gru_forward_step<scalar_t, acc_t><<<grid_for(N * H), kThreads, 0, stream>>>(
              xp.data_ptr<scalar_t>() + t * N * 3 * H, hh.data_ptr<scalar_t>(), bp, h_prev,
              yp + t * N * H, training ? ws + t * N * 4 * H : nullptr, N, H);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
        refused = gemm.error();  // raised below, as a refusal is
      });
  check_persistent_refusal(op, refused);
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
  std::string refused;  // why the forced persistent path cannot run, or empty
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::Half, at::ScalarType::BFloat16, x.scalar_type(), "gru_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const acc_t* ws = workspace.data_ptr<acc_t>();
        const scalar_t* yp = y.data_ptr<scalar_t>();
        const PersistentLaunch plan =
            plan_persistent<GruCell, scalar_t, acc_t, true>(N, H, x.scalar_type());
        if (!plan.refused.empty()) {
          refused = plan.refused;  // thrown below, from C++ (see check_persistent_refusal)
          return;
        }
        // the per-step path's bfloat16 backward fused or as a CUDA graph
        const auto [fused, graphed] =
            step_choice<scalar_t>(plan.kernel == nullptr, H, /*backward=*/true, refused);
        if (!refused.empty()) return;
        if (plan.kernel != nullptr || fused || graphed) {
          PersistentParams<scalar_t, acc_t> p{};
          p.T = T, p.N = N, p.H = H, p.reverse = reverse;
          p.w_hh = w_hh.data_ptr<scalar_t>(), p.h0 = h0.data_ptr<scalar_t>();
          p.y = const_cast<scalar_t*>(yp), p.cache = const_cast<acc_t*>(ws);
          p.dy = dy.data_ptr<scalar_t>(), p.dh = dh.data_ptr<acc_t>();
          p.dg_ih = dg_ih.data_ptr<acc_t>(), p.dg_hh = dg_hh.data_ptr<acc_t>();
          if (!graphed) {
            // a launch error, raised below
            refused = fused ? run_fused_backward<GruCell>(p, w_hh, stream)
                            : launch_persistent(plan, p, x);
            return;
          }
          if (run_step_graph_backward<GruCell>(p, w_hh, stream)) return;
        }
        const StepGemm gemm(w_hh, N);
        scalar_t* dg16p = gemm.dg16<scalar_t>();
        for (int64_t s = T - 1; s >= 0; --s) {
          const int64_t t = time_index(s, T, reverse), tp = time_index(s - 1, T, reverse);
          const scalar_t* h_prev = s == 0 ? h0.data_ptr<scalar_t>() : yp + tp * N * H;
          acc_t* dhh = dg_hh.data_ptr<acc_t>() + t * N * 3 * H;
          gru_backward_step<scalar_t, acc_t><<<grid_for(N * H), kThreads, 0, stream>>>(
              dy.data_ptr<scalar_t>() + t * N * H, dh.data_ptr<acc_t>(), h_prev,
              ws + t * N * 4 * H, dg_ih.data_ptr<acc_t>() + t * N * 3 * H, dhh, dg16p, N, H);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          gemm.dh(dg_hh, t, dh, /*accumulate=*/true);
        }
        refused = gemm.error();  // raised below, as a refusal is
      });
  check_persistent_refusal(op, refused);
  const SequenceGrads g = sequence_grads(dg_ih, dg_hh, x, y, h0, w_ih, reverse);
  return {g.dx, dh.to(x.scalar_type()), g.dw_ih, g.dw_hh, g.db_ih, g.db_hh};
}

}  // namespace rnnfast::cuda

TORCH_LIBRARY_IMPL(rnnfast, CUDA, m) {
  m.impl("gru_forward", &rnnfast::cuda::gru_forward_cuda);
  m.impl("gru_backward", &rnnfast::cuda::gru_backward_cuda);
}
