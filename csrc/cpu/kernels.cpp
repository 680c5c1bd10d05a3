// Builds the per-step kernels twice, for AVX2+FMA and for the baseline ISA, and
// dispatches at run time: one extension binary runs on every x86-64 CPU and still gets
// 8-wide FMA code on the CPUs that have it.
#include "kernels.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

// Explicit instantiations, emitted in each ISA's namespace and for the dispatchers.
#define RNNFAST_INSTANTIATE(T)                                                              \
  template void elman_forward_block<T>(T*, int64_t, int64_t, int64_t, int64_t, int64_t);    \
  template void elman_backward_block<T>(const T*, const T*, const T*, T*, int64_t, int64_t,  \
                                        int64_t, int64_t, int64_t);                          \
  template void lstm_forward_block<T>(const T*, const T*, int64_t, T*, T*, int64_t, T*,      \
                                      int64_t, int64_t, int64_t, int64_t);                   \
  template void lstm_backward_block<T>(const T*, const T*, T*, const T*, const T*, int64_t,  \
                                       T*, int64_t, int64_t, int64_t, int64_t);              \
  template void gru_forward_block<T>(const T*, const T*, const T*, const T*, T*, T*, int64_t, \
                                     int64_t, int64_t, int64_t);                             \
  template void gru_backward_block<T>(const T*, T*, const T*, const T*, T*, T*, int64_t,     \
                                      int64_t, int64_t, int64_t);

#if defined(__x86_64__) && defined(__GNUC__)
#define RNNFAST_HAVE_AVX2_BUILD 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace rnnfast::cpu::avx2 {
#include "pointwise_impl.h"
#include "step_gemm_impl.h"
RNNFAST_INSTANTIATE(float)
RNNFAST_INSTANTIATE(double)
template void recurrent_gates_blocks<1>(const float*, const float*, int64_t, int64_t, float*,
                                        int64_t, int64_t, bool, bool);
template void recurrent_gates_blocks<3>(const float*, const float*, int64_t, int64_t, float*,
                                        int64_t, int64_t, bool, bool);
template void recurrent_gates_blocks<4>(const float*, const float*, int64_t, int64_t, float*,
                                        int64_t, int64_t, bool, bool);
template void recurrent_gates_rows<1>(const float*, const float*, int64_t, int64_t, float*,
                                      int64_t, int64_t, bool, bool);
template void recurrent_gates_rows<3>(const float*, const float*, int64_t, int64_t, float*,
                                      int64_t, int64_t, bool, bool);
template void recurrent_gates_rows<4>(const float*, const float*, int64_t, int64_t, float*,
                                      int64_t, int64_t, bool, bool);
}  // namespace rnnfast::cpu::avx2
#pragma GCC pop_options
#endif

namespace rnnfast::cpu::base {
#include "pointwise_impl.h"
#include "step_gemm_impl.h"
}  // namespace rnnfast::cpu::base

namespace rnnfast::cpu {
namespace {
bool use_avx2() {
#ifdef RNNFAST_HAVE_AVX2_BUILD
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}
}  // namespace

#ifdef RNNFAST_HAVE_AVX2_BUILD
#define RNNFAST_DISPATCH(fn, ...) (use_avx2() ? avx2::fn(__VA_ARGS__) : base::fn(__VA_ARGS__))
#else
#define RNNFAST_DISPATCH(fn, ...) base::fn(__VA_ARGS__)
#endif

template <typename scalar_t>
void elman_forward_block(scalar_t* pre, int64_t rows, int64_t H, int64_t u0, int64_t count,
                         int64_t activation) {
  RNNFAST_DISPATCH(elman_forward_block<scalar_t>, pre, rows, H, u0, count, activation);
}
template <typename scalar_t>
void elman_backward_block(const scalar_t* dy, const scalar_t* dh_carry, const scalar_t* h,
                          scalar_t* dpre, int64_t rows, int64_t H, int64_t u0, int64_t count,
                          int64_t activation) {
  RNNFAST_DISPATCH(elman_backward_block<scalar_t>, dy, dh_carry, h, dpre, rows, H, u0, count,
                   activation);
}
template <typename scalar_t>
void lstm_forward_block(const scalar_t* pre, const scalar_t* c_prev, int64_t ld_c_prev,
                        scalar_t* h, scalar_t* c, int64_t ld_c, scalar_t* cache, int64_t rows,
                        int64_t H, int64_t u0, int64_t count) {
  RNNFAST_DISPATCH(lstm_forward_block<scalar_t>, pre, c_prev, ld_c_prev, h, c, ld_c, cache, rows,
                   H, u0, count);
}
template <typename scalar_t>
void lstm_backward_block(const scalar_t* dy, const scalar_t* dh_carry, scalar_t* dc,
                         const scalar_t* cache, const scalar_t* c_prev, int64_t ld_c_prev,
                         scalar_t* dgates, int64_t rows, int64_t H, int64_t u0, int64_t count) {
  RNNFAST_DISPATCH(lstm_backward_block<scalar_t>, dy, dh_carry, dc, cache, c_prev, ld_c_prev,
                   dgates, rows, H, u0, count);
}
template <typename scalar_t>
void gru_forward_block(const scalar_t* xp, const scalar_t* hh, const scalar_t* b_hn,
                       const scalar_t* h_prev, scalar_t* h, scalar_t* cache, int64_t rows,
                       int64_t H, int64_t u0, int64_t count) {
  RNNFAST_DISPATCH(gru_forward_block<scalar_t>, xp, hh, b_hn, h_prev, h, cache, rows, H, u0,
                   count);
}
template <typename scalar_t>
void gru_backward_block(const scalar_t* dy, scalar_t* dh_carry, const scalar_t* h_prev,
                        const scalar_t* cache, scalar_t* dg_ih, scalar_t* dg_hh, int64_t rows,
                        int64_t H, int64_t u0, int64_t count) {
  RNNFAST_DISPATCH(gru_backward_block<scalar_t>, dy, dh_carry, h_prev, cache, dg_ih, dg_hh, rows,
                   H, u0, count);
}
RNNFAST_INSTANTIATE(float)
RNNFAST_INSTANTIATE(double)

// Plain loops: a permuted .contiguous() of these shapes goes through TensorIterator's
// strided copy, which costs more than a whole short sequence. Writes are sequential.
at::Tensor pack_forward_weights(const at::Tensor& w_hh, int64_t G) {
  const int64_t H = w_hh.size(1), nb = (H + kUnitBlock - 1) / kUnitBlock;
  at::Tensor packed = at::empty({nb, H, G, kUnitBlock}, w_hh.options());
  const float* w = w_hh.data_ptr<float>();
  float* p = packed.data_ptr<float>();
  // per block: read its G*8 rows of W_hh in order, scatter into the block's packed slice
  // (H*G*8 floats, small enough to stay in L1 while it fills)
  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t valid = std::min(kUnitBlock, H - b * kUnitBlock);
      float* dst = p + b * H * G * kUnitBlock;
      for (int64_t k = 0; k < G; ++k)
        for (int64_t u = 0; u < kUnitBlock; ++u) {
          float* d = dst + k * kUnitBlock + u;
          if (u < valid) {
            const float* src = w + (k * H + b * kUnitBlock + u) * H;  // W_hh[k*H + unit][:]
            for (int64_t j = 0; j < H; ++j) d[j * G * kUnitBlock] = src[j];
          } else {
            for (int64_t j = 0; j < H; ++j) d[j * G * kUnitBlock] = 0.0f;
          }
        }
    }
  });
  return packed;
}

at::Tensor pack_backward_weights(const at::Tensor& w_hh) {
  const int64_t GH = w_hh.size(0), H = w_hh.size(1), nb = (H + kUnitBlock - 1) / kUnitBlock;
  at::Tensor packed = at::empty({nb, GH, kUnitBlock}, w_hh.options());
  const float* w = w_hh.data_ptr<float>();
  float* p = packed.data_ptr<float>();
  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t valid = std::min(kUnitBlock, H - b * kUnitBlock);
      for (int64_t g = 0; g < GH; ++g) {
        const float* src = w + g * H + b * kUnitBlock;
        float* dst = p + (b * GH + g) * kUnitBlock;
        for (int64_t u = 0; u < kUnitBlock; ++u) dst[u] = u < valid ? src[u] : 0.0f;
      }
    }
  });
  return packed;
}

StepWeights forward_step_weights(const at::Tensor& w_hh, int64_t G, int64_t N) {
  StepWeights w;
  w.G = G;
  w.packed = N * G > kMaxDotRowsTimesGates;
  w.tensor = w.packed ? pack_forward_weights(w_hh, G) : w_hh.contiguous();
  w.data = w.tensor.data_ptr<float>();
  return w;
}

void recurrent_gates_blocks(const StepWeights& w, const float* h, int64_t N, int64_t H,
                            float* out, int64_t b0, int64_t b1, bool accumulate,
                            bool descending) {
#define RNNFAST_GATES(G)                                                                    \
  if (w.packed) {                                                                           \
    RNNFAST_DISPATCH(recurrent_gates_blocks<G>, w.data, h, N, H, out, b0, b1, accumulate,   \
                     descending);                                                           \
  } else {                                                                                  \
    RNNFAST_DISPATCH(recurrent_gates_rows<G>, w.data, h, N, H, out, b0, b1, accumulate,     \
                     descending);                                                           \
  }
  switch (w.G) {
    case 1:
      RNNFAST_GATES(1)
      break;
    case 3:
      RNNFAST_GATES(3)
      break;
    default:
      TORCH_CHECK(w.G == 4, "rnnfast: no recurrent GEMM for ", w.G, " gates");
      RNNFAST_GATES(4)
  }
#undef RNNFAST_GATES
}

void recurrent_dh_blocks(const float* wb, const float* dg, int64_t N, int64_t GH, int64_t H,
                         float* dh, int64_t b0, int64_t b1, bool accumulate,
                         bool descending) {
  RNNFAST_DISPATCH(recurrent_dh_blocks, wb, dg, N, GH, H, dh, b0, b1, accumulate, descending);
}

}  // namespace rnnfast::cpu
