"""rnnfast vs torch.nn vs a Python loop over torch.nn cells, side by side in one run.

    python -m benchmarks.bench            # from the repository root: the small default (CPU, about a minute)
    python -m benchmarks.bench --cells lstm --shapes classic --modes fwd

Every contender runs the same weights on the same inputs with the same thread count;
before timing, each one's output is checked against rnnfast's (a contender that
disagrees is reported and not timed). Times are medians of repeated runs; the table
gives each contender's time and rnnfast's speedup over it. Results also go to JSON.
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

import rnnfast

# name: (T, N, C, H)
SHAPES = {
    "classic": (100, 64, 256, 256),
    "batch1": (100, 1, 256, 256),
    "issue3": (512, 64, 512, 512),  # the CUDA kernels' target shape (GPU default only)
}
DEFAULT_SHAPES = {"cpu": ["classic", "batch1"], "cuda": ["classic", "batch1", "issue3"]}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# correctness guard: max |difference| from rnnfast's output, relative to max(1, |output|)
GUARD = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
CELLS = {
    "lstm": (torch.nn.LSTM, rnnfast.LSTM, torch.nn.LSTMCell, {}),
    "gru": (torch.nn.GRU, rnnfast.GRU, torch.nn.GRUCell, {}),
    "rnn": (torch.nn.RNN, rnnfast.RNN, torch.nn.RNNCell, {"nonlinearity": "tanh"}),
}
MODES = ("fwd", "fwdbwd")


def cell_loop(cell_module, is_lstm):
    """A Python loop over a torch.nn cell: what people write without a fused layer."""
    def run(x, hx):
        h = hx[0][0] if is_lstm else hx[0]
        c = hx[1][0] if is_lstm else None
        ys = []
        for t in range(x.shape[0]):
            if is_lstm:
                h, c = cell_module(x[t], (h, c))
            else:
                h = cell_module(x[t], h)
            ys.append(h)
        return torch.stack(ys), h
    return run


def make_contenders(cell, T, N, C, H, dtype, device="cpu", seed=0):
    nn_cls, fast_cls, cell_cls, extra = CELLS[cell]
    torch.manual_seed(seed)
    ref = nn_cls(C, H, **extra).to(device, dtype)
    fast = fast_cls(C, H, **extra).to(device, dtype)
    fast.load_state_dict(ref.state_dict())
    cell_mod = cell_cls(C, H, **extra).to(device, dtype)
    cell_mod.load_state_dict({k[:-3]: v for k, v in ref.state_dict().items()})  # drop "_l0"
    is_lstm = cell == "lstm"
    return {
        "rnnfast": (fast, lambda x, hx: fast(x, hx)),
        "torch.nn": (ref, lambda x, hx: ref(x, hx)),
        "cell loop": (cell_mod, cell_loop(cell_mod, is_lstm)),
    }


def first_output(out):
    return out[0]


def time_interleaved(fns, repeats, min_time, device="cpu"):
    """Median and spread (interquartile range / median) of each fn's time, timed in
    rounds of one call each: a slow patch of a shared machine then hits every contender
    alike, and the ratios stay fair. Rounds go on until each fn ran `repeats` times and,
    within 50 rounds, `min_time` seconds of one contender's runs have passed. On CUDA each
    call is timed with CUDA events around it, the device idle before it starts."""
    for fn in fns.values():  # warm-up
        fn()
        fn()

    def timed(fn):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    times = {name: [] for name in fns}
    total = {name: 0.0 for name in fns}
    rounds = 0
    while rounds < repeats or (min(total.values()) < min_time and rounds < 50):
        for name, fn in fns.items():
            dt = timed(fn)
            times[name].append(dt)
            total[name] += dt
        rounds += 1
    out = {}
    for name, ts in times.items():
        ts.sort()
        med = statistics.median(ts)
        q1, q3 = ts[len(ts) // 4], ts[(3 * len(ts)) // 4]
        out[name] = (med, (q3 - q1) / med, len(ts))
    return out


def make_step(module, fn, inputs, hx, mode):
    """One timed call: forward (no grad) or forward + backward of the output's sum, on the
    next of the rotating input sets."""
    state = {"i": 0}

    def step():
        x = inputs[state["i"] % len(inputs)]
        state["i"] += 1
        if mode == "fwd":
            with torch.no_grad():
                fn(x, hx)
        else:
            xr = x.requires_grad_(True)
            out = first_output(fn(xr, hx))
            out.sum().backward()
            xr.grad = None
            module.zero_grad(set_to_none=True)
            xr.requires_grad_(False)
    return step


def bench_case(cell, shape_name, mode, dtype, args):
    T, N, C, H = SHAPES[shape_name]
    dev = args.device
    contenders = make_contenders(cell, T, N, C, H, dtype, dev)
    g = torch.Generator().manual_seed(1)
    # several input sets, rotated, so that no contender is flattered by a warm cache
    inputs = [torch.randn(T, N, C, generator=g).to(dev, dtype) for _ in range(3)]
    h0 = torch.zeros(1, N, H, dtype=dtype, device=dev)
    hx = (h0, h0.clone()) if cell == "lstm" else h0

    # correctness guard: every contender's output must match rnnfast's
    with torch.no_grad():
        expected = first_output(contenders["rnnfast"][1](inputs[0], hx))
    rows, steps = {}, {}
    for name, (module, fn) in contenders.items():
        with torch.no_grad():
            got = first_output(fn(inputs[0], hx))
        err = (got.float() - expected.float()).abs().max().item()
        if not err <= GUARD[dtype] * max(1.0, expected.float().abs().max().item()):
            rows[name] = {"error": f"disagrees with rnnfast (max abs diff {err:.2e}); not timed"}
            continue
        steps[name] = make_step(module, fn, inputs, hx, mode)
    for name, (med, spread, n) in time_interleaved(steps, args.repeats, args.min_time,
                                                   dev).items():
        rows[name] = {"median_s": med, "spread": spread, "runs": n, "steps_per_s": T * N / med}
    base = rows["rnnfast"].get("median_s")
    for name, r in rows.items():
        if "median_s" in r and base:
            r["rnnfast_speedup"] = r["median_s"] / base
    return {"cell": cell, "shape": shape_name, "T": T, "N": N, "C": C, "H": H, "mode": mode,
            "dtype": str(dtype).replace("torch.", ""), "device": dev, "results": rows}


def machine_header(threads, device="cpu"):
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=os.path.dirname(os.path.abspath(__file__)),
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    gpu = {}
    if device == "cuda":
        gpu = {"gpu": torch.cuda.get_device_name(), "cuda": torch.version.cuda,
               "tf32": "off (fp32 GEMMs in full fp32 for every contender)"}
    return {"cpu": cpu, "threads": threads, **gpu, "torch": torch.__version__,
            "python": platform.python_version(), "rnnfast_commit": commit,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def format_table(records):
    names = ["rnnfast", "torch.nn", "cell loop"]
    head = f"{'cell':5} {'shape':8} {'T':>4} {'N':>3} {'H':>4} {'dtype':8} {'mode':7}"
    head += "".join(f" {n:>11}" for n in names)
    head += f" {'vs torch.nn':>12} {'vs loop':>8}"
    lines = [head, "-" * len(head)]
    for rec in records:
        res = rec["results"]
        line = (f"{rec['cell']:5} {rec['shape']:8} {rec['T']:>4} {rec['N']:>3} {rec['H']:>4} "
                f"{rec['dtype']:8} {rec['mode']:7}")
        for n in names:
            r = res.get(n, {})
            line += f" {r['median_s'] * 1e3:9.2f}ms" if "median_s" in r else f" {'n/a':>11}"
        for n in ("torch.nn", "cell loop"):
            s = res.get(n, {}).get("rnnfast_speedup")
            line += f" {s:11.2f}x" if s else f" {'n/a':>11}"
        lines.append(line)
    errors = [(rec, n, r["error"]) for rec in records for n, r in rec["results"].items()
              if "error" in r]
    for rec, n, e in errors:
        lines.append(f"! {rec['cell']} {rec['shape']} {rec['mode']}: {n}: {e}")
    return "\n".join(lines)


def markdown_table(records):
    names = ["rnnfast", "torch.nn", "cell loop"]
    lines = ["| cell | T | N | C=H | dtype | mode | " + " | ".join(names)
             + " | vs torch.nn | vs cell loop |",
             "|---|---|---|---|---|---|" + "---|" * (len(names) + 2)]
    for rec in records:
        res = rec["results"]
        cells = [f"{res[n]['median_s'] * 1e3:.2f} ms" if "median_s" in res.get(n, {}) else "n/a"
                 for n in names]
        speed = [f"{res[n]['rnnfast_speedup']:.2f}x" if res.get(n, {}).get("rnnfast_speedup")
                 else "n/a" for n in ("torch.nn", "cell loop")]
        lines.append(f"| {rec['cell']} | {rec['T']} | {rec['N']} | {rec['H']} | {rec['dtype']} "
                     f"| {rec['mode']} | "
                     + " | ".join(cells + speed) + " |")
    return "\n".join(lines)


def geomean(values):
    values = [v for v in values if v]
    return float(torch.tensor(values).log().mean().exp()) if values else float("nan")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", nargs="+", default=list(CELLS), choices=list(CELLS))
    p.add_argument("--shapes", nargs="+", default=None, choices=list(SHAPES),
                   help="default: classic batch1 (cpu), classic batch1 issue3 (cuda)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="CPU threads, the same for every contender")
    p.add_argument("--repeats", type=int, default=7, help="timed rounds (one call of each contender per round; at least)")
    p.add_argument("--min-time", type=float, default=1.0, help="seconds of timed runs of each contender (at least, within 50 rounds)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="cuda: torch.nn is cuDNN; times from CUDA events")
    p.add_argument("--dtypes", nargs="+", default=["float32"], choices=list(DTYPES),
                   help="float16 and bfloat16 on cuda only")
    p.add_argument("--json", default=None, help="where to write the results "
                   "(default: benchmarks/results/cpu-<date>.json)")
    p.add_argument("--markdown", action="store_true", help="also print the table as Markdown")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench: --device cuda asked for, but torch sees no CUDA GPU here")
    if args.device == "cpu" and set(args.dtypes) - {"float32"}:
        sys.exit("bench: float16 and bfloat16 run on --device cuda only")
    shapes = args.shapes or DEFAULT_SHAPES[args.device]
    torch.set_num_threads(args.threads)
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False

    header = machine_header(args.threads, args.device)
    print("rnnfast benchmark | " + " | ".join(f"{k}: {v}" for k, v in header.items()), flush=True)
    cases = [(c, s, d, m) for d in args.dtypes for c in args.cells for s in shapes
             for m in args.modes]
    records = []
    for i, (c, s, d, m) in enumerate(cases, 1):
        print(f"[{i}/{len(cases)}] {c} {s} {d} {m}", file=sys.stderr, flush=True)
        records.append(bench_case(c, s, m, DTYPES[d], args))

    print()
    print(format_table(records))
    summary = {}
    for d in args.dtypes:
        for m in args.modes:
            for other in ("torch.nn", "cell loop"):
                key = f"geomean speedup vs {other} ({m})" + ("" if d == "float32" else f" [{d}]")
                summary[key] = geomean(
                    [r["results"][other].get("rnnfast_speedup") for r in records
                     if r["mode"] == m and r["dtype"] == d and other in r["results"]])
    print()
    for k, v in summary.items():
        print(f"{k}: {v:.2f}x")

    out = args.json or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                    f"{args.device}-{header['date'][:10]}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"machine": header, "summary": summary, "records": records}, f, indent=1)
    print(f"\nresults: {out}")
    if args.markdown:
        print()
        print(markdown_table(records))


if __name__ == "__main__":
    main()
