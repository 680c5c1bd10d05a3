// The synchronisation primitives of the persistent kernels (persistent.cuh), without torch:
// scripts/sync_bench.cu includes this file too, to time them on their own.
//
// Grid barrier (the grid variant): one 64-bit counter per launch, zeroed before it; at its
// k-th barrier every block adds 1 and waits until the counter reaches k * B (B blocks, all
// co-resident: a cooperative launch). Split in two halves, so that loads which need no
// other block's data can go between them:
//   grid_arrive: __syncthreads, then thread 0's fence.acq_rel.gpu and red.relaxed.gpu add
//     (no value comes back, so the wait starts at once): the arrival releases the block's
//     writes. The fence (a MEMBAR in SASS) waits for every outstanding access of thread 0's
//     warp, so a load from DRAM issued before it would delay the arrival by its round trip.
//   grid_wait: thread 0 spins with ld.acquire.gpu, then __syncthreads orders every later
//     read of the block after that acquire (the pattern of CUTLASS's GenericBarrier); a
//     spin past kGridWaitTrapCycles traps (an error, not a hang).
//
// Thread-block clusters (the cluster variant; compute capability 9.0 and newer):
// cluster_rank: this block's rank in its cluster; cluster_blocks: the cluster's size;
// cluster_index: the cluster's index in the grid; cluster_arrive + cluster_wait:
// barrier.cluster.arrive (release) and barrier.cluster.wait (acquire) by every thread of
// the cluster's blocks, which orders the stores before the arrival into peers' shared
// memory before every access after the wait. Split, so that loads which need no peer's
// data can be issued between the two (the release fences this thread's earlier stores
// GPU-wide: in SASS a MEMBAR.ALL.GPU, so the arrival itself takes a round trip).
// peer_shared(p, rank): the address of *p (this block's shared memory) in the shared
// memory of the cluster's block `rank` (distributed shared memory).
// Compiled for every architecture; the host launches cluster kernels only where they hold
// code for 9.0 or newer, so the versions below 9.0 only trap.
#pragma once

#include <cuda_runtime.h>

namespace rnnfast::cuda {

__device__ __forceinline__ void grid_arrive(unsigned long long* counter) {
  __syncthreads();
  if (threadIdx.x == 0) {
    asm volatile("fence.acq_rel.gpu;\n\tred.relaxed.gpu.global.add.u64 [%0], 1;"
                 :
                 : "l"(counter)
                 : "memory");
  }
}

// A wait that lasts kGridWaitTrapCycles (about half a minute at 2 GHz; a step takes
// microseconds, under compute-sanitizer milliseconds) can only be a broken protocol: it
// traps, so that the launch fails with an error instead of hanging the GPU.
constexpr long long kGridWaitTrapCycles = 1LL << 36;

__device__ __forceinline__ void grid_wait(const unsigned long long* counter,
                                          unsigned long long target) {
  if (threadIdx.x == 0) {
    const long long since = clock64();
    unsigned long long seen;
    do {
      asm volatile("ld.acquire.gpu.global.u64 %0, [%1];" : "=l"(seen) : "l"(counter) : "memory");
      if (seen < target && clock64() - since > kGridWaitTrapCycles) __trap();
    } while (seen < target);
  }
  __syncthreads();
}

// A spin's check, for the waits below: true once it should give up, past limit_cycles since
// `since` or once *abort is set (then *abort is set); without an abort flag (nullptr: the
// kernels) past the limit a trap, an error rather than a hang.
__device__ __forceinline__ bool spin_gave_up(long long since, long long limit_cycles,
                                             unsigned* abort) {
  const bool late = clock64() - since > limit_cycles;
  if (abort == nullptr) {
    if (late) __trap();
    return false;
  }
  if (late || *reinterpret_cast<volatile unsigned*>(abort) != 0u) {
    atomicExch(abort, 1u);
    return true;
  }
  return false;
}

// Per-block flags (the grid variant's RNNFAST_GRID_EXCHANGE=flags): the same barrier
// without one counter that every block adds to (their adds serialise at one L2 slice). At
// its k-th barrier block b's thread 0, after the block's __syncthreads, fences
// (fence.acq_rel.gpu: a release of the block's writes, as grid_arrive's) and stores k into
// flags[b]; the wait polls every block's flag with ld.relaxed.gpu (thread i flags i,
// i + blockDim, ...) until each is at least k, then fence.acq_rel.gpu (with the relaxed
// loads that saw the flags, an acquire: an ld.acquire in the loop would invalidate L1 at
// every poll) and __syncthreads. flags: one u32 per block,
// zeroed before the launch. The wait gives up past limit_cycles as ll_wait_pieces does
// (trap, or with an abort flag false).
__device__ __forceinline__ void flags_arrive(unsigned* flags, unsigned k) {
  __syncthreads();
  if (threadIdx.x == 0) {
    asm volatile("fence.acq_rel.gpu;\n\tst.relaxed.gpu.global.u32 [%0], %1;"
                 :
                 : "l"(flags + blockIdx.x), "r"(k)
                 : "memory");
  }
}
__device__ __forceinline__ bool flags_wait(const unsigned* flags, unsigned k,
                                           long long limit_cycles, unsigned* abort) {
  bool ok = true;
  for (unsigned i = threadIdx.x; i < gridDim.x; i += blockDim.x) {
    const long long since = clock64();
    unsigned seen;
    for (;;) {
      asm volatile("ld.relaxed.gpu.global.u32 %0, [%1];" : "=r"(seen) : "l"(flags + i) : "memory");
      if (seen >= k) break;
      if (spin_gave_up(since, limit_cycles, abort)) {
        ok = false;
        break;
      }
    }
  }
  asm volatile("fence.acq_rel.gpu;" ::: "memory");
  __syncthreads();
  return ok;
}

// LL exchange (the grid variant's alternative to the barrier, RNNFAST_GRID_EXCHANGE=ll; an
// idea of NCCL's LL protocol): a value travels with the number of the step that made it in
// one 8-byte word, value bits low, flag high, stored with one st.relaxed.gpu (single-copy
// atomic: a reader sees the old word or the new one, never half of each), so a reader that
// sees its step's flag has the value: no fence, no barrier, one L2 round trip. Readers load
// two words at a time (ld.relaxed.gpu.v2.u64, each 8-byte element single-copy atomic) and
// load again those whose flag is not yet the step's.
__device__ __forceinline__ void ll_store(unsigned long long* p, unsigned bits, unsigned flag) {
  const unsigned long long w = (static_cast<unsigned long long>(flag) << 32) | bits;
  asm volatile("st.relaxed.gpu.global.u64 [%0], %1;" ::"l"(p), "l"(w) : "memory");
}
__device__ __forceinline__ ulonglong2 ll_load2(const unsigned long long* p) {
  ulonglong2 w;
  asm volatile("ld.relaxed.gpu.global.v2.u64 {%0, %1}, [%2];"
               : "=l"(w.x), "=l"(w.y)
               : "l"(p)
               : "memory");
  return w;
}
__device__ __forceinline__ unsigned ll_flag(unsigned long long w) { return unsigned(w >> 32); }
__device__ __forceinline__ unsigned ll_bits(unsigned long long w) { return unsigned(w); }

// Loads kBatch pieces (two LL words each, at base + off(i)) into v until every piece of
// `valid` (bit i) carries the flag `want` in its first word and, where `second` has bit i,
// in its second: all kBatch loads go out back to back (a flag check between two loads
// would make each load a round trip of its own), then, while a piece is missing, one load
// at a time polls the first missing piece (polling the whole batch would read it all from
// L2 once a round trip, in every block at once), after which all are loaded again (a piece
// that carried `want` still does: its writer cannot store into that turn again before this
// block has read it). Pieces outside `valid` are loaded too (off(i) must be a readable
// address) and ignored. off(i) gives piece i's offset (a function: the caller need not
// build an array of them). Returns true once all are there; past limit_cycles, or once
// *abort is set, it sets *abort and returns false, or without an abort flag (nullptr)
// traps: an error, not a hang. poll_one false: no polling of one piece; every load again at
// once, round trip after round trip (the lowest latency where L2 has the bandwidth to
// spare: the choice is a knob until a GPU run has measured both, RNNFAST_GRID_EXCHANGE
// ll / ll-spin). (The kernels' stage_ll and scripts/sync_bench.cu's ll and ll_spin modes.)
template <int kBatch, typename Offset>
__device__ __forceinline__ bool ll_wait_pieces(const unsigned long long* base, Offset off,
                                               unsigned valid, unsigned second, unsigned want,
                                               ulonglong2 (&v)[kBatch], long long limit_cycles,
                                               unsigned* abort, bool poll_one = true) {
  const long long since = clock64();
  auto gave_up = [&]() { return spin_gave_up(since, limit_cycles, abort); };
  for (;;) {
#pragma unroll
    for (int i = 0; i < kBatch; ++i) v[i] = ll_load2(base + off(i));
    unsigned ready = 0;
#pragma unroll
    for (int i = 0; i < kBatch; ++i) {
      const bool two = (second >> i & 1u) != 0;
      ready |= unsigned(ll_flag(v[i].x) == want && (!two || ll_flag(v[i].y) == want)) << i;
    }
    const unsigned left = valid & ~ready;
    if (left == 0) return true;
    if (!poll_one) {
      if (gave_up()) return false;
      continue;
    }
    const int first = __ffs(left) - 1;
    const int o = off(first);
    const bool two = (second >> first & 1u) != 0;
    for (;;) {
      const ulonglong2 w = ll_load2(base + o);
      if (ll_flag(w.x) == want && (!two || ll_flag(w.y) == want)) break;
      if (gave_up()) return false;
    }
  }
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
__device__ __forceinline__ int cluster_rank() { return int(__clusterRelativeBlockRank()); }
__device__ __forceinline__ int cluster_blocks() { return int(__clusterSizeInBlocks()); }
__device__ __forceinline__ int cluster_index() { return int(__clusterIdx().x); }
__device__ __forceinline__ void cluster_arrive() { __cluster_barrier_arrive(); }
__device__ __forceinline__ void cluster_wait() { __cluster_barrier_wait(); }
template <typename T>
__device__ __forceinline__ T* peer_shared(T* p, int rank) {
  return static_cast<T*>(__cluster_map_shared_rank(static_cast<void*>(p), rank));
}
#else
__device__ __forceinline__ int cluster_rank() { __trap(); return 0; }
__device__ __forceinline__ int cluster_blocks() { __trap(); return 1; }
__device__ __forceinline__ int cluster_index() { __trap(); return 0; }
__device__ __forceinline__ void cluster_arrive() { __trap(); }
__device__ __forceinline__ void cluster_wait() { __trap(); }
template <typename T>
__device__ __forceinline__ T* peer_shared(T* p, int) { __trap(); return p; }
#endif
__device__ __forceinline__ void cluster_sync() {
  cluster_arrive();
  cluster_wait();
}

}  // namespace rnnfast::cuda
