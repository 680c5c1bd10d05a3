"""The persistent kernels' cluster variant (csrc/cuda/persistent.cuh) across its shapes:
clusters of 1 to 16 blocks (RNNFAST_CLUSTER_SIZE; 16 with H=40 makes clusters of 14, not a
power of two), each taking a share of the batch (RNNFAST_CLUSTER_ROWS: 1 row, so more
clusters than the device runs at once and they take turns; 5 and 17 rows, so several tiles
per cluster and a last cluster with fewer rows; unset, the planner's choice). Every output,
final state and gradient against torch.nn and the float64 reference, as in test_cuda.py,
in float32 and (tensor cores in the forward) bfloat16. Runs on a GPU of compute capability
9.0 or newer (thread-block clusters); test_cuda.py checks the variant's refusal elsewhere.
"""
import pytest
import torch

import rnnfast
from helpers import CELLS, compare_all
from test_cuda import _cuda_pair, _inputs, no_tf32, run_cuda

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
    reason="needs a CUDA GPU with thread-block clusters (compute capability 9.0 or newer)")

SIZES = [1, 2, 8, 16]
ROWS = [None, 1, 5, 17]


@pytest.fixture(autouse=True)
def _cluster_no_tf32():
    with no_tf32("cluster"):
        yield


def _knobs(monkeypatch, size, rows):
    monkeypatch.setenv("RNNFAST_CLUSTER_SIZE", str(size))
    if rows is None:
        monkeypatch.delenv("RNNFAST_CLUSTER_ROWS", raising=False)
    else:
        monkeypatch.setenv("RNNFAST_CLUSTER_ROWS", str(rows))


@pytest.mark.parametrize("rows", ROWS, ids=[f"rows{r}" for r in ROWS])
@pytest.mark.parametrize("size", SIZES, ids=[f"cluster{s}" for s in SIZES])
@pytest.mark.parametrize("cell", list(CELLS))
def test_cluster_shapes_float32(cell, size, rows, monkeypatch):
    _knobs(monkeypatch, size, rows)
    T_, N_, C_, H_ = 4, 19, 8, 40
    m, f, m64 = _cuda_pair(cell, C_, H_, bidirectional=True)
    x, hx, upstream = _inputs(cell, 1, True, False, True, torch.float32, T=T_, N=N_, C=C_, H=H_)
    compare_all(*run_cuda(cell, x, hx, m, f, m64, upstream))
    assert rnnfast.last_cuda_path() == ("cluster", "cluster")


@pytest.mark.parametrize("rows", [None, 5], ids=["rows-auto", "rows5"])
@pytest.mark.parametrize("size", [2, 16], ids=["cluster2", "cluster16"])
@pytest.mark.parametrize("cell", list(CELLS))
def test_cluster_shapes_bfloat16(cell, size, rows, monkeypatch):
    """The tensor-core forward: 16-row tiles, so 5 rows a cluster pad each tile."""
    _knobs(monkeypatch, size, rows)
    T_, N_, C_, H_ = 4, 19, 8, 40
    relu = cell == "rnn_relu"  # off relu's kink: see test_cuda's test_half_matches_...
    m, f, m64 = _cuda_pair(cell, C_, H_, dtype=torch.bfloat16, nonnegative=relu)
    x, hx, upstream = _inputs(cell, 1, False, False, True, torch.bfloat16, T=T_, N=N_, C=C_,
                              H=H_)
    if relu:
        x, hx = x.abs(), hx.abs()
    compare_all(*run_cuda(cell, x, hx, m, f, m64, upstream))
    assert rnnfast.last_cuda_path() == ("cluster", "cluster")


@pytest.mark.parametrize("cell", list(CELLS))
def test_cluster_larger_hidden(cell, monkeypatch):
    """H = 256 with the planner's choice: W_hh spread over the cluster (float32 LSTM: 1 MiB,
    so at least 8 blocks), a few batch rows a cluster."""
    monkeypatch.delenv("RNNFAST_CLUSTER_SIZE", raising=False)
    monkeypatch.delenv("RNNFAST_CLUSTER_ROWS", raising=False)
    T_, N_, C_, H_ = 6, 33, 16, 256
    m, f, m64 = _cuda_pair(cell, C_, H_)
    x, hx, upstream = _inputs(cell, 1, False, False, True, torch.float32, T=T_, N=N_, C=C_, H=H_)
    compare_all(*run_cuda(cell, x, hx, m, f, m64, upstream))
    assert rnnfast.last_cuda_path() == ("cluster", "cluster")


_UNKNOWN_SIZE_CHILD = r"""
import torch
import rnnfast

f = rnnfast.GRU(4, 8).cuda()
with rnnfast.cuda_path("cluster"):
    try:
        f(torch.randn(2, 1, 4, device="cuda"))
    except RuntimeError as e:
        print(str(e).splitlines()[0])
    else:
        print("raised nothing")
"""


def test_unknown_cluster_size_is_a_clear_error():
    """RNNFAST_CLUSTER_SIZE=3 (not 16, 8, 4, 2 or 1), forced: a clear error. In a child
    process, as test_cuda's refusal test (a raise from a forced path once crashed the
    process on the H100, which must fail one test, not end the run)."""
    import os
    import subprocess
    import sys
    env = dict(os.environ, RNNFAST_CLUSTER_SIZE="3")
    child = subprocess.run([sys.executable, "-c", _UNKNOWN_SIZE_CHILD], capture_output=True,
                           text=True, timeout=300, env=env)
    assert child.returncode == 0, child.stderr[-4000:]
    assert "the cluster CUDA path was forced" in child.stdout, child.stdout
    assert "RNNFAST_CLUSTER_SIZE=3 is not one of 16, 8, 4, 2, 1" in child.stdout, child.stdout


_BACKWARD_REFUSAL_CHILD = r"""
import torch
import rnnfast

torch.manual_seed(0)
f = rnnfast.LSTM(4, 401).cuda()
x = torch.randn(2, 1, 4, device="cuda")
with rnnfast.cuda_path("cluster"):
    with torch.no_grad():
        y, _ = f(x)
    print("no_grad", rnnfast.last_cuda_path()[0], bool(torch.isfinite(y).all()))
    try:
        f(x)
    except RuntimeError as e:
        print(str(e).splitlines()[0])
    else:
        print("raised nothing")
"""


def test_forward_refuses_where_only_the_backward_cannot_fit():
    """The float32 LSTM at H=401: the cluster forward fits (178 KiB a block) and its
    backward does not (252 KiB on the H100's 227). Forced, a training forward raises at
    once, saying so, rather than its backward after it; without gradients the forward
    runs on the cluster variant. In a child process, as the refusal test above."""
    import subprocess
    import sys
    child = subprocess.run([sys.executable, "-c", _BACKWARD_REFUSAL_CHILD], capture_output=True,
                           text=True, timeout=300)
    assert child.returncode == 0, child.stderr[-4000:]
    lines = child.stdout.splitlines()
    assert lines[0] == "no_grad cluster True", child.stdout
    assert "rnnfast::lstm_forward: the cluster CUDA path was forced" in lines[1], child.stdout
    assert "its backward cannot run for H=401 (its forward can)" in lines[1], child.stdout
