"""Builds rnnfast._C: the C++ kernels always, the CUDA kernels when torch has CUDA and a
toolkit is found (no GPU needed).

Environment:
  RNNFAST_NO_CUDA=1        build the C++ kernels only
  TORCH_CUDA_ARCH_LIST     CUDA archs to build (default: the visible GPU's, or
                           8.0;8.6;8.9;9.0+PTX when none is visible)
  CUDA_HOME                the CUDA toolkit (default: /usr/local/cuda when it has nvcc)
  MAX_JOBS                 parallel compile jobs (ninja)
  RNNFAST_DEBUG=1          -O0 -g, for debuggers and sanitizers
  RNNFAST_SANITIZE=1       AddressSanitizer and UndefinedBehaviorSanitizer in the C++ code
                           (scripts/sanitize.sh; run with libasan preloaded)
"""
import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;8.6;8.9;9.0+PTX"


def _find_cuda_home():
    """A CUDA toolkit with nvcc, preferring CUDA_HOME, then /usr/local/cuda.

    Must run before torch.utils.cpp_extension is imported: it reads CUDA_HOME once, and
    left alone it can guess the directory of an nvcc wrapper rather than the toolkit.
    """
    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if candidate and os.path.exists(os.path.join(candidate, "bin", "nvcc")):
            return candidate
    return None


def _nvidia_wheel_includes():
    """Header folders of torch's nvidia-* wheels (cuBLAS, cuSPARSE, ...), which ATen's CUDA
    headers include and a partial toolkit may lack."""
    dirs = []
    for site in sys.path:
        for pattern in ("nvidia/*/include", "nvidia/*/*/include"):
            dirs += [d for d in sorted(glob.glob(os.path.join(site, pattern))) if os.path.isdir(d)]
    return list(dict.fromkeys(dirs))


cuda_home = None if os.environ.get("RNNFAST_NO_CUDA") == "1" else _find_cuda_home()
if cuda_home:
    os.environ["CUDA_HOME"] = cuda_home

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

cpp_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
cuda_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
with_cuda = bool(cuda_home) and torch.version.cuda is not None and bool(cuda_sources)

debug = os.environ.get("RNNFAST_DEBUG") == "1"
opt = ["-O0", "-g"] if debug else ["-O3"]
# torch.utils.cpp_extension picks the C++ standard that the installed torch needs.
# No FP traps or errno: lets GCC if-convert and vectorise the pointwise kernels (torch
# builds with the same flags). fp-contract: a*b+c as one FMA (ISO C++ mode forbids it
# otherwise), which the step GEMMs need for full speed and which only removes a rounding.
cxx_flags = opt + ["-fvisibility=hidden", "-fno-trapping-math", "-fno-math-errno",
                   "-ffp-contract=fast"]
extra_link_args = []
# at::parallel_for is a header template that parallelises through `#pragma omp parallel`
# when torch's backend is OpenMP: without -fopenmp it would silently run on one thread.
# The library resolves to the libgomp that torch has already loaded.
if "OpenMP" in torch.__config__.parallel_info() and sys.platform.startswith("linux"):
    cxx_flags.append("-fopenmp")
    extra_link_args.append("-fopenmp")
if os.environ.get("RNNFAST_SANITIZE") == "1":
    # -O1 keeps the sanitizers' reports readable at a tolerable speed; UB aborts (no
    # recovery), so a finding fails the test that caused it
    sanitize = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
                "-fno-omit-frame-pointer", "-g"]
    cxx_flags = [f for f in cxx_flags if not f.startswith("-O")] + ["-O1"] + sanitize
    extra_link_args += sanitize
extra_compile_args = {"cxx": cxx_flags}
# torch's version as major * 100 + minor (csrc/cuda/common.cuh: at::mm's out_dtype, 2.8 on)
_torch_version = [int(v) for v in torch.__version__.split("+")[0].split(".")[:2]]
define_macros = [("RNNFAST_TORCH_VERSION", str(_torch_version[0] * 100 + _torch_version[1]))]
include_dirs = [os.path.join(ROOT, "csrc")]

if with_cuda:
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCHS
    include_dirs += _nvidia_wheel_includes()
    extra_compile_args["nvcc"] = opt + ["--expt-relaxed-constexpr", "-lineinfo"]
    define_macros.append(("RNNFAST_WITH_CUDA", None))
    # dlopen/dlsym (csrc/cuda/common.cuh finds cublasGemmEx in torch's libcublas); part of
    # libc from glibc 2.34 on, libdl before
    extra_link_args = extra_link_args + ["-ldl"]
    ext = CUDAExtension(
        "rnnfast._C",
        cpp_sources + cuda_sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args=extra_compile_args,
        extra_link_args=extra_link_args,
    )
else:
    ext = CppExtension(
        "rnnfast._C",
        cpp_sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args=extra_compile_args,
        extra_link_args=extra_link_args,
    )

print(
    f"rnnfast: torch {torch.__version__}, CUDA build: {with_cuda}"
    + (f" ({cuda_home}, archs {os.environ.get('TORCH_CUDA_ARCH_LIST', 'visible GPU')})" if with_cuda else ""),
    file=sys.stderr,
)

# Name, version and packages are in pyproject.toml.
setup(
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
