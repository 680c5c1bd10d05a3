#!/usr/bin/env bash
# Builds and tests rnnfast against another torch release, in a virtual environment of its
# own, on a copy of the working tree (tracked and untracked files, not the ignored ones),
# so that the project's own build and environment stay as they are. For the releases that
# CI's does not cover: the oldest supported (2.6) and the GPU machine's (2.11.0+cu130, whose
# extension gpu_check.sh builds there: a build that fails there costs a GPU call).
#   bash scripts/compat.sh 2.6.0                  # the whole test suite
#   bash scripts/compat.sh 2.11.0 tests/test_parity.py -x   # pytest's arguments instead of tests/
# The CUDA kernels are built when that torch's CUDA major version is the toolkit's (nvcc),
# else the C++ kernels only (torch refuses a toolkit of another major version); the
# summary says which. Downloads torch and its CUDA libraries from the package index once
# (a few GB); the environments stay in $RNNFAST_COMPAT_DIR (default /tmp/rnnfast-compat).
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:?usage: bash scripts/compat.sh TORCH_VERSION [pytest arguments]}
shift
dir=${RNNFAST_COMPAT_DIR:-/tmp/rnnfast-compat}
venv=$dir/torch-$version tree=$dir/tree-$version
mkdir -p "$dir"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  echo "== torch $version into $venv" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install --progress-bar off "torch==$version"
fi
# a fresh copy of the tree, keeping the previous copy's build folder and library (ninja and
# setup.sh rebuild only what changed)
mkdir -p "$tree/rnnfast"
find "$tree" -mindepth 1 -maxdepth 1 ! -name build ! -name rnnfast -exec rm -rf {} +
find "$tree/rnnfast" -mindepth 1 -maxdepth 1 ! -name '_C*.so' -exec rm -rf {} +
git ls-files -co --exclude-standard -z | tar --null -T - -cf - | tar -xf - -C "$tree"

cuda_home=${CUDA_HOME:-/usr/local/cuda}
nvcc_major=$("$cuda_home/bin/nvcc" --version 2>/dev/null | sed -n 's/.*release \([0-9]*\)\..*/\1/p' || true)
torch_cuda=$("$venv/bin/python" -c "import torch; print(torch.version.cuda or '')")
if [ -n "$torch_cuda" ] && [ "${torch_cuda%%.*}" = "$nvcc_major" ]; then
  kernels="C++ and CUDA (torch's CUDA $torch_cuda, nvcc $nvcc_major, TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0})"
  export RNNFAST_NO_CUDA=0 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
else
  kernels="C++ only (torch's CUDA '${torch_cuda:-none}', nvcc '${nvcc_major:-none}')"
  export RNNFAST_NO_CUDA=1
fi
echo "== building in $tree: $kernels" >&2
cd "$tree"
PATH="$venv/bin:$PATH" PYTHON="$venv/bin/python" bash scripts/setup.sh
# every symbol must resolve at load, and the CUDA kernels be there exactly when built
LD_BIND_NOW=1 "$venv/bin/python" scripts/check_build.py --cuda "$([ "$RNNFAST_NO_CUDA" = 1 ] && echo no || echo yes)"
start=$(date +%s)
status=0
[ $# -gt 0 ] || set -- tests
PATH="$venv/bin:$PATH" "$venv/bin/python" -m pytest -q -p no:cacheprovider "$@" || status=$?
echo "== torch $version, kernels $kernels: pytest exit $status in $(( $(date +%s) - start )) s"
exit $status
