// Times the persistent kernels' synchronisation on its own (csrc/cuda/sync.cuh), so that a
// GPU run measures the cost model's floors directly and compares exchanges not in the
// kernels. A standalone program (no torch): scripts/gpu_check.sh's syncbench stage builds
// it with nvcc and runs it; one JSON object per line on stdout.
//
//   nvcc -O3 -std=c++17 -arch=sm_90 -o sync_bench scripts/sync_bench.cu && ./sync_bench
//
// Each test runs T steps of one pattern in one launch and reports microseconds per step
// (CUDA events around the launch, the median of 3 after a warm-up launch; the launch's own
// ~5 us and its memsets spread over T), the values that arrived wrong (each step's values
// are checked where they are read; anything but 0 means the exchange is broken) and
// whether a bounded spin gave up (`aborted`: the protocol hung). Needs nvcc 12.1 or newer
// (st.async, PTX 8.1).
//   chase    one thread's dependent __ldcg loads through a 1 MiB ring (L2 hits): the L2
//            round trip, ns per load.
//   grid     B blocks of a cooperative launch (all co-resident), per step:
//            barrier  grid_arrive + grid_wait and nothing else;
//            nofence  the same counter without the arrival's fence (red.relaxed alone, a
//                     relaxed spin): what the fence (MEMBAR) costs; orders nothing;
//            stage    each block stores its share of n floats (turn s & 1), the grid
//                     barrier, then every block loads all n into shared memory with
//                     16-byte __ldcg vectors, 8 in flight per thread (the grid variant as
//                     built: h_t through L2).
//   cluster  clusters of C blocks (compute capability 9.0 on), one cluster or as many as
//            fit at once, per step:
//            barrier  cluster_arrive + cluster_wait;
//            relaxed  barrier.cluster.arrive.relaxed + wait: the barrier without the
//                     release's MEMBAR.ALL.GPU (orders nothing: a floor, not a protocol);
//            push     each block stores its share of n floats into every block's shared
//                     memory (the next turn), the cluster barrier, then every block reads
//                     all n (the cluster variant as built: generic stores to the
//                     addresses __cluster_map_shared_rank gives, ST.E in SASS);
//            push_cluster  the same with st.shared::cluster to mapa's 32-bit addresses;
//            async    the same stores as st.async with mbarrier::complete_tx (one mbarrier
//                     per turn in each block, armed by its thread 0 with expect_tx of the
//                     turn's n * 4 bytes), and each block waits on its own mbarrier
//                     (try_wait.parity.acquire.cluster): no MEMBAR, no cluster barrier.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <random>
#include <vector>

#include "../csrc/cuda/sync.cuh"

using namespace rnnfast::cuda;

#define CHECK(x)                                                                     \
  do {                                                                               \
    cudaError_t e_ = (x);                                                            \
    if (e_ != cudaSuccess) {                                                         \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x,                 \
                   cudaGetErrorString(e_));                                          \
      std::exit(1);                                                                  \
    }                                                                                \
  } while (0)

constexpr int kThreads = 256, kBatch = 8;
// indices into main's names[]
enum Mode {
  kBarrier = 0,
  kStage = 1,
  kPush = 2,
  kRelaxed = 3,
  kAsync = 4,
  kPushCluster = 5,
  kNoFence = 6
};

// the value of element i at step s: exact in float, different from step to step
__host__ __device__ inline float value_of(int s, int i) {
  return float((s * 131 + i * 7) % 65521);
}

// Every spin of the nofence and async modes is bounded: past kSpinCycles (about 2 s) it
// raises `abort`, after which every spin gives up at once (spin_gave_up, below), so
// that a broken protocol costs seconds and an "aborted" result rather than a hung GPU (the
// grid barrier's own spin, sync.cuh's, traps only after about half a minute, and the
// hardware cluster barrier is not bounded).
constexpr long long kSpinCycles = 4000000000LL;

// A spin's check: true once it should give up, past limit_cycles since `since` or once
// *abort is set (then *abort is set too).
__device__ __forceinline__ bool spin_gave_up(long long since, long long limit_cycles,
                                             unsigned* abort) {
  if (clock64() - since > limit_cycles || *reinterpret_cast<volatile unsigned*>(abort) != 0u) {
    atomicExch(abort, 1u);
    return true;
  }
  return false;
}

struct GridArgs {
  unsigned long long* counter;
  float* data;       // [2][n], the stage mode
  unsigned* errors;  // [2]: values that arrived wrong, and the abort flag
  int T, n, mode;
};

__global__ void __launch_bounds__(kThreads, 1) grid_bench(GridArgs a) {
  extern __shared__ float staged[];  // n floats
  const int B = gridDim.x, b = blockIdx.x, n = a.n;
  // shares split evenly
  const int lo = int(int64_t(b) * n / B), hi = int(int64_t(b + 1) * n / B);
  unsigned bad = 0;
  for (int s = 0; s < a.T; ++s) {
    const int turn = s & 1;
    // produce this block's share
    if (a.mode == kStage) {
      for (int i = lo + threadIdx.x; i < hi; i += blockDim.x) a.data[turn * n + i] = value_of(s, i);
    }
    // synchronise
    if (a.mode == kBarrier || a.mode == kStage) {
      grid_arrive(a.counter);
      grid_wait(a.counter, static_cast<unsigned long long>(s + 1) * B);
    } else if (a.mode == kNoFence) {
      __syncthreads();
      if (threadIdx.x == 0) {
        asm volatile("red.relaxed.gpu.global.add.u64 [%0], 1;" ::"l"(a.counter) : "memory");
        const unsigned long long target = static_cast<unsigned long long>(s + 1) * B;
        const long long since = clock64();
        unsigned long long seen;
        do {
          asm volatile("ld.relaxed.gpu.global.u64 %0, [%1];"
                       : "=l"(seen)
                       : "l"(a.counter)
                       : "memory");
        } while (seen < target && !spin_gave_up(since, kSpinCycles, a.errors + 1));
      }
      __syncthreads();
    }
    // consume all n
    if (a.mode == kStage) {
      const float4* src = reinterpret_cast<const float4*>(a.data + turn * n);
      float4* dst = reinterpret_cast<float4*>(staged);
      const int vecs = n / 4;
      for (int e0 = threadIdx.x; e0 < vecs; e0 += kBatch * blockDim.x) {
        float4 v[kBatch];
#pragma unroll
        for (int k = 0; k < kBatch; ++k) {
          const int e = e0 + k * blockDim.x;
          v[k] = e < vecs ? __ldcg(src + e) : make_float4(0, 0, 0, 0);
        }
#pragma unroll
        for (int k = 0; k < kBatch; ++k) {
          const int e = e0 + k * blockDim.x;
          if (e < vecs) {
            dst[e] = v[k];
            bad += v[k].x != value_of(s, 4 * e) || v[k].w != value_of(s, 4 * e + 3);
          }
        }
      }
    }
    // the block's reads of this step are done before its stores of the next
    __syncthreads();
  }
  if (bad) atomicAdd(a.errors, bad);
}

struct ClusterArgs {
  unsigned* errors;
  int T, n, mode;
};

__global__ void __launch_bounds__(kThreads, 1) cluster_bench(ClusterArgs a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  extern __shared__ __align__(16) float turns[];  // [2][n]
  __shared__ __align__(8) unsigned long long bars[2];  // the async mode's mbarriers, a turn each
  const int n = a.n, C = cluster_blocks(), rank = cluster_rank();
  // shares split evenly (n >= C: every block stores something each step, which the async
  // mode's phases rely on)
  const int lo = int(int64_t(rank) * n / C), hi = int(int64_t(rank + 1) * n / C);
  unsigned bad = 0;
  for (int i = threadIdx.x; i < 2 * n; i += blockDim.x) turns[i] = 0.0f;
  if (threadIdx.x == 0) {
    for (int k = 0; k < 2; ++k) {
      asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_u32(bars + k)) : "memory");
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  cluster_sync();
  for (int s = 0; s < a.T; ++s) {
    float* next = turns + (s & 1) * n;
    if (a.mode == kPush) {
      for (int i = lo + threadIdx.x; i < hi; i += blockDim.x) {
        const float v = value_of(s, i);
        for (int k = 0, r = rank; k < C; ++k, r = r + 1 < C ? r + 1 : 0) {
          *peer_shared(next + i, r) = v;
        }
      }
    }
    if (a.mode == kPushCluster) {
      for (int i = lo + threadIdx.x; i < hi; i += blockDim.x) {
        const unsigned v = __float_as_uint(value_of(s, i)), dst = smem_u32(next + i);
        for (int k = 0, r = rank; k < C; ++k, r = r + 1 < C ? r + 1 : 0) {
          asm volatile("st.shared::cluster.u32 [%0], %1;" ::"r"(map_rank(dst, r)), "r"(v)
                       : "memory");
        }
      }
    }
    if (a.mode == kAsync) {
      const unsigned bar = smem_u32(bars + (s & 1));
      if (threadIdx.x == 0) {  // this turn's bytes of step s: every block's share
        asm volatile("mbarrier.arrive.expect_tx.release.cta.shared::cta.b64 _, [%0], %1;"
                     :
                     : "r"(bar), "r"(unsigned(n) * 4u)
                     : "memory");
      }
      for (int i = lo + threadIdx.x; i < hi; i += blockDim.x) {
        const float v = value_of(s, i);
        const unsigned dst = smem_u32(next + i);
        for (int k = 0, r = rank; k < C; ++k, r = r + 1 < C ? r + 1 : 0) {
          asm volatile(
              "st.async.shared::cluster.mbarrier::complete_tx::bytes.b32 [%0], %1, [%2];"
              :
              : "r"(map_rank(dst, r)), "r"(__float_as_uint(v)), "r"(map_rank(bar, r))
              : "memory");
        }
      }
      unsigned done = 0;
      const long long since = clock64();
      while (!done && !spin_gave_up(since, kSpinCycles, a.errors + 1)) {
        asm volatile(
            "{\n\t.reg .pred p;\n\t"
            "mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 p, [%1], %2;\n\t"
            "selp.u32 %0, 1, 0, p;\n\t}"
            : "=r"(done)
            : "r"(bar), "r"(unsigned((s >> 1) & 1))
            : "memory");
      }
    } else if (a.mode == kRelaxed) {
      asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
      asm volatile("barrier.cluster.wait.aligned;" ::: "memory");
    } else {
      cluster_arrive();
      cluster_wait();
    }
    if (a.mode == kPush || a.mode == kPushCluster || a.mode == kAsync) {
      for (int i = threadIdx.x; i < n; i += blockDim.x) bad += next[i] != value_of(s, i);
      __syncthreads();  // the block's reads of this turn are done before its next stores
    }
  }
  cluster_sync();
  if (bad) atomicAdd(a.errors, bad);
#endif
}

__global__ void chase(const unsigned* ring, int hops, unsigned* sink) {
  unsigned i = 0;
  for (int h = 0; h < hops; ++h) i = __ldcg(ring + i);
  *sink = i;
}

template <typename Launch>
float time_launch(Launch launch) {
  cudaEvent_t start, end;
  CHECK(cudaEventCreate(&start));
  CHECK(cudaEventCreate(&end));
  launch();  // warm-up
  CHECK(cudaDeviceSynchronize());
  float ms[3];
  for (float& m : ms) {  // the median of 3
    CHECK(cudaEventRecord(start));
    launch();
    CHECK(cudaEventRecord(end));
    CHECK(cudaEventSynchronize(end));
    CHECK(cudaEventElapsedTime(&m, start, end));
  }
  CHECK(cudaEventDestroy(start));
  CHECK(cudaEventDestroy(end));
  std::sort(ms, ms + 3);
  return ms[1];
}

int main(int argc, char** argv) {
  const int T = argc > 1 ? std::atoi(argv[1]) : 2000;
  int dev = 0;
  CHECK(cudaGetDevice(&dev));
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, dev));
  const int sms = prop.multiProcessorCount;
  std::printf("{\"test\": \"device\", \"name\": \"%s\", \"sms\": %d, \"cc\": %d.%d, \"T\": %d}\n",
              prop.name, sms, prop.major, prop.minor, T);

  unsigned* errors;  // [2]: wrong values, abort (a spin gave up)
  CHECK(cudaMalloc(&errors, 2 * sizeof(unsigned)));
  // the two counters of the last launch: ", \"errors\": E, \"aborted\": A"
  auto outcome = [&] {
    unsigned h[2] = {0, 0};
    CHECK(cudaMemcpy(h, errors, sizeof(h), cudaMemcpyDeviceToHost));
    static char text[96];
    std::snprintf(text, sizeof(text), ", \"errors\": %u, \"aborted\": %s", h[0],
                  h[1] ? "true" : "false");
    return text;
  };

  {  // the L2 round trip: a random ring of 1 MiB
    const int len = 1 << 18, hops = 20000;
    std::vector<unsigned> order(len), ring(len);
    std::iota(order.begin(), order.end(), 0u);
    std::shuffle(order.begin() + 1, order.end(), std::mt19937(1));
    for (int k = 0; k < len; ++k) ring[order[k]] = order[(k + 1) % len];
    unsigned* d_ring;
    CHECK(cudaMalloc(&d_ring, len * sizeof(unsigned)));
    CHECK(cudaMemcpy(d_ring, ring.data(), len * sizeof(unsigned), cudaMemcpyHostToDevice));
    const float ms = time_launch([&] { chase<<<1, 1>>>(d_ring, hops, errors); });
    CHECK(cudaGetLastError());
    std::printf("{\"test\": \"chase\", \"ns_per_load\": %.1f}\n", ms * 1e6 / hops);
    CHECK(cudaFree(d_ring));
  }

  const int max_n = 16 * 1024;  // floats exchanged per step, at most (fp32 N=16, H=1024)
  unsigned long long* counter;
  float* data;
  CHECK(cudaMalloc(&counter, sizeof(unsigned long long)));
  CHECK(cudaMalloc(&data, 2 * max_n * sizeof(float)));
  CHECK(cudaFuncSetAttribute(grid_bench, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             max_n * int(sizeof(float))));
  const char* names[] = {"barrier", "stage", "push", "relaxed", "async", "push_cluster",
                         "nofence"};  // indexed by Mode
  // n: H=768 at N=1; bf16 N=16 (as many bytes as 6144 floats); float32 N=16
  const int sizes[] = {768, 6144, 12288};
  std::vector<int> block_counts;
  for (int B : {8, 32, 64, 128, sms}) {
    if (B <= sms && std::find(block_counts.begin(), block_counts.end(), B) == block_counts.end()) {
      block_counts.push_back(B);
    }
  }
  for (int B : block_counts) {
    for (int mode : {kBarrier, kNoFence, kStage}) {
      for (int n : sizes) {
        if ((mode == kBarrier || mode == kNoFence) && n != sizes[0]) continue;
        GridArgs a{counter, data, errors, T,
                   mode == kBarrier || mode == kNoFence ? 0 : n, mode};
        const size_t smem = size_t(a.n) * sizeof(float);
        float ms = time_launch([&] {
          CHECK(cudaMemset(counter, 0, sizeof(unsigned long long)));
          CHECK(cudaMemset(errors, 0, 2 * sizeof(unsigned)));
          void* args[] = {&a};
          CHECK(cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(grid_bench), B,
                                            kThreads, args, smem, 0));
        });
        // the memsets are inside the timed launch: a few microseconds over T steps
        std::printf("{\"test\": \"grid\", \"mode\": \"%s\", \"blocks\": %d, \"n\": %d, "
                    "\"us_per_step\": %.3f%s}\n",
                    names[mode], B, a.n, ms * 1e3 / T, outcome());
        std::fflush(stdout);
      }
    }
  }

  if (prop.major >= 9) {
    CHECK(cudaFuncSetAttribute(cluster_bench, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
    CHECK(cudaFuncSetAttribute(cluster_bench, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               2 * max_n * int(sizeof(float))));
    for (int C : {2, 4, 8, 16}) {
      for (int mode : {kBarrier, kRelaxed, kPush, kPushCluster, kAsync}) {
        for (int n : sizes) {
          if ((mode == kBarrier || mode == kRelaxed) && n != sizes[0]) continue;
          if (n < C) continue;  // every block must store each step (the async mode's phases)
          const size_t smem = 2 * size_t(n) * sizeof(float);
          cudaLaunchConfig_t cfg = {};
          cudaLaunchAttribute attr;
          attr.id = cudaLaunchAttributeClusterDimension;
          attr.val.clusterDim.x = C, attr.val.clusterDim.y = 1, attr.val.clusterDim.z = 1;
          cfg.blockDim = dim3(kThreads), cfg.dynamicSmemBytes = smem;
          cfg.attrs = &attr, cfg.numAttrs = 1;
          cfg.gridDim = dim3(C);
          int fit = 0;
          if (cudaOccupancyMaxActiveClusters(&fit, cluster_bench, &cfg) != cudaSuccess || fit < 1) {
            (void)cudaGetLastError();
            std::printf("{\"test\": \"cluster\", \"mode\": \"%s\", \"size\": %d, \"n\": %d, "
                        "\"skipped\": \"does not fit\"}\n", names[mode], C, n);
            continue;
          }
          for (int clusters : {1, fit}) {
            ClusterArgs a{errors, T, n, mode};
            cfg.gridDim = dim3(C * clusters);
            float ms = time_launch([&] {
              CHECK(cudaMemset(errors, 0, 2 * sizeof(unsigned)));
              void* args[] = {&a};
              CHECK(cudaLaunchKernelExC(&cfg, reinterpret_cast<const void*>(cluster_bench), args));
            });
            std::printf("{\"test\": \"cluster\", \"mode\": \"%s\", \"size\": %d, \"clusters\": %d, "
                        "\"n\": %d, \"us_per_step\": %.3f%s}\n",
                        names[mode], C, clusters, mode == kBarrier || mode == kRelaxed ? 0 : n,
                        ms * 1e3 / T, outcome());
            std::fflush(stdout);
            if (fit == 1) break;
          }
        }
      }
    }
  }
  return 0;
}
