"""Checks a build of rnnfast: it imports, and the ops have CUDA kernels exactly where they
should. Run it with LD_BIND_NOW=1 so that every symbol of the extension must resolve at
load, not at a GPU's first call. Used by .ci/run, scripts/gpu_check.sh and scripts/compat.sh.

  LD_BIND_NOW=1 python scripts/check_build.py --cuda auto   # CUDA kernels iff torch has CUDA
  LD_BIND_NOW=1 python scripts/check_build.py --cuda yes    # they must be there
  LD_BIND_NOW=1 python scripts/check_build.py --cuda no     # a C++-only build
"""
import argparse
import sys

import torch

import rnnfast

OPS = ["rnn_forward", "rnn_backward", "lstm_forward", "lstm_backward", "gru_forward", "gru_backward"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cuda", choices=["auto", "yes", "no"], default="auto")
    args = ap.parse_args(argv)
    expect = torch.version.cuda is not None if args.cuda == "auto" else args.cuda == "yes"
    has = {op: torch._C._dispatch_has_kernel_for_dispatch_key(f"rnnfast::{op}", "CUDA") for op in OPS}
    print(f"rnnfast {rnnfast.__version__} from {rnnfast.__file__}, torch {torch.__version__}")
    wrong = [op for op, h in has.items() if h != expect]
    if wrong:
        print(f"expected {'' if expect else 'no '}CUDA kernels, but {wrong} "
              f"{'lack' if expect else 'have'} them", file=sys.stderr)
        return 1
    print(f"CUDA kernels compiled and loaded for all {len(OPS)} ops" if expect
          else "C++ kernels only: no CUDA kernels built")
    return 0


if __name__ == "__main__":
    sys.exit(main())
