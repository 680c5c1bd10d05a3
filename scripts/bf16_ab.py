"""bfloat16 layers on a CPU with AVX512-BF16: torch.nn against rnnfast with its float32 GEMMs
(RNNFAST_CPU_ISA=avx512) and with its bfloat16 GEMMs (avx512bf16), the three interleaved in
one process, forward and forward+backward, at the quick set's shapes (T = 64, C = H).
Prints torch.nn's time over each rnnfast variant's and writes the rows as JSON.

    PYTHONPATH=. python scripts/bf16_ab.py out.json
"""
import contextlib
import json
import math
import sys

import torch

import rnnfast
from rnnfast import _ops
from rnnfast.bench.timing import time_interleaved

SHAPES = [(cell, 64, n, h, h, d) for cell in ("lstm", "gru", "rnn")
          for (n, h, d) in [(16, 128, 1), (16, 256, 1), (16, 512, 1), (1, 256, 1), (16, 128, 2)]]
TORCH = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}
FAST = {"lstm": rnnfast.LSTM, "gru": rnnfast.GRU, "rnn": rnnfast.RNN}


def timed(module, x, mode, isa):
    def run():
        with _ops.cpu_isa(isa) if isa else contextlib.nullcontext():
            if mode == "fwd":
                with torch.no_grad():
                    module(x)
            else:
                xg = x.clone().requires_grad_()
                y, _ = module(xg)
                y.float().sum().backward()
    return run


def main(path):
    rows = []
    for cell, T, N, C, H, D in SHAPES:
        torch.manual_seed(0)
        ref = TORCH[cell](C, H, bidirectional=D == 2).bfloat16()
        fast = FAST[cell](C, H, bidirectional=D == 2).bfloat16()
        fast.load_state_dict(ref.state_dict())
        x = torch.randn(T, N, C).bfloat16()
        for mode in ("fwd", "fwdbwd"):
            out, errors = time_interleaved({"torch.nn": timed(ref, x, mode, None),
                                            "f32": timed(fast, x, mode, "avx512"),
                                            "bf16": timed(fast, x, mode, "avx512bf16")}, 10, 0.5)
            if errors:
                raise RuntimeError(f"{cell} {mode}: {errors}")
            r = {k: out["torch.nn"][0] / out[k][0] for k in ("f32", "bf16")}
            rows.append(dict(cell=cell, mode=mode, T=T, N=N, H=H, D=D, **r))
            print(f"{cell:4s} {mode:6s} N={N:3d} H={H:4d} D={D}  f32 {r['f32']:.2f}x  "
                  f"bf16 {r['bf16']:.2f}x", flush=True)
    for cell in ("lstm", "gru", "rnn"):
        for mode in ("fwd", "fwdbwd"):
            sel = [r for r in rows if r["cell"] == cell and r["mode"] == mode]
            geo = {k: math.exp(sum(math.log(r[k]) for r in sel) / len(sel)) for k in ("f32", "bf16")}
            print(f"geomean {cell} {mode}: f32 {geo['f32']:.2f}x  bf16 {geo['bf16']:.2f}x  "
                  f"(slowest bf16 {min(r['bf16'] for r in sel):.2f}x)")
    with open(path, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
