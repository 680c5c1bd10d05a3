"""The register tile's range wait (RNNFAST_REG_WAIT=range; csrc/cuda/persistent.cuh,
persistent_forward_reg, and range_arrive / range_wait in sync.cuh): each warp waits only for
the blocks that make its k range of h_{t-1}, on a counter per range, instead of the grid
barrier. Off by default until a GPU run has measured it.

With the grid variant forced and the register tile on: every output, final state and
gradient against torch.nn and the float64 reference, and bit for bit equal to the grid
barrier's (the same sums in the same order); the plan note says the range wait ran. Shapes
where warps have no chunks (their wait is for nothing), where a block's units straddle two
ranges (fewer, wider blocks), two layers both ways, and a long sequence. The knob is
ignored where the register tile does not run, and a bad value is a clear error. Needs a
CUDA GPU.
"""
import pytest
import torch

from helpers import CELLS, compare_all
from rnnfast._ops import _last_cuda_plan
from test_cuda import _cuda_pair, _inputs, bad_knob_messages, no_tf32, run_cuda

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _register_tile(monkeypatch):
    """The grid variant forced with every block and the register tile asked for, TF32 off."""
    for name in ("RNNFAST_PERSISTENT_MAX_BLOCKS", "RNNFAST_MMA_ROWS", "RNNFAST_REG_WAIT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RNNFAST_REG_TILE", "1")
    with no_tf32("persistent"):
        yield


def _both_waits(monkeypatch, cell, dtype, T, N, H, **layout):
    """(grid barrier's results, range wait's results, range wait's forward plan) of one
    module pair on the same inputs."""
    L, bi = layout.get("num_layers", 1), layout.get("bidirectional", False)
    # relu with nonnegative weights and values: in 16 bits a pre-activation within rounding
    # of 0 would flip its derivative between rnnfast, torch.nn and the reference
    relu = cell == "rnn_relu"
    m, f, m64 = _cuda_pair(cell, 8, H, dtype=dtype, nonnegative=relu, **layout)
    x, hx, upstream = _inputs(cell, L, bi, False, True, dtype, T=T, N=N, C=8, H=H)
    if relu:
        x, hx = x.abs(), hx.abs()
    out = {}
    for wait in ("grid", "range"):
        monkeypatch.setenv("RNNFAST_REG_WAIT", wait)
        out[wait] = run_cuda(cell, x, hx, m, f, m64, upstream)
        plan = _last_cuda_plan()[0]
        assert plan["reg"] == 1, plan
        assert plan["range_wait"] == int(wait == "range"), plan
    return out["grid"], out["range"], plan


def _same_bits(a, b):
    for name, t in a[0].items():
        assert torch.equal(t, b[0][name]), name


# (T, N, H, max blocks): N = 1, H = 64 (two warps with a chunk, six waiting for nothing);
# H = 200 (7 chunks: one warp without); the N = 16, H = 768 and H = 1024; at most 40
# blocks at H = 200 (5 units a block, so that some blocks' units straddle two warps' ranges
# of 32)
SHAPES = [(4, 1, 64, 0), (5, 9, 200, 0), (3, 16, 768, 0), (3, 16, 1024, 0), (4, 5, 200, 40)]


@pytest.mark.parametrize("shape", SHAPES, ids=[f"T{t}-N{n}-H{h}-B{b}" for t, n, h, b in SHAPES])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("cell", list(CELLS))
def test_range_wait_matches_the_barrier_bit_for_bit(cell, dtype, shape, monkeypatch):
    T_, N_, H_, blocks = shape
    if blocks:
        monkeypatch.setenv("RNNFAST_PERSISTENT_MAX_BLOCKS", str(blocks))
    grid, ranged, plan = _both_waits(monkeypatch, cell, dtype, T_, N_, H_)
    if blocks:
        assert plan["blocks"] == blocks, plan
    compare_all(*ranged)
    _same_bits(grid, ranged)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_range_wait_layers_and_directions(cell, monkeypatch):
    grid, ranged, _ = _both_waits(monkeypatch, cell, torch.bfloat16, 4, 7, 64, num_layers=2,
                                  bidirectional=True)
    compare_all(*ranged)
    _same_bits(grid, ranged)


@pytest.mark.parametrize("cell", ["lstm", "rnn_tanh"])
def test_range_wait_long_sequence(cell, monkeypatch):
    """600 steps: a counter that ran ahead or a wait released early shows as wrong bits."""
    grid, ranged, _ = _both_waits(monkeypatch, cell, torch.bfloat16, 600, 3, 96)
    compare_all(*ranged)
    _same_bits(grid, ranged)


def test_range_wait_ignored_off_the_register_tile(monkeypatch):
    """float32 (no register tile) and RNNFAST_REG_TILE=0: the knob changes nothing."""
    monkeypatch.setenv("RNNFAST_REG_WAIT", "range")
    for dtype, reg in ((torch.float32, "1"), (torch.bfloat16, "0")):
        monkeypatch.setenv("RNNFAST_REG_TILE", reg)
        m, f, m64 = _cuda_pair("lstm", 8, 64, dtype=dtype)
        x, hx, upstream = _inputs("lstm", 1, False, False, True, dtype, T=3, N=4, C=8, H=64)
        compare_all(*run_cuda("lstm", x, hx, m, f, m64, upstream))
        plan = _last_cuda_plan()[0]
        assert plan["reg"] == 0 and plan["range_wait"] == 0, plan


def test_range_wait_unknown_value_is_a_clear_error():
    lines = bad_knob_messages("RNNFAST_REG_WAIT", "yes", "LSTM")
    for path in ("persistent", "auto"):
        assert "RNNFAST_REG_WAIT is 'yes', expected 'grid' or 'range'" in lines[path], lines
    assert lines["step"] == "raised nothing", lines
