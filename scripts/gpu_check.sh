#!/usr/bin/env bash
# One command for a GPU machine without internet access (torch with CUDA, nvcc,
# compute-sanitizer already there): builds rnnfast for the card present, runs the CUDA
# tests, compute-sanitizer memcheck and racecheck on a small forward+backward of each cell,
# and the GPU benchmark against torch.nn (cuDNN). Logs and JSON go to $OUT (default
# ./gpu-check-out); a short summary prints last. Each stage has its own time limit, later
# stages run even when an earlier one failed, and the exit status is non-zero if any did.
# The limits add up to under 10 minutes (the device tool's limit per call).
#   OUT=/some/dir bash scripts/gpu_check.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export PATH="$CUDA_HOME/bin:$PATH"
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
declare -A RESULT
failed=0

stage() {  # stage NAME SECONDS COMMAND...: runs it, logs to $OUT/NAME.log, records the result
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s)"
  local start=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.log"
  RESULT[$name]="rc=$rc, $(( $(date +%s) - start )) s"
  [ "$rc" -eq 0 ] || failed=1
  return "$rc"
}

{
  echo "date: $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  nvcc --version | tail -n 1
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
} | tee "$OUT/machine.txt"

ARCH=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
export TORCH_CUDA_ARCH_LIST=$ARCH
stage build 170 "$PY" setup.py build_ext --inplace

stage cuda_tests 120 "$PY" -m pytest -q --no-header -p no:cacheprovider tests/test_cuda.py \
  --junitxml "$OUT/cuda-tests.xml"

# A small forward + backward of every cell in float32 and bfloat16, in one process per
# sanitizer tool (starting torch under compute-sanitizer is the slow part).
cat > "$OUT/sanitize_case.py" <<'PYEOF'
import torch
import rnnfast
for dtype in (torch.float32, torch.bfloat16):
    for cls in (rnnfast.LSTM, rnnfast.GRU, rnnfast.RNN):
        torch.manual_seed(0)
        m = cls(8, 16, num_layers=2, bidirectional=True).cuda().to(dtype)
        x = torch.randn(5, 3, 8, device="cuda", dtype=dtype, requires_grad=True)
        out = m(x)[0]
        out.float().sum().backward()
        torch.cuda.synchronize()
        print(cls.__name__, dtype, "ok", float(out.float().abs().sum()))
PYEOF
for tool in memcheck racecheck; do
  stage "sanitize_$tool" 90 compute-sanitizer --tool "$tool" --error-exitcode 1 \
    "$PY" "$OUT/sanitize_case.py"
done

stage bench 110 "$PY" -m benchmarks.bench --device cuda --dtypes float32 bfloat16 \
  --repeats 3 --min-time 0.2 --json "$OUT/gpu-bench.json" --markdown

echo
echo "== summary ($(head -n 2 "$OUT/machine.txt" | tail -n 1))"
for k in $(printf '%s\n' "${!RESULT[@]}" | sort); do printf '%-34s %s\n' "$k" "${RESULT[$k]}"; done
grep -E "passed|failed|error" "$OUT/cuda_tests.log" | tail -n 1
grep -E "^(lstm|gru|rnn) |geomean" "$OUT/bench.log" || true
exit "$failed"
