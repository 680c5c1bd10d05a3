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

from helpers import assert_close_to_ref, make_pair

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


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("cell", ["rnn_tanh", "rnn_relu", "lstm", "gru"])
@pytest.mark.parametrize("N,H", SIZES)
def test_each_build_matches_reference_and_torch(isa, cell, N, H):
    if not _run_isa_or_check_refusal(isa):
        return
    T, C = 5, 11
    m, f, m64 = make_pair(cell, C, H, bidirectional=True, seed=N * 1000 + H)
    torch.manual_seed(1)
    x = torch.randn(T, N, C)
    dy = torch.randn(T, N, 2 * H)
    outs = []
    for mod, dtype in ((f, torch.float32), (m, torch.float32), (m64, torch.float64)):
        xi = x.to(dtype).detach().clone().requires_grad_()
        y, hn = mod(xi)
        hn = hn[0] if isinstance(hn, tuple) else hn
        dhn = torch.ones_like(hn)
        ((y * dy.to(dtype)).sum() + (hn * dhn).sum()).backward()
        grads = {n: p.grad for n, p in mod.named_parameters()}
        outs.append((y.detach(), hn.detach(), xi.grad, grads))
    (y, hn, dx, g), (y_t, hn_t, dx_t, g_t), (y_r, hn_r, dx_r, g_r) = outs
    assert_close_to_ref(f"{isa} y", y, y_t, y_r)
    assert_close_to_ref(f"{isa} hn", hn, hn_t, hn_r)
    assert_close_to_ref(f"{isa} dx", dx, dx_t, dx_r)
    for name in g:
        assert_close_to_ref(f"{isa} d{name}", g[name], g_t[name], g_r[name])


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
def test_each_build_runs_packed_sequences(isa):
    if not _run_isa_or_check_refusal(isa):
        return
    from torch.nn.utils.rnn import pack_sequence
    m, f, m64 = make_pair("lstm", 7, 40, bidirectional=True, seed=5)
    torch.manual_seed(4)
    seqs = [torch.randn(t, 7) for t in (9, 6, 6, 2, 1)]
    outs = []
    for mod, dtype in ((f, torch.float32), (m, torch.float32), (m64, torch.float64)):
        packed = pack_sequence([s.to(dtype).clone() for s in seqs])
        packed.data.requires_grad_()
        y, (hn, cn) = mod(packed)
        (y.data.square().sum() + hn.sum() + cn.sum()).backward()
        outs.append((y.data.detach(), hn.detach(), cn.detach(),
                     [p.grad for p in mod.parameters()]))
    (y, hn, cn, g), (y_t, hn_t, cn_t, g_t), (y_r, hn_r, cn_r, g_r) = outs
    assert_close_to_ref("y", y, y_t, y_r)
    assert_close_to_ref("hn", hn, hn_t, hn_r)
    assert_close_to_ref("cn", cn, cn_t, cn_r)
    for a, b, r in zip(g, g_t, g_r):
        assert_close_to_ref("grad", a, b, r)


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
    T, N, C, H = 70, 30, 72, 80
    m, f, m64 = make_pair(cell, C, H, seed=11)
    torch.manual_seed(12)
    x = torch.randn(T, N, C)
    outs = []
    for mod, dtype in ((f, torch.float32), (m, torch.float32), (m64, torch.float64)):
        xi = x.to(dtype).detach().clone().requires_grad_()
        y, _ = mod(xi)
        (y * torch.linspace(-1, 1, H, dtype=dtype)).sum().backward()
        outs.append((xi.grad, {n: p.grad for n, p in mod.named_parameters()}))
    (dx, g), (dx_t, g_t), (dx_r, g_r) = outs
    assert_close_to_ref("dx", dx, dx_t, dx_r)
    for name in g:
        assert_close_to_ref(f"d{name}", g[name], g_t[name], g_r[name])
