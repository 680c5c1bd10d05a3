"""Every implementation the benchmark times, each built on the same weights.

A builder takes the torch.nn module that holds the weights (already of the case's dtype
and on its device) and returns (module, fn): `fn(x, hx)` runs the whole stack on
time-major `x` [T, N, C] from the initial state `hx` and returns (output, state) like
torch.nn; `module` owns the parameters whose gradients forward+backward produces.

Contenders:
  rnnfast         rnnfast.RNN / LSTM / GRU with the torch.nn module's state_dict, on the
                  CUDA path setting in force when the benchmark started (default auto)
  rnnfast step, rnnfast persistent, rnnfast cluster
                  (GPU) the same with that CUDA path forced (csrc/cuda/persistent.cuh),
                  to see what `auto` chose against what it could have had
  rnnfast mma32, rnnfast mma64
                  (GPU, float16/bfloat16, N over 16 or 32) the grid variant forced with
                  RNNFAST_MMA_ROWS=32 or 64: its forward's tensor-core tiles of at most 32
                  or 64 batch rows (the backward is unchanged)
  rnnfast step aten
                  (GPU) the per-step path forced with RNNFAST_STEP_GEMM=aten: its 16-bit
                  GEMMs through ATen rather than cublasGemmEx called directly (`rnnfast
                  step`), to measure what the direct calls save
  rnnfast reg     (GPU, float16/bfloat16, N <= 16) the grid variant forced with
                  RNNFAST_REG_TILE=1 (the default since the fourth H100 run): its forward on
                  the register tile (W_hh's slice in registers, where the layer fits it; the
                  backward is unchanged)
  rnnfast step fused
                  (GPU, float16/bfloat16, H % 8 == 0) the per-step path forced with
                  RNNFAST_STEP_FUSED=1: its forward one kernel a step (the GEMM on tensor
                  cores and the pointwise update fused; off by default until measured)
  rnnfast step graph
                  (GPU, float16/bfloat16) the per-step path forced with RNNFAST_STEP_GRAPH=1:
                  its T steps replayed as one CUDA graph (captured at a shape's second
                  call; the backward too in bfloat16), no host work a step; off by default
                  until measured
  rnnfast async   (GPU) rnnfast on auto with RNNFAST_CLUSTER_EXCHANGE=async: the cluster
                  variant's async exchange (st.async and mbarriers, no cluster barrier;
                  off by default until measured) wherever auto picks the cluster variant
  rnnfast segments
                  (CPU, packed shapes) rnnfast with the packed ops off
                  (rnnfast.functional.PACKED_OPS): PackedSequence input by segments of
                  equal batch size, one dense op call each, as CUDA runs it; what the packed
                  ops gain
  torch.nn        the torch.nn module itself (CPU: native ATen/oneDNN kernels; GPU: cuDNN)
  reference loop  rnnfast.reference.forward: a Python loop over the cell equations, the
                  code people write without a fused layer
  compiled loop   the same loop with each cell step compiled by torch.compile (dynamic
                  shapes, so one compilation serves every T, N and H); compiling the
                  whole unrolled loop instead would recompile for every T and take
                  minutes at T=1024
  flashrnn        (GPU) NX-AI's FlashRNN, `cuda_fused` backend (the weight-stationary
                  kernel), else its alternating `cuda` backend; one layer, one direction
  haste           (GPU) LMNT's Haste (haste_pytorch) LSTM and GRU; one layer, one direction

A contender that cannot run raises Unavailable with the reason; the runner reports it.
Packed shapes (PackedSequence input) run rnnfast's and torch.nn's modules only.
"""
import copy
import importlib
import os
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.fx.experimental._config  # noqa: F401 - use_duck_shape, set below
from torch import nn

import rnnfast
import rnnfast.functional as RF
from rnnfast import reference

NN_CLASSES = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}
FAST_CLASSES = {"lstm": rnnfast.LSTM, "gru": rnnfast.GRU, "rnn": rnnfast.RNN}
EXTRA_ARGS = {"lstm": {}, "gru": {}, "rnn": {"nonlinearity": "tanh"}}


class Unavailable(Exception):
    """This contender cannot run this case here; the message says why."""


def make_torch_module(cell, shape, dtype, device, seed=0):
    """The torch.nn module whose weights every contender uses: initialised on the CPU in
    float32 from `seed` (so every dtype and device starts from the same numbers), then
    converted."""
    torch.manual_seed(seed)
    m = NN_CLASSES[cell](shape.C, shape.H, num_layers=shape.layers,
                         bidirectional=shape.bidirectional, **EXTRA_ARGS[cell])
    return m.to(dtype=dtype, device=device)


# the environment knobs the rnnfast contenders set on each call (csrc/cuda/persistent.cuh,
# csrc/cuda/common.cuh): each as the contender asks, else as it was when it was built
KNOBS = ("RNNFAST_MMA_ROWS", "RNNFAST_STEP_GEMM", "RNNFAST_REG_TILE",
         "RNNFAST_CLUSTER_EXCHANGE", "RNNFAST_STEP_FUSED", "RNNFAST_STEP_GRAPH")


def _rnnfast_on(path, name=None, mma_rows=None, step_gemm=None, reg_tile=None,
                exchange=None, step_fused=None, step_graph=None):
    """The rnnfast contender on a CUDA path (None: the setting in force when it is built),
    with RNNFAST_MMA_ROWS = mma_rows, RNNFAST_STEP_GEMM = step_gemm, RNNFAST_REG_TILE =
    reg_tile, RNNFAST_CLUSTER_EXCHANGE = exchange, RNNFAST_STEP_FUSED = step_fused and
    RNNFAST_STEP_GRAPH = step_graph where given. Each call sets the path and the knobs, which stay set through the backward that
    follows it: the contenders' calls interleave."""
    asked = {"RNNFAST_MMA_ROWS": None if mma_rows is None else str(mma_rows),
             "RNNFAST_STEP_GEMM": step_gemm,
             "RNNFAST_REG_TILE": None if reg_tile is None else str(reg_tile),
             "RNNFAST_CLUSTER_EXCHANGE": exchange,
             "RNNFAST_STEP_FUSED": None if step_fused is None else str(step_fused),
             "RNNFAST_STEP_GRAPH": None if step_graph is None else str(step_graph)}

    def build(ref, cell, shape, mode):
        label = name or f"rnnfast {path}"
        if path is not None:
            _require_cuda(label, ref)
        check_knobs_apply(label, ref.weight_ih_l0.dtype, shape, mma_rows, step_gemm, reg_tile,
                          step_fused, step_graph)
        m = FAST_CLASSES[cell](shape.C, shape.H, num_layers=shape.layers,
                               bidirectional=shape.bidirectional, **EXTRA_ARGS[cell])
        m = m.to(dtype=ref.weight_ih_l0.dtype, device=ref.weight_ih_l0.device)
        m.load_state_dict(ref.state_dict())
        chosen = path or rnnfast.get_cuda_path()
        knobs = {k: asked[k] if asked[k] is not None else os.environ.get(k) for k in KNOBS}

        def call(x, hx):
            rnnfast.set_cuda_path(chosen)
            set_knobs(knobs)
            return m(x, hx)
        return m, call
    return build


def _rnnfast_segments(ref, cell, shape, mode):
    label = "rnnfast segments"
    if not shape.packed:
        raise Unavailable(f"{label} differs from rnnfast only on packed shapes")
    if ref.weight_ih_l0.device.type != "cpu":
        raise Unavailable(f"{label}: on CUDA rnnfast runs packed input by segments anyway")
    m, call = _rnnfast_on(None, label)(ref, cell, shape, mode)

    def by_segments(x, hx):
        # off for the forward, which decides the path; the backward follows its graph
        saved, RF.PACKED_OPS = RF.PACKED_OPS, False
        try:
            return call(x, hx)
        finally:
            RF.PACKED_OPS = saved
    return m, by_segments


def check_knobs_apply(label, dtype, shape, mma_rows, step_gemm, reg_tile=None,
                      step_fused=None, step_graph=None):
    """Unavailable where a knob asked for changes nothing (the contender would time the same
    code as another)."""
    half = dtype in (torch.float16, torch.bfloat16)
    if step_graph and not half:
        raise Unavailable(f"{label}: the step graph is for float16/bfloat16; {dtype}'s per-step "
                          f"path is bound by its GEMMs")
    if step_fused:
        if not half:
            raise Unavailable(f"{label}: the fused step is the tensor-core (float16/bfloat16) "
                              f"forward's; {dtype} has none")
        if shape.H % 8:
            raise Unavailable(f"{label}: the fused step needs H % 8 == 0, H={shape.H}")
    if step_gemm is not None and not half:
        raise Unavailable(f"{label}: RNNFAST_STEP_GEMM routes only float16/bfloat16 GEMMs; "
                          f"{dtype}'s go through ATen either way")
    if mma_rows is not None:
        if not half:
            raise Unavailable(f"{label}: {mma_rows}-row tiles are the tensor-core "
                              f"(float16/bfloat16) forward's; {dtype} has none")
        if shape.N * 2 <= mma_rows:
            raise Unavailable(f"{label}: N={shape.N} is too small for {mma_rows}-row tiles "
                              f"(more than {mma_rows // 2} rows needed)")
    if reg_tile:
        if not half:
            raise Unavailable(f"{label}: the register tile is the tensor-core "
                              f"(float16/bfloat16) forward's; {dtype} has none")
        if shape.N > 16:
            raise Unavailable(f"{label}: the register tile holds at most 16 batch rows, "
                              f"N={shape.N}")


def set_knobs(knobs):
    """os.environ's KNOBS as `knobs` has them (None: unset)."""
    for k, v in knobs.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _torch_nn(ref, cell, shape, mode):
    m = copy.deepcopy(ref)
    return m, m


def _reference_loop(ref, cell, shape, mode):
    m = copy.deepcopy(ref)
    return m, lambda x, hx: reference.forward(m, x, hx)


_COMPILED_CELLS: Dict[str, Callable] = {}


def _at_offset_zero(t):
    return t if t is None or t.storage_offset() == 0 else t.clone()


def _compiled(fn):
    """fn under torch.compile with dynamic shapes. Its tensor arguments are given at
    storage offset 0: dynamo specializes offsets 0 and 1 and would otherwise compile
    several variants (x_t = x[t] is a view at offset t*N*C); the copy of x_t costs
    N*C elements per step against the step's N*C*G*H multiply-adds."""
    # parameters' shapes would otherwise be static: a new H or C would recompile
    torch._dynamo.config.force_parameter_static_shapes = False
    # nor tie equal sizes together (C == H in most shapes, not in a second layer)
    torch.fx.experimental._config.use_duck_shape = False
    # variants: grad mode, whether h requires grad (not at t=0), dtype
    # (recompile_limit: cache_size_limit before torch 2.7)
    name = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 32))
    compiled = torch.compile(fn, dynamic=True)

    def call(*args, **kwargs):
        return compiled(*(_at_offset_zero(a) if isinstance(a, torch.Tensor) else a for a in args), **kwargs)
    return call


def compiled_cells() -> Dict[str, Callable]:
    """rnnfast.reference's cell functions under torch.compile, made once per process."""
    if not _COMPILED_CELLS:
        for kind, fn in (("rnn", reference.rnn_cell), ("lstm", reference.lstm_cell),
                         ("gru", reference.gru_cell)):
            _COMPILED_CELLS[kind] = _compiled(fn)
    return _COMPILED_CELLS


def _compiled_loop(ref, cell, shape, mode):
    m = copy.deepcopy(ref)
    cells = compiled_cells()
    return m, lambda x, hx: reference.forward(m, x, hx, cells=cells)


def _single_layer_only(name, shape):
    if shape.layers != 1 or shape.bidirectional:
        raise Unavailable(f"{name} runs one layer in one direction; this shape has "
                          f"{shape.layers} layer(s), {shape.D} direction(s)")


def _require_cuda(name, ref):
    if ref.weight_ih_l0.device.type != "cuda":
        raise Unavailable(f"{name} runs on CUDA only")


def _import(module: str, hint: str):
    try:
        return importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - any import failure means "not here"
        raise Unavailable(f"cannot import {module} ({type(e).__name__}: {str(e).strip()[:160]}); {hint}")


_FLASHRNN_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_FLASHRNN_FUNCTION = {"lstm": "lstm", "gru": "gru", "rnn": "elman"}
FLASHRNN_HINT = ("pip install flashrnn einops (scripts/peers.sh downloads the wheels for a "
                 "machine without internet)")


class FlashRNNLayer(nn.Module):
    """One layer in FlashRNN's layout, converted once from torch.nn's weights (as a user
    of FlashRNN would hold them): Wx = x W_ih^T per step, R [G, 1, H_in, H_out] per gate,
    b [Gb, 1, H]. LSTM gates i, f, g, o as torch.nn; GRU R holds (n, r, z) and b
    (b_hn, b_r, b_z, b_in), FlashRNN's order; Elman is tanh."""

    def __init__(self, ref, cell):
        super().__init__()
        H = ref.hidden_size
        w_ih, w_hh = ref.weight_ih_l0.detach(), ref.weight_hh_l0.detach()
        b_ih, b_hh = ref.bias_ih_l0.detach(), ref.bias_hh_l0.detach()
        G = w_hh.shape[0] // H
        per_gate_t = w_hh.view(G, H, H).transpose(1, 2)  # [G, H_in, H_out]
        if cell == "gru":
            R = per_gate_t[[2, 0, 1]]
            b = torch.stack([b_hh[2 * H:], b_ih[:H] + b_hh[:H], b_ih[H:2 * H] + b_hh[H:2 * H],
                             b_ih[2 * H:]])
        else:
            R = per_gate_t
            b = (b_ih + b_hh).view(G, H)
        self.w_ih = nn.Parameter(w_ih.clone())
        self.R = nn.Parameter(R.unsqueeze(1).contiguous())
        self.b = nn.Parameter(b.unsqueeze(1).contiguous())
        self.G, self.H, self.cell = G, H, cell
        self.function = _FLASHRNN_FUNCTION[cell]
        self.dtype_name = _FLASHRNN_DTYPES[w_ih.dtype]
        self.backend = "cuda_fused"

    def forward(self, x, hx):
        from flashrnn import flashrnn
        T, N, _ = x.shape
        Wx = (x.transpose(0, 1) @ self.w_ih.t()).view(N, T, self.G, 1, self.H)
        states = torch.stack(list(hx)) if isinstance(hx, tuple) else hx  # [S, 1, N, H]
        states = states.reshape(states.shape[0], N, 1, 1, self.H)
        out, last = flashrnn(Wx, self.R, self.b, states=states, function=self.function,
                             backend=self.backend, dtype=self.dtype_name)
        y = out[0].reshape(N, T, self.H).transpose(0, 1)  # [S, N, T, 1, H] -> [T, N, H]
        return y, None


def _flashrnn(ref, cell, shape, mode):
    _require_cuda("flashrnn", ref)
    _single_layer_only("flashrnn", shape)
    if ref.weight_ih_l0.dtype not in _FLASHRNN_DTYPES:
        raise Unavailable(f"flashrnn has no {ref.weight_ih_l0.dtype} kernels")
    _import("flashrnn", FLASHRNN_HINT)
    m = FlashRNNLayer(ref, cell)
    # the fused backend's JIT build rejects some shapes: fall back to the alternating one
    probe = torch.zeros(2, shape.N, shape.C, dtype=ref.weight_ih_l0.dtype, device=ref.weight_ih_l0.device)
    h0 = probe.new_zeros(1, shape.N, shape.H)
    hx = (h0, h0) if cell == "lstm" else h0
    errors = []
    for backend in ("cuda_fused", "cuda"):
        m.backend = backend
        try:
            with torch.no_grad():
                m(probe, hx)
            return m, m
        except Exception as e:  # noqa: BLE001
            errors.append(f"{backend}: {type(e).__name__}: {str(e).strip().splitlines()[0][:120] if str(e).strip() else ''}")
    raise Unavailable("flashrnn failed to run: " + "; ".join(errors))


HASTE_HINT = ("build it from github.com/lmnt-com/haste (scripts/peers.sh fetches the source; "
              "scripts/gpu_check.sh builds it when time allows)")


def _haste(ref, cell, shape, mode):
    _require_cuda("haste", ref)
    _single_layer_only("haste", shape)
    if cell not in ("lstm", "gru"):
        raise Unavailable("haste has no Elman RNN")
    haste = _import("haste_pytorch", HASTE_HINT)
    dtype = ref.weight_ih_l0.dtype
    if dtype == torch.bfloat16:
        raise Unavailable("haste has no bfloat16 kernels")
    layer = (haste.LSTM if cell == "lstm" else haste.GRU)(shape.C, shape.H)
    layer.from_native_weights(ref.weight_ih_l0.detach(), ref.weight_hh_l0.detach(),
                              ref.bias_ih_l0.detach(), ref.bias_hh_l0.detach())
    layer = layer.to(dtype=dtype, device=ref.weight_ih_l0.device)
    layer.train(mode == "fwdbwd")  # haste keeps its backward cache in training mode only
    # the benchmark's initial state is zeros, haste's default
    return layer, lambda x, hx: layer(x)


BUILDERS: Dict[str, Callable] = {
    "rnnfast": _rnnfast_on(None),
    "rnnfast step": _rnnfast_on("step"),
    "rnnfast persistent": _rnnfast_on("persistent"),
    "rnnfast cluster": _rnnfast_on("cluster"),
    "rnnfast mma32": _rnnfast_on("persistent", "rnnfast mma32", mma_rows=32),
    "rnnfast mma64": _rnnfast_on("persistent", "rnnfast mma64", mma_rows=64),
    "rnnfast step aten": _rnnfast_on("step", "rnnfast step aten", step_gemm="aten"),
    "rnnfast reg": _rnnfast_on("persistent", "rnnfast reg", reg_tile=1),
    "rnnfast async": _rnnfast_on("auto", "rnnfast async", exchange="async"),
    "rnnfast step fused": _rnnfast_on("step", "rnnfast step fused", step_fused=1),
    "rnnfast step graph": _rnnfast_on("step", "rnnfast step graph", step_graph=1),
    "rnnfast segments": _rnnfast_segments,
    "torch.nn": _torch_nn,
    "reference loop": _reference_loop,
    "compiled loop": _compiled_loop,
    "flashrnn": _flashrnn,
    "haste": _haste,
}
DEFAULT_CONTENDERS = {
    "cpu": ["rnnfast", "torch.nn", "reference loop", "compiled loop"],
    "cuda": ["rnnfast", "torch.nn", "reference loop", "compiled loop", "flashrnn", "haste"],
}


def build(name, ref, cell, shape, mode) -> Tuple[nn.Module, Callable]:
    if shape.packed and not (name == "torch.nn" or name.split(" ")[0] == "rnnfast"):
        raise Unavailable(f"{name} takes no PackedSequence")
    return BUILDERS[name](ref, cell, shape, mode)


def unavailable_here(name: str, device: str) -> Optional[str]:
    """Why `name` cannot run at all on `device` (checked once per run), or None."""
    if (name in ("flashrnn", "haste") or name.startswith("rnnfast ")) and device != "cuda" \
            and name != "rnnfast segments":
        return f"{name} runs on CUDA only"
    try:
        if name == "flashrnn":
            _import("flashrnn", FLASHRNN_HINT)
        elif name == "haste":
            _import("haste_pytorch", HASTE_HINT)
    except Unavailable as e:
        return str(e)
    return None
