"""torch.autocast: the layers and cells run in the autocast dtype as torch.nn's do (same
output dtypes), with errors against the float64 reference comparable to torch.nn's own,
and float32 gradients for the float32 parameters. CPU bfloat16 here; the CUDA
float16/bfloat16 cases are in test_cuda.py."""
import pytest
import torch

import rnnfast
from rnnfast import reference
from helpers import CELLS, make_pair

LOW = torch.bfloat16


def _err(a, ref):
    return (a.double() - ref).abs().max().item()


@pytest.mark.parametrize("cell", list(CELLS))
def test_cpu_autocast_layers(cell):
    is_lstm = cell == "lstm"
    m, f, m64 = make_pair(cell, 8, 16, num_layers=2, bidirectional=True)
    x = torch.randn(9, 3, 8)
    with torch.autocast("cpu", dtype=LOW):
        out_f, st_f = f(x)
        try:
            out_m, st_m = m(x)
        except RuntimeError:
            # torch.nn's LSTM under CPU autocast is oneDNN's bfloat16 LSTM, which CPUs
            # without AVX512-BF16/AMX lack: its dtypes are still the autocast dtype
            out_m, st_m = out_f.new_empty(0, dtype=LOW), ((None, None) if is_lstm else None)
    ref, st_ref = reference.forward(m64, x.double())
    assert out_f.dtype == out_m.dtype
    states_f = st_f if is_lstm else (st_f,)
    states_m = st_m if is_lstm else (st_m,)
    states_ref = st_ref if is_lstm else (st_ref,)
    for a, b in zip(states_f, states_m):
        assert a.dtype == (out_m.dtype if b is None else b.dtype)
    # in the low dtype's error regime: within a few of its ulps at the output's scale,
    # and not much worse than torch.nn under the same autocast (where it ran)
    eps = torch.finfo(LOW).eps
    for ours, theirs, r in [(out_f, out_m, ref), *zip(states_f, states_m, states_ref)]:
        err_nn = _err(theirs, r) if theirs is not None and theirs.numel() else 0.0
        bound = max(2 * err_nn, 16 * eps * max(1.0, r.abs().max().item()))
        assert _err(ours, r) <= bound, (ours.dtype, _err(ours, r), bound)
    # gradients reach the float32 parameters, in float32
    with torch.autocast("cpu", dtype=LOW):
        out_f, _ = f(x)
    out_f.float().sum().backward()
    for name, p in f.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32, name
        assert torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("cell", ["rnn_tanh", "lstm", "gru"])
def test_cpu_autocast_cells(cell):
    nn_cls = {"rnn_tanh": torch.nn.RNNCell, "lstm": torch.nn.LSTMCell, "gru": torch.nn.GRUCell}[cell]
    fast_cls = {"rnn_tanh": rnnfast.RNNCell, "lstm": rnnfast.LSTMCell, "gru": rnnfast.GRUCell}[cell]
    torch.manual_seed(0)
    m = nn_cls(8, 16)
    f = fast_cls(8, 16)
    f.load_state_dict(m.state_dict())
    x = torch.randn(4, 8)
    with torch.autocast("cpu", dtype=LOW):
        out_m = m(x)
        out_f = f(x)
    outs_m = out_m if cell == "lstm" else (out_m,)
    outs_f = out_f if cell == "lstm" else (out_f,)
    for a, b in zip(outs_f, outs_m):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.float(), b.float(), rtol=0.05, atol=0.02)


def test_autocast_off_is_unchanged():
    _, f, _ = make_pair("gru", 4, 6)
    x = torch.randn(5, 2, 4)
    plain = f(x)[0]
    with torch.autocast("cpu", dtype=LOW, enabled=False):
        again = f(x)[0]
    assert again.dtype == torch.float32 and torch.equal(plain, again)
