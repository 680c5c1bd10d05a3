// The per-step path's 16-bit forward and bfloat16 backward as one kernel a step each
// (RNNFAST_STEP_FUSED=1; off by default until they have run on a GPU): the step's recurrent
// GEMM and the cell's pointwise update fused, in place of a cuBLAS GEMM and a pointwise
// kernel (the backward: see fused_step_backward).
//
// Why: at N = 256 in bfloat16 the per-step path is bound by the host's two launches a step
// (the H100 runs: 12.5-16 us a step where the step's GEMM takes a few, cuDNN 13.8-17.6),
// while the persistent kernels lose there to their staging of h_{t-1} (BENCHMARKS.md). One
// launch a step halves the host's share; the gate pre-activations stay in fp32 in shared
// memory instead of a round trip through global memory in scalar_t.
//
// Tiling: block (bx, by) owns batch rows [64 bx, 64 bx + 64) and units [U by, U by + U),
// U = 64 / G (LSTM 16, GRU 21, Elman 64): the 64 rows of W_hh that are those units' G
// gates (row g U + j of the tile is W_hh's row g H + u0 + j; rows past G U or past H are
// zero). The tile's gates[n][r] = sum_k h_{t-1}[n][k] W[r][k] run over K = H in stages of
// 64 columns, each staged by cp.async (h_{t-1} from y[t-1] or h0, W from global memory,
// both through L2) into one of 4 buffers (72 KiB of dynamic shared memory), 3 stages in
// flight while a fourth's MMAs run: a block's stages follow each other at the rate of
// the MMAs rather than one L2 round trip each. 8 warps, 2 x 4:
// warp (wm, wn) computes rows 32 wm .. 32 wm + 31 by W rows 16 wn .. 16 wn + 15, two 16 x 16
// output tiles, with ldmatrix and mma.sync m16n8k16 (fp32 sums), as tile_dot_mma lays out
// its fragments. The sums go to shared memory (over the staging buffers, after the last
// stage), and each thread then runs the cell's pointwise update (Cell::load and
// Cell::forward, the persistent kernels' own: y, the training cache, the LSTM's c) for
// items (row, unit) of the tile. Each item is one thread's: the LSTM's c in inference is
// read and written by that thread only; h_{t-1} is the previous launch's output.
// Needs H % 8 == 0 (16-byte vectors that never straddle a row) and 16-byte aligned h0 and
// W_hh (the op passes aligned copies otherwise: aligned16).
#pragma once

#include <string>
#include <type_traits>

#include "persistent.cuh"

namespace rnnfast::cuda {

constexpr int kFusedRows = 64;       // batch rows a block
constexpr int kFusedCols = 64;       // rows of W_hh a block (G * U, padded)
constexpr int kFusedK = 64;          // columns of a stage
constexpr int kFusedLd = kFusedK + 8;  // a staged row: 144 bytes, 8 rows in distinct banks
constexpr int kFusedStages = 4;      // buffers of a stage each (S - 1 stages in flight)

// The dynamic shared memory of both fused kernels: S buffers of each operand's 64 rows.
template <typename scalar_t>
constexpr size_t fused_smem_bytes() {
  return size_t(kFusedStages) * (kFusedRows + kFusedCols) * kFusedLd * sizeof(scalar_t);
}

template <int G>
constexpr int fused_units() {
  return kFusedCols / G;
}

// The tile's sums: acc (each warp's [16-row tile][8-column half][fragment]) of
// sum_k A[r][k] B[c][k] for the tile's 64 rows r and 64 columns c over k < K, A's and B's
// rows staged 64 columns at a time by cp.async (a stage a group; S - 1 stages in flight
// while a fourth's MMAs run), then stored as floats out[64][68] over the staging buffers
// (returned; every thread's sums are there when this returns). src_a(r, k, in) and
// src_b(c, k, in): the address of the 16-byte vector of row r (c) at column k, in set to
// whether it exists (a zero vector otherwise, the address then any valid one).
template <typename scalar_t, typename SrcA, typename SrcB>
__device__ __forceinline__ float (*fused_tile_sums(int K, SrcA src_a, SrcB src_b,
                                                    unsigned char* smem))[kFusedCols + 4] {
  constexpr int S = kFusedStages, kVecs = kFusedK / 8;  // 16-byte vectors a staged row
  using RowsA = scalar_t[kFusedRows][kFusedLd];
  using RowsB = scalar_t[kFusedCols][kFusedLd];
  RowsA* sa = reinterpret_cast<RowsA*>(smem);                      // [S]
  RowsB* sb = reinterpret_cast<RowsB*>(smem + S * sizeof(RowsA));  // [S]
  static_assert(sizeof(float) * kFusedRows * (kFusedCols + 4) <= S * sizeof(RowsA),
                "the sums fit over sa");
  // columns [k0, k0 + 64) of both operands into buffer buf, one committed group
  auto stage = [&](int buf, int k0) {
    for (int e = threadIdx.x; e < (kFusedRows + kFusedCols) * kVecs; e += blockDim.x) {
      const bool w = e >= kFusedRows * kVecs;
      const int ee = w ? e - kFusedRows * kVecs : e;
      const int r = ee / kVecs, c = (ee % kVecs) * 8;
      bool in;
      const scalar_t* src = w ? src_b(r, k0 + c, in) : src_a(r, k0 + c, in);
      cp_async16(w ? &sb[buf][r][c] : &sa[buf][r][c], src, in ? 16 : 0);
    }
    cp_async_commit();
  };

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int wm = warp >> 2, wn = warp & 3;
  float acc[2][2][4] = {};  // [16-row tile][8-column half][fragment]
  const int stages = (K + kFusedK - 1) / kFusedK;
  // S - 1 stages in flight; a group a stage, empty past the last, so that before stage kc's
  // wait S - 1 + kc groups are committed and S - 2 may still be pending
  for (int i = 0; i < S - 1; ++i) {
    if (i < stages) {
      stage(i, i * kFusedK);
    } else {
      cp_async_commit();
    }
  }
  for (int kc = 0; kc < stages; ++kc) {
    cp_async_wait<S - 2>();  // this thread's copies of stage kc
    // every thread's copies of stage kc visible; every warp done with stage kc - 1's buffer,
    // which stage kc + S - 1 now fills
    __syncthreads();
    const int next = kc + S - 1;
    if (next < stages) {
      stage(next % S, next * kFusedK);
    } else {
      cp_async_commit();
    }
    const int buf = kc % S;
#pragma unroll
    for (int ks = 0; ks < kFusedK / 16; ++ks) {
      uint32_t a[2][4], b[4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        ldmatrix_x4(a[mt], &sa[buf][32 * wm + 16 * mt + lane % 16][16 * ks + (lane / 16) * 8]);
      }
      ldmatrix_x4(b, &sb[buf][16 * wn + 8 * (lane / 16) + lane % 8][16 * ks + ((lane / 8) % 2) * 8]);
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        mma_16816<scalar_t>(acc[mt][0], a[mt], b[0], b[1]);
        mma_16816<scalar_t>(acc[mt][1], a[mt], b[2], b[3]);
      }
    }
  }
  cp_async_wait<0>();  // only empty groups are left
  __syncthreads();     // every warp's reads of the stages before the sums overwrite sa

  auto out = reinterpret_cast<float(*)[kFusedCols + 4]>(smem);
  const int row = lane / 4, col = 2 * (lane % 4);
#pragma unroll
  for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float* top = &out[32 * wm + 16 * mt + row][16 * wn + 8 * h + col];
      float* bottom = &out[32 * wm + 16 * mt + row + 8][16 * wn + 8 * h + col];
      top[0] = acc[mt][h][0], top[1] = acc[mt][h][1];
      bottom[0] = acc[mt][h][2], bottom[1] = acc[mt][h][3];
    }
  }
  __syncthreads();
  return out;
}

template <typename Cell, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(256)
    fused_step_forward(const PersistentParams<scalar_t, acc_t> p, int64_t s) {
  static_assert(sizeof(scalar_t) == 2, "the fused step runs on tensor cores: 16-bit only");
  constexpr int G = Cell::kGates, U = fused_units<G>();
  extern __shared__ __align__(128) unsigned char smem[];
  const int64_t N = p.N, H = p.H;
  const int K = static_cast<int>(H);
  const int64_t n0 = int64_t(blockIdx.x) * kFusedRows, u0 = int64_t(blockIdx.y) * U;
  const int64_t t = time_index(s, p.T, p.reverse), tp = time_index(s - 1, p.T, p.reverse);
  const scalar_t* h_prev = s == 0 ? p.h0 : p.y + tp * N * H;
  // A: h_{t-1}'s rows n0 + r; B: W_hh's rows of the block's gates; zeros past N, G U, H, K
  auto out = fused_tile_sums<scalar_t>(
      K,
      [&](int r, int k, bool& in) {
        in = n0 + r < N && k < K;
        return in ? h_prev + (n0 + r) * H + k : h_prev;
      },
      [&](int r, int k, bool& in) {
        const int g = r / U, j = r % U;
        in = g < G && u0 + j < H && k < K;
        return in ? p.w_hh + (g * H + u0 + j) * H + k : p.w_hh;
      },
      smem);
  for (int idx = threadIdx.x; idx < kFusedRows * U; idx += blockDim.x) {
    const int nl = idx / U, j = idx % U;
    const int64_t n = n0 + nl, u = u0 + j;
    if (n >= N || u >= H) continue;
    acc_t hh[G], in[Cell::kLoads];
#pragma unroll
    for (int g = 0; g < G; ++g) hh[g] = out[nl][g * U + j];
    Cell::load(p, s, t, tp, n, u, in);
    const acc_t hp = Cell::kNeedsHPrev ? acc_t(h_prev[n * H + u]) : acc_t(0);
    Cell::forward(p, s, t, tp, n, u, hh, hp, in);
  }
}

// The bfloat16 backward, launch s of T + 1 (s = T, T - 1, ..., 0), block (bx, by): batch rows
// [64 bx, ...) by units [64 by, ...). For s < T, the dh GEMM of step s: dh_{t-1}[n][u] =
// sum_q dg_t[n][q] W_hh[q][u] (q < G H: A = step s's gate gradients in bfloat16, p.dg16's
// buffer s & 1, written by the launch before; B = W_hh^T's rows u, p.w_hh pointing at
// W_hh^T [H, G H] here), into p.dh (added to the direct term where Cell::kDirectDh, as the
// persistent backward's phase B); for s >= 1, the pointwise backward of step s - 1 for the
// same items (the persistent backward's phase A: Cell::load_backward and Cell::backward,
// which read that dh and write dg_ih, dg_hh, the LSTM's dc and the GRU's direct term), its
// gate gradients also rounded into p.dg16's buffer (s - 1) & 1 for the next launch. One
// launch a step in place of the pointwise kernel and the cuBLAS GEMM; the same numbers as
// the per-step path's bfloat16 backward (bfloat16 operands, fp32 sums), in another order.
template <typename Cell, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(256)
    fused_step_backward(const PersistentParams<scalar_t, acc_t> p, int64_t s) {
  static_assert(sizeof(scalar_t) == 2, "the fused step runs on tensor cores: 16-bit only");
  constexpr int G = Cell::kGates;
  extern __shared__ __align__(128) unsigned char smem[];
  const int64_t N = p.N, H = p.H;
  const int K = static_cast<int>(G * H);
  const int64_t n0 = int64_t(blockIdx.x) * kFusedRows, u0 = int64_t(blockIdx.y) * kFusedCols;
  float(*out)[kFusedCols + 4] = nullptr;
  if (s < p.T) {
    const scalar_t* dg = p.dg16 + (s & 1) * N * K;
    out = fused_tile_sums<scalar_t>(
        K,
        [&](int r, int k, bool& in) {
          in = n0 + r < N && k < K;
          return in ? dg + (n0 + r) * K + k : dg;
        },
        [&](int r, int k, bool& in) {
          in = u0 + r < H && k < K;
          return in ? p.w_hh + (u0 + r) * K + k : p.w_hh;
        },
        smem);
  }
  const int64_t sa = s - 1;  // the step whose pointwise backward follows
  const int64_t ta = time_index(sa, p.T, p.reverse), tpa = time_index(sa - 1, p.T, p.reverse);
  scalar_t* dg_next = p.dg16 + (sa & 1) * N * K;
  for (int idx = threadIdx.x; idx < kFusedRows * kFusedCols; idx += blockDim.x) {
    const int nl = idx / kFusedCols, j = idx % kFusedCols;
    const int64_t n = n0 + nl, u = u0 + j;
    if (n >= N || u >= H) continue;
    if (s < p.T) {
      acc_t* dh = p.dh + n * H + u;
      const acc_t v = out[nl][j];
      *dh = Cell::kDirectDh ? *dh + v : v;
    }
    if (s >= 1) {
      acc_t in[Cell::kBackwardLoads], dgh[G];
      Cell::load_backward(p, sa, ta, tpa, n, u, in);
      Cell::backward(p, sa, ta, tpa, n, u, in, dgh);
#pragma unroll
      for (int g = 0; g < G; ++g) dg_next[n * K + g * H + u] = scalar_t(dgh[g]);
    }
  }
}

// RNNFAST_STEP_FUSED: "1" runs the per-step path's 16-bit forward as fused_step_forward
// and its bfloat16 backward as fused_step_backward where they apply (fused_step_applies,
// fused_backward_applies); unset or "0": the cuBLAS GEMMs and the pointwise kernels. Off:
// correct on the H100 (sixth run), but slower there than what auto picks at every shape
// measured (BENCHMARKS.md).
// Whether the per-step forward of this layer runs fused: asked (RNNFAST_STEP_FUSED=1),
// 16-bit, H a multiple of 8. A bad knob value sets why (the op raises it) and returns false.
template <typename scalar_t>
bool fused_step_applies(int64_t H, std::string& why) {
  return zero_one_knob("RNNFAST_STEP_FUSED", why) && sizeof(scalar_t) == 2 && H % 8 == 0;
}

// t itself where its data is 16-byte aligned (cp.async's vectors), else an aligned copy: h0
// and W_hh, which may be views at any offset into their storage (y is a fresh allocation)
inline at::Tensor aligned16(const at::Tensor& t) {
  return (reinterpret_cast<uintptr_t>(t.data_ptr()) & 15) == 0 ? t : t.clone();
}

// The launches kernel(p, s) for s = first, ..., last (counting up or down) on the current
// stream, with the fused kernels' shared memory and blocks of 64 batch rows by `units`, and
// notes that they ran (rnnfast::note_step_variant; `backward`: the backward's kernel).
// Returns "" or the CUDA error of the shared-memory attribute, which the op raises after its
// dispatch (as a refusal).
template <typename scalar_t, typename acc_t>
std::string launch_fused(void (*kernel)(PersistentParams<scalar_t, acc_t>, int64_t),
                         const PersistentParams<scalar_t, acc_t>& p, int64_t units,
                         int64_t first, int64_t last, bool backward, cudaStream_t stream) {
  std::string why;
  constexpr size_t smem = fused_smem_bytes<scalar_t>();
  if (!cuda_ok(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(smem)),
               "cudaFuncSetAttribute (the fused step's shared memory)", why)) {
    return why;
  }
  const dim3 grid(static_cast<unsigned>((p.N + kFusedRows - 1) / kFusedRows),
                  static_cast<unsigned>((p.H + units - 1) / units));
  const int64_t dir = first <= last ? 1 : -1;
  for (int64_t s = first; s != last + dir; s += dir) {
    kernel<<<grid, 256, smem, stream>>>(p, s);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  note_step_variant(backward, StepVariant::kFused);
  return why;
}

// The T launches of the fused forward (p as the persistent forward's; p.h0 and p.w_hh
// 16-byte aligned: see aligned16).
template <typename Cell, typename scalar_t, typename acc_t>
std::string run_fused_steps(const PersistentParams<scalar_t, acc_t>& p, cudaStream_t stream) {
  if constexpr (sizeof(scalar_t) == 2) {
    return launch_fused<scalar_t, acc_t>(&fused_step_forward<Cell, scalar_t, acc_t>, p,
                                         fused_units<Cell::kGates>(), 0, p.T - 1, false, stream);
  }
  return "";
}

// Whether the per-step backward of this layer runs fused (fused_step_backward): as the
// forward (fused_step_applies), in bfloat16 only (float16's dh GEMM runs in float32, whose
// range its gate gradients need: see StepGemm::dg16).
template <typename scalar_t>
bool fused_backward_applies(int64_t H, std::string& why) {
  const bool asked = fused_step_applies<scalar_t>(H, why);
  return asked && std::is_same_v<scalar_t, c10::BFloat16>;
}

// The T + 1 launches of the fused backward (s = T, ..., 0). p as the persistent backward's;
// W_hh^T [H, G H] (contiguous, 16-byte aligned) and the gate gradients' two buffers
// [2, N, G H] are made here (p.w_hh and p.dg16 then point at them); p.dh holds dh_T on
// entry, dh_0 on return.
template <typename Cell, typename scalar_t, typename acc_t>
std::string run_fused_backward(PersistentParams<scalar_t, acc_t> p, const at::Tensor& w_hh,
                               cudaStream_t stream) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    const at::Tensor w_t = aligned16(w_hh.t().contiguous());  // a fresh copy
    const at::Tensor dg16 = at::empty({2, p.N, Cell::kGates * p.H}, w_hh.options());
    p.w_hh = w_t.data_ptr<scalar_t>(), p.dg16 = dg16.data_ptr<scalar_t>();
    return launch_fused<scalar_t, acc_t>(&fused_step_backward<Cell, scalar_t, acc_t>, p,
                                         kFusedCols, p.T, 0, true, stream);
  }
  return "";
}


}  // namespace rnnfast::cuda
