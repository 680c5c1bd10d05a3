// What every CUDA cell file shares: the per-step recurrent GEMMs on torch's cuBLAS handle,
// the whole-sequence GEMMs and reductions of the backward, launch geometry, and the
// activations. The design is per step: one GEMM (h_{t-1} W_hh^T) and one fused pointwise
// kernel, all on torch's current stream; nothing is allocated inside the time loop and
// the host never waits for the device.
//
// Types: scalar_t is the tensors' dtype; acc_t = at::opmath_type<scalar_t> (float for
// half, bfloat16 and float; double for double) is what pointwise math, the LSTM cell state,
// the saved activations and the backward's recurrence run in. Recurrent GEMMs of the forward
// run in scalar_t (tensor cores for half and bfloat16, accumulating in fp32 inside cuBLAS),
// and so, for bfloat16 from torch 2.8 on, do the backward's whole-sequence GEMMs
// (sequence_grads).
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

// ---- the backward's whole-sequence GEMMs ----
// Their operands: for bfloat16, from torch 2.8 on, the gate gradients are rounded once to
// bfloat16 and every GEMM runs on tensor cores with float32 sums into a float32 result
// (at::mm's out_dtype), as torch.nn.Linear's backward runs in bfloat16 (bfloat16 has
// float32's exponent range: the rounding costs precision, about one part in 512 a term, and
// no gradient underflows). Float16 stays in float32: its range would flush the small gate
// gradients to zero (below 6e-8) whose sum over T*N rows can matter. Before torch 2.8, and
// for float16, float32 and float64, in acc_t (float32 GEMMs on FFMA: at T*N = 256k rows,
// ten times the tensor cores' time).
#ifndef RNNFAST_TORCH_VERSION
#error "setup.py defines RNNFAST_TORCH_VERSION (torch's major * 100 + minor)"
#endif
#if RNNFAST_TORCH_VERSION >= 208
constexpr bool kMmOutDtype = true;
#else
constexpr bool kMmOutDtype = false;
#endif
// the dtype the GEMMs take their operands in, for tensors of `dtype`
inline at::ScalarType gemm_operand_dtype(at::ScalarType dtype) {
  return kMmOutDtype && dtype == at::kBFloat16 ? dtype : workspace_dtype(dtype);
}
// a b in acc_t, a and b being of one dtype (gemm_operand_dtype's)
inline Tensor mm_acc(const Tensor& a, const Tensor& b) {
#if RNNFAST_TORCH_VERSION >= 208
  if (a.scalar_type() == at::kBFloat16) return at::mm(a, b, at::kFloat);
#endif
  return at::mm(a, b);
}

struct SequenceGrads {
  Tensor dx, dw_ih, dw_hh, db_ih, db_hh;
};
// From the gate gradients dg_ih and dg_hh [T, N, GH] in acc_t (one tensor for the LSTM and
// the Elman RNN, whose db_hh is then db_ih), all in x's dtype:
//   dx [T, N, C] = dg_ih W_ih and dW_ih = dg_ih^T x, one GEMM each over all T*N rows;
//   dW_hh [GH, H] = sum over steps of dg_hh[t]^T h_{t-1}, h_{t-1} being h0 at the first
//   step visited and the neighbouring y otherwise: two GEMMs, no gather;
//   db = the gate gradients summed over T and N, in acc_t (a fixed-order reduction:
//   deterministic).
inline SequenceGrads sequence_grads(const Tensor& dg_ih, const Tensor& dg_hh, const Tensor& x,
                                    const Tensor& y, const Tensor& h0, const Tensor& w_ih,
                                    bool reverse) {
  const int64_t T = x.size(0), N = x.size(1), C = x.size(2), H = y.size(2);
  const int64_t GH = dg_ih.size(2);
  const at::ScalarType dtype = x.scalar_type(), op = gemm_operand_dtype(dtype);
  const bool shared = dg_hh.is_same(dg_ih);
  SequenceGrads out;
  out.db_ih = dg_ih.sum(at::IntArrayRef{0, 1}).to(dtype);
  out.db_hh = shared ? out.db_ih : dg_hh.sum(at::IntArrayRef{0, 1}).to(dtype);
  const Tensor g_ih = dg_ih.to(op).view({T * N, GH});
  const Tensor g_hh = shared ? g_ih.view({T, N, GH}) : dg_hh.to(op);
  const Tensor x2 = x.view({T * N, C}).to(op);
  out.dx = mm_acc(g_ih, w_ih.to(op)).view({T, N, C}).to(dtype);
  out.dw_ih = mm_acc(g_ih.t(), x2).to(dtype);
  const int64_t first = reverse ? T - 1 : 0;
  Tensor dw = mm_acc(g_hh[first].t(), h0.to(op));
  if (T > 1) {
    const Tensor dg = reverse ? g_hh.narrow(0, 0, T - 1) : g_hh.narrow(0, 1, T - 1);
    const Tensor hp = reverse ? y.narrow(0, 1, T - 1) : y.narrow(0, 0, T - 1);
    dw.add_(mm_acc(dg.reshape({-1, GH}).t(), hp.reshape({-1, H}).to(op)));
  }
  out.dw_hh = dw.to(dtype);
  return out;
}

}  // namespace rnnfast::cuda
