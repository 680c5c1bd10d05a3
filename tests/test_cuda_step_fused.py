"""The per-step path's fused 16-bit kernels (csrc/cuda/fused_step.cuh, RNNFAST_STEP_FUSED=1):
the forward one kernel a step (the recurrent GEMM on tensor cores and the cell's update), and
in bfloat16 the backward one kernel a step (the dh GEMM of a step and the pointwise backward
of the step before), in place of a cuBLAS GEMM and a pointwise kernel each. Off by default
until measured on a GPU; scripts/emulate_persistent.py runs their indexing without one
(tests/test_persistent_emulation.py).

On a GPU: every output, final state and gradient with the step path forced and the fused
kernels asked, against torch.nn and the float64 reference (test_cuda.py's checks), over
shapes that cover the tiling (64 batch rows by 64 rows of W a block, stages of 64 columns):
partial row and unit tiles, several stages, a last stage partly padding, unaligned h0 and
W_hh (cloned), H % 8 != 0 (the unfused step runs), inference (the LSTM's c in place) equal to
the training forward bit for bit, determinism, the fused kernels having run, and a bad
value of the knob.
"""
import pytest
import torch

import rnnfast
from helpers import CELLS
from rnnfast._ops import _last_step_variant

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

HALF = [torch.bfloat16, torch.float16]

# (T, N, H): one block, a last stage of 8 columns; 2 x 5 blocks (LSTM), 2 stages; 3 row
# blocks, 3 stages; a long sequence (the fp32 gate sums carried over 64 steps); H % 8 != 0
SHAPES = [(5, 3, 8), (4, 65, 72), (3, 130, 136), (64, 5, 24), (4, 6, 37)]


@pytest.fixture
def fused(monkeypatch):
    monkeypatch.setenv("RNNFAST_STEP_FUSED", "1")
    with rnnfast.cuda_path("step"):
        yield


@pytest.mark.parametrize("shape", SHAPES, ids=[f"T{t}-N{n}-H{h}" for t, n, h in SHAPES])
@pytest.mark.parametrize("dtype", HALF, ids=["bfloat16", "float16"])
@pytest.mark.parametrize("cell", list(CELLS))
def test_fused_step_matches_torch_and_reference(cell, dtype, shape, fused):
    from test_cuda import check_half_one_layer, no_tf32
    T, N, H = shape
    with no_tf32():
        check_half_one_layer(cell, dtype, T, N, H)
    assert rnnfast.last_cuda_path() == ("step", "step")
    # the fused kernels ran where they apply: H % 8 == 0, the backward in bfloat16 only
    fwd = "fused" if H % 8 == 0 else "plain"
    bwd = "fused" if H % 8 == 0 and dtype == torch.bfloat16 else "plain"
    assert _last_step_variant() == (fwd, bwd)


@pytest.mark.parametrize("layout", ["L2-bi-tm-h0-H16", "long-T128-N8-H64-bi"])
@pytest.mark.parametrize("cell", list(CELLS))
def test_fused_step_stacked_and_bidirectional(cell, layout, fused):
    """Two layers, both directions (the reverse time order, h0 a view of the stacked
    state)."""
    from test_cuda import _run_half, compare_all
    ours, theirs, ref = _run_half(cell, torch.bfloat16, layout, nonnegative=cell == "rnn_relu")
    compare_all(ours, theirs, ref)


def _unaligned(shape, dtype=torch.bfloat16):
    """A contiguous tensor of `shape` one element into its storage (not 16-byte aligned)."""
    n = 1
    for d in shape:
        n *= d
    t = torch.randn(n + 1, device="cuda", dtype=dtype)[1:].view(shape)
    assert t.is_contiguous() and t.data_ptr() % 16 != 0
    return t


def _op_forward(cell, x, h0, c0, w_ih, w_hh, b):
    """The layer op itself (a view of any alignment passes its checks), inference."""
    ops = torch.ops.rnnfast
    if cell == "lstm":
        return ops.lstm_forward(x, h0, c0, w_ih, w_hh, b, b, False, False)[:3]
    if cell == "gru":
        return ops.gru_forward(x, h0, w_ih, w_hh, b, b, False, False)[:2]
    return ops.rnn_forward(x, h0, w_ih, w_hh, b, b, 1 if cell == "rnn_relu" else 0, False,
                           False)


@pytest.mark.parametrize("cell", list(CELLS))
def test_unaligned_h0_and_w_hh_are_copied(cell, fused):
    """h0 and W_hh one element into their storage: the fused step's 16-byte copies need them
    aligned, so the op clones them; the results equal those from aligned copies."""
    G = {"lstm": 4, "gru": 3}.get(cell, 1)
    H, N = 64, 3
    h0, w_hh = _unaligned((N, H)), _unaligned((G * H, H)).mul_(0.1)
    x = torch.randn(5, N, 8, device="cuda", dtype=torch.bfloat16)
    w_ih = torch.randn(G * H, 8, device="cuda", dtype=torch.bfloat16) * 0.1
    b = torch.randn(G * H, device="cuda", dtype=torch.bfloat16) * 0.1
    c0 = torch.randn(N, H, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        a = _op_forward(cell, x, h0, c0, w_ih, w_hh * 1, b)  # w_hh * 1: an aligned copy
        b_ = _op_forward(cell, x, h0.clone(), c0, w_ih, w_hh, b)
        c = _op_forward(cell, x, h0, c0, w_ih, w_hh, b)
    for u, v, w in zip(a, b_, c):
        assert torch.equal(u, v) and torch.equal(u, w)


@pytest.mark.parametrize("cell", list(CELLS))
def test_inference_equals_training_forward(cell, fused):
    """Inference saves nothing (the LSTM's c kept in place): bit for bit the training
    forward's outputs and final states; and two runs agree bit for bit."""
    from test_cuda import _cuda_pair
    _, f, _ = _cuda_pair(cell, 8, 72, torch.bfloat16)
    x = torch.randn(7, 70, 8, device="cuda", dtype=torch.bfloat16)
    got = []
    for grad in (False, True, True):
        with torch.set_grad_enabled(grad):
            out, state = f(x)
        states = state if isinstance(state, tuple) else (state,)
        got.append([out.detach(), *[s.detach() for s in states]])
    for other in got[1:]:
        assert all(torch.equal(a, b) for a, b in zip(got[0], other))


@pytest.mark.parametrize("cell", list(CELLS))
def test_fused_and_unfused_agree(cell, monkeypatch):
    """The same forward, fused and not: not bit for bit (so the fused kernel ran: the
    unfused path rounds its gate sums to bfloat16, the fused step keeps them in fp32), and
    within that rounding."""
    from test_cuda import _cuda_pair
    _, f, _ = _cuda_pair(cell, 8, 136, torch.bfloat16)
    x = torch.randn(6, 66, 8, device="cuda", dtype=torch.bfloat16)
    outs = {}
    with rnnfast.cuda_path("step"), torch.no_grad():
        for knob in ("0", "1"):
            monkeypatch.setenv("RNNFAST_STEP_FUSED", knob)
            outs[knob] = f(x)[0].float()
            assert _last_step_variant()[0] == ("fused" if knob == "1" else "plain")
    assert not torch.equal(outs["0"], outs["1"])  # the fused kernel ran
    assert ((outs["0"] - outs["1"]).abs() / (1 + outs["0"].abs())).max().item() < 0.05


def test_a_bad_value_is_a_clear_error():
    """Raised by the op after its dispatch whichever path runs (as a bad RNNFAST_MMA_ROWS)."""
    from test_cuda import bad_knob_messages
    got = bad_knob_messages("RNNFAST_STEP_FUSED", "yes")
    assert got.keys() == {"persistent", "auto", "step"}
    for path, line in got.items():
        assert "RNNFAST_STEP_FUSED is 'yes', expected 0 or 1" in line, (path, line)


@pytest.mark.parametrize("cell", list(CELLS))
def test_fused_backward_ran_and_agrees(cell, monkeypatch):
    """In bfloat16 the backward fuses too (the dh GEMM of a step and the pointwise backward of
    the step before, one launch a step): the fused backward ran (rnnfast._ops'
    _last_step_variant; the sixth H100 run found its gradients equal to the unfused path's bit
    for bit at this shape, so a difference cannot be the proof) and agrees with the unfused
    path within bfloat16's rounding; float16's backward is not fused (its dh GEMM runs in
    float32)."""
    from test_cuda import _cuda_pair
    _, f, _ = _cuda_pair(cell, 8, 136, torch.bfloat16)
    x0 = torch.randn(6, 66, 8, device="cuda", dtype=torch.bfloat16)
    grads = {}
    with rnnfast.cuda_path("step"):
        for knob in ("0", "1"):
            # the same (unfused) forward both times: only the backward differs
            monkeypatch.setenv("RNNFAST_STEP_FUSED", "0")
            f.zero_grad()
            x = x0.clone().requires_grad_()
            y = f(x)[0]
            monkeypatch.setenv("RNNFAST_STEP_FUSED", knob)
            y.float().square().sum().backward()
            assert _last_step_variant() == ("plain", "fused" if knob == "1" else "plain")
            grads[knob] = [x.grad.float()] + [q.grad.float() for q in f.parameters()]
    for a, b in zip(grads["0"], grads["1"]):
        assert ((a - b).abs().max() / (1 + a.abs().max())).item() < 0.05
