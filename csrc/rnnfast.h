// rnnfast: fused recurrent layers for PyTorch.
//
// Shape legend (every tensor is contiguous and time-major at the op boundary):
//   T  time steps            N  batch            C  input features
//   H  hidden units          G  gates per cell   (Elman 1, LSTM 4, GRU 3)
//   x [T, N, C]   h0, c0, hn, cn [N, H]   y [T, N, H]
//   w_ih [G*H, C]   w_hh [G*H, H]   b_ih, b_hh [G*H]   (torch.nn's layout and gate order)
//
// One op call runs one layer in one direction over the whole sequence. `reverse`
// walks the time axis from T-1 down to 0 (the backward half of a bidirectional
// layer) without copying the input.
//
// Cell equations, exactly torch.nn's:
//   Elman:  h_t = act(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh), act in {tanh, relu, identity}
//   LSTM:   i,f,g,o = sigma,sigma,tanh,sigma(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh)
//           c_t = f * c_{t-1} + i * g,   h_t = o * tanh(c_t)
//   GRU:    r = sigma(W_ir x_t + b_ir + W_hr h_{t-1} + b_hr)
//           z = sigma(W_iz x_t + b_iz + W_hz h_{t-1} + b_hz)
//           n = tanh(W_in x_t + b_in + r * (W_hn h_{t-1} + b_hn))
//           h_t = (1 - z) * n + z * h_{t-1}
//
// Saved for backward (only when `training` is true; inference saves nothing):
//   Elman: nothing beyond y (the activation's derivative is a function of h_t).
//   LSTM:  workspace [T, N, 5H] = activated i, f, g, o and c_t.
//   GRU:   workspace [T, N, 4H] = r, z, n and (W_hn h_{t-1} + b_hn).
// The workspace has the input's dtype, except for float16/bfloat16, where it is float32,
// like the LSTM cell state and all pointwise math (on the CPU every step runs in float32
// for these dtypes: cpu/common.h, from_float32).
#pragma once

#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <optional>
#include <string>
#include <tuple>

namespace rnnfast {

using at::Tensor;

// Elman activations; the integer values are part of the op schema.
enum class Activation : int64_t { Tanh = 0, Relu = 1, Identity = 2 };

// ---- Elman (RNN_TANH, RNN_RELU, and SimpleRNN's linear recurrence) ----
// returns (y, hn)
std::tuple<Tensor, Tensor> rnn_forward_cpu(
    const Tensor& x, const Tensor& h0, const Tensor& w_ih, const Tensor& w_hh,
    const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh,
    int64_t activation, bool reverse, bool training);
// returns (dx, dh0, dw_ih, dw_hh, db)   (db is the gradient of b_ih and of b_hh)
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> rnn_backward_cpu(
    const Tensor& dy, const Tensor& dhn, const Tensor& x, const Tensor& h0,
    const Tensor& w_ih, const Tensor& w_hh, const Tensor& y, int64_t activation, bool reverse);

// ---- LSTM ----
// returns (y, hn, cn, workspace)
std::tuple<Tensor, Tensor, Tensor, Tensor> lstm_forward_cpu(
    const Tensor& x, const Tensor& h0, const Tensor& c0, const Tensor& w_ih, const Tensor& w_hh,
    const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh, bool reverse,
    bool training);
// returns (dx, dh0, dc0, dw_ih, dw_hh, db)
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_backward_cpu(
    const Tensor& dy, const Tensor& dhn, const Tensor& dcn, const Tensor& x, const Tensor& h0,
    const Tensor& c0, const Tensor& w_ih, const Tensor& w_hh, const Tensor& y,
    const Tensor& workspace, bool reverse);

// ---- GRU ----
// returns (y, hn, workspace)
std::tuple<Tensor, Tensor, Tensor> gru_forward_cpu(
    const Tensor& x, const Tensor& h0, const Tensor& w_ih, const Tensor& w_hh,
    const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh, bool reverse,
    bool training);
// returns (dx, dh0, dw_ih, dw_hh, db_ih, db_hh)
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> gru_backward_cpu(
    const Tensor& dy, const Tensor& dhn, const Tensor& x, const Tensor& h0, const Tensor& w_ih,
    const Tensor& w_hh, const Tensor& y, const Tensor& workspace, bool reverse);

// ---- PackedSequence (CPU) ----
// The same layers over a PackedSequence's data, in one call per layer and direction:
//   x [R, C] with R = sum(batch_sizes), y [R, H], workspace [R, width]; batch_sizes [T]
//   (int64, on the CPU): the sequences still running at each step, sorted longest first
//   (positive, non-increasing; batch_sizes[0] = N, the rows of h0, c0, hn and cn).
// Step t owns the batch_sizes[t] rows after those of steps 0..t-1, as in torch.nn's packed
// layout; a sequence's final state is its state after its own last step (reverse: time 0).
std::tuple<Tensor, Tensor> rnn_packed_forward_cpu(
    const Tensor& x, const Tensor& batch_sizes, const Tensor& h0, const Tensor& w_ih,
    const Tensor& w_hh, const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh,
    int64_t activation, bool reverse, bool training);
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> rnn_packed_backward_cpu(
    const Tensor& dy, const Tensor& dhn, const Tensor& x, const Tensor& batch_sizes,
    const Tensor& h0, const Tensor& w_ih, const Tensor& w_hh, const Tensor& y, int64_t activation,
    bool reverse);
std::tuple<Tensor, Tensor, Tensor, Tensor> lstm_packed_forward_cpu(
    const Tensor& x, const Tensor& batch_sizes, const Tensor& h0, const Tensor& c0,
    const Tensor& w_ih, const Tensor& w_hh, const std::optional<Tensor>& b_ih,
    const std::optional<Tensor>& b_hh, bool reverse, bool training);
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_packed_backward_cpu(
    const Tensor& dy, const Tensor& dhn, const Tensor& dcn, const Tensor& x,
    const Tensor& batch_sizes, const Tensor& h0, const Tensor& c0, const Tensor& w_ih,
    const Tensor& w_hh, const Tensor& y, const Tensor& workspace, bool reverse);
std::tuple<Tensor, Tensor, Tensor> gru_packed_forward_cpu(
    const Tensor& x, const Tensor& batch_sizes, const Tensor& h0, const Tensor& w_ih,
    const Tensor& w_hh, const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh,
    bool reverse, bool training);
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> gru_packed_backward_cpu(
    const Tensor& dy, const Tensor& dhn, const Tensor& x, const Tensor& batch_sizes,
    const Tensor& h0, const Tensor& w_ih, const Tensor& w_hh, const Tensor& y,
    const Tensor& workspace, bool reverse);

// Every op body starts with this: the ATen calls inside an op must not be re-cast by an
// enclosing torch.autocast (the op has chosen its dtypes; a GEMM coming back in another
// dtype would break it).
#define RNNFAST_NO_AUTOCAST \
  const c10::impl::ExcludeDispatchKeyGuard rnnfast_no_autocast_(c10::autocast_dispatch_keyset)

// Step s of the visiting order runs time step time_index(s, T, reverse).
C10_HOST_DEVICE inline int64_t time_index(int64_t s, int64_t T, bool reverse) { return reverse ? T - 1 - s : s; }

// The sum of two optional biases, or whichever exists.
std::optional<Tensor> sum_biases(const std::optional<Tensor>& a, const std::optional<Tensor>& b);

// The dtype of the workspace (and of all pointwise math) for inputs of `dtype`: float32
// for float16/bfloat16, else `dtype` itself.
at::ScalarType workspace_dtype(at::ScalarType dtype);

// Checks shared by every op at its boundary. `gates` is G.
void check_layer_inputs(const char* op, int64_t gates, const Tensor& x, const Tensor& h0,
                        const Tensor& w_ih, const Tensor& w_hh,
                        const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh);
// The packed ops' (x [R, C], batch_sizes [T], h0 [N, H]): as check_layer_inputs, and
// batch_sizes as described above, adding up to R.
void check_packed_inputs(const char* op, int64_t gates, const Tensor& x,
                         const Tensor& batch_sizes, const Tensor& h0, const Tensor& w_ih,
                         const Tensor& w_hh, const std::optional<Tensor>& b_ih,
                         const std::optional<Tensor>& b_hh);
void check_same_shape(const char* op, const char* name, const Tensor& t, at::IntArrayRef shape,
                      const Tensor& like);
void check_activation(const char* op, int64_t activation);
// Which CUDA design runs an op (see cuda/persistent.cuh): kStep the per-step GEMMs,
// kPersistent the persistent kernels' grid variant (a grid-wide barrier), kCluster their
// cluster variant (thread-block clusters, compute capability 9.0 on), kAuto per call the
// cheapest by the cost model of those that fit. Set by rnnfast.cuda_path (Python) or
// RNNFAST_CUDA_PATH=auto|persistent|cluster|step; the default is kAuto. The CPU ignores
// it.
enum class CudaPath : int { kAuto = 0, kStep = 1, kPersistent = 2, kCluster = 3 };
CudaPath cuda_path_mode();
// Records the path the last CUDA forward (backward) took, for rnnfast.last_cuda_path(),
// and its step variant's default (note_step_variant).
void note_cuda_path(bool backward, CudaPath used);
// How the last CUDA forward (backward) on the per-step path ran its steps: the plain loop,
// the fused kernels (cuda/fused_step.cuh, RNNFAST_STEP_FUSED=1) or a CUDA graph
// (cuda/step_graph.cuh, RNNFAST_STEP_GRAPH=1), for rnnfast._ops._last_step_variant(): the
// GPU tests' proof of which ran. note_cuda_path sets kPlain on the per-step path (kNone
// elsewhere); the fused and graph runs then note themselves.
enum class StepVariant : int { kNone = -1, kPlain = 0, kFused = 1, kGraph = 2 };
void note_step_variant(bool backward, StepVariant variant);
// What the persistent kernels' planner decided for the last CUDA forward (backward) that
// planned one (a forced variant or auto), for scripts/calibrate_persistent.py
// (rnnfast._ops._last_cuda_plan()): the cost model's microseconds per step of the plan
// that runs (-1: the per-step path) and of each candidate it costed (-1: not costed or
// cannot run), and the launch's shape (zeros where the per-step path runs).
struct CudaPlanNote {
  double us = -1, grid_us = -1, cluster_us = -1, step_us = -1;
  int blocks = 0, units = 0, cluster = 0, nt = 0, rpw = 0, xs_tiles = 0;
  int64_t group_rows = 0;
  int reg = 0;  // 1: the grid variant's register tile (RNNFAST_REG_TILE)
  // 1: the cluster variant's async exchange (RNNFAST_CLUSTER_EXCHANGE=async) ran
  int async_exchange = 0;
  // 1: the register tile's range wait (RNNFAST_REG_WAIT=range) ran
  int range_wait = 0;
};
void note_cuda_plan(bool backward, const CudaPlanNote& note);
// A trace of the persistent kernels' steps (cuda/persistent.cuh, StepTrace): the torch op
// rnnfast::_trace_next(steps, backward) asks one for the next persistent launch in that
// direction (0: none); the launch takes the request (take_trace_request returns the steps
// asked and clears it) and notes its buffer [4 + blocks * steps * 9] (note_trace), which
// rnnfast::_last_trace(backward) returns with its blocks and steps.
int64_t take_trace_request(bool backward);
void note_trace(bool backward, const Tensor& trace, int64_t blocks, int64_t steps);
void trace_next(int64_t steps, bool backward);
std::tuple<Tensor, int64_t, int64_t> last_trace(bool backward);
// Raises `op: why` when `why` is not empty: a persistent variant was forced and cannot
// run (why says which and why). The CUDA ops call it after their dispatch, so that the
// error is thrown from a C++ (not nvcc) frame, with no dispatch lambda between it and the
// op (on the H100 a TORCH_CHECK thrown inside plan_persistent crashed the process; the
// cause is not known).
void check_persistent_refusal(const char* op, const std::string& why);
// RNNFAST_STEP_GEMM: how the per-step path's 16-bit CUDA GEMMs run (cuda/common.cuh,
// StepGemm): unset or "cublas" (cublasGemmEx called directly where torch loaded it), or
// "aten". step_gemm_knob_error(): "" for those, else the error naming the value; CUDA ops
// raise it, after their dispatch. cuda_step_gemm_kind() (CUDA builds only): "cublas" or
// "aten", what a call would use.
std::string step_gemm_knob_error();
const char* cuda_step_gemm_kind();

// The workspace of a training forward: [T, N, width], workspace_dtype, contiguous, on x's
// device.
void check_workspace(const char* op, const Tensor& workspace, int64_t width, const Tensor& x);
// ... of a packed one: `shape` [R, width]
void check_workspace(const char* op, const Tensor& workspace, at::IntArrayRef shape,
                     const Tensor& x);

}  // namespace rnnfast
