// Persistent (weight-stationary) kernels: one cooperative launch runs a whole layer and
// direction, forward or backward, with W_hh held in shared memory for every step.
//
// Why: the per-step path (common.cuh) launches a GEMM and a pointwise kernel per step and
// reads W_hh from memory each time; at small N that costs ~15 us a step whatever the
// size. Here the steps are separated only by a grid-wide barrier.
//
// Tiling (G gates, U units per block, B = ceil(H / U) blocks, B <= the SM count):
//   Block b owns the hidden units [u0, u0 + U), u0 = b * U (the last block may own fewer).
//   forward : Ws[g * U + j][k] = W_hh[g * H + u0 + j][k]     R = G * U rows, K = H.
//             Per step and per tile of NT batch rows: stage h_{t-1}[n0 : n0 + NT, :] in
//             shared memory; gates[n][r] = sum_k h[n][k] Ws[r][k] in acc_t; the cell's
//             pointwise update of the block's units writes y[t] (and the cache).
//   backward: Ws[j][q] = W_hh[q][u0 + j]                     R = U rows, K = G * H.
//             Per step, phase A: the cell's pointwise backward of the block's units writes
//             the gate gradients dg[t]; grid barrier; phase B, per tile of NT rows: stage
//             dg_hh[t][n0 : n0 + NT, :]; dh_{t-1}[n][u0 + j] = sum_q dg[n][q] Ws[j][q].
//             A unit's dh and dc are only touched by its own block, so no barrier sits
//             between phase B and the next step's phase A: one barrier per step.
//   The input projection (before) and dx, dW_ih, dW_hh, db (after) stay whole-sequence
//   GEMMs, and the workspace layout is the per-step path's, so either forward path pairs
//   with either backward path.
//
// Dot product (tile_dot, FFMA in acc_t): warp w takes the rows in chunks of RPW; lane l
//   takes k = l, l + 32, ...; each lane holds NT x RPW partial sums, and a halving
//   exchange across the lanes (warp_split_reduce) leaves each lane NT * RPW / 32 finished
//   sums. The order is fixed: results are bitwise deterministic.
//
// Barrier protocol (grid_barrier): one 64-bit counter per launch, zeroed before it. At
//   its k-th barrier every block adds 1 and waits until the counter reaches k * B; the
//   counter only grows, so nothing is reset between steps. __syncthreads, then thread 0's
//   __threadfence before its add, order the block's writes before its arrival; thread 0's
//   fence after the wait and a second __syncthreads order every later read after it. Data
//   that another block wrote is read with ld.global.cg (L2), never from a stale L1 line.
//   All B blocks are co-resident: the launch is cooperative (it fails rather than
//   deadlocks otherwise) and B was checked against the occupancy query first.
#pragma once

#include <cuda_runtime.h>

#include <string>

#include "common.cuh"

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
  unsigned long long* barrier;
};

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

__device__ __forceinline__ void grid_barrier(unsigned long long* counter,
                                             unsigned long long target) {
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    atomicAdd(counter, 1ull);
    while (*reinterpret_cast<volatile unsigned long long*>(counter) < target) {
    }
    __threadfence();
  }
  __syncthreads();
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

// out[n][r] = sum_k xs[n][k] ws[r][k] for n < NT, r < r_pad (r_pad a multiple of RPW,
// padded rows of ws are zero); xs [NT, K], ws [r_pad, K], out [NT, r_pad], all in shared
// memory.
template <int NT, int RPW, typename w_t, typename x_t, typename acc_t>
__device__ __forceinline__ void tile_dot(const w_t* __restrict__ ws, int r_pad,
                                         const x_t* __restrict__ xs, int K,
                                         acc_t* __restrict__ out) {
  constexpr int M = NT * RPW, kPerLane = M / 32;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  for (int r0 = warp * RPW; r0 < r_pad; r0 += warps * RPW) {
    acc_t acc[M];
#pragma unroll
    for (int i = 0; i < M; ++i) acc[i] = acc_t(0);
    for (int k = lane; k < K; k += 32) {
      acc_t xv[NT];
#pragma unroll
      for (int n = 0; n < NT; ++n) xv[n] = acc_t(xs[n * K + k]);
#pragma unroll
      for (int i = 0; i < RPW; ++i) {
        const acc_t w = acc_t(ws[(r0 + i) * K + k]);
#pragma unroll
        for (int n = 0; n < NT; ++n) acc[n * RPW + i] += xv[n] * w;
      }
    }
    warp_split_reduce<M>(acc, lane);
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      const int idx = lane * kPerLane + j;
      out[(idx / RPW) * r_pad + r0 + idx % RPW] = acc[j];
    }
  }
}

// xs[nl][k] = src[n0 + nl][k] for the NT rows of a tile (zero past N); src [N, K].
template <int NT, typename x_t>
__device__ __forceinline__ void stage_rows(const x_t* src, int64_t n0, int64_t N, int K,
                                           x_t* __restrict__ xs) {
#pragma unroll 1
  for (int nl = 0; nl < NT; ++nl) {
    const bool valid = n0 + nl < N;
    const x_t* row = src + (n0 + nl) * K;
    for (int k = threadIdx.x; k < K; k += blockDim.x) {
      xs[nl * K + k] = valid ? load_cg(row + k) : x_t(0);
    }
  }
}

// Shared memory of a persistent kernel: ws [r_pad, K] w_t, xs [NT, K] x_t, out [NT, r_pad]
// acc_t, each region 16-byte aligned.
struct SmemLayout {
  size_t xs_offset, out_offset, bytes;
};
__host__ __device__ inline size_t align16(size_t v) { return (v + 15) / 16 * 16; }
template <typename w_t, typename x_t, typename acc_t>
__host__ __device__ inline SmemLayout smem_layout(int nt, int r_pad, int64_t K) {
  const size_t xs = align16(size_t(r_pad) * K * sizeof(w_t));
  const size_t out = align16(xs + size_t(nt) * K * sizeof(x_t));
  return {xs, out, out + size_t(nt) * r_pad * sizeof(acc_t)};
}

// The forward of one layer and direction. Cell provides kGates and
//   forward(p, s, t, tp, n, u, hh[G], h_prev): the pointwise update of unit u, row n.
template <typename Cell, typename scalar_t, typename acc_t, int NT, int RPW>
__global__ void __launch_bounds__(kPersistentThreads, 1)
    persistent_forward(const PersistentParams<scalar_t, acc_t> p) {
  constexpr int G = Cell::kGates;
  extern __shared__ __align__(16) unsigned char smem[];
  const int64_t N = p.N, H = p.H;
  const int U = p.units, K = static_cast<int>(H);
  const int64_t u0 = int64_t(blockIdx.x) * U;
  const int here = static_cast<int>(H - u0 < U ? H - u0 : U);
  const int r_pad = round_up(G * U, RPW);
  const SmemLayout lay = smem_layout<scalar_t, scalar_t, acc_t>(NT, r_pad, K);
  scalar_t* ws = reinterpret_cast<scalar_t*>(smem);
  scalar_t* xs = reinterpret_cast<scalar_t*>(smem + lay.xs_offset);
  acc_t* out = reinterpret_cast<acc_t*>(smem + lay.out_offset);

  for (int64_t idx = threadIdx.x; idx < int64_t(r_pad) * K; idx += blockDim.x) {
    const int r = static_cast<int>(idx / K), k = static_cast<int>(idx % K);
    const int g = r / U, j = r % U;
    ws[idx] = g < G && j < here ? p.w_hh[(g * H + u0 + j) * H + k] : scalar_t(0);
  }
  __syncthreads();

  for (int64_t s = 0; s < p.T; ++s) {
    const int64_t t = time_index(s, p.T, p.reverse), tp = time_index(s - 1, p.T, p.reverse);
    const scalar_t* h_prev = s == 0 ? p.h0 : p.y + tp * N * H;
    for (int64_t n0 = 0; n0 < N; n0 += NT) {
      stage_rows<NT>(h_prev, n0, N, K, xs);
      __syncthreads();
      tile_dot<NT, RPW>(ws, r_pad, xs, K, out);
      __syncthreads();
      for (int idx = threadIdx.x; idx < NT * here; idx += blockDim.x) {
        const int nl = idx / here, j = idx % here;
        if (n0 + nl >= N) continue;
        acc_t hh[G];
#pragma unroll
        for (int g = 0; g < G; ++g) hh[g] = out[nl * r_pad + g * U + j];
        Cell::forward(p, s, t, tp, n0 + nl, u0 + j, hh, acc_t(xs[nl * K + u0 + j]));
      }
      __syncthreads();  // xs and out are reused by the next tile
    }
    if (s + 1 < p.T) grid_barrier(p.barrier, static_cast<unsigned long long>(s + 1) * gridDim.x);
  }
}

// The backward of one layer and direction. Cell provides kGates, kDirectDh (dh_{t-1} has a
// term besides dg_hh W_hh, left in dh by phase A) and
//   backward(p, s, t, tp, n, u): phase A for unit u, row n.
template <typename Cell, typename scalar_t, typename acc_t, int NT, int RPW>
__global__ void __launch_bounds__(kPersistentThreads, 1)
    persistent_backward(const PersistentParams<scalar_t, acc_t> p) {
  constexpr int G = Cell::kGates;
  extern __shared__ __align__(16) unsigned char smem[];
  const int64_t N = p.N, H = p.H;
  const int U = p.units, K = static_cast<int>(G * H);
  const int64_t u0 = int64_t(blockIdx.x) * U;
  const int here = static_cast<int>(H - u0 < U ? H - u0 : U);
  const int r_pad = round_up(U, RPW);
  const SmemLayout lay = smem_layout<scalar_t, acc_t, acc_t>(NT, r_pad, K);
  scalar_t* ws = reinterpret_cast<scalar_t*>(smem);
  acc_t* xs = reinterpret_cast<acc_t*>(smem + lay.xs_offset);
  acc_t* out = reinterpret_cast<acc_t*>(smem + lay.out_offset);

  // consecutive threads read consecutive units of one row of W_hh
  for (int64_t idx = threadIdx.x; idx < int64_t(r_pad) * K; idx += blockDim.x) {
    const int q = static_cast<int>(idx / r_pad), j = static_cast<int>(idx % r_pad);
    ws[j * K + q] = j < here ? p.w_hh[q * H + u0 + j] : scalar_t(0);
  }
  __syncthreads();

  for (int64_t s = p.T - 1; s >= 0; --s) {
    const int64_t t = time_index(s, p.T, p.reverse), tp = time_index(s - 1, p.T, p.reverse);
    for (int64_t idx = threadIdx.x; idx < N * here; idx += blockDim.x) {
      Cell::backward(p, s, t, tp, idx / here, u0 + idx % here);
    }
    grid_barrier(p.barrier, static_cast<unsigned long long>(p.T - s) * gridDim.x);
    const acc_t* dg = p.dg_hh + t * N * K;
    for (int64_t n0 = 0; n0 < N; n0 += NT) {
      stage_rows<NT>(dg, n0, N, K, xs);
      __syncthreads();
      tile_dot<NT, RPW>(ws, r_pad, xs, K, out);
      __syncthreads();
      for (int idx = threadIdx.x; idx < NT * here; idx += blockDim.x) {
        const int nl = idx / here, j = idx % here;
        if (n0 + nl >= N) continue;
        acc_t* dh = p.dh + (n0 + nl) * H + u0 + j;
        const acc_t v = out[nl * r_pad + j];
        *dh = Cell::kDirectDh ? *dh + v : v;
      }
      __syncthreads();
    }
  }
}

// ---- host side: which path runs, and the launch ----

// A first cost model for `auto`, per step, to be refined with measurements: the persistent
// path does 2*N*G*H*H FFMA flops spread over the SMs at about half of their peak, plus a
// barrier; the per-step path pays its launches, plus a GEMM at tensor-core (16-bit) or
// FFMA (fp32/fp64) speed.
constexpr double kBarrierUs = 2.0, kStepOverheadUs = 15.0, kFfmaEfficiency = 0.5;

inline bool persistent_wins(int64_t N, int G, int64_t H, at::ScalarType dtype,
                            const cudaDeviceProp& prop) {
  const double flops = 2.0 * N * G * H * H;
  int clock_khz = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&clock_khz, cudaDevAttrClockRate, c10::cuda::current_device()));
  const double clock_hz = clock_khz * 1e3;
  const double fma_lanes = dtype == at::kDouble ? 64.0 : 128.0;  // per SM per cycle
  const double ffma_per_s = prop.multiProcessorCount * fma_lanes * 2.0 * clock_hz;
  const double persistent_us = flops / (ffma_per_s * kFfmaEfficiency) * 1e6 + kBarrierUs;
  const bool tensor_cores = dtype == at::kHalf || dtype == at::kBFloat16;
  const double gemm_per_s = tensor_cores ? 8.0 * ffma_per_s : 0.7 * ffma_per_s;
  const double step_us = kStepOverheadUs + flops / gemm_per_s * 1e6;
  return persistent_us < step_us;
}

struct PersistentLaunch {
  const void* kernel = nullptr;  // null: the per-step path runs
  int blocks = 0, units = 0;
  size_t smem = 0;
};

// Picks the path for one op call from the mode (rnnfast::cuda_path_mode), the fit on chip
// and the cost model, and records it (rnnfast::note_cuda_path). Forcing the persistent path
// where it cannot run is an error that says why.
template <typename Cell, typename scalar_t, typename acc_t, bool kBackward>
PersistentLaunch plan_persistent(const char* op, int64_t N, int64_t H, at::ScalarType dtype) {
  const CudaPath mode = cuda_path_mode();
  PersistentLaunch plan;
  if (mode == CudaPath::kStep) {
    note_cuda_path(kBackward, CudaPath::kStep);
    return plan;
  }
  constexpr int G = Cell::kGates;
  const cudaDeviceProp& prop = *at::cuda::getCurrentDeviceProperties();
  const int sms = prop.multiProcessorCount;
  const int64_t units = (H + sms - 1) / sms;
  const int64_t K = kBackward ? G * H : H;
  const int64_t rows = kBackward ? units : G * units;
  using x_t = std::conditional_t<kBackward, acc_t, scalar_t>;
  std::string why;
  if (!prop.cooperativeLaunch) {
    why = "the device does not support cooperative launches";
  } else {
    auto try_tile = [&](auto nt, auto rpw, const void* kernel) {
      constexpr int kNT = decltype(nt)::value, kRPW = decltype(rpw)::value;
      const size_t smem =
          smem_layout<scalar_t, x_t, acc_t>(kNT, round_up(static_cast<int>(rows), kRPW), K).bytes;
      if (smem > prop.sharedMemPerBlockOptin) {
        why = "it needs " + std::to_string(smem / 1024) + " KiB of shared memory per block and " +
              "the device allows " + std::to_string(prop.sharedMemPerBlockOptin / 1024) + " KiB";
        return false;
      }
      // the device's maximum, not this call's size: calls from several threads may race
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(prop.sharedMemPerBlockOptin)));
      int per_sm = 0;
      C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel,
                                                                   kPersistentThreads, smem));
      const int64_t blocks = (H + units - 1) / units;
      if (int64_t(per_sm) * sms < blocks) {
        why = "its " + std::to_string(blocks) + " blocks cannot all be resident at once";
        return false;
      }
      plan = {kernel, static_cast<int>(blocks), static_cast<int>(units), smem};
      return true;
    };
    using I4 = std::integral_constant<int, 4>;
    using I8 = std::integral_constant<int, 8>;
    using I16 = std::integral_constant<int, 16>;
    const void* k16 = kBackward
        ? reinterpret_cast<const void*>(&persistent_backward<Cell, scalar_t, acc_t, 16, 4>)
        : reinterpret_cast<const void*>(&persistent_forward<Cell, scalar_t, acc_t, 16, 4>);
    const void* k4 = kBackward
        ? reinterpret_cast<const void*>(&persistent_backward<Cell, scalar_t, acc_t, 4, 8>)
        : reinterpret_cast<const void*>(&persistent_forward<Cell, scalar_t, acc_t, 4, 8>);
    if (!(N > 4 && try_tile(I16{}, I4{}, k16))) try_tile(I4{}, I8{}, k4);
  }
  if (plan.kernel == nullptr) {
    TORCH_CHECK(mode != CudaPath::kPersistent, op,
                ": the persistent CUDA path was forced (rnnfast.cuda_path / RNNFAST_CUDA_PATH), "
                "but it cannot run for H=", H, ": ", why);
  } else if (mode == CudaPath::kAuto && !persistent_wins(N, G, H, dtype, prop)) {
    plan = PersistentLaunch{};
  }
  note_cuda_path(kBackward, plan.kernel ? CudaPath::kPersistent : CudaPath::kStep);
  return plan;
}

template <typename scalar_t, typename acc_t>
void launch_persistent(const PersistentLaunch& plan, PersistentParams<scalar_t, acc_t> params,
                       const Tensor& like) {
  Tensor barrier = at::zeros({1}, like.options().dtype(at::kLong));
  params.barrier = reinterpret_cast<unsigned long long*>(barrier.data_ptr<int64_t>());
  params.units = plan.units;
  void* args[] = {&params};
  C10_CUDA_CHECK(cudaLaunchCooperativeKernel(plan.kernel, plan.blocks, kPersistentThreads, args,
                                             plan.smem, at::cuda::getCurrentCUDAStream()));
}

}  // namespace rnnfast::cuda
