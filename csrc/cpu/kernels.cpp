// Builds the per-step kernels three times, for AVX-512 (F, VL, BW, DQ), AVX2+FMA and the
// baseline ISA, and dispatches at run time: one extension binary runs on every x86-64 CPU
// and still gets 16- or 8-wide FMA code on the CPUs that have it.
#include "kernels.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif

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

#define RNNFAST_INSTANTIATE_STEP_GEMMS(G)                                                    \
  template void recurrent_gates_blocks<G>(const float*, const float*, int64_t, int64_t, float*, \
                                          int64_t, int64_t, bool, bool);                       \
  template void recurrent_gates_rows<G>(const float*, const float*, int64_t, int64_t, float*,   \
                                        int64_t, int64_t, bool, bool);

// One build per ISA: RNNFAST_LANES is the unit block (one vector of floats),
// RNNFAST_ACC_REGS the accumulator vectors a tile of the step GEMMs keeps in registers.
#if defined(__x86_64__) && defined(__GNUC__)
#define RNNFAST_HAVE_X86_BUILDS 1
#pragma GCC push_options
// 512-bit vectors for the auto-vectorised pointwise loops too (GCC's generic tuning may
// prefer 256-bit ones)
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,prefer-vector-width=512")
#define RNNFAST_LANES 16
#define RNNFAST_ACC_REGS 24
namespace rnnfast::cpu::avx512 {
#include "pointwise_impl.h"
#include "step_gemm_impl.h"
RNNFAST_INSTANTIATE(float)
RNNFAST_INSTANTIATE(double)
RNNFAST_INSTANTIATE_STEP_GEMMS(1)
RNNFAST_INSTANTIATE_STEP_GEMMS(3)
RNNFAST_INSTANTIATE_STEP_GEMMS(4)
}  // namespace rnnfast::cpu::avx512
#undef RNNFAST_LANES
#undef RNNFAST_ACC_REGS
#pragma GCC pop_options

// the bfloat16 GEMMs, with the AVX-512 build's step-GEMM helpers they use
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx512bf16,avx2,fma,prefer-vector-width=512")
#define RNNFAST_LANES 16
#define RNNFAST_ACC_REGS 24
namespace rnnfast::cpu::avx512bf16 {
#include "step_gemm_impl.h"
#include "gemm_bf16_impl.h"
}  // namespace rnnfast::cpu::avx512bf16
#undef RNNFAST_LANES
#undef RNNFAST_ACC_REGS
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define RNNFAST_LANES 8
#define RNNFAST_ACC_REGS 12
namespace rnnfast::cpu::avx2 {
#include "pointwise_impl.h"
#include "step_gemm_impl.h"
RNNFAST_INSTANTIATE(float)
RNNFAST_INSTANTIATE(double)
RNNFAST_INSTANTIATE_STEP_GEMMS(1)
RNNFAST_INSTANTIATE_STEP_GEMMS(3)
RNNFAST_INSTANTIATE_STEP_GEMMS(4)
}  // namespace rnnfast::cpu::avx2
#undef RNNFAST_LANES
#undef RNNFAST_ACC_REGS
#pragma GCC pop_options
#endif

#define RNNFAST_LANES 8
#define RNNFAST_ACC_REGS 12
namespace rnnfast::cpu::base {
#include "pointwise_impl.h"
#include "step_gemm_impl.h"
}  // namespace rnnfast::cpu::base
#undef RNNFAST_LANES
#undef RNNFAST_ACC_REGS

namespace rnnfast::cpu {

namespace {
constexpr const char* kIsaNames[] = {"baseline", "avx2", "avx512", "avx512bf16"};
constexpr int kIsaCount = 4;
std::atomic<int> isa_setting{-1};  // -1: not read from RNNFAST_CPU_ISA yet

CpuIsa parse_isa(const char* what, const std::string& name) {
  int found = -1;
  for (int i = 0; i < kIsaCount; ++i)
    if (name == kIsaNames[i]) found = i;
  TORCH_CHECK_VALUE(found >= 0, what,
                    ": expected 'baseline', 'avx2', 'avx512' or 'avx512bf16', but got '", name,
                    "'");
  const CpuIsa best = best_cpu_isa();
  TORCH_CHECK_VALUE(found <= static_cast<int>(best), what, ": this CPU cannot run the '", name,
                    "' kernels (the most it has is '", cpu_isa_name(best), "')");
  return static_cast<CpuIsa>(found);
}
}  // namespace

const char* cpu_isa_name(CpuIsa isa) { return kIsaNames[static_cast<int>(isa)]; }

CpuIsa best_cpu_isa() {
  static const CpuIsa best = [] {
#ifdef RNNFAST_HAVE_X86_BUILDS
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
      return __builtin_cpu_supports("avx512bf16") ? CpuIsa::kAvx512Bf16 : CpuIsa::kAvx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return CpuIsa::kAvx2;
#endif
    return CpuIsa::kBaseline;
  }();
  return best;
}

CpuIsa cpu_isa() {
  int v = isa_setting.load();
  if (v < 0) {
    const char* env = std::getenv("RNNFAST_CPU_ISA");
    const CpuIsa isa =
        env != nullptr && *env != 0 ? parse_isa("RNNFAST_CPU_ISA", env) : best_cpu_isa();
    int unread = -1;
    isa_setting.compare_exchange_strong(unread, static_cast<int>(isa));
    v = isa_setting.load();
  }
  return static_cast<CpuIsa>(v);
}

CpuIsa set_cpu_isa(const char* what, const std::string& name) {
  const CpuIsa previous = cpu_isa();
  isa_setting.store(static_cast<int>(parse_isa(what, name)));
  return previous;
}

#ifdef RNNFAST_HAVE_X86_BUILDS
#define RNNFAST_ISA_CALL(isa, fn, ...)                               \
  ((isa) >= CpuIsa::kAvx512 ? avx512::fn(__VA_ARGS__)                \
   : (isa) == CpuIsa::kAvx2 ? avx2::fn(__VA_ARGS__) : base::fn(__VA_ARGS__))
#else
#define RNNFAST_ISA_CALL(isa, fn, ...) base::fn(__VA_ARGS__)
#endif
// the pointwise kernels: any build for any call (their units need no block layout)
#define RNNFAST_DISPATCH(fn, ...) RNNFAST_ISA_CALL(cpu_isa(), fn, __VA_ARGS__)

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

namespace {
// Plain loops: a permuted .contiguous() of these shapes goes through TensorIterator's
// strided copy, which costs more than a whole short sequence. Writes are sequential.
at::Tensor pack_forward_weights(const at::Tensor& w_hh, int64_t G, int64_t L) {
  const int64_t H = w_hh.size(1), nb = (H + L - 1) / L;
  at::Tensor packed = at::empty({nb, H, G, L}, w_hh.options());
  const float* w = w_hh.data_ptr<float>();
  float* p = packed.data_ptr<float>();
  // per block: read its G*L rows of W_hh in order, scatter into the block's packed slice
  // (H*G*L floats, small enough to stay in L1 while it fills)
  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t valid = std::min(L, H - b * L);
      float* dst = p + b * H * G * L;
      for (int64_t k = 0; k < G; ++k)
        for (int64_t u = 0; u < L; ++u) {
          float* d = dst + k * L + u;
          if (u < valid) {
            const float* src = w + (k * H + b * L + u) * H;  // W_hh[k*H + unit][:]
            for (int64_t j = 0; j < H; ++j) d[j * G * L] = src[j];
          } else {
            for (int64_t j = 0; j < H; ++j) d[j * G * L] = 0.0f;
          }
        }
    }
  });
  return packed;
}

at::Tensor pack_backward_weights(const at::Tensor& w_hh, int64_t L) {
  const int64_t GH = w_hh.size(0), H = w_hh.size(1), nb = (H + L - 1) / L;
  at::Tensor packed = at::empty({nb, GH, L}, w_hh.options());
  const float* w = w_hh.data_ptr<float>();
  float* p = packed.data_ptr<float>();
  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t valid = std::min(L, H - b * L);
      for (int64_t g = 0; g < GH; ++g) {
        const float* src = w + g * H + b * L;
        float* dst = p + (b * GH + g) * L;
        for (int64_t u = 0; u < L; ++u) dst[u] = u < valid ? src[u] : 0.0f;
      }
    }
  });
  return packed;
}

StepWeights step_weights(at::Tensor tensor, int64_t G, bool packed, CpuIsa isa) {
  StepWeights w;
  w.tensor = std::move(tensor);
  if (w.tensor.scalar_type() == at::kBFloat16) {
    w.bf16 = true;
    w.data16 = reinterpret_cast<const uint16_t*>(w.tensor.data_ptr<at::BFloat16>());
  } else {
    w.data = w.tensor.data_ptr<float>();
  }
  w.G = G;
  w.packed = packed;
  w.isa = isa;
  w.lanes = isa_lanes(isa);
  return w;
}

// One buffer per thread for the bfloat16 pairs the bfloat16 GEMMs read (h or dg of a step,
// a panel of x), grown as needed and kept for later calls.
uint32_t* thread_pairs(int64_t count) {
  thread_local std::vector<uint32_t> pairs;
  if (static_cast<int64_t>(pairs.size()) < count) pairs.resize(count);
  return pairs.data();
}
}  // namespace

at::Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{1} << 21;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t last = (begin + t.nbytes()) & ~(kHuge - 1);
  if (t.nbytes() >= 4 * kHuge && last > first)  // a hint: its failure changes nothing
    madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#endif
  return t;
}

namespace {
// f(pointer to t's values): uint16_t bits where t is bfloat16, else float (holding
// bfloat16 values), the two sources the bfloat16 GEMMs' conversions read
template <typename F>
void with_bf16_values(const at::Tensor& t, const F& f) {
  if (t.scalar_type() == at::kBFloat16)
    f(reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>()));
  else
    f(t.data_ptr<float>());
}
}  // namespace

bool uses_bf16_gemms() { return cpu_isa() == CpuIsa::kAvx512Bf16; }

at::Tensor pack_bf16_weights(const at::Tensor& w, int64_t G) {
  const int64_t P = w.size(0), K = w.size(1), H = G > 0 ? P / G : 0;
  const int64_t L = 16, nb = (H + L - 1) / L, Kp = (K + 1) / 2;
  at::Tensor packed = at::empty({nb, Kp, G, L, 2}, w.options().dtype(at::kBFloat16));
  const at::Tensor wc = w.contiguous();
  uint32_t* p = reinterpret_cast<uint32_t*>(packed.data_ptr<at::BFloat16>());
#ifdef RNNFAST_HAVE_X86_BUILDS
  with_bf16_values(wc, [&](const auto* src) {
    at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b)
        avx512bf16::pack_block_bf16(src, K, H, G, b, p + b * Kp * G * L);
    });
  });
#else
  TORCH_CHECK(false, "rnnfast: the bfloat16 packing needs an x86-64 build");
#endif
  return packed;
}

at::Tensor projection_bf16(const at::Tensor& x, const at::Tensor& packed, int64_t G, int64_t H,
                           const std::optional<at::Tensor>& bias, const at::Tensor& buffer) {
  const at::Tensor xc = x.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1), Kp = (K + 1) / 2;
  at::Tensor out;
  if (buffer.defined() && buffer.numel() >= M * G * H) {
    out = buffer.view(-1).narrow(0, 0, M * G * H).view({M, G * H});
  } else {
    out = empty_large({M, G * H}, xc.options().dtype(at::kFloat));
  }
  const std::optional<at::Tensor> bc =
      bias ? std::optional<at::Tensor>(bias->contiguous()) : std::nullopt;
  const float* bp = bc ? bc->data_ptr<float>() : nullptr;
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(packed.data_ptr<at::BFloat16>());
  float* op = out.data_ptr<float>();
  // panels of 48 rows (8 tiles of 6 LSTM rows), each thread a run of them
  constexpr int64_t kPanel = 48;
#ifdef RNNFAST_HAVE_X86_BUILDS
  with_bf16_values(xc, [&](const auto* xp) {
    at::parallel_for(0, (M + kPanel - 1) / kPanel, 1, [&](int64_t p0, int64_t p1) {
      uint32_t* pairs = thread_pairs(kPanel * Kp);
      for (int64_t q = p0; q < p1; ++q) {
        const int64_t m0 = q * kPanel, m = std::min(kPanel, M - m0);
        switch (G) {
          case 1:
            avx512bf16::projection_rows_bf16<1>(wp, xp, m0, m, K, H, bp, op, pairs);
            break;
          case 3:
            avx512bf16::projection_rows_bf16<3>(wp, xp, m0, m, K, H, bp, op, pairs);
            break;
          default:
            TORCH_CHECK(G == 4, "rnnfast: no bfloat16 projection for ", G, " gates");
            avx512bf16::projection_rows_bf16<4>(wp, xp, m0, m, K, H, bp, op, pairs);
        }
      }
    });
  });
#else
  TORCH_CHECK(false, "rnnfast: the bfloat16 projection needs an x86-64 build");
#endif
  return out;
}

StepWeights forward_step_weights(const at::Tensor& w_hh, int64_t G, int64_t N, bool bf16_gemms) {
  if (bf16_gemms) return step_weights(pack_bf16_weights(w_hh, G), G, true, CpuIsa::kAvx512Bf16);
  const CpuIsa isa = cpu_isa();
  const bool packed = N * G > kMaxDotRowsTimesGates;
  return step_weights(packed ? pack_forward_weights(w_hh, G, isa_lanes(isa)) : w_hh.contiguous(),
                      G, packed, isa);
}

StepWeights backward_step_weights(const at::Tensor& w_hh, bool bf16_gemms) {
  const int64_t H = w_hh.size(1), G = H > 0 ? w_hh.size(0) / H : 0;
  if (bf16_gemms)
    return step_weights(pack_bf16_weights(w_hh.t(), 1), G, true, CpuIsa::kAvx512Bf16);
  const CpuIsa isa = cpu_isa();
  return step_weights(pack_backward_weights(w_hh, isa_lanes(isa)), G, true, isa);
}

void recurrent_gates_blocks(const StepWeights& w, const float* h, int64_t N, int64_t H,
                            float* out, int64_t b0, int64_t b1, bool accumulate,
                            bool descending) {
#ifdef RNNFAST_HAVE_X86_BUILDS
#define RNNFAST_BF16_GATES(G)                                                                \
  avx512bf16::recurrent_gates_blocks_bf16<G>(w.data16, h, N, H, out, b0, b1, accumulate,     \
                                             descending, thread_pairs(N * ((H + 1) / 2)));
#else
#define RNNFAST_BF16_GATES(G) TORCH_CHECK(false, "rnnfast: bfloat16 step GEMMs need x86-64");
#endif
#define RNNFAST_GATES(G)                                                                      \
  if (w.bf16) {                                                                               \
    RNNFAST_BF16_GATES(G)                                                                     \
  } else if (w.packed) {                                                                             \
    RNNFAST_ISA_CALL(w.isa, recurrent_gates_blocks<G>, w.data, h, N, H, out, b0, b1,          \
                     accumulate, descending);                                                 \
  } else {                                                                                    \
    RNNFAST_ISA_CALL(w.isa, recurrent_gates_rows<G>, w.data, h, N, H, out, b0, b1, accumulate, \
                     descending);                                                             \
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
#undef RNNFAST_BF16_GATES
}

void recurrent_dh_blocks(const StepWeights& w, const float* dg, int64_t N, int64_t GH, int64_t H,
                         float* dh, int64_t b0, int64_t b1, bool accumulate, bool descending) {
  if (w.bf16) {
#ifdef RNNFAST_HAVE_X86_BUILDS
    avx512bf16::recurrent_dh_blocks_bf16(w.data16, dg, N, GH, H, dh, b0, b1, accumulate,
                                         descending, thread_pairs(N * ((GH + 1) / 2)));
    return;
#else
    TORCH_CHECK(false, "rnnfast: bfloat16 step GEMMs need x86-64");
#endif
  }
  RNNFAST_ISA_CALL(w.isa, recurrent_dh_blocks, w.data, dg, N, GH, H, dh, b0, b1, accumulate,
                   descending);
}

void weight_grad_f32(CpuIsa isa, const TnSegment* segs, int nseg, int64_t lda, int64_t ldb,
                     int64_t P, int64_t K, float* out) {
#ifdef RNNFAST_HAVE_X86_BUILDS
  TORCH_CHECK(isa >= CpuIsa::kAvx512, "rnnfast: weight_grad_f32 runs on the AVX-512 build only");
#else
  TORCH_CHECK(false, "rnnfast: weight_grad_f32 needs an x86-64 build");
#endif
  constexpr int64_t lanes = 16;
  const int64_t rem = K % lanes;
  int64_t M = 0;
  for (int s = 0; s < nseg; ++s) M += segs[s].rows;
  if (P == 0 || K == 0) return;
  if (M == 0) {
    std::memset(out, 0, P * K * sizeof(float));
    return;
  }
  // the last K % lanes columns of b, zero-padded to whole vectors
  std::vector<float> tail(rem > 0 ? M * lanes : 0, 0.0f);
  if (rem > 0) {
    int64_t row = 0;
    for (int s = 0; s < nseg; ++s)
      for (int64_t m = 0; m < segs[s].rows; ++m, ++row)
        std::memcpy(tail.data() + row * lanes, segs[s].b + m * ldb + K - rem, rem * sizeof(float));
  }
  // rows of out in groups of 12 (two whole tiles), split between the threads
  constexpr int64_t kGroup = 12;
  at::parallel_for(0, (P + kGroup - 1) / kGroup, 1, [&](int64_t g0, int64_t g1) {
#ifdef RNNFAST_HAVE_X86_BUILDS
    avx512::weight_grad_tn(segs, nseg, lda, ldb, K, tail.data(), out, g0 * kGroup,
                           std::min(P, g1 * kGroup));
#endif
  });
}

}  // namespace rnnfast::cpu
