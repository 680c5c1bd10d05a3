#!/usr/bin/env bash
# Sets up rnnfast (scripts/setup.sh), then runs the CPU benchmark (small default).
# Extra arguments go to benchmarks/bench.py (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" benchmarks/bench.py "$@"
