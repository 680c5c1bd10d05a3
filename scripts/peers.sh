#!/usr/bin/env bash
# Downloads the published GPU peers that the benchmark compares rnnfast with, for a GPU
# machine that has no internet (run this where pip works, then carry the folder along):
#   .peers/flashrnn-*.whl          FlashRNN (NX-AI), pure Python; it JIT-compiles its CUDA
#                                  kernels at first use, per shape
#   .peers/haste_pytorch-*.tar.gz  Haste (LMNT), source; scripts/build_haste.sh builds it
# .peers/ is ignored by git. scripts/gpu_check.sh installs what it finds there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mkdir -p .peers
"$PY" -m pip download --no-deps --only-binary=:all: -d .peers "flashrnn==1.0.8"
"$PY" -m pip download --no-deps --no-binary=:all: -d .peers "haste_pytorch==0.5.0rc0"
ls -l .peers
