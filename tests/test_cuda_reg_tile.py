"""The grid variant's register tile (csrc/cuda/persistent.cuh, persistent_forward_reg): the
16-bit forward at N <= 16 with W_hh's slice held in registers as mma.sync fragments and
h_{t-1} loaded from L2 straight into fragments, on by default (RNNFAST_REG_TILE=0 turns it
off) since the fourth H100 run measured it. Every output, final state and gradient against
torch.nn and the float64 reference, as in test_cuda.py, in float16 and bfloat16; the plan
note says the register tile ran, or that the tiled forward did where the layer does not fit
it (N > 16, H not a multiple of 8, more than 32 rows of W a block or 4 chunks of 32 columns
a warp); an h0 whose rows are not 16-byte aligned gives the same bits as an aligned one; a
bad value is a clear error. Needs a CUDA GPU.
"""
import pytest
import torch

import rnnfast
from helpers import CELLS, compare_all
from rnnfast._ops import _last_cuda_plan
from test_cuda import (_cuda_pair, _inputs, bad_knob_messages, check_half_one_layer, no_tf32,
                       run_cuda)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

HALF = [torch.bfloat16, torch.float16]
HALF_IDS = ["bfloat16", "float16"]


@pytest.fixture(autouse=True)
def _register_tile(monkeypatch):
    """The grid variant forced with every block and the register tile asked for, TF32 off."""
    monkeypatch.delenv("RNNFAST_PERSISTENT_MAX_BLOCKS", raising=False)
    monkeypatch.delenv("RNNFAST_MMA_ROWS", raising=False)
    monkeypatch.setenv("RNNFAST_REG_TILE", "1")
    with no_tf32("persistent"):
        yield


def forward_plan():
    return _last_cuda_plan()[0]


GATES = {"rnn_tanh": 1, "rnn_relu": 1, "lstm": 4, "gru": 3}


def holds(cell, N, H):
    """persistent.cuh's reg_tile_fits on this GPU (a block per SM): N <= 16, H a multiple of
    8 with at most 4 chunks of 32 columns a warp, at most 32 rows of W a block."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    units = -(-H // sms)
    chunks = -(-H // 32)
    return N <= 16 and H % 8 == 0 and -(-chunks // 8) <= 4 and GATES[cell] * units <= 32


# (T, N, H): N = 1; H = 64 (one chunk of 32 columns for 2 of the 8 warps); H = 200 (U 2 on
# 132 SMs, its last chunk a quarter full); the N = 16, H = 768 (LSTM: 128 blocks
# of 6 units, 24 rows of W); H = 1024 (LSTM: 32 rows of W a block, 4 chunks a warp, on
# 128 SMs or more; the tiled forward on fewer)
SHAPES = [(3, 1, 64), (3, 9, 200), (2, 16, 768), (2, 16, 1024)]


@pytest.mark.parametrize("shape", SHAPES, ids=[f"T{t}-N{n}-H{h}" for t, n, h in SHAPES])
@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
@pytest.mark.parametrize("cell", list(CELLS))
def test_register_tile_matches_torch_and_reference(cell, dtype, shape):
    T_, N_, H_ = shape
    check_half_one_layer(cell, dtype, T_, N_, H_)
    assert rnnfast.last_cuda_path() == ("persistent", "persistent")
    expected = holds(cell, N_, H_)
    assert forward_plan()["reg"] == int(expected), forward_plan()
    if torch.cuda.get_device_properties(0).multi_processor_count >= 128:
        assert expected  # on an H100 or H200 every shape here fits the register tile


@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_register_tile_layers_and_directions(cell, dtype):
    """Two bidirectional layers: the reverse direction and a second layer's input."""
    m, f, m64 = _cuda_pair(cell, 8, 64, dtype=dtype, num_layers=2, bidirectional=True)
    x, hx, upstream = _inputs(cell, 2, True, False, True, dtype, T=4, N=7, C=8, H=64)
    compare_all(*run_cuda(cell, x, hx, m, f, m64, upstream))
    assert forward_plan()["reg"] == 1, forward_plan()


def _misaligned(s):
    """s in a new tensor whose data starts one element (2 bytes) past a 16-byte boundary."""
    flat = torch.cat([s.new_zeros(1), s.reshape(-1)])
    return flat[1:].view(s.shape)


@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_unaligned_h0_gives_the_same_bits(cell, dtype):
    """h0 two bytes off alignment (its first step's 16-byte loads become 2-byte ones): the
    outputs, states and gradients equal those from an aligned h0 bit for bit, and match
    torch.nn and the reference."""
    m, f, m64 = _cuda_pair(cell, 8, 96, dtype=dtype)
    x, hx, upstream = _inputs(cell, 1, False, False, True, dtype, T=3, N=5, C=8, H=96)
    aligned = run_cuda(cell, x, hx, m, f, m64, upstream)
    shifted = run_cuda(cell, x, hx, m, f, m64, upstream, state_view=_misaligned)
    assert forward_plan()["reg"] == 1, forward_plan()
    compare_all(*shifted)
    for name, t in aligned[0].items():
        assert torch.equal(t, shifted[0][name]), name


@pytest.mark.parametrize("cell", list(CELLS))
def test_register_tile_is_deterministic(cell):
    m, f, _ = _cuda_pair(cell, 8, 768, dtype=torch.bfloat16)
    x = torch.randn(5, 16, 8, device="cuda").to(torch.bfloat16)
    with torch.no_grad():
        first, second = f(x)[0], f(x)[0]
    assert forward_plan()["reg"] == int(holds(cell, 16, 768))
    assert torch.equal(first, second)


# (N, H, why the tiled forward runs): N > 16; H % 8 != 0; H = 1056: 33 chunks of 32
# columns, 5 for some warp
FALLBACKS = [(17, 64), (4, 100), (4, 1056)]


@pytest.mark.parametrize("shape", FALLBACKS, ids=[f"N{n}-H{h}" for n, h in FALLBACKS])
def test_layers_the_tile_does_not_hold_run_tiled(shape):
    N_, H_ = shape
    check_half_one_layer("gru", torch.bfloat16, 2, N_, H_)
    assert rnnfast.last_cuda_path() == ("persistent", "persistent")
    assert forward_plan()["reg"] == 0, forward_plan()


def test_on_by_default_off_with_0_and_float32_ignores_it(monkeypatch):
    monkeypatch.delenv("RNNFAST_REG_TILE")
    check_half_one_layer("lstm", torch.bfloat16, 2, 8, 64)
    assert forward_plan()["reg"] == 1
    monkeypatch.setenv("RNNFAST_REG_TILE", "0")
    check_half_one_layer("lstm", torch.bfloat16, 2, 8, 64)
    assert forward_plan()["reg"] == 0
    monkeypatch.setenv("RNNFAST_REG_TILE", "1")
    m, f, m64 = _cuda_pair("lstm", 8, 64)
    x, hx, upstream = _inputs("lstm", 1, False, False, True, torch.float32, T=3, N=8, C=8, H=64)
    compare_all(*run_cuda("lstm", x, hx, m, f, m64, upstream))
    assert forward_plan()["reg"] == 0


def test_unknown_value_is_a_clear_error():
    """RNNFAST_REG_TILE=yes: an error naming the values it takes, on the paths that may run
    the grid variant; the per-step path never reads it."""
    lines = bad_knob_messages("RNNFAST_REG_TILE", "yes", "LSTM")
    for path in ("persistent", "auto"):
        assert "RNNFAST_REG_TILE is 'yes', expected 0 or 1" in lines[path], lines
    assert lines["step"] == "raised nothing", lines
