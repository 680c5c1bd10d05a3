#!/usr/bin/env bash
# Builds Haste's PyTorch extension from the sdist that scripts/peers.sh downloads, for the
# GPU that is present, into a target folder (default /tmp/peers-site; put it on PYTHONPATH).
# Haste's Makefile targets compute_37/60/70, which CUDA 13's nvcc no longer has, so its
# CUDA library is built here for the card's arch first; the sdist's setup.py then runs
# `make haste` again, which fails harmlessly and leaves that library in place.
#   bash scripts/build_haste.sh [TARGET]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TARGET=${1:-/tmp/peers-site}
sdist=$(ls .peers/haste_pytorch-*.tar.gz 2>/dev/null | head -n 1 || true)
[ -n "$sdist" ] || { echo "build_haste: no .peers/haste_pytorch-*.tar.gz (run scripts/peers.sh where pip works)"; exit 2; }
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
cap=$("$PY" -c "import torch; print('%d%d' % torch.cuda.get_device_capability())")
src=$(mktemp -d)
tar xzf "$sdist" -C "$src" --strip-components=1
cd "$src"
make -j"$(nproc)" haste CUDA_HOME="$CUDA_HOME" NVCC="$CUDA_HOME/bin/nvcc -ccbin ${CXX:-g++}" \
  GPU_ARCH_FLAGS="-gencode arch=compute_$cap,code=sm_$cap" NVCC_FLAGS="-std=c++17 -x cu -Xcompiler -fPIC"
CUDA_HOME=$CUDA_HOME "$PY" -m pip install -q --no-build-isolation --no-deps --no-index --target "$TARGET" .
echo "build_haste: haste_pytorch in $TARGET"
