"""The benchmark runner: cases (cell x shape x mode x dtype) on one device, every
contender on the same weights and inputs, a correctness guard before timing, then
interleaved timing, peak memory, a table, JSON and a PNG."""
import argparse
import os
import sys
import time

import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import rnnfast

from . import contenders as C
from .plot import plot
from .report import (case_label, format_summary, format_table, header_line, machine_header,
                     markdown_table, summarize, write_json)
from .shapes import SETS, SHAPES
from .timing import first_line, measure_cpu, measure_cuda, peak_memory_cpu, peak_memory_cuda, time_interleaved

CELLS = ("lstm", "gru", "rnn")
MODES = ("fwd", "fwdbwd")
DTYPES = {"float32": torch.float32, "float64": torch.float64,
          "float16": torch.float16, "bfloat16": torch.bfloat16}
# correctness guard: max |contender - rnnfast| <= GUARD_TOL * max(1, max |rnnfast|).
# Half types round h at every step (the loops also round the gates and the LSTM cell
# state), so they get a looser bound; a wrong function is off by O(1).
GUARD_TOL = {torch.float32: 1e-4, torch.float64: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
LOOPS = ("reference loop", "compiled loop")
# timed runs per contender (at least), seconds of runs per contender (at least), warm-up
# calls, and at most this many runs of the Python loops (None: no limit beyond MAX_ROUNDS)
TIMING = {
    ("cpu", "quick"): {"repeats": 5, "min_time": 0.2, "warmup": 1, "loop_runs": None},
    ("cpu", "full"): {"repeats": 7, "min_time": 1.0, "warmup": 2, "loop_runs": None},
    ("cuda", "quick"): {"repeats": 15, "min_time": 0.1, "warmup": 3, "loop_runs": 3},
    ("cuda", "full"): {"repeats": 25, "min_time": 0.25, "warmup": 3, "loop_runs": 5},
}
N_INPUT_SETS = 3


def make_step(module, fn, inputs, hx, mode):
    """One timed call on the next of the rotating input sets: the forward under no_grad,
    or forward + backward of the output's sum (gradients of x and every parameter)."""
    state = {"i": 0}

    def step():
        x = inputs[state["i"] % len(inputs)]
        state["i"] += 1
        if mode == "fwd":
            with torch.no_grad():
                fn(x, hx)
        else:
            if isinstance(x, PackedSequence):
                xr = x._replace(data=x.data.detach().requires_grad_(True))
            else:
                xr = x.detach().requires_grad_(True)
            output_data(fn(xr, hx)[0]).sum().backward()
            module.zero_grad(set_to_none=True)
    return step


def output_data(out):
    """A contender's output as a tensor: a PackedSequence's data."""
    return out.data if isinstance(out, PackedSequence) else out


def guard_error(got, expected) -> float:
    return (got.float() - expected.float()).abs().max().item()


def bench_case(cell, shape, mode, dtype, device, names, timing, seed=0):
    """Times one case; returns its record. Every contender runs the same weights on the
    same inputs; one whose output disagrees with rnnfast's (torch.nn's if rnnfast
    itself failed) is reported, not timed. The CUDA path setting, which the rnnfast
    contenders switch, and their environment knobs (contenders.KNOBS) are restored
    afterwards."""
    path = rnnfast.get_cuda_path()
    knobs = {k: os.environ.get(k) for k in C.KNOBS}
    try:
        return _bench_case(cell, shape, mode, dtype, device, names, timing, seed)
    finally:
        rnnfast.set_cuda_path(path)
        C.set_knobs(knobs)


def _bench_case(cell, shape, mode, dtype, device, names, timing, seed):
    ref = C.make_torch_module(cell, shape, dtype, device, seed)
    g = torch.Generator().manual_seed(seed + 1)
    # drawn in float32 on the CPU, so every dtype and device sees the same numbers
    inputs = [torch.randn(shape.T, shape.N, shape.C, generator=g).to(dtype=dtype, device=device)
              for _ in range(N_INPUT_SETS)]
    if shape.packed:
        inputs = [pack_padded_sequence(x, shape.lengths, enforce_sorted=False) for x in inputs]
    h0 = torch.zeros(shape.layers * shape.D, shape.N, shape.H, dtype=dtype, device=device)
    hx = (h0, h0.clone()) if cell == "lstm" else h0

    rows, built, outs = {}, {}, {}
    for name in names:
        try:
            module, fn = C.build(name, ref, cell, shape, mode)
            t0 = time.perf_counter()
            with torch.no_grad():
                out = output_data(fn(inputs[0], hx)[0])
            if device == "cuda":
                torch.cuda.synchronize()
            first_call = time.perf_counter() - t0
        except C.Unavailable as e:
            rows[name] = {"skipped": str(e)}
            continue
        except Exception as e:  # noqa: BLE001 - reported in the table, not fatal
            rows[name] = {"error": f"raised {type(e).__name__}: {first_line(e)}; not timed"}
            continue
        if not torch.isfinite(out).all():
            rows[name] = {"error": "output not finite; not timed"}
            continue
        built[name], outs[name] = (module, fn), out
        rows[name] = {"first_call_s": first_call}
    guard_ref = "rnnfast" if "rnnfast" in outs else "torch.nn"
    expected = outs.get(guard_ref)
    steps = {}
    for name, out in outs.items():
        if expected is None:
            rows[name] = {"error": f"nothing to check it against ({guard_ref} failed); not timed"}
            continue
        tol = GUARD_TOL[dtype] * max(1.0, expected.abs().max().float().item())
        err = guard_error(out, expected)
        rows[name]["guard_max_abs_diff"] = err
        if not err <= tol:
            rows[name] = {"error": f"disagrees with {guard_ref} (max abs diff {err:.2e}, bound "
                                   f"{tol:.1e}); not timed"}
            continue
        module, fn = built[name]
        steps[name] = make_step(module, fn, inputs, hx, mode)
    del outs, expected

    cuda = device == "cuda"
    max_runs = {n: timing["loop_runs"] for n in LOOPS if timing["loop_runs"]}
    timed, errors = time_interleaved(steps, timing["repeats"], timing["min_time"],
                                     measure=measure_cuda if cuda else measure_cpu,
                                     warmup=timing["warmup"], max_runs=max_runs)
    for name, e in errors.items():
        rows[name] = {"error": e}
    if cuda and "rnnfast" in steps:
        # the path auto takes: one more call of rnnfast's, alone
        steps["rnnfast"]()
        torch.cuda.synchronize()
        fwd, bwd = rnnfast.last_cuda_path()
        rows["rnnfast"]["cuda_path"] = fwd if mode == "fwd" else f"{fwd}/{bwd}"
    for name, (med, spread, n) in timed.items():
        rows[name].update({"median_s": med, "spread": spread, "runs": n,
                           "steps_per_s": shape.rows / med})
        try:
            peak = peak_memory_cuda(steps[name]) if cuda else peak_memory_cpu(steps[name])
            if peak is not None:
                rows[name]["peak_mem_bytes"] = peak
        except Exception as e:  # noqa: BLE001
            rows[name]["peak_mem_error"] = f"{type(e).__name__}: {first_line(e)}"
    base = rows.get("rnnfast", {}).get("median_s")
    for name, r in rows.items():
        if "median_s" in r and base:
            r["rnnfast_speedup"] = r["median_s"] / base
    if cuda:
        del steps, built, inputs, ref
        torch.cuda.empty_cache()
    return {"cell": cell, "shape": shape.name, "T": shape.T, "N": shape.N, "C": shape.C, "H": shape.H,
            "layers": shape.layers, "D": shape.D, "mode": mode,
            **({"packed": True, "rows": shape.rows} if shape.packed else {}), "dtype": str(dtype).replace("torch.", ""),
            "device": device, "results": {n: rows[n] for n in names if n in rows}}


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


def _progress(total):
    try:
        from tqdm import tqdm
        return tqdm(total=total, file=sys.stderr, unit="case", dynamic_ncols=True,
                    mininterval=1.0 if sys.stderr.isatty() else 30.0)
    except ImportError:  # the bar is a convenience; the run does not need it
        return None


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m rnnfast.bench",
        description="rnnfast side by side with torch.nn (cuDNN on GPU), the reference Python loop, "
                    "the loop under torch.compile and (on GPU) FlashRNN and Haste: a table, JSON and a PNG.",
        epilog="Shapes: " + "; ".join(f"{n}: {s.describe()}" for n, s in SHAPES.items())
               + ". Sets: " + "; ".join(f"{k}: {' '.join(v)}" for k, v in SETS.items()))
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="where every contender runs (cuda: torch.nn is cuDNN, TF32 off)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="set", action="store_const", const="quick",
                      help="the small default (about five minutes on 2 CPU cores)")
    size.add_argument("--set", dest="set", choices=list(SETS), help="a named set of shapes (default quick)")
    size.add_argument("--shapes", nargs="+", choices=list(SHAPES), help="shapes by name")
    p.add_argument("--cells", nargs="+", default=list(CELLS), choices=CELLS)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES,
                   help="fwd: forward under no_grad; fwdbwd: forward + backward of output.sum()")
    p.add_argument("--dtypes", nargs="+", default=["float32"], choices=list(DTYPES),
                   help="float32 (default) and float64 anywhere; float16, bfloat16 on cuda")
    p.add_argument("--contenders", nargs="+", default=None, choices=list(C.BUILDERS),
                   help="default: " + "; ".join(f"{d}: {', '.join(v)}" for d, v in C.DEFAULT_CONTENDERS.items()))
    # filters on the shape axes
    p.add_argument("--hidden", nargs="+", type=int, help="keep shapes with these H")
    p.add_argument("--batch", nargs="+", type=int, help="keep shapes with these N")
    p.add_argument("--seq-len", nargs="+", type=int, help="keep shapes with these T")
    p.add_argument("--layers", nargs="+", type=int, help="keep shapes with these layer counts")
    p.add_argument("--directions", nargs="+", type=int, choices=[1, 2], help="1: one direction, 2: bidirectional")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="CPU threads, the same for every contender (default: torch's)")
    p.add_argument("--repeats", type=int, help="timed runs per contender, at least")
    p.add_argument("--min-time", type=float, help="seconds of timed runs per contender, at least")
    p.add_argument("--loop-runs", type=int, help="timed runs of the Python loops, at most")
    p.add_argument("--json", help="results file (default benchmarks/results/<device>-<set>-<date>.json when "
                                  "run from a checkout, else ./rnnfast-bench-<device>-<set>-<date>.json)")
    p.add_argument("--png", help="plot file (default: the JSON's name with .png); 'none' for no plot")
    p.add_argument("--markdown", action="store_true", help="also print the table as Markdown")
    p.add_argument("--seed", type=int, default=0)
    return p, p.parse_args(argv)


def select_shapes(args):
    names = args.shapes or SETS[args.set or "quick"]
    shapes = [SHAPES[n] for n in names]
    for attr, field in (("hidden", "H"), ("batch", "N"), ("seq_len", "T"), ("layers", "layers"),
                        ("directions", "D")):
        keep = getattr(args, attr)
        if keep:
            shapes = [s for s in shapes if getattr(s, field) in keep]
    return shapes


def default_json_path(device, label, date):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    results = os.path.join(root, "benchmarks", "results")
    name = f"{device}-{label}-{date}.json"
    if os.path.isdir(os.path.join(root, "benchmarks")):
        return os.path.join(results, name)
    return os.path.abspath(f"rnnfast-bench-{name}")


def main(argv=None):
    p, args = parse_args(argv)
    dtypes = list(dict.fromkeys(args.dtypes))
    shapes = select_shapes(args)
    if not shapes:
        p.error("no shape left after the filters (--hidden, --batch, --seq-len, --layers, --directions)")
    if args.device == "cuda":
        check_cuda_or_exit()
        # float32 is float32 for every contender: no TF32 in cuBLAS or cuDNN
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    torch.set_num_threads(args.threads)
    size = "quick" if (args.set or "quick") == "quick" and not args.shapes else "full"
    timing = dict(TIMING[(args.device, size)])
    for key, val in (("repeats", args.repeats), ("min_time", args.min_time), ("loop_runs", args.loop_runs)):
        if val is not None:
            timing[key] = val

    names = list(args.contenders or C.DEFAULT_CONTENDERS[args.device])
    if "rnnfast" not in names:
        names.insert(0, "rnnfast")
    header = machine_header(args.threads, args.device)
    skipped = {}
    for n in list(names):
        why = C.unavailable_here(n, args.device)
        if why:
            skipped[n] = why
            names.remove(n)
    header["contenders"] = names
    header["skipped_contenders"] = skipped
    header["timing_settings"] = timing
    print("rnnfast benchmark | " + header_line(header), flush=True)
    for n, why in skipped.items():
        print(f"skipped contender {n}: {why}", flush=True)

    label = "shapes" if args.shapes else (args.set or "quick")
    out = args.json or default_json_path(args.device, label, header["date"][:10])
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    png = None if args.png == "none" else (args.png or out.rsplit(".", 1)[0] + ".png")
    command = "python -m rnnfast.bench " + " ".join(sys.argv[1:] if argv is None else argv)

    cases = [(d, c, s, m) for d in dtypes for c in args.cells for s in shapes for m in args.modes]
    records = []
    bar = _progress(len(cases))
    started = time.perf_counter()
    for d, c, s, m in cases:
        label = f"{c} {m} {d} {s.name}"
        if bar is not None:
            bar.set_postfix_str(label)
        try:
            rec = bench_case(c, s, m, DTYPES[d], args.device, names, timing, args.seed)
        except Exception as e:  # noqa: BLE001 - e.g. a CUDA error while setting up: keep going
            rec = {"cell": c, "shape": s.name, "T": s.T, "N": s.N, "C": s.C, "H": s.H, "layers": s.layers,
                   "D": s.D, "mode": m, "dtype": d, "device": args.device,
                   "results": {"rnnfast": {"error": f"case failed: {type(e).__name__}: {first_line(e)}"}}}
        records.append(rec)
        write_json(out, {"machine": header, "command": command, "summary": summarize(records, names),
                         "records": records})
        if bar is not None:
            bar.update(1)
        for name, r in rec["results"].items():
            if "error" in r:
                print(f"! {case_label(rec)}: {name}: {r['error']}", file=sys.stderr, flush=True)
    if bar is not None:
        bar.close()
    elapsed = time.perf_counter() - started

    summary = summarize(records, names)
    header["elapsed_s"] = round(elapsed, 1)
    payload = {"machine": header, "command": command, "summary": summary, "records": records}
    write_json(out, payload)
    print()
    print(format_table(records, names))
    print()
    print(format_summary(summary))
    for n, why in skipped.items():
        print(f"skipped contender {n}: {why}")
    skips = sorted({(n, r["skipped"]) for rec in records for n, r in rec["results"].items() if "skipped" in r})
    for n, why in skips:
        print(f"skipped {n} in some cases: {why}")
    print(f"\n{len(cases)} cases in {elapsed:.0f} s; results: {out}")
    if png:
        try:
            if plot(payload, png):
                print(f"plot: {png}")
        except Exception as e:  # noqa: BLE001 - the numbers are written already
            print(f"plot failed: {type(e).__name__}: {first_line(e)}")
    if args.markdown:
        print()
        print(markdown_table(records, names))
    return payload
