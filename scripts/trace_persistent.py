#!/usr/bin/env python3
"""Where a persistent kernel's step goes, measured inside the kernel, on a GPU.

For each case (cell, dtype, N, H, direction, path and knobs) the layer runs once at
T = --seq-len untimed, then timed by CUDA events without a trace and with one
(rnnfast._ops._trace_next: thread 0 of each block records the SM clock at seven marks of
each of the first --steps steps; csrc/cuda/persistent.cuh, StepTrace). Per phase (the time
between two marks) it prints the median over every block and step past the first --skip,
in nanoseconds at the launch's own clock, and their sum beside the event-timed step (the
trace's own cost is the difference of the two event times). `last` is the wait of the
block that arrived last, the smallest wait of a step over the blocks (its median over the
steps): the barrier's own latency, free of the other blocks' lateness (with the range
wait, RNNFAST_REG_WAIT=range, the marks are thread 0's, so `wait`, `last` and `wait_p90`
are warp 0's wait for its own range's blocks, the other warps' waits falling in `dot`;
`step` and `spread` compare with the barrier's); `spread` the time
from a step's first block's arrival to its last's by the global timer (its resolution,
as seen, beside it).

Forward phases: `h_prev` (staging h_{t-1} into shared memory, the register tile's loads
of it; nothing in the cluster variant), `dot`, `pointwise`, `arrive` (the barrier's
arrival: its __syncthreads and release, or the async exchange's expectation), `ahead` (the
loads of the next step's inputs between arrival and wait), `wait`. Backward: `phase A`
(the pointwise backward and, in the cluster variant, the stores into peers), `arrive`,
`ahead`, `wait`, `stage` (phase B's input into shared memory), `phase B`.

  python scripts/trace_persistent.py                    # the default cases, a table
  python scripts/trace_persistent.py --json trace.json  # and the rows

Needs a CUDA GPU and rnnfast built with its CUDA kernels.
"""
import argparse
import json
import os
import statistics
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import rnnfast  # noqa: E402
from rnnfast._ops import _last_cuda_plan, _last_trace, _trace_next  # noqa: E402
from rnnfast.bench.timing import measure_cuda  # noqa: E402

MODULES = {"lstm": rnnfast.LSTM, "gru": rnnfast.GRU, "rnn": rnnfast.RNN}
KNOBS = ("RNNFAST_REG_TILE", "RNNFAST_CLUSTER_EXCHANGE", "RNNFAST_REG_WAIT")
PHASES = {False: ("h_prev", "dot", "pointwise", "arrive", "ahead", "wait"),
          True: ("phase A", "arrive", "ahead", "wait", "stage", "phase B")}
WAIT = {False: 5, True: 3}  # the index of the wait among the phases

# (cell, dtype, N, H, backward, path, RNNFAST_REG_TILE, RNNFAST_CLUSTER_EXCHANGE): the
# issue's latency case (LSTM bfloat16 N = 16, H = 768: 3.0-3.3 us a step on the register
# tile, the target under 2), with the range wait (RNNFAST_REG_TILE "range": the register
# tile and RNNFAST_REG_WAIT=range) and tiled, the other cells there, and the float32
# Elman RNN at H = 256 (slower than cuDNN) on both variants and exchanges, both directions
CASES = [("lstm", "bfloat16", 16, 768, False, "persistent", "1", None),
         ("lstm", "bfloat16", 16, 768, False, "persistent", "range", None),
         ("lstm", "bfloat16", 16, 768, False, "persistent", "0", None),
         ("gru", "bfloat16", 16, 768, False, "persistent", "1", None),
         ("rnn", "bfloat16", 16, 768, False, "persistent", "1", None),
         ("lstm", "bfloat16", 1, 256, False, "persistent", "1", None),
         ("rnn", "float32", 1, 256, False, "cluster", None, "barrier"),
         ("rnn", "float32", 1, 256, False, "cluster", None, "async"),
         ("rnn", "float32", 64, 256, False, "cluster", None, "barrier"),
         ("rnn", "float32", 64, 256, False, "cluster", None, "async"),
         ("rnn", "float32", 16, 256, False, "persistent", None, None),
         ("rnn", "float32", 16, 256, True, "cluster", None, "barrier"),
         ("rnn", "float32", 16, 256, True, "cluster", None, "async"),
         ("lstm", "bfloat16", 16, 768, True, "persistent", None, None)]


def set_knobs(reg_tile, exchange):
    wait = None
    if reg_tile == "range":
        reg_tile, wait = "1", "range"
    for name, value in zip(KNOBS, (reg_tile, exchange, wait)):
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def event_us(fn):
    return measure_cuda(fn) * 1e6


def summarize(trace, backward, skip):
    """Per phase the median ns over blocks and steps past `skip`; the step's; the last
    arriver's wait; the arrivals' spread. Blocks that changed SM (preempted and resumed
    elsewhere: their clocks are two SMs') are left out of the clock phases and counted."""
    if trace["marks"].shape[1] <= skip:
        raise ValueError(f"no steps past the first {skip}: trace more steps")
    sm = trace["sm"][:, skip:]
    stayed = (sm == sm[:, :1]).all(dim=1)
    if not bool(stayed.any()):
        raise ValueError("every block changed SM during the trace")
    clocks = trace["marks"][stayed, skip:, :]
    marks = (clocks - clocks[:, :1, :1]).to(torch.float64) * trace["ns_per_cycle"]
    d = marks[:, :, 1:] - marks[:, :, :-1]  # [blocks, steps, phases]
    out = {name: float(d[:, :, i].median()) for i, name in enumerate(PHASES[backward])}
    out["moved_blocks"] = int((~stayed).sum())
    out["step"] = float((marks[:, :, -1] - marks[:, :, 0]).median())
    wait = d[:, :, WAIT[backward]]
    out["last"] = float(wait.min(dim=0).values.median())
    out["wait_p90"] = float(wait.flatten().quantile(0.9))
    # the blocks' arrivals by the global timer: a step's spread (last less first), and the
    # timer's resolution as seen (the smallest nonzero gap between two readings)
    arrivals = trace["arrival_ns"][:, skip:].to(torch.float64)
    out["arrival_spread"] = float((arrivals.max(dim=0).values
                                   - arrivals.min(dim=0).values).median())
    gaps = arrivals.flatten().sort().values.diff()
    gaps = gaps[gaps > 0]
    out["timer_resolution"] = float(gaps.min()) if gaps.numel() else float("nan")
    return out


def run_case(case, args):
    cell, dtype, N, H, backward, path, reg_tile, exchange = case
    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    layer = MODULES[cell](H, H).to("cuda", dt)
    x = torch.randn(args.seq_len, N, H, device="cuda", dtype=dt)
    set_knobs(reg_tile, exchange)
    try:
        with rnnfast.cuda_path(path):
            if backward:
                x.requires_grad_(True)

                def fn():
                    layer(x)[0].float().sum().backward()
            else:
                def fn():
                    with torch.no_grad():
                        layer(x)
            fn()
            torch.cuda.synchronize()
            plan = _last_cuda_plan()[1 if backward else 0]
            plain = statistics.median(event_us(fn) for _ in range(args.repeats))
            before = _last_trace(backward)
            _trace_next(args.steps, backward)
            traced = event_us(fn)
            trace = _last_trace(backward)
    finally:
        _trace_next(0, backward)
        set_knobs(None, None)
    if trace is None or (before is not None and torch.equal(trace["arrival_ns"],
                                                            before["arrival_ns"])):
        raise RuntimeError("no trace was taken: the persistent path did not run")
    row = {"cell": cell, "dtype": dtype, "N": N, "H": H, "T": args.seq_len,
           "direction": "bwd" if backward else "fwd", "path": path, "reg_tile": reg_tile,
           "cluster_exchange": exchange, "plan": plan, "blocks": trace["blocks"],
           "steps": trace["steps"], "ns_per_cycle": trace["ns_per_cycle"],
           "call_us": plain, "traced_call_us": traced}
    row.update(summarize(trace, backward, min(args.skip, trace["steps"] - 1)))
    return row


def label(case):
    cell, dtype, N, H, backward, path, reg_tile, exchange = case
    knob = (f"reg={reg_tile}" if reg_tile is not None else "") + (exchange or "")
    return (f"{cell:4s} {dtype:8s} {N:>3d} {H:>4d} {'bwd' if backward else 'fwd'} "
            f"{path:10s} {knob:7s}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=128, help="steps traced")
    ap.add_argument("--skip", type=int, default=8, help="first traced steps left out")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-async", action="store_true",
                    help="leave out the cluster variant's async exchange (gpu_check, where its "
                         "smoke test failed)")
    ap.add_argument("--no-range", action="store_true",
                    help="leave out the register tile's range wait (gpu_check, where its "
                         "smoke test failed)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("trace_persistent: needs a CUDA GPU")
    prop = torch.cuda.get_device_properties(0)
    print(f"{prop.name}, {prop.multi_processor_count} SMs, torch {torch.__version__}, "
          f"T={args.seq_len}, ns a step (median over blocks and steps {args.skip}..)")
    rows = []
    for case in CASES:
        backward = case[4]
        if (args.no_async and case[7] == "async") or (args.no_range and case[6] == "range"):
            continue
        try:
            row = run_case(case, args)
        except Exception as e:  # noqa: BLE001 - a case that cannot run is reported
            print(f"{label(case)} | {type(e).__name__}: {(str(e).splitlines() or [''])[0][:150]}",
                  flush=True)
            rows.append({"case": list(case), "error": f"{type(e).__name__}: {e}"})
            continue
        rows.append(row)
        phases = "  ".join(f"{n} {row[n]:6.0f}" for n in PHASES[backward])
        print(f"{label(case)} | {phases} | step {row['step']:6.0f} last wait "
              f"{row['last']:5.0f} arrivals spread {row['arrival_spread']:5.0f} (timer "
              f"{row['timer_resolution']:.0f}, moved {row['moved_blocks']}) | events {row['call_us'] * 1e3 / args.seq_len:6.0f} "
              f"traced {row['traced_call_us'] * 1e3 / args.seq_len:6.0f} | blocks "
              f"{row['blocks']}", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"device": prop.name, "torch": torch.__version__, "rows": rows}, f,
                          indent=1)
    return rows


if __name__ == "__main__":
    main()
