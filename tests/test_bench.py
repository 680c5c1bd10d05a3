"""The benchmark suite (rnnfast.bench): its timing rules, correctness guard, contenders,
command line and outputs. Speed itself is measured by the benchmark, not here."""
import dataclasses
import json
import os
import sys
import types

import pytest
import torch

import rnnfast
import rnnfast.functional as RF
from rnnfast.bench import contenders as C
from rnnfast.bench import runner
from rnnfast.bench.shapes import SETS, SHAPES, Shape
from rnnfast.bench.timing import time_interleaved

TINY = Shape("tiny", 5, 3, 6, 8, layers=2, bidirectional=True)
FAST_TIMING = {"repeats": 2, "min_time": 0.0, "warmup": 1, "loop_runs": None}


def test_sets_name_registered_shapes():
    for name, members in SETS.items():
        assert members, name
        assert all(m in SHAPES for m in members), name
    # the shapes the issues name
    assert (SHAPES["classic"].T, SHAPES["classic"].N, SHAPES["classic"].H) == (100, 64, 512)
    assert {s.N for s in map(SHAPES.get, SETS["issue7"])} == {1, 16, 64, 256}
    assert {s.H for s in map(SHAPES.get, SETS["issue7"])} == {256, 768, 1024}
    full = [SHAPES[n] for n in SETS["full"]]
    assert {s.H for s in full} >= {128, 256, 512, 1024}
    assert any(s.T >= 1024 for s in full) and any(s.N == 1 for s in full)
    assert any(s.layers == 2 for s in full) and any(s.bidirectional for s in full)


def _fake_clock(durations):
    """measure() that returns each fn's fixed duration instead of timing it."""
    def measure(fn):
        fn()
        return durations[fn.__name__]
    return measure


def _named(name, calls, fail=False):
    def fn():
        calls[name] = calls.get(name, 0) + 1
        if fail:
            raise RuntimeError("boom")
    fn.__name__ = name
    return fn


def test_time_interleaved_run_counts_and_errors():
    calls = {}
    fns = {n: _named(n, calls) for n in ("fast", "slow", "capped")}
    fns["broken"] = _named("broken", calls, fail=True)
    durations = {"fast": 0.125, "slow": 4.0, "capped": 0.125, "broken": 0.5}  # exact in binary
    out, errors = time_interleaved(fns, repeats=3, min_time=1.0, measure=_fake_clock(durations),
                                   warmup=1, max_runs={"capped": 4})
    assert out["slow"][2] == 3                       # repeats reached, min_time passed
    assert out["fast"][2] == 8                       # ran until 1 s of runs
    assert out["capped"][2] == 4                     # max_runs caps it
    assert out["fast"][0] == 0.125 and out["fast"][1] == 0.0
    assert "broken" not in out and "RuntimeError: boom" in errors["broken"]
    assert calls["broken"] == 1                      # dropped at its first failure


def test_time_interleaved_varies_the_order():
    """Each round runs every contender once, in an order of its own (seeded, so two runs
    give the same orders): no contender always follows the same other one."""
    def orders():
        order = []
        fns = {n: (lambda n=n: order.append(n)) for n in ("a", "b", "c", "d")}
        time_interleaved(fns, repeats=20, min_time=0.0, measure=lambda fn: fn() or 0.5, warmup=0)
        return [order[i:i + 4] for i in range(0, len(order), 4)]
    rounds = orders()
    assert len(rounds) == 20 and all(sorted(r) == ["a", "b", "c", "d"] for r in rounds)
    assert rounds == orders()
    for n in "abcd":
        before = {r[r.index(n) - 1] for r in rounds if r.index(n) > 0}
        assert len(before) >= 2, n


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
def test_bench_case_times_every_contender(cell, mode):
    names = ["rnnfast", "torch.nn", "reference loop"]
    rec = runner.bench_case(cell, TINY, mode, torch.float32, "cpu", names, FAST_TIMING)
    assert (rec["T"], rec["N"], rec["layers"], rec["D"]) == (5, 3, 2, 2)
    for n in names:
        r = rec["results"][n]
        assert "error" not in r and "skipped" not in r, (n, r)
        assert r["runs"] >= 2 and r["median_s"] > 0 and r["steps_per_s"] > 0
        assert r["rnnfast_speedup"] == pytest.approx(r["median_s"] / rec["results"]["rnnfast"]["median_s"])
        assert r["guard_max_abs_diff"] <= 1e-4
    assert rec["results"]["rnnfast"]["guard_max_abs_diff"] == 0.0


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
def test_packed_shape_runs_the_modules_on_a_packed_sequence(mode, monkeypatch):
    """A packed shape's input is a PackedSequence of its own lengths: rnnfast and torch.nn
    are timed on it (their outputs agree), the loops are skipped with the reason, and the
    record counts the rows actually run."""
    shape = Shape("tiny-packed", 6, 4, 5, 7, layers=2, bidirectional=True, packed=True)
    lengths = shape.lengths
    assert max(lengths) == lengths[0] == 6 and min(lengths) >= 1 and len(lengths) == 4
    assert lengths == shape.lengths  # seeded by the shape
    seen = []
    forward = rnnfast.GRU.forward
    monkeypatch.setattr(rnnfast.GRU, "forward",
                        lambda self, x, hx=None: seen.append(type(x).__name__) or forward(self, x, hx))
    segments = []
    direction = RF._packed_direction
    monkeypatch.setattr(RF, "_packed_direction", lambda *a, **k: segments.append(1) or direction(*a, **k))
    names = ["rnnfast", "rnnfast segments", "torch.nn", "reference loop", "compiled loop"]
    rec = runner.bench_case("gru", shape, mode, torch.float32, "cpu", names, FAST_TIMING)
    assert rec["packed"] and rec["rows"] == sum(lengths) < shape.T * shape.N
    assert set(seen) == {"PackedSequence"}
    assert segments and RF.PACKED_OPS  # the segments contender ran them, and restored the switch
    for n in ("rnnfast", "rnnfast segments", "torch.nn"):
        r = rec["results"][n]
        assert "error" not in r and "skipped" not in r, (n, r)
        assert r["guard_max_abs_diff"] <= 1e-4
        assert r["steps_per_s"] == pytest.approx(rec["rows"] / r["median_s"])
    for n in ("reference loop", "compiled loop"):
        assert rec["results"][n] == {"skipped": f"{n} takes no PackedSequence"}


def test_segments_contender_only_where_it_differs():
    shape = Shape("dense", 4, 2, 5, 7)
    ref = C.make_torch_module("gru", shape, torch.float32, "cpu")
    with pytest.raises(C.Unavailable, match="only on packed shapes"):
        C.build("rnnfast segments", ref, "gru", shape, "fwd")
    assert C.unavailable_here("rnnfast segments", "cpu") is None


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
def test_compiled_loop_contender_agrees(mode):
    shape = Shape("tiny1", 4, 2, 5, 7)
    rec = runner.bench_case("gru", shape, mode, torch.float32, "cpu", ["rnnfast", "compiled loop"], FAST_TIMING)
    r = rec["results"]["compiled loop"]
    assert "median_s" in r, r
    assert r["guard_max_abs_diff"] <= 1e-4


def test_guard_reports_wrong_raising_and_unavailable_contenders(monkeypatch):
    def wrong(ref, cell, shape, mode):
        m, fn = C._torch_nn(ref, cell, shape, mode)
        return m, lambda x, hx: (fn(x, hx)[0] + 1e-2, None)

    def raising(ref, cell, shape, mode):
        def fn(x, hx):
            raise ValueError("no such kernel")
        return ref, fn

    def unavailable(ref, cell, shape, mode):
        raise C.Unavailable("not on this machine")

    for name, b in (("wrong", wrong), ("raising", raising), ("unavailable", unavailable)):
        monkeypatch.setitem(C.BUILDERS, name, b)
    names = ["rnnfast", "torch.nn", "wrong", "raising", "unavailable"]
    rec = runner.bench_case("lstm", TINY, "fwd", torch.float32, "cpu", names, FAST_TIMING)
    res = rec["results"]
    assert "median_s" in res["torch.nn"]
    assert "disagrees with rnnfast" in res["wrong"]["error"] and "median_s" not in res["wrong"]
    assert "ValueError: no such kernel" in res["raising"]["error"]
    assert res["unavailable"] == {"skipped": "not on this machine"}


def test_knob_contenders_set_their_knobs_and_the_case_restores_them(monkeypatch):
    """A contender built with knobs sets them on each call, the others put back what was
    set when they were built; after the case the environment is as before it."""
    monkeypatch.setenv("RNNFAST_MMA_ROWS", "32")
    monkeypatch.delenv("RNNFAST_STEP_GEMM", raising=False)
    monkeypatch.setenv("RNNFAST_REG_TILE", "0")
    monkeypatch.delenv("RNNFAST_CLUSTER_EXCHANGE", raising=False)
    monkeypatch.setenv("RNNFAST_STEP_FUSED", "0")
    monkeypatch.delenv("RNNFAST_STEP_GRAPH", raising=False)
    seen = {}

    def watch(name):
        def build(ref, cell, shape, mode):
            m, fn = C._torch_nn(ref, cell, shape, mode)
            inner = C._rnnfast_on(None, name, **kwargs[name])(ref, cell, shape, mode)[1]

            def call(x, hx):
                inner(x, hx)
                seen[name] = {k: os.environ.get(k) for k in C.KNOBS}
                return fn(x, hx)
            return m, call
        return build
    kwargs = {"plain": {}, "knobbed": {"mma_rows": 64, "step_gemm": "aten", "reg_tile": 1,
                                       "exchange": "async", "step_fused": 1,
                                       "step_graph": 1}}
    monkeypatch.setattr(C, "check_knobs_apply", lambda *args: None)  # float32 on the CPU
    for name in kwargs:
        monkeypatch.setitem(C.BUILDERS, name, watch(name))
    rec = runner.bench_case("gru", TINY, "fwd", torch.float32, "cpu",
                            ["rnnfast", "plain", "knobbed"], FAST_TIMING)
    assert "median_s" in rec["results"]["knobbed"], rec["results"]
    assert seen["plain"] == {"RNNFAST_MMA_ROWS": "32", "RNNFAST_STEP_GEMM": None,
                             "RNNFAST_REG_TILE": "0", "RNNFAST_CLUSTER_EXCHANGE": None,
                             "RNNFAST_STEP_FUSED": "0", "RNNFAST_STEP_GRAPH": None}
    assert seen["knobbed"] == {"RNNFAST_MMA_ROWS": "64", "RNNFAST_STEP_GEMM": "aten",
                               "RNNFAST_REG_TILE": "1", "RNNFAST_CLUSTER_EXCHANGE": "async",
                               "RNNFAST_STEP_FUSED": "1", "RNNFAST_STEP_GRAPH": "1"}
    assert os.environ.get("RNNFAST_MMA_ROWS") == "32" and "RNNFAST_STEP_GEMM" not in os.environ
    assert os.environ.get("RNNFAST_REG_TILE") == "0"
    assert "RNNFAST_CLUSTER_EXCHANGE" not in os.environ
    assert os.environ.get("RNNFAST_STEP_FUSED") == "0"
    assert "RNNFAST_STEP_GRAPH" not in os.environ


def test_knob_contenders_say_where_they_do_not_apply():
    ref = C.make_torch_module("lstm", TINY, torch.float32, "cpu", 0)
    with pytest.raises(C.Unavailable, match="routes only float16/bfloat16"):
        C._rnnfast_on(None, "x", step_gemm="aten")(ref, "lstm", TINY, "fwd")
    with pytest.raises(C.Unavailable, match="tensor-core"):
        C._rnnfast_on(None, "x", mma_rows=64)(ref, "lstm", TINY, "fwd")
    with pytest.raises(C.Unavailable, match="register tile is the tensor-core"):
        C._rnnfast_on(None, "x", reg_tile=1)(ref, "lstm", TINY, "fwd")
    half = C.make_torch_module("lstm", TINY, torch.bfloat16, "cpu", 0)
    wide = dataclasses.replace(TINY, N=17)
    with pytest.raises(C.Unavailable, match="at most 16 batch rows, N=17"):
        C._rnnfast_on(None, "x", reg_tile=1)(half, "lstm", wide, "fwd")
    assert "CUDA only" in C.unavailable_here("rnnfast reg", "cpu")
    assert "CUDA only" in C.unavailable_here("rnnfast step aten", "cpu")
    assert "CUDA only" in C.unavailable_here("rnnfast async", "cpu")
    with pytest.raises(C.Unavailable, match="CUDA"):
        C.build("rnnfast async", ref, "lstm", TINY, "fwd")
    with pytest.raises(C.Unavailable, match="fused step is the tensor-core"):
        C._rnnfast_on(None, "x", step_fused=1)(ref, "lstm", TINY, "fwd")
    odd = dataclasses.replace(TINY, H=12)
    with pytest.raises(C.Unavailable, match="needs H % 8 == 0, H=12"):
        C._rnnfast_on(None, "x", step_fused=1)(half, "lstm", odd, "fwd")
    assert "CUDA only" in C.unavailable_here("rnnfast step fused", "cpu")
    with pytest.raises(C.Unavailable, match="step graph is for float16/bfloat16"):
        C._rnnfast_on(None, "x", step_graph=1)(ref, "lstm", TINY, "fwd")
    assert "CUDA only" in C.unavailable_here("rnnfast step graph", "cpu")


def test_gpu_peers_are_skipped_with_a_reason_on_cpu():
    for name in ("flashrnn", "haste"):
        assert "CUDA only" in C.unavailable_here(name, "cpu")
    assert C.unavailable_here("compiled loop", "cpu") is None


def _fake_flashrnn(Wx, R, b, states=None, function="lstm", backend="cuda_fused", dtype="bfloat16"):
    """FlashRNN's documented semantics in plain PyTorch (its `vanilla` backend's
    equations), to check the adapter's weight conversion without a GPU: Wx [B, T, G, 1, H],
    R [G, 1, H_in, H_out], b [Gb, 1, H], states [S, B, 1, 1, H] -> ([S, B, T, 1, H], last)."""
    B, T = Wx.shape[:2]
    s = [st.reshape(B, -1) for st in states]
    Rg = R[:, 0]
    outs = []
    for t in range(T):
        x = Wx[:, t, :, 0]
        Ry = torch.stack([s[0] @ Rg[g] for g in range(Rg.shape[0])], dim=1)
        bb = b[:, 0]
        if function == "lstm":
            i, f, z, o = (x + Ry + bb).unbind(1)
            c = torch.sigmoid(f) * s[1] + torch.sigmoid(i) * torch.tanh(z)
            s = [torch.sigmoid(o) * torch.tanh(c), c]
        elif function == "gru":
            g = Ry[:, 0] + bb[0]
            r = torch.sigmoid(x[:, 0] + Ry[:, 1] + bb[1])
            zz = torch.sigmoid(x[:, 1] + Ry[:, 2] + bb[2])
            s = [zz * s[0] + (1 - zz) * torch.tanh(x[:, 2] + bb[3] + r * g)]
        else:
            s = [torch.tanh(x[:, 0] + Ry[:, 0] + bb[0])]
        outs.append(torch.stack(s))
    out = torch.stack(outs, dim=2).unsqueeze(3)
    return out, out[:, :, -1:]


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_flashrnn_adapter_converts_torch_weights(cell, monkeypatch):
    monkeypatch.setitem(sys.modules, "flashrnn", types.SimpleNamespace(flashrnn=_fake_flashrnn))
    shape = Shape("f", 6, 3, 5, 4)
    ref = C.make_torch_module(cell, shape, torch.float64, "cpu")
    with torch.no_grad():
        for p in ref.parameters():
            p.uniform_(-0.8, 0.8)
    monkeypatch.setattr(C, "_FLASHRNN_DTYPES", {torch.float64: "float64"})
    layer = C.FlashRNNLayer(ref, cell)
    x = torch.randn(6, 3, 5, dtype=torch.float64)
    h0 = torch.randn(1, 3, 4, dtype=torch.float64)
    hx = (h0, torch.randn_like(h0)) if cell == "lstm" else h0
    expected = ref(x, hx)[0]
    got = layer(x, hx)[0]
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_main_writes_table_json_and_png(tmp_path, capsys):
    out = tmp_path / "r.json"
    runner.main(["--shapes", "quick-n1-h256", "--cells", "rnn", "gru", "--modes", "fwd", "--contenders",
                 "rnnfast", "torch.nn", "--repeats", "1", "--min-time", "0", "--json", str(out), "--markdown"])
    printed = capsys.readouterr().out
    assert "vs torch.nn" in printed and "rnnfast steps/s" in printed and "| cell | mode |" in printed
    payload = json.loads(out.read_text())
    assert payload["machine"]["device"] == "cpu" and payload["machine"]["cpu_threads"] >= 1
    assert [r["cell"] for r in payload["records"]] == ["rnn", "gru"]
    assert all("median_s" in r["results"]["torch.nn"] for r in payload["records"])
    assert payload["summary"]["float32 fwd vs torch.nn"]["cases"] == 2
    png = out.with_suffix(".png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_filters_and_bad_arguments(capsys):
    _, args = runner.parse_args(["--quick", "--hidden", "128", "512"])
    assert {s.H for s in runner.select_shapes(args)} == {128, 512}
    _, args = runner.parse_args(["--set", "full", "--batch", "1", "--layers", "1"])
    assert all(s.N == 1 and s.layers == 1 for s in runner.select_shapes(args))
    with pytest.raises(SystemExit):
        runner.main(["--hidden", "3"])  # nothing left


def test_cpu_half_precision_case(tmp_path, capsys):
    """bfloat16 on the CPU: a row of its own, both contenders timed and checked."""
    out = tmp_path / "r.json"
    runner.main(["--shapes", "quick-n1-h256", "--cells", "lstm", "--modes", "fwdbwd", "--dtypes",
                 "bfloat16", "--contenders", "rnnfast", "torch.nn", "--repeats", "1", "--min-time",
                 "0", "--json", str(out)])
    (record,) = json.loads(out.read_text())["records"]
    assert record["dtype"] == "bfloat16"
    assert all("median_s" in record["results"][c] for c in ("rnnfast", "torch.nn")), record
    assert "bfloat16" in capsys.readouterr().out


def test_module_entry_point():
    import subprocess
    r = subprocess.run([sys.executable, "-m", "rnnfast.bench", "--help"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "--quick" in r.stdout and "classic" in r.stdout
