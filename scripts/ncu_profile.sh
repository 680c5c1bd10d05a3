#!/usr/bin/env bash
# Nsight Compute on the grid variant's kernels (scripts/gpu_check.sh's `ncu` stage): where a
# step's time goes at the shapes the second H100 run could not explain (a fixed ~2.5 us per
# tile of 16 batch rows; BENCHMARKS.md). For each case, one launch of the kernel named, with
# every section (`--set full`) and the SASS lines with the most warp-stall samples; the
# report as text into one file.
#
#   bash scripts/ncu_profile.sh NCU WORKDIR OUTFILE
#
# The GPU's clocks are left alone (`--clock-control none`: ncu would otherwise lock them to
# base for the run). Cases (bfloat16 LSTM, H=768, T=16, the grid variant forced):
#   fwd-n256: persistent_forward at N=256 (16 tiles), the inference forward;
#   bwd-n256: persistent_backward at N=256;
#   fwd-n16:  persistent_forward at N=16 (one tile: the floor).
set -u
NCU=$1 WORK=$2 OUT=$3
PY=${PYTHON:-python3}
: >"$OUT"
rc=0
one() {
  local name=$1 kernel=$2 n=$3
  local rep="$WORK/ncu-$name"
  echo "===== ncu $name: $kernel, lstm bfloat16 N=$n H=768 T=16" | tee -a "$OUT"
  if ! "$NCU" --clock-control none --set full --import-source no -k "regex:$kernel" -c 1 -f \
      -o "$rep" "$PY" scripts/sanitize_case.py --cell lstm --dtype bfloat16 --T 16 --N "$n" \
      --C 768 --H 768 --layers 1 --path persistent >>"$OUT" 2>&1; then
    echo "!! ncu $name failed" | tee -a "$OUT"
    rc=1
    return
  fi
  "$NCU" -i "$rep.ncu-rep" --page details >>"$OUT" 2>&1 || rc=1
  # the SASS lines with the most stall samples (the source page as CSV; its columns vary
  # between ncu versions, so they are found by name)
  if "$NCU" -i "$rep.ncu-rep" --page source --csv --print-source sass >"$rep-src.csv" 2>>"$OUT"; then
    "$PY" - "$rep-src.csv" >>"$OUT" 2>&1 <<'PYEOF' || rc=1
import csv, sys
rows = list(csv.reader(open(sys.argv[1], newline="")))
head = next((i for i, r in enumerate(rows) if any("Stall Sampling" in c for c in r)), None)
if head is None:
    print("no stall-sampling column; the first lines:")
    for r in rows[:10]:
        print(",".join(r)[:200])
    sys.exit(0)
cols = rows[head]
def col(word):
    return next((i for i, c in enumerate(cols) if word in c), None)
all_i = next(i for i, c in enumerate(cols) if "Stall Sampling" in c and "All" in c) \
    if any("Stall Sampling" in c and "All" in c for c in cols) else col("Stall Sampling")
src_i, addr_i = col("Source"), col("Address")
def num(s):
    try:
        return float(s.replace(",", ""))
    except ValueError:
        return 0.0
body = [r for r in rows[head + 1:] if len(r) == len(cols)]
total = sum(num(r[all_i]) for r in body) or 1.0
print(f"top SASS lines by warp-stall samples ({cols[all_i]}; {int(total)} samples):")
for r in sorted(body, key=lambda r: -num(r[all_i]))[:30]:
    where = r[addr_i] if addr_i is not None else ""
    print(f"  {100 * num(r[all_i]) / total:5.1f}%  {where:>8s}  {r[src_i] if src_i is not None else ''}")
PYEOF
  else
    echo "!! ncu $name: no source page" | tee -a "$OUT"
    rc=1
  fi
}
one fwd-n256 persistent_forward 256
one bwd-n256 persistent_backward 256
one fwd-n16 persistent_forward 16
exit $rc
