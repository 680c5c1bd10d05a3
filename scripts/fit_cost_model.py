#!/usr/bin/env python3
"""The `auto` cost model of csrc/cuda/persistent.cuh (CostModel, and plan_persistent's
choice of tile), in Python, against a GPU benchmark's JSON (`--set issue7` with the
`rnnfast persistent` and `rnnfast step` contenders).

The constants are read from persistent.cuh, so this checks the header's own numbers. For
each case it prints the measured per-step times of both forced paths and of cuDNN, the
model's estimate of the persistent kernels as that run's code staged rows (`--staging
old`: one element at a time per thread, a round trip each, as before the batched
stage_rows) or as the code stages them now (`new`), the cluster variant's estimate
(`clustr`; its constants are guesses until a GPU run calibrates them), the per-step path's
estimate, and what `auto` would pick; then cuDNN's measured time over the model's time of
that pick (a prediction of the speedup, nothing measured). The fit summary (model over measured, geomean and range) is what
the header's comment quotes.

  python scripts/fit_cost_model.py                      # the committed H100 run
  python scripts/fit_cost_model.py --json gpu-bench7.json --staging new
  python scripts/fit_cost_model.py --now kFfmaShare=0.65   # a what-if for the predictions

Float32 and float64 cases only (the 16-bit rates are not fitted yet); the device is taken
to be the H100 SXM of the committed run (132 SMs, clockRate 1980 MHz) unless --sms and
--clock-mhz say otherwise.
"""
import argparse
import json
import math
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADER = os.path.join(ROOT, "csrc", "cuda", "persistent.cuh")
DEFAULT_JSON = os.path.join(ROOT, "benchmarks", "results",
                            "cuda-h100-issue7-partial-2026-11-27.json")
GATES = {"lstm": 4, "gru": 3, "rnn": 1, "rnn_tanh": 1, "rnn_relu": 1}
THREADS = 256  # kPersistentThreads
WHOLE_SEQUENCE_SHARE = 0.8  # of FFMA peak, for the GEMMs over all T * N rows (a guess)


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


def header_constants(path=HEADER):
    """kStageBatch and CostModel's constants, as persistent.cuh defines them (read by the
    emulator, which costs the cluster variant's plans with them too)."""
    return load_emulation().header_constants(path)


def round_up(v, m):
    return (v + m - 1) // m * m


class Model:
    def __init__(self, consts, sms, clock_mhz, fp64=False):
        self.c, self.sms, self.clock_mhz = consts, sms, clock_mhz
        self.ffma = (128.0 if fp64 else 256.0) * clock_mhz  # flop per SM per microsecond

    def plan(self, cell, N, H, backward, staging, x_size):
        """(NT, RPW, units, blocks, xs_tiles) as plan_persistent picks them, through the
        emulator's copy of it (scripts/emulate_persistent.py: the shared-memory fit
        included) on an H100's 227 KiB. The run before the (16, 8) tile (`--staging old`)
        had (16, 4) in its place, and one tile of xs."""
        emu = load_emulation()
        cls = {1: emu.ElmanCell, 3: emu.GruCell, 4: emu.LstmCell}[GATES[cell]]
        dt = emu.dtype_of({8: "float64", 4: "float32"}[x_size])
        p = emu.plan_persistent(cls, backward, N, H, emu.FakeDevice(self.sms), dt)
        if staging == "old" and (p.nt, p.rpw) == (16, 8):
            p = emu.plan_persistent(cls, backward, N, H, emu.FakeDevice(self.sms), dt,
                                    tile=(16, 4))
        return p.nt, p.rpw, p.units, p.blocks, 1 if staging == "old" else p.xs_tiles

    def persistent_us(self, cell, N, H, backward, staging, x_size=4):
        c = self.c
        G = GATES[cell]
        K = G * H if backward else H
        nt, rpw, units, blocks, xs_tiles = self.plan(cell, N, H, backward, staging, x_size)
        rows = units if backward else G * units
        # the measured run's rows were K long; now they are padded to whole 4-vectors
        r_pad, ld = round_up(rows, rpw), K if staging == "old" else round_up(K, 4)
        tiles = -(-N // nt)
        dot = 2.0 * nt * r_pad * K / (self.ffma * c["kFfmaShare"])
        if staging == "old":  # each valid row: ceil(ld / 256) loads, one after another
            trips = sum(min(nt, N - n0) * -(-ld // THREADS) for n0 in range(0, N, nt))
        else:  # CostModel::persistent_us: later tiles by cp.async where xs has two tiles
            v = 16 // x_size if K % (16 // x_size) == 0 else 1
            per_thread = -(-(nt * ld // v) // THREADS)
            trip = -(-per_thread // int(c["kStageBatch"]))
            if xs_tiles == 2 and v > 1:  # a tile's copies all issued at once: a round trip
                trips = 1 + (tiles - 1) * max(0.0, c["kRoundTripUs"] - dot) / c["kRoundTripUs"]
            else:
                trips = tiles * trip
        latency = (c["kFloorUs"] + trips * c["kRoundTripUs"] + tiles * dot
                   + (tiles - 1) * c["kRoundTripUs"])
        bandwidth = blocks * N * K * x_size / c["kL2BytesPerS"] * 1e6
        return max(latency, bandwidth)

    def cluster_us(self, cell, N, H, backward, x_size=4):
        """CostModel::cluster_us (the emulator's, with the header's constants, at this
        model's clock) for the cluster variant as the emulator's plan_cluster lays it out
        (its choice of cluster size made on its stand-in model; a FakeDevice runs SMs // C
        clusters at once), or None where it does not fit."""
        emu = load_emulation()
        cls = {1: emu.ElmanCell, 3: emu.GruCell, 4: emu.LstmCell}[GATES[cell]]
        dt = emu.dtype_of({8: "float64", 4: "float32"}[x_size])
        try:
            p = emu.plan_cluster(cls, backward, N, H, emu.FakeDevice(self.sms), dt)
        except emu.Finding:
            return None
        G = GATES[cell]
        K = G * H if backward else H
        r_pad = round_up(p.units if backward else G * p.units, p.rpw)
        pushes = p.group_rows * p.units * (G if backward else 1) * p.cluster
        waves = -(-(p.blocks // p.cluster) // p.at_once)
        return emu.cluster_us(p.group_rows, p.nt, r_pad, K, pushes, x_size, False, waves,
                              x_size == 8, self.clock_mhz)

    def gemm_us(self, cell, N, H):
        """One [N, H] x [H, G*H] GEMM's share of a step, at the per-step GEMMs' rate."""
        flops = 2.0 * N * GATES[cell] * H * H
        return flops / (self.sms * self.ffma * self.c["kGemmFfmaShare"])

    def step_us(self, cell, N, H):
        return self.c["kStepOverheadUs"] + self.gemm_us(cell, N, H)


def per_step(rec, name):
    r = rec["results"].get(name, {})
    return r["median_s"] / rec["T"] * 1e6 if "median_s" in r else None


def geo(xs):
    return math.exp(statistics.mean(math.log(x) for x in xs)) if xs else float("nan")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default=DEFAULT_JSON)
    ap.add_argument("--staging", choices=("old", "new"), default="old",
                    help="how the measured run staged rows (default: old, the committed run)")
    ap.add_argument("--sms", type=int, default=132)
    ap.add_argument("--clock-mhz", type=float, default=1980.0)
    ap.add_argument("--now", action="append", default=[], metavar="NAME=VALUE",
                    help="a constant of the header replaced in the predictions (the `now`, "
                         "`clustr` and auto columns), not in the fit; repeatable")
    args = ap.parse_args(argv)
    consts = header_constants()
    now_consts = dict(consts)
    for item in args.now:
        name, _, value = item.partition("=")
        if name not in consts:
            raise SystemExit(f"--now {item}: {name} is not one of {sorted(consts)}")
        now_consts[name] = float(value)
    emu = load_emulation()  # its cluster_us reads the constants it cached
    emu._HEADER_CONSTANTS[:] = [now_consts]
    records = json.load(open(args.json))["records"]
    fwd = {(r["cell"], r["N"], r["H"], r["dtype"]): r for r in records if r["mode"] == "fwd"}
    ratios = {"fwd": [], "bwd": []}
    best_over_cudnn = {"fwd": [], "bwd": []}
    print(f"{'cell':5s} {'dtype':8s} {'N':>4s} {'H':>5s} {'mode':4s} | {'persistent':>10s} "
          f"{'model':>6s} {'ratio':>5s} {'now':>6s} {'clustr':>6s} | {'step':>6s} {'model':>6s} | "
          f"{'cuDNN':>6s} | auto  (us/step; model columns include the whole-sequence GEMMs)")
    for r in records:
        if r["dtype"] not in ("float32", "float64"):
            continue
        model = Model(consts, args.sms, args.clock_mhz, fp64=r["dtype"] == "float64")
        now = Model(now_consts, args.sms, args.clock_mhz, fp64=r["dtype"] == "float64")
        x_size = 8 if r["dtype"] == "float64" else 4
        cell, N, H = r["cell"], r["N"], r["H"]
        pers, step, cudnn = (per_step(r, n) for n in ("rnnfast persistent", "rnnfast step",
                                                      "torch.nn"))
        if pers is None or step is None:
            continue
        if r["mode"] == "fwd":
            mode, backward = "fwd", False
        else:  # the backward alone: forward+backward less the same path's forward
            f = fwd.get((cell, N, H, r["dtype"]))
            if f is None or per_step(f, "rnnfast persistent") is None:
                continue
            mode, backward = "bwd", True
            pers -= per_step(f, "rnnfast persistent")
            step -= per_step(f, "rnnfast step")
            cudnn -= per_step(f, "torch.nn")
        # what both paths share: the whole-sequence GEMMs (forward: the input projection;
        # backward: dx, dW_ih, dW_hh), per step, C = H here; T * N rows make them efficient
        # (WHOLE_SEQUENCE_SHARE of FFMA peak, against the per-step GEMMs' kGemmFfmaShare)
        common = ((3 if backward else 1) * model.gemm_us(cell, N, H)
                  * consts["kGemmFfmaShare"] / WHOLE_SEQUENCE_SHARE)
        m_fit = model.persistent_us(cell, N, H, backward, args.staging, x_size) + common
        m_now = now.persistent_us(cell, N, H, backward, "new", x_size) + common
        m_cluster = now.cluster_us(cell, N, H, backward, x_size)
        m_cluster = None if m_cluster is None else m_cluster + common
        m_step = now.step_us(cell, N, H) + common
        ratios[mode].append(m_fit / pers)
        options = {"persistent": m_now, "step": m_step}
        if m_cluster is not None:
            options["cluster"] = m_cluster
        pick = min(options, key=options.get)
        best_over_cudnn[mode].append(cudnn / options[pick])
        shown = f"{m_cluster:6.1f}" if m_cluster is not None else f"{'-':>6s}"
        print(f"{cell:5s} {r['dtype']:8s} {N:4d} {H:5d} {mode:4s} | {pers:10.1f} {m_fit:6.1f} "
              f"{m_fit / pers:5.2f} {m_now:6.1f} {shown} | {step:6.1f} {m_step:6.1f} | "
              f"{cudnn:6.1f} | {pick}")
    for mode, rs in best_over_cudnn.items():
        if rs:
            print(f"{mode}: cuDNN (measured) over auto's pick (model), a prediction: geomean "
                  f"{geo(rs):.2f}, range {min(rs):.2f}-{max(rs):.2f}, {len(rs)} cases")
    for mode, rs in ratios.items():
        if rs:
            print(f"{mode}: model over measured (persistent, staging {args.staging}): geomean "
                  f"{geo(rs):.2f}, range {min(rs):.2f}-{max(rs):.2f}, {len(rs)} cases")
    return ratios


if __name__ == "__main__":
    main()
    sys.exit(0)
