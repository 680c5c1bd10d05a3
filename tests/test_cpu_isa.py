"""The CPU step kernels are built once per ISA (AVX-512 with 16-unit blocks, AVX2 and the
baseline with 8-unit blocks; csrc/cpu/kernels.cpp) and the best the CPU has runs. Every
build this CPU can run is checked here against the float64 reference and torch.nn, at
sizes that reach each part of the step GEMMs' tiling: the dot-product kernel (N * G <= 4),
row tiles and their 2- and 1-row remainders, partial unit blocks, the Elman pair tiles,
K chunks, and one thread or two. A build this CPU cannot run must be refused by name."""
import os
import subprocess
import sys

import pytest
import torch

import rnnfast
from rnnfast import _ops

from helpers import compare_all, make_pair, run_three
from test_packed import test_packed_matches_torch_and_reference as packed_case
from test_parity import _inputs

ISAS = ["baseline", "avx2", "avx512"]
ORDER = {name: i for i, name in enumerate(ISAS)}


def _best():
    """The best build this CPU runs: the default setting in a fresh process."""
    env = {k: v for k, v in os.environ.items() if k != "RNNFAST_CPU_ISA"}
    out = subprocess.run([sys.executable, "-c", "import rnnfast._ops as o; print(o.get_cpu_isa())"],
                         capture_output=True, text=True, env=env, check=True, timeout=120)
    return out.stdout.strip()


BEST = _best()


@pytest.fixture(autouse=True)
def _restore_isa():
    previous = _ops.get_cpu_isa()
    yield
    _ops.set_cpu_isa(previous)


def _run_isa_or_check_refusal(isa):
    """Sets `isa` where the CPU has it and returns True; else asserts the refusal."""
    if ORDER[isa] <= ORDER[BEST]:
        _ops.set_cpu_isa(isa)
        assert _ops.get_cpu_isa() == isa
        return True
    with pytest.raises(ValueError, match=f"cannot run the '{isa}' kernels"):
        _ops.set_cpu_isa(isa)
    return False


# (N, H): N = 1 and 2 reach the dot-product kernel for the LSTM and GRU (N * G <= 4) and
# N <= 4 for Elman; 13 rows leave remainders after every tile height (3, 4, 6, 8, 12);
# H = 5, 24, 40 leave partial 16-unit blocks (and 5 a partial 8-unit one); H = 300 takes
# two K chunks of the AVX-512 LSTM tile (128 j's each) and an odd Elman pair.
SIZES = [(1, 5), (2, 24), (3, 40), (13, 16), (13, 37), (7, 300)]


def _check_against_torch_and_reference(cell, T, N, C, H, seed, bidirectional):
    """Outputs, final states and the gradients of x, h0 (c0) and every parameter, against
    torch.nn and the float64 reference loop (helpers.run_three)."""
    m, f, m64 = make_pair(cell, C, H, seed=seed, bidirectional=bidirectional)
    x, hx, upstream = _inputs(cell, 1, bidirectional, False, True, torch.float32, T=T, N=N, C=C,
                              H=H, seed=seed + 1)
    compare_all(*run_three(cell, x, hx, m, f, m64, upstream))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("cell", ["rnn_tanh", "rnn_relu", "lstm", "gru"])
@pytest.mark.parametrize("N,H", SIZES)
def test_each_build_matches_reference_and_torch(isa, cell, N, H):
    if not _run_isa_or_check_refusal(isa):
        return
    _check_against_torch_and_reference(cell, 5, N, 11, H, seed=N * 1000 + H, bidirectional=True)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("cell", ["rnn_tanh", "lstm", "gru"])
def test_each_build_gives_the_same_bits_on_one_thread_or_two(isa, cell):
    """The threads split the units into block ranges; each output of the step kernels must
    be summed in the same order whatever range its block falls in. Compared: what only the
    step kernels and the pointwise math make, y, hn (cn) and dh0 (dc0); dx and dW also go
    through torch's GEMMs, whose sums may depend on the thread count."""
    if not _run_isa_or_check_refusal(isa):
        return
    H = 72  # 9 blocks of 8 (4 + 5 on two threads), 5 of 16 (3 + 2)
    _, f, _ = make_pair(cell, 9, H, seed=3)
    torch.manual_seed(2)
    x = torch.randn(6, 20, 9)
    h0 = torch.randn(1, 20, H, requires_grad=True)
    c0 = torch.randn(1, 20, H, requires_grad=True)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            h0.grad = c0.grad = None
            y, hn = f(x, (h0, c0) if cell == "lstm" else h0)
            finals = list(hn) if cell == "lstm" else [hn]
            ((y * y).sum() + sum((s * s).sum() for s in finals)).backward()
            grads = [h0.grad.clone()] + ([c0.grad.clone()] if cell == "lstm" else [])
            results.append([y.detach()] + [s.detach() for s in finals] + grads)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("cell", ["rnn_tanh", "lstm", "gru"])
def test_each_build_runs_packed_sequences(isa, cell):
    """test_packed's check (torch.nn and a per-sequence reference) at its GEMM size, two
    bidirectional directions, under each build."""
    if not _run_isa_or_check_refusal(isa):
        return
    packed_case(cell, [9, 9, 8, 6, 6, 5, 3, 2, 2, 1], False, 1, True, True, torch.float32, "ops",
                size=(24, 40))


def test_the_context_manager_sets_and_restores():
    assert BEST in ISAS
    _ops.set_cpu_isa(BEST)
    with _ops.cpu_isa("baseline"):
        assert _ops.get_cpu_isa() == "baseline"
    assert _ops.get_cpu_isa() == BEST


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="expected 'baseline', 'avx2' or 'avx512', but got 'sse9'"):
        _ops.set_cpu_isa("sse9")
    with pytest.raises(TypeError, match="expected the CPU ISA as a str"):
        _ops.set_cpu_isa(2)
    assert _ops.get_cpu_isa() in ISAS


def _in_fresh_process(env_value, code):
    env = dict(os.environ, RNNFAST_CPU_ISA=env_value)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=300)


def test_environment_variable_sets_the_build():
    out = _in_fresh_process("baseline", "import rnnfast._ops as o; print(o.get_cpu_isa())")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "baseline"


def test_bad_environment_variable_is_a_clear_error_at_the_first_call():
    code = ("import torch, rnnfast\n"
            "m = rnnfast.LSTM(3, 16)\n"
            "try:\n"
            "    m(torch.randn(2, 2, 3))\n"
            "except ValueError as e:\n"
            "    print('ValueError:', e)\n")
    out = _in_fresh_process("avx1024", code)
    assert out.returncode == 0, out.stderr
    assert "RNNFAST_CPU_ISA: expected 'baseline', 'avx2' or 'avx512', but got 'avx1024'" in out.stdout


@pytest.mark.parametrize("cell", ["rnn_tanh", "lstm", "gru"])
def test_weight_gradients_over_many_rows(cell):
    """T * N = 2100 rows: on a CPU where the weight gradients go through oneDNN (AVX-512,
    torch 2.14 on) they are summed over chunks of at most 1000 rows (csrc/cpu/common.h,
    mm_tn); C and H of 64 and more keep them off the narrow-output path."""
    _check_against_torch_and_reference(cell, 70, 30, 72, 80, seed=11, bidirectional=False)
