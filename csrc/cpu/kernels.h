// Per-step CPU kernels: the pointwise math of every cell (pointwise_impl.h) and the
// weight-stationary float32 recurrent GEMMs (step_gemm_impl.h). Each call picks, once per
// process, the AVX2+FMA build where the CPU has it and the baseline build elsewhere.
// Pointwise kernels are instantiated for float and double.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

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

// ---- weight-stationary recurrent GEMMs (float32); see step_gemm_impl.h ----
constexpr int64_t kUnitBlock = 8;

// w_hh [G*H, H] -> [ceil(H/8)][H][G][8] (forward) and [ceil(H/8)][G*H][8] (backward).
at::Tensor pack_forward_weights(const at::Tensor& w_hh, int64_t G);
at::Tensor pack_backward_weights(const at::Tensor& w_hh);

// The forward's recurrent weights as the step kernels read them: packed (above), or W_hh
// itself (contiguous, no packing) for batches of N rows with N * G <= 4, where the
// dot-product kernel is faster (measured: Elman up to N = 4, GRU and LSTM at N = 1).
constexpr int64_t kMaxDotRowsTimesGates = 4;
struct StepWeights {
  at::Tensor tensor;  // keeps `data` alive
  const float* data;
  int64_t G;
  bool packed;
};
StepWeights forward_step_weights(const at::Tensor& w_hh, int64_t G, int64_t N);

// out[n][k*H + u] (+)= (h W_hh^T)[n][k*H + u] for the units of blocks [b0, b1), visiting
// the blocks in descending order when asked (alternate steps go opposite ways, so that
// the end of one step's weights is still in cache at the start of the next).
void recurrent_gates_blocks(const StepWeights& w, const float* h, int64_t N, int64_t H,
                            float* out, int64_t b0, int64_t b1, bool accumulate, bool descending);
// dh[n][u] (+)= (dg W_hh)[n][u] for the units of blocks [b0, b1).
void recurrent_dh_blocks(const float* wb, const float* dg, int64_t N, int64_t GH, int64_t H,
                         float* dh, int64_t b0, int64_t b1, bool accumulate, bool descending);

}  // namespace rnnfast::cpu
