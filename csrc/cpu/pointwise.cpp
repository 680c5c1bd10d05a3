// Builds the pointwise kernels twice, for AVX2+FMA and for the baseline ISA, and
// dispatches at run time: one extension binary runs on every x86-64 CPU and still
// gets 8-wide FMA code on the CPUs that have it.
#include "pointwise.h"

#include <cmath>
#include <cstdint>
#include <cstring>

// Explicit instantiations, emitted in each ISA's namespace and for the dispatchers.
#define RNNFAST_INSTANTIATE(T)                                                              \
  template void elman_forward_block<T>(T*, int64_t, int64_t);                               \
  template void elman_backward_block<T>(const T*, const T*, const T*, T*, int64_t, int64_t); \
  template void lstm_forward_block<T>(const T*, const T*, int64_t, T*, T*, int64_t, T*,      \
                                      int64_t, int64_t);                                     \
  template void lstm_backward_block<T>(const T*, const T*, T*, const T*, const T*, int64_t,  \
                                       T*, int64_t, int64_t);                                \
  template void gru_forward_block<T>(const T*, const T*, const T*, const T*, T*, T*, int64_t, \
                                     int64_t);                                               \
  template void gru_backward_block<T>(const T*, T*, const T*, const T*, T*, T*, int64_t,     \
                                      int64_t);

#if defined(__x86_64__) && defined(__GNUC__)
#define RNNFAST_HAVE_AVX2_BUILD 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace rnnfast::cpu::avx2 {
#include "pointwise_impl.h"
RNNFAST_INSTANTIATE(float)
RNNFAST_INSTANTIATE(double)
}  // namespace rnnfast::cpu::avx2
#pragma GCC pop_options
#endif

namespace rnnfast::cpu::base {
#include "pointwise_impl.h"
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
#define RNNFAST_DISPATCH(fn, ...) \
  (use_avx2() ? avx2::fn<scalar_t>(__VA_ARGS__) : base::fn<scalar_t>(__VA_ARGS__))
#else
#define RNNFAST_DISPATCH(fn, ...) base::fn<scalar_t>(__VA_ARGS__)
#endif

template <typename scalar_t>
void elman_forward_block(scalar_t* pre, int64_t count, int64_t activation) {
  RNNFAST_DISPATCH(elman_forward_block, pre, count, activation);
}
template <typename scalar_t>
void elman_backward_block(const scalar_t* dy, const scalar_t* dh_carry, const scalar_t* h,
                          scalar_t* dpre, int64_t count, int64_t activation) {
  RNNFAST_DISPATCH(elman_backward_block, dy, dh_carry, h, dpre, count, activation);
}
template <typename scalar_t>
void lstm_forward_block(const scalar_t* pre, const scalar_t* c_prev, int64_t ld_c_prev,
                        scalar_t* h, scalar_t* c, int64_t ld_c, scalar_t* cache, int64_t rows,
                        int64_t H) {
  RNNFAST_DISPATCH(lstm_forward_block, pre, c_prev, ld_c_prev, h, c, ld_c, cache, rows, H);
}
template <typename scalar_t>
void lstm_backward_block(const scalar_t* dy, const scalar_t* dh_carry, scalar_t* dc,
                         const scalar_t* cache, const scalar_t* c_prev, int64_t ld_c_prev,
                         scalar_t* dgates, int64_t rows, int64_t H) {
  RNNFAST_DISPATCH(lstm_backward_block, dy, dh_carry, dc, cache, c_prev, ld_c_prev, dgates,
                   rows, H);
}
template <typename scalar_t>
void gru_forward_block(const scalar_t* xp, const scalar_t* hh, const scalar_t* b_hn,
                       const scalar_t* h_prev, scalar_t* h, scalar_t* cache, int64_t rows,
                       int64_t H) {
  RNNFAST_DISPATCH(gru_forward_block, xp, hh, b_hn, h_prev, h, cache, rows, H);
}
template <typename scalar_t>
void gru_backward_block(const scalar_t* dy, scalar_t* dh_carry, const scalar_t* h_prev,
                        const scalar_t* cache, scalar_t* dg_ih, scalar_t* dg_hh, int64_t rows,
                        int64_t H) {
  RNNFAST_DISPATCH(gru_backward_block, dy, dh_carry, h_prev, cache, dg_ih, dg_hh, rows, H);
}

RNNFAST_INSTANTIATE(float)
RNNFAST_INSTANTIATE(double)

}  // namespace rnnfast::cpu
