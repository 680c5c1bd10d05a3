// What every CUDA cell file shares: the per-step recurrent GEMMs on torch's cuBLAS handle,
// the whole-sequence GEMMs and reductions of the backward, launch geometry, and the
// activations. The design is per step: one GEMM (h_{t-1} W_hh^T) and one fused pointwise
// kernel, all on torch's current stream; nothing is allocated inside the time loop and
// the host never waits for the device.
//
// Types: scalar_t is the tensors' dtype; acc_t = at::opmath_type<scalar_t> (float for
// half, bfloat16 and float; double for double) is what pointwise math, the LSTM cell state,
// the saved activations and the backward's carried dh and dc run in. Recurrent GEMMs of the
// forward run in scalar_t (tensor cores for half and bfloat16, accumulating in fp32 inside
// cuBLAS). In bfloat16 the backward's GEMMs take the gate gradients rounded to bfloat16,
// with fp32 sums and results: the per-step path's dh GEMM (StepGemm::dg16) and the
// whole-sequence GEMMs (sequence_grads), from torch 2.8 on (or with cuBLAS called directly);
// otherwise they run in acc_t.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cublas_v2.h>
#include <dlfcn.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <type_traits>

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

// torch's version (setup.py): at::mm's out_dtype (a float32 result of 16-bit operands) from
// 2.8 on
#ifndef RNNFAST_TORCH_VERSION
#error "setup.py defines RNNFAST_TORCH_VERSION (torch's major * 100 + minor)"
#endif
#if RNNFAST_TORCH_VERSION >= 208
constexpr bool kMmOutDtype = true;
#else
constexpr bool kMmOutDtype = false;
#endif

// ---- the per-step path's recurrent GEMMs ----
// Through ATen into preallocated outputs (no allocation; cuBLAS on the current stream), or,
// for 16-bit operands where torch has loaded cuBLAS, cublasGemmEx called directly on torch's
// handle and stream (StepGemm): the host then pays one cuBLAS call a step instead of ATen's
// dispatch, checks and the view of y's row. The host's work bounded the per-step path on
// the H100 (14-25 us a step through ATen whatever the size; its 16-bit GEMM took a few).
// at::cuda::blas::gemm is not exported to extensions and libcublas is not linked: the
// function is looked up in the library torch loaded (dlopen of its soname with
// RTLD_NOLOAD: never a second copy). ATen runs instead where it is not found, where
// RNNFAST_STEP_GEMM=aten, and where torch's settings ask for what ATen alone applies
// (deterministic algorithms, whose cuBLAS workspace check ATen makes; reduced-precision
// reductions of float16/bfloat16 disallowed); float32 and float64 always go through ATen,
// which applies torch's TF32 setting. The direct calls use the handle's pointer mode as
// ATen leaves it (host: alpha and beta are host floats).

// dh [N, H] = dg [N, GH] W_hh [GH, H], or += when accumulate, in acc_t
inline void dh_gemm(const Tensor& dg, const Tensor& w_hh, Tensor& dh, bool accumulate) {
  if (accumulate) {
    dh.addmm_(dg, w_hh);
  } else {
    at::mm_out(dh, dg, w_hh);
  }
}

// cublasGemmEx's C signature (the header also declares a C++ overload)
using GemmExFn = cublasStatus_t (*)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int,
                                    int, int, const void*, const void*, cudaDataType, int,
                                    const void*, cudaDataType, int, const void*, void*,
                                    cudaDataType, int, cublasComputeType_t, cublasGemmAlgo_t);
// A function of the cuBLAS library torch loaded, or null where it is not loaded or has none
inline void* loaded_cublas_symbol(const char* name) {
  static void* const lib = [] {
    const std::string soname = "libcublas.so." + std::to_string(CUBLAS_VER_MAJOR);
    return dlopen(soname.c_str(), RTLD_NOW | RTLD_NOLOAD);
  }();
  return lib != nullptr ? dlsym(lib, name) : nullptr;
}
inline GemmExFn loaded_cublas_gemm_ex() {
  static const GemmExFn fn = reinterpret_cast<GemmExFn>(loaded_cublas_symbol("cublasGemmEx"));
  return fn;
}
// What the per-step path's 16-bit GEMMs go through: "cublas" (direct, where found) or "aten"
// as RNNFAST_STEP_GEMM asks (unset or "cublas": direct where found; a value that is neither
// is refused, see step_gemm_knob_error)
inline const char* step_gemm_kind() {
  const char* v = std::getenv("RNNFAST_STEP_GEMM");
  if (v != nullptr && std::strcmp(v, "aten") == 0) return "aten";
  return loaded_cublas_gemm_ex() != nullptr ? "cublas" : "aten";
}
// Whether torch's setting for reduced-precision reductions in float16/bfloat16 GEMMs is its
// default (allowed): a bool before torch's CuBLASReductionOption, whose default is 0.
inline bool reduced_reduction_default(bool allowed) { return allowed; }
template <typename Option, std::enable_if_t<std::is_enum_v<Option>, int> = 0>
inline bool reduced_reduction_default(Option option) {
  return static_cast<int>(option) == 0;
}

class StepGemm {
 public:
  // w_hh [GH, H], contiguous, of the tensors' dtype; on the current device and stream.
  // backward_rows: N for the backward (its dh GEMM's operands are then made here: dg16, or
  // W_hh in acc_t), 0 for the forward.
  explicit StepGemm(const Tensor& w_hh, int64_t backward_rows = 0) : w_hh_(w_hh) {
    const auto dtype = w_hh.scalar_type();
    error_ = step_gemm_knob_error();
    if (!error_.empty()) return;
    if (direct(dtype)) {
      gemm_ = loaded_cublas_gemm_ex();
      handle_ = at::cuda::getCurrentCUDABlasHandle();  // set to the current stream
      type_ = dtype == at::kHalf ? CUDA_R_16F : CUDA_R_16BF;
    } else {
      w_t_ = w_hh.t();
    }
    if (backward_rows > 0) {
      if (bf16_dh(dtype)) {
        dg16_ = at::empty({backward_rows, w_hh.size(0)}, w_hh.options());
      } else {
        w_acc_ = w_hh.to(workspace_dtype(dtype)).contiguous();
      }
    }
  }

  // Whether the GEMMs of dtype call cuBLAS directly (16-bit, cublasGemmEx found,
  // RNNFAST_STEP_GEMM not "aten", torch's settings at the defaults ATen alone applies
  // otherwise: see above); else they go through ATen. Also the cost model's question
  // (CostModel: the host's time a step differs).
  static bool direct(at::ScalarType dtype) {
    if (!step_gemm_knob_error().empty()) return false;
    const at::Context& ctx = at::globalContext();
    const bool half = dtype == at::kHalf || dtype == at::kBFloat16;
    const bool defaults =
        !ctx.deterministicAlgorithms() &&
        (dtype == at::kHalf ? reduced_reduction_default(ctx.allowFP16ReductionCuBLAS())
                            : reduced_reduction_default(ctx.allowBF16ReductionCuBLAS()));
    return half && defaults && std::strcmp(step_gemm_kind(), "cublas") == 0;
  }
  // Whether the backward's dh GEMM of dtype takes bfloat16 operands (see dg16 below)
  static bool bf16_dh(at::ScalarType dtype) {
    return dtype == at::kBFloat16 && (kMmOutDtype || direct(dtype));
  }

  // The backward's dh GEMM takes bfloat16 operands where the tensors are bfloat16 (the gate
  // gradients rounded once, on tensor cores with float32 sums into float32 dh, as
  // sequence_grads, by either route: cublasGemmEx, or at::mm's out_dtype from torch 2.8 on;
  // float16 stays in float32, see there): the step kernels then also write the gate
  // gradients in bfloat16 into dg16() [N, GH]; null where they need not.
  template <typename scalar_t>
  scalar_t* dg16() const {
    return dg16_.defined() ? dg16_.data_ptr<scalar_t>() : nullptr;
  }

  // Why a cuBLAS call failed ("" if none did): the op raises it after its dispatch (see
  // check_persistent_refusal: nothing is thrown from inside it); calls after a failure do
  // nothing.
  const std::string& error() const { return error_; }
  // The cuBLAS handle of the direct calls (null where they go through ATen)
  cublasHandle_t handle() const { return handle_; }

  // out [N, GH] = h [N, H] W_hh^T in the tensors' dtype, h being h0 (tp < 0) or y[tp]
  void gates(const Tensor& h0, const Tensor& y, int64_t tp, Tensor& out) const {
    if (!error_.empty()) return;
    if (gemm_ == nullptr) {
      at::mm_out(out, tp < 0 ? h0 : y[tp], w_t_);
      return;
    }
    const int64_t N = out.size(0), H = w_hh_.size(1);
    const void* h = tp < 0 ? h0.data_ptr()
                           : static_cast<const char*>(y.data_ptr()) + tp * N * H * y.element_size();
    gates_direct(h, out.data_ptr(), N);
  }
  // The same from raw pointers (h [N, H], out [N, GH] contiguous), direct calls only: no
  // torch call, nothing thrown (a CUDA graph's capture, step_graph.cuh)
  void gates_direct(const void* h, void* out, int64_t N) const {
    if (!error_.empty()) return;
    if (gemm_ == nullptr) {
      error_ = "StepGemm::gates_direct: cuBLAS is not called directly here";
      return;
    }
    const int64_t GH = w_hh_.size(0), H = w_hh_.size(1);
    const float one = 1.0f, zero = 0.0f;
    // column-major: out^T [GH, N] = W_hh ([H, GH] stored, transposed) h^T ([H, N] stored)
    check(gemm_(handle_, CUBLAS_OP_T, CUBLAS_OP_N, int(GH), int(N), int(H), &one, w_hh_.data_ptr(),
                type_, int(H), h, type_, int(H), &zero, out, type_, int(GH),
                CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  }

  // dh [N, H] (acc_t) = dg[t] [N, GH] W_hh, or += when accumulate: from dg16() (bfloat16,
  // as the step kernel wrote it) where made, else from dg[t] (acc_t) with W_hh in acc_t
  // (dh_gemm). A StepGemm made for the backward (backward_rows).
  void dh(const Tensor& dg, int64_t t, Tensor& dh, bool accumulate) const {
    if (!error_.empty()) return;
    if (!dg16_.defined()) {
      dh_gemm(dg[t], w_acc_, dh, accumulate);
      return;
    }
    if (gemm_ == nullptr) {
#if RNNFAST_TORCH_VERSION >= 208
      if (accumulate) {
        dh.add_(at::mm(dg16_, w_hh_, at::kFloat));
      } else {
        at::mm_out(dh, dg16_, w_hh_, at::kFloat);
      }
#endif
      return;
    }
    dh_direct(dh.data_ptr<float>(), dh.size(0), accumulate);
  }
  // dh [N, H] (float32, contiguous) (+)= dg16() W_hh from a raw pointer, direct calls with
  // dg16 only: no torch call, nothing thrown (a CUDA graph's capture, step_graph.cuh)
  void dh_direct(float* dh, int64_t N, bool accumulate) const {
    if (!error_.empty()) return;
    if (gemm_ == nullptr || !dg16_.defined()) {
      error_ = "StepGemm::dh_direct: cuBLAS is not called directly from bfloat16 here";
      return;
    }
    const int64_t H = w_hh_.size(1), GH = w_hh_.size(0);
    const float one = 1.0f, beta = accumulate ? 1.0f : 0.0f;
    // column-major: dh^T [H, N] (+)= W_hh^T ([H, GH] stored) dg^T ([GH, N] stored)
    check(gemm_(handle_, CUBLAS_OP_N, CUBLAS_OP_N, int(H), int(N), int(GH), &one,
                w_hh_.data_ptr(), CUDA_R_16BF, int(H), dg16_.data_ptr(), CUDA_R_16BF, int(GH),
                &beta, dh, CUDA_R_32F, int(H), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  }
  // The backward's bfloat16 gate gradients' buffer (dg16), undefined where not made
  const Tensor& dg16_buffer() const { return dg16_; }

 private:
  void check(cublasStatus_t status) const {
    if (status != CUBLAS_STATUS_SUCCESS && error_.empty()) {
      error_ = "cublasGemmEx failed with status " + std::to_string(static_cast<int>(status)) +
               " (RNNFAST_STEP_GEMM=aten runs the per-step GEMMs through ATen instead)";
    }
  }
  Tensor w_hh_;
  Tensor w_t_;    // w_hh.t(), for ATen's forward
  Tensor dg16_;   // the backward's bfloat16 gate gradients of a step [N, GH]
  Tensor w_acc_;  // or W_hh in acc_t, for the backward's dh GEMM in acc_t
  GemmExFn gemm_ = nullptr;
  cublasHandle_t handle_ = nullptr;
  cudaDataType type_ = CUDA_R_32F;
  mutable std::string error_;
};

// ---- the backward's whole-sequence GEMMs ----
// Their operands: for bfloat16, from torch 2.8 on, the gate gradients are rounded once to
// bfloat16 and every GEMM runs on tensor cores with float32 sums into a float32 result
// (at::mm's out_dtype), as torch.nn.Linear's backward runs in bfloat16 (bfloat16 has
// float32's exponent range: the rounding costs precision, about one part in 512 a term, and
// no gradient underflows). Float16 stays in float32: its range would flush the small gate
// gradients to zero (below 6e-8) whose sum over T*N rows can matter. Before torch 2.8, and
// for float16, float32 and float64, in acc_t (float32 GEMMs on FFMA: at T*N = 256k rows,
// ten times the tensor cores' time).
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
