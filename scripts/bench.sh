#!/usr/bin/env bash
# Sets up rnnfast (scripts/setup.sh), then runs the CPU benchmark: by default --quick
# (rnnfast, torch.nn, the reference loop and the torch.compile'd loop on 5 small shapes x
# 3 cells x forward and forward+backward; about 3 minutes on 2 cores), printing a table and
# writing JSON and a PNG under benchmarks/results/. Extra arguments go to the benchmark
# (`--set full`, `--device cuda`, filters: see --help). It runs as a module from the
# repository root, so that it measures this checkout whatever else is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m benchmarks.bench "$@"
