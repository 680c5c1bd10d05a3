#!/usr/bin/env python3
"""Per-step times of the persistent CUDA kernels against their block count and cluster
size, on a GPU: the data that the `auto` cost model (csrc/cuda/persistent.cuh, CostModel)
and the choice of the block count need.

For each cell, dtype, N and H (small sets, T=256), the forward (under no_grad) and the
forward+backward run with the persistent path (grid variant) forced, once with a block per
SM (the default plan) and once for each cap in --max-blocks (RNNFAST_PERSISTENT_MAX_BLOCKS:
fewer blocks, more hidden units each, so a cheaper grid barrier and more work per block);
with the cluster variant forced, the planner's cluster size and each of --cluster-sizes
(RNNFAST_CLUSTER_SIZE); and the per-step path forced, for comparison. Then, for the 16-bit
dtypes at the larger batches of --mma-batch, the grid variant with each tensor-core tile of
--mma-rows (RNNFAST_MMA_ROWS: at most 16, 32 or 64 batch rows a tile, 64 by default; the
third H100 run measured each) beside the per-step path (its GEMMs by cuBLAS directly,
through ATen, its forward fused: RNNFAST_STEP_FUSED=1, and its steps as a CUDA graph:
RNNFAST_STEP_GRAPH=1). Times are the median of
--repeats CUDA-event timings after a warm-up, divided by T. And for the 16-bit dtypes at
the batches of --batch up to 16, the forward on the grid variant's register tile
(RNNFAST_REG_TILE=1, the default since the fourth H100 run: W_hh's slice in registers; `reg` in the
plan says whether it ran) beside the tiled forward, H in --hidden and 1024. Last, the
fixed cost of a call (--overhead-seq-lens, default T = 1, 16 and 256, forward only): the
whole call's CUDA-event time and the host's time to return from it, so that a call's time
splits into a fixed part and a part a step (the third H100 run's T = 256 and T = 1024
times disagree by 0.6-1 ms a forward call on every persistent path, a fixed cost that
this separates from the step). The float32 Elman RNN at H = 256 and N = 64 and 256
(--elman-batch) on the cluster variant at each size, with the barrier and (the planner's
size) the async exchange. A cap that does not fit on chip
is reported as such (the forced path raises). The grid variant exchanges h_t through its
grid barrier only: the other exchanges this script once compared (--exchanges: a flag per
block, and the LL exchange) were removed from the kernels after the second H100 run
measured them 1-1.5 us a step slower than the barrier everywhere.

Each row also records what the planner decided and the cost model's estimate for it
(rnnfast._ops._last_cuda_plan(): `plan_fwd`, and `plan_bwd` for fwdbwd), so that the model
can be checked and refitted against the measurement without redoing its arithmetic.

  python scripts/calibrate_persistent.py                       # prints a table
  python scripts/calibrate_persistent.py --json calib.json     # and writes the rows

Needs a CUDA GPU and rnnfast built with its CUDA kernels.
"""
import argparse
import itertools
import json
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import rnnfast  # noqa: E402
from rnnfast._ops import _last_cuda_plan  # noqa: E402

MODULES = {"lstm": rnnfast.LSTM, "gru": rnnfast.GRU, "rnn": rnnfast.RNN}
KNOBS = ("RNNFAST_PERSISTENT_MAX_BLOCKS", "RNNFAST_CLUSTER_SIZE", "RNNFAST_MMA_ROWS",
         "RNNFAST_STEP_GEMM", "RNNFAST_REG_TILE", "RNNFAST_CLUSTER_EXCHANGE",
         "RNNFAST_STEP_FUSED", "RNNFAST_STEP_GRAPH", "RNNFAST_REG_WAIT")


def time_per_step(fn, T, repeats, warmup=2):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / T)  # ms -> us, per step
    return statistics.median(times)


def measure(cell, dtype, N, H, T, path, knob, mode, repeats, mma_rows=None, step_gemm=None,
            reg_tile=None, exchange=None, reg_wait=None):
    """(microseconds per step, or the first line of the error the call raised; the paths
    that ran; the planner's decisions, rnnfast._ops._last_cuda_plan(): the cost model's
    estimates beside the measurement). knob: the value of RNNFAST_PERSISTENT_MAX_BLOCKS
    (path persistent) or RNNFAST_CLUSTER_SIZE (path cluster), 0 for none; mma_rows:
    RNNFAST_MMA_ROWS (path persistent); step_gemm: RNNFAST_STEP_GEMM (path step), or
    "fused": RNNFAST_STEP_FUSED=1 instead (the fused 16-bit forward), or "graph":
    RNNFAST_STEP_GRAPH=1 (the steps replayed as a CUDA graph, captured in the warm-up); reg_tile:
    RNNFAST_REG_TILE (path persistent); exchange: RNNFAST_CLUSTER_EXCHANGE (path cluster);
    reg_wait: RNNFAST_REG_WAIT (the register tile's wait, "grid" or "range")."""
    torch.manual_seed(0)
    m = MODULES[cell](H, H).to("cuda", dtype)
    x = torch.randn(T, N, H, device="cuda", dtype=dtype, requires_grad=mode == "fwdbwd")
    for name in KNOBS:
        os.environ.pop(name, None)
    if knob:
        os.environ[KNOBS[0] if path == "persistent" else KNOBS[1]] = str(knob)
    if mma_rows:
        os.environ[KNOBS[2]] = str(mma_rows)
    if step_gemm == "fused":
        os.environ[KNOBS[6]] = "1"
    elif step_gemm == "graph":
        os.environ[KNOBS[7]] = "1"
    elif step_gemm:
        os.environ[KNOBS[3]] = step_gemm
    if reg_tile is not None:
        os.environ[KNOBS[4]] = str(reg_tile)
    if exchange:
        os.environ[KNOBS[5]] = exchange
    if reg_wait:
        os.environ[KNOBS[8]] = reg_wait

    def fwd():
        with torch.no_grad():
            m(x)

    def fwdbwd():
        m(x)[0].sum().backward()

    try:
        with rnnfast.cuda_path(path):
            us = time_per_step(fwd if mode == "fwd" else fwdbwd, T, repeats)
            plans = _last_cuda_plan() if path != "step" else (None, None)
            return us, rnnfast.last_cuda_path(), plans
    except RuntimeError as e:
        return str(e).strip().splitlines()[0][:160], None, (None, None)
    finally:
        for name in KNOBS:
            os.environ.pop(name, None)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cells", nargs="+", default=["lstm", "gru", "rnn"], choices=list(MODULES))
    # bfloat16 first: its N=16, H=768 forward is the latency target
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 16])
    ap.add_argument("--hidden", nargs="+", type=int, default=[256, 768])
    ap.add_argument("--max-blocks", nargs="+", type=int, default=[64])
    ap.add_argument("--mma-batch", nargs="+", type=int, default=[64, 256],
                    help="the batches at which the 16-bit tiles of --mma-rows are measured")
    ap.add_argument("--mma-rows", nargs="+", type=int, default=[16, 32, 64],
                    choices=[16, 32, 64])
    ap.add_argument("--cluster-sizes", nargs="+", type=int, default=[16, 8, 4])
    ap.add_argument("--no-reg-tile", action="store_true",
                    help="leave out the register tile's table")
    ap.add_argument("--no-exchange", action="store_true",
                    help="leave out the cluster exchanges' table")
    ap.add_argument("--elman-batch", nargs="+", type=int, default=[64, 256],
                    help="the batches of the float32 Elman RNN table (H = 256)")
    ap.add_argument("--no-elman", action="store_true",
                    help="leave out the float32 Elman RNN table")
    ap.add_argument("--no-range", action="store_true",
                    help="leave out the register tile's range wait (gpu_check, where its smoke "
                         "test failed)")
    ap.add_argument("--no-async", action="store_true",
                    help="leave out every measurement of the cluster variant's async exchange "
                         "(gpu_check, where its smoke test failed: a hang traps only after "
                         "half a minute a launch)")
    ap.add_argument("--overhead-seq-lens", nargs="*", type=int, default=[1, 16, 256],
                    help="sequence lengths of the fixed-cost table (none: no table)")
    ap.add_argument("--modes", nargs="+", default=["fwd", "fwdbwd"], choices=["fwd", "fwdbwd"])
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("calibrate_persistent: needs a CUDA GPU")
    prop = torch.cuda.get_device_properties(0)
    rows = []
    print(f"{prop.name}, {prop.multi_processor_count} SMs, torch {torch.__version__}, "
          f"T={args.seq_len}, us per step (median of {args.repeats})")
    caps = [0] + args.max_blocks
    sizes = [0] + args.cluster_sizes
    head = "  ".join(f"{'all' if c == 0 else f'<={c}':>8s}" for c in caps)
    chead = "  ".join(f"{'auto' if c == 0 else f'C={c}':>8s}" for c in sizes)
    print(f"{'cell':5s} {'dtype':9s} {'N':>4s} {'H':>5s} {'mode':6s} | persistent, blocks: "
          f"{head} | cluster: {chead} | {'step':>8s}")
    for case in cases(args.dtypes, args.cells, args.batch, args.hidden, args.modes):

        def run(path, knob, field):
            """One measurement, recorded; its table cell."""
            return record(args, rows, case, path, {field: knob}, knob=knob)
        cells = [run("persistent", cap, "max_blocks") for cap in caps]
        ccells = [run("cluster", size, "cluster_size") for size in sizes]
        step = run("step", 0, "max_blocks")
        print(f"{label(case)} | {'':20s}{'  '.join(cells)} | {'':9s}{'  '.join(ccells)} | "
              f"{step}", flush=True)
        save(args, prop, rows)  # after every case: a run cut short keeps them
    reg_table(args, prop, rows)
    exchange_table(args, prop, rows)
    elman_table(args, prop, rows)
    overhead_table(args, prop, rows)
    mma_table(args, prop, rows)
    save(args, prop, rows)
    return rows


def cases(dtypes, cells, batches, hidden, modes):
    """Each (dtype, cell, N, H, mode) as a row's case fields, dtypes outermost."""
    for dtype, cell, N, H, mode in itertools.product(dtypes, cells, batches, hidden, modes):
        yield dict(cell=cell, dtype=dtype, N=N, H=H, mode=mode)


def label(case):
    return (f"{case['cell']:5s} {case['dtype']:9s} {case['N']:4d} {case['H']:5d} "
            f"{case['mode']:6s}")


def record(args, rows, case, path, fields, knob=0, mma_rows=None, step_gemm=None,
           reg_tile=None, exchange=None, reg_wait=None):
    """One measurement of case on path (knob, mma_rows, step_gemm, reg_tile and exchange as
    measure() takes them), appended to rows with `fields`; returns its table cell."""
    us, used, plans = measure(case["cell"], getattr(torch, case["dtype"]), case["N"],
                              case["H"], args.seq_len, path, knob, case["mode"], args.repeats,
                              mma_rows, step_gemm, reg_tile, exchange,
                              *([reg_wait] if reg_wait else []))
    rows.append(dict(case, path=path, **fields, us=us, used=used, plan_fwd=plans[0],
                     plan_bwd=plans[1] if case["mode"] == "fwdbwd" else None))
    return f"{us:8.2f}" if isinstance(us, float) else f"{'n/a':>8s}"


GATES = {"lstm": 4, "gru": 3, "rnn": 1}


def fewest_reg_blocks(cell, H):
    """The fewest blocks the register tile can take for H: 32 rows of W a block, so
    32 // G units (RNNFAST_PERSISTENT_MAX_BLOCKS for it)."""
    units = 32 // GATES[cell]
    return (H + units - 1) // units


def reg_table(args, prop, rows):
    """The 16-bit forward at the batches of --batch up to 16 on the grid variant, tiled and
    on the register tile (RNNFAST_REG_TILE=0 and 1; the plan's `reg` says which ran: the
    tiled forward where the layer does not fit the register tile), the latter with a block
    per SM and with the fewest blocks it can take (RNNFAST_PERSISTENT_MAX_BLOCKS, 32 rows of
    W a block: a cheaper barrier and fewer reads of h_{t-1} from L2, more MMAs a warp), H in
    --hidden and 1024; and with a block per SM and the range wait (RNNFAST_REG_WAIT=range:
    each warp waits only for the blocks that make its k range of h; not with --no-range).
    Rows carry `reg_tile` (and `max_blocks`, and `reg_wait` for the range wait's)."""
    dtypes = [d for d in args.dtypes if d in ("bfloat16", "float16")]
    batches = [n for n in args.batch if n <= 16]
    if args.no_reg_tile or not dtypes or not batches:
        return
    hidden = sorted(set(args.hidden) | {1024})
    print(f"{'cell':5s} {'dtype':9s} {'N':>4s} {'H':>5s} {'mode':6s} | persistent forward: "
          f"{'tiled':>8s} {'register':>8s} ran | fewest blocks: {'register':>8s} ran | "
          f"{'range':>8s} ran")
    for case in cases(dtypes, args.cells, batches, hidden, ["fwd"]):
        tiled = record(args, rows, case, "persistent", {"reg_tile": 0, "max_blocks": 0},
                       reg_tile=0)
        reg = record(args, rows, case, "persistent", {"reg_tile": 1, "max_blocks": 0},
                     reg_tile=1)
        ran = (rows[-1].get("plan_fwd") or {}).get("reg")
        cap = fewest_reg_blocks(case["cell"], case["H"])
        few = record(args, rows, case, "persistent", {"reg_tile": 1, "max_blocks": cap},
                     knob=cap, reg_tile=1)
        few_ran = (rows[-1].get("plan_fwd") or {}).get("reg")
        ranged, range_ran = f"{'-':>8s}", "-"
        if not args.no_range:
            ranged = record(args, rows, case, "persistent",
                            {"reg_tile": 1, "max_blocks": 0, "reg_wait": "range"},
                            reg_tile=1, reg_wait="range")
            range_ran = (rows[-1].get("plan_fwd") or {}).get("range_wait")
        print(f"{label(case)} | {'':20s}{tiled} {reg} {ran!s:>3} | {cap:5d} blocks: {few} "
              f"{few_ran!s:>3} | {ranged} {range_ran!s:>3}", flush=True)
        save(args, prop, rows)


def exchange_table(args, prop, rows):
    """The cluster variant (the planner's size) with each exchange, RNNFAST_CLUSTER_EXCHANGE
    barrier and async, at the cases of the main table (rows carry `cluster_exchange`; the plans'
    `async` says which ran: the 16-bit forward keeps the barrier)."""
    if args.no_exchange or args.no_async:
        return
    print(f"{'cell':5s} {'dtype':9s} {'N':>4s} {'H':>5s} {'mode':6s} | cluster: "
          f"{'barrier':>8s} {'async':>8s} ran (forward, backward)")
    for case in cases(args.dtypes, args.cells, args.batch, args.hidden, args.modes):
        cells = [record(args, rows, case, "cluster", {"cluster_exchange": e}, exchange=e)
                 for e in ("barrier", "async")]
        ran = tuple((rows[-1].get(k) or {}).get("async", "-") for k in ("plan_fwd", "plan_bwd"))
        print(f"{label(case)} | {'':9s}{' '.join(cells)} {ran}", flush=True)
        save(args, prop, rows)


def elman_table(args, prop, rows):
    """The float32 Elman RNN at H = 256 and the batches of --elman-batch (forward; slower
    than cuDNN at every N in the fifth run: 3.1 us a step against 2.6 at N = 64), on the
    cluster variant at the planner's size and each of 2, 4, 8 and 16 blocks with the
    barrier, and at the planner's size with the async exchange: whether another cluster
    size would win, and what the exchange gains where many clusters share the device (rows
    carry `table` "elman", `cluster_size` and `cluster_exchange`)."""
    if args.no_elman or "rnn" not in args.cells or "float32" not in args.dtypes:
        return
    sizes = [0, 2, 4, 8, 16]
    head = "  ".join(f"{'auto' if c == 0 else f'C={c}':>8s}" for c in sizes)
    print(f"{'cell':5s} {'dtype':9s} {'N':>4s} {'H':>5s} {'mode':6s} | cluster, barrier: "
          f"{head} | {'async':>8s}")
    for case in cases(["float32"], ["rnn"], args.elman_batch, [256], ["fwd"]):
        cells = [record(args, rows, case, "cluster",
                        {"table": "elman", "cluster_size": c, "cluster_exchange": "barrier"},
                        knob=c, exchange="barrier") for c in sizes]
        async_cell = f"{'-':>8s}" if args.no_async else record(
            args, rows, case, "cluster",
            {"table": "elman", "cluster_size": 0, "cluster_exchange": "async"}, exchange="async")
        print(f"{label(case)} | {'':17s}{'  '.join(cells)} | {async_cell}", flush=True)
        save(args, prop, rows)


# (cell, dtype, N, H, path, RNNFAST_REG_TILE, RNNFAST_CLUSTER_EXCHANGE or None) of the
# fixed-cost table: the latency case on the grid variant tiled and on the register
# tile, and the float32 Elman RNN at H = 256 (slower than cuDNN in the third and fifth
# runs) on both persistent variants, the cluster variant with each exchange (the line's
# slope: the async exchange's gain a step, free of the call's fixed cost)
OVERHEAD_CASES = [("lstm", "bfloat16", 16, 768, "persistent", 0, None),
                  ("lstm", "bfloat16", 16, 768, "persistent", 1, None),
                  ("rnn", "float32", 16, 256, "persistent", 0, None),
                  ("rnn", "float32", 16, 256, "cluster", 0, None),
                  ("rnn", "float32", 16, 256, "cluster", 0, "async")]


def time_call(fn, repeats, warmup=2):
    """(median CUDA-event microseconds of one call from an idle device, median host
    microseconds until the call returned)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(warmup):
        fn()
    device, host = [], []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start.record()
        t0 = time.perf_counter()
        fn()
        host.append((time.perf_counter() - t0) * 1e6)
        end.record()
        torch.cuda.synchronize()
        device.append(start.elapsed_time(end) * 1e3)
    return statistics.median(device), statistics.median(host)


def overhead_table(args, prop, rows):
    """The forward of OVERHEAD_CASES at each T of --overhead-seq-lens: a call's device
    time and host time (rows with `overhead`: True, `call_us`, `host_us`, `T`), and the
    line through the device times (fixed microseconds a call, microseconds a step)."""
    if not args.overhead_seq_lens:
        return
    print(f"{'cell':5s} {'dtype':9s} {'N':>4s} {'H':>5s} {'path':10s} reg | call us (host us) "
          f"at T = {args.overhead_seq_lens} | fixed us, us a step")
    for cell, dtype, N, H, path, reg, exchange in OVERHEAD_CASES:
        if dtype not in args.dtypes or cell not in args.cells or (
                args.no_async and exchange == "async"):
            continue
        points = []
        cells = []
        for T in args.overhead_seq_lens:
            torch.manual_seed(0)
            m = MODULES[cell](H, H).to("cuda", getattr(torch, dtype))
            x = torch.randn(T, N, H, device="cuda", dtype=getattr(torch, dtype))
            for name in KNOBS:
                os.environ.pop(name, None)
            os.environ["RNNFAST_REG_TILE"] = str(reg)
            if exchange:
                os.environ["RNNFAST_CLUSTER_EXCHANGE"] = exchange

            def fwd():
                with torch.no_grad():
                    m(x)
            try:
                with rnnfast.cuda_path(path):
                    call_us, host_us = time_call(fwd, args.repeats)
                    plan = _last_cuda_plan()[0]
                    used = rnnfast.last_cuda_path()
            except RuntimeError as e:
                call_us, host_us, plan, used = str(e).strip().splitlines()[0][:160], None, None, None
            finally:
                for name in KNOBS:
                    os.environ.pop(name, None)
            rows.append(dict(cell=cell, dtype=dtype, N=N, H=H, mode="fwd", path=path,
                             reg_tile=reg, overhead=True, T=T, call_us=call_us, host_us=host_us,
                             used=used, plan_fwd=plan,
                             **({"cluster_exchange": exchange} if exchange else {})))
            if isinstance(call_us, float):
                points.append((T, call_us))
                cells.append(f"{call_us:.0f} ({host_us:.0f})")
            else:
                cells.append("n/a")
        fit = ""
        if len(points) >= 2:
            n = len(points)
            mt = sum(t for t, _ in points) / n
            mu = sum(u for _, u in points) / n
            slope = sum((t - mt) * (u - mu) for t, u in points) / sum((t - mt) ** 2 for t, _ in points)
            fit = f"{mu - slope * mt:.0f}, {slope:.2f}"
        label_path = path + (f"/{exchange}" if exchange else "")
        print(f"{cell:5s} {dtype:9s} {N:4d} {H:5d} {label_path:10s} {reg:3d} | {' '.join(cells)} | "
              f"{fit}", flush=True)
        save(args, prop, rows)


def mma_table(args, prop, rows):
    """The 16-bit grid variant with each tensor-core tile of --mma-rows, at --mma-batch,
    beside the per-step path, its GEMMs by cublasGemmEx called directly, through ATen
    (RNNFAST_STEP_GEMM=aten), its forward fused (RNNFAST_STEP_FUSED=1, `fused`; in bfloat16
    the backward too) and its steps as a CUDA graph (RNNFAST_STEP_GRAPH=1, `graph`)."""
    dtypes = [d for d in args.dtypes if d in ("bfloat16", "float16")]
    if not dtypes or not args.mma_batch or not args.mma_rows:
        return
    head = "  ".join(f"{f'rows={r}':>8s}" for r in args.mma_rows)
    print(f"{'cell':5s} {'dtype':9s} {'N':>4s} {'H':>5s} {'mode':6s} | persistent, tensor-core "
          f"tile: {head} | {'step':>8s} {'aten':>8s} {'fused':>8s} {'graph':>8s}")
    for case in cases(dtypes, args.cells, args.mma_batch, args.hidden, args.modes):
        cells = [record(args, rows, case, "persistent", {"mma_rows": r}, mma_rows=r)
                 for r in args.mma_rows]
        steps = [record(args, rows, case, "step", {"mma_rows": None, "step_gemm": g},
                        step_gemm=g) for g in ("cublas", "aten", "fused", "graph")]
        print(f"{label(case)} | {'':31s}{'  '.join(cells)} | {' '.join(steps)}", flush=True)
        save(args, prop, rows)


def save(args, prop, rows):
    if args.json:
        with open(args.json + ".tmp", "w") as f:
            json.dump(dict(device=prop.name, sms=prop.multi_processor_count,
                           torch=torch.__version__, T=args.seq_len, repeats=args.repeats,
                           rows=rows), f, indent=1)
        os.replace(args.json + ".tmp", args.json)


if __name__ == "__main__":
    main()
