#!/usr/bin/env bash
# Installs what rnnfast needs and builds its extension (only when the sources changed).
# Used by scripts/bench.sh and scripts/test.sh; safe to run again.
#   PYTHON=python3.12 bash scripts/setup.sh     # another interpreter
#   RNNFAST_NO_CUDA=1 bash scripts/setup.sh     # skip the CUDA kernels
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# torch >= 2.6: keep the installed one, else install it (on a machine with no torch this
# is the CUDA build, which runs on the CPU as well and lets the CUDA kernels compile).
if ! "$PY" - <<'PYEOF' 2>/dev/null
import sys, torch
major, minor = (int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
sys.exit(0 if (major, minor) >= (2, 6) else 1)
PYEOF
then
  echo "== installing torch" >&2
  "$PY" -m pip install --progress-bar off "torch>=2.6"
fi

missing=$("$PY" - <<'PYEOF'
import importlib.util
need = {"ninja": "ninja", "pybind11": "pybind11", "numpy": "numpy", "pytest": "pytest",
        "matplotlib": "matplotlib", "tqdm": "tqdm", "hypothesis": "hypothesis",
        "setuptools": "setuptools", "wheel": "wheel",
        # the examples' data: Faker's surname lists, statsmodels' sunspot series
        "faker": "faker", "statsmodels": "statsmodels"}
print(" ".join(pkg for mod, pkg in need.items() if importlib.util.find_spec(mod) is None))
PYEOF
)
if [ -n "$missing" ]; then
  echo "== installing $missing" >&2
  "$PY" -m pip install --progress-bar off $missing
fi

# Build (editable install) when the library is missing or older than any source.
lib=$(ls rnnfast/_C*.so 2>/dev/null | head -n 1 || true)
if [ -z "$lib" ] || [ -n "$(find csrc setup.py pyproject.toml -newer "$lib" -type f 2>/dev/null | head -n 1)" ] \
   || ! "$PY" -c "import rnnfast" 2>/dev/null; then
  echo "== building rnnfast (MAX_JOBS=${MAX_JOBS:-auto})" >&2
  start=$(date +%s)
  "$PY" -m pip install --no-build-isolation --no-deps -e . >&2
  echo "== built in $(( $(date +%s) - start )) s" >&2
fi
"$PY" -c "import rnnfast, torch; print(f'rnnfast {rnnfast.__version__} on torch {torch.__version__}')"
