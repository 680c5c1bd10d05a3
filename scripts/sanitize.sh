#!/usr/bin/env bash
# Builds rnnfast's C++ kernels with AddressSanitizer and UndefinedBehaviorSanitizer (no
# CUDA) in a scratch copy of this checkout, then runs CPU tests against that build with
# libasan preloaded (python itself is not instrumented). Any out-of-bounds access, use
# after free or undefined behaviour in rnnfast's code aborts the test that caused it.
#   bash scripts/sanitize.sh                 # a representative part of the suite (CI)
#   bash scripts/sanitize.sh tests           # everything; extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WORK=${SANITIZE_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/rnnfast-asan.XXXXXX")}
mkdir -p "$WORK"
# the tracked files and the untracked ones git does not ignore, as they are now
git ls-files -co --exclude-standard -z | xargs -0 cp --parents -t "$WORK"
cd "$WORK"
start=$(date +%s)
RNNFAST_NO_CUDA=1 RNNFAST_SANITIZE=1 "$PY" setup.py -q build_ext --inplace >build.log 2>&1 \
  || { tail -n 40 build.log; exit 1; }
echo "== sanitizer build in $(( $(date +%s) - start )) s ($WORK)"
ASAN_LIB=$(gcc -print-file-name=libasan.so)
UBSAN_LIB=$(gcc -print-file-name=libubsan.so)
# leaks: python and torch keep allocations for the process's life, which LeakSanitizer
# would list; out-of-bounds, use-after-free and UB are what this run is for
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:allocator_may_return_null=1:symbolize=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
export LD_PRELOAD="$ASAN_LIB $UBSAN_LIB"
export RNNFAST_HYPOTHESIS_EXAMPLES=${RNNFAST_HYPOTHESIS_EXAMPLES:-40}
if [ $# -eq 0 ]; then
  # every op and path on small shapes; the long, threaded and compile tests are left to
  # the plain run (they exercise the same code at sizes that are slow under ASan)
  set -- tests/test_ops.py tests/test_parity.py tests/test_packed.py tests/test_packed_ops.py \
    tests/test_proj.py \
    tests/test_cells_convert.py tests/test_bad_input.py tests/test_properties.py \
    tests/test_simple_rnn.py tests/test_cuda_path.py tests/test_cpu_isa.py -k "not converted_model_trains"
fi
exec "$PY" -m pytest -q -p no:cacheprovider "$@"
