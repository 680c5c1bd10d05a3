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
// (hbuf, h0 copied into turn 1 before the launch) and its gate sums hh; the backward's
// bfloat16 gate gradients (StepGemm::dg16) and dh. Everything else a call has of its own
// (xp, y, the training cache, the LSTM's c, dy, the gate gradients in acc_t, dc) reaches
// the pointwise kernels through PersistentParams in device memory, written by a one-thread
// kernel before the launch; they run the persistent kernels' own cell code (Cell::load and
// forward, load_backward and backward), as the fused kernels do. W_hh's address is part of
// the key (its values are read at each replay). A shape is captured at its second call (the
// first runs the plain loop, which also loads cuBLAS's kernels for it), on a side stream in
// thread-local capture mode, with the cuBLAS handle pointed at that stream and at a
// workspace of the cache's own (torch's may be freed by torch.cuda.graph's capture); any
// error there leaves the plain loop to run. One caller at a time per entry (its mutex held
// from the parameters' store to the launch); entries per device, stream, kernel, T, N, H
// and W_hh, at most kStepGraphEntries of them (the least recently used dropped).
#pragma once

#include <c10/cuda/CUDAStream.h>

#include <functional>
#include <list>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>

#include "fused_step.cuh"

namespace rnnfast::cuda {

// RNNFAST_STEP_GRAPH: "1" replays the per-step path's 16-bit forward and bfloat16 backward
// as CUDA graphs where they apply (step_graph_applies); unset or "0": the plain loop. 1, 0, or
// -1 for any other value.
inline int step_graph_knob(std::string& value) {
  return two_way_knob("RNNFAST_STEP_GRAPH", "0", "1", 0, value);
}

// Whether this layer's per-step forward (backward) may run as a graph: asked, in 16 bits
// with the GEMMs calling cuBLAS directly (StepGemm::direct); the backward in bfloat16 with
// its dh GEMM from bfloat16 gate gradients (StepGemm::bf16_dh). A bad knob value sets why
// (the op raises it) and returns false.
template <typename scalar_t>
bool step_graph_applies(bool backward, std::string& why) {
  std::string value;
  const int knob = step_graph_knob(value);
  if (knob < 0) {
    why = "RNNFAST_STEP_GRAPH is '" + value + "', expected 0 or 1";
    return false;
  }
  if (knob != 1 || sizeof(scalar_t) != 2) return false;
  const at::ScalarType dtype = c10::CppTypeToScalarType<scalar_t>::value;
  return StepGemm::direct(dtype) &&
         (!backward || (dtype == at::kBFloat16 && StepGemm::bf16_dh(dtype)));
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

// One shape's graph and the buffers its nodes name.
struct StepGraph {
  StepGraphKey key;
  std::mutex mutex;   // held from the parameters' store to the launch
  int calls = 0;      // captured at the second
  bool failed = false;  // its capture failed: the plain loop from then on
  Tensor w_hh;             // kept alive: its address is the key's
  int64_t backward_rows = 0;
  std::unique_ptr<StepGemm> gemm;  // made by the capturing thread (its handle); dg16
  Tensor params;  // PersistentParams, in device memory
  Tensor a, b;    // forward: hbuf [2, N, H] and hh [N, G H]; backward: dh [N, H] (acc_t)
  Tensor workspace;  // cuBLAS's, for the captured GEMMs
  cudaGraphExec_t exec = nullptr;
  ~StepGraph() {
    if (exec != nullptr) (void)cudaGraphExecDestroy(exec);
  }
};

// The entry for key (made, and the least recently used dropped, as needed).
inline std::shared_ptr<StepGraph> step_graph_entry(const StepGraphKey& key) {
  static std::mutex mutex;
  // most recently used first; never destroyed (no CUDA or allocator calls at the process's
  // exit). An entry dropped here is freed when its last user ends: its tensors go back to
  // torch's allocator on the stream they were made on (the graph's), and
  // cudaGraphExecDestroy lets a launch in flight finish first.
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

// Captures record(stream) on a side stream into g.exec, with a StepGemm of the calling
// thread's cuBLAS handle (kept in g: the backward's dg16 is its buffer) pointed at that
// stream and at g.workspace; false (nothing kept, the CUDA error cleared) on any failure.
// Torch's handle settings are restored after (at::cuda::getCurrentCUDABlasHandle sets the
// current stream and torch's workspace).
template <typename Record>
bool capture_step_graph(StepGraph& g, Record record) {
  static const auto set_stream =
      reinterpret_cast<CublasSetStreamFn>(loaded_cublas_symbol("cublasSetStream_v2"));
  static const auto set_workspace =
      reinterpret_cast<CublasSetWorkspaceFn>(loaded_cublas_symbol("cublasSetWorkspace_v2"));
  if (set_stream == nullptr || set_workspace == nullptr) return false;
  g.gemm = std::make_unique<StepGemm>(g.w_hh, g.backward_rows);
  const cublasHandle_t handle = g.gemm->handle();
  if (handle == nullptr || !g.gemm->error().empty()) return false;
  const c10::cuda::CUDAStream side = c10::cuda::getStreamFromPool(false, g.key.device);
  bool ok = set_workspace(handle, g.workspace.data_ptr(), kStepGraphWorkspace) ==
                CUBLAS_STATUS_SUCCESS &&
            set_stream(handle, side.stream()) == CUBLAS_STATUS_SUCCESS &&
            cudaStreamBeginCapture(side.stream(), cudaStreamCaptureModeThreadLocal) ==
                cudaSuccess;
  if (ok) {
    ok = record(side.stream());
    cudaGraph_t graph = nullptr;
    ok = cudaStreamEndCapture(side.stream(), &graph) == cudaSuccess && ok;  // always ended
    if (graph != nullptr) {
      ok = ok && cudaGraphInstantiate(&g.exec, graph, 0) == cudaSuccess;
      (void)cudaGraphDestroy(graph);
    }
  }
  (void)at::cuda::getCurrentCUDABlasHandle();  // torch's stream and workspace again
  if (!ok) {
    if (g.exec != nullptr) (void)cudaGraphExecDestroy(g.exec);
    g.exec = nullptr;
    (void)cudaGetLastError();  // not sticky
  }
  return ok;
}

// Launches g.exec after storing p where its kernels read it, under g's mutex; or false
// where g is not captured (its first call; a failed capture), the caller then running the
// plain loop (also inside the caller's own stream capture). capture(stream) records the T
// steps; before(stream) and after(stream) run around the launch (the copies into and out of
// g's buffers).
using StreamWork = std::function<void(cudaStream_t)>;
template <typename scalar_t, typename acc_t, typename Capture>
bool launch_step_graph(StepGraph& g, const PersistentParams<scalar_t, acc_t>& p,
                       cudaStream_t stream, Capture capture, const StreamWork& before,
                       const StreamWork& after) {
  // inside the caller's own stream capture (torch.cuda.graph) the plain loop is captured
  cudaStreamCaptureStatus capturing = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(stream, &capturing) != cudaSuccess ||
      capturing != cudaStreamCaptureStatusNone) {
    (void)cudaGetLastError();
    return false;
  }
  const std::lock_guard<std::mutex> lock(g.mutex);
  if (g.failed) return false;
  if (g.exec == nullptr) {
    if (++g.calls < 2) return false;
    if (!capture_step_graph(g, capture)) {
      g.failed = true;
      return false;
    }
  }
  using P = PersistentParams<scalar_t, acc_t>;
  store_step_params<P><<<1, 1, 0, stream>>>(p, reinterpret_cast<P*>(g.params.data_ptr()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  before(stream);
  C10_CUDA_CHECK(cudaGraphLaunch(g.exec, stream));
  after(stream);
  return true;
}

// The entry of this kernel, shape and W_hh, its buffers made: the parameters', cuBLAS's,
// and a [a_rows, a_cols] and b [b_rows, b_cols] of dtype (b_rows 0: none).
template <typename scalar_t, typename acc_t>
std::shared_ptr<StepGraph> step_graph_for(const void* kernel, const Tensor& w_hh, int64_t T,
                                          int64_t N, int64_t H, int64_t backward_rows,
                                          at::IntArrayRef a_shape, at::IntArrayRef b_shape,
                                          at::ScalarType dtype, cudaStream_t stream) {
  const StepGraphKey key{static_cast<int>(c10::cuda::current_device()), stream, kernel, T, N, H,
                         w_hh.data_ptr()};
  std::shared_ptr<StepGraph> g = step_graph_entry(key);
  const std::lock_guard<std::mutex> lock(g->mutex);
  if (!g->params.defined()) {
    const auto bytes = w_hh.options().dtype(at::kByte);
    g->w_hh = w_hh;
    g->backward_rows = backward_rows;
    g->params = at::empty({int64_t(sizeof(PersistentParams<scalar_t, acc_t>))}, bytes);
    g->workspace = at::empty({int64_t(kStepGraphWorkspace)}, bytes);
    g->a = at::empty(a_shape, w_hh.options().dtype(dtype));
    if (!b_shape.empty()) g->b = at::empty(b_shape, w_hh.options().dtype(dtype));
  }
  return g;
}

// The per-step forward as a graph: p as the persistent forward's (y, the training cache or
// the LSTM's c_state in place; p.h0 contiguous). False where the plain loop must run.
template <typename Cell, typename scalar_t, typename acc_t>
bool run_step_graph_forward(const PersistentParams<scalar_t, acc_t>& p, const Tensor& w_hh,
                            cudaStream_t stream) {
  constexpr int G = Cell::kGates;
  const int64_t N = p.N, H = p.H, T = p.T;
  const auto kernel = &graph_step_forward<Cell, scalar_t, acc_t>;
  // a: h_{t-1} in two turns (turn 1 holds h0 at s = 0), b: the gate sums
  const std::shared_ptr<StepGraph> g = step_graph_for<scalar_t, acc_t>(
      reinterpret_cast<const void*>(kernel), w_hh, T, N, H, 0, {2, N, H}, {N, G * H},
      w_hh.scalar_type(), stream);
  const Tensor hbuf = g->a;
  Tensor hh = g->b;
  const auto* pp = reinterpret_cast<const PersistentParams<scalar_t, acc_t>*>(g->params.data_ptr());
  auto capture = [&](cudaStream_t cs) {
    for (int64_t s = 0; s < T; ++s) {
      g->gemm->gates(hbuf[(s + 1) & 1], hbuf, -1, hh);
      if (!g->gemm->error().empty()) return false;
      kernel<<<grid_for(N * H), kThreads, 0, cs>>>(
          pp, hh.data_ptr<scalar_t>(), hbuf.data_ptr<scalar_t>() + (s & 1) * N * H, s);
      if (cudaPeekAtLastError() != cudaSuccess) return false;
    }
    return true;
  };
  const StreamWork before = [&](cudaStream_t st) {
    C10_CUDA_CHECK(cudaMemcpyAsync(hbuf.data_ptr<scalar_t>() + N * H, p.h0,
                                   N * H * sizeof(scalar_t), cudaMemcpyDeviceToDevice, st));
  };
  const bool ran = launch_step_graph(*g, p, stream, capture, before, [](cudaStream_t) {});
  if (ran) note_step_variant(false, StepVariant::kGraph);
  return ran;
}

// The per-step bfloat16 backward as a graph: p as the persistent backward's (p.dh holding
// dh_T on entry and dh_0 on return: copied into and out of the entry's dh). False where
// the plain loop must run.
template <typename Cell, typename scalar_t, typename acc_t>
bool run_step_graph_backward(const PersistentParams<scalar_t, acc_t>& p, const Tensor& w_hh,
                             cudaStream_t stream) {
  const int64_t N = p.N, H = p.H, T = p.T;
  const auto kernel = &graph_step_backward<Cell, scalar_t, acc_t>;
  // a: dh, in acc_t
  const std::shared_ptr<StepGraph> g = step_graph_for<scalar_t, acc_t>(
      reinterpret_cast<const void*>(kernel), w_hh, T, N, H, N, {N, H}, {},
      c10::CppTypeToScalarType<acc_t>::value, stream);
  Tensor dh = g->a;
  PersistentParams<scalar_t, acc_t> q = p;
  q.dh = dh.data_ptr<acc_t>();
  const auto* pp = reinterpret_cast<const PersistentParams<scalar_t, acc_t>*>(g->params.data_ptr());
  auto capture = [&](cudaStream_t cs) {
    scalar_t* dg16 = g->gemm->template dg16<scalar_t>();
    if (dg16 == nullptr) return false;
    const Tensor unused;  // dh() reads the StepGemm's dg16
    for (int64_t s = T - 1; s >= 0; --s) {
      kernel<<<grid_for(N * H), kThreads, 0, cs>>>(pp, dg16, s);
      if (cudaPeekAtLastError() != cudaSuccess) return false;
      // the GRU's pointwise backward left its direct term in dh
      g->gemm->dh(unused, 0, dh, /*accumulate=*/Cell::kDirectDh);
      if (!g->gemm->error().empty()) return false;
    }
    return true;
  };
  const size_t bytes = N * H * sizeof(acc_t);
  const StreamWork before = [&](cudaStream_t st) {
    C10_CUDA_CHECK(cudaMemcpyAsync(q.dh, p.dh, bytes, cudaMemcpyDeviceToDevice, st));
  };
  const StreamWork after = [&](cudaStream_t st) {
    C10_CUDA_CHECK(cudaMemcpyAsync(p.dh, q.dh, bytes, cudaMemcpyDeviceToDevice, st));
  };
  const bool ran = launch_step_graph(*g, q, stream, capture, before, after);
  if (ran) note_step_variant(true, StepVariant::kGraph);
  return ran;
}

}  // namespace rnnfast::cuda
