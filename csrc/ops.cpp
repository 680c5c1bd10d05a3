// Every op schema of rnnfast, in one place. Device bodies live in cpu/ and cuda/;
// fake (meta) implementations are registered from Python (rnnfast/_ops.py).
#include <Python.h>
#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <tuple>

#include "rnnfast.h"
#include "cpu/kernels.h"

namespace rnnfast {

static void check_float_tensor(const char* op, const char* name, const Tensor& t,
                               const Tensor& like) {
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": expected ", name, " to have dtype ",
              like.scalar_type(), " like the input, but got ", t.scalar_type());
  TORCH_CHECK(t.device() == like.device(), op, ": expected ", name, " on device ", like.device(),
              " like the input, but got ", t.device());
  TORCH_CHECK(t.is_contiguous(), op, ": expected ", name, " to be contiguous");
}

void check_same_shape(const char* op, const char* name, const Tensor& t, at::IntArrayRef shape,
                      const Tensor& like) {
  TORCH_CHECK(t.sizes() == shape, op, ": expected ", name, " of shape ", shape, ", but got ",
              t.sizes());
  check_float_tensor(op, name, t, like);
}

std::optional<Tensor> sum_biases(const std::optional<Tensor>& a, const std::optional<Tensor>& b) {
  if (a && b) return *a + *b;
  if (a) return *a;
  return b;
}

at::ScalarType workspace_dtype(at::ScalarType dtype) {
  return dtype == at::kHalf || dtype == at::kBFloat16 ? at::kFloat : dtype;
}

void check_activation(const char* op, int64_t activation) {
  TORCH_CHECK(activation >= 0 && activation <= 2, op,
              ": expected activation 0 (tanh), 1 (relu) or 2 (identity), but got ", activation);
}

void check_workspace(const char* op, const Tensor& workspace, at::IntArrayRef shape,
                     const Tensor& x) {
  const auto dtype = workspace_dtype(x.scalar_type());
  TORCH_CHECK(workspace.sizes() == shape && workspace.scalar_type() == dtype &&
                  workspace.device() == x.device() && workspace.is_contiguous(),
              op, ": expected the workspace of a training forward (contiguous, shape ", shape,
              ", ", dtype, ", on ", x.device(), "), but got shape ", workspace.sizes(), ", ",
              workspace.scalar_type(), " on ", workspace.device());
}

void check_workspace(const char* op, const Tensor& workspace, int64_t width, const Tensor& x) {
  check_workspace(op, workspace, {x.size(0), x.size(1), width}, x);
}

// x's dtype and layout, the weights' and h0's shapes, for C input features and N rows of state
static void check_layer_tensors(const char* op, int64_t gates, const Tensor& x, int64_t C,
                                int64_t N, const Tensor& h0, const Tensor& w_ih,
                                const Tensor& w_hh, const std::optional<Tensor>& b_ih,
                                const std::optional<Tensor>& b_hh) {
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op,
              ": expected a floating-point input, but got ", x.scalar_type());
  TORCH_CHECK(x.is_contiguous(), op, ": expected a contiguous x");
  TORCH_CHECK(w_hh.dim() == 2 && w_hh.size(0) == gates * w_hh.size(1), op,
              ": expected w_hh of shape [", gates, "*H, H], but got ", w_hh.sizes());
  const int64_t H = w_hh.size(1);
  check_same_shape(op, "w_ih", w_ih, {gates * H, C}, x);
  check_same_shape(op, "w_hh", w_hh, {gates * H, H}, x);
  check_same_shape(op, "h0", h0, {N, H}, x);
  if (b_ih) check_same_shape(op, "b_ih", *b_ih, {gates * H}, x);
  if (b_hh) check_same_shape(op, "b_hh", *b_hh, {gates * H}, x);
}

void check_layer_inputs(const char* op, int64_t gates, const Tensor& x, const Tensor& h0,
                        const Tensor& w_ih, const Tensor& w_hh,
                        const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh) {
  TORCH_CHECK(x.dim() == 3, op, ": expected x of shape [T, N, C], but got ", x.sizes());
  check_layer_tensors(op, gates, x, x.size(2), x.size(1), h0, w_ih, w_hh, b_ih, b_hh);
}

void check_packed_inputs(const char* op, int64_t gates, const Tensor& x,
                         const Tensor& batch_sizes, const Tensor& h0, const Tensor& w_ih,
                         const Tensor& w_hh, const std::optional<Tensor>& b_ih,
                         const std::optional<Tensor>& b_hh) {
  TORCH_CHECK(x.dim() == 2, op, ": expected packed x of shape [rows, C], but got ", x.sizes());
  TORCH_CHECK(h0.dim() == 2, op, ": expected h0 of shape [N, H], but got ", h0.sizes());
  check_layer_tensors(op, gates, x, x.size(1), h0.size(0), h0, w_ih, w_hh, b_ih, b_hh);
  TORCH_CHECK(batch_sizes.dim() == 1 && batch_sizes.scalar_type() == at::kLong &&
                  batch_sizes.device().is_cpu() && batch_sizes.numel() >= 1,
              op, ": expected batch_sizes as a non-empty 1-D int64 tensor on the CPU, but got ",
              batch_sizes.scalar_type(), " of shape ", batch_sizes.sizes(), " on ",
              batch_sizes.device());
  const Tensor b = batch_sizes.contiguous();
  const int64_t* p = b.data_ptr<int64_t>();
  TORCH_CHECK(p[0] == h0.size(0), op, ": expected batch_sizes[0] (", p[0],
              ") to be the rows of h0 (", h0.size(0), ")");
  int64_t rows = 0;  // kept at most x's rows, so that the sum cannot overflow
  for (int64_t t = 0; t < b.numel(); ++t) {
    TORCH_CHECK(p[t] >= 1 && (t == 0 || p[t] <= p[t - 1]), op,
                ": expected batch_sizes positive and non-increasing (sequences sorted longest "
                "first), but batch_sizes[", t, "] is ", p[t]);
    TORCH_CHECK(p[t] <= x.size(0) - rows, op, ": batch_sizes adds up to more than the ",
                x.size(0), " rows of x (past them at batch_sizes[", t, "])");
    rows += p[t];
  }
  TORCH_CHECK(rows == x.size(0), op, ": batch_sizes adds up to ", rows, " rows, but x has ",
              x.size(0));
}

}  // namespace rnnfast

TORCH_LIBRARY(rnnfast, m) {
  // activation: 0 tanh, 1 relu, 2 identity (see rnnfast.h)
  m.def("rnn_forward(Tensor x, Tensor h0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, "
        "int activation, bool reverse, bool training) -> (Tensor y, Tensor hn)");
  m.def("rnn_backward(Tensor dy, Tensor dhn, Tensor x, Tensor h0, Tensor w_ih, Tensor w_hh, "
        "Tensor y, int activation, bool reverse) "
        "-> (Tensor dx, Tensor dh0, Tensor dw_ih, Tensor dw_hh, Tensor db)");
  m.def("lstm_forward(Tensor x, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, "
        "Tensor? b_hh, bool reverse, bool training) "
        "-> (Tensor y, Tensor hn, Tensor cn, Tensor workspace)");
  m.def("lstm_backward(Tensor dy, Tensor dhn, Tensor dcn, Tensor x, Tensor h0, Tensor c0, "
        "Tensor w_ih, Tensor w_hh, Tensor y, Tensor workspace, bool reverse) "
        "-> (Tensor dx, Tensor dh0, Tensor dc0, Tensor dw_ih, Tensor dw_hh, Tensor db)");
  m.def("gru_forward(Tensor x, Tensor h0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, "
        "bool reverse, bool training) -> (Tensor y, Tensor hn, Tensor workspace)");
  m.def("gru_backward(Tensor dy, Tensor dhn, Tensor x, Tensor h0, Tensor w_ih, Tensor w_hh, "
        "Tensor y, Tensor workspace, bool reverse) "
        "-> (Tensor dx, Tensor dh0, Tensor dw_ih, Tensor dw_hh, Tensor db_ih, Tensor db_hh)");
  // the same over a PackedSequence's data (CPU; rnnfast.h, "PackedSequence")
  m.def("rnn_packed_forward(Tensor x, Tensor batch_sizes, Tensor h0, Tensor w_ih, Tensor w_hh, "
        "Tensor? b_ih, Tensor? b_hh, int activation, bool reverse, bool training) "
        "-> (Tensor y, Tensor hn)");
  m.def("rnn_packed_backward(Tensor dy, Tensor dhn, Tensor x, Tensor batch_sizes, Tensor h0, "
        "Tensor w_ih, Tensor w_hh, Tensor y, int activation, bool reverse) "
        "-> (Tensor dx, Tensor dh0, Tensor dw_ih, Tensor dw_hh, Tensor db)");
  m.def("lstm_packed_forward(Tensor x, Tensor batch_sizes, Tensor h0, Tensor c0, Tensor w_ih, "
        "Tensor w_hh, Tensor? b_ih, Tensor? b_hh, bool reverse, bool training) "
        "-> (Tensor y, Tensor hn, Tensor cn, Tensor workspace)");
  m.def("lstm_packed_backward(Tensor dy, Tensor dhn, Tensor dcn, Tensor x, Tensor batch_sizes, "
        "Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, Tensor y, Tensor workspace, "
        "bool reverse) "
        "-> (Tensor dx, Tensor dh0, Tensor dc0, Tensor dw_ih, Tensor dw_hh, Tensor db)");
  m.def("gru_packed_forward(Tensor x, Tensor batch_sizes, Tensor h0, Tensor w_ih, Tensor w_hh, "
        "Tensor? b_ih, Tensor? b_hh, bool reverse, bool training) "
        "-> (Tensor y, Tensor hn, Tensor workspace)");
  m.def("gru_packed_backward(Tensor dy, Tensor dhn, Tensor x, Tensor batch_sizes, Tensor h0, "
        "Tensor w_ih, Tensor w_hh, Tensor y, Tensor workspace, bool reverse) "
        "-> (Tensor dx, Tensor dh0, Tensor dw_ih, Tensor dw_hh, Tensor db_ih, Tensor db_hh)");
  // a trace of the next persistent launch in one direction (rnnfast._ops._trace_next)
  m.def("_trace_next(int steps, bool backward) -> ()", &rnnfast::trace_next);
  m.def("_last_trace(bool backward) -> (Tensor trace, int blocks, int steps)",
        &rnnfast::last_trace);
}

TORCH_LIBRARY_IMPL(rnnfast, CPU, m) {
  m.impl("rnn_forward", &rnnfast::rnn_forward_cpu);
  m.impl("rnn_backward", &rnnfast::rnn_backward_cpu);
  m.impl("lstm_forward", &rnnfast::lstm_forward_cpu);
  m.impl("lstm_backward", &rnnfast::lstm_backward_cpu);
  m.impl("gru_forward", &rnnfast::gru_forward_cpu);
  m.impl("gru_backward", &rnnfast::gru_backward_cpu);
  m.impl("rnn_packed_forward", &rnnfast::rnn_packed_forward_cpu);
  m.impl("rnn_packed_backward", &rnnfast::rnn_packed_backward_cpu);
  m.impl("lstm_packed_forward", &rnnfast::lstm_packed_forward_cpu);
  m.impl("lstm_packed_backward", &rnnfast::lstm_packed_backward_cpu);
  m.impl("gru_packed_forward", &rnnfast::gru_packed_forward_cpu);
  m.impl("gru_packed_backward", &rnnfast::gru_packed_backward_cpu);
}

// ---- the CUDA path setting (kept here so that it exists in CPU-only builds too) ----
namespace rnnfast {
namespace {
constexpr const char* kPathNames[] = {"auto", "step", "persistent", "cluster"};
std::atomic<int> path_mode{-1};  // -1: not read from RNNFAST_CUDA_PATH yet
std::atomic<int> last_path[2] = {-1, -1};
std::atomic<int> last_variant[2] = {-1, -1};  // StepVariant
constexpr const char* kVariantNames[] = {"plain", "fused", "graph"};
std::mutex plan_mutex;
CudaPlanNote last_plan[2];
bool plan_noted[2] = {false, false};

int parse_path(const char* what, const std::string& name) {
  for (int i = 0; i < 4; ++i) {
    if (name == kPathNames[i]) return i;
  }
  TORCH_CHECK_VALUE(false, what, ": expected 'auto', 'persistent', 'cluster' or 'step', but got '",
                    name, "'");
}
}  // namespace

CudaPath cuda_path_mode() {
  int mode = path_mode.load();
  if (mode < 0) {
    const char* env = std::getenv("RNNFAST_CUDA_PATH");
    // the default: `auto` (the persistent kernels passed the CUDA tests and compute-sanitizer
    // on an H100, and the cost model is fitted to its measurements)
    mode = env == nullptr || *env == 0 ? static_cast<int>(CudaPath::kAuto)
                                       : parse_path("RNNFAST_CUDA_PATH", env);
    path_mode.store(mode);
  }
  return static_cast<CudaPath>(mode);
}

std::string step_gemm_knob_error() {
  const char* v = std::getenv("RNNFAST_STEP_GEMM");
  if (v == nullptr || *v == 0 || std::strcmp(v, "cublas") == 0 || std::strcmp(v, "aten") == 0) {
    return "";
  }
  return std::string("RNNFAST_STEP_GEMM is '") + v + "', expected 'cublas' or 'aten'";
}

void note_cuda_path(bool backward, CudaPath used) {
  last_variant[backward ? 1 : 0].store(
      static_cast<int>(used == CudaPath::kStep ? StepVariant::kPlain : StepVariant::kNone));
  last_path[backward ? 1 : 0].store(static_cast<int>(used));
}

void note_step_variant(bool backward, StepVariant variant) {
  last_variant[backward ? 1 : 0].store(static_cast<int>(variant));
}

void note_cuda_plan(bool backward, const CudaPlanNote& note) {
  const std::lock_guard<std::mutex> lock(plan_mutex);
  last_plan[backward ? 1 : 0] = note;
  plan_noted[backward ? 1 : 0] = true;
}

static std::mutex trace_mutex;
static int64_t trace_request[2] = {0, 0};
// never destroyed: a CUDA tensor freed at the process's exit may outlive the allocator
static Tensor* const trace_buffer = new Tensor[2];
static int64_t trace_blocks[2] = {0, 0}, trace_steps[2] = {0, 0};

void trace_next(int64_t steps, bool backward) {
  TORCH_CHECK_VALUE(steps >= 0 && steps <= (int64_t(1) << 20),
                    "rnnfast::_trace_next: expected steps from 0 to 1048576, but got ", steps);
  const std::lock_guard<std::mutex> lock(trace_mutex);
  trace_request[backward ? 1 : 0] = steps;
}

int64_t take_trace_request(bool backward) {
  const std::lock_guard<std::mutex> lock(trace_mutex);
  const int64_t steps = trace_request[backward ? 1 : 0];
  trace_request[backward ? 1 : 0] = 0;
  return steps;
}

void note_trace(bool backward, const Tensor& trace, int64_t blocks, int64_t steps) {
  const std::lock_guard<std::mutex> lock(trace_mutex);
  trace_buffer[backward ? 1 : 0] = trace;
  trace_blocks[backward ? 1 : 0] = blocks;
  trace_steps[backward ? 1 : 0] = steps;
}

// (trace, blocks, steps) of the last traced launch in that direction (a copy); an empty
// tensor and zeros before any
std::tuple<Tensor, int64_t, int64_t> last_trace(bool backward) {
  const std::lock_guard<std::mutex> lock(trace_mutex);
  const int i = backward ? 1 : 0;
  if (!trace_buffer[i].defined()) return {at::empty({0}, at::kLong), 0, 0};
  return {trace_buffer[i].clone(), trace_blocks[i], trace_steps[i]};
}

void check_persistent_refusal(const char* op, const std::string& why) {
  TORCH_CHECK(why.empty(), op, ": ", why);
}
}  // namespace rnnfast

namespace {
// Python: _C._set_cuda_path(name) -> the previous name; _C._cuda_path() -> name;
// _C._last_cuda_path() -> (forward, backward), each a name or None.
template <typename F>
PyObject* python_call(F body) {
  try {
    return body();
  } catch (const c10::ValueError& e) {
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  }
  return nullptr;
}

// arg's text, or null with a TypeError saying `expected` set where arg is not a str
const char* str_argument(PyObject* arg, const char* expected) {
  const char* text = PyUnicode_Check(arg) ? PyUnicode_AsUTF8(arg) : nullptr;
  if (text == nullptr) {
    PyErr_Clear();
    PyErr_SetString(PyExc_TypeError, expected);
  }
  return text;
}

PyObject* py_cuda_path(PyObject*, PyObject*) {
  return python_call([] {
    return PyUnicode_FromString(rnnfast::kPathNames[static_cast<int>(rnnfast::cuda_path_mode())]);
  });
}

PyObject* py_set_cuda_path(PyObject*, PyObject* arg) {
  return python_call([arg]() -> PyObject* {
    const char* name = str_argument(
        arg, "expected the path as a str: 'auto', 'persistent', 'cluster' or 'step'");
    if (name == nullptr) return nullptr;
    const int mode = rnnfast::parse_path("rnnfast.cuda_path", name);
    const int previous = static_cast<int>(rnnfast::cuda_path_mode());
    rnnfast::path_mode.store(mode);
    return PyUnicode_FromString(rnnfast::kPathNames[previous]);
  });
}

// (names[forward], names[backward]) of two atomic indices, None for a negative one
PyObject* name_pair(const std::atomic<int> (&index)[2], const char* const* names) {
  PyObject* pair[2];
  for (int i = 0; i < 2; ++i) {
    const int v = index[i].load();
    if (v < 0) {
      Py_INCREF(Py_None);
      pair[i] = Py_None;
    } else {
      pair[i] = PyUnicode_FromString(names[v]);
    }
  }
  PyObject* out = PyTuple_Pack(2, pair[0], pair[1]);
  Py_DECREF(pair[0]);
  Py_DECREF(pair[1]);
  return out;
}

PyObject* py_last_cuda_path(PyObject*, PyObject*) {
  return name_pair(rnnfast::last_path, rnnfast::kPathNames);
}

// _C._last_step_variant() -> (forward, backward): how the last CUDA forward and backward ran
// their steps on the per-step path, 'plain', 'fused' or 'graph'; None off it or before any
PyObject* py_last_step_variant(PyObject*, PyObject*) {
  return name_pair(rnnfast::last_variant, rnnfast::kVariantNames);
}

// _C._last_cuda_plan() -> (forward, backward), each a dict of CudaPlanNote's fields or None
PyObject* py_last_cuda_plan(PyObject*, PyObject*) {
  return python_call([]() -> PyObject* {
    rnnfast::CudaPlanNote notes[2];
    bool noted[2];
    {
      const std::lock_guard<std::mutex> lock(rnnfast::plan_mutex);
      for (int i = 0; i < 2; ++i) {
        notes[i] = rnnfast::last_plan[i];
        noted[i] = rnnfast::plan_noted[i];
      }
    }
    PyObject* out = PyTuple_New(2);
    for (int i = 0; i < 2; ++i) {
      PyObject* d;
      if (!noted[i]) {
        Py_INCREF(Py_None);
        d = Py_None;
      } else {
        const rnnfast::CudaPlanNote& n = notes[i];
        d = Py_BuildValue(
            "{s:d,s:d,s:d,s:d,s:i,s:i,s:i,s:i,s:i,s:i,s:L,s:i,s:i,s:i}", "us", n.us, "grid_us",
            n.grid_us, "cluster_us", n.cluster_us, "step_us", n.step_us, "blocks", n.blocks,
            "units", n.units, "cluster", n.cluster, "nt", n.nt, "rpw", n.rpw, "xs_tiles",
            n.xs_tiles, "group_rows", static_cast<long long>(n.group_rows), "reg", n.reg,
            "async", n.async_exchange, "range_wait", n.range_wait);
        if (d == nullptr) {
          Py_DECREF(out);
          return nullptr;
        }
      }
      PyTuple_SET_ITEM(out, i, d);
    }
    return out;
  });
}

// _C._cpu_isa() -> the build of the CPU step kernels that runs: 'avx512', 'avx2' or 'baseline'
PyObject* py_cpu_isa(PyObject*, PyObject*) {
  return python_call(
      [] { return PyUnicode_FromString(rnnfast::cpu::cpu_isa_name(rnnfast::cpu::cpu_isa())); });
}

// _C._set_cpu_isa(name) -> the previous setting
PyObject* py_set_cpu_isa(PyObject*, PyObject* arg) {
  return python_call([arg]() -> PyObject* {
    const char* name =
        str_argument(arg, "expected the CPU ISA as a str: 'baseline', 'avx2' or 'avx512'");
    if (name == nullptr) return nullptr;
    const rnnfast::cpu::CpuIsa previous = rnnfast::cpu::set_cpu_isa("rnnfast.cpu_isa", name);
    return PyUnicode_FromString(rnnfast::cpu::cpu_isa_name(previous));
  });
}

// _C._step_gemm() -> "cublas" or "aten" (the per-step path's 16-bit GEMMs), None without CUDA
PyObject* py_step_gemm(PyObject*, PyObject*) {
#ifdef RNNFAST_WITH_CUDA
  const std::string error = rnnfast::step_gemm_knob_error();
  if (!error.empty()) {
    PyErr_SetString(PyExc_ValueError, error.c_str());
    return nullptr;
  }
  return PyUnicode_FromString(rnnfast::cuda_step_gemm_kind());
#else
  Py_RETURN_NONE;
#endif
}

PyMethodDef methods[] = {
    {"_cuda_path", py_cuda_path, METH_NOARGS, "the CUDA path setting"},
    {"_set_cuda_path", py_set_cuda_path, METH_O, "sets the CUDA path, returns the previous"},
    {"_last_cuda_path", py_last_cuda_path, METH_NOARGS, "(forward, backward) paths last run"},
    {"_last_step_variant", py_last_step_variant, METH_NOARGS,
     "(forward, backward): 'plain', 'fused', 'graph' or None, how the last ran its steps"},
    {"_last_cuda_plan", py_last_cuda_plan, METH_NOARGS,
     "(forward, backward) persistent plans last made: the cost model's estimates and sizes"},
    {"_cpu_isa", py_cpu_isa, METH_NOARGS, "the build of the CPU step kernels that runs"},
    {"_set_cpu_isa", py_set_cpu_isa, METH_O, "sets the CPU kernels' build, returns the previous"},
    {"_step_gemm", py_step_gemm, METH_NOARGS,
     "what the per-step path's 16-bit GEMMs go through: 'cublas', 'aten' or None (no CUDA)"},
    {nullptr, nullptr, 0, nullptr}};
}  // namespace

// `import rnnfast._C` loads this library, whose static initialisers register the ops
// above with the dispatcher; the module itself holds only the CUDA path setting.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
