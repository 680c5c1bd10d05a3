#!/usr/bin/env python3
"""The `auto` cost model of csrc/cuda/persistent.cuh (CostModel), in Python, against GPU
benchmarks' JSON (`--set issue7`): the grid variant (`rnnfast persistent`), the cluster
variant (`rnnfast cluster`, or auto where it ran it), the register tile (`rnnfast reg`) and
the per-step path (`rnnfast step`), beside cuDNN (`torch.nn`).

The constants are read from persistent.cuh, so this checks the header's own numbers. For
each case it prints, in microseconds a step, each path's measured time and the model's,
cuDNN's, the path `auto` would pick by the model, and the measured time of that pick over
cuDNN's where the pick was measured. The backward is forward+backward less the same path's
forward. The plans (tiles, blocks, cluster sizes) come from the CPU emulator's copy of the
planner (scripts/emulate_persistent.py) on an H100's 132 SMs and 227 KiB.

  python scripts/fit_cost_model.py                          # the committed H100 runs
  python scripts/fit_cost_model.py --json gpu-bench7.json   # another run (repeatable)
  python scripts/fit_cost_model.py --now kTileUs=2.0        # a what-if for the picks

The default reads the five committed H100 runs, newest first; a case measured in several
takes each path's time from the latest run that measured it. What each run's contenders
ran, as the planner runs them now (RUNS): `rnnfast persistent` is the grid variant (the
third run's 16-bit cases at N > 32 as `rnnfast mma64`: the 64-row tile the planner now
takes there), `rnnfast cluster` the cluster variant, `rnnfast reg` the register tile (the
fourth run), `rnnfast step` the per-step path (in 16 bits only from the fourth run on,
whose step GEMMs call cuBLAS directly and whose bfloat16 backward runs on tensor cores; the
earlier runs' 16-bit per-step times are not the path as it is), and `rnnfast` (auto) the
path its record names (`cuda_path`), which is how the fourth and fifth runs, which forced
no cluster variant, measured it.
"""
import argparse
import json
import math
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
# the committed runs, newest first, and whether their 16-bit per-step path is today's
RUNS = [("cuda-h100-issue7-2026-11-27e.json", True),  # fifth: float32 only
        ("cuda-h100-issue7-2026-11-27d.json", True),  # fourth: direct cuBLAS, reg tile
        ("cuda-h100-issue7-2026-11-27c.json", False),  # third: step path, mma64
        ("cuda-h100-issue7-2026-11-27.json", False),  # second: grid and cluster forced
        ("cuda-h100-issue7-partial-2026-11-27.json", False)]  # first: float32 step path
DEFAULT_JSONS = [os.path.join(RESULTS, name) for name, _ in RUNS]
CURRENT_STEP16 = {name for name, current in RUNS if current}
GATES = {"lstm": 4, "gru": 3, "rnn": 1, "rnn_tanh": 1, "rnn_relu": 1}
PATHS = {"persistent": "rnnfast persistent", "cluster": "rnnfast cluster", "step": "rnnfast step",
         "reg": "rnnfast reg"}
# the grid variant as the planner now runs it in 16 bits at N > 32: 64-row tiles (forced as
# `rnnfast mma64` in the third run, whose `rnnfast persistent` would have had 16)
MMA64 = "rnnfast mma64"
WHOLE_SEQUENCE_SHARE = 0.8  # of FFMA peak (tensor cores in 16-bit), the GEMMs over T * N rows

_EMU = []


def load_emulation():
    """scripts/emulate_persistent.py as a module (once)."""
    if not _EMU:
        import importlib.util
        path = os.path.join(ROOT, "scripts", "emulate_persistent.py")
        spec = importlib.util.spec_from_file_location("emulate_persistent", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        _EMU.append(module)
    return _EMU[0]


def header_constants():
    """CostModel's constants, as persistent.cuh defines them."""
    return load_emulation().header_constants()


def round_up(v, m):
    return (v + m - 1) // m * m


class Model:
    """CostModel for one dtype on an H100 (132 SMs at 1980 MHz unless told otherwise)."""

    def __init__(self, consts, dtype, sms=132, clock_mhz=1980.0):
        self.c, self.dtype, self.sms, self.clock_mhz = consts, dtype, sms, clock_mhz
        self.ffma = (128.0 if dtype == "float64" else 256.0) * clock_mhz  # flop/SM/us
        self.mma16 = dtype in ("bfloat16", "float16")

    def _emu(self, cell, backward):
        emu = load_emulation()
        # the runs read here ran the tiled forward at N <= 16 (the register tile, the
        # default since the fourth run, is not in them)
        emu.KNOBS["RNNFAST_REG_TILE"] = "0"
        cls = {1: emu.ElmanCell, 3: emu.GruCell, 4: emu.LstmCell}[GATES[cell]]
        name = {"float64": "float64", "float32": "float32"}.get(self.dtype, "float16")
        return emu, cls, emu.dtype_of(name)

    def common_us(self, cell, N, H, backward):
        """What every path shares, per step: the whole-sequence GEMMs (forward: the input
        projection; backward: dx, dW_ih, dW_hh), C = H here."""
        flops = (3 if backward else 1) * 2.0 * N * GATES[cell] * H * H
        # tensor cores: the forward's in 16 bits, the backward's in bfloat16 (float16's run in
        # float32, see common.cuh); measured from the fourth run on
        mma = self.mma16 and (not backward or self.dtype == "bfloat16")
        return flops / (self.sms * self.ffma * (16.0 * 0.25 if mma else WHOLE_SEQUENCE_SHARE))

    def persistent_us(self, cell, N, H, backward):
        """CostModel::persistent_us for the grid variant as the emulator plans it."""
        c = self.c
        emu, cls, dt = self._emu(cell, backward)
        p = emu.plan_persistent(cls, backward, N, H, emu.FakeDevice(self.sms), dt)
        G = GATES[cell]
        K = G * H if backward else H
        r_pad = round_up(p.units if backward else G * p.units, p.rpw)
        mma = self.mma16 and not backward
        share = c["kBwdFfmaShare"] if backward else c["kFfmaShare"]
        rate = self.ffma * (16.0 * c["kMmaShare"] if mma else share)
        dot = 2.0 * p.nt * r_pad * K / rate
        tiles = -(-N // p.nt)
        floor, tile = ((c["kBwdFloorUs"], c["kBwdTileUs"]) if backward
                       else (c["kFloorUs"], c["kTileUs"]))
        x_size = 8 if self.dtype == "float64" else 2 if mma else 4
        wide = (p.nt - 16) * K * x_size / 1024.0 * c["kWideRowUsPerKB"] if p.nt > 16 else 0.0
        bandwidth = p.blocks * N * K * x_size / c["kL2BytesPerS"] * 1e6
        return max(floor + tiles * (tile + dot + wide), bandwidth)

    def cluster_us(self, cell, N, H, backward):
        """CostModel::cluster_us (the emulator's, at this model's clock) as the emulator's
        plan_cluster lays it out, or None where it does not fit."""
        emu, cls, dt = self._emu(cell, backward)
        try:
            p = emu.plan_cluster(cls, backward, N, H, emu.FakeDevice(self.sms), dt)
        except emu.Finding:
            return None
        G = GATES[cell]
        K = G * H if backward else H
        r_pad = round_up(p.units if backward else G * p.units, p.rpw)
        pushes = p.group_rows * p.units * (G if backward else 1) * p.cluster
        waves = -(-(p.blocks // p.cluster) // p.at_once)
        mma = self.mma16 and not backward
        return emu.cluster_us(p.group_rows, p.nt, r_pad, K, pushes, mma, waves,
                              self.dtype == "float64", backward, self.clock_mhz)

    def reg_us(self, cell, N, H, backward):
        """CostModel::reg_us where the planner takes the register tile (the 16-bit forward
        where it holds the layer: RNNFAST_REG_TILE's default), else None."""
        if backward or not self.mma16:
            return None
        emu, cls, dt = self._emu(cell, backward)
        emu.KNOBS["RNNFAST_REG_TILE"] = "1"
        try:
            p = emu.plan_persistent(cls, backward, N, H, emu.FakeDevice(self.sms), dt)
        finally:
            emu.KNOBS["RNNFAST_REG_TILE"] = "0"
        if not p.reg:
            return None
        c = self.c
        r_pad = round_up(GATES[cell] * p.units, 8)
        latency = c["kRegFloorUs"] + 2.0 * 16 * r_pad * H / (self.ffma * 16.0 * c["kMmaShare"])
        return max(latency, p.blocks * N * H * 2 / c["kL2BytesPerS"] * 1e6)

    def estimates(self, cell, N, H, backward):
        """Each path's estimate, None where it cannot run; pick(...) of it is auto's choice.
        persistent: the tiled grid variant; reg: the register tile, which the planner's
        grid variant is wherever it holds the layer."""
        return {"persistent": self.persistent_us(cell, N, H, backward),
                "cluster": self.cluster_us(cell, N, H, backward),
                "step": self.step_us(cell, N, H, backward),
                "reg": self.reg_us(cell, N, H, backward)}

    def step_us(self, cell, N, H, backward):
        """CostModel::step_us as the planner asks it: 16-bit GEMMs call cuBLAS directly
        (StepGemm::direct, torch's defaults), on tensor cores in the forward and, in
        bfloat16, in the backward (StepGemm::bf16_dh)."""
        c = self.c
        mma = self.mma16 and (not backward or self.dtype == "bfloat16")
        rate = self.sms * self.ffma * (16.0 * c["kGemmMmaShare"] if mma else c["kGemmFfmaShare"])
        if self.mma16:
            overhead = c["kBwdStepDirectUs"] if backward else c["kStepDirectUs"]
        else:
            overhead = c["kBwdStepOverheadUs"] if backward else c["kStepOverheadUs"]
        return overhead + 2.0 * N * GATES[cell] * H * H / rate


def pick(estimates):
    """The path auto takes: the cheapest of those that can run (the grid variant is the
    register tile where that holds the layer, the tiled forward not being planned then)."""
    runs = [p for p in estimates if estimates[p] is not None
            and not (p == "persistent" and estimates.get("reg") is not None)]
    return min(runs, key=estimates.get)


def per_step(rec, name):
    r = rec["results"].get(name, {})
    return r["median_s"] / rec["T"] * 1e6 if "median_s" in r else None


def geo(xs):
    return math.exp(statistics.mean(math.log(x) for x in xs)) if xs else float("nan")


def auto_path(rec):
    """The path rnnfast on auto ran for a record ("cluster", "cluster/step", ...), or ""."""
    return rec["results"].get("rnnfast", {}).get("cuda_path", "")


def contender_names(rec, step16):
    """{path or 'cudnn': the record's contender that ran it as the planner runs it now}
    (see RUNS). step16: whether the run's 16-bit per-step path is today's."""
    names = dict(PATHS, cudnn="torch.nn")
    sixteen = rec["dtype"] in ("bfloat16", "float16")
    if sixteen and rec["N"] > 32 and MMA64 in rec["results"]:
        names["persistent"] = MMA64  # the third run's 16-row times are no longer the planner's
    if sixteen and not step16:
        del names["step"]
    if rec["mode"] != "fwd":
        del names["reg"]  # a forward: its forward+backward's backward is the grid variant's
    # auto's time for the cluster variant where no contender forced it (the fourth and fifth
    # runs); the forward+backward only where both halves ran it
    ran = auto_path(rec)
    if "rnnfast cluster" not in rec["results"] and ran in ("cluster", "cluster/cluster"):
        names["cluster"] = "rnnfast"
    return names


def measured_cases(paths):
    """{(cell, dtype, N, H, mode): {path or 'cudnn': us a step}}, mode fwd or bwd (the
    backward alone: forward+backward less the same contender's forward, auto's only where
    its forward ran the same path). Earlier files win."""
    cases = {}
    for path in paths:
        records = json.load(open(path))["records"]
        known = {name for name, _ in RUNS}
        step16 = os.path.basename(path) in CURRENT_STEP16 or os.path.basename(path) not in known
        fwd = {(r["cell"], r["dtype"], r["N"], r["H"]): r for r in records if r["mode"] == "fwd"}
        for r in records:
            key = (r["cell"], r["dtype"], r["N"], r["H"])
            for short, name in contender_names(r, step16).items():
                us = per_step(r, name)
                if us is None:
                    continue
                mode = "fwd"
                if r["mode"] != "fwd":
                    f = per_step(fwd[key], name) if key in fwd else None
                    if f is None or (name == "rnnfast" and auto_path(fwd[key]) != "cluster"):
                        continue
                    us, mode = us - f, "bwd"
                if us <= 0:  # noise: a backward measured at no time (cuDNN at small sizes)
                    continue
                cases.setdefault(key + (mode,), {}).setdefault(short, us)
    return cases


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="append", default=None,
                    help="a GPU run's JSON (repeatable; default: the committed H100 runs)")
    ap.add_argument("--sms", type=int, default=132)
    ap.add_argument("--clock-mhz", type=float, default=1980.0)
    ap.add_argument("--now", action="append", default=[], metavar="NAME=VALUE",
                    help="a constant of the header replaced in the picks (not in the fit); "
                         "repeatable")
    args = ap.parse_args(argv)
    consts = header_constants()
    now_consts = dict(consts)
    for item in args.now:
        name, _, value = item.partition("=")
        if name not in consts:
            raise SystemExit(f"--now {item}: {name} is not one of {sorted(consts)}")
        now_consts[name] = float(value)
    emu = load_emulation()
    cases = measured_cases(args.json or DEFAULT_JSONS)
    ratios = {(p, m): [] for p in PATHS for m in ("fwd", "bwd")}
    picks = {"fwd": [], "bwd": []}
    print(f"{'cell':5s} {'dtype':8s} {'N':>4s} {'H':>5s} {'mode':4s} | "
          + " | ".join(f"{p[:7]:>7s} {'model':>6s}" for p in PATHS)
          + f" | {'cuDNN':>6s} | pick        cuDNN/pick (us a step, each with the shared GEMMs)")
    try:
        for (cell, dtype, N, H, mode), meas in sorted(cases.items()):
            backward = mode == "bwd"
            emu._HEADER_CONSTANTS[:] = [consts]
            model = Model(consts, dtype, args.sms, args.clock_mhz)
            est = model.estimates(cell, N, H, backward)
            common = model.common_us(cell, N, H, backward)
            cols = []
            for p in PATHS:
                m = meas.get(p)
                e = None if est[p] is None else est[p] + common
                if m is not None and e is not None and m > 0:
                    ratios[(p, mode)].append(e / m)
                cols.append((f"{m:7.1f}" if m is not None else f"{'-':>7s}") + " "
                            + (f"{e:6.1f}" if e is not None else f"{'-':>6s}"))
            emu._HEADER_CONSTANTS[:] = [now_consts]
            now = Model(now_consts, dtype, args.sms, args.clock_mhz)
            choice = pick(now.estimates(cell, N, H, backward))
            cudnn = meas.get("cudnn")
            shown = "-"
            if cudnn is not None and meas.get(choice) is not None and meas[choice] > 0:
                picks[mode].append(cudnn / meas[choice])
                shown = f"{cudnn / meas[choice]:.2f}x"
            cudnn_s = f"{cudnn:6.1f}" if cudnn is not None else f"{'-':>6s}"
            print(f"{cell:5s} {dtype:8s} {N:4d} {H:5d} {mode:4s} | " + " | ".join(cols)
                  + f" | {cudnn_s} | {choice:10s}  {shown}")
    finally:
        emu._HEADER_CONSTANTS[:] = [consts]
    for (p, mode), rs in ratios.items():
        if rs:
            print(f"{p} {mode}: model over measured: geomean {geo(rs):.2f}, range "
                  f"{min(rs):.2f}-{max(rs):.2f}, {len(rs)} cases")
    for mode, rs in picks.items():
        if rs:
            print(f"{mode}: cuDNN over auto's pick (both measured): geomean {geo(rs):.2f}, "
                  f"range {min(rs):.2f}-{max(rs):.2f}, {len(rs)} cases with the pick measured")
    return ratios, picks


if __name__ == "__main__":
    main()
    sys.exit(0)
