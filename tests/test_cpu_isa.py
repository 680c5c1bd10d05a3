"""The CPU step kernels are built once per ISA (AVX-512 with 16-unit blocks, AVX2 and the
baseline with 8-unit blocks; csrc/cpu/kernels.cpp) and the best the CPU has runs. Every
build this CPU can run is checked here against the float64 reference and torch.nn, at
sizes that reach each part of the step GEMMs' tiling: the dot-product kernel (N * G <= 4),
row tiles and their 2- and 1-row remainders, partial unit blocks, the Elman pair tiles,
K chunks, and one thread or two. A build this CPU cannot run must be refused by name.

avx512bf16 is the AVX-512 build whose bfloat16 layers run their forward GEMMs (the input
projection and each step's recurrent GEMM) in bfloat16 with float32 sums
(csrc/cpu/gemm_bf16_impl.h); its tests below run bfloat16 layers."""
import os
import subprocess
import sys
import threading
import time

import pytest
import torch

import rnnfast
from rnnfast import _ops

from helpers import compare_all, make_pair, run_three
from test_packed import test_packed_matches_torch_and_reference as packed_case
from test_parity import _inputs

ISAS = ["baseline", "avx2", "avx512", "avx512bf16"]
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
    _assert_same_bits_on_one_thread_or_two(cell, torch.float32, C=9, seeds=(3, 2))


def _assert_same_bits_on_one_thread_or_two(cell, dtype, C, seeds):
    """y, hn (cn) and dh0 (dc0) of one layer with H = 72 (9 blocks of 8 units: 4 + 5 on two
    threads; 5 of 16: 3 + 2), N = 20, T = 6, are bit-identical on 1 and 2 threads."""
    H = 72
    _, f, _ = make_pair(cell, C, H, dtype, seed=seeds[0])
    torch.manual_seed(seeds[1])
    x = torch.randn(6, 20, C).to(dtype)
    h0 = torch.randn(1, 20, H).to(dtype).requires_grad_()
    c0 = torch.randn(1, 20, H).to(dtype).requires_grad_()
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            h0.grad = c0.grad = None
            y, hn = f(x, (h0, c0) if cell == "lstm" else h0)
            finals = list(hn) if cell == "lstm" else [hn]
            ((y.float() ** 2).sum() + sum((s.float() ** 2).sum() for s in finals)).backward()
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
    with pytest.raises(ValueError, match="expected 'baseline', 'avx2', 'avx512' or 'avx512bf16', but got 'sse9'"):
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
    assert "RNNFAST_CPU_ISA: expected 'baseline', 'avx2', 'avx512' or 'avx512bf16', but got 'avx1024'" in out.stdout


@pytest.mark.parametrize("cell", ["rnn_tanh", "lstm", "gru"])
def test_weight_gradients_over_many_rows(cell):
    """T * N = 2100 rows: under the AVX-512 settings the float32 weight gradients run
    rnnfast's own kernel (weight_grad_f32), which sums chunks of 256 rows (eight whole, one
    partial) and dW_hh's two row segments (h0's rows, then y's); elsewhere ATen, which on
    torch 2.14 with AVX-512 sums chunks of at most 1000 rows through oneDNN (mm_tn). C and
    H of 64 and more keep the ATen path off its narrow-output branch."""
    _check_against_torch_and_reference(cell, 70, 30, 72, 80, seed=11, bidirectional=False)


@pytest.mark.parametrize("cell", ["rnn_tanh", "lstm", "gru"])
def test_float32_weight_gradients_give_the_same_bits_on_one_thread_or_two(cell):
    """Under avx512 the float32 weight gradients come from rnnfast's own kernel, whose
    threads split the rows of dW; each entry must be summed in the same order whatever the
    split: dW_ih and dW_hh bit-identical on 1 and 2 threads. 600 rows (chunks of 256, the
    last partial), C = 40 (two whole vectors and a tail of 8 columns), H = 72 (dW's 216 or
    288 rows: blocks of 48 and partial tiles on either split)."""
    if not _run_isa_or_check_refusal("avx512"):
        return
    _, f, _ = make_pair(cell, 40, 72, torch.float32, seed=5)
    torch.manual_seed(6)
    x = torch.randn(20, 30, 40)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            f.zero_grad()
            y, _ = f(x)
            (y ** 2).sum().backward()
            results.append([f.weight_ih_l0.grad.clone(), f.weight_hh_l0.grad.clone()])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


# ---- the bfloat16 GEMMs (avx512bf16) ----
# (N, C, H): odd C and odd H pad the last pair and the last 16-unit block; N = 13 leaves a
# partial row group after full tiles of every height (8, 6, 4); H = 300 takes the LSTM's
# weights in two K chunks (128 pairs each) and C = 600 the projection's in three.
BF16_SIZES = [(1, 11, 5), (2, 16, 24), (13, 11, 37), (13, 9, 16), (7, 600, 300)]


@pytest.mark.parametrize("cell", ["rnn_tanh", "rnn_relu", "lstm", "gru"])
@pytest.mark.parametrize("N,C,H", BF16_SIZES)
def test_bf16_gemms_match_reference_and_torch(cell, N, C, H):
    """bfloat16 layers under avx512bf16: every output, final state and gradient against
    torch.nn in bfloat16 and the float64 reference (twice torch.nn's error at most)."""
    if not _run_isa_or_check_refusal("avx512bf16"):
        return
    m, f, m64 = make_pair(cell, C, H, torch.bfloat16, seed=N * 1000 + H, bidirectional=True)
    x, hx, upstream = _inputs(cell, 1, True, False, True, torch.bfloat16, T=6, N=N, C=C, H=H,
                              seed=N + H)
    compare_all(*run_three(cell, x, hx, m, f, m64, upstream))


@pytest.mark.parametrize("cell,G", [("rnn", 1), ("lstm", 4), ("gru", 3)])
def test_bf16_gemms_run_and_stay_close_to_float32(cell, G):
    """The bfloat16 GEMMs do run for a bfloat16 layer under avx512bf16 (the training
    workspace, kept in float32, differs from avx512's, which computes in float32; avx512
    gives the same bits twice) and the two stay close."""
    if not _run_isa_or_check_refusal("avx512bf16"):
        return
    torch.manual_seed(5)
    T, N, C, H = 7, 5, 18, 40
    x = torch.randn(T, N, C).bfloat16()
    h0 = torch.randn(N, H).bfloat16()
    w_ih = (torch.randn(G * H, C) / C ** 0.5).bfloat16()
    w_hh = (torch.randn(G * H, H) / H ** 0.5).bfloat16()
    b_ih, b_hh = torch.randn(G * H).bfloat16(), torch.randn(G * H).bfloat16()

    def run():
        ops = torch.ops.rnnfast
        if cell == "lstm":
            return ops.lstm_forward(x, h0, torch.randn(N, H, generator=torch.Generator().manual_seed(1))
                                    .bfloat16(), w_ih, w_hh, b_ih, b_hh, False, True)[3]
        if cell == "gru":
            return ops.gru_forward(x, h0, w_ih, w_hh, b_ih, b_hh, False, True)[2]
        # Elman keeps no workspace: its bfloat16 y (1400 values, some of which round
        # differently)
        return ops.rnn_forward(x, h0, w_ih, w_hh, b_ih, b_hh, 0, False, True)[0].float()

    with _ops.cpu_isa("avx512bf16"):
        fast = run()
    with _ops.cpu_isa("avx512"):
        exact = run()
    with _ops.cpu_isa("avx512"):
        again = run()
    assert torch.equal(exact, again)
    assert not torch.equal(fast, exact)
    torch.testing.assert_close(fast, exact, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("cell,G", [("rnn", 1), ("lstm", 4), ("gru", 3)])
def test_bf16_backward_gemms_run_and_stay_close_to_float32(cell, G):
    """The backward op of a bfloat16 layer, on the same forward results: under avx512bf16
    each step's dh and the whole-sequence dx, dW_ih and dW_hh come from bfloat16 GEMMs (gate
    gradients rounded to bfloat16), so every gradient (dh0, dc0 and the biases through the
    dh carried back) differs from avx512's somewhere, and stays close."""
    if not _run_isa_or_check_refusal("avx512bf16"):
        return
    g = torch.Generator().manual_seed(8)
    T, N, C, H = 9, 6, 20, 24

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).bfloat16()
    x, h0, c0 = r(T, N, C), r(N, H), r(N, H)
    w_ih, w_hh = r(G * H, C, scale=C ** -0.5), r(G * H, H, scale=H ** -0.5)
    b_ih, b_hh = r(G * H), r(G * H)
    dy, dhn, dcn = r(T, N, H), r(N, H), r(N, H)
    ops = torch.ops.rnnfast
    if cell == "lstm":
        y, _, _, ws = ops.lstm_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, False, True)
        run = lambda: ops.lstm_backward(dy, dhn, dcn, x, h0, c0, w_ih, w_hh, y, ws, False)
        names = ["dx", "dh0", "dc0", "dw_ih", "dw_hh", "db"]
    elif cell == "gru":
        y, _, ws = ops.gru_forward(x, h0, w_ih, w_hh, b_ih, b_hh, False, True)
        run = lambda: ops.gru_backward(dy, dhn, x, h0, w_ih, w_hh, y, ws, False)
        names = ["dx", "dh0", "dw_ih", "dw_hh", "db_ih", "db_hh"]
    else:
        y, _ = ops.rnn_forward(x, h0, w_ih, w_hh, b_ih, b_hh, 0, False, True)
        run = lambda: ops.rnn_backward(dy, dhn, x, h0, w_ih, w_hh, y, 0, False)
        names = ["dx", "dh0", "dw_ih", "dw_hh", "db"]
    with _ops.cpu_isa("avx512bf16"):
        fast = dict(zip(names, run()))
    with _ops.cpu_isa("avx512"):
        exact = dict(zip(names, run()))
    for name in names:
        assert not torch.equal(fast[name], exact[name]), name
        torch.testing.assert_close(fast[name].float(), exact[name].float(), rtol=0.03,
                                   atol=0.03 * exact[name].abs().max().item(), msg=name)


@pytest.mark.parametrize("cell", ["rnn_tanh", "lstm", "gru"])
def test_bf16_gemms_run_packed_sequences(cell):
    """test_packed's check in bfloat16 under avx512bf16: sequences that end at different
    steps (their state rows leave the step GEMMs) in both directions."""
    if not _run_isa_or_check_refusal("avx512bf16"):
        return
    packed_case(cell, [9, 9, 8, 6, 6, 5, 3, 2, 2, 1], False, 1, True, True, torch.bfloat16,
                "ops", size=(24, 40))


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_bf16_gemms_project_in_chunks(cell):
    """Past 4M floats of pre-activations the bfloat16 projection runs in chunks of steps,
    each written into one buffer that the call reuses (csrc/cpu/common.h, ProjectedChunks):
    one sequence of 1100 steps and fifteen of 80, so that in reverse the chunks grow (the
    buffer is replaced) and forward they shrink (the buffer's front is reused)."""
    if not _run_isa_or_check_refusal("avx512bf16"):
        return
    packed_case(cell, [1100] + [80] * 15, False, 1, True, True, torch.bfloat16, "ops",
                size=(4, 128))


@pytest.mark.parametrize("cell", ["rnn_tanh", "lstm", "gru"])
def test_bf16_gemms_give_the_same_bits_on_one_thread_or_two(cell):
    """The bfloat16 projection splits rows over threads and the step GEMMs split unit
    blocks; neither may change a sum: y, hn (cn) and dh0 (dc0) are bit-identical on 1 and
    2 threads (dx and dW come from torch's GEMMs)."""
    if not _run_isa_or_check_refusal("avx512bf16"):
        return
    _assert_same_bits_on_one_thread_or_two(cell, torch.bfloat16, C=10, seeds=(4, 6))


def test_a_bf16_call_keeps_the_gemms_it_began_with_while_the_setting_changes():
    """set_cpu_isa from another thread during bfloat16 calls: every call must finish and give
    exactly what one of the two settings gives (the bfloat16 GEMMs or not), never fail on
    operands prepared for one and run by the other (x and the weights stay bfloat16 for the
    bfloat16 GEMMs)."""
    if not _run_isa_or_check_refusal("avx512bf16"):
        return
    torch.manual_seed(0)
    m = rnnfast.LSTM(24, 32).bfloat16()
    x = torch.randn(3, 2, 24).bfloat16()
    refs = []
    for isa in ("avx512bf16", "avx512"):
        with _ops.cpu_isa(isa), torch.no_grad():
            refs.append(m(x)[0])
    assert not torch.equal(refs[0], refs[1])
    stop = threading.Event()

    def flip():
        i = 0
        while not stop.is_set():
            _ops.set_cpu_isa(("avx512", "avx512bf16")[i % 2])
            i += 1
            time.sleep(0)  # lets the calls take the GIL back

    flipper = threading.Thread(target=flip)
    flipper.start()
    try:
        with torch.no_grad():
            for _ in range(1000):
                y = m(x)[0]
                assert torch.equal(y, refs[0]) or torch.equal(y, refs[1])
    finally:
        stop.set()
        flipper.join()
