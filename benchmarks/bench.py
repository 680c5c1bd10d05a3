"""rnnfast vs torch.nn vs a Python loop over torch.nn cells, side by side in one run.

    python -m benchmarks.bench            # from the repository root: the small default (CPU, about a minute)
    python -m benchmarks.bench --cells lstm --shapes classic --modes fwd
    python -m benchmarks.bench --device cuda --dtypes float32 bfloat16   # on a GPU: against cuDNN

Every contender runs the same weights on the same inputs with the same thread count;
before timing, each one's output is checked against rnnfast's (a contender that
disagrees is reported and not timed). Times are medians of repeated runs; the table
gives each contender's time and rnnfast's speedup over it. Results also go to JSON.

On the GPU (--device cuda): torch.nn is cuDNN, with TF32 off (cuBLAS and cuDNN), so
that float32 is float32 for every contender. Each call is timed with CUDA events, the
device synchronized before and after it (so a call's time includes its launch
overhead), after warm-up; medians over interleaved rounds on rotating inputs, as on the
CPU. The peak memory of one call of each contender (above what was allocated before
it) is recorded too. The "cell loop" contender is the reference Python loop: it runs in
the first --loop-repeats rounds only (default 5 on CUDA: it is 10-100x slower, and its
ratio needs no more precision than that); the others run every round. The correctness
guard's tolerance scales with the dtype and the output's scale: max |contender -
rnnfast| <= tol * max(1, max |rnnfast|), tol 1e-4 in float32/float64, 5e-3 in float16,
3e-2 in bfloat16.
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
    "issue3": (512, 64, 512, 512),
}
DEFAULT_SHAPES = {"cpu": ["classic", "batch1"], "cuda": ["classic", "batch1", "issue3"]}
CELLS = {
    "lstm": (torch.nn.LSTM, rnnfast.LSTM, torch.nn.LSTMCell, {}),
    "gru": (torch.nn.GRU, rnnfast.GRU, torch.nn.GRUCell, {}),
    "rnn": (torch.nn.RNN, rnnfast.RNN, torch.nn.RNNCell, {"nonlinearity": "tanh"}),
}
MODES = ("fwd", "fwdbwd")
DTYPES = {"float32": torch.float32, "float64": torch.float64,
          "float16": torch.float16, "bfloat16": torch.bfloat16}
HALF = (torch.float16, torch.bfloat16)
# correctness guard: max |contender - rnnfast| <= GUARD_TOL * max(1, max |rnnfast|).
# Half types round h at every step (and the cell loop also rounds the gates and the
# LSTM cell state), so they get a looser bound; a wrong function is off by O(1) anyway.
GUARD_TOL = {torch.float32: 1e-4, torch.float64: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
# per device: timed rounds (at least), seconds of runs per contender (at least, within
# MAX_ROUNDS rounds), warm-up calls, rounds of the cell loop (None: every round)
DEVICE_DEFAULTS = {
    "cpu": {"repeats": 7, "min_time": 1.0, "warmup": 2, "loop_repeats": None},
    "cuda": {"repeats": 25, "min_time": 0.25, "warmup": 3, "loop_repeats": 5},
}
MAX_ROUNDS = 50
NAMES = ["rnnfast", "torch.nn", "cell loop"]


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


def make_contenders(cell, T, N, C, H, dtype, seed=0, device="cpu"):
    nn_cls, fast_cls, cell_cls, extra = CELLS[cell]
    torch.manual_seed(seed)
    ref = nn_cls(C, H, **extra).to(dtype)
    fast = fast_cls(C, H, **extra).to(dtype)
    fast.load_state_dict(ref.state_dict())
    cell_mod = cell_cls(C, H, **extra).to(dtype)
    cell_mod.load_state_dict({k[:-3]: v for k, v in ref.state_dict().items()})  # drop "_l0"
    if device != "cpu":  # the same weights as on the CPU, then moved
        ref, fast, cell_mod = ref.to(device), fast.to(device), cell_mod.to(device)
    is_lstm = cell == "lstm"
    return {
        "rnnfast": (fast, lambda x, hx: fast(x, hx)),
        "torch.nn": (ref, lambda x, hx: ref(x, hx)),
        "cell loop": (cell_mod, cell_loop(cell_mod, is_lstm)),
    }


def first_output(out):
    return out[0]


def _first_line(e):
    lines = str(e).strip().splitlines()
    return lines[0][:300] if lines else ""


def measure_cpu(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure_cuda(fn):
    """One call's time by CUDA events, the device idle before it (so that launch overhead
    counts, as it does for a user) and synchronized after it."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3


def time_interleaved(fns, repeats, min_time, measure=measure_cpu, warmup=2, max_runs=None):
    """Median and spread (interquartile range / median) of each fn's time, timed in rounds
    of one call each: a slow patch of a shared machine then hits every contender alike,
    and the ratios stay fair. Rounds go on until each fn ran `repeats` times and, within
    MAX_ROUNDS rounds, `min_time` seconds of one contender's runs have passed. A fn named
    in max_runs runs in its first max_runs[name] rounds only (and no longer counts for
    min_time after that). A fn that raises is dropped, its error returned."""
    max_runs = max_runs or {}
    errors = {}
    fns = dict(fns)

    def call(name, fn):
        try:
            return measure(fn)
        except Exception as e:  # noqa: BLE001 - reported, not fatal for the others
            errors[name] = f"raised while timed: {type(e).__name__}: {_first_line(e)}"
            fns.pop(name, None)
            return None

    for name, fn in list(fns.items()):  # warm-up
        for _ in range(warmup):
            if call(name, fn) is None:
                break
    times = {name: [] for name in fns}
    total = {name: 0.0 for name in fns}

    def active():
        return [n for n in fns if len(times[n]) < max_runs.get(n, float("inf"))]

    rounds = 0
    while active() and (rounds < repeats
                        or (min(total[n] for n in active()) < min_time and rounds < MAX_ROUNDS)):
        for name in active():
            dt = call(name, fns[name])
            if dt is None:
                continue
            times[name].append(dt)
            total[name] += dt
        rounds += 1
    out = {}
    for name, ts in times.items():
        if name not in fns or not ts:
            continue
        ts.sort()
        med = statistics.median(ts)
        q1, q3 = ts[len(ts) // 4], ts[(3 * len(ts)) // 4]
        out[name] = (med, (q3 - q1) / med, len(ts))
    return out, errors


def peak_memory(fn):
    """Peak CUDA memory of one call, in bytes above what was allocated before it."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


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


def guard_error(got, expected):
    """max |got - expected|, in float32 at least (half types subtract exactly)."""
    if got.dtype in HALF:
        got, expected = got.float(), expected.float()
    return (got - expected).abs().max().item()


def bench_case(cell, shape_name, mode, dtype, args):
    device = getattr(args, "device", "cpu")
    T, N, C, H = SHAPES[shape_name]
    contenders = make_contenders(cell, T, N, C, H, dtype, device=device)
    g = torch.Generator().manual_seed(1)
    # several input sets, rotated, so that no contender is flattered by a warm cache;
    # drawn in float32 on the CPU, so that every dtype and device sees the same numbers
    inputs = [torch.randn(T, N, C, generator=g).to(dtype=dtype, device=device) for _ in range(3)]
    h0 = torch.zeros(1, N, H, dtype=dtype, device=device)
    hx = (h0, h0.clone()) if cell == "lstm" else h0

    # correctness guard: every contender's output must match rnnfast's (torch.nn's, if
    # rnnfast itself fails: then rnnfast is reported and the others still timed)
    rows, steps, outs = {}, {}, {}
    for name, (module, fn) in contenders.items():
        try:
            with torch.no_grad():
                outs[name] = first_output(fn(inputs[0], hx))
        except Exception as e:  # noqa: BLE001 - reported in the table, not fatal
            rows[name] = {"error": f"raised {type(e).__name__}: {_first_line(e)}; not timed"}
    for name in list(outs):
        if not torch.isfinite(outs[name]).all():
            rows[name] = {"error": "output not finite; not timed"}
            del outs[name]
    guard_ref = "rnnfast" if "rnnfast" in outs else "torch.nn"
    expected = outs.get(guard_ref)
    if expected is not None:
        tol = GUARD_TOL[dtype] * max(1.0, expected.abs().max().float().item())
    for name, (module, fn) in contenders.items():
        if name not in outs:
            continue
        if expected is None:
            rows[name] = {"error": f"nothing to check it against ({guard_ref} failed); not timed"}
            continue
        err = guard_error(outs[name], expected)
        if not err <= tol:
            rows[name] = {"error": f"disagrees with {guard_ref} (max abs diff {err:.2e}, "
                                   f"bound {tol:.1e}); not timed"}
            continue
        steps[name] = make_step(module, fn, inputs, hx, mode)
    del outs, expected

    cuda = device == "cuda"
    loop_repeats = getattr(args, "loop_repeats", None)
    max_runs = {"cell loop": loop_repeats} if loop_repeats else None
    timed, errors = time_interleaved(steps, args.repeats, args.min_time,
                                     measure=measure_cuda if cuda else measure_cpu,
                                     warmup=getattr(args, "warmup", 2), max_runs=max_runs)
    for name, e in errors.items():
        rows[name] = {"error": e}
    for name, (med, spread, n) in timed.items():
        rows[name] = {"median_s": med, "spread": spread, "runs": n, "steps_per_s": T * N / med}
        if cuda:
            try:
                rows[name]["peak_mem_bytes"] = peak_memory(steps[name])
            except Exception as e:  # noqa: BLE001
                rows[name]["peak_mem_error"] = f"{type(e).__name__}: {e}"
    rows = {name: rows[name] for name in NAMES if name in rows}
    base = rows.get("rnnfast", {}).get("median_s")
    for name, r in rows.items():
        if "median_s" in r and base:
            r["rnnfast_speedup"] = r["median_s"] / base
    if cuda:
        del steps, contenders, inputs
        torch.cuda.empty_cache()
    return {"cell": cell, "shape": shape_name, "T": T, "N": N, "C": C, "H": H, "mode": mode,
            "dtype": str(dtype).replace("torch.", ""), "device": device, "results": rows}


def machine_header(threads, device="cpu", dtypes=("float32",), loop_repeats=None):
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
    header = {"cpu": cpu, "threads": threads, "torch": torch.__version__,
              "python": platform.python_version(), "rnnfast_commit": commit,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if device == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        try:
            driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True, check=True,
                                    timeout=20).stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            driver = "unknown"
        header.update({
            "device": "cuda", "gpu": props.name,
            "capability": "%d.%d" % (props.major, props.minor),
            "gpu_memory_gib": round(props.total_memory / 2**30, 1), "driver": driver,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "tf32": ("off" if not (torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32)
                     else "ON") + f" (allow_tf32: cuBLAS {torch.backends.cuda.matmul.allow_tf32}, "
                                  f"cuDNN {torch.backends.cudnn.allow_tf32})",
            "timing": "CUDA events, median",
            "loop_repeats": loop_repeats})
    if device == "cuda" or list(dtypes) != ["float32"]:
        header["dtypes"] = list(dtypes)
    return header


def _label(rec, show_dtype):
    return f"{rec['cell']} {rec['shape']} {rec['mode']}" + (f" {rec['dtype']}" if show_dtype else "")


def format_table(records, show_dtype=False, show_mem=False):
    names = NAMES
    head = f"{'cell':5} {'shape':8} {'T':>4} {'N':>3} {'H':>4} {'mode':7}"
    if show_dtype:
        head += f" {'dtype':8}"
    head += "".join(f" {n:>11}" for n in names)
    head += f" {'vs torch.nn':>12} {'vs loop':>8}"
    if show_mem:
        head += f" {'MiB rnnfast':>11} {'MiB torch.nn':>12}"
    lines = [head, "-" * len(head)]
    for rec in records:
        res = rec["results"]
        line = f"{rec['cell']:5} {rec['shape']:8} {rec['T']:>4} {rec['N']:>3} {rec['H']:>4} {rec['mode']:7}"
        if show_dtype:
            line += f" {rec['dtype']:8}"
        for n in names:
            r = res.get(n, {})
            line += f" {r['median_s'] * 1e3:9.2f}ms" if "median_s" in r else f" {'n/a':>11}"
        for n in ("torch.nn", "cell loop"):
            s = res.get(n, {}).get("rnnfast_speedup")
            line += f" {s:11.2f}x" if s else f" {'n/a':>11}"
        if show_mem:
            for n, w in (("rnnfast", 11), ("torch.nn", 12)):
                m = res.get(n, {}).get("peak_mem_bytes")
                line += f" {m / 2**20:{w}.1f}" if m is not None else f" {'n/a':>{w}}"
        lines.append(line)
    errors = [(rec, n, r["error"]) for rec in records for n, r in rec["results"].items()
              if "error" in r]
    for rec, n, e in errors:
        lines.append(f"! {_label(rec, show_dtype)}: {n}: {e}")
    return "\n".join(lines)


def markdown_table(records, show_dtype=False, show_mem=False):
    names = NAMES
    dcol = " dtype |" if show_dtype else ""
    mcol = " peak MiB rnnfast | peak MiB torch.nn |" if show_mem else ""
    lines = ["| cell | T | N | C=H | mode |" + dcol + " " + " | ".join(names)
             + " | vs torch.nn | vs cell loop |" + mcol,
             "|---|---|---|---|---|" + ("---|" if show_dtype else "") + "---|" * (len(names) + 2)
             + ("---|---|" if show_mem else "")]
    for rec in records:
        res = rec["results"]
        cells = [f"{res[n]['median_s'] * 1e3:.2f} ms" if "median_s" in res.get(n, {}) else "n/a"
                 for n in names]
        speed = [f"{res[n]['rnnfast_speedup']:.2f}x" if res.get(n, {}).get("rnnfast_speedup")
                 else "n/a" for n in ("torch.nn", "cell loop")]
        mem = []
        if show_mem:
            mem = [f"{res[n]['peak_mem_bytes'] / 2**20:.1f}" if res.get(n, {}).get("peak_mem_bytes") is not None
                   else "n/a" for n in ("rnnfast", "torch.nn")]
        lines.append(f"| {rec['cell']} | {rec['T']} | {rec['N']} | {rec['H']} | {rec['mode']} | "
                     + (f"{rec['dtype']} | " if show_dtype else "")
                     + " | ".join(cells + speed + mem) + " |")
    return "\n".join(lines)


def geomean(values):
    values = [v for v in values if v]
    return float(torch.tensor(values).log().mean().exp()) if values else float("nan")


def summarize(records, modes, dtypes):
    """Geomean speedups per mode and dtype; the keys of float32 are the CPU table's."""
    summary = {}
    for d in dtypes:
        for m in modes:
            for other in ("torch.nn", "cell loop"):
                key = f"geomean speedup vs {other} ({m})" + ("" if d == "float32" else f" [{d}]")
                summary[key] = geomean(
                    [r["results"][other].get("rnnfast_speedup") for r in records
                     if r["mode"] == m and r["dtype"] == d and other in r["results"]])
    return summary


def write_json(path, header, summary, records):
    """Written after every case (atomically), so that a run cut short keeps what it did."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump({"machine": header, "summary": summary, "records": records}, f, indent=1)
    os.replace(tmp, path)


def check_cuda_or_exit():
    if not torch.cuda.is_available():
        built = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        sys.exit(f"bench: --device cuda needs a CUDA GPU, and there is none here "
                 f"(torch.cuda.is_available() is False; torch {torch.__version__}, {built}). "
                 "Run it on a GPU machine (scripts/gpu_check.sh does), or use --device cpu.")
    missing = [op for op in ("rnn_forward", "lstm_forward", "gru_forward")
               if not torch._C._dispatch_has_kernel_for_dispatch_key(f"rnnfast::{op}", "CUDA")]
    if missing:
        sys.exit(f"bench: rnnfast was built without its CUDA kernels (none for {missing}); rebuild "
                 "it with a CUDA toolkit present (CUDA_HOME), e.g. "
                 "pip install --no-build-isolation --no-deps -e .")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="where every contender runs (cuda: torch.nn is cuDNN; TF32 off)")
    p.add_argument("--dtypes", nargs="+", default=["float32"], choices=list(DTYPES),
                   help="float32 (default), float64; float16 and bfloat16 on cuda only")
    p.add_argument("--cells", nargs="+", default=list(CELLS), choices=list(CELLS))
    p.add_argument("--shapes", nargs="+", default=None, choices=list(SHAPES),
                   help="default: " + "; ".join(f"{d}: {' '.join(s)}" for d, s in DEFAULT_SHAPES.items())
                   + " (" + ", ".join(f"{k}=T{v[0]} N{v[1]} C{v[2]} H{v[3]}" for k, v in SHAPES.items()) + ")")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="CPU threads, the same for every contender")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed rounds (one call of each contender per round; at least; "
                   "default 7 on cpu, 25 on cuda)")
    p.add_argument("--min-time", type=float, default=None,
                   help=f"seconds of timed runs of each contender (at least, within {MAX_ROUNDS} "
                   "rounds; default 1.0 on cpu, 0.25 on cuda)")
    p.add_argument("--loop-repeats", type=int, default=None,
                   help="rounds the cell loop runs in, at most (default: every round on cpu, "
                   "5 on cuda)")
    p.add_argument("--json", default=None, help="where to write the results "
                   "(default: benchmarks/results/<device>-<date>.json)")
    p.add_argument("--markdown", action="store_true", help="also print the table as Markdown")
    args = p.parse_args(argv)
    defaults = DEVICE_DEFAULTS[args.device]
    if args.shapes is None:
        args.shapes = list(DEFAULT_SHAPES[args.device])
    if args.repeats is None:
        args.repeats = defaults["repeats"]
    if args.min_time is None:
        args.min_time = defaults["min_time"]
    if args.loop_repeats is None:
        args.loop_repeats = defaults["loop_repeats"]
    args.warmup = defaults["warmup"]
    dtypes = list(dict.fromkeys(args.dtypes))
    if args.device == "cpu" and any(DTYPES[d] in HALF for d in dtypes):
        p.error("float16 and bfloat16 run on the GPU only (rnnfast's CPU kernels are float32 and "
                "float64): add --device cuda")
    if args.device == "cuda":
        check_cuda_or_exit()
        # float32 is float32 for every contender: no TF32 in cuBLAS (rnnfast's GEMMs, the
        # cell loop) or cuDNN (torch.nn)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    torch.set_num_threads(args.threads)

    header = machine_header(args.threads, args.device, dtypes, args.loop_repeats)
    print("rnnfast benchmark | " + " | ".join(f"{k}: {v}" for k, v in header.items()), flush=True)
    out = args.json or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                    f"{args.device}-{header['date'][:10]}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    show_dtype = args.device == "cuda" or dtypes != ["float32"]
    show_mem = args.device == "cuda"

    cases = [(d, c, s, m) for d in dtypes for c in args.cells for s in args.shapes for m in args.modes]
    records = []
    for i, (d, c, s, m) in enumerate(cases, 1):
        print(f"[{i}/{len(cases)}] {c} {s} {m}" + (f" {d}" if show_dtype else ""), file=sys.stderr, flush=True)
        try:
            records.append(bench_case(c, s, m, DTYPES[d], args))
        except Exception as e:  # noqa: BLE001 - e.g. a CUDA error while setting up: keep going
            T, N, C, H = SHAPES[s]
            records.append({"cell": c, "shape": s, "T": T, "N": N, "C": C, "H": H, "mode": m,
                            "dtype": d, "device": args.device,
                            "results": {"rnnfast": {"error": f"case failed: {type(e).__name__}: "
                                                             f"{_first_line(e)}"}}})
        write_json(out, header, summarize(records, args.modes, dtypes), records)

    print()
    print(format_table(records, show_dtype, show_mem))
    summary = summarize(records, args.modes, dtypes)
    print()
    for k, v in summary.items():
        print(f"{k}: {v:.2f}x")

    write_json(out, header, summary, records)
    print(f"\nresults: {out}")
    if args.markdown:
        print()
        print(markdown_table(records, show_dtype, show_mem))


if __name__ == "__main__":
    main()
