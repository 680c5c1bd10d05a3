"""The machine header, the tables (terminal and Markdown), geomean summaries and JSON."""
import datetime
import json
import math
import os
import platform
import subprocess
from typing import Dict, List, Sequence

import torch

from .. import _ops


def machine_header(threads: int, device: str) -> dict:
    cpu = platform.processor() or platform.machine()
    # family and model tell apart CPUs that share a model name ('AMD EPYC': Zen 3 is
    # family 25, Zen 5 family 26)
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "cpu family", "model") and key not in fields:
                    fields[key] = value.strip()
                if not line.strip() and fields:
                    break  # the first processor's block is enough
    except OSError:
        pass
    cpu = fields.get("model name", cpu)
    cpu_id = (f"family {fields['cpu family']} model {fields['model']}"
              if "cpu family" in fields and "model" in fields else "")
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=here, check=True, timeout=20).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=here, check=True, timeout=20).stdout.strip()
        commit += "+changes" if dirty else ""
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    header = {"device": device, "cpu": cpu, "cpu_threads": threads, "torch": torch.__version__,
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
            "gpu": props.name, "capability": f"{props.major}.{props.minor}",
            "gpu_memory_gib": round(props.total_memory / 2**30, 1), "driver": driver,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "tf32": "off" if not (torch.backends.cuda.matmul.allow_tf32
                                  or torch.backends.cudnn.allow_tf32) else "on",
            "timing": "CUDA events per call, device idle before it; median"})
    else:
        header["timing"] = "perf_counter per call; median"
    header["cpu_isa"] = _ops.get_cpu_isa()  # which build of rnnfast's CPU kernels ran
    if cpu_id:
        header["cpu_id"] = cpu_id
    return header


def header_line(header: dict) -> str:
    keys = ["device", "gpu", "capability", "cpu", "cpu_id", "cpu_isa", "cpu_threads", "torch",
            "cuda", "cudnn", "tf32", "rnnfast_commit", "date"]
    return " | ".join(f"{k}: {header[k]}" for k in keys if k in header)


def case_label(rec: dict) -> str:
    return f"{rec['cell']} {rec['mode']} {rec['dtype']} {rec['shape']}"


def _ms(r: dict) -> str:
    return f"{r['median_s'] * 1e3:.2f}" if "median_s" in r else "n/a"


def _speedup(rec: dict, other: str) -> str:
    s = rec["results"].get(other, {}).get("rnnfast_speedup")
    return f"{s:.2f}x" if s else "n/a"


def _rate(r: dict) -> str:
    v = r.get("steps_per_s")
    if not v:
        return "n/a"
    return f"{v / 1e6:.2f}M" if v >= 1e6 else f"{v / 1e3:.1f}k"


def _mib(r: dict) -> str:
    m = r.get("peak_mem_bytes")
    return f"{m / 2**20:.1f}" if m is not None else "n/a"


def _us_per_step(rec: dict) -> str:
    r = rec["results"].get("rnnfast", {})
    return f"{r['median_s'] / rec['T'] * 1e6:.1f}" if "median_s" in r else "n/a"


def table_rows(records: Sequence[dict], contenders: Sequence[str]):
    """Column names and rows (lists of strings) of the results table. On CUDA two more
    columns: rnnfast's time per step (time / T) and the path it took (forward, or
    forward/backward)."""
    others = [c for c in contenders if c != "rnnfast"]
    cuda = any(rec["device"] == "cuda" for rec in records)
    cols = (["cell", "mode", "dtype", "shape", "T", "N", "C", "H", "L", "D"]
            + [f"{c} ms" for c in contenders] + ["rnnfast steps/s"]
            + (["rnnfast us/step", "path"] if cuda else [])
            + [f"vs {c}" for c in others] + ["MiB rnnfast", "MiB torch.nn"])
    rows = []
    for rec in records:
        res = rec["results"]
        rows.append([rec["cell"], rec["mode"], rec["dtype"], rec["shape"], str(rec["T"]), str(rec["N"]),
                     str(rec["C"]), str(rec["H"]), str(rec["layers"]), str(rec["D"])]
                    + [_ms(res.get(c, {})) for c in contenders] + [_rate(res.get("rnnfast", {}))]
                    + ([_us_per_step(rec), res.get("rnnfast", {}).get("cuda_path", "n/a")]
                       if cuda else [])
                    + [_speedup(rec, c) for c in others]
                    + [_mib(res.get("rnnfast", {})), _mib(res.get("torch.nn", {}))])
    return cols, rows


def format_table(records: Sequence[dict], contenders: Sequence[str]) -> str:
    cols, rows = table_rows(records, contenders)
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)]
    left = 4  # cell, mode, dtype, shape: left-aligned
    fmt = lambda vals: "  ".join(v.ljust(w) if i < left else v.rjust(w)  # noqa: E731
                                 for i, (v, w) in enumerate(zip(vals, widths)))
    lines = [fmt(cols), "-" * (sum(widths) + 2 * (len(widths) - 1))] + [fmt(r) for r in rows]
    for rec in records:
        for name, r in rec["results"].items():
            if "error" in r:
                lines.append(f"! {case_label(rec)}: {name}: {r['error']}")
    return "\n".join(lines)


def markdown_table(records: Sequence[dict], contenders: Sequence[str]) -> str:
    cols, rows = table_rows(records, contenders)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def geomean(values: List[float]) -> float:
    values = [v for v in values if v and v > 0]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def summarize(records: Sequence[dict], contenders: Sequence[str]) -> Dict[str, dict]:
    """Geomean speedup of rnnfast over each other contender, per (dtype, mode), with the
    number of cases it is taken over and the slowest and fastest ratio."""
    out: Dict[str, dict] = {}
    dtypes = list(dict.fromkeys(r["dtype"] for r in records))
    modes = list(dict.fromkeys(r["mode"] for r in records))
    for d in dtypes:
        for m in modes:
            for other in contenders:
                if other == "rnnfast":
                    continue
                vals = [r["results"][other]["rnnfast_speedup"] for r in records
                        if r["dtype"] == d and r["mode"] == m
                        and r["results"].get(other, {}).get("rnnfast_speedup")]
                if vals:
                    out[f"{d} {m} vs {other}"] = {"geomean": geomean(vals), "cases": len(vals),
                                                  "min": min(vals), "max": max(vals)}
    return out


def format_summary(summary: Dict[str, dict]) -> str:
    lines = ["rnnfast speedup (geomean over cases; min-max):"]
    for k, v in summary.items():
        lines.append(f"  {k:40} {v['geomean']:6.2f}x  over {v['cases']:2} cases  "
                     f"({v['min']:.2f}x-{v['max']:.2f}x)")
    return "\n".join(lines)


def write_json(path: str, payload: dict) -> None:
    """Atomically, so that a run cut short keeps what it did."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)
