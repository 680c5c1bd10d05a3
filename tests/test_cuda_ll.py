"""The persistent kernels' grid variant with the LL exchange (RNNFAST_GRID_EXCHANGE=ll,
csrc/cuda/persistent.cuh): no grid barrier; each value a step makes for the other blocks
travels with its step's flag in an 8-byte word (float32: one value a word; float16 and
bfloat16: two units' values a word, so U is even; the backward's float gate gradients one
a word). Every output, final state and gradient against torch.nn and the float64
reference, as in test_cuda.py; bitwise the same results as the barrier (only the transport
differs, not the arithmetic); odd H in 16-bit and float64 keep the barrier; a bad value
of the knob is a clear error. Needs a CUDA GPU.
"""
import os
import subprocess
import sys

import pytest
import torch

import rnnfast
from helpers import CELLS, compare_all
from rnnfast._ops import _last_cuda_plan
from test_cuda import _cuda_pair, _inputs, check_half_one_layer, no_tf32, run_cuda

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _ll_persistent(monkeypatch):
    """The grid variant forced with the LL exchange, TF32 off (as in test_cuda.py)."""
    monkeypatch.setenv("RNNFAST_GRID_EXCHANGE", "ll")
    monkeypatch.delenv("RNNFAST_PERSISTENT_MAX_BLOCKS", raising=False)
    with no_tf32("persistent"):
        yield


# (T, N, H): on 132 SMs, H=7 and 40 a unit a block (7: a row of 7 words, the last 16-byte
# load half past it); 133: 2 units a block, 67 blocks; N=17 and 33 two and three row tiles
SHAPES = [(3, 1, 7), (4, 19, 40), (3, 17, 133), (2, 33, 256)]


@pytest.mark.parametrize("shape", SHAPES, ids=[f"T{t}-N{n}-H{h}" for t, n, h in SHAPES])
@pytest.mark.parametrize("cell", list(CELLS))
def test_ll_float32(cell, shape):
    T_, N_, H_ = shape
    m, f, m64 = _cuda_pair(cell, 8, H_, bidirectional=True)
    x, hx, upstream = _inputs(cell, 1, True, False, True, torch.float32, T=T_, N=N_, C=8, H=H_)
    compare_all(*run_cuda(cell, x, hx, m, f, m64, upstream))
    assert rnnfast.last_cuda_path() == ("persistent", "persistent")


# 16-bit: H=40 and 768 pair units in words (U even); H=41 keeps the barrier in the forward
# (its backward's float words still run)
HALF_SHAPES = [(4, 19, 40), (3, 5, 41), (2, 16, 768)]


@pytest.mark.parametrize("shape", HALF_SHAPES, ids=[f"T{t}-N{n}-H{h}" for t, n, h in HALF_SHAPES])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("cell", list(CELLS))
def test_ll_half(cell, dtype, shape):
    T_, N_, H_ = shape
    check_half_one_layer(cell, dtype, T_, N_, H_)
    assert rnnfast.last_cuda_path() == ("persistent", "persistent")


@pytest.mark.parametrize("cell", list(CELLS))
def test_ll_long_sequence(cell):
    """600 steps: the two turns alternate 300 times each, the flags count to 600."""
    T_, N_, C_, H_ = 600, 2, 8, 16
    m, f, m64 = _cuda_pair(cell, C_, H_)
    x, hx, upstream = _inputs(cell, 1, False, False, True, torch.float32, T=T_, N=N_, C=C_, H=H_)
    compare_all(*run_cuda(cell, x, hx, m, f, m64, upstream))


def _outputs_and_grads(f, x, h0, monkeypatch, exchange):
    monkeypatch.setenv("RNNFAST_GRID_EXCHANGE", exchange)
    x = x.clone().requires_grad_()
    out, state = f(x, h0)
    states = state if isinstance(state, tuple) else (state,)
    loss = out.float().square().sum() + sum(s.float().sum() for s in states)
    f.zero_grad()
    loss.backward()
    return [out.detach(), *[s.detach() for s in states], x.grad,
            *[p.grad for p in f.parameters()]]


@pytest.mark.parametrize("exchange", ["ll", "ll-spin", "flags"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("cell", list(CELLS))
def test_ll_is_bitwise_the_barrier(cell, dtype, exchange, monkeypatch):
    """The LL exchange (either way of retrying its loads) moves the same values as staging
    from y after the barrier, and each block sums in the same order: outputs, states and
    gradients equal bit for bit; so does the barrier on per-block flags."""
    _, f, _ = _cuda_pair(cell, 8, 64, dtype=dtype)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(9, 20, 8, generator=g).to("cuda", dtype)
    layers = 1
    h0 = torch.randn(layers, 20, 64, generator=g).to("cuda", dtype)
    if cell == "lstm":
        h0 = (h0, torch.randn(layers, 20, 64, generator=g).to("cuda", dtype))
    barrier = _outputs_and_grads(f, x, h0, monkeypatch, "barrier")
    ll = _outputs_and_grads(f, x, h0, monkeypatch, exchange)
    assert len(barrier) == len(ll)
    for i, (a, b) in enumerate(zip(barrier, ll)):
        assert torch.equal(a, b), f"result {i} differs between the barrier and the LL exchange"


@pytest.mark.parametrize("exchange, code",
                         [("barrier", 0), ("ll", 1), ("ll-spin", 2), ("flags", 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_plan_note_reports_the_exchange(exchange, code, dtype, monkeypatch):
    """rnnfast._ops._last_cuda_plan() after a forced grid variant (LSTM, H = 400, 20 rows):
    the exchange, the units and blocks (bfloat16 with LL an even number of units in the
    forward; the backward's words are floats), the cost model's estimate, and in the
    forward two tiles of xs with the barrier (20 rows: two tiles of 16), one with LL."""
    monkeypatch.setenv("RNNFAST_GRID_EXCHANGE", exchange)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    f = rnnfast.LSTM(8, 400).to("cuda", dtype)
    x = torch.randn(3, 20, 8, device="cuda", dtype=dtype, requires_grad=True)
    f(x)[0].float().sum().backward()
    fwd, bwd = _last_cuda_plan()
    per = 2 if (dtype == torch.bfloat16 and exchange in ("ll", "ll-spin")) else 1
    for note, backward in ((fwd, False), (bwd, True)):
        assert note is not None
        u = -(-400 // sms)
        if not backward:
            u = -(-u // per) * per
        assert note["units"] == u and note["blocks"] == -(-400 // u), note
        assert note["exchange"] == code and note["cluster"] == 0, note
        assert note["us"] > 0 and note["grid_us"] == note["us"], note
    assert fwd["xs_tiles"] == (1 if code in (1, 2) else 2), fwd


def test_float64_keeps_the_barrier():
    """float64 values do not fit an LL word beside a flag: the grid variant runs with the
    barrier, and gives the reference's results."""
    m, f, m64 = _cuda_pair("gru", 4, 12, dtype=torch.float64)
    x, hx, upstream = _inputs("gru", 1, False, False, True, torch.float64, T=3, N=5, C=4, H=12)
    compare_all(*run_cuda("gru", x, hx, m, f, m64, upstream))
    assert rnnfast.last_cuda_path() == ("persistent", "persistent")


_BAD_EXCHANGE_CHILD = r"""
import torch
import rnnfast

f = rnnfast.LSTM(4, 8).cuda()
for path in ("persistent", "auto", "cluster", "step"):
    with rnnfast.cuda_path(path):
        try:
            f(torch.randn(2, 1, 4, device="cuda"))
        except RuntimeError as e:
            print(path, str(e).splitlines()[0])
        else:
            print(path, "raised nothing")
"""


def test_unknown_exchange_is_a_clear_error():
    """RNNFAST_GRID_EXCHANGE=fast: an error naming the values it takes, on every path that
    may run the grid variant (forced, auto, and the cluster variant's too, which does not
    silently ignore it); the per-step path never reads it. In a child process, as
    test_cuda's refusal test."""
    env = dict(os.environ, RNNFAST_GRID_EXCHANGE="fast")
    child = subprocess.run([sys.executable, "-c", _BAD_EXCHANGE_CHILD], capture_output=True,
                           text=True, timeout=300, env=env)
    assert child.returncode == 0, child.stderr[-4000:]
    lines = dict(line.split(" ", 1) for line in child.stdout.splitlines())
    for path in ("persistent", "auto", "cluster"):
        assert ("RNNFAST_GRID_EXCHANGE is 'fast', expected 'barrier', 'flags', 'll' or "
                "'ll-spin'" in lines[path]), \
            child.stdout
    assert lines["step"] == "raised nothing", child.stdout
