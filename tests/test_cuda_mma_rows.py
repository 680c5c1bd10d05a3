"""The grid variant's tensor-core forward tiles (csrc/cuda/persistent.cuh): 64 or 32 batch
rows a tile where the batch has more than half as many rows, else 16, so a step has fewer
tiles; RNNFAST_MMA_ROWS=16 or 32 caps them (64, the default, does not). Every output, final
state and gradient against torch.nn and the float64 reference, as in test_cuda.py, in
float16 and bfloat16; the plan note says which tile ran; float32 (FFMA) ignores the knob; a bad value is
a clear error. Needs a CUDA GPU.
"""
import pytest
import torch

import rnnfast
from helpers import CELLS, compare_all
from rnnfast._ops import _last_cuda_plan
from test_cuda import (_cuda_pair, _inputs, bad_knob_messages, check_half_one_layer, no_tf32,
                       run_cuda)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _grid_variant(monkeypatch):
    """The grid variant forced, with every block and its tiled forward (not the register
    tile, which would take N <= 16), TF32 off."""
    monkeypatch.delenv("RNNFAST_PERSISTENT_MAX_BLOCKS", raising=False)
    monkeypatch.setenv("RNNFAST_REG_TILE", "0")
    with no_tf32("persistent"):
        yield


def expected_rows(asked, N):
    """The planner's rule: the largest tile, up to the asked one, that N is more than half
    of (32 before 16)."""
    if asked == 64 and N > 32:
        return 64
    if asked >= 32 and N > 16:
        return 32
    return 16


# (T, N, H): N=40 a 64-row tile's 40 rows or 32 + 8; 70 two tiles of 64 (64 + 6) or three
# of 32; 100 with H=768 (128 blocks of 6 units: the shape, 2 or 4 tiles); H=133
# two units a block on 132 SMs, K not a multiple of 16
SHAPES = [(3, 40, 64), (2, 70, 133), (2, 100, 768), (3, 9, 48)]


@pytest.mark.parametrize("shape", SHAPES, ids=[f"T{t}-N{n}-H{h}" for t, n, h in SHAPES])
@pytest.mark.parametrize("rows", [16, 32, 64, None], ids=["16", "32", "64", "default"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("cell", list(CELLS))
def test_mma_rows(cell, dtype, rows, shape, monkeypatch):
    if rows is None:
        monkeypatch.delenv("RNNFAST_MMA_ROWS", raising=False)
    else:
        monkeypatch.setenv("RNNFAST_MMA_ROWS", str(rows))
    T_, N_, H_ = shape
    check_half_one_layer(cell, dtype, T_, N_, H_)
    assert rnnfast.last_cuda_path() == ("persistent", "persistent")
    fwd, bwd = _last_cuda_plan()
    assert fwd["nt"] == expected_rows(rows or 64, N_), fwd
    assert bwd["nt"] <= 16, bwd  # the backward (FFMA) keeps its tiles


def test_float32_ignores_the_knob(monkeypatch):
    monkeypatch.setenv("RNNFAST_MMA_ROWS", "64")
    m, f, m64 = _cuda_pair("lstm", 8, 64)
    x, hx, upstream = _inputs("lstm", 1, False, False, True, torch.float32, T=3, N=70, C=8, H=64)
    compare_all(*run_cuda("lstm", x, hx, m, f, m64, upstream))
    assert _last_cuda_plan()[0]["nt"] == 16


def test_unknown_mma_rows_is_a_clear_error():
    """RNNFAST_MMA_ROWS=48: an error naming the values it takes, on the paths that may run
    the grid variant; the per-step path never reads it."""
    lines = bad_knob_messages("RNNFAST_MMA_ROWS", "48")
    for path in ("persistent", "auto"):
        assert "RNNFAST_MMA_ROWS is '48', expected 16, 32 or 64" in lines[path], lines
    assert lines["step"] == "raised nothing", lines
