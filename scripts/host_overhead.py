#!/usr/bin/env python3
"""Where a CUDA forward call's host time goes: the host microseconds of one call (no
synchronisation inside the timed region) on each CUDA path at T = 1, against torch.nn's,
and a cProfile of the persistent path's calls (the Python frames and the op itself).

  python scripts/host_overhead.py          # on a GPU machine

The third H100 run's data and the fourth run's calib showed a forward call costing about
0.7-0.85 ms of host time whatever T; this says which part of the call it is.
"""
import cProfile
import io
import os
import pstats
import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import rnnfast  # noqa: E402


def host_us(fn, n=200):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
        torch.cuda.synchronize()
    return statistics.median(times)


def main():
    if not torch.cuda.is_available():
        sys.exit("host_overhead: needs a CUDA GPU")
    torch.manual_seed(0)
    for cell, dtype, N, H in (("LSTM", torch.bfloat16, 16, 768), ("RNN", torch.float32, 16, 256)):
        m = getattr(rnnfast, cell)(H, H).to("cuda", dtype)
        ref = getattr(torch.nn, cell)(H, H).to("cuda", dtype)
        x = torch.randn(1, N, H, device="cuda", dtype=dtype)
        line = f"{cell} {dtype} N={N} H={H} T=1 host us:"
        with torch.no_grad():
            line += f" torch.nn {host_us(lambda: ref(x)):.0f}"
            for path in ("step", "persistent", "cluster", "auto"):
                with rnnfast.cuda_path(path):
                    try:
                        line += f" {path} {host_us(lambda: m(x)):.0f}"
                    except RuntimeError as e:
                        line += f" {path} n/a ({str(e).splitlines()[0][:60]})"
            if dtype != torch.float32:  # the tiled forward in place of the register tile
                os.environ["RNNFAST_REG_TILE"] = "0"
                with rnnfast.cuda_path("persistent"):
                    line += f" persistent-tiled {host_us(lambda: m(x)):.0f}"
                del os.environ["RNNFAST_REG_TILE"]
        print(line, flush=True)
        with torch.no_grad(), rnnfast.cuda_path("persistent"):
            pr = cProfile.Profile()
            pr.enable()
            for _ in range(200):
                m(x)
            torch.cuda.synchronize()
            pr.disable()
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(8)
        print("\n".join(s.getvalue().splitlines()[:22]), flush=True)
        # the op's ATen calls and CUDA runtime calls (CUPTI), by their own host time: which
        # driver call, if any, the persistent paths' extra host time is
        for path in ("persistent", "step"):
            with torch.no_grad(), rnnfast.cuda_path(path):
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    for _ in range(50):
                        m(x)
                    torch.cuda.synchronize()
            print(f"-- {cell} {path}: torch.profiler, 50 calls, by self CPU time", flush=True)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14,
                                            max_name_column_width=40), flush=True)


if __name__ == "__main__":
    main()
