// Persistent (weight-stationary) kernels: one launch runs a whole layer and direction,
// forward or backward, with W_hh held in shared memory for every step.
//
// Why: the per-step path (common.cuh) launches a GEMM and a pointwise kernel per step and
// reads W_hh from memory each time; at small N that costs ~15 us a step whatever the
// size. Here the steps are separated only by a barrier.
//
// Two variants of each kernel (template parameter kCluster):
//   grid variant (`persistent`): one cooperative launch of B <= SMs blocks sharing W_hh
//     and every batch row; a step ends with a grid-wide barrier (global memory), and
//     each block stages the step's input (h_{t-1}, or the backward's gate gradients) from
//     L2. The first H100 run measured its floor at ~3.5 us a step.
//   cluster variant (`cluster`, compute capability 9.0 on): clusters of C <= 16 blocks,
//     each cluster holding all of W_hh and N_c rows of the batch (batch rows are
//     independent, so clusters never wait on each other, and more clusters than fit
//     simply take turns). A block stores each value it makes (h_t; the backward's dg_hh)
//     straight into the shared memory of every block of its cluster (distributed shared
//     memory), into the "turn" of xs that the next step reads; a step ends with the
//     cluster barrier (barrier.cluster arrive.release / wait.acquire), so nothing is
//     staged and no global atomics are involved. Two turns (xs[2][round_up(N_c, NT)][ld])
//     make one barrier a step enough: step s reads turn s & 1 and fills turn (s + 1) & 1,
//     and a block can only fill a turn again after every block of the cluster passed the
//     barrier that follows their last reads of it. Padding rows and columns of both turns
//     are zeroed once. It fits where W_hh's slices fit in a cluster (16 SMs: ~3.5 MiB);
//     it pays where the grid barrier's floor dominates (small H or N).
//
// Tiling (G gates, U units per block, B = ceil(H / U) blocks per group; a group is the
// grid (all N rows) or a cluster (its N_c rows)):
//   Block of rank b in its group owns the hidden units [u0, u0 + U), u0 = b * U (the last
//   may own fewer).
//   The grid variant with several row tiles and room for two tiles of xs (xs_tiles = 2)
//   stages tile i + 1 by cp.async (stage_rows_async, through L2)
//   into the other tile of xs while tile i's dot product and pointwise update run: the
//   staging's round trip overlaps that work instead of preceding the next tile's.
//   forward : Ws[g * U + j][k] = W_hh[g * H + u0 + j][k]     R = G * U rows, K = H.
//             Per step and per tile of NT batch rows: h_{t-1} of the tile's rows in
//             shared memory (grid: staged from y; cluster: already there); gates[n][r] =
//             sum_k h[n][k] Ws[r][k] in acc_t; the cell's pointwise update of the block's
//             units writes y[t] (and the cache). Its other inputs (Cell::load: the input
//             projection, GRU's b_hh, the LSTM's c) are loaded for each thread's first
//             item of step s + 1 between the arrival and the wait of the barrier that
//             ends step s, and where the input projection outgrows L2 (long T: it
//             comes from DRAM) step s + 2's is prefetched into L2 (prefetch_xp).
//   backward: Ws[j][q] = W_hh[q][u0 + j]                     R = U rows, K = G * H.
//             Per step, phase A: the cell's pointwise backward of the block's units writes
//             the gate gradients dg[t] (cluster: and stores dg_hh into every block's
//             turn); barrier; phase B, per tile of NT rows: dg_hh[t][n0 : n0 + NT, :]
//             (grid: staged; cluster: there); dh_{t-1}[n][u0 + j] = sum_q dg[n][q] Ws[j][q].
//             A unit's dh and dc are only touched by its own block, so no barrier sits
//             between phase B and the next step's phase A: one barrier per step.
//   The input projection (before) and dx, dW_ih, dW_hh, db (after) stay whole-sequence
//   GEMMs, and the workspace layout is the per-step path's, so any forward path pairs
//   with any backward path.
//
// Dot products, in a fixed order (results are bitwise deterministic):
//   tile_dot (FFMA in acc_t; float32/float64, and every backward): warp w takes the rows in
//   chunks of RPW; lane l takes the groups of 4 consecutive k (K zero-padded to a multiple
//   of 4) g = l, l + 32, ..., each row's 4 values loaded as one vector (LDS.128 in float:
//   scalar loads cost an LDS and an address IMAD per element, which left the H100 run's
//   FFMA at ~40%), the next group's rows of W loaded while this group's FMAs run; each lane
//   holds NT x RPW partial sums, and a halving exchange across the lanes
//   (warp_split_reduce) leaves each lane NT * RPW / 32 finished sums. Tiles (NT, RPW):
//   (16, 8) for N > 4 with float sums where 8 rows a warp pad no more than 4 would (24
//   vector loads per 512 FMAs), else (16, 4), then in the backward (8, 8) where 16
//   staged rows do not fit; (4, 8) for N <= 4 and where nothing else fits. The cluster
//   variant tries each of those tiles (and (8, 8) in the forward too) and keeps the one the
//   cost model prefers, as its rows per cluster depend on the tile.
//   tile_dot_mma (tensor cores; the float16/bfloat16 forward, NT = 16, in the grid variant
//   64 or 32 where the batch has more than 32 or 16 rows, RNNFAST_MMA_ROWS capping it):
//   ldmatrix and
//   mma.sync m16n8k16 with fp32 sums, 16 x 16 tiles; the (NT / 16) x (r_pad / 16) output
//   tiles are shared out to the warps, each tile's k range split over several warps whose
//   partial tiles are then summed. K is zero-padded to a multiple of 16.
//   The register tile (persistent_forward_reg; the grid variant's 16-bit forward at N <= 16,
//   RNNFAST_REG_TILE=0 turning it off): W's slice held in registers as mma.sync
//   fragments and h_{t-1} loaded from L2 straight into fragments, no staging; see its
//   section below.
//
// Barrier protocol of the grid variant (grid_arrive + grid_wait, sync.cuh): a 64-bit
//   counter per launch, zeroed before it. At its k-th barrier every block adds 1 and waits
//   until the counter reaches k * B; the counter only grows, so nothing is reset between
//   steps. __syncthreads, then thread 0's fence.acq_rel.gpu before its add
//   (red.relaxed.gpu: no value comes back, so its wait starts at once) make the arrival a
//   release of the block's writes; thread 0 waits with ld.acquire.gpu, and a second
//   __syncthreads orders every later read of the block after that acquire (the pattern of
//   CUTLASS's GenericBarrier). The loads ahead (the next step's inputs that no other block
//   writes) go between the arrival and the wait, as the fence would otherwise wait for
//   them. Data that another block wrote is read with ld.global.cg (L2), never from a stale
//   L1 line. All B blocks are co-resident: the launch is cooperative (it fails rather than
//   deadlocks otherwise) and B was checked against the occupancy query.
// The cluster variant's barrier (cluster_sync) is the hardware's: every thread of the
//   cluster arrives with release semantics and waits with acquire semantics at cluster
//   scope, which orders the stores into peers' shared memory. A cluster's blocks are
//   co-scheduled by the launch (cudaLaunchKernelEx with a cluster dimension); one more
//   cluster_sync before the loop (every block started and zeroed its turns before any
//   store into them) and one after it (no block leaves while a peer may address its
//   shared memory).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdlib>
#include <limits>
#include <map>
#include <mutex>
#include <tuple>
#include <string>
#include <type_traits>

#include "common.cuh"
#include "sync.cuh"

namespace rnnfast::cuda {

constexpr int kPersistentThreads = 256;

// Everything a persistent kernel reads or writes; filled once by the op, passed by value.
// Pointers a cell does not use are null. Shapes: xp [T, N, G*H] (the input projection,
// with both biases except GRU's b_hh), w_hh [G*H, H], h0 [N, H], y [T, N, H], cache
// [T, N, width] (training), dy [T, N, H], dh/dc [N, H], dg_ih/dg_hh [T, N, G*H].
template <typename scalar_t, typename acc_t>
struct PersistentParams {
  int64_t T, N, H;
  int units;  // U
  int64_t group_rows;  // the cluster variant: batch rows per cluster (N_c); else N
  bool reverse;
  int activation;  // Elman: 0 tanh, 1 relu, 2 identity
  const scalar_t* xp;
  const scalar_t* w_hh;
  const scalar_t* b_hh;  // GRU's hidden bias (b_hn sits inside r * (...)), or null
  const scalar_t* h0;
  const acc_t* c0;  // LSTM
  scalar_t* y;
  acc_t* cache;    // training forward: the per-step path's workspace; else null
  acc_t* c_state;  // LSTM inference: c, updated in place
  const scalar_t* dy;
  acc_t* dh;  // backward: dh_t carried between steps; dh0 at the end
  acc_t* dc;  // LSTM backward: dc_t likewise
  acc_t* dg_ih;
  acc_t* dg_hh;  // the gradients phase B multiplies by W_hh (== dg_ih but for GRU)
  unsigned long long* barrier;  // the grid variant's counter
  bool prefetch_xp;  // the forward: xp outgrows L2, prefetch a later step's (prefetch_xp)
  // the grid variant: tiles of NT rows in xs; 2: later tiles staged by cp.async during the
  // earlier ones' work (stage_rows_async)
  int xs_tiles = 1;
  // the per-step path's fused bfloat16 backward (fused_step.cuh): two buffers [2, N, G*H] of
  // the gate gradients in scalar_t, the dh GEMM's operand; else null
  scalar_t* dg16 = nullptr;
  // the cluster variant's async exchange (RNNFAST_CLUSTER_EXCHANGE=async, where the values
  // exchanged are 4 or 8 bytes: cluster_async_ok): st.async into the peers' turns and a
  // wait on this block's mbarrier, in place of generic stores and the cluster barrier
  bool async_exchange = false;
  // a trace of this launch's first trace_steps steps by its first trace_blocks blocks
  // (StepTrace, rnnfast._ops._trace_next), or null
  long long* trace = nullptr;
  int trace_steps = 0, trace_blocks = 0;
  // the register tile's range wait (RNNFAST_REG_WAIT=range): a counter per warp's k range
  // of h (kPersistentThreads / 32 of them, kRangeStride apart, zeroed before the launch), or null: the grid
  // barrier
  unsigned long long* range_counters = nullptr;
};

// The trace of one persistent launch (rnnfast._ops._trace_next, scripts/trace_persistent.py):
// where a step's time goes, measured inside the kernel. Thread 0 of each block records
// clock64() at kTraceMarks points of each step (SM cycles: comparable inside a block,
// not across SMs), and block 0 the global timer and clock64() at its start and end (so
// that cycles convert to nanoseconds at the launch's own clock). Layout (int64):
// [0] global ns, [1] clock at block 0's start, [2] global ns, [3] clock at its end, then
// [block][step][mark] for blocks < trace_blocks and steps s < trace_steps (counted in the
// kernel's loop order: the backward's first is step T - 1). The marks, forward: 0 the step
// starts, 1 h_{t-1} is in place (staged, or in registers; the cluster variant's is there
// already), 2 the dot product is done, 3 the pointwise update is done, 4 the arrival is
// done, 5 the loads ahead are issued (the wait starts), 6 the wait is over. Backward: 0 the
// step starts, 1 phase A is done, 2 the arrival, 3 the wait starts, 4 the wait is over,
// 5 phase B's input is in place, 6 phase B is done. With several row tiles, marks 1 and 2
// are the first tile's; a step without a barrier (the last) repeats its last mark. Slot 7
// of a step is the global timer (ns) at the arrival (mark 4 forward, 2 backward; the last
// forward step: its end), comparable across blocks: the spread of the blocks' arrivals;
// slot 8 the SM the block ran on at the step's start (%smid: a block preempted and resumed
// elsewhere changes it, and its clocks are then another SM's). Off (null) it costs a test
// a step in thread 0.
__device__ __forceinline__ long long global_ns() {
  unsigned long long v;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(v));
  return static_cast<long long>(v);
}
constexpr int kTraceClocks = 7;  // a step's clock marks
// a step's slots: the clock marks, the arrival's global ns, the SM
constexpr int kTraceMarks = kTraceClocks + 2;
constexpr int kTraceHeader = 4;
// the most int64 slots of a trace (128 MiB): a request for more steps gets fewer
constexpr int64_t kTraceMaxSlots = int64_t(1) << 24;
struct StepTrace {
  long long* row;
  __device__ __forceinline__ void mark(int m) const {
    if (row != nullptr) row[m] = clock64();
  }
  // mark 0, and the SM into slot 8
  __device__ __forceinline__ void start() const {
    if (row != nullptr) {
      unsigned sm;
      asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
      row[kTraceClocks + 1] = sm;
      row[0] = clock64();
    }
  }
  // mark m, and the global timer into slot 7
  __device__ __forceinline__ void arrived(int m) const {
    if (row != nullptr) {
      row[m] = clock64();
      row[kTraceClocks] = global_ns();
    }
  }
  // from mark m on, every mark at the same time (a step that ends early), and slot 7
  __device__ __forceinline__ void rest(int m) const {
    if (row != nullptr) {
      const long long c = clock64();
      for (int i = m; i < kTraceClocks; ++i) row[i] = c;
      row[kTraceClocks] = global_ns();
    }
  }
};
template <typename Params>
__device__ __forceinline__ StepTrace step_trace(const Params& p, int64_t step_count) {
  StepTrace tr{nullptr};
  if (p.trace != nullptr && threadIdx.x == 0 && step_count < p.trace_steps &&
      int(blockIdx.x) < p.trace_blocks) {
    tr.row = p.trace + kTraceHeader +
             (int64_t(blockIdx.x) * p.trace_steps + step_count) * kTraceMarks;
  }
  return tr;
}
// block 0's start (end = false) or end of the launch
template <typename Params>
__device__ __forceinline__ void trace_launch(const Params& p, bool end) {
  if (p.trace != nullptr && blockIdx.x == 0 && threadIdx.x == 0) {
    p.trace[end ? 2 : 0] = global_ns();
    p.trace[end ? 3 : 1] = clock64();
  }
}

// The cluster kernels' static shared memory: the async exchange's two mbarriers (a turn
// each), beside the dynamic shared memory the planner sizes; ptxas reports 128 bytes (the
// dynamic shared memory starts 128-byte aligned after them).
constexpr size_t kClusterStaticSmem = 128;

// Whether the async exchange can carry the values the cluster variant exchanges: h_t in
// scalar_t (the forward), the gate gradients in acc_t (the backward); st.async stores 4
// or 8 bytes.
template <typename scalar_t, typename acc_t, bool kBackward>
constexpr bool cluster_async_ok() {
  return kBackward || sizeof(scalar_t) == 4 || sizeof(scalar_t) == 8;
}

__host__ __device__ constexpr int round_up(int v, int m) { return (v + m - 1) / m * m; }

// ld.global.cg: read through L2, for data another block wrote during this launch.
__device__ __forceinline__ float load_cg(const float* p) { return __ldcg(p); }
__device__ __forceinline__ double load_cg(const double* p) { return __ldcg(p); }
__device__ __forceinline__ c10::Half load_cg(const c10::Half* p) {
  return c10::Half(__ldcg(reinterpret_cast<const unsigned short*>(p)), c10::Half::from_bits());
}
__device__ __forceinline__ c10::BFloat16 load_cg(const c10::BFloat16* p) {
  return c10::BFloat16(__ldcg(reinterpret_cast<const unsigned short*>(p)),
                       c10::BFloat16::from_bits());
}

// Sums v[M] (M = 2^m >= 32) over the warp's 32 lanes in five stages: at the stage that
// keeps HALF values (M/2, M/4, ..., M/32; xor distance HALF * 32 / M) each lane keeps one
// half of its values, adds the partner's copy of that half and hands over the other.
// Afterwards lane l holds the totals of indices l * M/32 + [0, M/32) in v[0 .. M/32).
// (A template per stage keeps every index a constant, so v stays in registers.)
template <int M, int HALF, typename acc_t>
__device__ __forceinline__ void warp_split_stage(acc_t (&v)[M], int lane) {
  constexpr int kDist = HALF * 32 / M;
  const bool upper = (lane & kDist) != 0;
#pragma unroll
  for (int i = 0; i < HALF; ++i) {
    const acc_t send = upper ? v[i] : v[i + HALF];
    const acc_t keep = upper ? v[i + HALF] : v[i];
    v[i] = keep + __shfl_xor_sync(0xffffffffu, send, kDist);
  }
  if constexpr (HALF > M / 32) warp_split_stage<M, HALF / 2>(v, lane);
}

template <int M, typename acc_t>
__device__ __forceinline__ void warp_split_reduce(acc_t (&v)[M], int lane) {
  static_assert(M >= 32 && (M & (M - 1)) == 0, "M must be a power of two >= 32");
  warp_split_stage<M, M / 2>(v, lane);
}

// The warps over one k range each of a row chunk, when the chunks are fewer than the warps.
__host__ __device__ inline int ffma_splits(int chunks, int warps) {
  return chunks >= warps ? 1 : warps / chunks;
}

// Elements of tile_dot's scratch (acc_t) for NT rows and r_pad rows of ws.
template <int NT, int RPW>
__host__ __device__ inline int ffma_scratch(int r_pad) {
  const int splits = ffma_splits(r_pad / RPW, kPersistentThreads / 32);
  return splits == 1 ? 0 : splits * NT * r_pad;
}

// The FFMA dot product's operand rows: K columns zero-padded to ffma_ld(K), a multiple of
// kFfmaVec, so that each lane loads kFfmaVec consecutive k of a row at once (float: one
// 16-byte LDS.128 where scalar loads took an LDS and an address IMAD per element).
constexpr int kFfmaVec = 4;
__host__ __device__ inline int ffma_ld(int K) { return round_up(K, kFfmaVec); }

// V consecutive elements, loaded from shared memory as one vector.
template <typename T, int V>
struct alignas(V * sizeof(T)) FfmaVec {
  T v[V];
};
template <int V, typename T>
__device__ __forceinline__ FfmaVec<T, V> load_vec(const T* p) {
  return *reinterpret_cast<const FfmaVec<T, V>*>(p);
}

// out[n][r] = sum_k xs[n][k] ws[r][k] for n < NT, r < r_pad (a multiple of RPW; padded
// rows of ws are zero); xs [NT, ld], ws [r_pad, ld] with ld = ffma_ld(K) (columns K..ld
// zero in both), out [NT, r_pad] and scratch (ffma_scratch elements), all in shared
// memory, rows aligned to whole vectors. Jobs: each chunk of RPW rows, split into `splits`
// ranges of k when there are fewer chunks than warps (small H); the ranges' partial sums
// meet in scratch and are added in a fixed order. Within a job, lane l takes the k groups
// [V * g, V * (g + 1)) for g = l, l + 32, ... (V = kFfmaVec, 2 for double sums): per group
// it loads its RPW rows of ws as vectors (those of the next group already in flight:
// software pipelining, as 8 warps an SM hide little of the loads' latency), then each row
// n of xs as one vector and makes NT * RPW * V FMAs. (No prefetch where registers do not
// allow it.)
template <int NT, int RPW, typename w_t, typename x_t, typename acc_t>
__device__ __forceinline__ void tile_dot(const w_t* __restrict__ ws, int r_pad,
                                         const x_t* __restrict__ xs, int ld,
                                         acc_t* __restrict__ out, acc_t* __restrict__ scratch) {
  // double sums take vectors of 2 (16 bytes): RPW rows of 4 doubles beside 64 double sums
  // spilled
  constexpr int M = NT * RPW, kPerLane = M / 32, V = sizeof(acc_t) == 8 ? 2 : kFfmaVec;
  // the next group's rows of ws in flight where the sums and both groups' rows take at most
  // 192 of the 255 registers (all tiles as built; with vectors of 4 doubles the (8, 8)
  // tile's 256 spilled)
  constexpr bool kPrefetch = (M * sizeof(acc_t) + 2 * RPW * V * sizeof(w_t)) / 4 <= 192;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int chunks = r_pad / RPW, splits = ffma_splits(chunks, warps), groups = ld / V;
  for (int job = warp; job < chunks * splits; job += warps) {
    const int r0 = (job / splits) * RPW, sp = job % splits;
    const int g_end = (sp + 1) * groups / splits;
    const w_t* wrow = ws + r0 * ld;
    acc_t acc[M];
#pragma unroll
    for (int i = 0; i < M; ++i) acc[i] = acc_t(0);
    int g = sp * groups / splits + lane;
    FfmaVec<w_t, V> w[RPW];
    if (kPrefetch && g < g_end) {
#pragma unroll
      for (int i = 0; i < RPW; ++i) w[i] = load_vec<V>(wrow + i * ld + g * V);
    }
    for (; g < g_end; g += 32) {
      // the next group's rows of ws (the last group's again where there is none: in bounds,
      // no branch); without room for them, this group's rows now
      const int gn = !kPrefetch ? g : g + 32 < g_end ? g + 32 : g;
      FfmaVec<w_t, V> wn[RPW];
#pragma unroll
      for (int i = 0; i < RPW; ++i) wn[i] = load_vec<V>(wrow + i * ld + gn * V);
      if constexpr (!kPrefetch) {
#pragma unroll
        for (int i = 0; i < RPW; ++i) w[i] = wn[i];
      }
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        const FfmaVec<x_t, V> xv = load_vec<V>(xs + n * ld + g * V);
#pragma unroll
        for (int e = 0; e < V; ++e) {
          const acc_t x = acc_t(xv.v[e]);
#pragma unroll
          for (int i = 0; i < RPW; ++i) acc[n * RPW + i] += x * acc_t(w[i].v[e]);
        }
      }
      if constexpr (kPrefetch) {
#pragma unroll
        for (int i = 0; i < RPW; ++i) w[i] = wn[i];
      }
    }
    warp_split_reduce<M>(acc, lane);
    acc_t* dst = splits == 1 ? out : scratch + sp * NT * r_pad;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      const int idx = lane * kPerLane + j;
      dst[(idx / RPW) * r_pad + r0 + idx % RPW] = acc[j];
    }
  }
  if (splits > 1) {
    __syncthreads();
    for (int idx = threadIdx.x; idx < NT * r_pad; idx += blockDim.x) {
      acc_t v = scratch[idx];
      for (int sp = 1; sp < splits; ++sp) v += scratch[sp * NT * r_pad + idx];
      out[idx] = v;
    }
  }
}

// xs[nl][k] = src[n0 + nl][k] for the NT rows of a tile, zero past N and for K <= k < ld;
// src [N, K], xs [NT, ld]. Element e of xs (or 16-byte vector e, where K and ld hold whole
// vectors and src is 16-byte aligned) is thread e % blockDim's, as e runs over [0, NT * ld)
// (vectors: [0, NT * ld / V)). Each thread issues its next kStageBatch loads before it
// stores any, so their L2 round trips overlap: one load-store pair at a time pays a round
// trip per element, which on the H100 was most of a step from N = 16 on (N = 64, H = 768:
// 48 round trips a tile, 4 tiles).
constexpr int kStageBatch = 8;
template <int NT, typename x_t>
__device__ __forceinline__ void stage_rows(const x_t* src, int64_t n0, int64_t N, int K, int ld,
                                           x_t* __restrict__ xs) {
  constexpr int V = 16 / sizeof(x_t);
  const int rows = static_cast<int>(N - n0 < NT ? N - n0 : NT);  // rows of src in the tile
  const x_t* base = src + n0 * K;
  if (K % V == 0 && ld % V == 0 && (reinterpret_cast<uintptr_t>(base) & 15) == 0) {
    const int per_row = ld / V, loaded = K / V, total = NT * per_row;
    const uint4* vsrc = reinterpret_cast<const uint4*>(base);
    uint4* vxs = reinterpret_cast<uint4*>(xs);
    for (int e0 = threadIdx.x; e0 < total; e0 += kStageBatch * blockDim.x) {
      uint4 v[kStageBatch];
#pragma unroll
      for (int i = 0; i < kStageBatch; ++i) {
        const int e = e0 + i * blockDim.x, nl = e / per_row, c = e - nl * per_row;
        v[i] = e < total && nl < rows && c < loaded ? __ldcg(vsrc + nl * loaded + c)
                                                    : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
      for (int i = 0; i < kStageBatch; ++i) {
        const int e = e0 + i * blockDim.x;
        if (e < total) vxs[e] = v[i];
      }
    }
  } else {
    const int total = NT * ld;
    for (int e0 = threadIdx.x; e0 < total; e0 += kStageBatch * blockDim.x) {
      x_t v[kStageBatch];
#pragma unroll
      for (int i = 0; i < kStageBatch; ++i) {
        const int e = e0 + i * blockDim.x, nl = e / ld, k = e - nl * ld;
        v[i] = e < total && nl < rows && k < K ? load_cg(base + nl * K + k) : x_t(0);
      }
#pragma unroll
      for (int i = 0; i < kStageBatch; ++i) {
        const int e = e0 + i * blockDim.x;
        if (e < total) xs[e] = v[i];
      }
    }
  }
}

// cp.async (compute capability 8.0 on, as are ldmatrix and mma.sync): 16 bytes from global
// to shared memory through L2 only (.cg: never a stale L1 line of another block's data),
// src_bytes of them read and the rest zero-filled; committed as a group, waited for with
// cp_async_wait<n> (all but the n groups committed last), then __syncthreads makes the
// copies visible to every thread.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(
                   static_cast<unsigned>(__cvta_generic_to_shared(smem))),
               "l"(__cvta_generic_to_global(gmem)), "r"(src_bytes)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;" ::: "memory");
}
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(kPending) : "memory");
}

// Whether stage_rows_async can stage rows of src: whole 16-byte vectors in K and ld, src
// 16-byte aligned (y and dg are; h0, a view, may not be).
template <typename x_t>
__device__ __forceinline__ bool async_rows_ok(const x_t* src, int K, int ld) {
  constexpr int V = 16 / sizeof(x_t);
  return K % V == 0 && ld % V == 0 && (reinterpret_cast<uintptr_t>(src) & 15) == 0;
}

// stage_rows' vector path as cp.async, one committed group: vector e of xs is thread
// e % blockDim's; rows past N and columns K..ld zero-filled. The copies run while the
// thread goes on: the grid variant issues tile i + 1's before tile i's dot product, into
// the other of two tiles of xs (PersistentParams::xs_tiles), so that its L2 round trip
// overlaps tile i's work instead of following it.
template <int NT, typename x_t>
__device__ __forceinline__ void stage_rows_async(const x_t* src, int64_t n0, int64_t N, int K,
                                                 int ld, x_t* __restrict__ xs) {
  constexpr int V = 16 / sizeof(x_t);
  const int rows = static_cast<int>(N - n0 < NT ? N - n0 : NT);
  const int per_row = ld / V, loaded = K / V, total = NT * per_row;
  const uint4* vsrc = reinterpret_cast<const uint4*>(src + n0 * K);
  uint4* vxs = reinterpret_cast<uint4*>(xs);
  for (int e = threadIdx.x; e < total; e += blockDim.x) {
    const int nl = e / per_row, c = e - nl * per_row;
    const bool in = nl < rows && c < loaded;
    cp_async16(vxs + e, in ? vsrc + nl * loaded + c : vsrc, in ? 16 : 0);
  }
  cp_async_commit();
}

// prefetch.global.L2 of the lines of xp[t][n][g * H + u0, g * H + u0 + here) for the
// group's rows n and every gate g (xp [T, N, G * H], every cell's layout): a later step's
// input projection, which at long T comes from DRAM (larger than L2, and written before
// the launch from its first step on), in L2 by the time the loads ahead ask for it (the
// forward prefetches step s + 2's at the end of step s, when it loads step s + 1's). By
// `threads` threads, this one being `thread` of them.
template <int G, typename scalar_t>
__device__ __forceinline__ void prefetch_xp(const scalar_t* xp, int64_t t, int64_t N, int64_t H,
                                            int64_t n_begin, int64_t rows, int64_t u0,
                                            int here, int thread, int threads) {
  for (int64_t idx = thread; idx < rows * G; idx += threads) {
    const int64_t n = n_begin + idx / G, g = idx % G;
    const scalar_t* first = xp + (t * N + n) * G * H + g * H + u0;
    const uintptr_t begin = reinterpret_cast<uintptr_t>(first);
    const uintptr_t end = reinterpret_cast<uintptr_t>(first + here);  // past the last
    for (uintptr_t line = begin & ~uintptr_t(127); line < end; line += 128) {
      const char* at = line < begin ? reinterpret_cast<const char*>(begin)
                                    : reinterpret_cast<const char*>(line);
      asm volatile("prefetch.global.L2 [%0];" ::"l"(__cvta_generic_to_global(at)));
    }
  }
}

// The pipelined row-tile loop's staging of tile i (rows n0, ...; tile 0 issued before the
// loop): tile i + 1's copy issued into the other tile of xs, then tile i's waited for;
// returns tile i's tile of xs (the caller's __syncthreads then makes every thread's copies
// visible).
template <int NT, typename x_t>
__device__ __forceinline__ const x_t* pipelined_tile(const x_t* src, int64_t n0, int64_t i,
                                                     int64_t rows, int64_t N, int K, int ld,
                                                     x_t* xs) {
  if (n0 + NT < rows) {
    stage_rows_async<NT>(src, n0 + NT, N, K, ld, xs + ((i + 1) & 1) * NT * ld);
    cp_async_wait<1>();
  } else {
    cp_async_wait<0>();
  }
  return xs + (i & 1) * NT * ld;
}

// store(e, load(e)) for e < total, e being thread e % blockDim's, each thread with
// kStageBatch loads in flight before it stores: the one-time copy of W's slice into shared
// memory (one load at a time it cost a round trip per element, 128 of them at H = 1024).
template <typename T, typename Load, typename Store>
__device__ __forceinline__ void batched_copy(int64_t total, Load load, Store store) {
  for (int64_t e0 = threadIdx.x; e0 < total; e0 += int64_t(kStageBatch) * blockDim.x) {
    T v[kStageBatch];
#pragma unroll
    for (int i = 0; i < kStageBatch; ++i) {
      const int64_t e = e0 + int64_t(i) * blockDim.x;
      v[i] = e < total ? load(e) : T(0);
    }
#pragma unroll
    for (int i = 0; i < kStageBatch; ++i) {
      const int64_t e = e0 + int64_t(i) * blockDim.x;
      if (e < total) store(e, v[i]);
    }
  }
}

// ---- tensor cores for float16/bfloat16 (the forward): mma.sync m16n8k16, fp32 sums ----
// Fragments come from shared memory with ldmatrix (nvcuda::wmma's load_matrix_sync compiled
// to 4 generic 32-bit LD.E a fragment, each with its 64-bit address arithmetic, on sm_90
// with nvcc 13; one LDSM.x4 loads the same 16 x 16 tile). Compute capability 8.0 and newer
// (setup.py's archs).

// r[0..3] = the four 8 x 8 b16 matrices whose rows lanes 8j .. 8j + 7 address (ldmatrix
// .x4): lane l holds row l / 4, columns 2 (l % 4) and 2 (l % 4) + 1 of each.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(static_cast<unsigned>(__cvta_generic_to_shared(row))));
}

// d += a b for a 16 x 16 tile a (row-major fragment), a 16 x 8 tile b (col-major) in
// scalar_t, fp32 d (the PTX ISA's m16n8k16 fragment layouts).
template <typename scalar_t>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    static_assert(std::is_same_v<scalar_t, c10::Half>, "tensor cores: float16 or bfloat16");
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Warps of the MMA tile: its 16 x 16 output tiles (NT / 16 of batch rows by r_pad / 16 of
// W's rows), each split over mma_splits(tiles, warps) warps by ranges of k (their partial
// tiles summed in `scratch` afterwards).
__host__ __device__ inline int mma_splits(int tiles, int warps) {
  return tiles >= warps ? 1 : warps / tiles;
}

// out[n][r] = sum_{k < K} xs[n][k] ws[r][k] for n < NT (16, 32 or 64; see
// PersistentPlanner::for_tiles), r < r_pad (a multiple of 16), K a multiple of 16
// (zero-padded); xs [NT, ld], ws [r_pad, ld] in scalar_t (ld = mma_ld(K):
// rows 16 bytes apart modulo 128, so the 8 rows an ldmatrix matrix reads fall in
// different banks; every row 16-byte aligned), out [NT, r_pad] and scratch [kMTiles *
// r_tiles * splits, 16, 16] in float; all shared memory. A job (row tile mt of NT / 16,
// column tile rt, k range sp) per warp at a time; per k step of 16: one ldmatrix.x4 of
// xs's 16 x 16 tile (lane l addresses row 16 mt + l % 16 at column 8 (l / 16)), one of
// ws's 16 rows of the tile (lane l: row
// 8 (l / 16) + l % 8 at column 8 ((l / 8) % 2), so that r[0..1] are the b fragment of
// columns 0-7 of the tile and r[2..3] of columns 8-15) and two mma.sync; even and odd k
// steps sum into separate accumulators (two chains of dependent MMAs instead of one),
// added at the end. The job's 16 x 16 sums go to scratch (lane l: rows l / 4 and l / 4 + 8,
// columns 2 (l % 4) + {0, 1} of each half), then the splits' partial tiles are added in a
// fixed order.
template <int NT, typename scalar_t>
__device__ __forceinline__ void tile_dot_mma(const scalar_t* ws, int r_pad, const scalar_t* xs,
                                             int K, int ld, float* out, float* scratch) {
  static_assert(NT % 16 == 0, "the MMA tile's rows are whole 16-row tiles");
  constexpr int kMTiles = NT / 16;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int r_tiles = r_pad / 16, k_steps = K / 16;
  const int splits = mma_splits(kMTiles * r_tiles, warps);
  const int a_off = (lane % 16) * ld + (lane / 16) * 8;
  const int b_off = (8 * (lane / 16) + lane % 8) * ld + ((lane / 8) % 2) * 8;
  for (int job = warp; job < kMTiles * r_tiles * splits; job += warps) {
    const int tile = job / splits, sp = job % splits;
    const int mt = tile / r_tiles, rt = tile % r_tiles;
    const scalar_t* a_row = xs + mt * 16 * ld + a_off;
    const scalar_t* b_row = ws + rt * 16 * ld + b_off;
    float c[2][2][4] = {};  // [k step parity][column half][fragment]
    auto step = [&](float(&acc)[2][4], int ks) {
      uint32_t a[4], b[4];
      ldmatrix_x4(a, a_row + ks * 16);
      ldmatrix_x4(b, b_row + ks * 16);
      mma_16816<scalar_t>(acc[0], a, b[0], b[1]);
      mma_16816<scalar_t>(acc[1], a, b[2], b[3]);
    };
    const int ks_end = (sp + 1) * k_steps / splits;
    int ks = sp * k_steps / splits;
    for (; ks + 1 < ks_end; ks += 2) {  // constant indices into c: it stays in registers
      step(c[0], ks);
      step(c[1], ks + 1);
    }
    if (ks < ks_end) step(c[0], ks);
    float* part = scratch + job * 256;
    const int row = lane / 4, col = 2 * (lane % 4);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      part[row * 16 + h * 8 + col] = c[0][h][0] + c[1][h][0];
      part[row * 16 + h * 8 + col + 1] = c[0][h][1] + c[1][h][1];
      part[(row + 8) * 16 + h * 8 + col] = c[0][h][2] + c[1][h][2];
      part[(row + 8) * 16 + h * 8 + col + 1] = c[0][h][3] + c[1][h][3];
    }
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < NT * r_pad; idx += blockDim.x) {
    const int n = idx / r_pad, r = idx % r_pad;
    const int tile = (n / 16) * r_tiles + r / 16;  // job tile * splits + sp
    float v = 0.0f;
    for (int sp = 0; sp < splits; ++sp) {
      v += scratch[(tile * splits + sp) * 256 + (n % 16) * 16 + r % 16];
    }
    out[idx] = v;
  }
}

// The row length of tile_dot_mma's operands for K columns.
__host__ __device__ inline int mma_ld(int K) { return round_up(K, 16) + 8; }

// The row length of the dot product's operands (W's slice, the staged or pushed rows) for
// K columns: the kernels and the planner's shared-memory sizes both take it from here.
__host__ __device__ inline int operand_ld(bool mma, int K) { return mma ? mma_ld(K) : ffma_ld(K); }

// Bytes of tile_dot_mma's scratch for NT batch rows and r_pad rows of W.
__host__ __device__ inline size_t mma_scratch_bytes(int nt, int r_pad) {
  const int tiles = nt / 16 * (r_pad / 16);
  return size_t(tiles) * mma_splits(tiles, kPersistentThreads / 32) * 256 * sizeof(float);
}

// Shared memory of a persistent kernel: ws [r_pad, ld] w_t, xs [xs_rows, ld] x_t, out
// [nt, r_pad] acc_t, then the dot product's scratch; each region 128-byte aligned. xs_rows:
// the grid variant's NT staged rows times its tiles of xs (xs_tiles), the cluster variant's
// two turns of its rows (2 * round_up(N_c, NT)).
struct SmemLayout {
  size_t xs_offset, out_offset, scratch_offset, bytes;
};
__host__ __device__ inline size_t align128(size_t v) { return (v + 127) / 128 * 128; }
template <typename w_t, typename x_t, typename acc_t>
__host__ __device__ inline SmemLayout smem_layout(int64_t xs_rows, int nt, int r_pad, int64_t ld,
                                                  size_t scratch_bytes) {
  const size_t xs = align128(size_t(r_pad) * ld * sizeof(w_t));
  const size_t out = align128(xs + size_t(xs_rows) * ld * sizeof(x_t));
  const size_t sc = align128(out + size_t(nt) * r_pad * sizeof(acc_t));
  return {xs, out, sc, sc + scratch_bytes};
}

// The rows of xs: NT times the grid variant's xs_tiles (1, or 2 for stage_rows_async), or for
// the cluster variant two turns of round_up(N_c, NT).
template <bool kCluster>
__host__ __device__ inline int64_t xs_rows(int nt, int64_t group_rows, int xs_tiles) {
  return kCluster ? 2 * ((group_rows + nt - 1) / nt * nt) : int64_t(nt) * xs_tiles;
}

// The scratch bytes of a kernel's dot product.
template <int NT, int RPW, bool kMma, typename acc_t>
__host__ __device__ inline size_t scratch_bytes(int r_pad) {
  if constexpr (kMma) {
    return mma_scratch_bytes(NT, r_pad);
  } else {
    return size_t(ffma_scratch<NT, RPW>(r_pad)) * sizeof(acc_t);
  }
}

// Whether the forward of scalar_t runs on tensor cores (tile_dot_mma, RPW = 16, NT = 16, or
// in the grid variant up to 64; see PersistentPlanner::for_tiles).
template <typename scalar_t>
constexpr bool kForwardMma = sizeof(scalar_t) == 2;

// Where a block works: the units [u0, u0 + here) of its group's batch rows [n_begin,
// n_begin + rows). The grid variant has one group (every block, every row); the cluster
// variant a group per cluster, p.group_rows rows each.
struct BlockWork {
  int rank, group_blocks;
  int64_t n_begin, rows, u0;
  int here;
};
template <bool kCluster, typename Params>
__device__ __forceinline__ BlockWork block_work(const Params& p) {
  BlockWork w;
  if constexpr (kCluster) {
    w.rank = cluster_rank();
    w.group_blocks = cluster_blocks();
    w.n_begin = int64_t(cluster_index()) * p.group_rows;
    w.rows = p.N - w.n_begin < p.group_rows ? p.N - w.n_begin : p.group_rows;
  } else {
    w.rank = blockIdx.x;
    w.group_blocks = gridDim.x;
    w.n_begin = 0;
    w.rows = p.N;
  }
  w.u0 = int64_t(w.rank) * p.units;
  w.here = static_cast<int>(p.H - w.u0 < p.units ? p.H - w.u0 : p.units);
  return w;
}

// The async exchange's mbarriers, one a turn (kClusterStaticSmem): the static shared
// memory of the cluster kernels that call this; thread 0 initialises them where the
// exchange runs (one arrival a phase), before the cluster barrier that precedes the loop.
__device__ __forceinline__ unsigned long long* turn_mbarriers(bool async_exchange) {
  __shared__ __align__(8) unsigned long long bars[2];
  static_assert(sizeof(bars) <= kClusterStaticSmem, "the planner reserves too little");
  if (async_exchange && threadIdx.x == 0) {
    mbar_init(bars, 1);
    mbar_init(bars + 1, 1);
  }
  return bars;
}

// store(r) for every block r of the cluster, this one's included, starting at this block's
// rank: the blocks' stores spread over the peers rather than all going to rank 0 first.
template <typename Store>
__device__ __forceinline__ void for_each_peer(const BlockWork& w, Store store) {
  for (int i = 0, r = w.rank; i < w.group_blocks; ++i) {
    store(r);
    r = r + 1 < w.group_blocks ? r + 1 : 0;
  }
}

// The forward of one layer and direction. Cell provides kGates, kLoads and
//   load(p, s, t, tp, n, u, in[kLoads]): the pointwise inputs of unit u, row n at step s
//     that do not depend on step s - 1 (loaded ahead, see below);
//   forward(p, s, t, tp, n, u, hh[G], h_prev, in): the pointwise update of unit u, row n;
//     writes y (and the cache) and returns h_t as stored in y.
// kCluster: the cluster variant (see the header): no staging; h_t goes into every
// block's next turn of xs.
template <typename Cell, typename scalar_t, typename acc_t, int NT, int RPW, bool kCluster>
__global__ void __launch_bounds__(kPersistentThreads, 1)
    persistent_forward(const PersistentParams<scalar_t, acc_t> p) {
  constexpr int G = Cell::kGates;
  constexpr bool kMma = kForwardMma<scalar_t>;
  static_assert(!kMma || (NT % 16 == 0 && RPW == 16), "the MMA tile is whole 16 x 16 tiles");
  extern __shared__ __align__(128) unsigned char smem[];
  const int64_t N = p.N, H = p.H;
  const int U = p.units, K = static_cast<int>(H), ld = operand_ld(kMma, K);
  const BlockWork w = block_work<kCluster>(p);
  const int64_t u0 = w.u0, n_begin = w.n_begin, rows = w.rows;
  const int here = w.here;
  const int r_pad = round_up(G * U, RPW);
  const int64_t turn = xs_rows<kCluster>(NT, p.group_rows, 1) / 2;  // the cluster variant's
  const SmemLayout lay = smem_layout<scalar_t, scalar_t, acc_t>(
      xs_rows<kCluster>(NT, p.group_rows, p.xs_tiles), NT, r_pad, ld,
      scratch_bytes<NT, RPW, kMma, acc_t>(r_pad));
  scalar_t* ws = reinterpret_cast<scalar_t*>(smem);
  scalar_t* xs = reinterpret_cast<scalar_t*>(smem + lay.xs_offset);
  acc_t* out = reinterpret_cast<acc_t*>(smem + lay.out_offset);
  // the async exchange (4- and 8-byte h only): this block's mbarrier for each turn
  constexpr bool kAsyncOk = kCluster && cluster_async_ok<scalar_t, acc_t, false>();
  unsigned long long* bars = nullptr;
  if constexpr (kAsyncOk) bars = turn_mbarriers(p.async_exchange);
  const bool async_exchange = kAsyncOk && p.async_exchange;

  batched_copy<scalar_t>(
      int64_t(r_pad) * ld,
      [&](int64_t idx) {
        const int r = static_cast<int>(idx / ld), k = static_cast<int>(idx % ld);
        const int g = r / U, j = r % U;
        return g < G && j < here && k < K ? p.w_hh[(g * H + u0 + j) * H + k] : scalar_t(0);
      },
      [&](int64_t idx, scalar_t v) { ws[idx] = v; });
  if constexpr (kCluster) {
    // turn 0: h0's rows of the group; zero elsewhere (the padding rows and columns stay
    // zero: the peers' stores fill only rows < rows and columns < K)
    batched_copy<scalar_t>(
        2 * turn * ld,
        [&](int64_t idx) {
          const int64_t nl = idx / ld, k = idx % ld;
          return nl < rows && k < K ? p.h0[(n_begin + nl) * H + k] : scalar_t(0);
        },
        [&](int64_t idx, scalar_t v) { xs[idx] = v; });
  }

  // The pointwise inputs that do not depend on the step before (the input projection, GRU's
  // b_hh, the LSTM's c_{t-1}, which this thread wrote) of this thread's first item of a
  // tile (idx = threadIdx.x) are loaded ahead, so that their round trip overlaps other
  // work: for tile 0 of step s + 1 between the arrival and the wait of the barrier that
  // ends step s, for a later tile before its dot product. Other items load theirs when
  // they run.
  constexpr int L = Cell::kLoads;
  const bool ahead_item = threadIdx.x < (rows < NT ? rows : NT) * here;
  const int64_t ahead_n = n_begin + threadIdx.x / here, ahead_u = u0 + threadIdx.x % here;
  acc_t ahead[L];
  if (ahead_item) {
    Cell::load(p, 0, time_index(0, p.T, p.reverse), time_index(-1, p.T, p.reverse), ahead_n,
               ahead_u, ahead);
  }
  // the cluster variant: every block of the cluster has started and zeroed its turns
  // before any stores into them
  if constexpr (kCluster) {
    cluster_sync();
  } else {
    __syncthreads();
  }
  trace_launch(p, false);

  for (int64_t s = 0; s < p.T; ++s) {
    const int64_t t = time_index(s, p.T, p.reverse), tp = time_index(s - 1, p.T, p.reverse);
    const StepTrace tr = step_trace(p, s);
    tr.start();
    const scalar_t* h_prev = s == 0 ? p.h0 : p.y + tp * N * H;
    scalar_t* next = xs + ((s + 1) & 1) * turn * ld;  // the cluster variant's next turn
    // the grid variant with two tiles of xs: tile i + 1 staged by cp.async during tile i's
    // work
    const bool pipelined = !kCluster && p.xs_tiles == 2 && async_rows_ok(h_prev, K, ld);
    if (pipelined) stage_rows_async<NT>(h_prev, 0, N, K, ld, xs);
    for (int64_t n0 = 0, i = 0; n0 < rows; n0 += NT, ++i) {
      const scalar_t* xt;  // h_{t-1} of the tile's rows
      if constexpr (kCluster) {
        xt = xs + ((s & 1) * turn + n0) * ld;
      } else {
        if (pipelined) {
          xt = pipelined_tile<NT>(h_prev, n0, i, rows, N, K, ld, xs);
        } else {
          stage_rows<NT>(h_prev, n0, N, K, ld, xs);
          xt = xs;
        }
        __syncthreads();
      }
      if (i == 0) tr.mark(1);
      // a later tile's first item per thread: its inputs load while the dot product runs
      if (n0 > 0 && threadIdx.x < (rows - n0 < NT ? rows - n0 : NT) * here) {
        Cell::load(p, s, t, tp, n_begin + n0 + threadIdx.x / here, u0 + threadIdx.x % here,
                   ahead);
      }
      if constexpr (kMma) {
        tile_dot_mma<NT>(ws, r_pad, xt, round_up(K, 16), ld, out,
                         reinterpret_cast<float*>(smem + lay.scratch_offset));
      } else {
        tile_dot<NT, RPW>(ws, r_pad, xt, ld, out,
                          reinterpret_cast<acc_t*>(smem + lay.scratch_offset));
      }
      __syncthreads();
      if (i == 0) tr.mark(2);
      for (int idx = threadIdx.x; idx < NT * here; idx += blockDim.x) {
        const int nl = idx / here, j = idx % here;
        if (n0 + nl >= rows) continue;
        acc_t hh[G], in[L];
#pragma unroll
        for (int g = 0; g < G; ++g) hh[g] = out[nl * r_pad + g * U + j];
        if (idx == threadIdx.x) {  // loaded ahead: before the barrier (tile 0) or the dot
#pragma unroll
          for (int l = 0; l < L; ++l) in[l] = ahead[l];
        } else {
          Cell::load(p, s, t, tp, n_begin + n0 + nl, u0 + j, in);
        }
        const scalar_t h = Cell::forward(p, s, t, tp, n_begin + n0 + nl, u0 + j, hh,
                                         acc_t(xt[nl * ld + u0 + j]), in);
        if constexpr (kCluster) {
          // into every block's next turn, this block's own included (none after the last
          // step: nothing reads that turn)
          if (s + 1 < p.T) {
            scalar_t* dst = next + (n0 + nl) * ld + u0 + j;
            bool sent = false;
            if constexpr (kAsyncOk) {
              if (async_exchange) {
                unsigned long long* bar = bars + ((s + 1) & 1);
                for_each_peer(w, [&](int r) { st_async(dst, h, bar, r); });
                sent = true;
              }
            }
            if (!sent) for_each_peer(w, [&](int r) { *peer_shared(dst, r) = h; });
          }
        }
      }
      // xs and out are reused by the next tile; after the last, the barrier (whose
      // __syncthreads or cluster barrier includes this block's threads) orders them
      // before the next step
      if (n0 + NT < rows) __syncthreads();
    }
    tr.mark(3);
    if (s + 1 < p.T) {
      // loads between the arrival and the wait (none of these inputs is another block's)
      if constexpr (kCluster) {
        if (async_exchange) {
          // every thread's reads of out and of this step's turn are done (the next step's
          // dot product rewrites out); then this block's arrival for the next turn, which
          // receives rows x H values of h_t, every block's units
          __syncthreads();
          if (threadIdx.x == 0) {
            mbar_arrive_expect(bars + ((s + 1) & 1),
                               static_cast<unsigned>(rows * H * int64_t(sizeof(scalar_t))));
          }
        } else {
          cluster_arrive();
        }
      } else {
        grid_arrive(p.barrier);
      }
      tr.arrived(4);
      if (ahead_item) {
        Cell::load(p, s + 1, time_index(s + 1, p.T, p.reverse), t, ahead_n, ahead_u, ahead);
      }
      if (p.prefetch_xp && s + 2 < p.T) {
        prefetch_xp<G>(p.xp, time_index(s + 2, p.T, p.reverse), N, H, n_begin, rows, u0, here,
                       threadIdx.x, blockDim.x);
      }
      tr.mark(5);
      if constexpr (kCluster) {
        // the next turn's phase: turn (s + 1) & 1 is filled at every other step, so this is
        // its (s / 2)-th phase
        if (async_exchange) {
          mbar_wait(bars + ((s + 1) & 1), static_cast<unsigned>((s >> 1) & 1));
        } else {
          cluster_wait();
        }
      } else {
        grid_wait(p.barrier, static_cast<unsigned long long>(s + 1) * gridDim.x);
      }
      tr.mark(6);
    } else {
      tr.rest(4);
    }
  }
  trace_launch(p, true);
  // no block of a cluster leaves while a peer may still address its shared memory (the
  // last step's pushes are skipped, so this is belt and braces: once a launch)
  if constexpr (kCluster) cluster_sync();
}

// ---- the register tile: the grid variant's tensor-core forward for N <= 16 ----
// At small N the tiled forward above is latency-bound (ncu at N = 16, H = 768, bfloat16:
// about 1500 instructions a warp a step at 7.6 cycles each): each step stages h_{t-1}
// from L2 into shared memory, __syncthreads, reads it back and W's slice with ldmatrix,
// and sums the split-K partial tiles in a second pass before the pointwise one. Here W's
// slice lives in registers as mma.sync b fragments for the whole launch, and each warp
// loads its k range of h_{t-1} from L2 straight into a fragments: per step one round trip
// to L2, the MMAs, one pass through shared memory (each warp's partial sums) and the
// pointwise update.
//
// Tiling: a block owns U units (R = G * U <= 32 rows of W, r = g * U + j, in kRegMaxN8
// n-tiles of 8); K = H in chunks of 32 columns, warp w taking chunks [w * C / 8, (w + 1) *
// C / 8) (C = ceil(H / 32) <= 32: H <= 1024); every warp computes all 16 batch rows (rows
// past N zero) and all n-tiles of its chunks. Lane l (g = l / 4, c = l % 4) loads, for each
// of its chunks, the 8 consecutive columns 32 ch + 8 c .. + 7 of batch rows g and g + 8 (one
// 16-byte ld.global.cg each) and holds the same 8 columns of W's row 8 nt + g for each
// n-tile nt. The k order inside a chunk is permuted, the same way for both operands, so
// that these contiguous 8 columns are exactly the lane's share of two m16n8k16 steps:
// step 0 takes columns 8c + {0, 1} (a0/a1, b0) and 8c + {4, 5} (a2/a3, b1), step 1
// columns 8c + {2, 3} and 8c + {6, 7} (the PTX ISA's fragments hold logical columns
// 2c + {0, 1} and 2c + 8 + {0, 1}); each step's 16 logical columns are 16 distinct
// physical ones, and the two steps cover the chunk's 32, so the sum is unchanged. The
// partial sums of each warp go to scratch [warps][16][kRegScratchLd] floats; item (n, j)
// of the pointwise pass adds its G gates over the 8 warps in a fixed order (bitwise
// deterministic). h_{t-1}'s rows are 16-byte aligned when H % 8 == 0 and the pointer is
// (y always; h0 is checked each launch, 8 two-byte loads otherwise).
// The range wait (RNNFAST_REG_WAIT=range, off by default): warp w of every block reads only
// its k range of h_{t-1}, the units that a few blocks make, so instead of the grid barrier
// each warp waits for just those blocks, on a counter per range (range_arrive and
// range_wait, sync.cuh): a block's arrival (its __syncthreads, then thread 0's release
// fence and one add to each range its units fall in) and each warp's lane 0 polling its
// range's counter up to the step count times the range's blocks, then __syncwarp. A warp
// whose blocks are done loads and multiplies while the others wait, so the intake of h
// (about 0.9 us a step at N = 16, H = 768 in sync_bench, each SM's own) overlaps the
// blocks' spread. Nothing else changes: the __syncthreads after the MMAs still gathers the
// warps, and the one in the arrival orders the pointwise pass's reads of the partial sums
// before any warp's next stores (a warp past its wait is past that __syncthreads). The
// results are bit for bit the barrier's.
constexpr int kRegMaxN8 = 4;        // n-tiles of 8 rows of W a block: R <= 32
constexpr int kRegMaxChunks = 4;    // 32-column chunks of K a warp: H <= 8 * 4 * 32
constexpr int kRegScratchLd = 40;   // floats a row of a warp's partial sums (32 + 8)

__host__ __device__ inline size_t reg_scratch_bytes() {
  return size_t(kPersistentThreads / 32) * 16 * kRegScratchLd * sizeof(float);
}

// Whether the register tile holds this layer: N <= 16 rows, w_rows = G * U <= 32 rows of
// W a block, H a multiple of 8 (whole 16-byte vectors a row) and at most kRegMaxChunks
// chunks of 32 columns a warp.
__host__ __device__ inline bool reg_tile_fits(int64_t N, int64_t w_rows, int64_t H) {
  const int64_t chunks = (H + 31) / 32, warps = kPersistentThreads / 32;
  return N >= 1 && N <= 16 && w_rows <= 8 * kRegMaxN8 && H % 8 == 0 &&
         (chunks + warps - 1) / warps <= kRegMaxChunks;
}

// Two 16-bit values as one 32-bit fragment register (lo in the low half, as in memory).
template <typename scalar_t>
__device__ __forceinline__ uint32_t pack_pair(scalar_t lo, scalar_t hi) {
  return uint32_t(lo.x) | (uint32_t(hi.x) << 16);
}

// The 8 16-bit values at p (another block's writes: through L2) as 4 fragment registers,
// value 2i in the low half of register i; zeros where !valid. vec: p is 16-byte aligned.
template <typename scalar_t>
__device__ __forceinline__ uint4 load8_cg(const scalar_t* p, bool vec, bool valid) {
  if (!valid) return make_uint4(0u, 0u, 0u, 0u);
  if (vec) return __ldcg(reinterpret_cast<const uint4*>(p));
  const unsigned short* q = reinterpret_cast<const unsigned short*>(p);
  uint32_t r[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    r[i] = uint32_t(__ldcg(q + 2 * i)) | (uint32_t(__ldcg(q + 2 * i + 1)) << 16);
  }
  return make_uint4(r[0], r[1], r[2], r[3]);
}

// The forward of one layer and direction on the register tile (grid variant only; the
// grid barrier, the loads ahead of it and the cell's pointwise update as in
// persistent_forward). Cell::kNeedsHPrev: the update reads h_{t-1} of its own unit (GRU),
// which for a thread's first item is the h it returned the step before.
template <typename Cell, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kPersistentThreads, 1)
    persistent_forward_reg(const PersistentParams<scalar_t, acc_t> p) {
  static_assert(sizeof(scalar_t) == 2, "the register tile is the 16-bit types' forward");
  constexpr int G = Cell::kGates, L = Cell::kLoads, kWarps = kPersistentThreads / 32;
  extern __shared__ __align__(128) unsigned char smem[];
  float* scratch = reinterpret_cast<float*>(smem);
  const int64_t N = p.N, H = p.H;
  const int U = p.units;
  const BlockWork w = block_work<false>(p);
  const int64_t u0 = w.u0;
  const int here = w.here;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int gid = lane >> 2, tig = lane & 3;
  const int n8 = (G * U + 7) / 8;
  const int chunks = static_cast<int>((H + 31) / 32);
  const int ch0 = warp * chunks / kWarps, my_chunks = (warp + 1) * chunks / kWarps - ch0;

  // The range wait (p.range_counters): warp v's k range is h's units [32 ch0(v),
  // min(H, 32 (ch0(v) + chunks(v)))); `producers` blocks make this warp's (block b makes
  // [b U, b U + U)), and this block adds to the counter of each range its units fall in
  // (bits of my_ranges). A warp without chunks waits for nothing.
  const bool by_range = p.range_counters != nullptr;
  unsigned long long producers = 0;
  unsigned my_ranges = 0u;
  if (by_range) {
    const int64_t lo = int64_t(ch0) * 32, hi = std::min<int64_t>(H, int64_t(ch0 + my_chunks) * 32);
    if (hi > lo) producers = static_cast<unsigned long long>((hi - 1) / U - lo / U + 1);
    for (int v = 0; v < kWarps; ++v) {
      const int64_t vlo = int64_t(v * chunks / kWarps) * 32;
      const int64_t vhi = std::min<int64_t>(H, int64_t((v + 1) * chunks / kWarps) * 32);
      if (vhi > vlo && u0 < vhi && u0 + here > vlo) my_ranges |= 1u << v;
    }
  }

  // W's b fragments: chunk c, n-tile nt: row 8 nt + gid of the block's slice, columns
  // 32 (ch0 + c) + 8 tig + [0, 8); zeros past the slice's rows and past H
  uint32_t wb[kRegMaxChunks][kRegMaxN8][4];
#pragma unroll
  for (int c = 0; c < kRegMaxChunks; ++c) {
#pragma unroll
    for (int nt = 0; nt < kRegMaxN8; ++nt) {
      const int r = nt * 8 + gid, g = r / U, j = r % U;
      const int64_t k = int64_t(ch0 + c) * 32 + 8 * tig;
      const bool valid = c < my_chunks && nt < n8 && g < G && j < here && k < H;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        wb[c][nt][i] = 0u;
        if (valid) {
          const scalar_t* src = p.w_hh + (int64_t(g) * H + u0 + j) * H + k + 2 * i;
          wb[c][nt][i] = pack_pair(src[0], src[1]);
        }
      }
    }
  }

  // this thread's first item's inputs, loaded ahead (see persistent_forward), and for
  // Cell::kNeedsHPrev its h_{t-1}
  acc_t ahead[L], own_h = acc_t(0);
  const bool ahead_item = threadIdx.x < N * here;
  const int64_t ahead_n = threadIdx.x / here, ahead_u = u0 + threadIdx.x % here;
  if (ahead_item) {
    Cell::load(p, 0, time_index(0, p.T, p.reverse), time_index(-1, p.T, p.reverse), ahead_n,
               ahead_u, ahead);
    if constexpr (Cell::kNeedsHPrev) own_h = acc_t(p.h0[ahead_n * H + ahead_u]);
  }

  // the lane's loads of h_{t-1}, the same every step: chunk c's 8 columns of rows gid (lo)
  // and gid + 8 (hi) at h_prev + off_lo + 32 c and + off_lo + 8 H + 32 c, where bits c of
  // on_lo / on_hi are set (the chunk is the warp's, inside H, the row inside N)
  const int64_t off_lo = int64_t(gid) * H + int64_t(ch0) * 32 + 8 * tig;
  unsigned on_lo = 0, on_hi = 0;
#pragma unroll
  for (int c = 0; c < kRegMaxChunks; ++c) {
    const bool in_k = c < my_chunks && int64_t(ch0 + c) * 32 + 8 * tig < H;
    on_lo |= (in_k && gid < N) ? 1u << c : 0u;
    on_hi |= (in_k && gid + 8 < N) ? 1u << c : 0u;
  }

  trace_launch(p, false);
  for (int64_t s = 0; s < p.T; ++s) {
    const int64_t t = time_index(s, p.T, p.reverse), tp = time_index(s - 1, p.T, p.reverse);
    const StepTrace tr = step_trace(p, s);
    tr.start();
    const scalar_t* h_prev = s == 0 ? p.h0 : p.y + tp * N * H;
    const bool vec = (reinterpret_cast<uintptr_t>(h_prev) & 15) == 0;
    // the lane's 8 columns of each chunk of rows gid and gid + 8, all loads in flight at once
    uint4 a_lo[kRegMaxChunks], a_hi[kRegMaxChunks];
#pragma unroll
    for (int c = 0; c < kRegMaxChunks; ++c) {
      a_lo[c] = load8_cg(h_prev + off_lo + 32 * c, vec, (on_lo >> c) & 1u);
      a_hi[c] = load8_cg(h_prev + off_lo + 8 * H + 32 * c, vec, (on_hi >> c) & 1u);
    }
    if (tr.row != nullptr) {
      // mark 1 once thread 0's loads are back: a branch on all of them (the store it
      // guards is overwritten by the mark)
      uint32_t dep = 0u;
#pragma unroll
      for (int c = 0; c < kRegMaxChunks; ++c) {
        dep |= a_lo[c].x | a_lo[c].y | a_lo[c].z | a_lo[c].w;
        dep |= a_hi[c].x | a_hi[c].y | a_hi[c].z | a_hi[c].w;
      }
      if (dep == 0xffffffffu) tr.row[1] = 0;
      tr.mark(1);
    }
    // k steps 0 and 1 of each chunk into separate sums (two chains of dependent MMAs a
    // n-tile, not one), added at the end: a fixed order still
    float acc[2][kRegMaxN8][4] = {};
#pragma unroll
    for (int c = 0; c < kRegMaxChunks; ++c) {
      if (c < my_chunks) {
        // k step 0: columns 8 tig + {0, 1} and + {4, 5}; step 1: + {2, 3} and + {6, 7}
        const uint32_t a0[4] = {a_lo[c].x, a_hi[c].x, a_lo[c].z, a_hi[c].z};
        const uint32_t a1[4] = {a_lo[c].y, a_hi[c].y, a_lo[c].w, a_hi[c].w};
#pragma unroll
        for (int nt = 0; nt < kRegMaxN8; ++nt) {
          if (nt < n8) {
            mma_16816<scalar_t>(acc[0][nt], a0, wb[c][nt][0], wb[c][nt][2]);
            mma_16816<scalar_t>(acc[1][nt], a1, wb[c][nt][1], wb[c][nt][3]);
          }
        }
      }
    }
    // the warp's partial sums (d fragment: rows gid and gid + 8, columns 2 tig + {0, 1} of
    // each n-tile); a warp without chunks writes its zeros too
    float* part = scratch + warp * 16 * kRegScratchLd;
#pragma unroll
    for (int nt = 0; nt < kRegMaxN8; ++nt) {
      if (nt < n8) {
        const int col = nt * 8 + 2 * tig;
        *reinterpret_cast<float2*>(part + gid * kRegScratchLd + col) =
            make_float2(acc[0][nt][0] + acc[1][nt][0], acc[0][nt][1] + acc[1][nt][1]);
        *reinterpret_cast<float2*>(part + (gid + 8) * kRegScratchLd + col) =
            make_float2(acc[0][nt][2] + acc[1][nt][2], acc[0][nt][3] + acc[1][nt][3]);
      }
    }
    __syncthreads();
    tr.mark(2);
    for (int idx = threadIdx.x; idx < N * here; idx += blockDim.x) {
      const int nl = idx / here, j = idx % here;
      acc_t hh[G], in[L];
#pragma unroll
      for (int g = 0; g < G; ++g) {
        float v = 0.0f;
#pragma unroll
        for (int wp = 0; wp < kWarps; ++wp) {
          v += scratch[(wp * 16 + nl) * kRegScratchLd + g * U + j];
        }
        hh[g] = v;
      }
      const bool first = idx == threadIdx.x;
      if (first) {
#pragma unroll
        for (int l = 0; l < L; ++l) in[l] = ahead[l];
      } else {
        Cell::load(p, s, t, tp, nl, u0 + j, in);
      }
      acc_t hp = acc_t(0);
      if constexpr (Cell::kNeedsHPrev) {
        hp = first ? own_h : acc_t(load_cg(h_prev + nl * H + u0 + j));
      }
      const scalar_t h = Cell::forward(p, s, t, tp, nl, u0 + j, hh, hp, in);
      if (first) own_h = acc_t(h);
    }
    tr.mark(3);
    if (s + 1 < p.T) {
      // the __syncthreads: scratch read before the next step's stores
      if (by_range) {
        __syncthreads();
        if (threadIdx.x == 0) range_arrive(p.range_counters, my_ranges);
      } else {
        grid_arrive(p.barrier);
      }
      tr.arrived(4);
      if (ahead_item) {
        Cell::load(p, s + 1, time_index(s + 1, p.T, p.reverse), t, ahead_n, ahead_u, ahead);
      }
      // by warps 1 on, so that thread 0 starts its wait at once
      if (p.prefetch_xp && s + 2 < p.T && warp > 0) {
        prefetch_xp<G>(p.xp, time_index(s + 2, p.T, p.reverse), N, H, 0, N, u0, here,
                       threadIdx.x - 32, blockDim.x - 32);
      }
      tr.mark(5);
      if (by_range) {
        // each warp on its own: its next scratch stores follow this step's __syncthreads
        range_wait(p.range_counters, warp, static_cast<unsigned long long>(s + 1) * producers);
      } else {
        grid_wait(p.barrier, static_cast<unsigned long long>(s + 1) * gridDim.x);
      }
      tr.mark(6);
    } else {
      tr.rest(4);
    }
  }
  trace_launch(p, true);
}

// The backward of one layer and direction. Cell provides kGates, kDirectDh (dh_{t-1} has a
// term besides dg_hh W_hh, left in dh by phase A), kBackwardLoads and
//   load_backward(p, s, t, tp, n, u, in): phase A's inputs but the carried dh;
//   backward(p, s, t, tp, n, u, in, dgh[G]): phase A for unit u, row n; writes dg_ih and
//     dg_hh and returns the latter's G values (the gradients phase B multiplies by W_hh)
//     in dgh.
// kCluster: the cluster variant: phase A stores dgh into every block's turn of xs, and
// phase B reads it there.
template <typename Cell, typename scalar_t, typename acc_t, int NT, int RPW, bool kCluster>
__global__ void __launch_bounds__(kPersistentThreads, 1)
    persistent_backward(const PersistentParams<scalar_t, acc_t> p) {
  constexpr int G = Cell::kGates;
  extern __shared__ __align__(128) unsigned char smem[];
  const int64_t N = p.N, H = p.H;
  const int U = p.units, K = static_cast<int>(G * H), ld = operand_ld(false, K);
  const BlockWork w = block_work<kCluster>(p);
  const int64_t u0 = w.u0, n_begin = w.n_begin, rows = w.rows;
  const int here = w.here;
  const int r_pad = round_up(U, RPW);
  const int64_t turn = xs_rows<kCluster>(NT, p.group_rows, 1) / 2;  // the cluster variant's
  const SmemLayout lay = smem_layout<scalar_t, acc_t, acc_t>(
      xs_rows<kCluster>(NT, p.group_rows, p.xs_tiles), NT, r_pad, ld,
      scratch_bytes<NT, RPW, false, acc_t>(r_pad));
  scalar_t* ws = reinterpret_cast<scalar_t*>(smem);
  acc_t* xs = reinterpret_cast<acc_t*>(smem + lay.xs_offset);
  acc_t* out = reinterpret_cast<acc_t*>(smem + lay.out_offset);
  // the async exchange (acc_t is 4 or 8 bytes): this block's mbarrier for each turn
  constexpr bool kAsyncOk = kCluster && cluster_async_ok<scalar_t, acc_t, true>();
  unsigned long long* bars = nullptr;
  if constexpr (kAsyncOk) bars = turn_mbarriers(p.async_exchange);
  const bool async_exchange = kAsyncOk && p.async_exchange;

  // consecutive threads read consecutive units of one row of W_hh; columns K..ld are zero
  batched_copy<scalar_t>(
      int64_t(r_pad) * ld,
      [&](int64_t idx) {
        const int j = static_cast<int>(idx % r_pad);
        const int64_t q = idx / r_pad;
        return j < here && q < K ? p.w_hh[q * H + u0 + j] : scalar_t(0);
      },
      [&](int64_t idx, scalar_t v) {
        ws[(idx % r_pad) * ld + idx / r_pad] = v;
      });
  if constexpr (kCluster) {  // the padding rows and columns of both turns stay zero
    for (int64_t idx = threadIdx.x; idx < 2 * turn * ld; idx += blockDim.x) xs[idx] = acc_t(0);
  }

  // Phase A's inputs but the carried dh (Cell::load_backward) of this thread's first item
  // (idx = threadIdx.x) are loaded ahead: for step s - 1 between the arrival and the wait
  // of step s's barrier.
  constexpr int L = Cell::kBackwardLoads;
  const bool ahead_item = threadIdx.x < rows * here;
  const int64_t ahead_n = n_begin + threadIdx.x / here, ahead_u = u0 + threadIdx.x % here;
  acc_t ahead[L];
  if (ahead_item) {
    Cell::load_backward(p, p.T - 1, time_index(p.T - 1, p.T, p.reverse),
                        time_index(p.T - 2, p.T, p.reverse), ahead_n, ahead_u, ahead);
  }
  if constexpr (kCluster) {
    cluster_sync();
  } else {
    __syncthreads();
  }
  trace_launch(p, false);

  for (int64_t s = p.T - 1; s >= 0; --s) {
    const int64_t t = time_index(s, p.T, p.reverse), tp = time_index(s - 1, p.T, p.reverse);
    const StepTrace tr = step_trace(p, p.T - 1 - s);
    tr.start();
    acc_t* cur = xs + (s & 1) * turn * ld;  // the cluster variant's turn for this step
    for (int64_t idx = threadIdx.x; idx < rows * here; idx += blockDim.x) {
      const int64_t nl = idx / here, u = u0 + idx % here;
      acc_t in[L], dgh[G];
      if (idx == threadIdx.x) {
#pragma unroll
        for (int l = 0; l < L; ++l) in[l] = ahead[l];
      } else {
        Cell::load_backward(p, s, t, tp, n_begin + nl, u, in);
      }
      Cell::backward(p, s, t, tp, n_begin + nl, u, in, dgh);
      if constexpr (kCluster) {
        acc_t* dst = cur + nl * ld + u;
        if (async_exchange) {
          unsigned long long* bar = bars + (s & 1);
          for_each_peer(w, [&](int r) {
#pragma unroll
            for (int g = 0; g < G; ++g) st_async(dst + g * H, dgh[g], bar, r);
          });
        } else {
          for_each_peer(w, [&](int r) {
            acc_t* q = peer_shared(dst, r);
#pragma unroll
            for (int g = 0; g < G; ++g) q[g * H] = dgh[g];
          });
        }
      }
    }
    tr.mark(1);
    // the loads below need no other block's data
    if constexpr (kCluster) {
      if (async_exchange) {
        // this block's arrival for this step's turn, which receives rows x G x H gate
        // gradients, every block's units (the last step's phase B ended with
        // __syncthreads: no read of this turn is outstanding in this block)
        if (threadIdx.x == 0) {
          mbar_arrive_expect(bars + (s & 1),
                             static_cast<unsigned>(rows * G * H * int64_t(sizeof(acc_t))));
        }
      } else {
        cluster_arrive();
      }
    } else {
      grid_arrive(p.barrier);
    }
    tr.arrived(2);
    if (s > 0 && ahead_item) {
      Cell::load_backward(p, s - 1, tp, time_index(s - 2, p.T, p.reverse), ahead_n, ahead_u,
                          ahead);
    }
    tr.mark(3);
    if constexpr (kCluster) {
      // turn s & 1 is filled at every other step from T - 1 down: its ((T - 1 - s) / 2)-th
      // phase
      if (async_exchange) {
        mbar_wait(bars + (s & 1), static_cast<unsigned>(((p.T - 1 - s) >> 1) & 1));
      } else {
        cluster_wait();
      }
    } else {
      grid_wait(p.barrier, static_cast<unsigned long long>(p.T - s) * gridDim.x);
    }
    tr.mark(4);
    const acc_t* dg = p.dg_hh + t * N * K;
    // the grid variant with two tiles of xs: tile i + 1 staged by cp.async during tile i's
    // work
    const bool pipelined = !kCluster && p.xs_tiles == 2 && async_rows_ok(dg, K, ld);
    if (pipelined) stage_rows_async<NT>(dg, 0, N, K, ld, xs);
    for (int64_t n0 = 0, i = 0; n0 < rows; n0 += NT, ++i) {
      const acc_t* xt;  // dg_hh of the tile's rows
      if constexpr (kCluster) {
        xt = cur + n0 * ld;
      } else {
        if (pipelined) {
          xt = pipelined_tile<NT>(dg, n0, i, rows, N, K, ld, xs);
        } else {
          stage_rows<NT>(dg, n0, N, K, ld, xs);
          xt = xs;
        }
        __syncthreads();
      }
      if (i == 0) tr.mark(5);
      tile_dot<NT, RPW>(ws, r_pad, xt, ld, out, reinterpret_cast<acc_t*>(smem + lay.scratch_offset));
      __syncthreads();
      for (int idx = threadIdx.x; idx < NT * here; idx += blockDim.x) {
        const int nl = idx / here, j = idx % here;
        if (n0 + nl >= rows) continue;
        acc_t* dh = p.dh + (n_begin + n0 + nl) * H + u0 + j;
        const acc_t v = out[nl * r_pad + j];
        *dh = Cell::kDirectDh ? *dh + v : v;
      }
      __syncthreads();
    }
    tr.mark(6);
  }
  trace_launch(p, true);
  if constexpr (kCluster) cluster_sync();
}

// ---- host side: which path runs, and the launch ----

// The cost model of `auto`: microseconds per step of each path, fitted to the H100 runs
// (benchmarks/results/cuda-h100-issue7-2026-11-27.json, the second: the grid and cluster
// variants forced, 141 cases, float32 and bfloat16, forward and backward;
// cuda-h100-issue7-2026-11-27c.json and cuda-h100-calib-2026-11-27c.json, the third: the
// per-step path and the grid variant's 32- and 64-row tensor-core tiles; the cluster variant
// and the per-step path refitted to all five, the fourth and fifth adding the per-step
// path's direct cuBLAS calls and the register tile; scripts/fit_cost_model.py's RUNS).
// Picks against the fastest measured path over those runs' 143 cases with two or more
// paths measured: within 10% in all but 2 (8 before the refit, the worst 2.95x; now 1.30x).
// Grid variant: a floor (the grid barrier, the __syncthreads and the first pointwise pass),
// then per tile of NT batch rows a fixed cost (the staging of the tile from L2, its
// __syncthreads and the tile's pointwise pass: about 2.5 us forward, 2.2 backward, the same
// in float32 and bfloat16, and the same with cp.async's two tiles of xs as with one) and
// its dot product at a share of the SM's FFMA rate (tensor cores: 16x that), plus for the
// tensor cores' wider tiles (32 and 64 rows) about 0.08 us per KiB of the rows past 16 that
// a tile stages (the third H100 run, cuda-h100-calib-2026-11-27c.json: the 64-row tile at
// N = 256 took 0.076 us per such KiB at H = 256 and 768); never less than all blocks'
// staging at L2 bandwidth. Measured time per step grows with the tiles, not the
// bytes: at N = 256 (16 tiles) the grid variant staged about 0.9 TB/s across the device.
// scripts/fit_cost_model.py prints this model against a run's JSON, reading the constants
// below from this file; it gives 0.84x-1.64x of the measured forward times over all five
// runs (geomean 1.09x; the worst the 64-row tile at H = 1024) and 0.74x-1.22x of the
// backward (1.01x).
// Cluster variant: per wave of clusters, a floor and a cost per tile (fitted equal), the dot
// product and the stores into the peers' shared memory, a cost per store whatever its
// width (a 2-byte store of the 16-bit forward costs as a 4-byte one: costing them by bytes
// put the 16-bit forward at 0.47x-0.95x of its measured time). Refitted to all five H100 runs
// (the fourth and fifth measured the cluster variant where auto ran it): tile cost, dot
// share and the store's cost least squares on log time, a separate tile cost and share for
// the tensor-core forward (its split-k partial tiles are summed in a second pass); 0.70x-1.36x
// of measured forward, 0.59x-1.46x backward (scripts/fit_cost_model.py).
// Per-step path: the host's launches (on the H100 machine's CPU 14-25 us a step whatever
// the size: 17 forward, 22 backward through ATen, 15 and 20 where the 16-bit GEMM calls
// cuBLAS directly, StepGemm::direct, the fourth run), plus the GEMM at a share of the
// device's rate (16-bit forward and bfloat16 backward on tensor cores, 30%, from the third
// run's bfloat16 times at N = 256; float32 on FFMA, TF32 being off by default, as is the
// float16 backward's, which runs in acc_t).
// The device's SM clock in kHz (a guess of 1.5 GHz where the query fails), asked once per
// device: the planner builds a CostModel at every op call, and on the H100 machine a
// forward call's host time was about 0.9 ms on the persistent paths against 0.4 on the
// per-step path (scripts/host_overhead.py, the fourth run), so nothing that needs the
// driver is asked again per call.
inline int device_clock_khz(int device) {
  static std::mutex mutex;
  static std::map<int, int> clocks;
  const std::lock_guard<std::mutex> lock(mutex);
  const auto it = clocks.find(device);
  if (it != clocks.end()) return it->second;
  int khz = 0;
  if (cudaDeviceGetAttribute(&khz, cudaDevAttrClockRate, device) != cudaSuccess || khz <= 0) {
    (void)cudaGetLastError();  // not sticky; a guess instead
    khz = 1500000;
  }
  clocks.emplace(device, khz);
  return khz;
}

struct CostModel {
  static constexpr double kFloorUs = 1.9, kTileUs = 2.5, kFfmaShare = 0.4, kMmaShare = 0.4;
  static constexpr double kWideRowUsPerKB = 0.08;
  static constexpr double kBwdFloorUs = 1.6, kBwdTileUs = 2.2, kBwdFfmaShare = 0.22;
  static constexpr double kL2BytesPerS = 5e12;
  static constexpr double kStepOverheadUs = 17.0, kBwdStepOverheadUs = 22.0,
                          kStepDirectUs = 15.0, kBwdStepDirectUs = 20.0,
                          kGemmFfmaShare = 0.7, kGemmMmaShare = 0.3;
  static constexpr double kClusterTileUs = 0.9, kClusterMmaTileUs = 1.9,
                          kBwdClusterTileUs = 1.0, kClusterFfmaShare = 0.2,
                          kClusterMmaShare = 0.15, kBwdClusterFfmaShare = 0.25,
                          kDsmemClkPerStore = 0.8;
  double ffma_flops_per_sm_us;  // flop per SM per microsecond, FFMA (DFMA for float64)
  double mma_factor;            // dense 16-bit tensor cores (fp32 sums) over FP32 FFMA
  int sms;
  // the direction's constants (forward or backward)
  double floor_us, tile_us, ffma_share, step_overhead_us;
  bool backward;
  // Per SM and cycle: 128 FP32 FMA lanes (64 on sm_80), FP64 at half that on sm_80 and
  // sm_90 and at 1/64 elsewhere; tensor cores 16x FFMA on sm_80 and sm_90, about 4x on the
  // others (sm_86, sm_89, ...). Fitted on the H100 only.
  // step_direct: the per-step path's GEMMs call cuBLAS directly (StepGemm::direct)
  CostModel(const cudaDeviceProp& prop, bool fp64, bool backward_, bool step_direct)
      : floor_us(backward_ ? kBwdFloorUs : kFloorUs),
        tile_us(backward_ ? kBwdTileUs : kTileUs),
        ffma_share(backward_ ? kBwdFfmaShare : kFfmaShare),
        step_overhead_us(backward_ ? (step_direct ? kBwdStepDirectUs : kBwdStepOverheadUs)
                                   : (step_direct ? kStepDirectUs : kStepOverheadUs)),
        backward(backward_) {
    const int clock_khz = device_clock_khz(c10::cuda::current_device());
    const bool datacenter = (prop.major == 8 && prop.minor == 0) || prop.major == 9;
    const double fp32_lanes = prop.major == 8 && prop.minor == 0 ? 64.0 : 128.0;
    const double lanes = fp64 ? (datacenter ? fp32_lanes / 2 : fp32_lanes / 64) : fp32_lanes;
    ffma_flops_per_sm_us = 2.0 * lanes * clock_khz * 1e-3;
    mma_factor = datacenter ? 16.0 : 4.0;
    sms = prop.multiProcessorCount;
    clock_mhz = clock_khz * 1e-3;
  }
  double clock_mhz;
  // The grid variant: N batch rows in tiles of nt; r_pad rows of W a block, K long; x_size:
  // bytes of a staged element.
  double persistent_us(int64_t N, int nt, int r_pad, int64_t K, int x_size, bool mma,
                       int blocks) const {
    const int64_t tiles = (N + nt - 1) / nt;
    const double rate = ffma_flops_per_sm_us * (mma ? mma_factor * kMmaShare : ffma_share);
    const double dot_us = 2.0 * nt * r_pad * K / rate;
    const double wide_us = nt > 16 ? (nt - 16) * K * x_size / 1024.0 * kWideRowUsPerKB : 0.0;
    const double latency_us = floor_us + tiles * (tile_us + dot_us + wide_us);
    const double bandwidth_us = double(blocks) * N * K * x_size / kL2BytesPerS * 1e6;
    return std::max(latency_us, bandwidth_us);
  }
  // The cluster variant, per step of one cluster: rows of N (group_rows) in tiles of nt;
  // pushes: the stores a block makes into the cluster's shared memory (one value each);
  // waves: how many times the clusters take turns on the device (more clusters than fit).
  double cluster_us(int64_t group_rows, int nt, int r_pad, int64_t K, int64_t pushes, bool mma,
                    int64_t waves) const {
    const int64_t tiles = (group_rows + nt - 1) / nt;
    const double tile = backward ? kBwdClusterTileUs : mma ? kClusterMmaTileUs : kClusterTileUs;
    const double share = backward ? kBwdClusterFfmaShare
                         : mma    ? mma_factor * kClusterMmaShare
                                  : kClusterFfmaShare;
    const double dot_us = 2.0 * nt * r_pad * K / (ffma_flops_per_sm_us * share);
    const double push_us = double(pushes) * kDsmemClkPerStore / clock_mhz;
    return double(waves) * ((tiles + 1) * tile + tiles * dot_us + push_us);
  }
  // The grid variant's register tile (persistent_forward_reg, N <= 16): a floor (the grid
  // barrier, one L2 round trip for h_{t-1}, the pointwise pass; set by hand from the fourth
  // H100 run's issue table: 3.1-4.7 us a step at T = 1024, a forward call's fixed cost
  // included; scripts/fit_cost_model.py reads the three earlier runs, which ran the tiled
  // forward there) and the MMAs of 16 rows (r_pad rows of W, K columns) at the tiled
  // forward's share of the tensor cores.
  // Never less than every block's reads of h_{t-1} at L2 bandwidth (N rows of K 16-bit
  // values a block: about 0.5 us at N = 16, H = 768 with 128 blocks).
  static constexpr double kRegFloorUs = 3.4;
  double reg_us(int64_t N, int r_pad, int64_t K, int blocks) const {
    const double latency_us =
        kRegFloorUs + 2.0 * 16 * r_pad * K / (ffma_flops_per_sm_us * mma_factor * kMmaShare);
    return std::max(latency_us, double(blocks) * N * K * 2 / kL2BytesPerS * 1e6);
  }
  // flops: the step's GEMM (2 N G H H); mma: on tensor cores
  double step_us(double flops, bool mma) const {
    const double rate = sms * ffma_flops_per_sm_us * (mma ? mma_factor * kGemmMmaShare
                                                          : kGemmFfmaShare);
    return step_overhead_us + flops / rate;
  }
};

// A launch configuration with a cluster dimension (the cluster variant's occupancy query and
// launch); attr is the caller's, as cfg points at it.
inline cudaLaunchConfig_t cluster_config(int cluster, int64_t blocks, size_t smem,
                                         cudaStream_t stream, cudaLaunchAttribute& attr) {
  attr.id = cudaLaunchAttributeClusterDimension;
  attr.val.clusterDim.x = cluster, attr.val.clusterDim.y = 1, attr.val.clusterDim.z = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(blocks)), cfg.blockDim = dim3(kPersistentThreads);
  cfg.dynamicSmemBytes = smem, cfg.stream = stream;
  cfg.attrs = &attr, cfg.numAttrs = 1;
  return cfg;
}

struct PersistentLaunch {
  const void* kernel = nullptr;  // null: the per-step path runs
  int blocks = 0, units = 0;
  int cluster = 0;          // blocks per cluster: the cluster variant; 0: the grid variant
  int64_t group_rows = 0;   // the cluster variant's rows of N per cluster
  size_t smem = 0;
  double us = 0.0;          // the cost model's microseconds per step
  std::string refused;      // the path was forced but cannot run: why (the op then raises)
  int xs_tiles = 1;         // the grid variant's tiles of xs (2: stage_rows_async)
  int nt = 0, rpw = 0;      // the tile
  int gates = 0;            // G, for the launch's xp size
  bool reg = false;         // the grid variant's register tile (persistent_forward_reg)
  bool async_exchange = false;  // the cluster variant's async exchange (cluster_async_ok)
  bool range_wait = false;      // the register tile's range wait (RNNFAST_REG_WAIT=range)
};

// A CUDA error is a reason not to run, not an exception (nothing is thrown inside the op's
// dispatch; see check_persistent_refusal): false, with the reason in why.
inline bool cuda_ok(cudaError_t e, const char* what, std::string& why) {
  if (e == cudaSuccess) return true;
  (void)cudaGetLastError();  // not sticky
  why = std::string(what) + " failed: " + cudaGetErrorString(e);
  return false;
}

// The dynamic shared memory a kernel may ask for: the device's opt-in maximum a block less
// the kernel's static shared memory (cudaFuncAttributes::sharedSizeBytes); asking for more
// is "invalid argument" (the sixth H100 run, 2026-11-28, found every cluster kernel
// refused so, after the async exchange's mbarriers gave them static shared memory).
constexpr int max_dynamic_smem(size_t optin, size_t static_bytes) {
  return static_bytes >= optin ? 0 : static_cast<int>(optin - static_bytes);
}
static_assert(max_dynamic_smem(232448, 128) == 232320 && max_dynamic_smem(100, 128) == 0);

// Answers that do not change while the process runs (attributes set on a kernel, occupancy
// queries), kept per key: a query costs microseconds and the planner asks a dozen per op
// call. Only successes are kept. key: (device, kernel, cluster size or 0, bytes or 0).
using QueryKey = std::tuple<int, const void*, int, size_t>;
template <typename Query>  // bool(int& value, std::string& why)
bool memo_query(const QueryKey& key, int& value, std::string& why, Query query) {
  static std::mutex mutex;
  static std::map<QueryKey, int> answers;
  {
    const std::lock_guard<std::mutex> lock(mutex);
    const auto it = answers.find(key);
    if (it != answers.end()) {
      value = it->second;
      return true;
    }
  }
  if (!query(value, why)) return false;
  const std::lock_guard<std::mutex> lock(mutex);
  answers.emplace(key, value);
  return true;
}

// A knob read at each call (scripts/calibrate_persistent.py, the tests): its value, or 0.
inline int64_t env_knob(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr ? std::atoll(v) : 0;
}

// RNNFAST_MMA_ROWS: the most batch rows of the grid variant's tensor-core tile (64 by
// default; 32 or 16 cap it); 0 for a value that is none of those. Fewer, larger tiles a step
// won in every case the third H100 run measured (bfloat16, N = 64 and 256, H = 256 to 1024,
// each cell): 64 rows a tile over 16 took 0.46x-0.72x of the time a step (for_tiles takes
// the largest tile that the batch fills more than half of).
inline int mma_rows(std::string& value) {
  const char* v = std::getenv("RNNFAST_MMA_ROWS");
  value = v != nullptr ? v : "";
  if (value.empty() || value == "64") return 64;
  return value == "32" ? 32 : value == "16" ? 16 : 0;
}

// An environment knob of two values, read at each call: 1 for `on`, 0 for `off`, `unset`
// (0 or 1) where it is not set, -1 for any other value (value holds what was read, for the
// caller's error).
inline int two_way_knob(const char* name, const char* off, const char* on, int unset,
                        std::string& value) {
  const char* v = std::getenv(name);
  value = v != nullptr ? v : "";
  if (value.empty()) return unset;
  return value == on ? 1 : value == off ? 0 : -1;
}

// A knob that is unset, "0" or "1" (RNNFAST_STEP_FUSED, RNNFAST_STEP_GRAPH): whether it is
// "1"; any other value sets why ("NAME is 'value', expected 0 or 1", which the op raises)
// and returns false.
inline bool zero_one_knob(const char* name, std::string& why) {
  std::string value;
  const int knob = two_way_knob(name, "0", "1", 0, value);
  if (knob < 0) why = std::string(name) + " is '" + value + "', expected 0 or 1";
  return knob == 1;
}

// RNNFAST_REG_TILE: unset or 1 plans the grid variant's register tile
// (persistent_forward_reg) for the 16-bit forward where it holds the layer (reg_tile_fits);
// 0: the tiled forward. On by default since the fourth H100 run (2026-11-27): faster than
// the tiled forward and than auto's earlier picks in all 18 of the issue table's
// forwards it holds (bfloat16, N 1 and 16, H 256-1024, each cell). -1 for any other value.
inline int reg_tile_knob(std::string& value) {
  return two_way_knob("RNNFAST_REG_TILE", "0", "1", 1, value);
}

// RNNFAST_CLUSTER_EXCHANGE: unset or "barrier": the cluster variant's stores into the peers'
// shared memory and the cluster barrier; "async": st.async and a wait on each block's own
// mbarrier (sync.cuh), where the exchanged values are 4 or 8 bytes (cluster_async_ok; the
// barrier elsewhere). Off by default: it has not yet run on a GPU inside the kernels
// (sync_bench measured the exchange alone 0.36-0.41 us a step faster). 1 for async, 0
// for the barrier, -1 for any other value.
inline int cluster_exchange_knob(std::string& value) {
  return two_way_knob("RNNFAST_CLUSTER_EXCHANGE", "barrier", "async", 0, value);
}

// RNNFAST_REG_WAIT: unset or "grid": the register tile's steps end with the grid barrier;
// "range": each warp waits only for the blocks that make its k range of h
// (persistent_forward_reg), so that its loads overlap the later blocks' work. Off by
// default: not yet run on a GPU. 1 for range, 0 for grid, -1 for any other value.
inline int reg_wait_knob(std::string& value) {
  return two_way_knob("RNNFAST_REG_WAIT", "grid", "range", 0, value);
}

// What plan_persistent's variants share: the cell's sizes, the device and the cost model.
template <typename Cell, typename scalar_t, typename acc_t, bool kBackward>
struct PersistentPlanner {
  static constexpr int G = Cell::kGates;
  static constexpr bool kMma = !kBackward && kForwardMma<scalar_t>;
  using x_t = std::conditional_t<kBackward, acc_t, scalar_t>;
  using P = PersistentParams<scalar_t, acc_t>;
  using I4 = std::integral_constant<int, 4>;
  using I8 = std::integral_constant<int, 8>;
  using I16 = std::integral_constant<int, 16>;
  using I32 = std::integral_constant<int, 32>;
  using I64 = std::integral_constant<int, 64>;

  int64_t N, H;
  const cudaDeviceProp& prop;
  CostModel model;
  bool step_mma;  // the per-step path's GEMM on tensor cores (16-bit forward, bfloat16 dh)
  std::string why;  // why the last variant planned cannot run
  int mma_tile_rows;  // RNNFAST_MMA_ROWS (64 unless set to 16 or 32), as plan_persistent read it
  bool reg_tile;      // RNNFAST_REG_TILE unset or 1, as plan_persistent read it
  bool async_exchange;  // RNNFAST_CLUSTER_EXCHANGE=async, as plan_persistent read it

  PersistentPlanner(int64_t n, int64_t h, at::ScalarType dtype, int mma_rows_asked = 64,
                    bool reg_tile_asked = false, bool async_asked = false)
      : N(n), H(h), prop(*at::cuda::getCurrentDeviceProperties()),
        model(prop, dtype == at::kDouble, kBackward, StepGemm::direct(dtype)),
        step_mma(kBackward ? StepGemm::bf16_dh(dtype) : kMma), mma_tile_rows(mma_rows_asked),
        reg_tile(reg_tile_asked), async_exchange(async_asked) {}

  template <int NT, int RPW, bool kCluster>
  static const void* kernel() {
    void (*k)(const P);
    if constexpr (kBackward) {
      k = &persistent_backward<Cell, scalar_t, acc_t, NT, RPW, kCluster>;
    } else {
      k = &persistent_forward<Cell, scalar_t, acc_t, NT, RPW, kCluster>;
    }
    return reinterpret_cast<const void*>(k);
  }

  // Tries the tiles in order, try_tile(nt, rpw) returning whether one ran:
  // tensor cores: (64, 16), (32, 16) or (16, 16), the largest the batch has more than half
  // as many rows as, that fits and that RNNFAST_MMA_ROWS allows (rows: 64 unless it caps
  // it). FFMA: with more than 4 rows (n_rows), 16 rows a tile, and 8 rows of W a warp
  // where that pads no more rows than 4 (128 sums a lane, 24 shared-memory
  // loads per 128 FMAs against 20 per 64: FFMA- rather than load-bound; float sums only,
  // as 128 doubles would spill), else 4; the backward stages G*H-wide rows of acc_t: where
  // 16 of them do not fit beside W's slice (float32 LSTM and GRU from H of about 600 on),
  // 8 rows a tile before 4; with 4 rows or fewer, or where nothing else fits, (4, 8).
  template <typename TryTile>
  static void for_tiles(int64_t n_rows, int64_t w_rows, int rows, TryTile try_tile) {
    if constexpr (kMma) {
      bool done = false;
      if (rows == 64 && n_rows > 32) done = try_tile(I64{}, I16{});
      if (!done && rows >= 32 && n_rows > 16) done = try_tile(I32{}, I16{});
      if (!done) try_tile(I16{}, I16{});
    } else {
      bool done = false;
      if (n_rows > 4) {
        if constexpr (sizeof(acc_t) == 4) {
          if (round_up(static_cast<int>(w_rows), 8) == round_up(static_cast<int>(w_rows), 4)) {
            done = try_tile(I16{}, I8{});
          }
        }
        if (!done) done = try_tile(I16{}, I4{});
        if constexpr (kBackward) {
          if (!done) done = try_tile(I8{}, I8{});
        }
      }
      if (!done) try_tile(I4{}, I8{});
    }
  }

  // The cluster variant tries every tile: its rows per cluster follow from the tile's
  // shared memory, so the cost model, not a rule, picks. Tensor cores: (16, 16); FFMA:
  // (16, 8) with float sums where 8 rows of W a warp pad no more than 4 would, (16, 4),
  // (8, 8), (4, 8).
  template <typename TryTile>
  static void for_cluster_tiles(int64_t w_rows, TryTile try_tile) {
    if constexpr (kMma) {
      try_tile(I16{}, I16{});
    } else {
      if constexpr (sizeof(acc_t) == 4) {
        if (round_up(static_cast<int>(w_rows), 8) == round_up(static_cast<int>(w_rows), 4)) {
          try_tile(I16{}, I8{});
        }
      }
      try_tile(I16{}, I4{});
      try_tile(I8{}, I8{});
      try_tile(I4{}, I8{});
    }
  }

  template <int NT, int RPW, bool kCluster>
  size_t smem_bytes(int r_pad, int64_t ld, int64_t group_rows, int xs_tiles = 1) const {
    return smem_layout<scalar_t, x_t, acc_t>(xs_rows<kCluster>(NT, group_rows, xs_tiles), NT,
                                             r_pad, ld, scratch_bytes<NT, RPW, kMma, acc_t>(r_pad))
        .bytes;
  }
  bool fits(size_t smem) {
    if (smem <= prop.sharedMemPerBlockOptin) return true;
    why = "it needs " + std::to_string(smem / 1024) + " KiB of shared memory per block and " +
          "the device allows " + std::to_string(prop.sharedMemPerBlockOptin / 1024) + " KiB";
    return false;
  }
  // Once per device and kernel: the most dynamic shared memory the device allows beside the
  // kernel's static shared memory (not this call's size: calls from several threads may
  // race; asking for the whole opt-in maximum fails with "invalid argument" where the kernel
  // has static shared memory, as the cluster kernels' mbarriers), clusters of more than 8
  // blocks where asked; ptx: the architecture the kernel's code was compiled for (e.g. 90).
  bool prepare(const void* k, bool non_portable, int& ptx) {
    const int device = c10::cuda::current_device();
    return memo_query(QueryKey{device, k, non_portable ? -1 : 0, 0}, ptx, why,
                      [&](int& v, std::string& w) {
                        cudaFuncAttributes attrs;
                        if (!cuda_ok(cudaFuncGetAttributes(&attrs, k), "cudaFuncGetAttributes",
                                     w) ||
                            !cuda_ok(cudaFuncSetAttribute(
                                         k, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         max_dynamic_smem(prop.sharedMemPerBlockOptin,
                                                          attrs.sharedSizeBytes)),
                                     "cudaFuncSetAttribute", w) ||
                            (non_portable &&
                             !cuda_ok(cudaFuncSetAttribute(
                                          k, cudaFuncAttributeNonPortableClusterSizeAllowed, 1),
                                      "allowing clusters of more than 8 blocks", w))) {
                          return false;
                        }
                        v = attrs.ptxVersion;
                        return true;
                      });
  }

  // Whether `blocks` blocks of kernel k with smem bytes each are all resident at once (the
  // occupancy query), as the grid variant's cooperative launch needs.
  bool resident(const void* k, size_t smem, int64_t blocks) {
    int per_sm = 0;
    if (!memo_query(QueryKey{c10::cuda::current_device(), k, 0, smem}, per_sm, why,
                    [&](int& v, std::string& w) {
                      return cuda_ok(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
                                         &v, k, kPersistentThreads, smem),
                                     "the occupancy query", w);
                    })) {
      return false;
    }
    if (int64_t(per_sm) * prop.multiProcessorCount < blocks) {
      why = "its " + std::to_string(blocks) + " blocks cannot all be resident at once";
      return false;
    }
    return true;
  }

  // The grid variant's register tile (persistent_forward_reg) with `units` units a block:
  // the 16-bit forward where reg_tile_fits, unless RNNFAST_REG_TILE=0.
  PersistentLaunch reg_grid(int64_t units) {
    PersistentLaunch plan;
    if constexpr (kMma) {
      const void* k =
          reinterpret_cast<const void*>(&persistent_forward_reg<Cell, scalar_t, acc_t>);
      const size_t smem = reg_scratch_bytes();
      const int64_t blocks = (H + units - 1) / units;
      int ptx = 0;
      if (!fits(smem) || !prepare(k, false, ptx) || !resident(k, smem, blocks)) return plan;
      plan = {k, static_cast<int>(blocks), static_cast<int>(units), 0, N, smem};
      plan.nt = 16;
      plan.gates = G;
      plan.reg = true;
      plan.us = model.reg_us(N, round_up(static_cast<int>(G * units), 8), H, plan.blocks);
    }
    return plan;
  }

  // The grid variant: B = ceil(H / U) blocks, U = ceil(H / SMs) units each (at most
  // RNNFAST_PERSISTENT_MAX_BLOCKS blocks, a knob for scripts/calibrate_persistent.py), all
  // co-resident; a cooperative launch.
  PersistentLaunch grid() {
    PersistentLaunch plan;
    if (!prop.cooperativeLaunch) {
      why = "the device does not support cooperative launches";
      return plan;
    }
    const int sms = prop.multiProcessorCount;
    const int64_t max_blocks = env_knob("RNNFAST_PERSISTENT_MAX_BLOCKS");
    const int64_t spread = max_blocks > 0 ? std::min<int64_t>(sms, max_blocks) : sms;
    const int64_t K = kBackward ? G * H : H;
    const int64_t units = (H + spread - 1) / spread;
    const int64_t w_rows = kBackward ? units : G * units;
    if (kMma && reg_tile && reg_tile_fits(N, w_rows, H)) {
      plan = reg_grid(units);
      if (plan.kernel != nullptr) return plan;
    }
    for_tiles(N, w_rows, mma_tile_rows, [&](auto nt, auto rpw) {
      constexpr int kNT = decltype(nt)::value, kRPW = decltype(rpw)::value;
      const void* k = kernel<kNT, kRPW, false>();
      const int r_pad = round_up(static_cast<int>(w_rows), kRPW);
      const int64_t ld = operand_ld(kMma, static_cast<int>(K));
      // two tiles of xs where there are several tiles and they fit: later tiles staged by
      // cp.async during the earlier ones' work
      int xs_tiles = 1;
      size_t smem = smem_bytes<kNT, kRPW, false>(r_pad, ld, 0);
      if (N > kNT) {
        const size_t two = smem_bytes<kNT, kRPW, false>(r_pad, ld, 0, 2);
        if (two <= prop.sharedMemPerBlockOptin) {
          smem = two;
          xs_tiles = 2;
        }
      }
      int ptx = 0;
      const int64_t blocks = (H + units - 1) / units;
      if (!fits(smem) || !prepare(k, false, ptx) || !resident(k, smem, blocks)) return false;
      const int x_size = sizeof(x_t);
      plan = {k, static_cast<int>(blocks), static_cast<int>(units), 0, N, smem};
      plan.xs_tiles = xs_tiles;
      plan.nt = kNT;
      plan.rpw = kRPW;
      plan.gates = G;
      plan.us = model.persistent_us(N, kNT, r_pad, K, x_size, kMma, plan.blocks);
      return true;
    });
    return plan;
  }

  // The cluster variant: clusters of C blocks (C = ceil(H / U), U = ceil(H / C0), C0 in
  // 16 (where the device allows clusters that large), 8, 4, 2, 1, at most H), each cluster
  // holding all of W_hh and taking N_c rows of the batch; as many clusters as run at once
  // (the occupancy query), N_c = ceil(N / clusters), fewer clusters where N_c's two turns
  // do not fit in shared memory (then they take turns). The cheapest C and tile by the
  // cost model.
  // Knobs for the tests and calibration: RNNFAST_CLUSTER_SIZE (C0),
  // RNNFAST_CLUSTER_ROWS (N_c, where it fits).
  PersistentLaunch cluster() {
    PersistentLaunch best;
    if (prop.major < 9) {
      why = "thread-block clusters need compute capability 9.0 or newer, and the device has " +
            std::to_string(prop.major) + "." + std::to_string(prop.minor);
      return best;
    }
    const int sms = prop.multiProcessorCount;
    const int64_t forced_size = env_knob("RNNFAST_CLUSTER_SIZE");
    const int64_t forced_rows = env_knob("RNNFAST_CLUSTER_ROWS");
    std::string first_why;
    for (int c0 : {16, 8, 4, 2, 1}) {
      if (forced_size > 0 ? c0 != forced_size : c0 > H) continue;
      const int64_t units = (H + c0 - 1) / c0;
      const int cs = static_cast<int>((H + units - 1) / units);
      const int64_t K = kBackward ? G * H : H, w_rows = kBackward ? units : G * units;
      const int64_t guess_rows = (N + std::max(1, sms / cs) - 1) / std::max(1, sms / cs);
      for_cluster_tiles(w_rows, [&](auto nt, auto rpw) {
        constexpr int kNT = decltype(nt)::value, kRPW = decltype(rpw)::value;
        const void* k = kernel<kNT, kRPW, true>();
        const int r_pad = round_up(static_cast<int>(w_rows), kRPW);
        const int64_t ld = operand_ld(kMma, static_cast<int>(K));
        // code for 9.0 or newer (below it the cluster helpers trap): not so where only an
        // older architecture's PTX was built and the driver compiled that
        int ptx = 0;
        // the kernel's static shared memory (kClusterStaticSmem) beside the dynamic
        if (!fits(smem_bytes<kNT, kRPW, true>(r_pad, ld, 1) + kClusterStaticSmem) ||
            !prepare(k, cs > 8, ptx)) {
          return false;
        }
        if (ptx < 90) {
          why = "this build's kernels were compiled for compute capability " +
                std::to_string(ptx / 10) + "." + std::to_string(ptx % 10) +
                ", and clusters need 9.0 (build with TORCH_CUDA_ARCH_LIST including 9.0)";
          return false;
        }
        // the most rows whose two turns fit
        int64_t cap = kNT;
        while (cap < N && smem_bytes<kNT, kRPW, true>(r_pad, ld, cap + kNT) +
                                  kClusterStaticSmem <=
                              prop.sharedMemPerBlockOptin) {
          cap += kNT;
        }
        // clusters of cs blocks the device runs at once, with `rows` rows each
        auto active = [&](int64_t rows, int& clusters) {
          const size_t smem = smem_bytes<kNT, kRPW, true>(r_pad, ld, rows);
          return memo_query(
              QueryKey{c10::cuda::current_device(), k, cs, smem}, clusters, why,
              [&](int& v, std::string& w) {
                cudaLaunchAttribute attr;
                const cudaLaunchConfig_t cfg = cluster_config(cs, cs, smem, nullptr, attr);
                return cuda_ok(cudaOccupancyMaxActiveClusters(&v, k, &cfg),
                               "the cluster occupancy query", w);
              });
        };
        int at_once = 0;
        if (!active(std::min(cap, guess_rows), at_once)) return false;
        if (at_once < 1) {
          why = "a cluster of " + std::to_string(cs) + " blocks cannot be scheduled";
          return false;
        }
        int64_t rows = (N + std::min<int64_t>(N, at_once) - 1) / std::min<int64_t>(N, at_once);
        if (forced_rows > 0) rows = std::min(forced_rows, N);
        rows = std::min(rows, cap);
        const int64_t clusters = (N + rows - 1) / rows;
        if (clusters * cs > std::numeric_limits<int>::max()) {
          why = "its " + std::to_string(clusters * cs) + " blocks exceed a launch's limit";
          return false;
        }
        // the clusters that run at once with this many rows (the first query's were a guess)
        if (!active(rows, at_once)) return false;
        if (at_once < 1) {
          why = "a cluster of " + std::to_string(cs) + " blocks cannot be scheduled";
          return false;
        }
        PersistentLaunch plan{k, static_cast<int>(clusters * cs), static_cast<int>(units), cs,
                              rows, smem_bytes<kNT, kRPW, true>(r_pad, ld, rows)};
        plan.nt = kNT;
        plan.rpw = kRPW;
        plan.gates = G;
        plan.async_exchange = async_exchange && cluster_async_ok<scalar_t, acc_t, kBackward>();
        // a block stores each of its values (G of them in the backward) into each block
        const int64_t pushes = rows * units * (kBackward ? G : 1) * cs;
        plan.us = model.cluster_us(rows, kNT, r_pad, K, pushes, kMma,
                                   (clusters + at_once - 1) / at_once);
        if (best.kernel == nullptr || plan.us < best.us) best = plan;
        return true;
      });
      if (first_why.empty()) first_why = why;  // the largest cluster's reason
    }
    if (best.kernel == nullptr) {
      why = !first_why.empty() ? first_why
                               : "RNNFAST_CLUSTER_SIZE=" + std::to_string(forced_size) +
                                     " is not one of 16, 8, 4, 2, 1";
    }
    return best;
  }
};

// A plan for rnnfast::note_cuda_plan: its cost-model estimate and shape (the estimates of
// the other candidates are the caller's to fill in).
inline CudaPlanNote plan_note(const PersistentLaunch& plan) {
  CudaPlanNote n;
  if (plan.kernel == nullptr) return n;
  n.us = plan.us;
  n.blocks = plan.blocks;
  n.units = plan.units;
  n.cluster = plan.cluster;
  n.nt = plan.nt;
  n.rpw = plan.rpw;
  n.xs_tiles = plan.cluster > 0 ? 0 : plan.xs_tiles;
  n.group_rows = plan.group_rows;
  n.reg = plan.reg ? 1 : 0;
  n.async_exchange = plan.async_exchange ? 1 : 0;
  n.range_wait = plan.range_wait ? 1 : 0;
  return n;
}

// Picks the path for one op call from the mode (rnnfast::cuda_path_mode), the fit on chip
// and the cost model, and records it (rnnfast::note_cuda_path): `persistent` is the grid
// variant, `cluster` the cluster variant, `auto` the cheapest of those and the per-step
// path. Where a forced variant cannot run, the plan says why in `refused` and the op, after
// its dispatch, raises with check_persistent_refusal (ops.cpp; nothing is thrown from here).
// A forced variant whose forward fits but whose backward does not is refused at a training
// forward (`training`: the forward saves for a backward), not after it at the backward.
template <typename Cell, typename scalar_t, typename acc_t, bool kBackward>
PersistentLaunch plan_persistent(int64_t N, int64_t H, at::ScalarType dtype,
                                 bool training = false) {
  const CudaPath mode = cuda_path_mode();
  if (mode == CudaPath::kStep) {
    note_cuda_path(kBackward, CudaPath::kStep);
    return {};
  }
  // a bad RNNFAST_MMA_ROWS is an error on every path that may run the grid variant
  std::string rows_value;
  const int rows = mma_rows(rows_value);
  if (rows == 0) {
    PersistentLaunch plan;
    plan.refused = "RNNFAST_MMA_ROWS is '" + rows_value + "', expected 16, 32 or 64";
    return plan;
  }
  std::string reg_value;
  const int reg = reg_tile_knob(reg_value);
  if (reg < 0) {
    PersistentLaunch plan;
    plan.refused = "RNNFAST_REG_TILE is '" + reg_value + "', expected 0 or 1";
    return plan;
  }
  std::string exchange_value;
  const int exchange = cluster_exchange_knob(exchange_value);
  if (exchange < 0) {
    PersistentLaunch plan;
    plan.refused = "RNNFAST_CLUSTER_EXCHANGE is '" + exchange_value +
                   "', expected 'barrier' or 'async'";
    return plan;
  }
  std::string wait_value;
  const int range = reg_wait_knob(wait_value);
  if (range < 0) {
    PersistentLaunch plan;
    plan.refused = "RNNFAST_REG_WAIT is '" + wait_value + "', expected 'grid' or 'range'";
    return plan;
  }
  PersistentPlanner<Cell, scalar_t, acc_t, kBackward> planner(N, H, dtype, rows, reg == 1,
                                                              exchange == 1);
  auto forced = [&](PersistentLaunch plan, const char* name) {
    plan.range_wait = plan.reg && range == 1;
    const std::string forced_why = std::string("the ") + name +
                                   " CUDA path was forced (rnnfast.cuda_path / "
                                   "RNNFAST_CUDA_PATH), but ";
    if (plan.kernel == nullptr) {
      plan.refused = forced_why + "it cannot run for H=" + std::to_string(H) + ": " + planner.why;
      return plan;
    }
    if (!kBackward && training) {
      PersistentPlanner<Cell, scalar_t, acc_t, true> back(N, H, dtype);
      const PersistentLaunch back_plan = mode == CudaPath::kCluster ? back.cluster() : back.grid();
      if (back_plan.kernel == nullptr) {
        PersistentLaunch refusal;
        refusal.refused = forced_why + "its backward cannot run for H=" + std::to_string(H) +
                          " (its forward can): " + back.why +
                          "; without gradients (torch.no_grad()) the forward alone runs";
        return refusal;
      }
    }
    note_cuda_path(kBackward, mode);
    CudaPlanNote note = plan_note(plan);
    (plan.cluster > 0 ? note.cluster_us : note.grid_us) = plan.us;
    note_cuda_plan(kBackward, note);
    return plan;
  };
  if (mode == CudaPath::kPersistent) return forced(planner.grid(), "persistent");
  if (mode == CudaPath::kCluster) return forced(planner.cluster(), "cluster");
  // auto
  PersistentLaunch plan = planner.grid();
  const double grid_us = plan.kernel != nullptr ? plan.us : -1.0;
  const PersistentLaunch clustered = planner.cluster();
  if (clustered.kernel != nullptr && (plan.kernel == nullptr || clustered.us < plan.us)) {
    plan = clustered;
  }
  // the per-step forward GEMM runs in scalar_t, on tensor cores for 16-bit; the backward's
  // in bfloat16 on tensor cores too (StepGemm::dg16), else in acc_t on FFMA
  constexpr int G = Cell::kGates;
  const double step_us = planner.model.step_us(2.0 * N * G * H * H, planner.step_mma);
  if (plan.kernel != nullptr && !(plan.us < step_us)) plan = PersistentLaunch{};
  plan.range_wait = plan.reg && range == 1;
  CudaPlanNote note = plan_note(plan);
  note.grid_us = grid_us;
  note.cluster_us = clustered.kernel != nullptr ? clustered.us : -1.0;
  note.step_us = step_us;
  note_cuda_plan(kBackward, note);
  note_cuda_path(kBackward, plan.kernel == nullptr ? CudaPath::kStep
                            : plan.cluster > 0     ? CudaPath::kCluster
                                                   : CudaPath::kPersistent);
  return plan;
}

// Launches the plan's kernel; returns "" or the launch's CUDA error, which the op raises
// after its dispatch (check_persistent_refusal), as it does a refusal.
template <typename scalar_t, typename acc_t>
std::string launch_persistent(const PersistentLaunch& plan,
                              PersistentParams<scalar_t, acc_t> params, const Tensor& like) {
  params.units = plan.units;
  params.group_rows = plan.group_rows;
  params.xs_tiles = plan.xs_tiles;
  params.async_exchange = plan.cluster > 0 && plan.async_exchange;
  // the forward's input projection from DRAM: larger than L2 (it was written before the
  // launch, from its first step on, so its first steps are gone from L2)
  params.prefetch_xp =
      params.xp != nullptr &&
      double(params.T) * params.N * plan.gates * params.H * sizeof(scalar_t) >
          double(at::cuda::getCurrentDeviceProperties()->l2CacheSize);
  // a trace asked for this direction's next launch (rnnfast._ops._trace_next): a buffer
  // of the launch's blocks and min(T, asked) steps, fewer where that passes
  // kTraceMaxSlots (StepTrace); noted once the launch is made
  const bool backward = params.dy != nullptr;
  const int64_t trace_steps = std::min<int64_t>(
      {take_trace_request(backward), params.T,
       std::max<int64_t>(1, kTraceMaxSlots / (int64_t(plan.blocks) * kTraceMarks))});
  Tensor trace;
  if (trace_steps > 0) {
    try {
      trace = at::zeros({kTraceHeader + int64_t(plan.blocks) * trace_steps * kTraceMarks},
                        like.options().dtype(at::kLong));
    } catch (const std::exception& e) {
      return std::string("the step trace's buffer could not be allocated: ") + e.what();
    }
    params.trace = reinterpret_cast<long long*>(trace.data_ptr<int64_t>());
    params.trace_steps = static_cast<int>(trace_steps);
    params.trace_blocks = plan.blocks;
  }
  void* args[] = {&params};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  std::string why;
  Tensor counter;
  if (plan.cluster > 0) {
    cudaLaunchAttribute attr;
    const cudaLaunchConfig_t cfg =
        cluster_config(plan.cluster, plan.blocks, plan.smem, stream, attr);
    cuda_ok(cudaLaunchKernelExC(&cfg, plan.kernel, args), "launching the cluster kernel", why);
  } else {
    // the barrier's counter (the range wait's: one a warp): zero before the launch; freed
    // after it in stream order
    counter = at::zeros({plan.range_wait ? kPersistentThreads / 32 * kRangeStride : 1},
                        like.options().dtype(at::kLong));
    auto* counters = reinterpret_cast<unsigned long long*>(counter.data_ptr<int64_t>());
    (plan.range_wait ? params.range_counters : params.barrier) = counters;
    cuda_ok(cudaLaunchCooperativeKernel(plan.kernel, plan.blocks, kPersistentThreads, args,
                                        plan.smem, stream),
            "the cooperative launch", why);
  }
  if (why.empty() && trace.defined()) note_trace(backward, trace, plan.blocks, trace_steps);
  return why;
}

}  // namespace rnnfast::cuda
