#!/usr/bin/env bash
# The first thing to run on a GPU machine, in one command, well inside 10 minutes:
#   0. syncbench (only when named in GPU_CHECK_STAGES): the barriers and exchanges on their
#      own (scripts/sync_bench.cu, built with nvcc, no torch), for the cost model's floors;
#   1. build rnnfast from source for the card that is there (no internet needed: no pip,
#      no build isolation; torch, ninja and a CUDA toolkit must be installed already);
#   1a. smoke and smoke_range (with test_cuda, sanitize, calib or trace): the cluster
#      variant's async exchange and the register tile's range wait (never run on a GPU)
#      against the barrier, each in its own process; where one fails (a hang traps only
#      after ~36 s a launch), the later stages leave it out;
#   1b. host (only when named in GPU_CHECK_STAGES): scripts/host_overhead.py, a forward
#      call's host time on each CUDA path and the profiles of the op, into host_overhead.txt;
#   2. the CUDA tests (tests/test_cuda.py, tests/test_cuda_cluster.py,
#      tests/test_cuda_mma_rows.py, tests/test_cuda_step_gemm.py, tests/test_cuda_reg_tile.py,
#      tests/test_cuda_cluster_async.py, tests/test_cuda_step_fused.py,
#      tests/test_cuda_step_graph.py, tests/test_trace.py, tests/test_cuda_reg_range.py);
#   3. compute-sanitizer (memcheck, racecheck, synccheck) on a small forward + backward of each cell
#      (lstm, gru, rnn tanh) in float32 and bfloat16 on the persistent kernels (both variants,
#      the cluster variant also with its async exchange), the per-step path's fused kernels
#      and its CUDA graphs (two calls) (scripts/sanitize_case.py; the per-step path's kernels were clean on 2026-11-26 and
#      have not changed since);
#   3b. calib: the persistent kernels' per-step time against their block count
#      (scripts/calibrate_persistent.py, small shapes, T=256: the cost model's data; in 16
#      bits at N=64 and 256 each tensor-core tile and the per-step path, its GEMMs by
#      cuBLAS called directly and through ATen);
#   3b'. trace (only when named in GPU_CHECK_STAGES): where a persistent kernel's step
#      goes, from the SM clock at seven marks of each step inside the kernels
#      (scripts/trace_persistent.py, 13 cases, seconds), into gpu-trace.json;
#   3c. ncu (only when named in GPU_CHECK_STAGES): Nsight Compute on the grid variant's
#      kernels at bfloat16 LSTM N=256 and N=16, H=768 (scripts/ncu_profile.sh): every section
#      and the SASS lines with the most stall samples, into ncu.txt;
#   4. bench7: the persistent-kernel issue's table (--set issue7: T=1024, N 1-256, H 256-1024,
#      float32 and bfloat16) with rnnfast on auto, each path forced, and cuDNN;
#   4b. bench: the full set against cuDNN and the Python loop (rnnfast on auto), if time is left;
#   4c. peers (only when named in GPU_CHECK_STAGES): FlashRNN, Haste from .peers/ (see
#      scripts/peers.sh) and the torch.compile'd loop on two shapes;
#   5. the CPU tests (the rest of tests/), if time is left;
# then prints a summary table last. Every stage has a time limit and later stages run
# whatever happened before; the exit status is non-zero if anything failed.
#
#   bash scripts/gpu_check.sh                  # results under $OUT (default ./gpu-check-out)
#   GPU_CHECK_BUDGET=400 bash scripts/gpu_check.sh
#   GPU_CHECK_STAGES="test_cuda sanitize" bash scripts/gpu_check.sh   # a first call, then
#   GPU_CHECK_STAGES="bench7 bench" bash scripts/gpu_check.sh         # a second (the build is kept)
#
# Writes to $OUT (8 files at most, the device tool's limit): gpu_check.log (every stage's
# output), summary.txt, gpu-sync.json (JSON lines), gpu-calib.json, gpu-trace.json, gpu-bench7.json,
# gpu-bench.json and .png (gpu-peers.json and .png instead, when peers runs), test_cuda.xml
# and tests_cpu.xml (JUnit), ncu.txt (when ncu runs). syncbench runs only where GPU_CHECK_STAGES names it (the
# default stages make 8 files; the two-call plan below 6).
# Environment: PYTHON (default python3), GPU_CHECK_STAGES (the stages after build and import,
# default "test_cuda sanitize calib bench7 bench tests_cpu"), GPU_CHECK_BUDGET (seconds for the whole run,
# default 480; each stage's limit shrinks so that the later ones keep their minimum),
# MAX_JOBS (default: all cores), TORCH_CUDA_ARCH_LIST (default: the visible GPU's
# capability, e.g. 9.0), CUDA_HOME (default /usr/local/cuda, else from nvcc on the PATH),
# SANITIZE_JOBS (sanitizer processes at a time, default 6), TEST_CUDA_SHARDS (pytest
# processes at a time for the CUDA tests, default 4; 1: one plain pytest), BENCH_ARGS
# (replaces the benchmark's arguments after --device cuda), BENCH7_DTYPES (default
# "bfloat16 float32"), BENCH7_REPEATS (default 3), BENCH7_CONTENDERS (comma-separated, default
# "rnnfast,rnnfast persistent,rnnfast cluster,rnnfast step,torch.nn") and BENCH7_CAP (the
# bench7 stage's limit in seconds, default 300).
#
# With 15 device minutes (the machine's start counts too), two calls fit (the second
# finds the build in place only if it comes within the machine's 30 s idle time: run it at
# once). Measured on the H100 on 2026-11-28 (sixth run): build 82 s, host 20 s, test_cuda
# 171 s (1364 tests, 4 shards; 449 of them refused at once then), sanitize 96 s (69 runs),
# calib 28 s, the whole first call 407 s; bench7 141 cases in 311 s with 4 contenders. The
# whole lease was 789 s (one warm machine for both calls).
# The next plan: the first call checks and calibrates (the cluster variant's fix and its
# async exchange, tests/test_cuda_step_graph.py and its sanitizer runs, the step trace,
# the register tile's range wait: never run on a GPU; calib's exchange and Elman tables,
# its graph and range columns; the trace's phases of the register tile, with the barrier
# and the range wait, and of the cluster variant); the second measures the
# issue's table with the per-step graphs (RNNFAST_STEP_GRAPH=1) and the async exchange:
#   GPU_CHECK_STAGES="test_cuda sanitize calib trace" GPU_CHECK_BUDGET=490
#   GPU_CHECK_STAGES="bench7" BENCH7_DTYPES="bfloat16 float32" BENCH7_CONTENDERS="rnnfast,rnnfast async,rnnfast step graph,torch.nn" BENCH7_CAP=310 GPU_CHECK_BUDGET=330
# (leave `rnnfast async` out of the second where the first's smoke stage failed: each of
# its launches would hang until the trap)
# (or with the budget `status` leaves after the first call, less 20 s; `rnnfast step aten`
# runs the per-step path's GEMMs through ATen, against `rnnfast step`'s direct cuBLAS calls;
# `rnnfast reg` the grid variant with RNNFAST_REG_TILE=1, at N <= 16 in 16 bits only;
# `rnnfast async` auto with RNNFAST_CLUSTER_EXCHANGE=async; `rnnfast step fused` the
# per-step path with RNNFAST_STEP_FUSED=1 (16-bit, H % 8 == 0); `rnnfast step graph` the
# per-step path with RNNFAST_STEP_GRAPH=1 (16-bit);
# `rnnfast mma64` and `rnnfast mma32` force the tile, where it applies;
# scripts/host_overhead.py times a call's host time on each CUDA path)
#
# The extension is built with `python setup.py build_ext --inplace` (not scripts/setup.sh,
# which may pip install, nor pip, which may look for an index): the .so lands in rnnfast/
# and PYTHONPATH points at this checkout.
set -u
cd "$(dirname "$0")/.." || exit 1
ROOT=$(pwd)
PY=${PYTHON:-python3}
OUT=${OUT:-$ROOT/gpu-check-out}
mkdir -p "$OUT"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
LOG=$OUT/gpu_check.log
: >"$LOG"
BUDGET=${GPU_CHECK_BUDGET:-480}
START=$(date +%s)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's rnnfast, built in place
export PYTHONUNBUFFERED=1
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
STAGES=$WORK/stages.tsv
: >"$STAGES"
WANT=" ${GPU_CHECK_STAGES:-test_cuda sanitize calib bench7 bench tests_cpu} "
wanted() { [[ "$WANT" == *" $1 "* ]]; }

log() { echo "$*" | tee -a "$LOG"; }
now() { date +%s; }
remaining() { echo $((START + BUDGET - $(now))); }
# record NAME STATUS SECONDS NOTE
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "${4:-}" >>"$STAGES"; }
# seconds for a stage: its cap, or less so that `reserve` seconds stay for later stages
stage_time() {
  local cap=$1 reserve=$2 r
  r=$(($(remaining) - reserve))
  if ((r < cap)); then echo "$r"; else echo "$cap"; fi
}
status_of() {  # exit code -> PASS / TIMEOUT / FAIL(rc)
  case $1 in
    0) echo PASS ;;
    124 | 137) echo TIMEOUT ;;
    *) echo "FAIL($1)" ;;
  esac
}

# run_stage NAME CAP RESERVE CMD...: CMD under `timeout`, its output to the screen, the
# log and $WORK/NAME.out; the result recorded. Returns CMD's exit code.
run_stage() {
  local name=$1 cap=$2 reserve=$3 t s rc
  shift 3
  t=$(stage_time "$cap" "$reserve")
  if ((t < 15)); then
    log "===== [$name] skipped: no time left (budget ${BUDGET}s)"
    record "$name" SKIPPED 0 "no time left"
    return 125
  fi
  log ""
  log "===== [$name] at $(($(now) - START))s, limit ${t}s: $*"
  s=$(now)
  timeout -k 10 "$t" "$@" 2>&1 | tee -a "$LOG" "$WORK/$name.out"
  rc=${PIPESTATUS[0]}
  log "===== [$name] $(status_of "$rc") in $(($(now) - s))s"
  record "$name" "$(status_of "$rc")" "$(($(now) - s))"
  return "$rc"
}

# ---- 0. the machine ----
log "gpu_check: $(date -u +%FT%TZ) in $ROOT, budget ${BUDGET}s, MAX_JOBS=$MAX_JOBS"
if [ -z "${CUDA_HOME:-}" ]; then
  if [ -x /usr/local/cuda/bin/nvcc ]; then
    export CUDA_HOME=/usr/local/cuda
  elif command -v nvcc >/dev/null; then
    CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
    export CUDA_HOME
  fi
fi
SANITIZER=$(command -v compute-sanitizer 2>/dev/null || true)
for c in "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" \
  "${CUDA_HOME:-/usr/local/cuda}/compute-sanitizer/compute-sanitizer"; do
  if [ -z "$SANITIZER" ] && [ -x "$c" ]; then SANITIZER=$c; fi
done
{
  echo "CUDA_HOME=${CUDA_HOME:-unset}  compute-sanitizer=${SANITIZER:-not found}"
  nvidia-smi 2>&1 || echo "nvidia-smi failed"
  "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" --version 2>&1 | tail -n 2 || echo "no nvcc"
  [ -n "$SANITIZER" ] && "$SANITIZER" --version 2>&1 | tail -n 1
  ninja --version 2>&1 | sed 's/^/ninja /'
  git rev-parse --short HEAD 2>/dev/null | sed 's/^/commit /'
} 2>&1 | tee -a "$LOG"
"$PY" - >"$WORK/env.txt" 2>&1 <<'PYEOF'
import platform, torch
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"cuDNN {torch.backends.cudnn.version() if torch.cuda.is_available() else 'n/a'}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU {p.name}, capability {p.major}.{p.minor}, {p.total_memory / 2**30:.1f} GiB, "
          f"{p.multi_processor_count} SMs")
else:
    print("GPU none visible to torch")
PYEOF
tee -a "$LOG" <"$WORK/env.txt"
CAP=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null)
if [ -n "$CAP" ]; then
  record gpu PASS 0 "$(grep '^GPU' "$WORK/env.txt")"
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$CAP}
else
  log "!! torch sees no CUDA GPU: the build goes on (for ${TORCH_CUDA_ARCH_LIST:-the default archs of setup.py}), the GPU stages will fail"
  record gpu FAIL 0 "torch.cuda.is_available() is False"
fi

# ---- 0b. the barriers and exchanges on their own ----
if wanted syncbench; then
  # the synchronisation and exchange patterns on their own (scripts/sync_bench.cu: the grid
  # barrier and staging through L2, the cluster barrier, DSMEM stores, st.async),
  # a standalone program built with nvcc in seconds (no torch, so first: its numbers come
  # back even where the extension's build fails); JSON lines
  run_stage syncbench 60 400 bash -o pipefail -c '"$0" -O3 -std=c++17 -arch="sm_${1/./}" -o "$2/sync_bench" \
    scripts/sync_bench.cu && "$2/sync_bench" | tee "$3/gpu-sync.json"' \
    "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" "${CAP:-9.0}" "$WORK" "$OUT"
fi

# ---- 1. build, in place (no pip, no internet); then every op must have its CUDA kernel ----
log "TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-unset} CUDA_HOME=${CUDA_HOME:-unset} MAX_JOBS=$MAX_JOBS"
run_stage build 330 200 "$PY" setup.py build_ext --inplace
run_stage import 60 200 env LD_BIND_NOW=1 "$PY" scripts/check_build.py --cuda yes

# ---- 1c. smoke: the cluster variant's async exchange, never run on a GPU, against the
# barrier on two small layers. A broken protocol would hang each launch until its trap
# (kGridWaitTrapCycles: about half a minute), and the stages below, which launch it
# hundreds of times, would spend their whole limits there; where this fails they leave the
# async exchange out (NO_ASYNC: its tests deselected, its sanitizer runs, calib's and the
# trace's measurements of it skipped) and the summary says so ----
NO_ASYNC= NO_RANGE=
if wanted test_cuda || wanted sanitize || wanted calib || wanted trace; then
  if ! run_stage smoke 100 200 "$PY" - <<'PYEOF'
import os
import torch
import rnnfast
from rnnfast._ops import _last_cuda_plan
def run(exchange, cell, dtype):
    os.environ["RNNFAST_CLUSTER_EXCHANGE"] = exchange
    torch.manual_seed(0)
    m = {"rnn": rnnfast.RNN, "gru": rnnfast.GRU}[cell](48, 48).to("cuda", dtype)
    x = torch.randn(6, 3, 48, device="cuda", dtype=dtype, requires_grad=True)
    with rnnfast.cuda_path("cluster"):
        y, h = m(x)
        y.float().square().sum().backward()
    torch.cuda.synchronize()
    ran = tuple(p["async"] for p in _last_cuda_plan())
    return [y, h, x.grad] + [p.grad for p in m.parameters()], ran
for cell, dtype in (("rnn", torch.float32), ("gru", torch.float64)):
    a, ran = run("async", cell, dtype)
    b, _ = run("barrier", cell, dtype)
    same = all(torch.equal(u, v) for u, v in zip(a, b))
    print(f"async exchange smoke, {cell} {dtype}: ran async (forward, backward) {ran}, "
          f"equal to the barrier bit for bit: {same}")
    if ran != (1, 1) or not same:
        raise SystemExit(1)
PYEOF
  then
    NO_ASYNC=1
    log "!! the async exchange's smoke test failed: its tests, sanitizer runs and calib and trace measurements are left out"
  fi
  # the register tile's range wait (never run on a GPU), likewise: its own process, so that
  # a trap above or here leaves the other's result alone
  if ! run_stage smoke_range 100 200 "$PY" - <<'PYEOF'
import os
import torch
import rnnfast
from rnnfast._ops import _last_cuda_plan
out = {}
for wait in ("range", "grid"):
    os.environ["RNNFAST_REG_WAIT"] = wait
    torch.manual_seed(0)
    m = rnnfast.LSTM(768, 768).to("cuda", torch.bfloat16)
    x = torch.randn(6, 16, 768, device="cuda", dtype=torch.bfloat16)
    with rnnfast.cuda_path("persistent"), torch.no_grad():
        y, (h, c) = m(x)
    torch.cuda.synchronize()
    plan = _last_cuda_plan()[0]
    out[wait] = (y, h, c, plan["reg"], plan["range_wait"])
same = all(torch.equal(a, b) for a, b in zip(out["range"][:3], out["grid"][:3]))
print(f"range wait smoke, LSTM bfloat16 N=16 H=768: reg, range_wait {out['range'][3:]}, "
      f"equal to the grid barrier bit for bit: {same}")
if out["range"][3:] != (1, 1) or not same:
    raise SystemExit(1)
PYEOF
  then
    NO_RANGE=1
    log "!! the range wait's smoke test failed: its tests, sanitizer runs and calib and trace measurements are left out"
  fi
fi
KEXPR=${NO_ASYNC:+not async}
if [ -n "$NO_RANGE" ]; then KEXPR="${KEXPR:+$KEXPR and }not range"; fi

# ---- 2. the CUDA tests (each on every path) ----
if wanted test_cuda; then
  # TEST_CUDA_SHARDS pytest processes at once (scripts/pytest_shards.py): the float64
  # reference loops on the CPU are most of these tests' time, and the machine has 16 cores
  # (NO_ASYNC, NO_RANGE: every test whose name or module names the async exchange, the
  # range wait, deselected)
  run_stage test_cuda 300 160 "$PY" scripts/pytest_shards.py --shards "${TEST_CUDA_SHARDS:-4}" \
    --junitxml="$OUT/test_cuda.xml" -- -q --tb=short ${KEXPR:+"-k$KEXPR"} \
    tests/test_cuda.py tests/test_cuda_cluster.py tests/test_cuda_mma_rows.py \
    tests/test_cuda_step_gemm.py tests/test_cuda_reg_tile.py tests/test_cuda_cluster_async.py \
    tests/test_cuda_step_fused.py tests/test_cuda_step_graph.py tests/test_trace.py \
    tests/test_cuda_reg_range.py
fi

# ---- 3. compute-sanitizer, one process per (tool, case), SANITIZE_JOBS at a time: torch's
# start under a sanitizer is the slow part, and in parallel it costs the time of one ----
SAN_TSV=$WORK/sanitize.tsv
: >"$SAN_TSV"
san_case() {  # TOOL CELL DTYPE H PATH SECONDS: one sanitizer run; its log and exit code in $WORK
  local tool=$1 cell=$2 dtype=$3 h=$4 path=$5 t=$6
  # PATH mma64: the grid variant with 64-row tensor-core tiles (RNNFAST_MMA_ROWS), N=40 (one
  # partial tile)
  # PATH reg: the grid variant's register tile (RNNFAST_REG_TILE=1), N=11 (rows g + 8 of
  # its a fragments) or, at H=768, the issue's N=16
  # PATH async: the cluster variant with the async exchange (RNNFAST_CLUSTER_EXCHANGE)
  # PATH fused: the per-step path's fused kernels (RNNFAST_STEP_FUSED=1), N=70 (two blocks of
  # 64 batch rows, the second mostly past N)
  # PATH graph: the per-step path as CUDA graphs (RNNFAST_STEP_GRAPH=1), two calls (the
  # second replays the graphs captured then)
  # PATH regtrace, asynctrace: reg and async with a trace of the steps (--trace)
  # PATH regrange: reg with the range wait (RNNFAST_REG_WAIT=range)
  local forced=$path rows=16 n=5 reg=0 exch=barrier fused=0 graph=0 calls=1 trace= rwait=grid
  case $path in
    regrange) forced=persistent reg=1 n=11 rwait=range; ((h > 16)) && n=16 ;;
    regtrace) forced=persistent reg=1 n=11 trace=--trace ;;
    asynctrace) forced=cluster exch=async trace=--trace ;;
    graph) forced=step graph=1 calls=2 ;;
    mma64) forced=persistent rows=64 n=40 ;;
    reg) forced=persistent reg=1 n=11; ((h > 16)) && n=16 ;;
    async) forced=cluster exch=async ;;
    fused) forced=step fused=1 n=70 ;;
  esac
  # racecheck runs over every kernel, cuBLAS's included (a --kernel-name filter for
  # rnnfast's own has not been tried on the GPU image yet)
  # no caching allocator: each tensor its own allocation, so memcheck sees overruns
  # N=5: the persistent kernels' 16-row tile, partly past N. H=16: one unit a block (4 rows
  # of W a warp); H=700: 6 units a block on 132 SMs, so 8 rows of W a warp in the float32
  # and bfloat16 backward and the float32 LSTM forward (T=3, one layer: a sanitizer is slow).
  # The cluster variant: clusters of 4 blocks (4 units each), 2 batch rows a cluster, so
  # 3 clusters, the last with 1 row
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 RNNFAST_CLUSTER_SIZE=4 RNNFAST_CLUSTER_ROWS=2 \
    RNNFAST_MMA_ROWS=$rows RNNFAST_REG_TILE=$reg RNNFAST_CLUSTER_EXCHANGE=$exch \
    RNNFAST_STEP_FUSED=$fused RNNFAST_STEP_GRAPH=$graph RNNFAST_REG_WAIT=$rwait \
    timeout -k 5 "$t" "$SANITIZER" \
    --tool "$tool" --error-exitcode 1 --report-api-errors no --print-limit 20 \
    "$PY" scripts/sanitize_case.py --cell "$cell" --dtype "$dtype" --path "$forced" --N "$n" \
    --H "$h" --calls "$calls" $trace $( ((h > 16)) && echo --T 3 --layers 1) >"$WORK/san-$tool-$cell-$dtype-$h-$path.log" 2>&1
  echo $? >"$WORK/san-$tool-$cell-$dtype-$h-$path.rc"
}
SAN_CASES=()
# the step trace's stores (never run on a GPU before): the register tile's forward (and the
# grid variant's backward), the cluster variant's with the async exchange
SAN_CASES+=("memcheck lstm bfloat16 16 regtrace" "memcheck rnn_tanh float32 16 asynctrace")
# the register tile's range wait (never run on a GPU): H = 16 (one warp with a chunk, the
# others waiting for nothing) and H = 200 (U = 2 on 132 SMs, 7 chunks)
for tool in memcheck racecheck synccheck; do SAN_CASES+=("$tool lstm bfloat16 16 regrange"); done
SAN_CASES+=("memcheck rnn_tanh bfloat16 200 regrange")
# the per-step path's CUDA graphs (never run on a GPU before): the forward and the bfloat16
# backward replayed at the second call
for tool in memcheck racecheck; do
  for cell in lstm gru rnn_tanh; do SAN_CASES+=("$tool $cell bfloat16 16 graph"); done
done
# the per-step path's fused forward (never run on a GPU before): H=72, two stages of 64
# columns (the second mostly padding), 5 units a block of the LSTM
for tool in memcheck racecheck; do
  for cell in lstm gru rnn_tanh; do SAN_CASES+=("$tool $cell bfloat16 72 fused"); done
done
SAN_CASES+=("synccheck gru bfloat16 72 fused")
# the cluster variant's async exchange (never run on a GPU before): float32 both ways,
# bfloat16's backward
for tool in memcheck racecheck synccheck; do
  for c in "lstm float32" "gru bfloat16" "rnn_tanh float32"; do SAN_CASES+=("$tool ${c% *} ${c#* } 16 async"); done
done
# the register tile (bfloat16 forwards, the default at N <= 16; the backward is the grid
# variant's) and the per-step path's bfloat16 memcheck first: the fourth run's list ran out
# of time before them
for tool in memcheck racecheck; do
  for cell in lstm gru rnn_tanh; do SAN_CASES+=("$tool $cell bfloat16 16 reg"); done
  SAN_CASES+=("$tool lstm bfloat16 768 reg")
done
# the per-step path in bfloat16: its GEMMs through cublasGemmEx called directly, the
# backward's step kernels writing the gate gradients in bfloat16 too (StepGemm)
for cell in lstm gru rnn_tanh; do SAN_CASES+=("memcheck $cell bfloat16 16 step"); done
for tool in memcheck racecheck synccheck; do
  for cell in lstm gru rnn_tanh; do
    for dtype in float32 bfloat16; do SAN_CASES+=("$tool $cell $dtype 16 persistent"); done
  done
done
for tool in memcheck racecheck; do
  for dtype in float32 bfloat16; do SAN_CASES+=("$tool lstm $dtype 700 persistent"); done
  for cell in lstm gru rnn_tanh; do
    for dtype in float32 bfloat16; do SAN_CASES+=("$tool $cell $dtype 16 cluster"); done
  done
  # 64-row tensor-core tiles (bfloat16 forwards)
  for cell in lstm gru rnn_tanh; do SAN_CASES+=("$tool $cell bfloat16 16 mma64"); done
  SAN_CASES+=("$tool lstm bfloat16 700 mma64")
done
t_san=$(stage_time 150 100)
s=$(now)
if wanted sanitize; then
  log ""
  log "===== [sanitize] at $((s - START))s, limit ${t_san}s: ${#SAN_CASES[@]} runs of ${SANITIZER:-compute-sanitizer}, ${SANITIZE_JOBS:-6} at a time"
fi
if ! wanted sanitize; then
  :
elif [ -z "$SANITIZER" ]; then
  log "!! compute-sanitizer not found (PATH, \$CUDA_HOME/bin, \$CUDA_HOME/compute-sanitizer)"
  record sanitize FAIL 0 "compute-sanitizer not found"
elif ((t_san < 20)); then
  record sanitize SKIPPED 0 "no time left"
else
  deadline=$((s + t_san))
  for c in "${SAN_CASES[@]}"; do
    while (($(jobs -rp | wc -l) >= ${SANITIZE_JOBS:-6})); do wait -n 2>/dev/null || true; done
    read -r tool cell dtype h path <<<"$c"
    if { [ -n "$NO_ASYNC" ] && [[ $path == *async* ]]; } || { [ -n "$NO_RANGE" ] && [[ $path == *range* ]]; }; then
      printf '%s\t%s\t%s\t%s\t%s\n' "$tool" "$cell-h$h-$path" "$dtype" SKIPPED "its smoke test failed" >>"$SAN_TSV"
      continue
    fi
    left=$((deadline - $(now)))
    if ((left < 20)); then
      printf '%s\t%s\t%s\t%s\t%s\n' "$tool" "$cell-h$h-$path" "$dtype" SKIPPED "no time left" >>"$SAN_TSV"
      continue
    fi
    log "  start $tool $cell $dtype H=$h $path (limit ${left}s)"
    san_case "$tool" "$cell" "$dtype" "$h" "$path" "$left" &
  done
  wait
  for c in "${SAN_CASES[@]}"; do
    read -r tool cell dtype h path <<<"$c"
    f=$WORK/san-$tool-$cell-$dtype-$h-$path
    [ -f "$f.rc" ] || continue
    rc=$(cat "$f.rc")
    {
      echo "----- $tool $cell $dtype H=$h $path: exit $rc"
      cat "$f.log"
    } >>"$LOG"
    # the sanitizer's summary line; on failure also its first report, else the program's last line
    note=$(grep -E "(ERROR|RACECHECK) SUMMARY" "$f.log" | tail -n 1 | sed 's/^========= //')
    if [ "$rc" != 0 ]; then
      first=$(grep -m1 -E '^========= +(Invalid|Program hit|Error|Race|.*[Hh]azard|Uninitialized|Barrier|Out of range|Misaligned)' "$f.log")
      [ -n "$first" ] || first=$(grep -v -E '^=========|^[[:space:]]*$' "$f.log" | tail -n 1)
      note="$note; $(echo "${first#========= }" | cut -c1-150)"
    fi
    st=$(status_of "$rc")
    # racecheck's hazards all inside library kernels (cuBLAS's nvjet split-K GEMMs in the
    # backward's whole-sequence GEMMs, the third and later runs): LIB, listed with its first
    # report but not counted against rnnfast, whose kernels (namespace rnnfast::cuda) had
    # none; any report naming an rnnfast kernel keeps FAIL
    if [ "$tool" = racecheck ] && [ "$rc" = 1 ] && grep -q "Race reported between" "$f.log" &&
      ! grep -E "Race reported between|(Read|Write) access at" "$f.log" | grep -q rnnfast; then
      st=LIB
      note="$note (every hazard inside a library kernel, none in rnnfast's)"
    fi
    printf '%s\t%s\t%s\t%s\t%s\n' "$tool" "$cell-h$h-$path" "$dtype" "$st" "$note" >>"$SAN_TSV"
  done
  bad=$(awk -F'\t' '$4 != "PASS" && $4 != "LIB"' "$SAN_TSV" | wc -l)
  if ((bad == 0)); then st=PASS; else st=FAIL; fi
  log "===== [sanitize] $st ($bad of ${#SAN_CASES[@]} runs not clean) in $(($(now) - s))s"
  record sanitize "$st" "$(($(now) - s))" "$bad of ${#SAN_CASES[@]} runs not clean"
fi

# ---- 4. the GPU benchmark against cuDNN and the Python loop (JSON written after every case) ----
if [ -n "${BENCH_ARGS:-}" ]; then
  # shellcheck disable=SC2206  # BENCH_ARGS is a list of words
  BENCH=($BENCH_ARGS)
else
  # 144 cases: few runs each, so that the whole table fits the stage's time
  BENCH=(--set full --dtypes float32 bfloat16 --contenders rnnfast torch.nn "reference loop"
    --repeats 15 --min-time 0.1 --loop-runs 3 --markdown)
fi
if wanted host; then
  # a forward call's host time on each CUDA path, a cProfile and torch.profiler's table of
  # the op's ATen and CUDA runtime calls (scripts/host_overhead.py)
  run_stage host 60 40 "$PY" scripts/host_overhead.py
  cp "$WORK/host.out" "$OUT/host_overhead.txt"
fi
if wanted calib; then
  # the persistent kernels' per-step time against their block count (RNNFAST_PERSISTENT_MAX_BLOCKS)
  run_stage calib 120 60 "$PY" scripts/calibrate_persistent.py --json "$OUT/gpu-calib.json" \
    ${NO_ASYNC:+--no-async} ${NO_RANGE:+--no-range}
fi
if wanted trace; then
  # where a persistent kernel's step goes, from marks recorded inside the kernels
  # (scripts/trace_persistent.py: the register tile at the issue's latency case, the
  # float32 Elman RNN on the cluster variant with each exchange, both directions)
  run_stage trace 60 30 "$PY" scripts/trace_persistent.py --json "$OUT/gpu-trace.json" \
    ${NO_ASYNC:+--no-async} ${NO_RANGE:+--no-range}
fi
if wanted ncu; then
  # Nsight Compute on the grid variant at N=256 and N=16 (scripts/ncu_profile.sh): every
  # section and the SASS lines where warps stall, as text; the clocks left alone
  NCU=$(command -v ncu 2>/dev/null || true)
  for c in "${CUDA_HOME:-/usr/local/cuda}/bin/ncu" "${CUDA_HOME:-/usr/local/cuda}"/nsight-compute*/ncu \
    /opt/nvidia/nsight-compute/*/ncu; do
    if [ -z "$NCU" ] && [ -x "$c" ]; then NCU=$c; fi
  done
  if [ -z "$NCU" ]; then
    log "!! ncu not found (PATH, \$CUDA_HOME/bin, \$CUDA_HOME/nsight-compute*)"
    record ncu FAIL 0 "ncu not found"
  else
    run_stage ncu 150 30 bash scripts/ncu_profile.sh "$NCU" "$WORK" "$OUT/ncu.txt"
  fi
fi
if wanted bench7; then
  IFS=',' read -ra BENCH7_CONTENDERS_LIST <<<"${BENCH7_CONTENDERS:-rnnfast,rnnfast persistent,rnnfast cluster,rnnfast step,torch.nn}"
  # 72 cases per dtype x 5 contenders at T=1024: few runs each. bfloat16 first: the first
  # H100 run (2026-11-27) ran out of time inside float32 and never reached it.
  # shellcheck disable=SC2086  # BENCH7_DTYPES is a list
  run_stage bench7 "${BENCH7_CAP:-300}" 60 env RNNFAST_CUDA_PATH=auto "$PY" -m benchmarks.bench \
    --device cuda --set issue7 --dtypes ${BENCH7_DTYPES:-bfloat16 float32} \
    --contenders "${BENCH7_CONTENDERS_LIST[@]}" \
    --repeats "${BENCH7_REPEATS:-3}" --min-time 0 --markdown --json "$OUT/gpu-bench7.json" --png none
fi
if wanted bench; then
  run_stage bench 200 40 env RNNFAST_CUDA_PATH=auto "$PY" -m benchmarks.bench --device cuda "${BENCH[@]}" \
    --json "$OUT/gpu-bench.json"
fi

# ---- 4b. the published peers (FlashRNN, Haste) and torch.compile, on two shapes, if time is
# left: they compile per shape at first use. Wheels and sources come from .peers/ (made by
# scripts/peers.sh where pip works; the device tool carries it) ----
PEERS_SITE=$WORK/peers-site
if ! wanted peers; then
  :
elif (($(remaining) >= 100)); then
  mkdir -p "$PEERS_SITE"
  if ls .peers/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$PEERS_SITE" .peers/*.whl 2>&1 | tee -a "$LOG"
  else
    log "no .peers/*.whl: FlashRNN will be skipped (run scripts/peers.sh where pip works, carry .peers)"
  fi
  if ls .peers/haste_pytorch-*.tar.gz >/dev/null 2>&1; then
    run_stage build_haste 120 60 bash scripts/build_haste.sh "$PEERS_SITE"
  fi
  run_stage peers 150 10 env PYTHONPATH="$PEERS_SITE:$PYTHONPATH" "$PY" -m benchmarks.bench --device cuda \
    --shapes classic batch1 --dtypes bfloat16 float32 \
    --contenders rnnfast torch.nn "compiled loop" flashrnn haste --json "$OUT/gpu-peers.json"
else
  record peers SKIPPED 0 "optional, no time left"
fi

# ---- 5. the CPU tests, if time is left (CI runs them too) ----
if ! wanted tests_cpu; then
  :
elif (($(remaining) >= 45)); then
  run_stage tests_cpu 120 10 "$PY" -m pytest -q --tb=short -p no:cacheprovider \
    --junitxml="$OUT/tests_cpu.xml" tests --ignore=tests/test_cuda.py --ignore=tests/test_cuda_cluster.py \
    --ignore=tests/test_cuda_mma_rows.py --ignore=tests/test_cuda_step_gemm.py
else
  record tests_cpu SKIPPED 0 "optional, no time left"
fi

# ---- summary, last ----
"$PY" - "$STAGES" "$SAN_TSV" "$OUT" "$WORK/env.txt" "$BUDGET" "$(($(now) - START))" <<'PYEOF' 2>&1 | tee "$OUT/summary.txt" | tee -a "$LOG"
import json, math, os, re, sys
import xml.etree.ElementTree as ET

stages_tsv, san_tsv, out, env_txt, budget, took = sys.argv[1:7]
failed = []
rows = [line.rstrip("\n").split("\t") for line in open(stages_tsv) if line.strip()]
stages = {r[0]: r for r in rows}


def junit(path, name):
    """Counts from pytest's JUnit XML, else from its last output line."""
    try:
        root = ET.parse(path).getroot()
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        n["passed"] = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
        return (f"{n['passed']} passed, {n['failures']} failed, {n['errors']} errors, "
                f"{n['skipped']} skipped"), n
    except (OSError, ET.ParseError, AttributeError):
        pass
    try:
        lines = [l for l in open(os.path.join(os.path.dirname(stages_tsv), name + ".out"))
                 if re.search(r"\d+ (passed|failed|error)", l)]
        return (lines[-1].strip(" =\n") if lines else "no counts (cut short?)"), None
    except OSError:
        return "did not run", None


def refusal(error):
    """A forced persistent variant that cannot run for the shape (not a failure)."""
    return "CUDA path was forced" in error and "cannot run for H=" in error


def issue7_targets(recs):
    """The persistent-kernel issue's targets, from the bench7 records: rnnfast (auto) over
    cuDNN, and the best of the forced paths over cuDNN (what a perfect dispatch would give)."""
    paths = ("rnnfast", "rnnfast persistent", "rnnfast cluster", "rnnfast step", "rnnfast mma32",
             "rnnfast mma64", "rnnfast step aten", "rnnfast reg", "rnnfast async",
             "rnnfast step fused")

    def t(res, name):
        return res.get(name, {}).get("median_s")
    rows = {}
    for r in recs:
        res = r["results"]
        cudnn, auto = t(res, "torch.nn"), t(res, "rnnfast")
        best = min((t(res, n) for n in paths if t(res, n)), default=None)
        if cudnn and auto and best:
            rows.setdefault(r["mode"], []).append((r, cudnn / auto, cudnn / best))

    def geo(xs):
        return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")
    print()
    print("issue 7 targets (bench7; auto = rnnfast on auto, best = the fastest forced path):")
    for mode, goal in (("fwd", 1.5), ("fwdbwd", 1.2)):
        rs = rows.get(mode, [])
        if not rs:
            continue
        slower = [f"{r['cell']}/{r['dtype']}/{r['shape']}" for r, a, _ in rs if a < 1]
        print(f"  {mode:7} over cuDNN, geomean: auto {geo([a for _, a, _ in rs]):.2f}x, best "
              f"{geo([b for _, _, b in rs]):.2f}x (target {goal}x), {len(rs)} cases; slower "
              f"than cuDNN on auto: {len(slower)} {' '.join(slower[:8])}")
    for r, a, b in rows.get("fwd", []):
        if r["dtype"] == "bfloat16" and r["N"] == 16 and r["H"] == 768:
            us = r["results"]["rnnfast"]["median_s"] / r["T"] * 1e6
            best_us = min(r["results"][n]["median_s"] for n in paths
                          if r["results"].get(n, {}).get("median_s")) / r["T"] * 1e6
            print(f"  bf16 N=16 H=768 fwd {r['cell']:5}: auto {us:.2f} us/step, best {best_us:.2f} "
                  f"(target < 2)")


print()
print("=" * 30 + " gpu_check summary " + "=" * 30)
try:
    print(open(env_txt).read().strip())
except OSError:
    pass
print(f"took {took}s of a {budget}s budget")
print()
print(f"{'stage':10} {'result':10} {'time':>5}  note")
for name in ("gpu", "syncbench", "build", "import", "smoke", "smoke_range", "test_cuda", "sanitize", "calib", "trace",
             "bench7", "bench",
             "build_haste", "peers", "tests_cpu"):
    if name not in stages and name not in ("gpu", "build", "import"):
        continue  # not asked for (GPU_CHECK_STAGES)
    r = stages.get(name, [name, "NOT RUN", "0", ""])
    note = r[3] if len(r) > 3 else ""
    status = r[1]
    if name in ("test_cuda", "tests_cpu") and status != "SKIPPED":
        note, n = junit(os.path.join(out, name + ".xml"), name)
        if n and (n["failures"] or n["errors"]):
            status = "FAIL" if status == "PASS" else status
        if name == "test_cuda" and n and n["tests"] and n["skipped"] == n["tests"]:
            status, note = "FAIL", note + " (all skipped: no GPU?)"
    if name == "syncbench" and status != "SKIPPED":
        try:
            sync = [json.loads(line) for line in open(os.path.join(out, "gpu-sync.json"))
                    if line.startswith("{")]
        except (OSError, ValueError) as e:
            sync, note = [], f"no results ({e})"
        if not sync and not note:
            note = "no results (gpu_check.log has the stage's output)"
        if sync:
            wrong = [x for x in sync if x.get("errors") or x.get("aborted")]
            if wrong:
                status = "FAIL"
            parts = [f"{len(sync)} results, {len(wrong)} with wrong values or a hang"]
            for x in sync:
                if x["test"] == "chase":
                    parts.append(f"L2 round trip {x['ns_per_load']} ns")
                elif x["test"] == "grid" and x["mode"] == "barrier":
                    parts.append(f"grid barrier {x['blocks']} blocks {x['us_per_step']} us")
                elif (x["test"] == "grid" and x["mode"] == "stage" and x.get("n") == 6144
                      and x["blocks"] >= 128):
                    # bfloat16 N=16, H=768's bytes: staging through L2 after the barrier
                    parts.append(f"grid {x['mode']} n=6144 {x['blocks']} blocks "
                                 f"{x['us_per_step']} us")
                elif (x["test"] == "cluster" and x["mode"] == "barrier"
                      and x.get("clusters") == 1):
                    parts.append(f"cluster barrier {x['size']} {x['us_per_step']} us")
            note = "; ".join(parts)
    if name in ("bench7", "bench", "peers") and status != "SKIPPED":
        try:
            b = json.load(open(os.path.join(out, f"gpu-{name}.json")))
            errs = [(rec, c, r2["error"]) for rec in b["records"] for c, r2 in rec["results"].items()
                    if "error" in r2 and not refusal(r2["error"])]
            refused = sum(1 for rec in b["records"] for r2 in rec["results"].values()
                          if refusal(r2.get("error", "")))
            note = (f"{len(b['records'])} cases, {len(errs)} contender errors"
                    + (f", {refused} forced-path refusals (expected: the weights do not fit)"
                       if refused else ""))
            if errs and status == "PASS":
                status = "FAIL"
        except (OSError, ValueError, KeyError):
            try:  # the benchmark's last words
                tail = [l.strip() for l in open(os.path.join(os.path.dirname(stages_tsv), name + ".out"))
                        if l.strip() and not l.startswith("=====")]
                note = "no results: " + (tail[-1][:150] if tail else "no output")
            except OSError:
                note = "no results"
    optional = name in ("tests_cpu", "peers", "build_haste", "calib", "trace")
    if status not in ("PASS",) and not (name == "tests_cpu" and status == "SKIPPED") and not (
            optional and name != "tests_cpu"):
        failed.append(name)
    print(f"{name:10} {status:10} {r[2]:>4}s  {note}")

# sanitizer, one line per tool
san = [l.rstrip("\n").split("\t") for l in open(san_tsv) if l.strip()]
if san:
    cases = list(dict.fromkeys(f"{c}/{d}" for _, c, d, *_ in san))
    print()
    print(f"{'sanitizer':10} " + " ".join(f"{c:>22}" for c in cases))
    for tool in dict.fromkeys(t for t, *_ in san):
        res = {f"{c}/{d}": s for t, c, d, s, *_ in san if t == tool}
        print(f"{tool:10} " + " ".join(f"{res.get(c, '-'):>22}" for c in cases))
    for t, c, d, s, *note in san:
        if s != "PASS":
            print(f"  ! {t} {c} {d}: {s} {note[0] if note else ''}")

# trace: ns a step by phase, from the marks inside the kernels
try:
    tr = json.load(open(os.path.join(out, "gpu-trace.json")))["rows"]
except (OSError, ValueError, KeyError):
    tr = []
if tr:
    print()
    print("gpu-trace.json: ns a step by phase (median over blocks and steps; last: the wait "
          "of the block that arrived last; events: the call's CUDA-event time / T, untraced "
          "and traced)")
    for r in tr:
        if "error" in r:
            print(f"  {' '.join(map(str, r['case']))}: {r['error'][:120]}")
            continue
        names = ("h_prev", "dot", "pointwise", "arrive", "ahead", "wait") if r["direction"] == "fwd" \
            else ("phase A", "arrive", "ahead", "wait", "stage", "phase B")
        knob = (f" reg={r['reg_tile']}" if r.get("reg_tile") else "") + (
            f" {r['cluster_exchange']}" if r.get("cluster_exchange") else "")
        print(f"{r['cell']:4} {r['dtype']:8} N={r['N']:<3} H={r['H']:<4} {r['direction']} "
              f"{r['path']}{knob} ({r['blocks']} blocks): "
              + " ".join(f"{n} {r[n]:.0f}" for n in names)
              + f" | step {r['step']:.0f} last {r['last']:.0f} spread "
              f"{r['arrival_spread']:.0f} (timer {r['timer_resolution']:.0f}) | events "
              f"{r['call_us'] * 1e3 / r['T']:.0f} / {r['traced_call_us'] * 1e3 / r['T']:.0f}")

# calib: the grid variant with all blocks and at most 64, the cluster variant and the
# per-step path, us per step
try:
    cal = json.load(open(os.path.join(out, "gpu-calib.json")))["rows"]
except (OSError, ValueError, KeyError):
    cal = []
if cal:
    def us_of(rows):
        v = [r["us"] for r in rows if isinstance(r.get("us"), float)]
        return f"{v[0]:8.2f}" if v else f"{'n/a':>8}"
    print()
    # rows of an older run may carry the removed exchanges ("exchange" other than the
    # barrier): left out
    main = [r for r in cal if "mma_rows" not in r and "reg_tile" not in r
            and "cluster_exchange" not in r and r.get("exchange", "barrier") == "barrier"]
    print("gpu-calib.json: us per step; persistent (grid variant) with all blocks and <= 64; "
          "cluster (planner's size); per-step path")
    print(f"{'cell':5} {'dtype':9} {'N':>4} {'H':>5} {'mode':6} {'all':>8} {'<=64':>8}"
          f" {'cluster':>8} {'step':>8} "
          f"{'model':>8}  (model: the cost model, all blocks; fwdbwd: both plans)")
    keys = list(dict.fromkeys((r["cell"], r["dtype"], r["N"], r["H"], r["mode"]) for r in main))
    for k in keys:
        rs = [r for r in main if (r["cell"], r["dtype"], r["N"], r["H"], r["mode"]) == k]
        def pick(path, **want):
            return us_of([r for r in rs if r["path"] == path and
                          all(r.get(f, d) == v for f, (v, d) in want.items())])
        grid = " ".join(pick("persistent", max_blocks=(cap, 0)) for cap in (0, 64))
        base = [r for r in rs if r["path"] == "persistent" and r.get("max_blocks", 0) == 0]
        plans = [p for r in base[:1] for p in (r.get("plan_fwd"), r.get("plan_bwd")) if p]
        model = f"{sum(p['us'] for p in plans):8.2f}" if plans else f"{'n/a':>8}"
        print(f"{k[0]:5} {k[1]:9} {k[2]:4} {k[3]:5} {k[4]:6} {grid} "
              f"{pick('cluster', cluster_size=(0, 0))} {pick('step')} {model}")
    over = [r for r in cal if r.get("overhead")]
    if over:
        print()
        print("gpu-calib.json, a forward call's fixed cost: device us of the whole call (host us "
              "until it returned) at each T; fixed: the line's intercept, step: its slope")
        def okey(r):
            return (r["cell"], r["dtype"], r["N"], r["H"],
                    r["path"] + ("/" + r["cluster_exchange"] if "cluster_exchange" in r else ""),
                    r["reg_tile"])
        for k in dict.fromkeys(okey(r) for r in over):
            rs = [r for r in over if okey(r) == k]
            pts = [(r["T"], r["call_us"]) for r in rs if isinstance(r.get("call_us"), float)]
            cells = " ".join(f"T={r['T']}: " + (f"{r['call_us']:.0f} ({r['host_us']:.0f})"
                                                 if isinstance(r.get("call_us"), float) else "n/a")
                             for r in rs)
            fit = ""
            if len(pts) >= 2:
                mt = sum(t for t, _ in pts) / len(pts)
                mu = sum(u for _, u in pts) / len(pts)
                sl = sum((t - mt) * (u - mu) for t, u in pts) / sum((t - mt) ** 2 for t, _ in pts)
                fit = f"  fixed {mu - sl * mt:.0f} us, step {sl:.2f} us"
            print(f"{k[0]:5} {k[1]:9} {k[2]:4} {k[3]:5} {k[4]:10} reg={k[5]}  {cells}{fit}")
    exch = [r for r in cal if "cluster_exchange" in r and not r.get("overhead")
            and r.get("table") != "elman"]
    if exch:
        print()
        print("gpu-calib.json, the cluster variant's exchange: us per step with the cluster "
              "barrier and with st.async (RNNFAST_CLUSTER_EXCHANGE=async); ran: the plans' "
              "async, forward and backward")
        print(f"{'cell':5} {'dtype':9} {'N':>4} {'H':>5} {'mode':6} {'barrier':>8} {'async':>8} ran")
        for k in dict.fromkeys((r["cell"], r["dtype"], r["N"], r["H"], r["mode"]) for r in exch):
            rs = [r for r in exch if (r["cell"], r["dtype"], r["N"], r["H"], r["mode"]) == k]
            on = [r for r in rs if r["cluster_exchange"] == "async"]
            ran = "".join(str((on[0].get(p) or {}).get("async", "-")) for p in ("plan_fwd", "plan_bwd")) if on else "-"
            print(f"{k[0]:5} {k[1]:9} {k[2]:4} {k[3]:5} {k[4]:6} "
                  f"{us_of([r for r in rs if r['cluster_exchange'] == 'barrier'])} {us_of(on)} {ran}")
    reg = [r for r in cal if "reg_tile" in r and not r.get("overhead")]
    if reg:
        print()
        print("gpu-calib.json, 16-bit forward at N <= 16: us per step on the grid variant, "
              "tiled and on the register tile (RNNFAST_REG_TILE=1) with a block per SM and "
              "with the fewest blocks (32 rows of W each); ran: the plan's reg; range: a block "
              "per SM with RNNFAST_REG_WAIT=range, ran: the plan's range_wait")
        print(f"{'cell':5} {'dtype':9} {'N':>4} {'H':>5} {'tiled':>8} {'register':>8} {'ran':>3}"
              f" {'blocks':>6} {'fewest':>8} {'ran':>3} {'range':>8} {'ran':>3}")
        for k in dict.fromkeys((r["cell"], r["dtype"], r["N"], r["H"]) for r in reg):
            rs = [r for r in reg if (r["cell"], r["dtype"], r["N"], r["H"]) == k]
            line = f"{k[0]:5} {k[1]:9} {k[2]:4} {k[3]:5} "
            line += us_of([r for r in rs if r["reg_tile"] == 0])
            for few in (False, True):
                on = [r for r in rs if r["reg_tile"] == 1 and bool(r.get("max_blocks")) == few
                      and r.get("reg_wait", "grid") == "grid"]
                ran = (on[0].get("plan_fwd") or {}).get("reg", "-") if on else "-"
                if few:
                    line += f" {on[0]['max_blocks'] if on else '-':>6}"
                line += f" {us_of(on)} {ran!s:>3}"
            on = [r for r in rs if r.get("reg_wait") == "range"]
            ran = (on[0].get("plan_fwd") or {}).get("range_wait", "-") if on else "-"
            line += f" {us_of(on)} {ran!s:>3}"
            print(line)
    mma = [r for r in cal if "mma_rows" in r]
    if mma:
        sizes = sorted({r["mma_rows"] for r in mma if r["mma_rows"]})
        print()
        print("gpu-calib.json, 16-bit at larger batch: us per step; the grid variant with each "
              "tensor-core tile (RNNFAST_MMA_ROWS; nt: the tile that ran) and the per-step path")
        print(f"{'cell':5} {'dtype':9} {'N':>4} {'H':>5} {'mode':6} "
              + " ".join(f"{f'rows={n}':>8} {'nt':>3}" for n in sizes)
              + f" {'step':>8} {'aten':>8} {'fused':>8} {'graph':>8}  (step: cuBLAS called "
              "directly; aten: through ATen; fused: RNNFAST_STEP_FUSED=1; graph: "
              "RNNFAST_STEP_GRAPH=1)")
        for k in dict.fromkeys((r["cell"], r["dtype"], r["N"], r["H"], r["mode"]) for r in mma):
            rs = [r for r in mma if (r["cell"], r["dtype"], r["N"], r["H"], r["mode"]) == k]
            line = f"{k[0]:5} {k[1]:9} {k[2]:4} {k[3]:5} {k[4]:6}"
            for n in sizes:
                sel = [r for r in rs if r["mma_rows"] == n]
                nt = (sel[0].get("plan_fwd") or {}).get("nt", "-") if sel else "-"
                line += f" {us_of(sel)} {nt:>3}"
            steps = [r for r in rs if r["path"] == "step"]
            print(line + " " + us_of([r for r in steps if r.get("step_gemm") == "cublas"]) + " "
                  + us_of([r for r in steps if r.get("step_gemm") == "aten"]) + " "
                  + us_of([r for r in steps if r.get("step_gemm") == "fused"]) + " "
                  + us_of([r for r in steps if r.get("step_gemm") == "graph"]))
    elman = [r for r in cal if r.get("table") == "elman"]
    if elman:
        print()
        print("gpu-calib.json, float32 Elman RNN at H = 256, forward: us per step on the "
              "cluster variant at the planner's size and at each size, with the barrier, and "
              "at the planner's size with the async exchange")
        sizes = list(dict.fromkeys(r["cluster_size"] for r in elman
                                   if r["cluster_exchange"] == "barrier"))
        print(f"{'N':>4} " + " ".join(f"{'auto' if c == 0 else f'C={c}':>8}" for c in sizes)
              + f" {'async':>8}")
        for n in dict.fromkeys(r["N"] for r in elman):
            rs = [r for r in elman if r["N"] == n]
            print(f"{n:4} " + " ".join(us_of([r for r in rs if r["cluster_size"] == c and
                                              r["cluster_exchange"] == "barrier"])
                                       for c in sizes)
                  + " " + us_of([r for r in rs if r["cluster_exchange"] == "async"]))

# benchmarks: rnnfast's speedup over cuDNN (torch.nn) per case, then the geomeans
for fname in ("gpu-bench7.json", "gpu-bench.json", "gpu-peers.json"):
    try:
        b = json.load(open(os.path.join(out, fname)))
        recs = b["records"]
    except (OSError, ValueError, KeyError):
        continue
    cells = list(dict.fromkeys(r["cell"] for r in recs))
    print()
    print(f"{fname}: rnnfast speedup over torch.nn (cuDNN), >1: rnnfast faster; rnnfast ms and path")
    print(f"{'dtype':9} {'shape':18} {'mode':7} " + " ".join(f"{c:>20}" for c in cells))
    for k in dict.fromkeys((r["dtype"], r["shape"], r["mode"]) for r in recs):
        line = f"{k[0]:9} {k[1]:18} {k[2]:7} "
        for c in cells:
            rec = next((r for r in recs if (r["dtype"], r["shape"], r["mode"], r["cell"]) == (*k, c)), None)
            res = rec["results"] if rec else {}
            tn = res.get("torch.nn", {})
            sp = f"{tn['rnnfast_speedup']:.2f}x" if tn.get("rnnfast_speedup") else ("ERR" if "error" in tn else "-")
            ms = f"{res['rnnfast']['median_s'] * 1e3:.2f}ms" if "median_s" in res.get("rnnfast", {}) else "ERR"
            # the path auto took: p(ersistent) / s(tep), forward then backward
            ms += "".join(v[0] for v in res.get("rnnfast", {}).get("cuda_path", "").split("/") if v)
            line += f" {sp:>7} {ms:>12}"
        print(line)
    for k, v in b.get("summary", {}).items():
        print(f"  {k:40} {v['geomean']:6.2f}x over {v['cases']} cases ({v['min']:.2f}x-{v['max']:.2f}x)")
    if fname == "gpu-bench7.json":
        issue7_targets(recs)
    errs = [f"  ! {r['cell']} {r['shape']} {r['mode']} {r['dtype']}: {n}: {x['error'][:110]}"
            for r in recs for n, x in r["results"].items() if "error" in x and not refusal(x["error"])]
    skips = sorted({f"  - {n}: {x['skipped'][:130]}" for r in recs for n, x in r["results"].items() if "skipped" in x})
    for n, why in b.get("machine", {}).get("skipped_contenders", {}).items():
        skips.append(f"  - {n}: {why[:130]}")
    print("\n".join(errs[:10] + ([f"  ! ... {len(errs) - 10} more in gpu_check.log"] if len(errs) > 10 else [])
                    + skips[:8]))
print()
print(f"files: {', '.join(sorted(os.listdir(out)))} (in {out})")
print("gpu_check: " + ("FAILED: " + ", ".join(failed) if failed else "ALL PASSED"))
sys.exit(1 if failed else 0)
PYEOF
rc=${PIPESTATUS[0]}
rm -rf "$WORK"
exit "$rc"
