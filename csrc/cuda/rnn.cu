// Elman RNN on CUDA (tanh, relu, and the identity recurrence of SimpleRNN): the persistent
// kernels (persistent.cuh) where they fit, else per step the recurrent GEMM and one fused
// pointwise kernel (common.cuh).
#include "fused_step.cuh"
#include "persistent.cuh"
#include "step_graph.cuh"

namespace rnnfast::cuda {

// activation: 0 tanh, 1 relu (keeps NaN, as torch.relu does), 2 identity
template <typename acc_t>
__device__ __forceinline__ acc_t elman_act(acc_t v, int activation) {
  if (activation == 0) return tanh_act(v);
  if (activation == 1) return v < acc_t(0) ? acc_t(0) : v;
  return v;
}

// the activation's derivative, from its output h
template <typename acc_t>
__device__ __forceinline__ acc_t elman_act_grad(acc_t h, int activation) {
  if (activation == 0) return acc_t(1) - h * h;
  if (activation == 1) return h > acc_t(0) ? acc_t(1) : acc_t(0);
  return acc_t(1);
}

// h = act(xp + hh), xp holding both biases
template <typename scalar_t, typename acc_t>
__global__ void elman_forward_step(const scalar_t* __restrict__ xp, const scalar_t* __restrict__ hh,
                                   scalar_t* __restrict__ h, int64_t count, int activation) {
  RNNFAST_GRID_STRIDE(idx, count) {
    h[idx] = scalar_t(elman_act(acc_t(xp[idx]) + acc_t(hh[idx]), activation));
  }
}

// dg = (dy + dh) * act'(h); the GEMM after this kernel overwrites dh with dg W_hh
template <typename scalar_t, typename acc_t>
__global__ void elman_backward_step(const scalar_t* __restrict__ dy, const acc_t* __restrict__ dh,
                                    const scalar_t* __restrict__ h, acc_t* __restrict__ dg,
                                    scalar_t* __restrict__ dg16, int64_t count, int activation) {
  RNNFAST_GRID_STRIDE(idx, count) {
    const acc_t g = (acc_t(dy[idx]) + dh[idx]) * elman_act_grad(acc_t(h[idx]), activation);
    dg[idx] = g;
    if (dg16 != nullptr) dg16[idx] = scalar_t(g);
  }
}

// The Elman cell's pointwise work inside the persistent kernels (the same math as the
// two step kernels above).
struct ElmanCell {
  static constexpr int kGates = 1;
  static constexpr bool kDirectDh = false;
  static constexpr bool kNeedsHPrev = false;  // forward reads h_{t-1} (the register tile)

  // the pointwise input of unit u, row n at step s: the input projection (both biases in it)
  static constexpr int kLoads = 1;
  template <typename scalar_t, typename acc_t>
  __device__ static void load(const PersistentParams<scalar_t, acc_t>& p, int64_t, int64_t t,
                              int64_t, int64_t n, int64_t u, acc_t (&in)[kLoads]) {
    in[0] = acc_t(p.xp[(t * p.N + n) * p.H + u]);
  }

  template <typename scalar_t, typename acc_t>
  __device__ static scalar_t forward(const PersistentParams<scalar_t, acc_t>& p, int64_t,
                                     int64_t t, int64_t, int64_t n, int64_t u,
                                     const acc_t (&hh)[1], acc_t, const acc_t (&in)[kLoads]) {
    const scalar_t h = scalar_t(elman_act(in[0] + hh[0], p.activation));
    p.y[(t * p.N + n) * p.H + u] = h;
    return h;
  }

  // phase A's inputs of unit u, row n at step s but the carried dh: dy and y
  static constexpr int kBackwardLoads = 2;
  template <typename scalar_t, typename acc_t>
  __device__ static void load_backward(const PersistentParams<scalar_t, acc_t>& p, int64_t,
                                       int64_t t, int64_t, int64_t n, int64_t u,
                                       acc_t (&in)[kBackwardLoads]) {
    const int64_t idx = (t * p.N + n) * p.H + u;
    in[0] = acc_t(p.dy[idx]);
    in[1] = acc_t(p.y[idx]);
  }

  template <typename scalar_t, typename acc_t>
  __device__ static void backward(const PersistentParams<scalar_t, acc_t>& p, int64_t, int64_t t,
                                  int64_t, int64_t n, int64_t u,
                                  const acc_t (&in)[kBackwardLoads], acc_t (&dgh)[1]) {
    dgh[0] = (in[0] + p.dh[n * p.H + u]) * elman_act_grad(in[1], p.activation);
    p.dg_ih[(t * p.N + n) * p.H + u] = dgh[0];
  }
};

std::tuple<Tensor, Tensor> rnn_forward_cuda(const Tensor& x, const Tensor& h0, const Tensor& w_ih,
                                            const Tensor& w_hh, const std::optional<Tensor>& b_ih,
                                            const std::optional<Tensor>& b_hh, int64_t activation,
                                            bool reverse, bool training) {
  // Elman saves nothing beyond y (training: a forced path must fit its backward too)
  RNNFAST_NO_AUTOCAST;
  const char* op = "rnnfast::rnn_forward";
  check_layer_inputs(op, 1, x, h0, w_ih, w_hh, b_ih, b_hh);
  check_activation(op, activation);
  check_cuda(op, x);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t T = x.size(0), N = x.size(1), H = w_hh.size(1);
  Tensor y = at::empty({T, N, H}, x.options());
  if (T == 0 || N == 0 || H == 0) return {y, h0.clone()};
  const Tensor xp = input_projection(x, w_ih, sum_biases(b_ih, b_hh));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  std::string refused;  // why the forced persistent path cannot run, or empty
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::Half, at::ScalarType::BFloat16, x.scalar_type(), "rnn_forward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        scalar_t* yp = y.data_ptr<scalar_t>();
        const PersistentLaunch plan =
            plan_persistent<ElmanCell, scalar_t, acc_t, false>(N, H, x.scalar_type(), training);
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
          p.activation = static_cast<int>(activation);
          p.xp = xp.data_ptr<scalar_t>(), p.w_hh = w_hha.data_ptr<scalar_t>();
          p.h0 = h0a.data_ptr<scalar_t>(), p.y = yp;
          if (graphed) {
            if (run_step_graph_forward<ElmanCell>(p, w_hh, stream)) return;
          } else if (fused) {
            refused = run_fused_steps<ElmanCell>(p, stream);  // raised below
            return;
          } else {
            refused = launch_persistent(plan, p, x);  // a launch error, raised below
            return;
          }
        }
        Tensor hh = at::empty({N, H}, x.options());
        const StepGemm gemm(w_hh);
        for (int64_t s = 0; s < T; ++s) {
          const int64_t t = time_index(s, T, reverse), tp = time_index(s - 1, T, reverse);
          gemm.gates(h0, y, s == 0 ? -1 : tp, hh);
          elman_forward_step<scalar_t, acc_t><<<grid_for(N * H), kThreads, 0, stream>>>(
              xp.data_ptr<scalar_t>() + t * N * H, hh.data_ptr<scalar_t>(), yp + t * N * H,
              N * H, static_cast<int>(activation));
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
        refused = gemm.error();  // raised below, as a refusal is
      });
  check_persistent_refusal(op, refused);
  return {y, y[time_index(T - 1, T, reverse)].clone()};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> rnn_backward_cuda(
    const Tensor& dy, const Tensor& dhn, const Tensor& x, const Tensor& h0, const Tensor& w_ih,
    const Tensor& w_hh, const Tensor& y, int64_t activation, bool reverse) {
  RNNFAST_NO_AUTOCAST;
  const char* op = "rnnfast::rnn_backward";
  check_layer_inputs(op, 1, x, h0, w_ih, w_hh, std::nullopt, std::nullopt);
  check_activation(op, activation);
  check_cuda(op, x);
  const int64_t T = x.size(0), N = x.size(1), H = w_hh.size(1);
  check_same_shape(op, "y", y, {T, N, H}, x);
  check_same_shape(op, "dy", dy, {T, N, H}, x);
  check_same_shape(op, "dhn", dhn, {N, H}, x);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto acc = workspace_dtype(x.scalar_type());
  Tensor dh = dhn.to(acc, false, /*copy=*/true);
  if (T == 0 || N == 0 || H == 0) {
    return {at::zeros_like(x), dh.to(x.scalar_type()), at::zeros_like(w_ih),
            at::zeros_like(w_hh), at::zeros({H}, x.options())};
  }
  Tensor dg = at::empty({T, N, H}, x.options().dtype(acc));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  std::string refused;  // why the forced persistent path cannot run, or empty
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::Half, at::ScalarType::BFloat16, x.scalar_type(), "rnn_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const PersistentLaunch plan =
            plan_persistent<ElmanCell, scalar_t, acc_t, true>(N, H, x.scalar_type());
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
          p.activation = static_cast<int>(activation);
          p.w_hh = w_hh.data_ptr<scalar_t>(), p.y = const_cast<scalar_t*>(y.data_ptr<scalar_t>());
          p.dy = dy.data_ptr<scalar_t>(), p.dh = dh.data_ptr<acc_t>();
          p.dg_ih = dg.data_ptr<acc_t>(), p.dg_hh = dg.data_ptr<acc_t>();
          if (!graphed) {
            // a launch error, raised below
            refused = fused ? run_fused_backward<ElmanCell>(p, w_hh, stream)
                            : launch_persistent(plan, p, x);
            return;
          }
          if (run_step_graph_backward<ElmanCell>(p, w_hh, stream)) return;
        }
        const StepGemm gemm(w_hh, N);
        scalar_t* dg16p = gemm.dg16<scalar_t>();
        for (int64_t s = T - 1; s >= 0; --s) {
          const int64_t t = time_index(s, T, reverse);
          acc_t* dgt = dg.data_ptr<acc_t>() + t * N * H;
          elman_backward_step<scalar_t, acc_t><<<grid_for(N * H), kThreads, 0, stream>>>(
              dy.data_ptr<scalar_t>() + t * N * H, dh.data_ptr<acc_t>(),
              y.data_ptr<scalar_t>() + t * N * H, dgt, dg16p, N * H,
              static_cast<int>(activation));
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          gemm.dh(dg, t, dh, /*accumulate=*/false);
        }
        refused = gemm.error();  // raised below, as a refusal is
      });
  check_persistent_refusal(op, refused);
  const SequenceGrads g = sequence_grads(dg, dg, x, y, h0, w_ih, reverse);
  return {g.dx, dh.to(x.scalar_type()), g.dw_ih, g.dw_hh, g.db_ih};
}

}  // namespace rnnfast::cuda

const char* rnnfast::cuda_step_gemm_kind() { return rnnfast::cuda::step_gemm_kind(); }

TORCH_LIBRARY_IMPL(rnnfast, CUDA, m) {
  m.impl("rnn_forward", &rnnfast::cuda::rnn_forward_cuda);
  m.impl("rnn_backward", &rnnfast::cuda::rnn_backward_cuda);
}
