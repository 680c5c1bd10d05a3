// The per-step path as one CUDA graph a call (RNNFAST_STEP_GRAPH=1; off by default until it
// has run on a GPU): the T steps' cuBLAS GEMMs and pointwise kernels captured once per shape
// and weight, then replayed by one cudaGraphLaunch, so that the host no longer pays a cuBLAS
// call and a kernel launch a step.
//
// Why: in 16 bits the per-step path is bound by the host. The sixth H100 run (2026-11-28)
// measured it at 12.7-13.5 us a forward step and 19-21 us a backward step at N = 1, where
// the device's work is tiny, and at 12.7-15.3 and 24-32 us at N = 256, H = 768-1024, where
// auto picks it and cuDNN takes 13.3-17.7 and 24-28 (cuDNN launches per step too). A
// graph's nodes follow each other on the device a few microseconds apart with no host.
//
// What a graph bakes in is the same at every replay: the kernels, their grids, the step
// index s of each node, and the addresses the cuBLAS nodes read and write. So the GEMMs
// work on buffers of the cached entry (StepGraph): the forward's h_{t-1} in two turns
// (h0 copied into turn 1 before the launch) and its gate sums; the backward's bfloat16 gate
// gradients and dh (copied in and out). Everything else a call has of its own (xp, y, the
// training cache, the LSTM's c, dy, the gate gradients in acc_t, dc) reaches the pointwise
// kernels through PersistentParams in device memory, written by a one-thread kernel before
// the launch; they run the persistent kernels' own cell code (Cell::load and forward,
// load_backward and backward), as the fused kernels do. W_hh's address is part of the key:
// a replay reads whatever W_hh the call has there (not kept alive by the cache).
//
// A key is captured at its second call (the first runs the plain loop, which also loads
// cuBLAS's kernels for the shape; the buffers are made only then), on a stream of its own
// in thread-local capture mode, with the calling thread's cuBLAS handle pointed at that
// stream and then at a workspace of the cache's (one per device and stream; torch's may be
// freed by torch.cuda.graph's capture); the capture itself calls nothing of torch's and
// throws nothing. Any failure leaves the plain loop to run for that key from then on; so does
// a call inside the caller's own stream capture (torch.cuda.graph), which then captures the
// plain loop. One caller at a time per entry (its mutex held from the parameters' store to
// the launch); entries per device, stream, kernel, T, N, H and W_hh, at most
// kStepGraphEntries of them (the least recently used dropped).
#pragma once

#include <c10/cuda/CUDAStream.h>

#include <functional>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>

#include "fused_step.cuh"

namespace rnnfast::cuda {

// RNNFAST_STEP_GRAPH: "1" replays the per-step path's 16-bit forward and bfloat16 backward
// as CUDA graphs where they apply; unset or "0": the plain loop.
// Whether this layer's per-step forward (backward) may run as a graph: asked, in 16 bits
// with the GEMMs calling cuBLAS directly (StepGemm::direct); the backward in bfloat16 with
// its dh GEMM from bfloat16 gate gradients (StepGemm::bf16_dh). A bad knob value sets why
// (the op raises it) and returns false.
template <typename scalar_t>
bool step_graph_applies(bool backward, std::string& why) {
  if (!zero_one_knob("RNNFAST_STEP_GRAPH", why) || sizeof(scalar_t) != 2) return false;
  const at::ScalarType dtype = c10::CppTypeToScalarType<scalar_t>::value;
  return StepGemm::direct(dtype) &&
         (!backward || (dtype == at::kBFloat16 && StepGemm::bf16_dh(dtype)));
}

// How the per-step path runs this layer's forward (backward) where the plan leaves it to
// that path (plan.kernel null): fused (RNNFAST_STEP_FUSED=1, where fused_step_applies /
// fused_backward_applies), else as a CUDA graph (RNNFAST_STEP_GRAPH=1, where
// step_graph_applies; the plain loop until captured), else the plain loop. Both knobs are
// read whichever path runs, so that a bad value sets why (the op raises it) on every path.
struct StepChoice {
  bool fused = false, graphed = false;
};
template <typename scalar_t>
StepChoice step_choice(bool per_step, int64_t H, bool backward, std::string& why) {
  const bool fused = backward ? fused_backward_applies<scalar_t>(H, why)
                              : fused_step_applies<scalar_t>(H, why);
  if (!why.empty()) return {};
  const bool graph = step_graph_applies<scalar_t>(backward, why);
  if (!why.empty()) return {};
  return {per_step && fused, per_step && !fused && graph};
}

template <typename P>
__global__ void store_step_params(const P p, P* __restrict__ dst) {
  *dst = p;
}

// Step s of the forward: the cell's update from the gate sums hh [N, G H] (the GEMM's
// output, in scalar_t), h_t also into h_next (the next GEMM's operand).
template <typename Cell, typename scalar_t, typename acc_t>
__global__ void graph_step_forward(const PersistentParams<scalar_t, acc_t>* __restrict__ pp,
                                   const scalar_t* __restrict__ hh,
                                   scalar_t* __restrict__ h_next, int64_t s) {
  constexpr int G = Cell::kGates;
  const PersistentParams<scalar_t, acc_t>& p = *pp;
  const int64_t N = p.N, H = p.H;
  const int64_t t = time_index(s, p.T, p.reverse), tp = time_index(s - 1, p.T, p.reverse);
  const scalar_t* h_prev = s == 0 ? p.h0 : p.y + tp * N * H;
  RNNFAST_GRID_STRIDE(idx, N * H) {
    const int64_t n = idx / H, u = idx % H;
    acc_t g[G], in[Cell::kLoads];
    gather_gates<G>(hh + n * G * H + u, H, g);
    Cell::load(p, s, t, tp, n, u, in);
    const acc_t hp = Cell::kNeedsHPrev ? acc_t(h_prev[n * H + u]) : acc_t(0);
    h_next[idx] = Cell::forward(p, s, t, tp, n, u, g, hp, in);
  }
}

// Step s of the backward: the cell's pointwise backward (reading p.dh, the GRU leaving its
// direct term there), the gate gradients also rounded into dg16 [N, G H] for the dh GEMM.
template <typename Cell, typename scalar_t, typename acc_t>
__global__ void graph_step_backward(const PersistentParams<scalar_t, acc_t>* __restrict__ pp,
                                    scalar_t* __restrict__ dg16, int64_t s) {
  constexpr int G = Cell::kGates;
  const PersistentParams<scalar_t, acc_t>& p = *pp;
  const int64_t N = p.N, H = p.H;
  const int64_t t = time_index(s, p.T, p.reverse), tp = time_index(s - 1, p.T, p.reverse);
  RNNFAST_GRID_STRIDE(idx, N * H) {
    const int64_t n = idx / H, u = idx % H;
    acc_t in[Cell::kBackwardLoads], dgh[G];
    Cell::load_backward(p, s, t, tp, n, u, in);
    Cell::backward(p, s, t, tp, n, u, in, dgh);
#pragma unroll
    for (int g = 0; g < G; ++g) dg16[n * G * H + g * H + u] = scalar_t(dgh[g]);
  }
}

// cuBLAS's handle settings, called through the library torch loaded (as cublasGemmEx)
using CublasSetStreamFn = cublasStatus_t (*)(cublasHandle_t, cudaStream_t);
using CublasSetWorkspaceFn = cublasStatus_t (*)(cublasHandle_t, void*, size_t);

constexpr size_t kStepGraphEntries = 16;
constexpr size_t kStepGraphWorkspace = size_t(32) << 20;  // torch's default on Hopper

struct StepGraphKey {
  int device;
  cudaStream_t stream;
  const void* kernel;  // the cell, dtype and direction
  int64_t T, N, H;
  const void* w_hh;
  bool operator==(const StepGraphKey& o) const {
    return std::tie(device, stream, kernel, T, N, H, w_hh) ==
           std::tie(o.device, o.stream, o.kernel, o.T, o.N, o.H, o.w_hh);
  }
};

// One key's graph and the buffers its nodes name (made at the capture, on key.stream).
struct StepGraph {
  StepGraphKey key;
  std::mutex mutex;     // held from the parameters' store to the launch
  int calls = 0;        // captured at the second
  bool failed = false;  // its capture failed: the plain loop from then on
  Tensor params;        // PersistentParams, in device memory
  Tensor a, b;          // forward: h_{t-1} (two turns) and the gate sums [N, G H]; backward: dh
  Tensor dg16;          // backward: the bfloat16 gate gradients [N, G H] (StepGemm's)
  cudaGraphExec_t exec = nullptr;
  ~StepGraph() {
    // a launch in flight finishes first (the executable graph is freed after it)
    if (exec != nullptr) (void)cudaGraphExecDestroy(exec);
  }
};

// The entry for key (made, and the least recently used dropped, as needed).
inline std::shared_ptr<StepGraph> step_graph_entry(const StepGraphKey& key) {
  static std::mutex mutex;
  // most recently used first; never destroyed (no CUDA or allocator calls at the process's
  // exit). An entry dropped here is freed when its last user ends: its tensors go back to
  // torch's allocator on the stream they were made on, the graph's.
  static auto* entries = new std::list<std::shared_ptr<StepGraph>>();
  const std::lock_guard<std::mutex> lock(mutex);
  for (auto it = entries->begin(); it != entries->end(); ++it) {
    if ((*it)->key == key) {
      entries->splice(entries->begin(), *entries, it);
      return entries->front();
    }
  }
  auto entry = std::make_shared<StepGraph>();
  entry->key = key;
  entries->push_front(entry);
  if (entries->size() > kStepGraphEntries) entries->pop_back();
  return entry;
}

// The captured GEMMs' cuBLAS workspace on this device and stream, made once and kept (the
// graphs replayed on one stream run one after another, so they share it).
inline void* step_graph_workspace(const StepGraphKey& key, const at::TensorOptions& options) {
  static std::mutex mutex;
  static auto* spaces = new std::map<std::pair<int, cudaStream_t>, Tensor>();
  const std::lock_guard<std::mutex> lock(mutex);
  Tensor& w = (*spaces)[{key.device, key.stream}];
  if (!w.defined()) w = at::empty({int64_t(kStepGraphWorkspace)}, options.dtype(at::kByte));
  return w.data_ptr();
}

// Whether work queued on stream now would be captured (the caller's torch.cuda.graph)
inline bool stream_capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(stream, &status) != cudaSuccess) {
    (void)cudaGetLastError();
    return true;  // unknown: the plain loop, which is right either way
  }
  return status != cudaStreamCaptureStatusNone;
}

// Captures record(stream) (raw launches and gemm's direct calls only: nothing that calls
// torch or throws) on a stream of its own into g.exec, gemm's handle (the calling thread's)
// pointed at that stream and at workspace; torch's settings of the handle restored after
// (at::cuda::getCurrentCUDABlasHandle sets the current stream and torch's workspace).
// False, nothing kept and the CUDA error cleared, on any failure.
template <typename Record>
bool capture_step_graph(StepGraph& g, const StepGemm& gemm, void* workspace, Record record) {
  static const auto set_stream =
      reinterpret_cast<CublasSetStreamFn>(loaded_cublas_symbol("cublasSetStream_v2"));
  static const auto set_workspace =
      reinterpret_cast<CublasSetWorkspaceFn>(loaded_cublas_symbol("cublasSetWorkspace_v2"));
  const cublasHandle_t handle = gemm.handle();
  if (set_stream == nullptr || set_workspace == nullptr || handle == nullptr ||
      !gemm.error().empty()) {
    return false;
  }
  (void)cudaGetLastError();  // an earlier error is not this capture's
  cudaStream_t side = nullptr;
  if (cudaStreamCreateWithFlags(&side, cudaStreamNonBlocking) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  // the stream first: cublasSetStream puts the handle back on cuBLAS's own workspace
  bool ok = set_stream(handle, side) == CUBLAS_STATUS_SUCCESS &&
            set_workspace(handle, workspace, kStepGraphWorkspace) == CUBLAS_STATUS_SUCCESS &&
            cudaStreamBeginCapture(side, cudaStreamCaptureModeThreadLocal) == cudaSuccess;
  cudaGraph_t graph = nullptr;
  if (ok) {
    try {
      ok = record(side);
    } catch (...) {  // record throws nothing; the capture must end whatever happens
      ok = false;
    }
    ok = cudaStreamEndCapture(side, &graph) == cudaSuccess && ok;  // always ended
  }
  cudaGraphExec_t exec = nullptr;
  ok = ok && graph != nullptr && cudaGraphInstantiate(&exec, graph, 0) == cudaSuccess;
  if (graph != nullptr) (void)cudaGraphDestroy(graph);
  (void)cudaStreamDestroy(side);
  if (!ok) (void)cudaGetLastError();  // not sticky
  try {
    (void)at::cuda::getCurrentCUDABlasHandle();  // torch's stream and workspace again
  } catch (...) {
    ok = false;
  }
  if (ok) {
    g.exec = exec;
  } else if (exec != nullptr) {
    (void)cudaGraphExecDestroy(exec);
  }
  return ok;
}

// Runs the key's graph: on its second call captures it first (make(g): the buffers made and
// the graph captured, true on success); stores params(g) where its kernels read it,
// then before(g, stream), the launch and after(g, stream) (the copies into and out of g's
// buffers). False where the plain loop must run instead: the key's first call, a failed
// capture (from then on), the caller's own stream capture.
using StreamWork = std::function<void(const StepGraph&, cudaStream_t)>;
template <typename P, typename Make, typename Params>
bool launch_step_graph(const StepGraphKey& key, Params params, Make make,
                       const StreamWork& before, const StreamWork& after) {
  if (stream_capturing(key.stream)) return false;
  const std::shared_ptr<StepGraph> entry = step_graph_entry(key);
  StepGraph& g = *entry;
  const std::lock_guard<std::mutex> lock(g.mutex);
  if (g.failed) return false;
  if (g.exec == nullptr) {
    if (++g.calls < 2) return false;
    bool made = false;
    try {
      made = make(g);
    } catch (const std::exception&) {  // out of memory for the buffers: the plain loop
      made = false;
    }
    if (!made) {
      g.failed = true;
      g.params = g.a = g.b = g.dg16 = Tensor();
      return false;
    }
  }
  store_step_params<P><<<1, 1, 0, key.stream>>>(params(g),
                                                 reinterpret_cast<P*>(g.params.data_ptr()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  before(g, key.stream);
  C10_CUDA_CHECK(cudaGraphLaunch(g.exec, key.stream));
  after(g, key.stream);
  return true;
}

template <typename scalar_t, typename acc_t>
StepGraphKey step_graph_key(const void* kernel, const PersistentParams<scalar_t, acc_t>& p,
                            const Tensor& w_hh, cudaStream_t stream) {
  return {static_cast<int>(c10::cuda::current_device()), stream, kernel, p.T, p.N, p.H,
          w_hh.data_ptr()};
}

// Loads a kernel's module before a capture (lazy loading would do it inside the capture)
inline bool kernel_loaded(const void* kernel) {
  cudaFuncAttributes attrs;
  if (cudaFuncGetAttributes(&attrs, kernel) == cudaSuccess) return true;
  (void)cudaGetLastError();
  return false;
}

// The entry's stored parameters made (their device address returned) and the modules of
// kernel and of the parameters' store loaded; null where a module does not load.
template <typename P>
const P* make_graph_params(StepGraph& g, const void* kernel, const Tensor& like) {
  g.params = at::empty({int64_t(sizeof(P))}, like.options().dtype(at::kByte));
  if (!kernel_loaded(kernel) ||
      !kernel_loaded(reinterpret_cast<const void*>(&store_step_params<P>))) {
    return nullptr;
  }
  return reinterpret_cast<const P*>(g.params.data_ptr());
}

// The per-step forward as a graph: p as the persistent forward's (y, the training cache or
// the LSTM's c_state in place; p.h0 contiguous). False where the plain loop must run.
template <typename Cell, typename scalar_t, typename acc_t>
bool run_step_graph_forward(const PersistentParams<scalar_t, acc_t>& p, const Tensor& w_hh,
                            cudaStream_t stream) {
  if constexpr (sizeof(scalar_t) != 2) {
    return false;  // 16-bit only (step_graph_applies)
  } else {
    using P = PersistentParams<scalar_t, acc_t>;
    constexpr int G = Cell::kGates;
    const int64_t N = p.N, H = p.H, T = p.T;
    const auto kernel = &graph_step_forward<Cell, scalar_t, acc_t>;
    const StepGraphKey key = step_graph_key(reinterpret_cast<const void*>(kernel), p, w_hh, stream);
    // a: h_{t-1} in two turns (turn 1 holds h0 at s = 0), each 16-byte aligned for the
    // GEMM (turn stride NH rounded up to 8 elements); b: the gate sums
    const int64_t turn = (N * H + 7) / 8 * 8;
    auto make = [&](StepGraph& g) {
      const P* pp = make_graph_params<P>(g, reinterpret_cast<const void*>(kernel), w_hh);
      if (pp == nullptr) return false;
      g.a = at::empty({2 * turn}, w_hh.options());
      g.b = at::empty({N, G * H}, w_hh.options());
      const StepGemm gemm(w_hh);  // the current thread's handle
      void* workspace = step_graph_workspace(key, w_hh.options());
      scalar_t* h = g.a.data_ptr<scalar_t>();
      scalar_t* hh = g.b.data_ptr<scalar_t>();
      return capture_step_graph(g, gemm, workspace, [&](cudaStream_t cs) {
        for (int64_t s = 0; s < T; ++s) {
          gemm.gates_direct(h + ((s + 1) & 1) * turn, hh, N);
          if (!gemm.error().empty()) return false;
          kernel<<<grid_for(N * H), kThreads, 0, cs>>>(pp, hh, h + (s & 1) * turn, s);
          if (cudaPeekAtLastError() != cudaSuccess) return false;
        }
        return true;
      });
    };
    const StreamWork before = [&](const StepGraph& g, cudaStream_t st) {
      C10_CUDA_CHECK(cudaMemcpyAsync(g.a.data_ptr<scalar_t>() + turn, p.h0,
                                     N * H * sizeof(scalar_t), cudaMemcpyDeviceToDevice, st));
    };
    const bool ran = launch_step_graph<P>(
        key, [&](const StepGraph&) { return p; }, make, before,
        [](const StepGraph&, cudaStream_t) {});
    if (ran) note_step_variant(false, StepVariant::kGraph);
    return ran;
  }
}

// The per-step bfloat16 backward as a graph: p as the persistent backward's (p.dh holding
// dh_T on entry and dh_0 on return: copied into and out of the entry's dh). False where
// the plain loop must run.
template <typename Cell, typename scalar_t, typename acc_t>
bool run_step_graph_backward(const PersistentParams<scalar_t, acc_t>& p, const Tensor& w_hh,
                             cudaStream_t stream) {
  if constexpr (!std::is_same_v<scalar_t, c10::BFloat16>) {
    return false;  // bfloat16 only (step_graph_applies)
  } else {
    using P = PersistentParams<scalar_t, acc_t>;
    const int64_t N = p.N, H = p.H, T = p.T;
    const auto kernel = &graph_step_backward<Cell, scalar_t, acc_t>;
    const StepGraphKey key = step_graph_key(reinterpret_cast<const void*>(kernel), p, w_hh, stream);
    // a: dh [N, H] in float32; dg16: the StepGemm's bfloat16 gate gradients
    auto make = [&](StepGraph& g) {
      const P* pp = make_graph_params<P>(g, reinterpret_cast<const void*>(kernel), w_hh);
      if (pp == nullptr) return false;
      g.a = at::empty({N, H}, w_hh.options().dtype(at::kFloat));
      const StepGemm gemm(w_hh, N);  // the current thread's handle; makes dg16
      g.dg16 = gemm.dg16_buffer();
      if (!g.dg16.defined()) return false;
      void* workspace = step_graph_workspace(key, w_hh.options());
      float* dh = g.a.data_ptr<float>();
      scalar_t* dg16 = g.dg16.data_ptr<scalar_t>();
      return capture_step_graph(g, gemm, workspace, [&](cudaStream_t cs) {
        for (int64_t s = T - 1; s >= 0; --s) {
          kernel<<<grid_for(N * H), kThreads, 0, cs>>>(pp, dg16, s);
          if (cudaPeekAtLastError() != cudaSuccess) return false;
          // the GRU's pointwise backward left its direct term in dh
          gemm.dh_direct(dh, N, /*accumulate=*/Cell::kDirectDh);
          if (!gemm.error().empty()) return false;
        }
        return true;
      });
    };
    const size_t bytes = N * H * sizeof(float);
    const StreamWork before = [&](const StepGraph& g, cudaStream_t st) {
      C10_CUDA_CHECK(cudaMemcpyAsync(g.a.data_ptr<float>(), p.dh, bytes, cudaMemcpyDeviceToDevice,
                                     st));
    };
    const StreamWork after = [&](const StepGraph& g, cudaStream_t st) {
      C10_CUDA_CHECK(cudaMemcpyAsync(p.dh, g.a.data_ptr<float>(), bytes, cudaMemcpyDeviceToDevice,
                                     st));
    };
    // the kernels read and write the entry's dh (the GEMMs' output), not the op's
    auto params = [&](const StepGraph& g) {
      P q = p;
      q.dh = g.a.data_ptr<float>();
      return q;
    };
    const bool ran = launch_step_graph<P>(key, params, make, before, after);
    if (ran) note_step_variant(true, StepVariant::kGraph);
    return ran;
  }
}

}  // namespace rnnfast::cuda
