"""The trace of the persistent kernels' steps (rnnfast._ops._trace_next / _last_trace;
csrc/cuda/persistent.cuh, StepTrace; scripts/trace_persistent.py reads it).

Everywhere: a bad request raises, and a CPU call takes no request. On a GPU, for the grid
variant (the register tile, the tiled forward with one and several row tiles) and the
cluster variant (both exchanges), forward and backward: the trace has the launch's blocks
(the plan's) and min(T, asked) steps, every block's marks (of those that stayed on one SM)
never go back in time within a step nor from one step to the next, nor its arrivals by the
global timer, the clock converts at a plausible rate, and the traced
call's outputs and gradients equal the untraced call's bit for bit (the trace only
records); a request is taken once, by the next persistent launch in its direction only.
"""
import os

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
    marks, sm = trace["marks"], trace["sm"]
    assert trace["blocks"] == blocks and trace["steps"] == steps
    assert marks.shape == (blocks, steps, 7) and marks.dtype == torch.int64
    assert sm.shape == (blocks, steps) and bool((sm >= 0).all())
    assert bool((marks > 0).all()), "a mark was not recorded"
    # the clocks of blocks that stayed on one SM (one preempted and resumed elsewhere,
    # as GPU tests in several processes may make happen, has two SMs' clocks)
    stayed = (sm == sm[:, :1]).all(dim=1)
    assert bool(stayed.any()), "every block changed SM"
    m = marks[stayed]
    assert bool((m[:, :, 1:] >= m[:, :, :-1]).all()), "a mark went back in a step"
    assert bool((m[:, 1:, 0] >= m[:, :-1, -1]).all()), "a step began before the last"
    # clocks of 0.1-10 GHz
    assert 0.1 < trace["ns_per_cycle"] < 10.0, trace["ns_per_cycle"]
    # the arrivals by the global timer: every block's, later at each step
    arrival = trace["arrival_ns"]
    assert arrival.shape == (blocks, steps) and bool((arrival > 0).all())
    assert bool((arrival[:, 1:] >= arrival[:, :-1]).all()), "an arrival went back in time"


# (cell, dtype, T, N, H, path, environment, backward): the register tile and the tiled
# forward; several row tiles (16-row tensor-core tiles at N = 40, pipelined; the float32
# backward's 16-row tiles at N = 20); the cluster variant with both exchanges
CASES = [("lstm", torch.bfloat16, 12, 16, 64, "persistent", {"RNNFAST_REG_TILE": "1"}, False),
         ("lstm", torch.bfloat16, 12, 16, 64, "persistent", {"RNNFAST_REG_TILE": "0"}, False),
         ("lstm", torch.float16, 9, 40, 32, "persistent",
          {"RNNFAST_REG_TILE": "0", "RNNFAST_MMA_ROWS": "16"}, False),
         ("gru", torch.float32, 12, 5, 40, "persistent", {}, False),
         ("rnn", torch.float32, 12, 3, 48, "cluster", {"RNNFAST_CLUSTER_EXCHANGE": "barrier"},
          False),
         ("rnn", torch.float32, 12, 3, 48, "cluster", {"RNNFAST_CLUSTER_EXCHANGE": "async"},
          False),
         ("gru", torch.bfloat16, 7, 2, 64, "cluster", {}, False),
         ("lstm", torch.float32, 10, 4, 32, "persistent", {}, True),
         ("lstm", torch.float32, 8, 20, 32, "persistent", {}, True),
         ("gru", torch.float32, 10, 4, 32, "cluster", {"RNNFAST_CLUSTER_EXCHANGE": "async"},
          True),
         ("rnn", torch.float64, 10, 3, 24, "cluster", {"RNNFAST_CLUSTER_EXCHANGE": "barrier"},
          True)]


def _case_id(c):
    cell, dtype, T, N, H, path, env, backward = c
    knobs = "-".join(f"{k.split('_')[-1].lower()}{v}" for k, v in env.items())
    return (f"{cell}-{str(dtype).replace('torch.', '')}-T{T}-N{N}-H{H}-{path}"
            f"{'-' + knobs if knobs else ''}-{'bwd' if backward else 'fwd'}")


@cuda
@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("asked", [6, 64])
def test_trace_records_and_changes_nothing(case, asked, monkeypatch):
    cell, dtype, T, N, H, path, env, backward = case
    if path == "cluster" and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("the cluster variant needs compute capability 9.0")
    for name in ("RNNFAST_REG_TILE", "RNNFAST_CLUSTER_EXCHANGE", "RNNFAST_MMA_ROWS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    plain = _run(cell, dtype, T, N, H, path, backward)
    _trace_next(asked, backward)
    try:
        traced = _run(cell, dtype, T, N, H, path, backward)
        torch.cuda.synchronize()
        plan = _last_cuda_plan()[1 if backward else 0]
        trace = _last_trace(backward)
        # the request was taken: the next call records nothing new
        _run(cell, dtype, T, N, H, path, backward, seed=1)
        again = _last_trace(backward)
    finally:
        _trace_next(0, backward)
    for a, b in zip(plain, traced):
        assert torch.equal(a, b), "the traced call's results differ"
    if "RNNFAST_REG_TILE" in env:
        assert plan["reg"] == int(env["RNNFAST_REG_TILE"])
    if N >= 20:
        assert plan["nt"] < N, "one row tile: the case is meant to have several"
    assert trace is not None
    _check_marks(trace, plan["blocks"], min(asked, T))
    assert torch.equal(again["marks"], trace["marks"]), "a second launch took the request"


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
    """scripts/trace_persistent.py's phases, step, last arriver's wait, arrivals' spread and
    clock conversion on marks made up here: block b's phases take (1 + b) x 10, 20, ..., 60
    cycles, but its wait 100 - 30 b (block 2 arrived last), at 0.5 ns a cycle, 5 steps, the
    first skipped; block 3 moved to another SM at step 2, so its clocks are left out."""
    script = _load_script()
    blocks, steps = 4, 5
    marks = torch.zeros(blocks, steps, 7, dtype=torch.int64)
    for b in range(blocks):
        t = 1000 * b
        for s in range(steps):
            for m in range(7):
                marks[b, s, m] = t
                if m < 6:
                    t += (100 - 30 * b) if m == 5 else (1 + b) * 10 * (m + 1)
    sm = torch.arange(blocks).view(blocks, 1).repeat(1, steps)
    sm[3, 2:] = 77
    # arrivals by the global timer: block b at 10000 s + 7 b (block 3 last), step 3's
    # block 0 late by 100 (so step 3's spread is 93, not 21)
    arrival = torch.tensor([[10000 * s + 7 * b for s in range(steps)] for b in range(blocks)])
    arrival[0, 3] += 100
    trace = {"blocks": blocks, "steps": steps, "marks": marks, "arrival_ns": arrival,
             "sm": sm, "ns_per_cycle": 0.5}
    out = script.summarize(trace, False, 1)
    assert out["moved_blocks"] == 1
    # medians over blocks 0-2 (each step alike): block 1's phases, (2 x 10 (m + 1)) / 2 ns
    for m, name in enumerate(script.PHASES[False][:5]):
        assert out[name] == pytest.approx(10 * (m + 1))
    assert out["wait"] == pytest.approx(35)  # block 1's 70 cycles
    assert out["last"] == pytest.approx(20)  # block 2's 40 cycles (block 3's 10 left out)
    assert out["step"] == pytest.approx((2 * 10 * 15 + 70) / 2)
    assert out["arrival_spread"] == pytest.approx(21)  # steps 1-4: 21, 21, 93, 21
    assert out["timer_resolution"] == pytest.approx(7)
    # backward names, same arithmetic: its wait is phase 3
    back = script.summarize(trace, True, 1)
    assert back["wait"] == pytest.approx(40) and back["last"] == pytest.approx(20)
    with pytest.raises(ValueError, match="steps"):
        script.summarize(trace, False, steps)
    sm[:, 3] = 99
    with pytest.raises(ValueError, match="every block changed SM"):
        script.summarize(trace, False, 1)


def test_script_runs_every_case_and_leaves_out_async_when_asked(monkeypatch, capsys):
    """scripts/trace_persistent.py's loop with the measurement replaced: every case run (a
    failing one reported, not raised), and --no-async and --no-range (gpu_check, where a
    smoke test failed) leaving out the cases of the async exchange and of the range wait;
    set_knobs' "range" sets the register tile and its range wait."""
    script = _load_script()

    class _Prop:
        name, multi_processor_count = "stand-in", 132

    ran = []

    def fake_run_case(case, args):
        ran.append(case)
        if case[0] == "gru":
            raise RuntimeError("")  # an empty message still reported
        backward = case[4]
        row = {n: 1.0 for n in script.PHASES[backward]}
        row.update(step=6.0, last=1.0, arrival_spread=2.0, timer_resolution=32.0,
                   moved_blocks=0, call_us=1.0, traced_call_us=1.0, blocks=132)
        return row

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: _Prop())
    monkeypatch.setattr(script, "run_case", fake_run_case)
    rows = script.main([])
    assert ran == script.CASES and len(rows) == len(script.CASES)
    assert any("error" in r for r in rows)
    ran.clear()
    script.main(["--no-async"])
    assert ran == [c for c in script.CASES if c[7] != "async"]
    assert any(c[7] == "async" for c in script.CASES)
    ran.clear()
    script.main(["--no-range"])
    assert ran == [c for c in script.CASES if c[6] != "range"]
    assert any(c[6] == "range" for c in script.CASES)
    assert "RuntimeError" in capsys.readouterr().out


def test_script_set_knobs_range(monkeypatch):
    script = _load_script()
    for name in script.KNOBS:
        monkeypatch.delenv(name, raising=False)
    script.set_knobs("range", None)
    assert [os.environ.get(k) for k in script.KNOBS] == ["1", None, "range"]
    script.set_knobs("0", "async")
    assert [os.environ.get(k) for k in script.KNOBS] == ["0", "async", None]
    script.set_knobs(None, None)
    assert all(k not in os.environ for k in script.KNOBS)
