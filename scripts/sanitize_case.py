"""One small run of an rnnfast layer on CUDA, for compute-sanitizer (scripts/gpu_check.sh):
inference forward (no grad: the path that saves nothing), then a training forward and a
backward through everything (input, initial states, every parameter), then a device
synchronize, so that every kernel has run before the process ends.

    compute-sanitizer --tool memcheck --error-exitcode 1 python scripts/sanitize_case.py --cell lstm --dtype bfloat16

Small on purpose (sanitizers slow kernels down 10-100x): T=5, N=3, C=8, H=16, 2 layers,
bidirectional, by default. Exits non-zero when something raises or a result is not finite.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import rnnfast  # noqa: E402
from rnnfast._ops import _last_step_variant, _last_trace, _trace_next  # noqa: E402

CELLS = {
    "lstm": (rnnfast.LSTM, {}),
    "gru": (rnnfast.GRU, {}),
    "rnn_tanh": (rnnfast.RNN, {"nonlinearity": "tanh"}),
    "rnn_relu": (rnnfast.RNN, {"nonlinearity": "relu"}),
}
DTYPES = {"float32": torch.float32, "float64": torch.float64,
          "float16": torch.float16, "bfloat16": torch.bfloat16}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cell", required=True, choices=list(CELLS))
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--T", type=int, default=5)
    p.add_argument("--N", type=int, default=3)
    p.add_argument("--C", type=int, default=8)
    p.add_argument("--H", type=int, default=16)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--path", default="auto", choices=["auto", "step", "persistent", "cluster"],
                   help="the CUDA path, forced (rnnfast.cuda_path)")
    p.add_argument("--calls", type=int, default=1,
                   help="runs of the whole (inference, training forward, backward), on the same "
                        "module: 2 for the per-step path's CUDA graph (RNNFAST_STEP_GRAPH=1), "
                        "which replays from a shape's second call")
    p.add_argument("--trace", action="store_true",
                   help="ask for a trace (rnnfast._ops._trace_next) of each call's first "
                        "persistent launch in each direction, and fail where none was taken")
    p.add_argument("--device", default="cuda", help="cuda; cpu only to try this script out")
    args = p.parse_args()
    rnnfast.set_cuda_path(args.path)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("sanitize_case: no CUDA GPU visible")

    dev, dtype = torch.device(args.device), DTYPES[args.dtype]
    cls, extra = CELLS[args.cell]
    torch.manual_seed(0)
    m = cls(args.C, args.H, num_layers=args.layers, bidirectional=True, **extra).to(device=dev, dtype=dtype)
    D = 2 * args.layers
    x = torch.randn(args.T, args.N, args.C, device=dev, dtype=dtype, requires_grad=True)
    h0 = torch.randn(D, args.N, args.H, device=dev, dtype=dtype, requires_grad=True)
    hx = (h0, torch.randn(D, args.N, args.H, device=dev, dtype=dtype, requires_grad=True)) \
        if args.cell == "lstm" else h0
    states = list(hx) if isinstance(hx, tuple) else [hx]

    for _ in range(args.calls):  # the gradients of the last call kept
        for t in [x, *states, *m.parameters()]:
            t.grad = None
        if args.trace:
            _trace_next(args.T, False)
            _trace_next(args.T, True)
        with torch.no_grad():
            y_inf = m(x, hx)[0]
        y, hn = m(x, hx)
        hn = list(hn) if isinstance(hn, tuple) else [hn]
        # weights on every output, so that no gradient is trivially uniform
        loss = sum((t.float() * torch.linspace(-1, 1, t.numel(), device=dev).view_as(t)).sum()
                   for t in [y] + hn)
        loss.backward()
        if dev.type == "cuda":
            torch.cuda.synchronize()

    checks = {"inference output": y_inf, "output": y, "dx": x.grad}
    checks.update({f"d{name}": p.grad for name, p in m.named_parameters()})
    checks.update({f"d(initial state {i})": s.grad for i, s in enumerate(states)})
    bad = [name for name, t in checks.items() if t is None or not torch.isfinite(t).all()]
    if args.trace and dev.type == "cuda":
        bad += [f"{d} trace" for d, b in (("forward", False), ("backward", True))
                if _last_trace(b) is None]
    # the inference forward (saves nothing) and the training forward compute the same
    # function: a gross difference means one of them read memory nothing wrote
    diff = (y_inf.double() - y.detach().double()).abs().max().item()
    tol = {torch.float16: 1e-2, torch.bfloat16: 5e-2}.get(dtype, 1e-5)
    print(f"sanitize_case {args.cell} {args.dtype} T={args.T} N={args.N} C={args.C} H={args.H} "
          f"layers={args.layers} bidirectional, path {args.path} (ran {rnnfast.last_cuda_path()}, "
          f"steps {_last_step_variant()}, {args.calls} call(s)): "
          f"{len(checks)} tensors checked, "
          f"max |inference - training forward| = {diff:.2e}"
          + (f"; NOT FINITE or missing: {bad}" if bad else "")
          + (f"; inference and training forward DIFFER (bound {tol:.0e})" if not diff <= tol else ""))
    if bad or not diff <= tol:
        sys.exit(1)


if __name__ == "__main__":
    main()
