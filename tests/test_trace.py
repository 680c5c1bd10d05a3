"""The trace of the persistent kernels' steps (rnnfast._ops._trace_next / _last_trace;
csrc/cuda/persistent.cuh, StepTrace; scripts/trace_persistent.py reads it).

Everywhere: a bad request raises, and a CPU call takes no request. On a GPU, for the grid
variant (the register tile, the tiled forward with one and several row tiles) and the
cluster variant (both exchanges), forward and backward: the trace has the launch's blocks
(the plan's) and min(T, asked) steps, every block's marks never go back in time within a
step nor from one step to the next, the clock converts at a plausible rate, and the traced
call's outputs and gradients equal the untraced call's bit for bit (the trace only
records); a request is taken once, by the next persistent launch in its direction only.
"""
import pytest
import torch

import rnnfast
from rnnfast._ops import _last_cuda_plan, _last_trace, _trace_next

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
MODULES = {"lstm": rnnfast.LSTM, "gru": rnnfast.GRU, "rnn": rnnfast.RNN}


@pytest.mark.parametrize("steps, error", [(-1, ValueError), (2 ** 21, ValueError),
                                          (1.5, TypeError), (True, TypeError),
                                          ("4", TypeError)])
def test_bad_request_raises(steps, error):
    with pytest.raises(error, match="steps"):
        _trace_next(steps)


def test_cpu_call_takes_no_request():
    before = _last_trace()
    _trace_next(4)
    try:
        layer = rnnfast.LSTM(8, 8)
        layer(torch.randn(5, 2, 8))
        after = _last_trace()
        if before is None:
            assert after is None
        else:
            assert torch.equal(after["marks"], before["marks"])
    finally:
        _trace_next(0)


def _run(cell, dtype, T, N, H, path, backward, seed=0):
    """One call (forward under no_grad, or forward + backward) on fixed values: outputs and
    gradients."""
    torch.manual_seed(seed)
    layer = MODULES[cell](H, H).to("cuda", dtype)
    x = torch.randn(T, N, H, device="cuda", dtype=dtype, requires_grad=backward)
    with rnnfast.cuda_path(path):
        if not backward:
            with torch.no_grad():
                out = layer(x)
            return [out[0]] + list(out[1] if isinstance(out[1], tuple) else [out[1]])
        y, _ = layer(x)
        y.float().square().sum().backward()
    return [y, x.grad] + [p.grad for p in layer.parameters()]


def _check_marks(trace, blocks, steps):
    marks = trace["marks"]
    assert trace["blocks"] == blocks and trace["steps"] == steps
    assert marks.shape == (blocks, steps, 7) and marks.dtype == torch.int64
    assert bool((marks > 0).all()), "a mark was not recorded"
    assert bool((marks[:, :, 1:] >= marks[:, :, :-1]).all()), "a mark went back in a step"
    assert bool((marks[:, 1:, 0] >= marks[:, :-1, -1]).all()), "a step began before the last"
    # clocks of 0.5-5 GHz
    assert 0.2 < trace["ns_per_cycle"] < 2.0, trace["ns_per_cycle"]


# (cell, dtype, T, N, H, path, RNNFAST_REG_TILE, RNNFAST_CLUSTER_EXCHANGE, backward)
CASES = [("lstm", torch.bfloat16, 12, 16, 64, "persistent", "1", None, False),
         ("lstm", torch.bfloat16, 12, 16, 64, "persistent", "0", None, False),
         ("lstm", torch.float16, 9, 40, 32, "persistent", "0", None, False),
         ("gru", torch.float32, 12, 5, 40, "persistent", None, None, False),
         ("rnn", torch.float32, 12, 3, 48, "cluster", None, "barrier", False),
         ("rnn", torch.float32, 12, 3, 48, "cluster", None, "async", False),
         ("gru", torch.bfloat16, 7, 2, 64, "cluster", None, None, False),
         ("lstm", torch.float32, 10, 4, 32, "persistent", None, None, True),
         ("gru", torch.float32, 10, 4, 32, "cluster", None, "async", True),
         ("rnn", torch.float64, 10, 3, 24, "cluster", None, "barrier", True)]


@cuda
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(
    str(v).replace("torch.", "") for v in c))
@pytest.mark.parametrize("asked", [6, 64])
def test_trace_records_and_changes_nothing(case, asked, monkeypatch):
    cell, dtype, T, N, H, path, reg, exchange, backward = case
    for name, value in (("RNNFAST_REG_TILE", reg), ("RNNFAST_CLUSTER_EXCHANGE", exchange)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    plain = _run(cell, dtype, T, N, H, path, backward)
    _trace_next(asked, backward)
    try:
        traced = _run(cell, dtype, T, N, H, path, backward)
    finally:
        _trace_next(0, backward)
    torch.cuda.synchronize()
    for a, b in zip(plain, traced):
        assert torch.equal(a, b), "the traced call's results differ"
    plan = _last_cuda_plan()[1 if backward else 0]
    if reg is not None:
        assert plan["reg"] == int(reg) or N > 16
    trace = _last_trace(backward)
    assert trace is not None
    _check_marks(trace, plan["blocks"], min(asked, T))
    # the request was taken: the next call records nothing new
    _run(cell, dtype, T, N, H, path, backward, seed=1)
    assert torch.equal(_last_trace(backward)["marks"], trace["marks"])


@cuda
def test_request_is_the_named_directions_only():
    """A forward request is not taken by a backward launch, and the per-step path takes none."""
    def same(a, b):
        return a is None and b is None or (
            a is not None and b is not None and torch.equal(a["marks"], b["marks"]))

    _trace_next(0, True)
    before = _last_trace(False), _last_trace(True)
    _trace_next(5, False)
    try:
        _run("lstm", torch.float32, 6, 2, 16, "step", False)
        assert same(_last_trace(False), before[0]), "the per-step path took the request"
        _run("lstm", torch.float32, 6, 2, 16, "persistent", True)
        forward = _last_trace(False)
        assert forward is not None and forward["steps"] == 5
        assert not same(forward, before[0]), "the persistent forward took no request"
        assert same(_last_trace(True), before[1]), "the backward took the forward's request"
    finally:
        _trace_next(0, False)


def _load_script():
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts",
                        "trace_persistent.py")
    spec = importlib.util.spec_from_file_location("trace_persistent", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_summary_of_a_made_up_trace():
    """scripts/trace_persistent.py's phases, step, last arriver's wait and clock conversion
    on marks made up here: block b's phases take (1 + b) x 10, 20, ..., 60 cycles, but its
    wait 100 - 30 b (block 2 arrived last), at 0.5 ns a cycle, 5 steps, the first skipped."""
    script = _load_script()
    blocks, steps = 3, 5
    marks = torch.zeros(blocks, steps, 7, dtype=torch.int64)
    for b in range(blocks):
        t = 1000 * b
        for s in range(steps):
            for m in range(7):
                marks[b, s, m] = t
                if m < 6:
                    t += (100 - 30 * b) if m == 5 else (1 + b) * 10 * (m + 1)
    trace = {"blocks": blocks, "steps": steps, "marks": marks, "ns_per_cycle": 0.5}
    out = script.summarize(trace, False, 1)
    # medians over the blocks (each step alike): block 1's phases, (2 x 10 (m + 1)) / 2 ns
    for m, name in enumerate(script.PHASES[False][:5]):
        assert out[name] == pytest.approx(10 * (m + 1))
    assert out["wait"] == pytest.approx(35)  # block 1's 70 cycles
    assert out["last"] == pytest.approx(20)  # block 2's 40 cycles
    assert out["step"] == pytest.approx((2 * 10 * 15 + 70) / 2)
    # backward names, same arithmetic: its wait is phase 3
    back = script.summarize(trace, True, 1)
    assert back["wait"] == pytest.approx(40) and back["last"] == pytest.approx(20)
    with pytest.raises(ValueError, match="steps"):
        script.summarize(trace, False, steps)
