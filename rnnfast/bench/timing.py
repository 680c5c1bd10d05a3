"""Timing and peak memory.

Contenders are timed in interleaved rounds (one call of each per round) so that a slow
patch of a shared machine hits all of them alike. On CUDA each call is timed with CUDA
events, the device idle before it (so that launch overhead counts, as it does for a
user) and synchronized after it.
"""
import ctypes
import random
import statistics
import time
from typing import Callable, Dict, Optional

import torch

MAX_ROUNDS = 50


def measure_cpu(fn: Callable) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure_cuda(fn: Callable) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3


def first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:300] if lines else ""


def time_interleaved(fns: Dict[str, Callable], repeats: int, min_time: float,
                     measure: Callable = measure_cpu, warmup: int = 2,
                     max_runs: Optional[Dict[str, int]] = None):
    """Median, spread ((q3 - q1) / median) and run count of each fn. Each fn runs until it
    has `repeats` runs and `min_time` seconds of runs (at most MAX_ROUNDS runs, and at
    most max_runs[name] for a name given there); rounds go on while any fn still needs
    runs, so the slow ones stop early and the fast ones get many samples. Each round
    runs them in a seeded random order. A fn that
    raises is dropped and its error returned."""
    max_runs = max_runs or {}
    errors: Dict[str, str] = {}
    fns = dict(fns)

    def call(name):
        try:
            return measure(fns[name])
        except Exception as e:  # noqa: BLE001 - reported, not fatal for the others
            errors[name] = f"raised while timed: {type(e).__name__}: {first_line(e)}"
            fns.pop(name, None)
            return None

    for name in list(fns):
        for _ in range(warmup):
            if call(name) is None:
                break
    times = {name: [] for name in fns}
    total = {name: 0.0 for name in fns}

    def needs_more(n):
        k = len(times[n])
        if k >= max_runs.get(n, MAX_ROUNDS):
            return False
        return k < repeats or total[n] < min_time

    # each round in an order of its own (seeded: runs repeat): at sizes where a call is all
    # fixed cost, the contender that runs right after another one (the compiled loop's
    # guards, say) finds less of its own code and data in cache, and in a fixed or merely
    # rotated order it would always follow the same one
    rng = random.Random(0)
    while True:
        active = [n for n in fns if needs_more(n)]
        if not active:
            break
        rng.shuffle(active)
        for name in active:
            dt = call(name)
            if dt is not None:
                times[name].append(dt)
                total[name] += dt
    out = {}
    for name, ts in times.items():
        if name not in fns or not ts:
            continue
        ts.sort()
        med = statistics.median(ts)
        q1, q3 = ts[len(ts) // 4], ts[(3 * len(ts)) // 4]
        out[name] = (med, (q3 - q1) / med, len(ts))
    return out, errors


def peak_memory_cuda(fn: Callable) -> int:
    """Peak CUDA memory of one call, in bytes above what was allocated before it."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _rss_field(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{key} not in /proc/self/status")


_libc = None


def peak_memory_cpu(fn: Callable) -> Optional[int]:
    """Peak resident memory of one call above the resident size before it (Linux): free
    heap memory is handed back to the OS first (malloc_trim) and the high-water mark
    reset (/proc/self/clear_refs), so memory the call touches shows as growth. Counts
    touched pages, so it slightly undercounts buffers allocated and never written.
    None where the OS does not offer this."""
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL("libc.so.6")
        _libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _rss_field("VmRSS")
    except (OSError, AttributeError):
        return None
    fn()
    return max(0, _rss_field("VmHWM") - base)
