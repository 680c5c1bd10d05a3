"""The benchmark, run from a checkout: `python -m benchmarks.bench --help`.
The code lives in rnnfast/bench/ so that `python -m rnnfast.bench` works wherever
rnnfast is installed; this entry point measures the checkout it sits in."""
from rnnfast.bench.runner import main

if __name__ == "__main__":
    main()
