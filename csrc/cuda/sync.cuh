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
