"""The cluster variant's async exchange (RNNFAST_CLUSTER_EXCHANGE=async; csrc/cuda/sync.cuh
and persistent.cuh): each value a block makes goes into every peer's turn by st.async,
completing on that block's mbarrier for the turn, and each block waits on its own mbarrier
instead of the cluster barrier. It carries 4- and 8-byte values: the float32 and float64
forward's h_t and every backward's gate gradients (acc_t); the 16-bit forward keeps the
barrier, and the plan note says which ran.

The cluster shapes of test_cuda_cluster.py (clusters of 1 to 16 blocks, 1 to 17 rows a
cluster, so more clusters than run at once, several tiles a cluster and a last cluster with
fewer rows) at T = 9 and 10: each turn's mbarrier goes through several phases, and the
backward's phase count starts from an even and an odd T - 1. Every output, final state and
gradient against torch.nn and the float64 reference, and bit for bit against the barrier
(the exchange changes no arithmetic). Needs a GPU of compute capability 9.0 or newer.
"""
import pytest
import torch

import rnnfast
from helpers import CELLS, compare_all, run_and_grad
from rnnfast._ops import _last_cuda_plan
from test_cuda import _cuda, _cuda_pair, _inputs, _map, bad_knob_messages, no_tf32, run_cuda
from test_cuda_cluster import _knobs, pytestmark  # noqa: F401 - pytestmark: its GPU check

SIZES = [1, 2, 8, 16]
ROWS = [None, 1, 5, 17]


@pytest.fixture(autouse=True)
def _async_exchange(monkeypatch):
    """The cluster variant forced, the async exchange asked for, TF32 off."""
    monkeypatch.setenv("RNNFAST_CLUSTER_EXCHANGE", "async")
    monkeypatch.delenv("RNNFAST_CLUSTER_SIZE", raising=False)
    monkeypatch.delenv("RNNFAST_CLUSTER_ROWS", raising=False)
    with no_tf32("cluster"):
        yield


def _exchanges():
    """(forward, backward): 1 where the last plan ran the async exchange, 0 the barrier."""
    fwd, bwd = _last_cuda_plan()
    return fwd["async"], bwd["async"]


@pytest.mark.parametrize("rows", ROWS, ids=[f"rows{r}" for r in ROWS])
@pytest.mark.parametrize("size", SIZES, ids=[f"cluster{s}" for s in SIZES])
@pytest.mark.parametrize("cell", list(CELLS))
def test_async_shapes_float32(cell, size, rows, monkeypatch):
    _knobs(monkeypatch, size, rows)
    T_ = 9 if rows in (None, 5) else 10
    N_, C_, H_ = 19, 8, 40
    m, f, m64 = _cuda_pair(cell, C_, H_, bidirectional=True)
    x, hx, upstream = _inputs(cell, 1, True, False, True, torch.float32, T=T_, N=N_, C=C_, H=H_)
    compare_all(*run_cuda(cell, x, hx, m, f, m64, upstream))
    assert rnnfast.last_cuda_path() == ("cluster", "cluster")
    assert _exchanges() == (1, 1)


def _one_layer(cell, dtype, T_, N_, H_):
    """One unidirectional layer with h0 given, against torch.nn and the reference (relu
    with nonnegative values, off its kink: see test_cuda's test_half_matches_...)."""
    relu = cell == "rnn_relu" and dtype == torch.bfloat16
    m, f, m64 = _cuda_pair(cell, 8, H_, dtype=dtype, nonnegative=relu)
    x, hx, upstream = _inputs(cell, 1, False, False, True, dtype, T=T_, N=N_, C=8, H=H_)
    if relu:
        x, hx = x.abs(), hx.abs()
    compare_all(*run_cuda(cell, x, hx, m, f, m64, upstream))
    assert rnnfast.last_cuda_path() == ("cluster", "cluster")


@pytest.mark.parametrize("cell", list(CELLS))
def test_async_float64(cell, monkeypatch):
    """8-byte values (st.async .b64) in both directions."""
    _knobs(monkeypatch, 4, 3)
    _one_layer(cell, torch.float64, 7, 7, 24)
    assert _exchanges() == (1, 1)


@pytest.mark.parametrize("cell", list(CELLS))
def test_async_bfloat16_backward_only(cell, monkeypatch):
    """bfloat16: the forward's h_t is 2 bytes, so its exchange stays the barrier; the
    backward's gate gradients are float32 and go by st.async."""
    _knobs(monkeypatch, 2, 5)
    _one_layer(cell, torch.bfloat16, 9, 19, 40)
    assert _exchanges() == (0, 1)


@pytest.mark.parametrize("T_", [1, 2, 11])
@pytest.mark.parametrize("cell", list(CELLS))
def test_async_matches_the_barrier_bit_for_bit(cell, T_, monkeypatch):
    """The same outputs and gradients, bit for bit, with either exchange (T = 1: no
    exchange in the forward, one phase in the backward; 2: one phase of each turn)."""
    _knobs(monkeypatch, 4, 5)
    N_, C_, H_ = 13, 8, 40
    _, f, _ = _cuda_pair(cell, C_, H_, bidirectional=True)
    x, hx, upstream = _inputs(cell, 1, True, False, True, torch.float32, T=T_, N=N_, C=C_, H=H_)
    results = {}
    for exchange in ("async", "barrier"):
        monkeypatch.setenv("RNNFAST_CLUSTER_EXCHANGE", exchange)
        results[exchange] = run_and_grad(f, _cuda(x), _map(_cuda, hx), cell == "lstm",
                                         [_cuda(u) for u in upstream])
        assert _exchanges() == ((1, 1) if exchange == "async" else (0, 0))
    for name, value in results["async"].items():
        assert torch.equal(value, results["barrier"][name]), name


@pytest.mark.parametrize("cell", list(CELLS))
def test_async_long_sequence(cell, monkeypatch):
    """600 steps, both directions: hundreds of phases of each mbarrier."""
    _knobs(monkeypatch, 2, None)
    T_, N_, C_, H_ = 600, 2, 8, 16
    m, f, m64 = _cuda_pair(cell, C_, H_, bidirectional=True)
    x, hx, upstream = _inputs(cell, 1, True, False, True, torch.float32, T=T_, N=N_, C=C_, H=H_)
    compare_all(*run_cuda(cell, x, hx, m, f, m64, upstream))
    assert _exchanges() == (1, 1)


def test_barrier_is_the_default(monkeypatch):
    monkeypatch.delenv("RNNFAST_CLUSTER_EXCHANGE")
    _knobs(monkeypatch, 2, None)
    f = rnnfast.LSTM(8, 16).cuda()
    x = torch.randn(3, 2, 8, device="cuda", requires_grad=True)
    f(x)[0].sum().backward()
    assert _exchanges() == (0, 0)


def test_unknown_value_is_a_clear_error():
    """RNNFAST_CLUSTER_EXCHANGE=fast: an error naming the values it takes, on the paths
    that may run a persistent variant; the per-step path never reads it."""
    lines = bad_knob_messages("RNNFAST_CLUSTER_EXCHANGE", "fast", "LSTM")
    for path in ("persistent", "auto"):
        assert "RNNFAST_CLUSTER_EXCHANGE is 'fast', expected 'barrier' or 'async'" in lines[path], \
            lines
    assert lines["step"] == "raised nothing", lines
