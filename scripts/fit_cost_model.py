#!/usr/bin/env python3
"""The `auto` cost model of csrc/cuda/persistent.cuh (CostModel), in Python, against GPU
benchmarks' JSON (`--set issue7`): the grid variant (`rnnfast persistent`), the cluster
variant (`rnnfast cluster`) and the per-step path (`rnnfast step`), each forced, beside
cuDNN (`torch.nn`).

The constants are read from persistent.cuh, so this checks the header's own numbers. For
each case it prints, in microseconds a step, each path's measured time and the model's,
cuDNN's, the path `auto` would pick by the model, and the measured time of that pick over
cuDNN's where the pick was measured. The backward is forward+backward less the same path's
forward. The plans (tiles, blocks, cluster sizes) come from the CPU emulator's copy of the
planner (scripts/emulate_persistent.py) on an H100's 132 SMs and 227 KiB.

  python scripts/fit_cost_model.py                          # the committed H100 runs
  python scripts/fit_cost_model.py --json gpu-bench7.json   # another run (repeatable)
  python scripts/fit_cost_model.py --now kTileUs=2.0        # a what-if for the picks

The default reads the third H100 run (the per-step path, and the grid variant's 64-row
tensor-core tiles, `rnnfast mma64`, which the planner now takes by default at N > 32 in 16
bits), the second (grid and cluster variants, float32 and bfloat16) and the first (the
per-step path, float32); a case measured in several takes each path's time from the latest
run that measured it.
"""
import argparse
import json
import math
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
DEFAULT_JSONS = [os.path.join(RESULTS, "cuda-h100-issue7-2026-11-27c.json"),
                 os.path.join(RESULTS, "cuda-h100-issue7-2026-11-27.json"),
                 os.path.join(RESULTS, "cuda-h100-issue7-partial-2026-11-27.json")]
GATES = {"lstm": 4, "gru": 3, "rnn": 1, "rnn_tanh": 1, "rnn_relu": 1}
PATHS = {"persistent": "rnnfast persistent", "cluster": "rnnfast cluster", "step": "rnnfast step"}
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
        mma = self.mma16 and not backward
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
        x_size = 8 if self.dtype == "float64" else 2 if mma else 4
        return emu.cluster_us(p.group_rows, p.nt, r_pad, K, pushes, x_size, mma, waves,
                              self.dtype == "float64", backward, self.clock_mhz)

    def estimates(self, cell, N, H, backward):
        """Each path's estimate, None where it cannot run; pick(...) of it is auto's choice."""
        return {"persistent": self.persistent_us(cell, N, H, backward),
                "cluster": self.cluster_us(cell, N, H, backward),
                "step": self.step_us(cell, N, H, backward)}

    def step_us(self, cell, N, H, backward):
        c = self.c
        mma = self.mma16 and not backward
        rate = self.sms * self.ffma * (16.0 * c["kGemmMmaShare"] if mma else c["kGemmFfmaShare"])
        overhead = c["kBwdStepOverheadUs"] if backward else c["kStepOverheadUs"]
        return overhead + 2.0 * N * GATES[cell] * H * H / rate


def pick(estimates):
    """The path auto takes: the cheapest of those that can run."""
    return min((p for p in estimates if estimates[p] is not None), key=estimates.get)


def per_step(rec, name):
    r = rec["results"].get(name, {})
    return r["median_s"] / rec["T"] * 1e6 if "median_s" in r else None


def geo(xs):
    return math.exp(statistics.mean(math.log(x) for x in xs)) if xs else float("nan")


def measured_cases(paths):
    """{(cell, dtype, N, H, mode): {path or 'cudnn': us a step}}, mode fwd or bwd (the
    backward alone: forward+backward less the same contender's forward). Earlier files win."""
    cases = {}
    for path in paths:
        records = json.load(open(path))["records"]
        fwd = {(r["cell"], r["dtype"], r["N"], r["H"]): r for r in records if r["mode"] == "fwd"}
        for r in records:
            key = (r["cell"], r["dtype"], r["N"], r["H"])
            names = dict(PATHS, cudnn="torch.nn")
            if r["dtype"] in ("bfloat16", "float16") and r["N"] > 32:
                names["persistent"] = MMA64  # 16-row times are no longer the planner's
            for short, name in names.items():
                us = per_step(r, name)
                if us is None:
                    continue
                mode = "fwd"
                if r["mode"] != "fwd":
                    f = per_step(fwd[key], name) if key in fwd else None
                    if f is None:
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
