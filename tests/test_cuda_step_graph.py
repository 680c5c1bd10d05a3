"""The per-step path as one CUDA graph a call (csrc/cuda/step_graph.cuh, RNNFAST_STEP_GRAPH=1):
the 16-bit forward's and the bfloat16 backward's T steps (a cuBLAS GEMM and a pointwise
kernel each) captured at a shape's second call and replayed after, each call's own tensors
reaching the pointwise kernels through parameters in device memory. Off by default until
measured on a GPU.

On a GPU, with the step path forced: the first call runs the plain loop and later calls the
graph (rnnfast._ops._last_step_variant says which ran); every output, final state and
gradient of each call, on fresh values at fresh addresses each time (GPU memory held between
calls shifts them: a replay that kept an earlier call's tensors fails), against torch.nn and
the float64 reference; two layers both ways (each layer and direction its own graph);
inference equal to the training forward bit for bit, and close to the plain loop's; W_hh
changed in place between replays; another W_hh or T being another graph; another stream;
the plain loop inside the caller's own torch.cuda.graph capture; float16's backward and
float32 staying plain; a bad value of the knob.
"""
import pytest
import torch

import rnnfast
from helpers import CELLS, compare_all
from rnnfast._ops import _last_step_variant

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

HALF = [torch.bfloat16, torch.float16]

# (T, N, H): one step; a partial block of the pointwise grid, H % 8 != 0; a long sequence;
# N past a block of rows
SHAPES = [(1, 3, 8), (4, 65, 37), (64, 5, 24), (3, 130, 72)]


# Every module these tests make stays alive to the end: the graphs are keyed by W_hh's
# address (among others), and a freed W_hh's address given to a new module's would make that
# module's first call replay the old key's graph (correctly, but not the plain loop the tests
# expect of a first call).
_KEEP = []


def _pair(cell, H, dtype=torch.bfloat16, **kwargs):
    from test_cuda import _cuda_pair
    pair = _cuda_pair(cell, 8, H, dtype=dtype, **kwargs)
    _KEEP.append(pair)
    return pair


@pytest.fixture
def graph(monkeypatch):
    monkeypatch.setenv("RNNFAST_STEP_GRAPH", "1")
    with rnnfast.cuda_path("step"):
        yield


def _three_calls(cell, dtype, T, N, H, **layout):
    """Three forward + backward calls of one module pair on fresh inputs each: [(ours,
    theirs, reference)] and the step variants each call ran."""
    from test_cuda import _inputs, run_cuda
    relu = cell == "rnn_relu"
    L, bi = layout.get("num_layers", 1), layout.get("bidirectional", False)
    m, f, m64 = _pair(cell, H, dtype, nonnegative=relu, **layout)
    runs, variants, held = [], [], []
    for seed in (1, 2, 3):
        # GPU memory held across calls, so that this call's tensors get other addresses
        held.append(torch.empty(64 * 1024 * seed, device="cuda"))
        x, hx, upstream = _inputs(cell, L, bi, False, True, dtype, T=T, N=N, C=8, H=H, seed=seed)
        if relu:
            x, hx = x.abs(), tuple(s.abs() for s in hx) if cell == "lstm" else hx.abs()
        runs.append(run_cuda(cell, x, hx, m, f, m64, upstream))
        variants.append(_last_step_variant())
    return runs, variants


@pytest.mark.parametrize("shape", SHAPES, ids=[f"T{t}-N{n}-H{h}" for t, n, h in SHAPES])
@pytest.mark.parametrize("dtype", HALF, ids=["bfloat16", "float16"])
@pytest.mark.parametrize("cell", list(CELLS))
def test_graph_matches_torch_and_reference(cell, dtype, shape, graph):
    from test_cuda import no_tf32
    T, N, H = shape
    with no_tf32():
        runs, variants = _three_calls(cell, dtype, T, N, H)
    backward = "graph" if dtype == torch.bfloat16 else "plain"  # float16's dh GEMM: float32
    assert variants == [("plain", "plain"), ("graph", backward), ("graph", backward)]
    for ours, theirs, ref in runs:
        compare_all(ours, theirs, ref)


@pytest.mark.parametrize("cell", list(CELLS))
def test_graph_stacked_and_bidirectional(cell, graph):
    """Two layers both ways: four graphs a direction (each layer and direction has its own
    W_hh), the reverse direction's time order, h0 a view of the stacked state."""
    runs, variants = _three_calls(cell, torch.bfloat16, 8, 4, 16, num_layers=2,
                                  bidirectional=True)
    assert variants[1:] == [("graph", "graph")] * 2
    for ours, theirs, ref in runs:
        compare_all(ours, theirs, ref)


@pytest.mark.parametrize("cell", list(CELLS))
def test_inference_equals_training_forward(cell, graph):
    """Inference (the LSTM's c in place, no training cache) and the training forward on the
    same graph: equal bit for bit, both graphed after the first call."""
    _, f, _ = _pair(cell, 40)
    x = torch.randn(7, 70, 8, device="cuda", dtype=torch.bfloat16)
    got = []
    for grad in (False, False, True):
        with torch.set_grad_enabled(grad):
            out, state = f(x)
        assert _last_step_variant()[0] == ("plain" if not got else "graph")
        states = state if isinstance(state, tuple) else (state,)
        got.append([out.detach(), *[s.detach() for s in states]])
    assert all(torch.equal(a, b) for a, b in zip(got[1], got[2]))
    # the plain loop's cell code is another (the same math): within bfloat16's rounding
    for a, b in zip(got[0], got[1]):
        assert ((a.float() - b.float()).abs().max() / (1 + a.float().abs().max())).item() < 0.05


def test_w_hh_changed_in_place_between_replays(graph, monkeypatch):
    """A replay reads W_hh at its address as it is then (an optimizer's in-place step): the
    plain loop's result after the change, not the graph's before it."""
    _, f, _ = _pair("lstm", 24)
    x = torch.randn(6, 5, 8, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        f(x)
        before = f(x)[0].float()
        f.weight_hh_l0.mul_(-0.5)
        got = f(x)[0].float()
        assert _last_step_variant()[0] == "graph"
        monkeypatch.setenv("RNNFAST_STEP_GRAPH", "0")
        want = f(x)[0].float()
        assert _last_step_variant()[0] == "plain"
    assert (got - want).abs().max().item() < 0.05
    assert (got - before).abs().max().item() > 0.1


def test_another_stream(graph):
    """A side stream has its own graph (its own buffers and workspace): the same results
    as on the default stream."""
    _, f, _ = _pair("gru", 24)
    x = torch.randn(5, 3, 8, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        f(x)
        want = f(x)[0]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        seen = []
        with torch.cuda.stream(side):
            for _ in range(2):
                got = f(x)[0]
                seen.append(_last_step_variant()[0])
        torch.cuda.current_stream().wait_stream(side)
    assert seen == ["plain", "graph"]
    assert torch.equal(got, want)


def test_inside_the_callers_own_capture(graph):
    """Inside torch.cuda.graph the plain loop is what gets captured, even for a key rnnfast
    has captured already (the capture's stream, warmed up twice), and torch's graph replays
    the layer correctly; rnnfast's own graph on the default stream still replays after
    torch's capture (which frees torch's cuBLAS workspaces: rnnfast's graphs keep their
    own)."""
    _, f, _ = _pair("rnn_tanh", 24)
    x = torch.randn(5, 3, 8, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        f(x)
        want = f(x)[0].clone()  # rnnfast's graph on the default stream
        assert _last_step_variant()[0] == "graph"
        g = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            f(x)
            f(x)
            assert _last_step_variant()[0] == "graph"  # this stream's key is captured
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(g, stream=side):
            out = f(x)[0]
            assert _last_step_variant()[0] == "plain"
        out.zero_()
        g.replay()
        torch.cuda.synchronize()
        again = f(x)[0]
        assert _last_step_variant()[0] == "graph"
    assert ((out.float() - want.float()).abs().max()).item() < 0.05
    assert out.float().abs().max().item() > 0
    assert torch.equal(again, want)


def test_another_weight_or_length_is_another_graph(graph):
    """The key holds W_hh's address and T: a new module, or a new length, first runs the
    plain loop again; the first module's graph still replays after."""
    _, f, _ = _pair("gru", 24)
    _, g, _ = _pair("gru", 24)
    x = torch.randn(5, 3, 8, device="cuda", dtype=torch.bfloat16)
    seen = []
    with torch.no_grad():
        for module, inp in ((f, x), (f, x), (g, x), (f, x[:4]), (f, x)):
            module(inp)
            seen.append(_last_step_variant()[0])
    assert seen == ["plain", "graph", "plain", "plain", "graph"]


def test_float32_stays_plain(graph):
    """The graph is for 16 bits (the float32 step path is bound by its GEMMs)."""
    _, f, _ = _pair("lstm", 24, torch.float32)
    x = torch.randn(5, 3, 8, device="cuda", requires_grad=True)
    for _ in range(3):
        f(x)[0].sum().backward()
        assert _last_step_variant() == ("plain", "plain")


def test_a_bad_value_is_a_clear_error():
    """Raised by the op after its dispatch whichever path runs (as RNNFAST_STEP_FUSED)."""
    from test_cuda import bad_knob_messages
    got = bad_knob_messages("RNNFAST_STEP_GRAPH", "yes")
    assert got.keys() == {"persistent", "auto", "step"}
    for path, line in got.items():
        assert "RNNFAST_STEP_GRAPH is 'yes', expected 0 or 1" in line, (path, line)
