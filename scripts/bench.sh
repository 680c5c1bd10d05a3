#!/usr/bin/env bash
# Sets up rnnfast (scripts/setup.sh), then runs the CPU benchmark (small default).
# Extra arguments go to benchmarks/bench.py (see --help). It runs as a module from the
# repository root, so that it measures this checkout whatever else is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m benchmarks.bench "$@"
