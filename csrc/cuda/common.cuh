// What every CUDA cell file shares: the per-step recurrent GEMMs on torch's cuBLAS handle,
// the whole-sequence GEMMs and reductions of the backward, launch geometry, and the
// activations. The design is per step: one GEMM (h_{t-1} W_hh^T) and one fused pointwise
// kernel, all on torch's current stream; nothing is allocated inside the time loop and
// the host never waits for the device.
//
// Types: scalar_t is the tensors' dtype; acc_t = at::opmath_type<scalar_t> (float for
// half, bfloat16 and float; double for double) is what pointwise math, the LSTM cell state,
// the saved activations and the whole backward run in. Recurrent GEMMs of the forward run
// in scalar_t (tensor cores for half and bfloat16, accumulating in fp32 inside cuBLAS).
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>

#include "../rnnfast.h"

namespace rnnfast::cuda {

using at::Tensor;

// ---- launch geometry: grid-stride loops over `n` elements ----
constexpr int kThreads = 256;
inline unsigned grid_for(int64_t n) {
  return static_cast<unsigned>(std::min<int64_t>((n + kThreads - 1) / kThreads, 65535));
}
#define RNNFAST_GRID_STRIDE(i, n)                                                       \
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < (n);             \
       i += int64_t{blockDim.x} * gridDim.x)

// ---- activations in acc_t (accurate library functions, not the fast intrinsics) ----
__device__ __forceinline__ float exp_act(float x) { return expf(x); }
__device__ __forceinline__ double exp_act(double x) { return exp(x); }
__device__ __forceinline__ float tanh_act(float x) { return tanhf(x); }
__device__ __forceinline__ double tanh_act(double x) { return tanh(x); }
template <typename T>
__device__ __forceinline__ T sigmoid_act(T x) { return T(1) / (T(1) + exp_act(-x)); }

// out[k] = acc_t(p[k * stride]) for k < M: a unit's M gate values (or saved values) of one
// row, stride (H) apart. out may be part of a register array: every index is a constant.
template <int M, typename T, typename acc_t>
__device__ __forceinline__ void gather_gates(const T* p, int64_t stride, acc_t* out) {
#pragma unroll
  for (int k = 0; k < M; ++k) out[k] = acc_t(p[k * stride]);
}

// ---- checks and set-up shared by every op ----
inline void check_cuda(const char* op, const Tensor& x) {
  TORCH_CHECK(x.is_cuda(), op, ": expected CUDA tensors, but got ", x.device());
}

// x [T, N, C] -> x W_ih^T (+ bias) [T, N, G*H], one GEMM over all steps, in x's dtype.
inline Tensor input_projection(const Tensor& x, const Tensor& w_ih,
                               const std::optional<Tensor>& bias) {
  const int64_t T = x.size(0), N = x.size(1), C = x.size(2);
  const Tensor x2 = x.view({T * N, C});
  Tensor out = bias ? at::addmm(*bias, x2, w_ih.t()) : at::mm(x2, w_ih.t());
  return out.view({T, N, w_ih.size(0)});
}

// The per-step GEMMs, through ATen into preallocated outputs (no allocation; cuBLAS on
// the current stream). at::cuda::blas::gemm would skip ATen's dispatch, but torch does not
// export it to extensions.
// out [N, GH] = h [N, H] W_hh^T (w_hh_t = w_hh.t(), made once per call), in the tensors'
// dtype
inline void gates_gemm(const Tensor& h, const Tensor& w_hh_t, Tensor& out) {
  at::mm_out(out, h, w_hh_t);
}

// dh [N, H] = dg [N, GH] W_hh [GH, H], or += when accumulate, in acc_t
inline void dh_gemm(const Tensor& dg, const Tensor& w_hh, Tensor& dh, bool accumulate) {
  if (accumulate) {
    dh.addmm_(dg, w_hh);
  } else {
    at::mm_out(dh, dg, w_hh);
  }
}

// dW_hh [GH, H] = sum over steps of dg_hh[t]^T h_{t-1}, h_{t-1} being h0 at the first
// step visited and the neighbouring y otherwise: two GEMMs in acc_t, no gather.
inline Tensor recurrent_weight_grad(const Tensor& dg_hh, const Tensor& y, const Tensor& h0,
                                    bool reverse) {
  const int64_t T = dg_hh.size(0), GH = dg_hh.size(2), H = y.size(2);
  const auto acc = dg_hh.scalar_type();
  const int64_t first = reverse ? T - 1 : 0;
  Tensor dw = at::mm(dg_hh[first].t(), h0.to(acc));
  if (T > 1) {
    const Tensor dg = reverse ? dg_hh.narrow(0, 0, T - 1) : dg_hh.narrow(0, 1, T - 1);
    const Tensor hp = reverse ? y.narrow(0, 1, T - 1) : y.narrow(0, 0, T - 1);
    dw.addmm_(dg.reshape({-1, GH}).t(), hp.reshape({-1, H}).to(acc));
  }
  return dw;
}

struct InputGrads {
  Tensor dx, dw_ih;
};
// dx [T, N, C] = dg_ih W_ih and dW_ih = dg_ih^T x: one GEMM each over all T*N rows, in
// acc_t, returned in x's dtype.
inline InputGrads input_grads(const Tensor& dg_ih, const Tensor& x, const Tensor& w_ih) {
  const int64_t T = x.size(0), N = x.size(1), C = x.size(2);
  const auto acc = dg_ih.scalar_type();
  const Tensor dg = dg_ih.view({T * N, -1});
  return {at::mm(dg, w_ih.to(acc)).view({T, N, C}).to(x.scalar_type()),
          at::mm(dg.t(), x.view({T * N, C}).to(acc)).to(x.scalar_type())};
}

// db = the gate gradients summed over T and N (a fixed-order reduction: deterministic).
inline Tensor bias_grad(const Tensor& dg, at::ScalarType dtype) {
  return dg.sum(at::IntArrayRef{0, 1}).to(dtype);
}

}  // namespace rnnfast::cuda
