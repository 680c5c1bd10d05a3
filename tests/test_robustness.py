"""Robustness: NaN and Inf propagate as in torch.nn, a 10,000-step sequence forward and
backward against the float64 reference, re-entrancy from two threads, no memory growth
over 1,000 calls, and running out of memory is an exception the process survives."""
import os
import subprocess
import sys
import threading
import textwrap

import pytest
import torch

import rnnfast
from rnnfast import reference
from helpers import CELLS, assert_close_to_ref, make_pair


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_nonfinite_inputs_propagate_as_in_torch(cell, bad, dtype):
    is_lstm = cell == "lstm"
    m, f, _ = make_pair(cell, 4, 6, dtype=dtype, num_layers=2, bidirectional=True)
    x = torch.randn(7, 3, 4, dtype=dtype)
    x[2, 0, 1] = bad  # sequence 0 at step 2; sequences 1 and 2 stay clean
    out_m, st_m = m(x)
    out_f, st_f = f(x)
    for a, b in [(out_f, out_m), *zip(st_f if is_lstm else (st_f,), st_m if is_lstm else (st_m,))]:
        assert torch.equal(torch.isnan(a), torch.isnan(b)), "NaN pattern differs from torch.nn"
        assert torch.equal(torch.isinf(a), torch.isinf(b)), "Inf pattern differs from torch.nn"
        ok = torch.isfinite(b)
        torch.testing.assert_close(a[ok], b[ok], rtol=1e-5, atol=1e-6)
    assert torch.isfinite(out_f[:, 1:]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_closed_forget_gate_times_infinite_state_is_nan_as_in_torch(dtype):
    """A forget gate at sigmoid(-inf) is exactly 0, so 0 * an infinite c0 is NaN, as in
    torch.nn (a clamped exp that left the gate at the smallest normal value gave inf)."""
    H = 6
    m, f, _ = make_pair("lstm", 4, H, dtype=dtype)
    c0 = torch.full((1, 2, H), float("inf"), dtype=dtype)
    c0[:, :, H // 2:] = 1.0
    with torch.no_grad():
        for mod in (m, f):
            mod.bias_ih_l0[H:2 * H] = -float("inf")
    x = torch.randn(3, 2, 4, dtype=dtype)
    h0 = torch.zeros(1, 2, H, dtype=dtype)
    out_m, (h_m, c_m) = m(x, (h0, c0))
    out_f, (h_f, c_f) = f(x, (h0, c0))
    assert torch.isnan(c_m[..., :H // 2]).all()
    for a, b in ((out_f, out_m), (h_f, h_m), (c_f, c_m)):
        assert torch.equal(torch.isnan(a), torch.isnan(b)), "NaN pattern differs from torch.nn"
        assert torch.equal(torch.isinf(a), torch.isinf(b)), "Inf pattern differs from torch.nn"
        ok = torch.isfinite(b)
        torch.testing.assert_close(a[ok], b[ok])


@pytest.mark.parametrize("cell", list(CELLS))
def test_nan_weight_reaches_every_output_as_in_torch(cell):
    m, f, _ = make_pair(cell, 4, 6)
    with torch.no_grad():
        m.weight_hh_l0[0, 0] = float("nan")
        f.weight_hh_l0[0, 0] = float("nan")
    x = torch.randn(5, 2, 4)
    assert torch.equal(torch.isnan(f(x)[0]), torch.isnan(m(x)[0]))


LONG_T = 10_000


@pytest.mark.parametrize("cell", list(CELLS))
def test_ten_thousand_steps_forward_and_backward(cell):
    """T = 10,000 in float32: finite, and within the tolerance rule of the float64
    reference (twice torch.nn's own error plus a few ulps), outputs, states and
    gradients. The kernels loop over steps, so no stack grows with T."""
    is_lstm = cell == "lstm"
    m, f, m64 = make_pair(cell, 8, 8)
    torch.manual_seed(0)
    x = torch.randn(LONG_T, 2, 8)
    results = []
    for mod, fwd, dt in ((f, None, torch.float32), (m, None, torch.float32), (m64, reference.forward, torch.float64)):
        xr = x.to(dt).requires_grad_()
        out, st = (mod(xr) if fwd is None else fwd(mod, xr))
        states = st if is_lstm else (st,)
        loss = out.sum() + sum(s.sum() for s in states)
        grads = torch.autograd.grad(loss, [xr, *mod.parameters()])
        results.append([out.detach(), *[s.detach() for s in states], *grads])
    ours, theirs, ref = results
    assert all(torch.isfinite(t).all() for t in ours)
    for i, (a, b, r) in enumerate(zip(ours, theirs, ref)):
        assert_close_to_ref(f"tensor {i}", a, b, r)


def test_two_threads_at_once_give_the_sequential_results():
    torch.manual_seed(0)
    layers = [rnnfast.LSTM(6, 10, num_layers=2, bidirectional=True), rnnfast.GRU(6, 12),
              rnnfast.RNN(6, 8, nonlinearity="relu")]
    xs = [torch.randn(9, 4, 6) for _ in layers]

    def run(layer, x):
        x = x.clone().requires_grad_()
        out = layer(x)[0]
        grads = torch.autograd.grad(out.square().sum(), [x, *layer.parameters()])
        return [out.detach(), *grads]

    expected = [run(layer, x) for layer, x in zip(layers, xs)]
    got = [[] for _ in layers]
    errors = []

    def worker(i):
        try:
            for _ in range(25):
                got[i].append(run(layers[i], xs[i]))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(layers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and all(not t.is_alive() for t in threads)
    for i, runs in enumerate(got):
        assert len(runs) == 25
        for r in runs:
            assert all(torch.equal(a, b) for a, b in zip(r, expected[i])), f"layer {i} differs"


def _rss():
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmRSS")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the resident size from /proc")
def test_no_memory_growth_over_a_thousand_calls():
    f = rnnfast.LSTM(16, 32, num_layers=2, bidirectional=True)
    x = torch.randn(10, 4, 16)

    def call():
        out = f(x.requires_grad_())[0]
        out.sum().backward()
        f.zero_grad(set_to_none=True)
        x.grad = None
    for _ in range(100):  # warm-up: allocator pools, thread pool, lazy init
        call()
    before = _rss()
    for _ in range(1000):
        call()
    grown = _rss() - before
    assert grown < 8 * 2**20, f"resident memory grew by {grown / 2**20:.1f} MiB over 1000 calls"


def test_out_of_memory_is_an_exception_and_the_process_carries_on():
    """In a child process whose address space is capped 1 GiB above what it uses after
    importing torch: a forward+backward whose output alone needs 2 GiB must raise
    torch's allocation error, and a normal call must work after it."""
    code = textwrap.dedent("""
        import resource, torch, rnnfast
        with open("/proc/self/status") as fh:
            vm = next(int(l.split()[1]) * 1024 for l in fh if l.startswith("VmSize:"))
        resource.setrlimit(resource.RLIMIT_AS, (vm + 2**30, resource.RLIM_INFINITY))
        lstm = rnnfast.LSTM(8, 256)
        x = torch.randn(2048, 1024, 8, requires_grad=True)    # 64 MiB; y would be 2 GiB
        try:
            lstm(x)[0].sum().backward()
        except (RuntimeError, MemoryError) as e:  # torch's CPU allocator raises RuntimeError
            assert "allocate" in str(e) or isinstance(e, MemoryError), str(e)[:300]
            print("raised:", type(e).__name__)
        else:
            raise SystemExit("no error")
        small = rnnfast.LSTM(8, 16)
        out = small(torch.randn(5, 2, 8, requires_grad=True))[0]
        out.sum().backward()
        print("carried on:", tuple(out.shape))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]
    assert "raised:" in r.stdout and "carried on: (5, 2, 16)" in r.stdout
