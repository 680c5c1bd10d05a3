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
// The async exchange (RNNFAST_CLUSTER_EXCHANGE=async; 4- and 8-byte values): instead of
// generic stores into the peers' shared memory and the cluster barrier, each value goes
// by st.async, which completes its bytes on the receiving block's mbarrier for that turn
// (one a turn in every block, mbar_init once, one arrival a phase: the block's own
// mbar_arrive_expect with the bytes the turn receives that step); each block waits on its
// own mbarrier only (mbar_wait: try_wait.parity with acquire at cluster scope). No
// MEMBAR, no cluster-wide barrier: sync_bench measured a step's exchange of 768 values
// 0.36-0.41 us faster than the stores and the barrier at one cluster of 2-16 blocks.
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

// The calling thread polls *counter (acquire, gpu scope) until it reaches target.
__device__ __forceinline__ void poll_counter(const unsigned long long* counter,
                                             unsigned long long target) {
  const long long since = clock64();
  unsigned long long seen;
  do {
    asm volatile("ld.acquire.gpu.global.u64 %0, [%1];" : "=l"(seen) : "l"(counter) : "memory");
    if (seen < target && clock64() - since > kGridWaitTrapCycles) __trap();
  } while (seen < target);
}

__device__ __forceinline__ void grid_wait(const unsigned long long* counter,
                                          unsigned long long target) {
  if (threadIdx.x == 0) poll_counter(counter, target);
  __syncthreads();
}

// The register tile's range wait (RNNFAST_REG_WAIT=range; persistent.cuh): a counter per
// warp's k range of h instead of one for the grid. The arrival (after the block's
// __syncthreads, by thread 0): the same release fence, then one add to the counter of each
// range the block's units fall in (bits of `ranges`). The wait (lane 0 of each warp, then
// __syncwarp, which carries its acquire to the other lanes): until its range's counter
// reaches `target` (the step count times the blocks that make the range; 0: no wait).
// The counters lie kRangeStride apart (128 bytes: each its own line, so that the ranges'
// adds and polls spread over L2's slices). Every lane of the warp polls (one coalesced
// load), so each has its own acquire; __syncwarp then keeps the warp together.
constexpr int kRangeStride = 16;
__device__ __forceinline__ void range_arrive(unsigned long long* counters, unsigned ranges) {
  asm volatile("fence.acq_rel.gpu;" ::: "memory");
  for (int r = 0; ranges != 0u; ++r, ranges >>= 1) {
    if (ranges & 1u) {
      asm volatile("red.relaxed.gpu.global.add.u64 [%0], 1;" ::"l"(counters + r * kRangeStride)
                   : "memory");
    }
  }
}
__device__ __forceinline__ void range_wait(const unsigned long long* counters, int range,
                                           unsigned long long target) {
  if (target > 0) poll_counter(counters + range * kRangeStride, target);
  __syncwarp();
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
// a shared-memory pointer as the 32-bit shared::cta address PTX takes
__device__ __forceinline__ unsigned smem_u32(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}
// the shared::cluster address of this block's shared address `addr` in block `rank`
__device__ __forceinline__ unsigned map_rank(unsigned addr, int rank) {
  unsigned out;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(out) : "r"(addr), "r"(rank));
  return out;
}
// The async exchange (see the header): an mbarrier of this block with `count` arrivals a
// phase, made visible to the cluster's other blocks (whose st.async complete on it) by the
// fence here and a cluster barrier after it.
__device__ __forceinline__ void mbar_init(unsigned long long* bar, unsigned count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_u32(bar)), "r"(count)
               : "memory");
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
}
// this block's arrival on its own mbarrier for the current phase, which then also waits
// for `bytes` bytes of st.async (some may have landed already: the phase completes when
// the arrivals are in and the bytes' count is back at zero)
__device__ __forceinline__ void mbar_arrive_expect(unsigned long long* bar, unsigned bytes) {
  asm volatile("mbarrier.arrive.expect_tx.release.cta.shared::cta.b64 _, [%0], %1;" ::"r"(
                   smem_u32(bar)),
               "r"(bytes)
               : "memory");
}
// v into *dst (this block's shared address) in the shared memory of block `rank`,
// completing 4 or 8 bytes on that block's mbarrier at bar's offset
__device__ __forceinline__ void st_async(float* dst, float v, unsigned long long* bar, int rank) {
  asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.b32 [%0], %1, [%2];" ::"r"(
                   map_rank(smem_u32(dst), rank)),
               "r"(__float_as_uint(v)), "r"(map_rank(smem_u32(bar), rank))
               : "memory");
}
__device__ __forceinline__ void st_async(double* dst, double v, unsigned long long* bar,
                                         int rank) {
  asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.b64 [%0], %1, [%2];" ::"r"(
                   map_rank(smem_u32(dst), rank)),
               "l"(__double_as_longlong(v)), "r"(map_rank(smem_u32(bar), rank))
               : "memory");
}
// every calling thread waits (acquire, cluster scope) until the phase of this block's
// mbarrier with the given parity has completed; a wait past kGridWaitTrapCycles traps
__device__ __forceinline__ void mbar_wait(unsigned long long* bar, unsigned parity) {
  const unsigned addr = smem_u32(bar);
  const long long since = clock64();
  unsigned done = 0;
  for (;;) {
    asm volatile(
        "{\n\t.reg .pred p;\n\t"
        "mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 p, [%1], %2;\n\t"
        "selp.u32 %0, 1, 0, p;\n\t}"
        : "=r"(done)
        : "r"(addr), "r"(parity)
        : "memory");
    if (done) return;
    if (clock64() - since > kGridWaitTrapCycles) __trap();
  }
}
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
__device__ __forceinline__ void mbar_init(unsigned long long*, unsigned) { __trap(); }
__device__ __forceinline__ void mbar_arrive_expect(unsigned long long*, unsigned) { __trap(); }
template <typename T>
__device__ __forceinline__ void st_async(T*, T, unsigned long long*, int) { __trap(); }
__device__ __forceinline__ void mbar_wait(unsigned long long*, unsigned) { __trap(); }
#endif
__device__ __forceinline__ void cluster_sync() {
  cluster_arrive();
  cluster_wait();
}

}  // namespace rnnfast::cuda
