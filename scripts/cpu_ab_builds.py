"""Two builds of rnnfast on the CPU, each against torch.nn: for every shape and mode, the
builds take turns in fresh processes (ROUNDS each), and each process times torch.nn and
its rnnfast interleaved (rnnfast.bench.timing). Prints the median of torch.nn's time over
rnnfast's per build, so that a change is judged by ratios taken side by side on a noisy
machine, and writes the rows as JSON.

    python scripts/cpu_ab_builds.py OLD_CHECKOUT NEW_CHECKOUT out.json \\
        --dtype bfloat16 lstm:64:16:256:256 gru:100:64:2048:128 ...

A shape is cell:T:N:C:H (cell: lstm, gru, rnn). Each checkout needs its extension built
in place (python setup.py build_ext --inplace). One checkout under two settings: name it
twice, with --env-old and/or --env-new (KEY=VALUE, repeatable) for each side's children.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, sys, torch, rnnfast
from rnnfast.bench.timing import time_interleaved
cell, T, N, C, H, mode, dtype = sys.argv[1:8]
T, N, C, H = map(int, (T, N, C, H))
dt = getattr(torch, dtype)
torch.manual_seed(0)
ref = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}[cell](C, H).to(dt)
fast = {"lstm": rnnfast.LSTM, "gru": rnnfast.GRU, "rnn": rnnfast.RNN}[cell](C, H).to(dt)
fast.load_state_dict(ref.state_dict())
x = torch.randn(T, N, C).to(dt)
def timed(m):
    def run():
        if mode == "fwd":
            with torch.no_grad():
                m(x)
        else:
            xg = x.clone().requires_grad_()
            y, _ = m(xg)
            y.float().sum().backward()
    return run
out, errors = time_interleaved({"torch.nn": timed(ref), "rnnfast": timed(fast)}, 10, 0.5)
if errors:
    raise SystemExit(str(errors))
print(json.dumps({"ratio": out["torch.nn"][0] / out["rnnfast"][0], "from": rnnfast.__file__}))
"""


def ratio(checkout, shape, mode, dtype, extra_env=()):
    # run in the checkout: `python -c` puts the working directory first on sys.path
    env = dict(os.environ, PYTHONPATH=os.path.abspath(checkout))
    env.update(kv.split("=", 1) for kv in extra_env)
    cmd = [sys.executable, "-c", CHILD, *shape.split(":"), mode, dtype]
    res = subprocess.run(cmd, env=env, cwd=os.path.abspath(checkout), capture_output=True,
                         text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{checkout} {shape} {mode}: {res.stderr.strip()[-500:]}")
    got = json.loads(res.stdout.strip().splitlines()[-1])
    where = os.path.abspath(checkout)
    if not got["from"].startswith(where + os.sep):
        raise RuntimeError(f"rnnfast came from {got['from']}, not from {where}")
    return got["ratio"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("json")
    ap.add_argument("shapes", nargs="+", help="cell:T:N:C:H")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--modes", default="fwd,fwdbwd")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--env-old", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--env-new", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    for kv in args.env_old + args.env_new:
        if "=" not in kv:
            ap.error(f"--env-old/--env-new take KEY=VALUE; got {kv!r}")
    rows = []
    for shape in args.shapes:
        cell, T, N, C, H = shape.split(":")
        if cell not in ("lstm", "gru", "rnn") or not all(v.isdigit() for v in (T, N, C, H)):
            ap.error(f"a shape is cell:T:N:C:H with cell lstm, gru or rnn; got {shape!r}")
        for mode in args.modes.split(","):
            got = {"old": [], "new": []}
            for _ in range(args.rounds):
                for name in ("old", "new"):
                    got[name].append(ratio(getattr(args, name), shape, mode, args.dtype,
                                           getattr(args, "env_" + name)))
            row = dict(cell=cell, T=int(T), N=int(N), C=int(C), H=int(H), mode=mode,
                       dtype=args.dtype, old=statistics.median(got["old"]),
                       new=statistics.median(got["new"]), old_runs=got["old"],
                       new_runs=got["new"])
            rows.append(row)
            print(f"{shape:24s} {mode:6s} vs torch.nn: old {row['old']:.2f}x  "
                  f"new {row['new']:.2f}x", flush=True)
    with open(args.json, "w") as f:
        json.dump({"old": os.path.abspath(args.old), "new": os.path.abspath(args.new),
                   "env_old": args.env_old, "env_new": args.env_new,
                   "torch": __import__("torch").__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
