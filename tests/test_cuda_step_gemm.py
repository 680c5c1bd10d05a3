"""The per-step path's 16-bit recurrent GEMMs (csrc/cuda/common.cuh, StepGemm): cublasGemmEx
called directly on torch's cuBLAS handle, found in the libcublas that torch loaded, or
through ATen where RNNFAST_STEP_GEMM=aten. In bfloat16 the backward's dh GEMM then takes the
gate gradients rounded to bfloat16 (float32 sums and result).

The lookup needs no GPU: a CUDA build of rnnfast beside a CUDA build of torch (which loads
libcublas on import) must find it. On a GPU, every output, final state and gradient of the
per-step path, both ways, against torch.nn and the float64 reference as in test_cuda.py.
"""
import pytest
import torch

import rnnfast
from helpers import CELLS
from rnnfast import _C

CUDA_BUILD = _C._step_gemm() is not None


@pytest.mark.skipif(not CUDA_BUILD or torch.version.cuda is None,
                    reason="a CUDA build of rnnfast and of torch")
def test_cublas_is_found_where_torch_loaded_it(monkeypatch):
    monkeypatch.delenv("RNNFAST_STEP_GEMM", raising=False)
    assert _C._step_gemm() == "cublas"
    monkeypatch.setenv("RNNFAST_STEP_GEMM", "aten")
    assert _C._step_gemm() == "aten"
    monkeypatch.setenv("RNNFAST_STEP_GEMM", "cublas")
    assert _C._step_gemm() == "cublas"


@pytest.mark.skipif(not CUDA_BUILD, reason="a CUDA build of rnnfast")
def test_an_unknown_value_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("RNNFAST_STEP_GEMM", "cuBLASLt")
    with pytest.raises(ValueError,
                       match="RNNFAST_STEP_GEMM is 'cuBLASLt', expected 'cublas' or 'aten'"):
        _C._step_gemm()


@pytest.mark.skipif(CUDA_BUILD, reason="a build without CUDA")
def test_a_build_without_cuda_says_so():
    assert _C._step_gemm() is None


# (T, N, H): small; N and GH not multiples of 8 (cuBLAS's odd leading dimensions); a
# larger step GEMM; a long sequence (the bfloat16 dh GEMM's rounding carried over 64 steps)
SHAPES = [(5, 3, 6), (4, 7, 37), (3, 40, 96), (64, 5, 24)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape", SHAPES, ids=[f"T{t}-N{n}-H{h}" for t, n, h in SHAPES])
@pytest.mark.parametrize("kind", ["cublas", "aten"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("cell", list(CELLS))
def test_step_gemm(cell, dtype, kind, shape, monkeypatch):
    from test_cuda import check_half_one_layer, no_tf32
    monkeypatch.setenv("RNNFAST_STEP_GEMM", kind)
    assert _C._step_gemm() == kind
    T, N, H = shape
    with no_tf32("step"):
        check_half_one_layer(cell, dtype, T, N, H)
        assert rnnfast.last_cuda_path() == ("step", "step")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bfloat16", "float32"])
def test_an_unknown_value_fails_the_step_path(dtype, monkeypatch):
    """Raised by the op, after its dispatch, whatever the dtype (as a bad RNNFAST_MMA_ROWS)."""
    monkeypatch.setenv("RNNFAST_STEP_GEMM", "fast")
    f = rnnfast.GRU(4, 8).cuda().to(dtype)
    with rnnfast.cuda_path("step"):
        with pytest.raises(RuntimeError, match="RNNFAST_STEP_GEMM is 'fast', expected"):
            f(torch.randn(3, 2, 4, device="cuda", dtype=dtype))
