"""scripts/calibrate_persistent.py without a GPU: its loop over cases, knobs and tiles,
its table and its JSON (written after every case), with the measurement replaced by a
stand-in that records which knobs each call saw. The real measurement needs a GPU
(gpu_check's calib stage)."""
import importlib.util
import json
import os

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load():
    path = os.path.join(ROOT, "scripts", "calibrate_persistent.py")
    spec = importlib.util.spec_from_file_location("calibrate_persistent", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Prop:
    name, multi_processor_count = "stand-in", 132


class _StandIn(torch.nn.Module):
    """A stand-in for a recurrent module: built from any sizes, moved nowhere."""

    def __init__(self, *a):
        super().__init__()

    def to(self, *a, **k):
        return self


def _stand_in_modules(cal, monkeypatch, cells, module=_StandIn):
    """calibrate_persistent's modules and torch.randn replaced by CPU stand-ins."""
    for cell in cells:
        monkeypatch.setitem(cal.MODULES, cell, module)
    real_randn = torch.randn
    monkeypatch.setattr(torch, "randn", lambda *a, **k: real_randn(*a[:3]))


def test_every_case_knob_and_tile_is_measured_and_saved(tmp_path, monkeypatch, capsys):
    cal = _load()
    seen = []

    def fake_measure(cell, dtype, N, H, T, path, knob, mode, repeats, mma_rows=None,
                     step_gemm=None, reg_tile=None, exchange=None, reg_wait=None):
        seen.append((cell, str(dtype), N, H, path, knob, mode, mma_rows, step_gemm, reg_tile,
                     exchange, reg_wait))
        plan = {"us": 1.0, "blocks": 132, "reg": reg_tile or 0,
                "async": int(exchange == "async")}
        return 2.0, (path, path), (plan, plan if mode == "fwdbwd" else None)

    monkeypatch.setattr(cal, "measure", fake_measure)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: _Prop())
    out = tmp_path / "calib.json"
    rows = cal.main(["--cells", "lstm", "--batch", "16", "--hidden", "768", "--json", str(out),
                     "--overhead-seq-lens"])
    # per mode and dtype: persistent at all blocks and <= 64, cluster at the planner's size
    # and 16, 8, 4, and the per-step path; then bfloat16 only: its forward at N = 16 with H
    # = 768 and 1024, tiled and on the register tile; at N = 64 and 256: the tensor-core
    # tiles of 16, 32 and 64 rows and the per-step path, direct, through ATen, fused and as a
    # CUDA graph
    main_rows = 2 * (2 + 4 + 1) * 2  # 2 modes, 2 dtypes
    reg_rows = 2 * 4
    # then the cluster variant with each exchange, per mode and dtype
    exchange_rows = 2 * 2 * 2
    assert len(rows) == main_rows + reg_rows + exchange_rows + 2 * 2 * (3 + 4)
    assert len(seen) == len(rows)
    assert [r["dtype"] for r in rows[:14]] == ["bfloat16"] * 14  # bfloat16 first
    assert all("exchange" not in r for r in rows)
    for dtype in ("bfloat16", "float32"):
        for mode in ("fwd", "fwdbwd"):
            rs = [r for r in rows[:main_rows] if (r["dtype"], r["mode"]) == (dtype, mode)]
            assert sorted(r["max_blocks"] for r in rs if r["path"] == "persistent") == [0, 64]
            assert sorted(r["cluster_size"] for r in rs if r["path"] == "cluster") == [
                0, 4, 8, 16]
            assert [r["max_blocks"] for r in rs if r["path"] == "step"] == [0]
    # the knob each measurement was given is the one its row records
    assert {(s[4], s[5]) for s in seen[:main_rows]} == {
        ("persistent", 0), ("persistent", 64), ("cluster", 0), ("cluster", 16),
        ("cluster", 8), ("cluster", 4), ("step", 0)}
    assert all(s[7] is None and s[8] is None for s in seen if s[2] == 16)
    reg = rows[main_rows:main_rows + reg_rows]
    # tiled, the register tile with every block and with the fewest (LSTM: 8 units a block),
    # and with every block and the range wait
    assert sorted((r["H"], r["reg_tile"], r["max_blocks"], r.get("reg_wait", "grid"))
                  for r in reg) == [
        (768, 0, 0, "grid"), (768, 1, 0, "grid"), (768, 1, 0, "range"), (768, 1, 96, "grid"),
        (1024, 0, 0, "grid"), (1024, 1, 0, "grid"), (1024, 1, 0, "range"),
        (1024, 1, 128, "grid")]
    assert all((r["dtype"], r["N"], r["mode"], r["path"]) == ("bfloat16", 16, "fwd", "persistent")
               for r in reg)
    assert all(r["reg_tile"] == r["plan_fwd"]["reg"] for r in reg)
    assert all(s[9] is None for s in seen[:main_rows] + seen[main_rows + reg_rows:])
    assert [s[5] for s in seen[main_rows:main_rows + reg_rows]] == [0, 0, 96, 0, 0, 0, 128, 0]
    assert [s[11] for s in seen[main_rows:main_rows + reg_rows]] == [None, None, None,
                                                                     "range"] * 2
    assert all(s[11] is None for s in seen[:main_rows] + seen[main_rows + reg_rows:])
    exch = rows[main_rows + reg_rows:main_rows + reg_rows + exchange_rows]
    # the cluster variant at the planner's size with each exchange, at every main case
    assert sorted((r["dtype"], r["mode"], r["cluster_exchange"]) for r in exch) == sorted(
        (d, m, e) for d in ("bfloat16", "float32") for m in ("fwd", "fwdbwd")
        for e in ("barrier", "async"))
    assert all(r["path"] == "cluster" and "cluster_size" not in r for r in exch)
    assert [s[10] for s in seen[main_rows + reg_rows:main_rows + reg_rows + exchange_rows]] == [
        "barrier", "async"] * 4
    assert all(s[10] is None for s in seen[:main_rows + reg_rows])
    assert all(s[10] is None for s in seen[main_rows + reg_rows + exchange_rows:])
    mma = rows[main_rows + reg_rows + exchange_rows:]
    assert {(r["dtype"], r["N"], r["mma_rows"], r["path"], r.get("step_gemm")) for r in mma} == {
        ("bfloat16", n, r, "persistent", None) for n in (64, 256) for r in (16, 32, 64)} | {
        ("bfloat16", n, None, "step", g) for n in (64, 256)
        for g in ("cublas", "aten", "fused", "graph")}
    assert {(s[7], s[8]) for s in seen if s[2] in (64, 256)} == {
        (16, None), (32, None), (64, None), (None, "cublas"), (None, "aten"), (None, "fused"),
        (None, "graph")}
    saved = json.loads(out.read_text())
    assert saved["rows"] == json.loads(json.dumps(rows)) and saved["sms"] == 132
    fwdbwd = [r for r in rows if r["mode"] == "fwdbwd"]
    assert all(r["plan_bwd"] is not None for r in fwdbwd)
    assert all(r["plan_bwd"] is None for r in rows if r["mode"] == "fwd")
    printed = capsys.readouterr().out
    assert "lstm  bfloat16" in printed and "tensor-core tile" in printed
    assert "register" in printed


def test_measure_sets_and_clears_the_knobs(monkeypatch):
    """measure() sets the block cap and the tensor-core tile for its call only, clearing a
    stale value before and every knob after (the module, the inputs and the timing are
    stand-ins here)."""
    cal = _load()
    monkeypatch.setenv("RNNFAST_CLUSTER_SIZE", "stale")
    seen = {}

    def fake_time(fn, T, repeats, warmup=2):
        seen.update({k: os.environ.get(k) for k in cal.KNOBS})
        return 3.0

    monkeypatch.setattr(cal, "time_per_step", fake_time)
    monkeypatch.setattr(cal, "_last_cuda_plan", lambda: ({"us": 1.0}, None))

    _stand_in_modules(cal, monkeypatch, ["lstm"])
    us, used, plans = cal.measure("lstm", torch.float32, 2, 8, 4, "persistent", 64, "fwd", 1,
                                  mma_rows=32)
    assert us == 3.0 and plans == ({"us": 1.0}, None)
    assert seen == {"RNNFAST_PERSISTENT_MAX_BLOCKS": "64", "RNNFAST_CLUSTER_SIZE": None,
                    "RNNFAST_MMA_ROWS": "32", "RNNFAST_STEP_GEMM": None,
                    "RNNFAST_REG_TILE": None, "RNNFAST_CLUSTER_EXCHANGE": None,
                    "RNNFAST_STEP_FUSED": None, "RNNFAST_STEP_GRAPH": None, "RNNFAST_REG_WAIT": None}
    assert all(k not in os.environ for k in cal.KNOBS)
    # the cluster variant: its size knob, and no tile
    monkeypatch.setenv("RNNFAST_MMA_ROWS", "stale")
    cal.measure("lstm", torch.float32, 2, 8, 4, "cluster", 8, "fwd", 1)
    assert seen == {"RNNFAST_PERSISTENT_MAX_BLOCKS": None, "RNNFAST_CLUSTER_SIZE": "8",
                    "RNNFAST_MMA_ROWS": None, "RNNFAST_STEP_GEMM": None,
                    "RNNFAST_REG_TILE": None, "RNNFAST_CLUSTER_EXCHANGE": None,
                    "RNNFAST_STEP_FUSED": None, "RNNFAST_STEP_GRAPH": None, "RNNFAST_REG_WAIT": None}
    assert all(k not in os.environ for k in cal.KNOBS)
    # the per-step path through ATen
    cal.measure("lstm", torch.float32, 2, 8, 4, "step", 0, "fwd", 1, step_gemm="aten")
    assert seen == {"RNNFAST_PERSISTENT_MAX_BLOCKS": None, "RNNFAST_CLUSTER_SIZE": None,
                    "RNNFAST_MMA_ROWS": None, "RNNFAST_STEP_GEMM": "aten",
                    "RNNFAST_REG_TILE": None, "RNNFAST_CLUSTER_EXCHANGE": None,
                    "RNNFAST_STEP_FUSED": None, "RNNFAST_STEP_GRAPH": None, "RNNFAST_REG_WAIT": None}
    assert all(k not in os.environ for k in cal.KNOBS)
    # the per-step path's fused forward: RNNFAST_STEP_FUSED, not RNNFAST_STEP_GEMM
    cal.measure("lstm", torch.bfloat16, 2, 8, 4, "step", 0, "fwd", 1, step_gemm="fused")
    assert seen == {"RNNFAST_PERSISTENT_MAX_BLOCKS": None, "RNNFAST_CLUSTER_SIZE": None,
                    "RNNFAST_MMA_ROWS": None, "RNNFAST_STEP_GEMM": None,
                    "RNNFAST_REG_TILE": None, "RNNFAST_CLUSTER_EXCHANGE": None,
                    "RNNFAST_STEP_FUSED": "1", "RNNFAST_STEP_GRAPH": None, "RNNFAST_REG_WAIT": None}
    assert all(k not in os.environ for k in cal.KNOBS)
    # the per-step path as a CUDA graph: RNNFAST_STEP_GRAPH
    cal.measure("lstm", torch.bfloat16, 2, 8, 4, "step", 0, "fwd", 1, step_gemm="graph")
    assert seen == {"RNNFAST_PERSISTENT_MAX_BLOCKS": None, "RNNFAST_CLUSTER_SIZE": None,
                    "RNNFAST_MMA_ROWS": None, "RNNFAST_STEP_GEMM": None,
                    "RNNFAST_REG_TILE": None, "RNNFAST_CLUSTER_EXCHANGE": None,
                    "RNNFAST_STEP_FUSED": None, "RNNFAST_STEP_GRAPH": "1", "RNNFAST_REG_WAIT": None}
    assert all(k not in os.environ for k in cal.KNOBS)
    # the register tile, asked for and not
    for value in (1, 0):
        cal.measure("lstm", torch.bfloat16, 2, 8, 4, "persistent", 0, "fwd", 1, reg_tile=value)
        assert seen == {"RNNFAST_PERSISTENT_MAX_BLOCKS": None, "RNNFAST_CLUSTER_SIZE": None,
                        "RNNFAST_MMA_ROWS": None, "RNNFAST_STEP_GEMM": None,
                        "RNNFAST_REG_TILE": str(value), "RNNFAST_CLUSTER_EXCHANGE": None,
                    "RNNFAST_STEP_FUSED": None, "RNNFAST_STEP_GRAPH": None, "RNNFAST_REG_WAIT": None}
        assert all(k not in os.environ for k in cal.KNOBS)


def test_measure_sets_the_cluster_exchange(monkeypatch):
    """measure(exchange=...) sets RNNFAST_CLUSTER_EXCHANGE for its call only."""
    cal = _load()
    seen = {}

    def fake_time(fn, T, repeats, warmup=2):
        seen.update({k: os.environ.get(k) for k in cal.KNOBS})
        return 3.0

    monkeypatch.setattr(cal, "time_per_step", fake_time)
    monkeypatch.setattr(cal, "_last_cuda_plan", lambda: ({"us": 1.0, "async": 1}, None))

    _stand_in_modules(cal, monkeypatch, ["rnn"])
    monkeypatch.setenv("RNNFAST_CLUSTER_EXCHANGE", "stale")
    for value in ("async", "barrier"):
        cal.measure("rnn", torch.float32, 2, 8, 4, "cluster", 0, "fwd", 1, exchange=value)
        assert seen["RNNFAST_CLUSTER_EXCHANGE"] == value
        assert seen["RNNFAST_CLUSTER_SIZE"] is None
        assert all(k not in os.environ for k in cal.KNOBS)
    # the register tile's range wait: RNNFAST_REG_WAIT beside RNNFAST_REG_TILE
    monkeypatch.setenv("RNNFAST_REG_WAIT", "stale")
    cal.measure("rnn", torch.bfloat16, 2, 8, 4, "persistent", 0, "fwd", 1, reg_tile=1,
                reg_wait="range")
    assert seen["RNNFAST_REG_WAIT"] == "range" and seen["RNNFAST_REG_TILE"] == "1"
    assert all(k not in os.environ for k in cal.KNOBS)


def test_overhead_table_fits_a_fixed_cost_and_a_cost_a_step(monkeypatch, capsys):
    """The fixed-cost table: each case's forward at each T, its device and host times
    recorded, and the line through the device times printed (a stand-in module whose call
    takes 700 + 3 T microseconds)."""
    cal = _load()
    seen = []

    class _Module(_StandIn):
        def forward(self, x):
            seen.append((x.shape[0], os.environ.get("RNNFAST_REG_TILE"),
                         os.environ.get("RNNFAST_CLUSTER_EXCHANGE")))

    def fake_time_call(fn, repeats, warmup=2):
        fn()
        return 700.0 + 3.0 * seen[-1][0], 40.0

    _stand_in_modules(cal, monkeypatch, ["lstm", "rnn"], _Module)
    monkeypatch.setattr(cal, "time_call", fake_time_call)
    monkeypatch.setattr(cal, "_last_cuda_plan", lambda: ({"us": 1.0, "reg": 0}, None))
    args = cal.argparse.Namespace(overhead_seq_lens=[1, 16, 256], dtypes=["bfloat16", "float32"],
                                  cells=["lstm", "gru", "rnn"], repeats=1, json=None,
                                  no_async=False)
    rows = []
    cal.overhead_table(args, _Prop(), rows)
    assert len(rows) == 3 * len(cal.OVERHEAD_CASES)
    assert [r["T"] for r in rows[:3]] == [1, 16, 256]
    assert all(r["overhead"] and r["call_us"] == 700.0 + 3.0 * r["T"] and r["host_us"] == 40.0
               for r in rows)
    assert [s[1] for s in seen] == [str(c[5]) for c in cal.OVERHEAD_CASES for _ in range(3)]
    assert [s[2] for s in seen] == [c[6] for c in cal.OVERHEAD_CASES for _ in range(3)]
    # the cluster variant with the async exchange, its rows marked so
    assert [r.get("cluster_exchange") for r in rows] == [
        c[6] for c in cal.OVERHEAD_CASES for _ in range(3)]
    assert any(c[6] == "async" for c in cal.OVERHEAD_CASES)
    assert all(k not in os.environ for k in cal.KNOBS)
    printed = capsys.readouterr().out
    assert printed.count("| 700, 3.00") == len(cal.OVERHEAD_CASES), printed
    # --no-async (gpu_check, where the async exchange's smoke test failed): its case left out
    seen.clear()
    rows = []
    cal.overhead_table(cal.argparse.Namespace(**{**vars(args), "no_async": True}), _Prop(), rows)
    kept = [c for c in cal.OVERHEAD_CASES if c[6] != "async"]
    assert len(kept) < len(cal.OVERHEAD_CASES) and len(rows) == 3 * len(kept)
    assert all(s[2] != "async" for s in seen)


def test_elman_table_sweeps_the_cluster_sizes_and_exchanges(monkeypatch, capsys):
    """The float32 Elman RNN at H = 256 and N = 64 and 256: the cluster variant at the
    planner's size and 2, 4, 8 and 16 blocks with the barrier, and the planner's size with
    the async exchange; only where the run includes the RNN in float32."""
    cal = _load()
    seen = []

    def fake_measure(cell, dtype, N, H, T, path, knob, mode, repeats, mma_rows=None,
                     step_gemm=None, reg_tile=None, exchange=None):
        seen.append((cell, str(dtype), N, H, path, knob, mode, exchange))
        return 2.0, (path, path), ({"us": 1.0}, None)

    monkeypatch.setattr(cal, "measure", fake_measure)
    args = cal.argparse.Namespace(no_elman=False, cells=["rnn"], dtypes=["float32"],
                                  elman_batch=[64, 256], seq_len=8, repeats=1, json=None,
                                  no_async=False)
    rows = []
    cal.elman_table(args, None, rows)
    assert seen == [("rnn", "torch.float32", n, 256, "cluster", c, "fwd", e)
                    for n in (64, 256)
                    for c, e in [(0, "barrier"), (2, "barrier"), (4, "barrier"),
                                 (8, "barrier"), (16, "barrier"), (0, "async")]]
    assert all(r["table"] == "elman" for r in rows) and len(rows) == 12
    assert [(r["cluster_size"], r["cluster_exchange"]) for r in rows[:6]] == [
        (0, "barrier"), (2, "barrier"), (4, "barrier"), (8, "barrier"), (16, "barrier"),
        (0, "async")]
    assert "cluster, barrier" in capsys.readouterr().out
    for skip in (dict(no_elman=True), dict(cells=["lstm"]), dict(dtypes=["bfloat16"])):
        rows = []
        cal.elman_table(cal.argparse.Namespace(**{**vars(args), **skip}), None, rows)
        assert rows == []
    # --no-async: the barrier's columns only
    seen.clear()
    rows = []
    cal.elman_table(cal.argparse.Namespace(**{**vars(args), "no_async": True}), None, rows)
    assert len(rows) == 10 and all(s[7] == "barrier" for s in seen)


def test_reg_table_leaves_out_the_range_wait_when_asked(monkeypatch, capsys):
    """--no-range (gpu_check, where the range wait's smoke test failed): the register tile's
    table without its range-wait column."""
    cal = _load()
    seen = []

    def fake_measure(cell, dtype, N, H, T, path, knob, mode, repeats, mma_rows=None,
                     step_gemm=None, reg_tile=None, exchange=None, reg_wait=None):
        seen.append(reg_wait)
        return 2.0, (path, path), ({"us": 1.0, "reg": reg_tile or 0, "range_wait": 0}, None)

    monkeypatch.setattr(cal, "measure", fake_measure)
    args = cal.argparse.Namespace(no_reg_tile=False, no_range=False, dtypes=["bfloat16"],
                                  batch=[16], cells=["lstm"], hidden=[768], seq_len=8,
                                  repeats=1, json=None)
    rows = []
    cal.reg_table(args, None, rows)
    assert seen == [None, None, None, "range"] * 2 and len(rows) == 8
    seen.clear()
    rows = []
    cal.reg_table(cal.argparse.Namespace(**{**vars(args), "no_range": True}), None, rows)
    assert seen == [None] * 6 and all("reg_wait" not in r for r in rows)
