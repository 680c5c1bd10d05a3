"""Bad input, tried through every entry point: each gets a Python exception whose message
says what was expected (never a crash, a hang or a wrong answer). Inputs that are legal
but unusual (transposed, expanded, zero batch) must give torch.nn's answer."""
import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import rnnfast
import rnnfast.functional as RF
from rnnfast._ops import ops

C, H, T, N = 4, 6, 3, 2


def lstm():
    return rnnfast.LSTM(C, H)


def x(*shape, dtype=torch.float32):
    return torch.randn(*(shape or (T, N, C))).to(dtype)


def _message_of(call, exc):
    """The message of the exc that call raises (torch.nn's, for the same bad input)."""
    with pytest.raises(exc) as info:
        call()
    assert "torch.float64" in str(info.value) and "torch.float32" in str(info.value)
    return str(info.value)


z = torch.zeros
W = dict(w_ih=torch.randn(4 * H, C), w_hh=torch.randn(4 * H, H), b=torch.randn(4 * H))

# (id, call, exception types, a fragment the message must contain)
BAD = [
    ("layer-rank-1", lambda: lstm()(x(C)), ValueError, "2D or 3D"),
    ("layer-rank-4", lambda: lstm()(x(T, N, C, 1)), ValueError, "2D or 3D"),
    ("layer-feature-size", lambda: lstm()(x(T, N, C + 1)), RuntimeError, "input_size"),
    ("layer-h0-batch", lambda: lstm()(x(), (z(1, N + 1, H), z(1, N, H))), RuntimeError, "Expected hidden[0] size"),
    ("layer-c0-size", lambda: lstm()(x(), (z(1, N, H), z(1, N, H + 1))), RuntimeError, "Expected hidden[1] size"),
    ("layer-h0-layers", lambda: rnnfast.GRU(C, H)(x(), z(2, N, H)), RuntimeError, "Expected hidden size"),
    ("layer-hx-one-tensor", lambda: lstm()(x(), (z(1, N, H),)), ValueError, "tuple (h_0, c_0)"),
    ("layer-hx-2d-for-3d", lambda: lstm()(x(), (z(N, H), z(N, H))), RuntimeError, "should also be 3-D"),
    # torch.nn's own words, which changed in torch 2.7 ("input must have the type ..." before)
    ("layer-input-float64", lambda: lstm()(x(dtype=torch.float64)), ValueError,
     lambda: _message_of(lambda: torch.nn.LSTM(C, H)(x(dtype=torch.float64)), ValueError)),
    ("layer-input-int64", lambda: lstm()(torch.ones(T, N, C, dtype=torch.int64)), ValueError, "int64"),
    ("layer-input-bool", lambda: lstm()(torch.ones(T, N, C, dtype=torch.bool)), ValueError, "bool"),
    ("layer-h0-float64", lambda: lstm()(x(), (z(1, N, H, dtype=torch.float64), z(1, N, H))), RuntimeError,
     "expected h0 to have dtype Float like the input, but got Double"),
    ("layer-input-complex64", lambda: lstm()(x().to(torch.complex64)), ValueError, "complex64"),
    ("layer-input-list", lambda: rnnfast.GRU(C, H)([[1.0] * C]), TypeError, "Tensor"),
    ("layer-T-zero", lambda: lstm()(x(0, N, C)), RuntimeError, "sequence length to be larger than 0"),
    ("rnn-bad-nonlinearity", lambda: rnnfast.RNN(C, H, nonlinearity="gelu"), ValueError, "Unknown nonlinearity"),
    ("lstm-proj-too-large", lambda: rnnfast.LSTM(C, H, proj_size=H), ValueError, "proj_size"),
    ("packed-3d-data", lambda: lstm()(PackedSequence(x(), torch.tensor([2, 1, 1]), None, None)), ValueError,
     "2 dims"),
    ("packed-increasing", lambda: lstm()(PackedSequence(x(5, C), torch.tensor([2, 3]), None, None)), ValueError,
     "non-increasing"),
    ("packed-sum", lambda: lstm()(PackedSequence(x(6, C), torch.tensor([3, 2]), None, None)), ValueError,
     "adds up to 5 rows, but its data has 6"),
    ("packed-zero-count", lambda: lstm()(PackedSequence(x(3, C), torch.tensor([3, 0]), None, None)), ValueError,
     "positive"),
    ("packed-h0-batch", lambda: lstm()(pack_padded_sequence(x(), [3, 2]), (z(1, N + 1, H), z(1, N + 1, H))),
     RuntimeError, "Expected hidden[0] size"),
    ("cell-rank-3", lambda: rnnfast.GRUCell(C, H)(x()), ValueError, "1D or 2D"),
    ("cell-feature-size", lambda: rnnfast.RNNCell(C, H)(x(N, C + 2)), RuntimeError, "4 features"),
    ("cell-h-shape", lambda: rnnfast.LSTMCell(C, H)(x(N, C), (z(N, H + 1), z(N, H))), RuntimeError, "shape [2, 6]"),
    ("cell-int-input", lambda: rnnfast.GRUCell(C, H)(torch.ones(N, C, dtype=torch.int32)), TypeError, "int32"),
    ("functional-bad-nonlinearity", lambda: RF.rnn_layer(x(), z(N, H), W["w_ih"][:H], W["w_hh"][:H, :],
                                                         nonlinearity="sigmoid"), ValueError, "nonlinearity"),
    ("functional-h0-shape", lambda: RF.lstm_layer(x(), z(N + 1, H), z(N, H), W["w_ih"], W["w_hh"]), RuntimeError,
     "h0"),
    ("functional-w_hh-shape", lambda: RF.lstm_layer(x(), z(N, H), z(N, H), W["w_ih"], W["w_hh"][:, :-1]),
     RuntimeError, "w_hh"),
    ("functional-w_ih-gates", lambda: RF.gru_layer(x(), z(N, H), W["w_ih"], W["w_hh"][:3 * H]), RuntimeError,
     "w_ih"),
    # float16/bfloat16 run in float32 inside, after the dtypes were checked as given
    ("functional-bfloat16-w_hh-float32", lambda: RF.lstm_layer(
        x(dtype=torch.bfloat16), z(N, H, dtype=torch.bfloat16), z(N, H, dtype=torch.bfloat16),
        W["w_ih"].bfloat16(), W["w_hh"]), RuntimeError,
     "expected w_hh to have dtype BFloat16 like the input, but got Float"),
    ("functional-float16-h0-float32", lambda: RF.rnn_layer(
        x(dtype=torch.float16), z(N, H), W["w_ih"][:H].half(), W["w_hh"][:H].half()), RuntimeError,
     "expected h0 to have dtype Half like the input, but got Float"),
    ("functional-bias-size", lambda: RF.lstm_layer(x(), z(N, H), z(N, H), W["w_ih"], W["w_hh"], W["b"][:-1]),
     RuntimeError, "b_ih"),
    ("op-rank-2-input", lambda: ops.gru_forward(x(N, C), z(N, H), W["w_ih"][:3 * H], W["w_hh"][:3 * H], None, None,
                                                False, False), RuntimeError, "x"),
    ("op-bad-activation", lambda: ops.rnn_forward(x(), z(N, H), W["w_ih"][:H], W["w_hh"][:H], None, None, 7,
                                                  False, False), RuntimeError, "activation"),
    ("simple-rnn-sequence-rank", lambda: rnnfast.SimpleRNN(C, H, 3).forward_sequence(x(N, C)), ValueError,
     "[T, N, 4]"),
]


@pytest.mark.parametrize("call,exc,match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_is_a_clear_error(call, exc, match):
    if callable(match):
        match = match()
    with pytest.raises(exc) as info:
        call()
    assert match in str(info.value), f"message {str(info.value)!r} lacks {match!r}"


def test_bad_input_table_size():
    """The issue's report counts these: keep the table from shrinking unnoticed."""
    assert len(BAD) >= 35 and len({b[0] for b in BAD}) == len(BAD)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_unusual_but_legal_layouts_give_torchs_answer(cell):
    nn_cls = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}[cell]
    fast_cls = {"lstm": rnnfast.LSTM, "gru": rnnfast.GRU, "rnn": rnnfast.RNN}[cell]
    torch.manual_seed(0)
    m = nn_cls(C, H, num_layers=2, bidirectional=True)
    f = fast_cls(C, H, num_layers=2, bidirectional=True)
    f.load_state_dict(m.state_dict())
    inputs = {
        "transposed": torch.randn(N, T, C).transpose(0, 1),
        "expanded": torch.randn(1, 1, C).expand(T, N, C),               # stride 0
        "sliced": torch.randn(T, N, 2 * C)[:, :, ::2],
        "zero batch": torch.randn(T, 0, C),
    }
    for name, inp in inputs.items():
        out_m, st_m = m(inp)
        out_f, st_f = f(inp)
        torch.testing.assert_close(out_f, out_m, rtol=1e-5, atol=1e-6, msg=name)
        for a, b in zip(st_f if cell == "lstm" else (st_f,), st_m if cell == "lstm" else (st_m,)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
