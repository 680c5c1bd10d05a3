"""The CUDA kernels: every comparison of the CPU tests, on a GPU.

rnnfast (on CUDA) against torch.nn (on CUDA, so cuDNN) and against the float64 reference
loops (rnnfast.reference, run on the CPU exactly as helpers.run_three runs it): every
output, final state and gradient (input, h0/c0, every parameter by name), with the
tolerance rule of helpers.assert_close_to_ref (at most twice torch.nn's own error in the
same dtype, plus 8 ulps of the dtype at the tensor's scale). In float32 and float64 over
cells x layers x directions x layouts x bias x given/absent states, edge shapes, a long
sequence, unbatched input; in float16 and bfloat16 the same rule, torch.nn's error in that
dtype being the yardstick. Then: bitwise determinism, non-contiguous inputs, opcheck and
gradcheck of the ops on CUDA tensors, the dtypes the ops return, dropout between layers,
clear errors for inputs and modules on different devices, and SimpleRNN.

Every test runs three times, with the per-step path, the persistent kernels' grid variant
and their cluster variant forced (the `path` fixture), plus the persistent kernels' tilings
and path reporting (the cluster variant's sizes and batch shares: test_cuda_cluster.py).

torch.nn on CUDA runs cuDNN, which uses TF32 for float32 unless told not to: every test
here runs with TF32 off (cuBLAS and cuDNN), so that torch.nn's float32 error is a fair
float32 baseline.
"""
import contextlib
import copy
import itertools

import pytest
import torch
import torch.nn.functional as F

import rnnfast
from helpers import (CELLS, FORWARD_CASE_IDS, FORWARD_CASES, OP_GATES, assert_close_to_ref,
                     compare_all, make_pair, run_and_grad)
from rnnfast import reference
from rnnfast._ops import ACTIVATIONS, GRUFunction, LSTMFunction, RNNFunction, ops

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda")
T, N, C, H = 5, 3, 4, 6
HALF = [torch.float16, torch.bfloat16]


def _dt(dtype):
    return str(dtype).replace("torch.", "")


PATHS = ["step", "persistent", "cluster"]


@pytest.fixture(autouse=True, params=PATHS)
def path(request, monkeypatch):
    """Every test runs on each CUDA design, forced (a forced persistent variant that cannot
    run raises, so nothing here falls back unseen); the setting comes back afterwards.
    The cluster variant runs with clusters of 8 blocks (fewer where H < 8), so that every
    test passes values between blocks (its cost model may prefer one block at these
    sizes); test_tilings leaves the choice to the planner."""
    if request.param == "cluster":
        monkeypatch.setenv("RNNFAST_CLUSTER_SIZE", "8")
    with rnnfast.cuda_path(request.param):
        yield request.param


@contextlib.contextmanager
def no_tf32(path=None):
    """float32 is float32 on the GPU too, for torch.nn (cuDNN) and every matmul, and with
    `path` that CUDA path forced; the previous settings come back afterwards."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        if path is None:
            yield
        else:
            with rnnfast.cuda_path(path):
                yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(autouse=True)
def _no_tf32():
    with no_tf32():
        yield


# ---- shared set-up ----

def _map(fn, state):
    """fn on a state: None, one tensor, or a tuple of tensors (LSTM)."""
    if state is None:
        return None
    return tuple(fn(s) for s in state) if isinstance(state, tuple) else fn(state)


def _cuda(t):
    return t.to(CUDA)


def _on_cpu(results):
    return {name: t.cpu() for name, t in results.items()}


def _cuda_pair(cell, input_size, hidden_size, dtype=torch.float32, nonnegative=False, **kwargs):
    """helpers.make_pair with torch.nn's and rnnfast's modules on the GPU; the float64
    copy for the reference stays on the CPU. nonnegative: every parameter made >= 0 and
    W_hh scaled by 1/sqrt(H) (its rows then sum to about 1/2: no blow-up), for relu runs
    that stay off relu's kink (see test_half_matches_torch_and_reference)."""
    m, f, m64 = make_pair(cell, input_size, hidden_size, dtype, **kwargs)
    if nonnegative:
        with torch.no_grad():
            for name, p in m.named_parameters():
                p.abs_()
                if name.startswith("weight_hh"):
                    p.mul_(hidden_size ** -0.5)
        f.load_state_dict(m.state_dict())
        m64 = copy.deepcopy(m).double()
    return m.to(CUDA), f.to(CUDA), m64


def _inputs(cell, num_layers, bidirectional, batch_first, with_h0, dtype, T=T, N=N, C=C, H=H,
            seed=1):
    """Input, initial state (or None) and upstream gradients, on the CPU, in `dtype`: drawn
    in float32 and cast, so that float16/bfloat16 inputs are exact in the float64
    reference too."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(dtype)
    D = 2 if bidirectional else 1
    x = r(N, T, C) if batch_first else r(T, N, C)
    hx = None
    if with_h0:
        h0 = r(num_layers * D, N, H)
        hx = (h0, r(num_layers * D, N, H)) if cell == "lstm" else h0
    upstream = [r(N, T, D * H) if batch_first else r(T, N, D * H), r(num_layers * D, N, H)]
    if cell == "lstm":
        upstream.append(r(num_layers * D, N, H))
    return x, hx, upstream


def run_cuda(cell, x, hx, m, f, m64, upstream, x_view=None, state_view=None):
    """helpers.run_three with rnnfast (f) and torch.nn (m) on the GPU and the float64
    reference (m64) on the CPU; x, hx and upstream are CPU tensors in the modules' dtype.
    Every result comes back on the CPU. x_view / state_view, when given, map the leaf x /
    each leaf initial state to what all three modules get (e.g. a non-contiguous view);
    the gradients are those of the leaves."""
    is_lstm = cell == "lstm"

    def forward(run):
        def call(module, x_, hx_):
            if x_view is not None:
                x_ = x_view(x_)
            if state_view is not None:
                hx_ = _map(state_view, hx_)
            return run(module, x_, hx_)
        return call

    def module_forward(module, x_, hx_):
        return module(x_, hx_)

    def torch_forward(module, x_, hx_):
        # torch.nn is only the yardstick here, and cuDNN wants contiguous states and
        # refuses backward in eval mode: give it both (these tests have no dropout, so
        # training mode computes the same)
        was_training = module.training
        module.train()
        try:
            return module(x_, _map(lambda s: s.contiguous(), hx_))
        finally:
            module.train(was_training)

    ours = run_and_grad(f, _cuda(x), _map(_cuda, hx), is_lstm, [_cuda(u) for u in upstream],
                        forward(module_forward))
    theirs = run_and_grad(m, _cuda(x), _map(_cuda, hx), is_lstm, [_cuda(u) for u in upstream],
                          forward(torch_forward))
    ref = run_and_grad(m64, x.double(), _map(lambda s: s.double(), hx), is_lstm,
                       [u.double() for u in upstream], forward(reference.forward))
    return _on_cpu(ours), _on_cpu(theirs), ref


def check_half_one_layer(cell, dtype, T, N, H):
    """One unidirectional layer in float16/bfloat16 with h0 given: outputs, final states
    and every gradient against torch.nn and the reference (relu with nonnegative values,
    off its kink: see test_half_matches_torch_and_reference)."""
    relu = cell == "rnn_relu"
    m, f, m64 = _cuda_pair(cell, 8, H, dtype=dtype, nonnegative=relu)
    x, hx, upstream = _inputs(cell, 1, False, False, True, dtype, T=T, N=N, C=8, H=H)
    if relu:
        x, hx = x.abs(), hx.abs()
    compare_all(*run_cuda(cell, x, hx, m, f, m64, upstream))


def _layout_id(L, bi, bf):
    return f"L{L}-{'bi' if bi else 'uni'}-{'bf' if bf else 'tm'}"


# ---- 1. float32 (and float64): everything test_parity checks on the CPU ----

GRID = list(itertools.product(CELLS, [1, 2], [False, True], [False, True]))


@pytest.mark.parametrize("cell,L,bi,bf", GRID, ids=[f"{c}-{_layout_id(L, bi, bf)}"
                                                    for c, L, bi, bf in GRID])
def test_float32_matches_torch_and_reference(cell, L, bi, bf):
    m, f, m64 = _cuda_pair(cell, C, H, num_layers=L, bidirectional=bi, batch_first=bf)
    x, hx, upstream = _inputs(cell, L, bi, bf, True, torch.float32)
    compare_all(*run_cuda(cell, x, hx, m, f, m64, upstream))


VARIANTS = {"nobias-h0": (False, True), "bias-noh0": (True, False), "nobias-noh0": (False, False)}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("cell", list(CELLS))
def test_float32_bias_and_initial_state(cell, variant):
    bias, with_h0 = VARIANTS[variant]
    for L, bi, bf in [(2, True, False), (1, False, True)]:
        m, f, m64 = _cuda_pair(cell, C, H, num_layers=L, bidirectional=bi, batch_first=bf,
                               bias=bias)
        x, hx, upstream = _inputs(cell, L, bi, bf, with_h0, torch.float32)
        compare_all(*run_cuda(cell, x, hx, m, f, m64, upstream))


@pytest.mark.parametrize("cell", list(CELLS))
def test_float64_matches_torch_and_reference(cell):
    for L, bi, bf, bias, with_h0 in [(2, True, False, True, True), (1, False, True, False, False)]:
        m, f, m64 = _cuda_pair(cell, C, H, torch.float64, num_layers=L, bidirectional=bi,
                               batch_first=bf, bias=bias)
        x, hx, upstream = _inputs(cell, L, bi, bf, with_h0, torch.float64)
        compare_all(*run_cuda(cell, x, hx, m, f, m64, upstream))


EDGE = [  # (T, N, C, H)
    (1, 3, 4, 6),     # one step
    (6, 1, 4, 6),     # batch of one
    (4, 3, 5, 37),    # odd hidden size
    (3, 2, 1, 1),     # one feature, one hidden unit
]


@pytest.mark.parametrize("shape", EDGE, ids=[f"T{t}-N{n}-C{c}-H{h}" for t, n, c, h in EDGE])
@pytest.mark.parametrize("cell", list(CELLS))
def test_edge_shapes(cell, shape):
    T_, N_, C_, H_ = shape
    m, f, m64 = _cuda_pair(cell, C_, H_, num_layers=2, bidirectional=True)
    x, hx, upstream = _inputs(cell, 2, True, False, True, torch.float32, T=T_, N=N_, C=C_, H=H_)
    compare_all(*run_cuda(cell, x, hx, m, f, m64, upstream))


@pytest.mark.parametrize("cell", list(CELLS))
def test_larger_shapes(cell):
    """Sizes where the GEMMs tile and the pointwise kernels need more than one block."""
    T_, N_, C_, H_ = 16, 64, 32, 128
    m, f, m64 = _cuda_pair(cell, C_, H_, num_layers=2, bidirectional=True)
    x, hx, upstream = _inputs(cell, 2, True, False, True, torch.float32, T=T_, N=N_, C=C_, H=H_)
    compare_all(*run_cuda(cell, x, hx, m, f, m64, upstream))


# The persistent kernels' tilings (persistent.cuh): U = ceil(H / SMs) units per block, the
# last block owning fewer; tiles of 4 or 16 batch rows, the last one partial; 4 or 8 rows
# of W a warp in float32 (on 132 SMs: 8 at N=33, H=1024 everywhere and at N=17, H=133 in
# the LSTM and GRU forwards; 4 in the rest of those and at N=40, H=64).
TILINGS = [(3, 1, 1), (3, 4, 7), (3, 5, 33), (2, 17, 133), (2, 3, 401), (2, 40, 64),
           (2, 33, 1024)]


@pytest.mark.parametrize("shape", TILINGS, ids=[f"T{t}-N{n}-H{h}" for t, n, h in TILINGS])
@pytest.mark.parametrize("cell", list(CELLS))
def test_tilings(cell, shape, path, monkeypatch):
    """(The cluster variant holds all of W_hh in one cluster's shared memory, which H=1024
    in float32 outgrows: on that path the last shape runs with H=256, N=33, and the float32
    LSTM's backward at H=401 (252 KiB a block on the H100) with H=333, also odd; its
    refusals are tested in test_cuda_cluster.py. Its cluster size is the planner's choice.)"""
    monkeypatch.delenv("RNNFAST_CLUSTER_SIZE", raising=False)
    T_, N_, H_ = shape
    if path == "cluster" and H_ == 1024:
        H_ = 256
    if path == "cluster" and H_ == 401 and cell == "lstm":
        H_ = 333
    m, f, m64 = _cuda_pair(cell, 8, H_, bidirectional=True)
    x, hx, upstream = _inputs(cell, 1, True, False, True, torch.float32, T=T_, N=N_, C=8, H=H_)
    compare_all(*run_cuda(cell, x, hx, m, f, m64, upstream))
    assert rnnfast.last_cuda_path() == (path, path)


@pytest.mark.parametrize("cell", list(CELLS))
def test_inference_equals_training_forward(cell, path):
    """Inference saves nothing (and the persistent LSTM keeps c in place): bitwise the
    outputs and final states of a training forward, on each path."""
    _, f, _ = _cuda_pair(cell, 8, 48)
    x = torch.randn(7, 5, 8, device=CUDA)
    got = []
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            out, state = f(x)
        states = state if isinstance(state, tuple) else (state,)
        got.append([out.detach(), *[s.detach() for s in states]])
        assert rnnfast.last_cuda_path()[0] == path
    assert all(torch.equal(a, b) for a, b in zip(*got))


_REFUSAL_CHILD = r"""
import sys
import torch
import rnnfast

cuda = torch.device("cuda")
for name, H in (("LSTM", 4096), ("GRU", 4096), ("RNN", 8192)):
    f = getattr(rnnfast, name)(4, H).to(cuda)
    x = torch.randn(2, 1, 4, device=cuda)
    for path in ("persistent", "cluster"):
        with rnnfast.cuda_path(path):
            try:
                f(x)
            except RuntimeError as e:
                msg = str(e)
            else:
                sys.exit(f"{name}: forcing the {path} path at H={H} raised nothing")
        if not (f"the {path} CUDA path was forced" in msg and f"cannot run for H={H}" in msg):
            sys.exit(f"{name}: unexpected message: {msg}")
        print(f"{name} H={H} {path}: {msg.splitlines()[0]}")
    with rnnfast.cuda_path("auto"), torch.no_grad():
        f(x)
    if rnnfast.last_cuda_path()[0] != "step":
        sys.exit(f"{name}: auto ran {rnnfast.last_cuda_path()} at H={H}")
"""


def test_forcing_the_persistent_path_where_it_cannot_run_is_a_clear_error():
    """W_hh of an LSTM or GRU with H = 4096 or an RNN with H = 8192 in float32 (200-256 MiB)
    cannot stay on chip: forced, either persistent variant raises an error saying so; on
    auto the per-step path runs. In a child process: on the H100 this once crashed the
    process (a segfault, not an exception), which must fail this test, not end the run."""
    import subprocess
    import sys
    child = subprocess.run([sys.executable, "-c", _REFUSAL_CHILD], capture_output=True,
                           text=True, timeout=300)
    assert child.returncode == 0, (
        f"exit status {child.returncode}\n--- stdout\n{child.stdout}\n--- stderr\n"
        f"{child.stderr[-4000:]}")
    assert child.stdout.count("cannot run for H=") == 6, child.stdout


_BAD_KNOB_CHILD = r"""
import sys
import torch
import rnnfast

f = getattr(rnnfast, sys.argv[1])(4, 8).cuda().half()
for path in ("persistent", "auto", "step"):
    with rnnfast.cuda_path(path):
        try:
            f(torch.randn(2, 1, 4, device="cuda").half())
        except RuntimeError as e:
            print(path, str(e).splitlines()[0])
        else:
            print(path, "raised nothing")
"""


def bad_knob_messages(knob, value, module="GRU"):
    """{path: the first line of the error a float16 `module` forward raised on that path
    (persistent, auto, step) with the environment knob set to value, or "raised nothing"}.
    In a child process, as the refusal test above."""
    import os
    import subprocess
    import sys
    env = dict(os.environ, **{knob: value})
    child = subprocess.run([sys.executable, "-c", _BAD_KNOB_CHILD, module], capture_output=True,
                           text=True, timeout=300, env=env)
    assert child.returncode == 0, child.stderr[-4000:]
    return dict(line.split(" ", 1) for line in child.stdout.splitlines())


@pytest.mark.parametrize("cell", list(CELLS))
def test_long_sequence(cell):
    T_, N_, C_, H_ = 600, 2, 8, 16
    m, f, m64 = _cuda_pair(cell, C_, H_, bidirectional=True)
    x, hx, upstream = _inputs(cell, 1, True, False, True, torch.float32, T=T_, N=N_, C=C_, H=H_)
    compare_all(*run_cuda(cell, x, hx, m, f, m64, upstream))


@pytest.mark.parametrize("cell", list(CELLS))
def test_unbatched_input(cell):
    m, f, m64 = _cuda_pair(cell, C, H, num_layers=2, bidirectional=True)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(T, C, generator=g)
    h0 = torch.randn(4, H, generator=g)
    hx = (h0, torch.randn(4, H, generator=g)) if cell == "lstm" else h0
    upstream = [torch.randn(T, 2 * H, generator=g), torch.randn(4, H, generator=g),
                torch.randn(4, H, generator=g)][: 3 if cell == "lstm" else 2]
    compare_all(*run_cuda(cell, x, hx, m, f, m64, upstream))
    # and without an initial state
    compare_all(*run_cuda(cell, x, None, m, f, m64, upstream))


@pytest.mark.parametrize("cell", list(CELLS))
def test_saturating_inputs(cell):
    """Pre-activations far into the flat tails of sigmoid and tanh."""
    m, f, m64 = _cuda_pair(cell, C, H)
    x, hx, upstream = _inputs(cell, 1, False, False, True, torch.float32)
    compare_all(*run_cuda(cell, x * 60, hx, m, f, m64, upstream))


@pytest.mark.parametrize("cell", list(CELLS))
def test_backward_in_eval_mode(cell):
    m, f, m64 = _cuda_pair(cell, 4, 6, num_layers=2)
    m.eval(), f.eval()
    x, hx, upstream = _inputs(cell, 2, False, False, True, torch.float32, C=4, H=6)
    compare_all(*run_cuda(cell, x, hx, m, f, m64, upstream))


@pytest.mark.parametrize("cell", list(CELLS))
def test_no_grad_builds_no_graph(cell):
    _, f, _ = _cuda_pair(cell, C, H)
    x = torch.randn(T, N, C, device=CUDA)
    with torch.no_grad():
        y, _ = f(x)
    assert y.grad_fn is None and y.device.type == "cuda"
    y, _ = f(x)
    assert y.grad_fn is not None


# ---- 2. float16 and bfloat16, against float64 with torch.nn's error as the yardstick ----

HALF_LAYOUTS = {  # name: (T, N, C, H, num_layers, bidirectional, batch_first, bias, with_h0)
    "L2-bi-tm-h0-H16": (8, 4, 8, 16, 2, True, False, True, True),
    "L1-uni-bf-nobias-noh0-H37": (6, 3, 5, 37, 1, False, True, False, False),
    # weight gradients summed over T * N = 1024 (step, batch) pairs, 128 steps of
    # recurrence each way
    "long-T128-N8-H64-bi": (128, 8, 32, 64, 1, True, False, True, True),
}


def _run_half(cell, dtype, layout, nonnegative=False):
    T_, N_, C_, H_, L, bi, bf, bias, with_h0 = HALF_LAYOUTS[layout]
    m, f, m64 = _cuda_pair(cell, C_, H_, dtype, nonnegative, num_layers=L, bidirectional=bi,
                           batch_first=bf, bias=bias)
    x, hx, upstream = _inputs(cell, L, bi, bf, with_h0, dtype, T=T_, N=N_, C=C_, H=H_)
    if nonnegative:
        x, hx = x.abs(), _map(torch.abs, hx)
    return run_cuda(cell, x, hx, m, f, m64, upstream)


@pytest.mark.parametrize("layout", list(HALF_LAYOUTS))
@pytest.mark.parametrize("dtype", HALF, ids=_dt)
@pytest.mark.parametrize("cell", list(CELLS))
def test_half_matches_torch_and_reference(cell, dtype, layout):
    """Outputs, final states and every gradient.

    relu runs with nonnegative parameters, inputs and h0, so that every pre-activation is
    > 0: in float16/bfloat16 some pre-activations of random data lie within rounding
    error of 0, and where rounding flips one's sign relu's derivative flips between 0 and
    1. That changes gradients by O(1) at places that differ between rnnfast, torch.nn and
    the reference, which no error bound tied to torch.nn's can follow. relu with both
    signs is checked in float16/bfloat16 on the forward results (continuous at the kink)
    by test_half_relu_forward_both_signs, and on gradients in float32/float64 above."""
    ours, theirs, ref = _run_half(cell, dtype, layout, nonnegative=cell == "rnn_relu")
    for name, t in ours.items():  # outputs, states and gradients all in the modules' dtype
        assert t.dtype == dtype, f"{name}: {t.dtype}"
    compare_all(ours, theirs, ref)


@pytest.mark.parametrize("layout", list(HALF_LAYOUTS))
@pytest.mark.parametrize("dtype", HALF, ids=_dt)
def test_half_relu_forward_both_signs(dtype, layout):
    ours, theirs, ref = _run_half("rnn_relu", dtype, layout)
    for name in ("output", "h_n"):
        assert_close_to_ref(name, ours[name], theirs[name], ref[name])


# ---- 3. bitwise determinism ----

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_dt)
@pytest.mark.parametrize("cell", list(CELLS))
def test_deterministic_bitwise(cell, dtype):
    _, f, _ = _cuda_pair(cell, 16, 64, dtype, num_layers=2, bidirectional=True)
    x, hx, upstream = _inputs(cell, 2, True, False, True, dtype, T=32, N=8, C=16, H=64)
    runs = []
    for _ in range(2):
        runs.append(run_and_grad(f, _cuda(x), _map(_cuda, hx), cell == "lstm",
                                 [_cuda(u) for u in upstream]))
    assert set(runs[0]) == set(runs[1])
    for name in runs[0]:
        assert torch.equal(runs[0][name], runs[1][name]), f"{name} differs between two runs"


# ---- 4. non-contiguous inputs and batch_first ----

NONCONTIG = {
    # name: (batch_first, leaf x shape, x view, leaf state shape, state view), with
    # L * D = 2 (one bidirectional layer)
    "x-sliced-features": (False, (T, N, 2 * C), lambda x: x[:, :, ::2], (2, N, H), None),
    "x-transposed": (False, (N, T, C), lambda x: x.transpose(0, 1), (2, N, H), None),
    "bf-x-time-major-storage": (True, (T, N, C), lambda x: x.transpose(0, 1), (2, N, H), None),
    "bf-x-sliced-steps": (True, (N, 2 * T, C), lambda x: x[:, ::2], (2, N, H), None),
    "h0-transposed": (False, (T, N, C), None, (N, 2, H), lambda h: h.transpose(0, 1)),
}


@pytest.mark.parametrize("case", list(NONCONTIG))
@pytest.mark.parametrize("cell", list(CELLS))
def test_noncontiguous_inputs(cell, case):
    bf, x_shape, x_view, s_shape, s_view = NONCONTIG[case]
    m, f, m64 = _cuda_pair(cell, C, H, bidirectional=True, batch_first=bf)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(*x_shape, generator=g)
    h0 = torch.randn(*s_shape, generator=g)
    hx = (h0, torch.randn(*s_shape, generator=g)) if cell == "lstm" else h0
    upstream = [torch.randn(*((N, T, 2 * H) if bf else (T, N, 2 * H)), generator=g)]
    upstream += [torch.randn(2, N, H, generator=g) for _ in range(2 if cell == "lstm" else 1)]
    seen = x_view(x) if x_view else x
    assert seen.shape == ((N, T, C) if bf else (T, N, C))
    assert not (seen.is_contiguous() and (s_view is None or s_view(h0).is_contiguous()))
    ours, theirs, ref = run_cuda(cell, x, hx, m, f, m64, upstream, x_view, s_view)
    compare_all(ours, theirs, ref)
    if x_view is not None:
        # the kernels get the same numbers as from a contiguous copy of x (each in a fresh
        # allocation either way): the same bits come out
        same = run_and_grad(f, _cuda(x), _map(_cuda, hx), cell == "lstm",
                            [_cuda(u) for u in upstream],
                            lambda module, x_, hx_: module(x_view(x_).contiguous(), hx_))
        for name, t in _on_cpu(same).items():
            assert torch.equal(t, ours[name]), f"{name}: the non-contiguous x changed the result"


# ---- 5. the ops on CUDA tensors: opcheck, gradcheck, dtypes (mirrors test_ops.py) ----

G = OP_GATES
OT, ON, OC, OH = 3, 2, 4, 5


def _layer_args(cell, dtype=torch.float32, bias=True, seed=0, requires_grad=False):
    """test_ops._layer_args on the GPU: x, h0, [c0,] w_ih, w_hh, b_ih, b_hh."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        t = (torch.randn(*shape, generator=g, dtype=torch.float64) * 0.5).to(CUDA, dtype)
        return t.requires_grad_(requires_grad)
    x, h0 = r(OT, ON, OC), r(ON, OH)
    w_ih, w_hh = r(G[cell] * OH, OC), r(G[cell] * OH, OH)
    b_ih, b_hh = (r(G[cell] * OH), r(G[cell] * OH)) if bias else (None, None)
    if cell == "lstm":
        return x, h0, r(ON, OH), w_ih, w_hh, b_ih, b_hh
    return x, h0, w_ih, w_hh, b_ih, b_hh


def _upstream(dtype, seed=5):
    g = torch.Generator().manual_seed(seed)
    shapes = ((OT, ON, OH), (ON, OH), (ON, OH))  # dy, dhn, dcn
    return [torch.randn(*s, generator=g).to(CUDA, dtype) for s in shapes]


@pytest.mark.parametrize("cell,reverse,training,bias", FORWARD_CASES, ids=FORWARD_CASE_IDS)
def test_opcheck_forward(cell, reverse, training, bias):
    args = _layer_args(cell, torch.float32, bias)
    if cell == "rnn":
        torch.library.opcheck(ops.rnn_forward, (*args, 0, reverse, training))
    elif cell == "lstm":
        torch.library.opcheck(ops.lstm_forward, (*args, reverse, training))
    else:
        torch.library.opcheck(ops.gru_forward, (*args, reverse, training))


def _backward_args(cell, dtype, reverse):
    args = _layer_args(cell, dtype)
    dy, dh, dc = _upstream(dtype)
    if cell == "rnn":
        x, h0, w_ih, w_hh, b_ih, b_hh = args
        y, _ = ops.rnn_forward(*args, 1, reverse, True)
        return ops.rnn_backward, (dy, dh, x, h0, w_ih, w_hh, y, 1, reverse)
    if cell == "lstm":
        x, h0, c0, w_ih, w_hh, b_ih, b_hh = args
        y, _, _, ws = ops.lstm_forward(*args, reverse, True)
        return ops.lstm_backward, (dy, dh, dc, x, h0, c0, w_ih, w_hh, y, ws, reverse)
    x, h0, w_ih, w_hh, b_ih, b_hh = args
    y, _, ws = ops.gru_forward(*args, reverse, True)
    return ops.gru_backward, (dy, dh, x, h0, w_ih, w_hh, y, ws, reverse)


@pytest.mark.parametrize("cell", list(G))
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_opcheck_backward(cell, reverse):
    op, args = _backward_args(cell, torch.float32, reverse)
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("dtype", HALF, ids=_dt)
@pytest.mark.parametrize("cell", list(G))
def test_opcheck_half(cell, dtype):
    """The fake implementations agree with the kernels on the float32 workspace of
    float16/bfloat16 inputs, forward (training) and backward."""
    args = _layer_args(cell, dtype)
    if cell == "rnn":
        torch.library.opcheck(ops.rnn_forward, (*args, 0, False, True))
    elif cell == "lstm":
        torch.library.opcheck(ops.lstm_forward, (*args, False, True))
    else:
        torch.library.opcheck(ops.gru_forward, (*args, False, True))
    torch.library.opcheck(*_backward_args(cell, dtype, False))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64] + HALF, ids=_dt)
@pytest.mark.parametrize("cell", list(G))
def test_op_dtypes(cell, dtype):
    """Outputs and gradients in the input's dtype on the input's device; the workspace in
    float32 for float16/bfloat16, else in the input's dtype; inference saves nothing and
    computes what training computes."""
    ws_dtype = torch.float32 if dtype in HALF else dtype
    args = _layer_args(cell, dtype)
    ws = None
    if cell == "rnn":
        train = ops.rnn_forward(*args, 0, False, True)
        infer = ops.rnn_forward(*args, 0, False, False)
    elif cell == "lstm":
        out = ops.lstm_forward(*args, False, True)
        train, infer, ws, ws_width = out[:3], ops.lstm_forward(*args, False, False), out[3], 5
        assert infer[3].numel() == 0
        infer = infer[:3]
    else:
        out = ops.gru_forward(*args, False, True)
        train, infer, ws, ws_width = out[:2], ops.gru_forward(*args, False, False), out[2], 4
        assert infer[2].numel() == 0
        infer = infer[:2]
    for t in list(train) + list(infer):
        assert t.dtype == dtype and t.device.type == "cuda"
    if ws is not None:
        assert ws.dtype == ws_dtype and ws.device.type == "cuda"
        assert ws.shape == (OT, ON, ws_width * OH)
    for a, b in zip(train, infer):
        torch.testing.assert_close(b, a)
    op, bargs = _backward_args(cell, dtype, False)
    grads = op(*bargs)
    # (dx, dh0, [dc0,] dw_ih, dw_hh) shaped like their inputs, then db (GRU: db_ih, db_hh)
    n_bias_grads = 2 if cell == "gru" else 1
    shapes = [tuple(a.shape) for a in args[: len(grads) - n_bias_grads]]
    shapes += [(G[cell] * OH,)] * n_bias_grads
    assert [tuple(gr.shape) for gr in grads] == shapes
    for gr in grads:
        assert gr.dtype == dtype and gr.device.type == "cuda"


GRAD_CASES = [("rnn", "tanh"), ("rnn", "relu"), ("rnn", "identity"), ("lstm", None), ("gru", None)]


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("cell,act", GRAD_CASES,
                         ids=[c + (f"-{a}" if a else "") for c, a in GRAD_CASES])
def test_gradcheck(cell, act, bias, reverse):
    args = _layer_args(cell, torch.float64, bias, requires_grad=True)
    if cell == "rnn":
        def fn(*a):
            return RNNFunction.apply(*a, ACTIVATIONS[act], reverse)
    elif cell == "lstm":
        def fn(*a):
            return LSTMFunction.apply(*a, reverse)
    else:
        def fn(*a):
            return GRUFunction.apply(*a, reverse)
    assert torch.autograd.gradcheck(fn, args)


# ---- dropout between layers ----

def _single_layer(f, cell, layer):
    """Layer `layer` of the bidirectional module f, as a one-layer rnnfast module."""
    _, fast_cls, extra = CELLS[cell]
    in_size = f.input_size if layer == 0 else 2 * f.hidden_size
    one = fast_cls(in_size, f.hidden_size, bidirectional=True, **extra).to(CUDA)
    one.load_state_dict({name.replace(f"_l{layer}", "_l0"): p
                         for name, p in f.state_dict().items() if f"_l{layer}" in name})
    return one


@pytest.mark.parametrize("cell", list(CELLS))
def test_dropout_between_layers(cell):
    """Training-mode dropout on CUDA: F.dropout on each layer's output but the last, drawn
    from the CUDA generator (so reproducible under a seed); none in eval mode. (torch.nn's
    cuDNN path draws its masks inside cuDNN, so its masks are not ours.)"""
    m, f, _ = _cuda_pair(cell, 4, 6, num_layers=3, dropout=0.5, bidirectional=True)
    x = torch.randn(5, 2, 4, generator=torch.Generator().manual_seed(6)).to(CUDA)
    f.train()
    torch.manual_seed(123)
    y, _ = f(x)
    torch.manual_seed(123)
    assert torch.equal(f(x)[0], y)
    torch.manual_seed(7)
    assert not torch.equal(f(x)[0], y)  # another seed, other masks
    layers = [_single_layer(f, cell, k) for k in range(3)]
    torch.manual_seed(123)
    h = x
    for k, layer in enumerate(layers):
        h, _ = layer(h)
        if k < 2:
            h = F.dropout(h, 0.5, training=True)
    torch.testing.assert_close(y, h)
    m.eval(), f.eval()
    torch.testing.assert_close(f(x)[0], m(x)[0])
    assert not torch.equal(f(x)[0], y)


# ---- 6. errors ----

MISMATCH = [(c, k) for c in CELLS
            for k in ("module-on-cpu", "input-on-cpu", "h0-on-cpu")
            + (("c0-on-cpu",) if c == "lstm" else ())]


@pytest.mark.parametrize("cell,case", MISMATCH, ids=[f"{c}-{k}" for c, k in MISMATCH])
def test_device_mismatch_is_a_clear_error(cell, case):
    """torch.nn raises a RuntimeError naming the devices ("Input and parameter tensors are
    not at the same device, ..."); rnnfast's op boundary raises "expected w_ih on device
    cuda:0 like the input, but got cpu" and the like."""
    _, f, _ = make_pair(cell, 4, 6)
    x = torch.randn(5, 3, 4)
    h = torch.zeros(1, 3, 6)
    hx = None
    if case == "module-on-cpu":
        x = x.to(CUDA)
    elif case == "input-on-cpu":
        f = f.to(CUDA)
    else:
        f, x = f.to(CUDA), x.to(CUDA)
        if case == "h0-on-cpu":
            hx = (h, h.to(CUDA)) if cell == "lstm" else h
        else:  # c0-on-cpu
            hx = (h.to(CUDA), h)
    with pytest.raises((RuntimeError, ValueError), match=r"(?i)device"):
        f(x, hx)
    torch.cuda.synchronize()  # nothing was left running on the GPU


def test_integer_input_is_a_clear_error():
    f = rnnfast.LSTM(4, 6).to(CUDA)
    with pytest.raises((TypeError, ValueError), match="torch.int64"):
        f(torch.ones(5, 2, 4, dtype=torch.int64, device=CUDA))


# ---- 7. SimpleRNN ----

SC, SH, SO, ST, SN = 7, 9, 5, 6, 3


def _simple_rnns(nonlinearity):
    """The same SimpleRNN on the CPU, on the GPU, and in float64 on the CPU."""
    torch.manual_seed(0)
    cpu = rnnfast.SimpleRNN(SC, SH, SO, nonlinearity=nonlinearity)
    return cpu, copy.deepcopy(cpu).to(CUDA), copy.deepcopy(cpu).double()


@pytest.mark.parametrize("nonlinearity", [None, "tanh"], ids=["linear", "tanh"])
def test_simple_rnn_step(nonlinearity):
    cpu, gpu, ref = _simple_rnns(nonlinearity)
    assert gpu.initHidden().device.type == "cuda"
    g = torch.Generator().manual_seed(2)
    xs = torch.randn(4, SN, SC, generator=g)
    h_cpu = torch.randn(SN, SH, generator=g) * 0.3
    h_gpu, h_ref = h_cpu.to(CUDA), h_cpu.double()
    for t in range(xs.shape[0]):
        o_cpu, h_cpu = cpu(xs[t], h_cpu)
        o_gpu, h_gpu = gpu(xs[t].to(CUDA), h_gpu)
        o_ref, h_ref = ref(xs[t].double(), h_ref)
        assert o_gpu.device.type == "cuda" and h_gpu.device.type == "cuda"
        assert_close_to_ref(f"log_probs[{t}]", o_gpu.cpu(), o_cpu, o_ref)
        assert_close_to_ref(f"hidden[{t}]", h_gpu.cpu(), h_cpu, h_ref)


def _simple_run(model, seq_fn, x, h, dout, dh):
    """test_simple_rnn's run: log-probs, last hidden, and every gradient."""
    x = x.detach().clone().requires_grad_()
    h = h.detach().clone().requires_grad_()
    out, h_last = seq_fn(model, x, h)
    loss = (out * dout).sum() + (h_last * dh).sum()
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(loss, [x, h, *params.values()])
    res = {"log_probs": out.detach(), "hidden": h_last.detach()}
    res.update({f"grad_{n}": gr for n, gr in zip(["x", "h0", *params], grads)})
    return {name: t.cpu() for name, t in res.items()}


def _step_loop(model, x, h):
    outs = []
    for t in range(x.shape[0]):
        o, h = model(x[t], h)
        outs.append(o)
    return torch.stack(outs), h


def _fused(model, x, h):
    return model.forward_sequence(x, h)


@pytest.mark.parametrize("nonlinearity", [None, "tanh"], ids=["linear", "tanh"])
def test_simple_rnn_sequence(nonlinearity):
    """forward_sequence on CUDA: as close to float64 as the CPU kernels get, and as the
    tutorial's step loop on CUDA."""
    cpu, gpu, ref64 = _simple_rnns(nonlinearity)
    g = torch.Generator().manual_seed(2)
    xs = torch.randn(ST, SN, SC, generator=g)
    h0 = torch.randn(SN, SH, generator=g) * 0.3
    dout = torch.randn(ST, SN, SO, generator=g)
    dh = torch.randn(SN, SH, generator=g)
    on_gpu = [t.to(CUDA) for t in (xs, h0, dout, dh)]
    fused_gpu = _simple_run(gpu, _fused, *on_gpu)
    steps_gpu = _simple_run(gpu, _step_loop, *on_gpu)
    fused_cpu = _simple_run(cpu, _fused, xs, h0, dout, dh)
    ref = _simple_run(ref64, reference.simple_rnn_sequence, xs.double(), h0.double(),
                      dout.double(), dh.double())
    assert set(fused_gpu) == set(fused_cpu) == set(steps_gpu) == set(ref)
    for name in ref:
        assert_close_to_ref(name, fused_gpu[name], fused_cpu[name], ref[name])
        assert_close_to_ref(name, fused_gpu[name], steps_gpu[name], ref[name])
    # no hidden state: zeros
    a, ha = gpu.forward_sequence(on_gpu[0])
    b, hb = gpu.forward_sequence(on_gpu[0], torch.zeros(SN, SH, device=CUDA))
    assert a.device.type == "cuda"
    assert torch.equal(a, b) and torch.equal(ha, hb)


@pytest.mark.parametrize("dtype", HALF, ids=_dt)
@pytest.mark.parametrize("cell", list(CELLS))
def test_autocast_runs_in_the_low_dtype(cell, dtype):
    """Under torch.autocast on CUDA the layers run in float16 whatever dtype autocast asks
    for, as torch.nn's cuDNN layers do (its autocast casts cuDNN RNNs to half): the same
    output dtypes, errors of the same order, float32 gradients for the float32
    parameters."""
    is_lstm = cell == "lstm"
    m, f, m64 = make_pair(cell, C, H, num_layers=2, bidirectional=True)
    m, f = m.to(CUDA), f.to(CUDA)
    x = torch.randn(T, N, C)
    with torch.autocast("cuda", dtype=dtype):
        out_m, st_m = m(x.to(CUDA))
        out_f, st_f = f(x.to(CUDA))
    ref, st_ref = reference.forward(m64, x.double())
    pairs = [(out_f, out_m, ref)] + list(zip(st_f if is_lstm else (st_f,), st_m if is_lstm else (st_m,),
                                             st_ref if is_lstm else (st_ref,)))
    for ours, theirs, r in pairs:
        assert ours.dtype == theirs.dtype == torch.float16
        err = (ours.cpu().double() - r).abs().max().item()
        err_nn = (theirs.cpu().double() - r).abs().max().item()
        assert err <= 2 * err_nn + 8 * torch.finfo(ours.dtype).eps * max(1.0, r.abs().max().item())
    with torch.autocast("cuda", dtype=dtype):
        out_f, _ = f(x.to(CUDA))
    out_f.float().sum().backward()
    for name, p in f.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("enforce_sorted", [True, False], ids=["sorted", "unsorted"])
def test_packed_sequence(cell, enforce_sorted):
    """PackedSequence on CUDA: every output, final state and gradient against cuDNN and
    the float64 reference run sequence by sequence (test_packed.py's CPU test)."""
    from test_packed import per_sequence_reference, run as run_packed
    is_lstm = cell == "lstm"
    m, f, m64 = make_pair(cell, C, H, num_layers=2, bidirectional=True)
    m, f = m.to(CUDA), f.to(CUDA)
    lengths = [5, 5, 3, 1] if enforce_sorted else [2, 5, 1, 4]
    x = torch.randn(max(lengths), len(lengths), C, dtype=torch.float64)
    hx = tuple(torch.randn(4, len(lengths), H, dtype=torch.float64) for _ in range(2 if is_lstm else 1))
    hx = hx if is_lstm else hx[0]
    upstream = [torch.randn(x.size(0), len(lengths), 2 * H, dtype=torch.float64)] + \
        [torch.randn(4, len(lengths), H, dtype=torch.float64) for _ in range(2 if is_lstm else 1)]
    for b, n in enumerate(lengths):
        upstream[0][n:, b] = 0
    to_cuda = (lambda s: tuple(t.float().to(CUDA) for t in s) if is_lstm else s.float().to(CUDA))
    ours = run_packed(f, x.float().to(CUDA), lengths, to_cuda(hx), is_lstm, upstream, enforce_sorted)
    theirs = run_packed(m, x.float().to(CUDA), lengths, to_cuda(hx), is_lstm, upstream, enforce_sorted)
    ref = run_packed(m64, x, lengths, hx, is_lstm, upstream, enforce_sorted, forward=per_sequence_reference)
    for name in ref:
        assert_close_to_ref(name, ours[name].cpu(), theirs[name].cpu(), ref[name])


@pytest.mark.parametrize("dtype", [torch.float32] + HALF, ids=_dt)
def test_projected_lstm(dtype):
    m, f, m64 = make_pair("lstm", C, H, num_layers=2, bidirectional=True, proj_size=3)
    m, f = m.to(CUDA, dtype), f.to(CUDA, dtype)
    x = torch.randn(T, N, C)
    out_m, (h_m, c_m) = m(x.to(CUDA, dtype))
    out_f, (h_f, c_f) = f(x.to(CUDA, dtype))
    ref, (h_r, c_r) = reference.forward(m64, x.double())
    for ours, theirs, r in ((out_f, out_m, ref), (h_f, h_m, h_r), (c_f, c_m, c_r)):
        assert_close_to_ref("proj", ours.cpu(), theirs.cpu(), r)


@pytest.mark.parametrize("cell", ["rnn_tanh", "lstm", "gru"])
def test_cells(cell):
    nn_cls = {"rnn_tanh": torch.nn.RNNCell, "lstm": torch.nn.LSTMCell, "gru": torch.nn.GRUCell}[cell]
    fast_cls = {"rnn_tanh": rnnfast.RNNCell, "lstm": rnnfast.LSTMCell, "gru": rnnfast.GRUCell}[cell]
    torch.manual_seed(0)
    m = nn_cls(C, H).to(CUDA)
    f = fast_cls(C, H).to(CUDA)
    f.load_state_dict(m.state_dict())
    x = torch.randn(N, C, device=CUDA)
    out_m, out_f = m(x), f(x)
    for a, b in zip(out_f if cell == "lstm" else (out_f,), out_m if cell == "lstm" else (out_m,)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_out_of_memory_raises_and_the_process_carries_on():
    """A forward+backward whose output alone is larger than the card raises torch's
    OutOfMemoryError; the allocator and the next call are fine."""
    free, total = torch.cuda.mem_get_info()
    H_big = 1024
    N_big = 8192
    T_big = max(16, int(2 * total // (N_big * H_big * 4)) + 1)  # y alone is twice the card
    lstm = rnnfast.LSTM(8, H_big).to(CUDA)
    x = torch.randn(1, 1, 8, device=CUDA).expand(T_big, N_big, 8).contiguous().requires_grad_()
    with pytest.raises(torch.OutOfMemoryError):
        lstm(x)[0].sum().backward()
    del x
    torch.cuda.empty_cache()
    small = rnnfast.GRU(C, H).to(CUDA)
    out = small(torch.randn(T, N, C, device=CUDA, requires_grad=True))[0]
    out.sum().backward()
    assert torch.isfinite(out).all()
