// Per-step CPU kernels: the pointwise math of every cell (pointwise_impl.h) and the
// weight-stationary float32 recurrent GEMMs (step_gemm_impl.h), each built for AVX-512,
// AVX2+FMA and the baseline ISA; the best the CPU has runs (cpu_isa below).
// Pointwise kernels are instantiated for float and double.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>

namespace rnnfast::cpu {

// ---- pointwise: units [u0, u0 + count) of `rows` rows; see pointwise_impl.h ----
template <typename scalar_t>
void elman_forward_block(scalar_t* pre, int64_t rows, int64_t H, int64_t u0, int64_t count,
                         int64_t activation);
template <typename scalar_t>
void elman_backward_block(const scalar_t* dy, const scalar_t* dh_carry, const scalar_t* h,
                          scalar_t* dpre, int64_t rows, int64_t H, int64_t u0, int64_t count,
                          int64_t activation);
template <typename scalar_t>
void lstm_forward_block(const scalar_t* pre, const scalar_t* c_prev, int64_t ld_c_prev,
                        scalar_t* h, scalar_t* c, int64_t ld_c, scalar_t* cache, int64_t rows,
                        int64_t H, int64_t u0, int64_t count);
template <typename scalar_t>
void lstm_backward_block(const scalar_t* dy, const scalar_t* dh_carry, scalar_t* dc,
                         const scalar_t* cache, const scalar_t* c_prev, int64_t ld_c_prev,
                         scalar_t* dgates, int64_t rows, int64_t H, int64_t u0, int64_t count);
template <typename scalar_t>
void gru_forward_block(const scalar_t* xp, const scalar_t* hh, const scalar_t* b_hn,
                       const scalar_t* h_prev, scalar_t* h, scalar_t* cache, int64_t rows,
                       int64_t H, int64_t u0, int64_t count);
template <typename scalar_t>
void gru_backward_block(const scalar_t* dy, scalar_t* dh_carry, const scalar_t* h_prev,
                        const scalar_t* cache, scalar_t* dg_ih, scalar_t* dg_hh, int64_t rows,
                        int64_t H, int64_t u0, int64_t count);

// ---- which build of the kernels runs ----
// The kernels are compiled once per ISA (kernels.cpp) and picked at run time: the best the
// CPU has, or the one RNNFAST_CPU_ISA (baseline, avx2, avx512, avx512bf16) or set_cpu_isa
// names. avx512bf16 is the AVX-512 build plus the bfloat16 GEMMs (gemm_bf16_impl.h) in the
// forward of bfloat16 layers; under avx512 those run in float32 as on the other builds.
enum class CpuIsa : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3 };
CpuIsa best_cpu_isa();      // what this CPU (and this build) can run
CpuIsa cpu_isa();           // the current setting
// Sets it for every later call; throws c10::ValueError for a name that is not an ISA or
// not one this CPU can run. `what` names the setting in that message.
CpuIsa set_cpu_isa(const char* what, const std::string& name);  // returns the previous
const char* cpu_isa_name(CpuIsa isa);

// ---- weight-stationary recurrent GEMMs (float32); see step_gemm_impl.h ----
// Units go in blocks of one vector: 16 in the AVX-512 build, 8 in the others.
inline int64_t isa_lanes(CpuIsa isa) { return isa >= CpuIsa::kAvx512 ? 16 : 8; }

// The recurrent weights as one build of the step kernels reads them, made once per op
// call (the build is fixed then, so that a change of setting cannot reach a running call):
// forward: w_hh [G*H, H] packed to [ceil(H/L)][H][G][L], or W_hh itself (contiguous, no
// packing) for batches of N rows with N * G <= 4, where the dot-product kernel is faster
// (measured: Elman up to N = 4, GRU and LSTM at N = 1); backward: packed to
// [ceil(H/L)][G*H][L]. L = lanes, units padded with zeros.
// With bf16 (forward only): packed as gemm_bf16_impl.h says, in bfloat16, 16-unit blocks.
constexpr int64_t kMaxDotRowsTimesGates = 4;
struct StepWeights {
  at::Tensor tensor;  // keeps `data` / `data16` alive
  const float* data = nullptr;
  const uint16_t* data16 = nullptr;  // the bfloat16 packing
  int64_t G = 0;
  bool packed = false;
  bool bf16 = false;
  CpuIsa isa = CpuIsa::kBaseline;
  int64_t lanes = 8;  // units per block
};
// bf16_gemms: the op runs its GEMMs in bfloat16 (bf16_gemms_of in common.h, decided once a
// call): w_hh, holding bfloat16 values, is packed for them.
StepWeights forward_step_weights(const at::Tensor& w_hh, int64_t G, int64_t N,
                                 bool bf16_gemms = false);
bool uses_bf16_gemms();  // the setting (avx512bf16) runs bfloat16 layers' GEMMs in bfloat16
// at::empty, for buffers of many MiB that a call allocates and fills anew each time: on
// Linux its whole 2 MiB pages are marked for transparent huge pages (madvise), so that the
// first touch maps 2 MiB at a time rather than 4 KiB (where THP is set to `madvise`).
at::Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& options);

// The input projection of a bfloat16 layer in bfloat16 with float32 results: pre [M, G*H]
// = x [M, K] W^T + bias, x and w [G*H, K] in bfloat16 or float32 holding bfloat16
// values, w packed once (pack_bf16_weights) for all chunks. Only where a call runs the
// bfloat16 GEMMs (bf16_gemms_of in common.h). buffer: float32 storage of at least M*G*H
// values that the result is written into (and views), else a new tensor.
at::Tensor pack_bf16_weights(const at::Tensor& w, int64_t G);
at::Tensor projection_bf16(const at::Tensor& x, const at::Tensor& packed, int64_t G, int64_t H,
                           const std::optional<at::Tensor>& bias,
                           const at::Tensor& buffer = at::Tensor());
// bf16_gemms: as forward_step_weights, the dh step in bfloat16 (W_hh^T packed as one gate).
StepWeights backward_step_weights(const at::Tensor& w_hh, bool bf16_gemms = false);

// out[n][k*H + u] (+)= (h W_hh^T)[n][k*H + u] for the units of blocks [b0, b1), visiting
// the blocks in descending order when asked (alternate steps go opposite ways, so that
// the end of one step's weights is still in cache at the start of the next).
void recurrent_gates_blocks(const StepWeights& w, const float* h, int64_t N, int64_t H,
                            float* out, int64_t b0, int64_t b1, bool accumulate, bool descending);
// dh[n][u] (+)= (dg W_hh)[n][u] for the units of blocks [b0, b1) (w: backward_step_weights).
void recurrent_dh_blocks(const StepWeights& w, const float* dg, int64_t N, int64_t GH, int64_t H,
                         float* dh, int64_t b0, int64_t b1, bool accumulate, bool descending);

// ---- weight gradients in float32: out [P, K] = the sum over segments of a^T b ----
// a: rows of P (lda apart), b: rows of K (ldb apart), `rows` rows each; the segments' rows
// are summed as if one matrix, in order (dW_hh's h_{t-1} comes from h0 and from y). Every
// output is summed by one thread in a fixed order: results do not depend on the thread
// count. The AVX-512 build only (isa: the setting the caller read, kAvx512 or above): with
// 256-bit vectors it ran at 0.8x MKL's a^T b here, so AVX2 CPUs keep that.
struct TnSegment {
  const float* a;
  const float* b;
  int64_t rows;
};
void weight_grad_f32(CpuIsa isa, const TnSegment* segs, int nseg, int64_t lda, int64_t ldb,
                     int64_t P, int64_t K, float* out);

}  // namespace rnnfast::cpu
