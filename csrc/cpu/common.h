// Pieces shared by the CPU drivers of every cell: the input projection as GEMMs over many
// steps at once, the weight and input gradients as whole-sequence GEMMs after the
// reverse-time loop, and the threading of the step loops.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "kernels.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

namespace rnnfast::cpu {

using at::Tensor;

// ---- where each step's rows lie ----
// The drivers work on 2-D row views: x [R, C], y [R, H], the pre-activations and the
// workspace [R, width], where the step at time t owns rows [offset(t), offset(t) + rows(t)).
// A dense sequence [T, N, ...] has N rows a step (R = T * N). A packed one (a
// PackedSequence: sequences sorted longest first, batch_sizes[t] of them still running at
// time t) has batch_sizes[t] rows, never more than the step before: state row i belongs
// to the i-th longest sequence, and a step touches only the state rows [0, rows(t)).
class StepRows {
 public:
  static StepRows dense(int64_t T, int64_t N) { return StepRows(T, N); }
  // batch_sizes: checked by the op (check_packed_inputs): at least one step, positive,
  // non-increasing
  static StepRows packed(const Tensor& batch_sizes) {
    const Tensor b = batch_sizes.contiguous();
    const int64_t* p = b.data_ptr<int64_t>();
    StepRows L(b.numel(), p[0]);
    L.off_.resize(L.T + 1, 0);
    for (int64_t t = 0; t < L.T; ++t) L.off_[t + 1] = L.off_[t] + p[t];
    return L;
  }
  int64_t T, N;  // N: the state's rows, the most of any step
  bool packed() const { return !off_.empty(); }
  int64_t offset(int64_t t) const { return packed() ? off_[t] : t * N; }
  int64_t rows(int64_t t) const { return packed() ? off_[t + 1] - off_[t] : N; }
  int64_t total() const { return offset(T); }
  // Of the rows of the step at visiting position s, [0, carried) continue from the step
  // visited before it and [carried, rows) start from the initial state (h0, c0): all of
  // them at s = 0, and in a packed sequence read in reverse, those whose last step it is.
  int64_t carried(int64_t s, bool reverse) const {
    if (s == 0) return 0;
    return std::min(rows(time_index(s, T, reverse)), rows(time_index(s - 1, T, reverse)));
  }

 private:
  StepRows(int64_t T_, int64_t N_) : T(T_), N(N_) {}
  std::vector<int64_t> off_;  // T + 1 row offsets where packed, else empty
};

// f(n0, rows, from_init) over rows [n0, n0 + rows) of the step at visiting position s,
// split where its previous state changes source (StepRows::carried); no call for no rows.
template <typename F>
void split_by_source(const StepRows& L, int64_t s, bool reverse, int64_t n0, int64_t rows,
                     const F& f) {
  const int64_t k = std::clamp(L.carried(s, reverse), n0, n0 + rows);
  if (k > n0) f(n0, k - n0, false);
  if (n0 + rows > k) f(k, n0 + rows - k, true);
}

// The final state [N, H] (init's dtype) of every row: its value after the last step, in
// visiting order, that ran it (step_rows(s): row 0 of step s's values, rows `ld` elements
// apart); a row no step ran keeps init's (T = 0).
template <typename StepPtr>
Tensor final_state(const StepRows& L, bool reverse, const Tensor& init, int64_t ld,
                   const StepPtr& step_rows) {
  const int64_t N = init.size(0), H = init.size(1), es = init.element_size();
  Tensor out = at::empty({N, H}, init.options());
  // (an empty tensor's data may be null, which memcpy must not get even for 0 bytes)
  if (N * H == 0) return out;
  char* o = static_cast<char*>(out.data_ptr());
  int64_t filled = 0;
  for (int64_t s = L.T - 1; s >= 0 && filled < N; --s) {
    const int64_t n = L.rows(time_index(s, L.T, reverse));
    if (n <= filled) continue;
    const char* p = reinterpret_cast<const char*>(step_rows(s));
    if (ld == H) {
      std::memcpy(o + filled * H * es, p + filled * H * es, (n - filled) * H * es);
    } else {
      for (int64_t i = filled; i < n; ++i) std::memcpy(o + i * H * es, p + i * ld * es, H * es);
    }
    filled = n;
  }
  if (filled < N)
    std::memcpy(o + filled * H * es, static_cast<const char*>(init.data_ptr()) + filled * H * es,
                (N - filled) * H * es);
  return out;
}

// Whether weight_gemm takes oneDNN's linear, by torch release (its MKL and oneDNN change
// with it) and CPU. Measured on 2 cores of an AMD EPYC (Zen 3, AVX2), 2026-11-28, float32,
// the shapes of the input projection and dx (M = T * N up to 16384, K and P 256-4096):
// under torch 2.6 and 2.11 oneDNN took 0.87x-1.01x of addmm's time; under 2.14.1 addmm
// took 0.80x-0.93x of oneDNN's, and whole layers gained 2-11% from it (Elman forward N =
// 64, H = 1024: 1.26x -> 1.40x torch.nn's speed; LSTM forward+backward N = 64, H = 512:
// 1.00x -> 1.06x). 2.12 and 2.13 are unmeasured and keep oneDNN, as before. On a CPU with
// AVX-512 it is oneDNN in every release: on 2 cores of an AMD EPYC with AVX-512 (Zen 5),
// torch 2.14.1's addmm (MKL) ran 256-bit code while oneDNN ran 512-bit code and took
// 0.47x-0.58x of its time at M = 1024-6400, K and P 256-2048.
inline bool onednn_weight_gemms() {
#if defined(RNNFAST_TORCH_VERSION) && RNNFAST_TORCH_VERSION >= 214
  static const bool use = best_cpu_isa() >= CpuIsa::kAvx512;
  return use;
#else
  return true;
#endif
}

// a [M, K] @ w [P, K]^T (+ bias [P]) -> [M, P]: the whole-sequence GEMMs that read a
// weight. In float32, where onednn_weight_gemms(), they go through oneDNN's linear where
// torch has it (torch's own mkldnn::_linear_pointwise op, found once through the
// dispatcher and called boxed, so that no C++ signature is assumed): on CPUs where MKL runs
// its generic code path (AMD) it was faster. Small GEMMs and anything else: addmm.
inline Tensor weight_gemm(const Tensor& a, const Tensor& w, const std::optional<Tensor>& bias) {
  // used only with the schema this code was written for:
  // (Tensor X, Tensor W, Tensor? B, str attr, Scalar?[] scalars, str? algorithm) -> Tensor
  static const std::optional<c10::OperatorHandle> onednn = []() {
    auto op = c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
    if (op && op->schema().arguments().size() == 6 && op->schema().returns().size() == 1 &&
        op->schema().arguments()[3].name() == "attr")
      return op;
    return std::optional<c10::OperatorHandle>();
  }();
  // oneDNN's per-call cost only pays off on GEMMs of some size
  if (onednn && a.scalar_type() == at::kFloat && a.size(0) >= 256 && a.size(1) > 0 &&
      onednn_weight_gemms()) {
    std::vector<c10::IValue> stack{a, w.contiguous(), bias ? c10::IValue(*bias) : c10::IValue(),
                                   c10::IValue(std::string("none")),
                                   c10::IValue(c10::List<std::optional<c10::Scalar>>()),
                                   c10::IValue()};
    onednn->callBoxed(&stack);
    return stack.at(0).toTensor();
  }
  return bias ? at::addmm(*bias, a, w.t()) : at::mm(a, w.t());
}

// The input projection's bias: b_ih plus the first hh_count entries of b_hh (all of them,
// but for the GRU, whose b_hn stays inside r * (...)); either may be absent.
struct ProjectionBias {
  std::optional<Tensor> ih, hh;
  int64_t hh_count = 0;
  ProjectionBias(const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh)
      : ih(b_ih), hh(b_hh), hh_count(b_hh ? b_hh->numel() : 0) {}
  ProjectionBias(const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh,
                 int64_t count)
      : ih(b_ih), hh(b_hh), hh_count(b_hh ? count : 0) {}
  // the sum as one tensor of P entries (b_hh's past hh_count left out), for a GEMM's bias
  std::optional<Tensor> summed(int64_t P) const {
    std::optional<Tensor> part = hh;
    if (hh && hh_count < P)
      part = at::cat({hh->narrow(0, 0, hh_count), at::zeros({P - hh_count}, hh->options())});
    if (ih && part) return *ih + *part;
    return ih ? ih : part;
  }
};

// GEMMs of at most this many multiply-adds (the input projection, the backward's dx and dW)
// run as plain loops (small_projection, small_tn):
// the GEMM and the bias sum cost a few ATen calls (~5-10 us on this machine), which is most
// of a call at the smallest sizes (T = 1, H = 8).
constexpr int64_t kSmallGemmFma = 4096;
// whether a GEMM of `fma` multiply-adds in t's dtype takes the plain loops
inline bool small_gemm(int64_t fma, const Tensor& t) {
  return fma <= kSmallGemmFma &&
         (t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble);
}

// out [M, P] = a [M, K] w [P, K]^T + bias, each output summed over k in four interleaved
// partial sums added in a fixed order, then its bias (b_ih[p] + b_hh[p]) added.
template <typename scalar_t>
void small_projection(const scalar_t* a, const scalar_t* w, const scalar_t* b_ih,
                      const scalar_t* b_hh, int64_t hh_count, int64_t M, int64_t K, int64_t P,
                      scalar_t* out) {
  for (int64_t p = 0; p < P; ++p) {
    scalar_t bias = 0;
    if (b_ih && b_hh && p < hh_count)
      bias = b_ih[p] + b_hh[p];
    else if (b_ih)
      bias = b_ih[p];
    else if (b_hh && p < hh_count)
      bias = b_hh[p];
    const scalar_t* wp = w + p * K;
    for (int64_t m = 0; m < M; ++m) {
      const scalar_t* am = a + m * K;
      scalar_t s[4] = {0, 0, 0, 0};
      int64_t k = 0;
      for (; k + 4 <= K; k += 4)
        for (int q = 0; q < 4; ++q) s[q] += am[k + q] * wp[k + q];
      for (; k < K; ++k) s[0] += am[k] * wp[k];
      out[m * P + p] = ((s[0] + s[1]) + (s[2] + s[3])) + bias;
    }
  }
}

// pre [M, G*H] = x [M, C] W_ih^T + bias, in one GEMM over all rows of x.
inline Tensor input_projection(const Tensor& x, const Tensor& w_ih, const ProjectionBias& bias) {
  const int64_t M = x.size(0), C = x.size(1), P = w_ih.size(0);
  if (small_gemm(M * C * P, x) && x.is_contiguous() && w_ih.is_contiguous()) {
    Tensor out = at::empty({M, P}, x.options());
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "small_projection", [&] {
      small_projection<scalar_t>(x.data_ptr<scalar_t>(), w_ih.data_ptr<scalar_t>(),
                                 bias.ih ? bias.ih->data_ptr<scalar_t>() : nullptr,
                                 bias.hh ? bias.hh->data_ptr<scalar_t>() : nullptr,
                                 bias.hh_count, M, C, P, out.data_ptr<scalar_t>());
    });
    return out;
  }
  return weight_gemm(x, w_ih, bias.summed(P));
}

// The input projection of LSTM and GRU: one GEMM over all steps whenever its output fits
// in 16 MiB (4M floats), else one GEMM per chunk of that size, computed just before those
// steps run, so that memory stays bounded for long sequences. The size: a chunk the size
// of the whole L3 (32 MiB on this Zen 3) is gone from it by the time its last steps read
// it. Against 32 MiB chunks, 16 MiB ones ran the LSTM forward at T = 512, N = 16, H = 256
// 17-33% faster (three interleaved runs on 2 cores, 2026-11-28), at T = 1024 6-8%, and
// within 2% elsewhere (LSTM N = 64, H = 512 and 1024, forward and forward+backward; GRU
// T = 1024, N = 16). Chunks of 4 MiB gained as much at N = 16 but lost 7% once at N = 64,
// H = 1024, where a chunk is then 4 steps; 2 MiB ones lost 3-8% in an earlier test.
constexpr int64_t kProjectionChunkFloats = int64_t{1} << 22;
class ProjectedChunks {
 public:
  // x [R, C] laid out as L says. bf16_gates: the layer's gates G where x and w_ih (each in
  // bfloat16, or float32) hold bfloat16 values and the bfloat16 GEMM is to run
  // (bf16_gemms_of), else 0.
  ProjectedChunks(const Tensor& x, const StepRows& L, const Tensor& w_ih, ProjectionBias bias,
                  bool reverse, int64_t bf16_gates = 0)
      : x_(x), L_(L), w_ih_(w_ih), bias_(std::move(bias)), reverse_(reverse),
        bf16_gates_(bf16_gates) {
    const int64_t step_floats = std::max<int64_t>(1, L.N * w_ih.size(0));
    steps_per_chunk = std::max<int64_t>(1, kProjectionChunkFloats / step_floats);
    if (bf16_gates_ > 0) {
      w_bf16_ = pack_bf16_weights(w_ih, bf16_gates_);
      bias_sum_ = bias_.summed(w_ih.size(0));
    }
  }
  int64_t steps_per_chunk;

  // Projects the steps [s0, s1) (in visiting order).
  void project(int64_t s0, int64_t s1) {
    const int64_t T = L_.T, n = s1 - s0;
    t_lo_ = reverse_ ? T - s1 : s0;
    row_lo_ = L_.offset(t_lo_);
    const Tensor x = x_.narrow(0, row_lo_, L_.offset(t_lo_ + n) - row_lo_);
    if (bf16_gates_ > 0) {
      // one buffer for all chunks of the call: a fresh one per chunk cost its page faults
      // and zeroing each time (LSTM T = 100, N = 64, H = 512: 3-10 ms of a 33-43 ms call)
      chunk_ = projection_bf16(x, w_bf16_, bf16_gates_, w_ih_.size(0) / bf16_gates_, bias_sum_,
                               buffer_);
      if (!buffer_.defined() || chunk_.numel() > buffer_.numel()) buffer_ = chunk_;
    } else {
      chunk_ = input_projection(x, w_ih_, bias_);
    }
  }
  // Pre-activations [rows(t), G*H] of the step at time t, which the last chunk must hold.
  template <typename scalar_t>
  scalar_t* at_time(int64_t t) const {
    return chunk_.data_ptr<scalar_t>() + (L_.offset(t) - row_lo_) * chunk_.size(1);
  }
  Tensor step(int64_t t) const { return chunk_.narrow(0, L_.offset(t) - row_lo_, L_.rows(t)); }

 private:
  Tensor x_;
  StepRows L_;
  Tensor w_ih_;
  ProjectionBias bias_;
  bool reverse_;
  int64_t bf16_gates_;
  Tensor w_bf16_;                      // w_ih packed for projection_bf16
  std::optional<Tensor> bias_sum_;
  Tensor chunk_;
  Tensor buffer_;  // the largest chunk's storage so far (bfloat16 GEMMs only)
  int64_t t_lo_ = 0, row_lo_ = 0;
};


// Splits rows [0, rows) over threads, giving each task enough elements to pay for it.
template <typename F>
void parallel_rows(int64_t rows, int64_t elements_per_row, const F& f) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, elements_per_row));
  at::parallel_for(0, rows, grain, f);
}

// ---- the weight-stationary float32 path ----
// All steps of a sequence run inside one parallel region: thread k owns the same
// contiguous range of 8-unit blocks of the hidden state at every step, so it keeps
// re-reading the same slice of the packed W_hh from its own cache, and the threads meet at
// one barrier per step (a fork and join per step would cost more than a small step).

inline int64_t unit_blocks(int64_t H, int64_t lanes) { return (H + lanes - 1) / lanes; }

// Threads worth using: each needs enough multiply-adds per step to pay for a barrier.
inline int64_t step_threads(int64_t nb, int64_t fma_per_block) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, fma_per_block));
  if (at::in_parallel_region()) return 1;
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (nb + grain - 1) / grain));
}

// Runs body(b0, b1, barrier) on `threads` threads, thread k with blocks [b0, b1) of its
// own; barrier() waits for all of them.
template <typename F>
void in_step_region(int64_t nb, int64_t threads, const F& body) {
#ifdef _OPENMP
  if (threads > 1) {
#pragma omp parallel num_threads(threads)
    {
      const int64_t k = omp_get_thread_num(), n = omp_get_num_threads();
      const int64_t per = (nb + n - 1) / n;
      const int64_t b0 = std::min(nb, k * per), b1 = std::min(nb, b0 + per);
      body(b0, b1, [] {
#pragma omp barrier
      });
    }
    return;
  }
#endif
  (void)threads;
  body(int64_t{0}, nb, [] {});
}

// Alternate steps visit a thread's unit blocks in opposite orders, so that the weights it
// read last in one step, still in cache, are the first it reads in the next (about 3-6%
// at batch 1, where each step streams all of W_hh). Each output's sum is unchanged.
inline bool descending_step(int64_t s) { return (s & 1) != 0; }

// Forward: step(s, b0, b1) computes step s (in visiting order, s0 <= s < s1) for unit
// blocks [b0, b1) of w's layout (w.lanes units each); a step takes fma_per_unit
// multiply-adds per unit.
template <typename F>
void forward_steps(int64_t s0, int64_t s1, int64_t H, const StepWeights& w, int64_t fma_per_unit,
                   const F& step) {
  const int64_t nb = unit_blocks(H, w.lanes);
  const int64_t threads = step_threads(nb, fma_per_unit * w.lanes);
  in_step_region(nb, threads, [&](int64_t b0, int64_t b1, auto barrier) {
    for (int64_t s = s0; s < s1; ++s) {
      if (b0 < b1) step(s, b0, b1);
      barrier();
    }
  });
}

// Backward, in reverse visiting order. gate_grads(s, b0, b1) computes step s's gate
// gradients for its units; recurrent_grad(s, b0, b1) the gradient into h_{s-1} for its
// units, which needs the gate gradients of every unit. The second of one step and the
// first of the next touch the same units only, so no barrier separates them.
template <typename A, typename B>
void backward_steps(int64_t T, int64_t H, const StepWeights& w, int64_t fma_per_unit,
                    const A& gate_grads, const B& recurrent_grad) {
  if (T == 0) return;
  const int64_t nb = unit_blocks(H, w.lanes);
  const int64_t threads = step_threads(nb, fma_per_unit * w.lanes);
  in_step_region(nb, threads, [&](int64_t b0, int64_t b1, auto barrier) {
    if (b0 < b1) gate_grads(T - 1, b0, b1);
    barrier();
    for (int64_t s = T - 1; s >= 0; --s) {
      if (b0 < b1) {
        recurrent_grad(s, b0, b1);
        if (s > 0) gate_grads(s - 1, b0, b1);
      }
      barrier();
    }
  });
}

// Units [u0, u0 + count) of blocks [b0, b1) of w's layout.
struct UnitRange {
  int64_t u0, count;
};
inline UnitRange units_of(int64_t b0, int64_t b1, int64_t H, const StepWeights& w) {
  const int64_t u0 = b0 * w.lanes;
  return {u0, std::min(b1 * w.lanes, H) - u0};
}

// The reverse-time loop of every cell's backward, for dg_hh [R, G*H] (the gate gradients
// that W_hh multiplies, laid out as L says). gate_grads(s, rows, n0, u0, count) computes
// step s's gate gradients for rows [n0, n0 + rows) and units [u0, u0 + count) from
// dh_carry; then dh_carry's rows of that step = dg_hh's rows W_hh, or += where gate_grads
// leaves a direct term there (GRU). The state rows a step does not run keep their carry:
// dhn for sequences not yet begun (read backwards), dh0 for those already ended.
// float32 runs weight-stationary (backward_steps), its dh GEMM in bfloat16 where bf16 (the
// op's bf16_gemms_of: dg_hh rounded to bfloat16 for it); other dtypes with BLAS per step.
template <typename scalar_t, typename F>
void reverse_time_loop(const Tensor& dg_hh, const StepRows& L, const Tensor& w_hh, bool reverse,
                       Tensor& dh_carry, bool accumulate, bool bf16, const F& gate_grads) {
  const int64_t T = L.T, N = L.N, GH = dg_hh.size(1), H = w_hh.size(1);
  if constexpr (std::is_same_v<scalar_t, float>) {
    const StepWeights wb = backward_step_weights(w_hh, bf16);
    const float* dg = dg_hh.data_ptr<float>();
    float* dhc = dh_carry.data_ptr<float>();
    backward_steps(
        T, H, wb, N * GH,
        [&](int64_t s, int64_t b0, int64_t b1) {
          const UnitRange u = units_of(b0, b1, H, wb);
          gate_grads(s, L.rows(time_index(s, T, reverse)), 0, u.u0, u.count);
        },
        [&](int64_t s, int64_t b0, int64_t b1) {
          const int64_t t = time_index(s, T, reverse);
          recurrent_dh_blocks(wb, dg + L.offset(t) * GH, L.rows(t), GH, H,
                              dhc, b0, b1, accumulate, descending_step(s));
        });
  } else {
    for (int64_t s = T - 1; s >= 0; --s) {
      const int64_t t = time_index(s, T, reverse), n = L.rows(t);
      parallel_rows(n, GH, [&](int64_t b, int64_t e) { gate_grads(s, e - b, b, 0, H); });
      const Tensor dg_t = dg_hh.narrow(0, L.offset(t), n);
      Tensor dh = dh_carry.narrow(0, 0, n);
      if (accumulate) {
        dh.addmm_(dg_t, w_hh);
      } else {
        at::mm_out(dh, dg_t, w_hh);
      }
    }
  }
}

// a^T b for a [K, M], b [K, P]: the weight-gradient GEMMs, reducing over all T*N rows.
// In float32 under the AVX-512 settings rnnfast's own kernel runs them (weight_grad_f32,
// kernels.h): it reads a and b as they lie, with no transposed copies, at 200-250 GFMA/s
// on 2 Zen 5 cores. The ATen path below serves the rest (float64, AVX2 and baseline
// CPUs, where that kernel's 256-bit build ran at 0.8x MKL) and
// RNNFAST_CPU_WEIGHT_GRADS=aten. Against it, on the Zen 5, the LSTM forward+backward in
// float32 went from 0.84x-1.03x of torch.nn to 1.00x-1.25x at T = 64-100, N = 16-64, H =
// 128-512 (benchmarks/results/cpu-zen5-f32-weight-grads-ab-2026-11-29.json).
// On that path: MKL sums a long K far less accurately when the output is narrow (P of a
// few columns) than when it is wide; computing (b^T a)^T when P is narrow and P < M keeps
// the error at torch.nn's level, for the price of transposing the [M, P] result. Where P
// is wide the transpose only costs: at N = 1, H = 1024 the LSTM backward's three [4H, H]
// transposes (about 10 ms each on 2 cores) were half its fixed cost (64 ms a call at T =
// 25).
// Where weight_gemm takes oneDNN (onednn_weight_gemms: AVX-512 CPUs under torch 2.14), so
// do these, as sums over chunks of about kTnChunkRows rows of a^T (b^T)^T, each chunk's
// a^T and b^T copied out first (oneDNN's linear reads both with the reduction contiguous).
// A whole a^T is a copy whose rows are M floats apart: at M = 16384 (a power of two, as T
// * N often is) the transposing copy of a [16384, 1024] took 42 ms, as long as the GEMM
// by MKL, whose rows then all fall in one L1 set; in chunks of 1000 rows they are 4000
// bytes apart. Measured on 2 cores of a Zen 5 against at::mm (MKL, 256-bit code there),
// interleaved: 1.3x-1.6x faster at M = 1024-102400, P = 1024-2048, K = 256-512 (M = 16384,
// P = 1024, K = 256: 32 against 44 ms); whole chunks of 2000 or 4000 rows were 2-10%
// slower than 1000. (Transposing dg once for both dW GEMMs, unchunked, had gained 4-6% at
// N = 16 but lost 6% at T = 100, N = 64, H = 256.)
constexpr int64_t kNarrowGradColumns = 64;
constexpr int64_t kTnChunkRows = 1000;
// float32 weight gradients by weight_grad_f32 under the AVX-512 settings (isa: the setting
// read once by the caller), unless RNNFAST_CPU_WEIGHT_GRADS=aten
inline bool own_weight_grads(CpuIsa isa) {
  static const bool own = [] {
    const char* v = std::getenv("RNNFAST_CPU_WEIGHT_GRADS");
    return !(v && std::string(v) == "aten");
  }();
  return own && isa >= CpuIsa::kAvx512;
}
// a^T b by weight_grad_f32, summed over one or more segments of rows (a [K_i, M], b [K_i,
// P] each, rows contiguous, a's rows equally far apart in all, and b's).
inline Tensor mm_tn_f32(CpuIsa isa, std::initializer_list<std::pair<Tensor, Tensor>> parts) {
  const Tensor &a0 = parts.begin()->first, &b0 = parts.begin()->second;
  const int64_t M = a0.size(1), P = b0.size(1), lda = a0.stride(0), ldb = b0.stride(0);
  std::vector<TnSegment> segs;
  for (const auto& [a, b] : parts) {
    TORCH_INTERNAL_ASSERT(a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat &&
                          a.size(1) == M && b.size(1) == P && a.size(0) == b.size(0) &&
                          (a.size(0) <= 1 || (a.stride(0) == lda && b.stride(0) == ldb)) &&
                          (M <= 1 || a.stride(1) == 1) && (P <= 1 || b.stride(1) == 1));
    segs.push_back({a.const_data_ptr<float>(), b.const_data_ptr<float>(), a.size(0)});
  }
  Tensor out = at::empty({M, P}, a0.options());
  weight_grad_f32(isa, segs.data(), static_cast<int>(segs.size()), lda, ldb, M, P,
                  out.mutable_data_ptr<float>());
  return out;
}

inline Tensor mm_tn(const Tensor& a, const Tensor& b) {
  if (const CpuIsa isa = cpu_isa(); a.scalar_type() == at::kFloat && own_weight_grads(isa))
    return mm_tn_f32(isa, {{a, b}});
  if (b.size(1) < a.size(1) && b.size(1) < kNarrowGradColumns)
    return at::mm(b.t(), a).t().contiguous();
  const int64_t K = a.size(0);
  if (!(onednn_weight_gemms() && a.scalar_type() == at::kFloat) || K == 0)
    return at::mm(a.t(), b);
  // chunks as even as they go, each at most kTnChunkRows rows; summed in order
  const int64_t chunks = (K + kTnChunkRows - 1) / kTnChunkRows, rows = (K + chunks - 1) / chunks;
  Tensor out;
  for (int64_t k0 = 0; k0 < K; k0 += rows) {
    const int64_t k = std::min(rows, K - k0);
    Tensor part = weight_gemm(a.narrow(0, k0, k).t().contiguous(),
                              b.narrow(0, k0, k).t().contiguous(), std::nullopt);
    if (out.defined()) {
      out.add_(part);
    } else {
      out = std::move(part);
    }
  }
  return out;
}

// The backward's whole-sequence GEMMs at the smallest sizes (small_gemm; all contiguous,
// as the ops' checks leave them) by plain loops, each output summed over the rows in order:
// as for the input projection, a GEMM there is mostly the cost of its ATen calls.
inline Tensor zeros_like_shape(at::IntArrayRef shape, const Tensor& like) {
  Tensor out = at::empty(shape, like.options());
  if (out.numel() > 0) std::memset(out.data_ptr(), 0, out.numel() * out.element_size());
  return out;
}
// out [P, K] += a [M, P]^T b [M, K]
template <typename scalar_t>
void small_tn(const scalar_t* a, const scalar_t* b, int64_t M, int64_t P, int64_t K,
              scalar_t* out) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t p = 0; p < P; ++p) {
      const scalar_t v = a[m * P + p];
      for (int64_t k = 0; k < K; ++k) out[p * K + k] += v * b[m * K + k];
    }
}

// dW_hh [G*H, H] = sum over steps of dg_hh's rows^T h_{t-1}'s (dg_hh [R, G*H] and y
// [R, H] laid out as L says). Dense: h_{t-1} is h0 at the first step the forward pass
// visited and the neighbouring y otherwise, so two GEMMs do it, no gather. Packed: the
// rows of h_{t-1} are gathered first (StepRows::carried), then one GEMM.
inline Tensor recurrent_weight_grad(const Tensor& dg_hh, const Tensor& y, const Tensor& h0,
                                    const StepRows& L, bool reverse) {
  const int64_t T = L.T, N = L.N, R = dg_hh.size(0), GH = dg_hh.size(1), H = y.size(1);
  if (L.packed()) {
    Tensor h_prev = at::empty({R, H}, y.options());
    const int64_t es = y.element_size();
    char* hp = static_cast<char*>(h_prev.data_ptr());
    const char *yp = static_cast<const char*>(y.data_ptr()),
               *h0p = static_cast<const char*>(h0.data_ptr());
    for (int64_t s = 0; s < T; ++s) {
      const int64_t t = time_index(s, T, reverse);
      split_by_source(L, s, reverse, 0, L.rows(t), [&](int64_t n0, int64_t rows, bool init) {
        const char* src = init ? h0p + n0 * H * es
                               : yp + (L.offset(time_index(s - 1, T, reverse)) + n0) * H * es;
        std::memcpy(hp + (L.offset(t) + n0) * H * es, src, rows * H * es);
      });
    }
    if (small_gemm(R * GH * H, y)) {
      Tensor dw_hh = zeros_like_shape({GH, H}, y);
      AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "small_recurrent_weight_grad", [&] {
        small_tn<scalar_t>(dg_hh.data_ptr<scalar_t>(), h_prev.data_ptr<scalar_t>(), R, GH, H,
                           dw_hh.data_ptr<scalar_t>());
      });
      return dw_hh;
    }
    return mm_tn(dg_hh, h_prev);
  }
  const int64_t first = reverse ? T - 1 : 0;
  if (small_gemm(R * GH * H, y)) {
    Tensor dw_hh = zeros_like_shape({GH, H}, y);
    AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "small_recurrent_weight_grad", [&] {
      const scalar_t *dg = dg_hh.data_ptr<scalar_t>(), *yp = y.data_ptr<scalar_t>();
      for (int64_t t = 0; t < T; ++t) {
        const scalar_t* hp = t == first ? h0.data_ptr<scalar_t>()
                                        : yp + (reverse ? t + 1 : t - 1) * N * H;
        small_tn<scalar_t>(dg + t * N * GH, hp, N, GH, H, dw_hh.data_ptr<scalar_t>());
      }
    });
    return dw_hh;
  }
  if (const CpuIsa isa = cpu_isa(); y.scalar_type() == at::kFloat && own_weight_grads(isa)) {
    const int64_t rest = (T - 1) * N;
    return mm_tn_f32(isa, {{dg_hh.narrow(0, first * N, N), h0},
                           {dg_hh.narrow(0, reverse ? 0 : N, rest),
                            y.narrow(0, reverse ? N : 0, rest)}});
  }
  Tensor dw_hh = mm_tn(dg_hh.narrow(0, first * N, N), h0);
  if (T > 1) {
    const int64_t rest = (T - 1) * N;
    const Tensor dg = dg_hh.narrow(0, reverse ? 0 : N, rest);
    const Tensor hp = y.narrow(0, reverse ? N : 0, rest);
    dw_hh += mm_tn(dg, hp);
  }
  return dw_hh;
}

struct InputGrads {
  Tensor dx, dw_ih;
};

// dx [M, C] = dg_ih [M, G*H] W_ih and dW_ih = dg_ih^T x, each one GEMM over all rows.
inline InputGrads input_grads(const Tensor& dg_ih, const Tensor& x, const Tensor& w_ih) {
  const int64_t M = x.size(0), C = x.size(1);
  if (small_gemm(dg_ih.numel() * C, x)) {
    const int64_t P = dg_ih.size(1);
    InputGrads g{zeros_like_shape({M, C}, x), zeros_like_shape({P, C}, x)};
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "small_input_grads", [&] {
      const scalar_t *dg = dg_ih.data_ptr<scalar_t>(), *w = w_ih.data_ptr<scalar_t>();
      scalar_t* dx = g.dx.data_ptr<scalar_t>();
      for (int64_t m = 0; m < M; ++m)  // dx [M, C] = dg [M, P] W_ih [P, C]
        for (int64_t p = 0; p < P; ++p) {
          const scalar_t v = dg[m * P + p];
          for (int64_t c = 0; c < C; ++c) dx[m * C + c] += v * w[p * C + c];
        }
      small_tn<scalar_t>(dg, x.data_ptr<scalar_t>(), M, P, C, g.dw_ih.data_ptr<scalar_t>());
    });
    return g;
  }
  return {weight_gemm(dg_ih, w_ih.t(), std::nullopt), mm_tn(dg_ih, x)};
}

// db [G*H] = the sum over all rows of the gate gradients dg [R, G*H].
// The backward's whole-sequence GEMMs of a bfloat16 layer where bf16_gemms_of: dx, dW_ih
// and dW_hh through torch's bfloat16 GEMMs (oneDNN's with AVX512-BF16: float32 sums, each
// result rounded to bfloat16 once, as the op returns it), from the gate gradients rounded
// to bfloat16 (x, h and the weights hold bfloat16 values already; x and W_ih, and the
// LSTM's y, come in bfloat16: GemmInput). Else the float32 ones. Their results stay in
// bfloat16, the dtype the op returns.
inline Tensor as_bf16(const Tensor& t) { return t.to(at::kBFloat16); }
inline InputGrads input_grads(const Tensor& dg_ih, const Tensor& x, const Tensor& w_ih,
                              bool bf16) {
  if (!bf16) return input_grads(dg_ih, x, w_ih);
  return input_grads(as_bf16(dg_ih), as_bf16(x), as_bf16(w_ih));
}
inline Tensor recurrent_weight_grad(const Tensor& dg_hh, const Tensor& y, const Tensor& h0,
                                    const StepRows& L, bool reverse, bool bf16) {
  if (!bf16) return recurrent_weight_grad(dg_hh, y, h0, L, reverse);
  return recurrent_weight_grad(as_bf16(dg_hh), as_bf16(y), as_bf16(h0), L, reverse);
}

inline Tensor bias_grad(const Tensor& dg) {
  if (small_gemm(dg.numel(), dg)) {
    const int64_t M = dg.size(0), P = dg.size(1);
    Tensor db = zeros_like_shape({P}, dg);
    AT_DISPATCH_FLOATING_TYPES(dg.scalar_type(), "small_bias_grad", [&] {
      const scalar_t* g = dg.data_ptr<scalar_t>();
      scalar_t* out = db.data_ptr<scalar_t>();
      for (int64_t m = 0; m < M; ++m)
        for (int64_t p = 0; p < P; ++p) out[p] += g[m * P + p];
    });
    return db;
  }
  return dg.sum(0);
}

// float16 and bfloat16 on the CPU. Each op, once its checks have passed, calls itself on
// float32 copies of its tensors and rounds the results back (in_float32):
// the weights are converted once per call, the recurrence, its state and the gate math run
// in float32, and only the outputs are rounded, as on CUDA, where these dtypes also
// accumulate and keep the cell state in float32. The workspace of a training forward is
// float32 on every device for these dtypes (workspace_dtype), so it stays as it is. Why
// not half-precision kernels: torch's own half-precision GEMMs on a CPU without native
// bfloat16 arithmetic (AVX2) run several times slower than its float32 ones.
inline bool is_half(const Tensor& x) {
  return x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16;
}
inline Tensor to_float32(const Tensor& t) { return t.to(at::kFloat); }  // float32: t itself
inline std::optional<Tensor> to_float32(const std::optional<Tensor>& t) {
  return t ? std::optional<Tensor>(to_float32(*t)) : std::nullopt;
}
template <typename T>
const T& to_float32(const T& value) { return value; }  // flags and sizes pass through
// An operand of a bfloat16 op that only its GEMMs read where they run in bfloat16 goes to
// the float32 op as it is (keep): x in both directions (the forward's projection_bf16, the
// backward's input_grads), the forward's weights (packed for the bfloat16 GEMMs:
// pack_bf16_weights), the backward's W_ih (input_grads) and the LSTM backward's y (only the
// dW_hh GEMM reads it there). A float32 copy would be made only to be rounded back. Else
// it is made float32 like the rest. The float32 op takes its dtype from h0.
struct GemmInput {
  const Tensor& x;
  bool keep;
};
inline Tensor to_float32(const GemmInput& in) { return in.keep ? in.x : to_float32(in.x); }
// keep, for all of a call's GemmInputs at once: x holds bfloat16 and the setting runs the
// bfloat16 GEMMs (uses_bf16_gemms)
inline bool keeps_bf16(const Tensor& x) {
  return x.scalar_type() == at::kBFloat16 && uses_bf16_gemms();
}
// Whether the float32 op of a bfloat16 layer (bf16_values) runs its GEMMs in bfloat16: where
// x came in bfloat16 (keeps_bf16 decided so as the call began, and its operands suit
// nothing else), or else where the setting says so now (float32 operands suit either), so
// that set_cpu_isa from another thread during a call cannot mismatch the two.
inline bool bf16_gemms_of(bool bf16_values, const Tensor& x) {
  return bf16_values && (x.scalar_type() == at::kBFloat16 || uses_bf16_gemms());
}
// every tensor of `results` in `dtype`, except the one at index `workspace` (-1: none)
template <typename Tuple>
Tuple from_float32(at::ScalarType dtype, Tuple results, int workspace = -1) {
  std::apply([&](auto&... r) {
    int i = 0;
    ((i++ != workspace ? (void)(r = r.to(dtype)) : (void)0), ...);
  }, results);
  return results;
}
// op(args...) on float32 copies of its tensor arguments, the results back in `dtype`
template <typename Op, typename... Args>
auto in_float32(at::ScalarType dtype, int workspace, Op op, const Args&... args) {
  return from_float32(dtype, op(to_float32(args)...), workspace);
}

}  // namespace rnnfast::cpu
