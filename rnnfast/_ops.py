"""The compiled ops, their fake (meta) implementations, and one autograd.Function per cell
family. Every op runs one layer in one direction over a whole time-major sequence; the
shape legend and the equations are in csrc/rnnfast.h.
"""
import contextlib

import torch

from . import _C  # loading the library registers torch.ops.rnnfast.*

ops = torch.ops.rnnfast

# Elman activations, as the ops number them.
ACTIVATIONS = {"tanh": 0, "relu": 1, "identity": 2}


# ---- fake implementations: shapes and dtypes only, for torch.compile and opcheck ----

def _workspace_dtype(x):
    """Saved activations (and the LSTM cell state) stay in fp32 for fp16/bf16 inputs."""
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


@torch.library.register_fake("rnnfast::rnn_forward")
def _rnn_forward_fake(x, h0, w_ih, w_hh, b_ih, b_hh, activation, reverse, training):
    T, N, _ = x.shape
    H = w_hh.shape[1]
    return x.new_empty(T, N, H), x.new_empty(N, H)


@torch.library.register_fake("rnnfast::rnn_backward")
def _rnn_backward_fake(dy, dhn, x, h0, w_ih, w_hh, y, activation, reverse):
    return (torch.empty_like(x), torch.empty_like(h0), torch.empty_like(w_ih),
            torch.empty_like(w_hh), w_hh.new_empty(w_hh.shape[0]))


@torch.library.register_fake("rnnfast::lstm_forward")
def _lstm_forward_fake(x, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse, training):
    T, N, _ = x.shape
    H = w_hh.shape[1]
    return (x.new_empty(T, N, H), x.new_empty(N, H), x.new_empty(N, H),
            x.new_empty(T if training else 0, N, 5 * H, dtype=_workspace_dtype(x)))


@torch.library.register_fake("rnnfast::lstm_backward")
def _lstm_backward_fake(dy, dhn, dcn, x, h0, c0, w_ih, w_hh, y, workspace, reverse):
    return (torch.empty_like(x), torch.empty_like(h0), torch.empty_like(c0),
            torch.empty_like(w_ih), torch.empty_like(w_hh), w_hh.new_empty(w_hh.shape[0]))


@torch.library.register_fake("rnnfast::gru_forward")
def _gru_forward_fake(x, h0, w_ih, w_hh, b_ih, b_hh, reverse, training):
    T, N, _ = x.shape
    H = w_hh.shape[1]
    return (x.new_empty(T, N, H), x.new_empty(N, H),
            x.new_empty(T if training else 0, N, 4 * H, dtype=_workspace_dtype(x)))


@torch.library.register_fake("rnnfast::gru_backward")
def _gru_backward_fake(dy, dhn, x, h0, w_ih, w_hh, y, workspace, reverse):
    G = w_hh.shape[0]
    return (torch.empty_like(x), torch.empty_like(h0), torch.empty_like(w_ih),
            torch.empty_like(w_hh), w_hh.new_empty(G), w_hh.new_empty(G))


# the packed ops (PackedSequence data x [R, C], batch_sizes [T]; CPU): y and the workspace
# have R rows, the states N = batch_sizes[0]

@torch.library.register_fake("rnnfast::rnn_packed_forward")
def _rnn_packed_forward_fake(x, batch_sizes, h0, w_ih, w_hh, b_ih, b_hh, activation, reverse, training):
    return x.new_empty(x.shape[0], w_hh.shape[1]), torch.empty_like(h0)


@torch.library.register_fake("rnnfast::rnn_packed_backward")
def _rnn_packed_backward_fake(dy, dhn, x, batch_sizes, h0, w_ih, w_hh, y, activation, reverse):
    return (torch.empty_like(x), torch.empty_like(h0), torch.empty_like(w_ih),
            torch.empty_like(w_hh), w_hh.new_empty(w_hh.shape[0]))


@torch.library.register_fake("rnnfast::lstm_packed_forward")
def _lstm_packed_forward_fake(x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse, training):
    R, H = x.shape[0], w_hh.shape[1]
    return (x.new_empty(R, H), torch.empty_like(h0), torch.empty_like(c0),
            x.new_empty(R if training else 0, 5 * H, dtype=_workspace_dtype(x)))


@torch.library.register_fake("rnnfast::lstm_packed_backward")
def _lstm_packed_backward_fake(dy, dhn, dcn, x, batch_sizes, h0, c0, w_ih, w_hh, y, workspace, reverse):
    return (torch.empty_like(x), torch.empty_like(h0), torch.empty_like(c0),
            torch.empty_like(w_ih), torch.empty_like(w_hh), w_hh.new_empty(w_hh.shape[0]))


@torch.library.register_fake("rnnfast::gru_packed_forward")
def _gru_packed_forward_fake(x, batch_sizes, h0, w_ih, w_hh, b_ih, b_hh, reverse, training):
    R, H = x.shape[0], w_hh.shape[1]
    return (x.new_empty(R, H), torch.empty_like(h0),
            x.new_empty(R if training else 0, 4 * H, dtype=_workspace_dtype(x)))


@torch.library.register_fake("rnnfast::gru_packed_backward")
def _gru_packed_backward_fake(dy, dhn, x, batch_sizes, h0, w_ih, w_hh, y, workspace, reverse):
    G = w_hh.shape[0]
    return (torch.empty_like(x), torch.empty_like(h0), torch.empty_like(w_ih),
            torch.empty_like(w_hh), w_hh.new_empty(G), w_hh.new_empty(G))


# ---- autograd ----
# Each Function runs one layer and direction over x [T, N, C], or, given batch_sizes (a
# PackedSequence's, on the CPU), over its packed data x [R, C] with the packed ops.

def _bias_grads(has_bias, db_ih, db_hh):
    """The gradients of the biases that exist. Elman and LSTM pass one db for both, cloned
    once so that b_ih.grad and b_hh.grad never share storage."""
    return (db_ih if has_bias[0] else None, db_hh if has_bias[1] else None)


class RNNFunction(torch.autograd.Function):
    """One Elman layer and direction: (x, h0, w_ih, w_hh, b_ih, b_hh) -> (y, hn)."""

    @staticmethod
    def forward(ctx, x, h0, w_ih, w_hh, b_ih, b_hh, activation, reverse, batch_sizes=None):
        training = any(ctx.needs_input_grad[:6])
        if batch_sizes is None:
            y, hn = ops.rnn_forward(x, h0, w_ih, w_hh, b_ih, b_hh, activation, reverse, training)
        else:
            y, hn = ops.rnn_packed_forward(x, batch_sizes, h0, w_ih, w_hh, b_ih, b_hh, activation,
                                           reverse, training)
        if training:
            ctx.save_for_backward(x, h0, w_ih, w_hh, y)
            ctx.activation, ctx.reverse, ctx.batch_sizes = activation, reverse, batch_sizes
            ctx.has_bias = (b_ih is not None, b_hh is not None)
        return y, hn

    @staticmethod
    def backward(ctx, dy, dhn):
        x, h0, w_ih, w_hh, y = ctx.saved_tensors
        if ctx.batch_sizes is None:
            dx, dh0, dw_ih, dw_hh, db = ops.rnn_backward(
                dy.contiguous(), dhn.contiguous(), x, h0, w_ih, w_hh, y, ctx.activation, ctx.reverse)
        else:
            dx, dh0, dw_ih, dw_hh, db = ops.rnn_packed_backward(
                dy.contiguous(), dhn.contiguous(), x, ctx.batch_sizes, h0, w_ih, w_hh, y,
                ctx.activation, ctx.reverse)
        return (dx, dh0, dw_ih, dw_hh) + _bias_grads(ctx.has_bias, db, db.clone()) + (None,) * 3


class LSTMFunction(torch.autograd.Function):
    """One LSTM layer and direction: (x, h0, c0, w_ih, w_hh, b_ih, b_hh) -> (y, hn, cn)."""

    @staticmethod
    def forward(ctx, x, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse, batch_sizes=None):
        training = any(ctx.needs_input_grad[:7])
        if batch_sizes is None:
            y, hn, cn, workspace = ops.lstm_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse, training)
        else:
            y, hn, cn, workspace = ops.lstm_packed_forward(x, batch_sizes, h0, c0, w_ih, w_hh, b_ih,
                                                           b_hh, reverse, training)
        if training:
            ctx.save_for_backward(x, h0, c0, w_ih, w_hh, y, workspace)
            ctx.reverse, ctx.batch_sizes = reverse, batch_sizes
            ctx.has_bias = (b_ih is not None, b_hh is not None)
        return y, hn, cn

    @staticmethod
    def backward(ctx, dy, dhn, dcn):
        x, h0, c0, w_ih, w_hh, y, workspace = ctx.saved_tensors
        if ctx.batch_sizes is None:
            dx, dh0, dc0, dw_ih, dw_hh, db = ops.lstm_backward(
                dy.contiguous(), dhn.contiguous(), dcn.contiguous(), x, h0, c0, w_ih, w_hh, y,
                workspace, ctx.reverse)
        else:
            dx, dh0, dc0, dw_ih, dw_hh, db = ops.lstm_packed_backward(
                dy.contiguous(), dhn.contiguous(), dcn.contiguous(), x, ctx.batch_sizes, h0, c0,
                w_ih, w_hh, y, workspace, ctx.reverse)
        return (dx, dh0, dc0, dw_ih, dw_hh) + _bias_grads(ctx.has_bias, db, db.clone()) + (None,) * 2


class GRUFunction(torch.autograd.Function):
    """One GRU layer and direction: (x, h0, w_ih, w_hh, b_ih, b_hh) -> (y, hn)."""

    @staticmethod
    def forward(ctx, x, h0, w_ih, w_hh, b_ih, b_hh, reverse, batch_sizes=None):
        training = any(ctx.needs_input_grad[:6])
        if batch_sizes is None:
            y, hn, workspace = ops.gru_forward(x, h0, w_ih, w_hh, b_ih, b_hh, reverse, training)
        else:
            y, hn, workspace = ops.gru_packed_forward(x, batch_sizes, h0, w_ih, w_hh, b_ih, b_hh,
                                                      reverse, training)
        if training:
            ctx.save_for_backward(x, h0, w_ih, w_hh, y, workspace)
            ctx.reverse, ctx.batch_sizes = reverse, batch_sizes
            ctx.has_bias = (b_ih is not None, b_hh is not None)
        return y, hn

    @staticmethod
    def backward(ctx, dy, dhn):
        x, h0, w_ih, w_hh, y, workspace = ctx.saved_tensors
        if ctx.batch_sizes is None:
            dx, dh0, dw_ih, dw_hh, db_ih, db_hh = ops.gru_backward(
                dy.contiguous(), dhn.contiguous(), x, h0, w_ih, w_hh, y, workspace, ctx.reverse)
        else:
            dx, dh0, dw_ih, dw_hh, db_ih, db_hh = ops.gru_packed_backward(
                dy.contiguous(), dhn.contiguous(), x, ctx.batch_sizes, h0, w_ih, w_hh, y,
                workspace, ctx.reverse)
        return (dx, dh0, dw_ih, dw_hh) + _bias_grads(ctx.has_bias, db_ih, db_hh) + (None,) * 2


# ---- which build of the CPU step kernels runs (csrc/cpu/kernels.cpp) ----

def get_cpu_isa():
    """The build of the CPU step kernels that runs: 'avx512bf16' (the AVX-512 build, whose
    bfloat16 layers also run their GEMMs in bfloat16 with float32 sums: the forward's, with
    h rounded to bfloat16 for each step's, and the backward's, each step's dh and the
    whole-sequence dx and weight gradients, with the gate gradients rounded to bfloat16),
    'avx512' (16-wide; AVX-512 F, VL, BW and DQ; bfloat16 layers computed in float32),
    'avx2' (8-wide, AVX2 and FMA) or 'baseline'.
    The default is the best the CPU has; the environment variable RNNFAST_CPU_ISA sets the
    initial value."""
    return _C._cpu_isa()


def set_cpu_isa(isa):
    """Sets the build of the CPU step kernels for every later call ('avx512bf16', 'avx512',
    'avx2' or 'baseline', one the CPU can run) and returns the previous setting; for tests and
    benchmarks. A call that has started keeps the build it started with."""
    return _C._set_cpu_isa(isa)


@contextlib.contextmanager
def cpu_isa(isa):
    """``with rnnfast._ops.cpu_isa("avx2"): ...`` runs the block with that build."""
    previous = set_cpu_isa(isa)
    try:
        yield
    finally:
        set_cpu_isa(previous)


# ---- which CUDA design runs (csrc/cuda/persistent.cuh); the CPU ignores the setting ----

def get_cuda_path():
    """The CUDA path setting: 'auto' (the default: per call, the cheapest by a cost model,
    fitted on an H100, of the designs that fit: the persistent kernels where the weights fit
    on chip, else the per-step GEMMs), 'persistent' (the persistent kernels' grid variant:
    the whole device, one grid-wide barrier a step), 'cluster' (their cluster variant:
    thread-block clusters of up to 16 SMs, each holding all of W_hh and a share of the
    batch, compute capability 9.0 on) or 'step' (one GEMM and one pointwise kernel a step).
    The environment variable RNNFAST_CUDA_PATH sets the initial value."""
    return _C._cuda_path()


def set_cuda_path(path):
    """Sets the CUDA path ('auto', 'persistent', 'cluster' or 'step') for every later call,
    in every thread, and returns the previous setting. Forcing 'persistent' or 'cluster'
    where it cannot run (the weights do not fit on chip) makes those calls raise rather
    than fall back."""
    return _C._set_cuda_path(path)


@contextlib.contextmanager
def cuda_path(path):
    """``with rnnfast.cuda_path("step"): ...`` runs the block with that path, then restores
    the previous setting."""
    previous = set_cuda_path(path)
    try:
        yield
    finally:
        set_cuda_path(previous)


def last_cuda_path():
    """(forward, backward): the path the last CUDA forward and backward op took,
    'persistent', 'cluster' or 'step', or None where none has run yet."""
    return _C._last_cuda_path()


def _last_step_variant():
    """(forward, backward): how the last CUDA forward and backward op ran their steps on the
    per-step path: 'plain' (a cuBLAS GEMM and a pointwise kernel a step), 'fused'
    (RNNFAST_STEP_FUSED=1) or 'graph' (RNNFAST_STEP_GRAPH=1); None where the op took
    another path, or none has run."""
    return _C._last_step_variant()


def _last_cuda_plan():
    """(forward, backward): what the persistent kernels' planner decided for the last CUDA
    forward and backward op that planned one (a forced variant, or auto), or None: a dict
    of the cost model's microseconds per step of the plan that runs (`us`, -1 for the
    per-step path) and of each candidate it costed (`grid_us`, `cluster_us`, `step_us`; -1
    where not costed or unable to run), and the launch's shape (`blocks`, `units`,
    `cluster` size, tile `nt` x `rpw`, `xs_tiles`, `group_rows`). For
    scripts/calibrate_persistent.py, which records it beside each measured time (the model
    against the GPU)."""
    return _C._last_cuda_plan()


# ---- a trace of the persistent kernels' steps (csrc/cuda/persistent.cuh, StepTrace) ----

TRACE_MARKS = {
    False: ("start", "h_prev in place", "dot done", "pointwise done", "arrived",
            "wait starts", "wait over"),
    True: ("start", "phase A done", "arrived", "wait starts", "wait over",
           "phase B input in place", "phase B done"),
}


def _trace_next(steps, backward=False):
    """Asks for a trace of the first `steps` steps of the next persistent launch (the grid
    or cluster variant) in that direction (the forward, or the backward); 0 withdraws the
    request. The launch that takes it records, in thread 0 of each block, the SM clock at
    the marks of TRACE_MARKS each step (at most 2**24 slots in all: fewer steps where the
    launch has that many blocks); _last_trace() returns it. For
    scripts/trace_persistent.py: where a step's time goes, measured inside the kernel."""
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise TypeError(f"_trace_next: expected steps as an int, but got {type(steps).__name__}")
    ops._trace_next(steps, bool(backward))


def _last_trace(backward=False):
    """The last trace taken in that direction (see _trace_next), or None before any: a dict
    with `blocks`, `steps`, `marks` (an int64 CPU tensor [blocks, steps, 7] of SM clock
    cycles, steps in the kernel's order: the backward's first is the sequence's last),
    `arrival_ns` ([blocks, steps]: the global timer at each block's arrival, comparable
    across blocks, unlike the clocks; the last forward step's end), `sm` ([blocks, steps]:
    the SM a block ran a step on; a block preempted and resumed on another SM changes it,
    and its clocks are then another SM's), `mark_names` and
    `ns_per_cycle` (block 0's global-timer nanoseconds over its clock cycles from its
    first step to its end: the launch's own clock)."""
    trace, blocks, steps = ops._last_trace(bool(backward))
    if blocks == 0:
        return None
    t = trace.cpu()
    ns0, c0, ns1, c1 = t[:4].tolist()
    clocks = len(TRACE_MARKS[bool(backward)])
    slots = t[4:].view(blocks, steps, clocks + 2)
    return {"blocks": blocks, "steps": steps, "marks": slots[:, :, :clocks],
            "arrival_ns": slots[:, :, clocks], "sm": slots[:, :, clocks + 1],
            "mark_names": TRACE_MARKS[bool(backward)],
            "ns_per_cycle": (ns1 - ns0) / (c1 - c0) if c1 > c0 else float("nan")}
