"""The packed ops (rnn/lstm/gru_packed_forward and _backward: a PackedSequence's data and
batch_sizes, CPU): opcheck, gradcheck in float64, the inference path against the training
one, the dense ops' results where every sequence has the same length, and clear errors for
bad batch_sizes. Their results against torch.nn and the float64 reference, module by
module, are in test_packed.py."""
import pytest
import torch

from helpers import FORWARD_CASE_IDS, FORWARD_CASES, OP_GATES
from rnnfast._ops import ACTIVATIONS, GRUFunction, LSTMFunction, RNNFunction, ops

G = OP_GATES
C, H = 4, 5
BATCH_SIZES = [4, 3, 3, 1]  # N = 4; the batch shrinks by 1, 0 and 2
# past the small-size loops (csrc/cpu/common.h, kSmallGemmFma): ATen GEMMs, packed W_hh
GEMM_BATCH_SIZES, GEMM_C, GEMM_H = [6, 6, 5, 2, 2, 1], 24, 24


def _packed_args(cell, batch_sizes=BATCH_SIZES, C=C, H=H, dtype=torch.float64, bias=True,
                 requires_grad=False, scale=0.5, seed=0):
    """(x [R, C], batch_sizes, h0[, c0], w_ih, w_hh, b_ih, b_hh) for a packed op."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: (torch.randn(*s, generator=g, dtype=torch.float64) * scale).to(dtype).requires_grad_(requires_grad)  # noqa: E731,E501
    R, N = sum(batch_sizes), batch_sizes[0]
    x, h0 = r(R, C), r(N, H)
    states = (h0, r(N, H)) if cell == "lstm" else (h0,)
    w_ih, w_hh = r(G[cell] * H, C), r(G[cell] * H, H)
    b_ih, b_hh = (r(G[cell] * H), r(G[cell] * H)) if bias else (None, None)
    return (x, torch.tensor(batch_sizes), *states, w_ih, w_hh, b_ih, b_hh)


def _forward(cell, args, reverse, training):
    """The packed forward op; returns (y, *final states, workspace or None)."""
    if cell == "rnn":
        return (*ops.rnn_packed_forward(*args, 0, reverse, training), None)
    if cell == "lstm":
        return ops.lstm_packed_forward(*args, reverse, training)
    return ops.gru_packed_forward(*args, reverse, training)


@pytest.mark.parametrize("cell,reverse,training,bias", FORWARD_CASES, ids=FORWARD_CASE_IDS)
def test_opcheck_packed_forward(cell, reverse, training, bias):
    args = _packed_args(cell, dtype=torch.float32, bias=bias)
    if cell == "rnn":
        torch.library.opcheck(ops.rnn_packed_forward, (*args, 0, reverse, training))
    elif cell == "lstm":
        torch.library.opcheck(ops.lstm_packed_forward, (*args, reverse, training))
    else:
        torch.library.opcheck(ops.gru_packed_forward, (*args, reverse, training))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("cell", list(G))
def test_opcheck_packed_backward(cell, reverse, dtype):
    args = _packed_args(cell, dtype=dtype)
    x, bs = args[:2]
    g = torch.Generator().manual_seed(5)
    dy = torch.randn(x.size(0), H, generator=g).to(dtype)
    dh = torch.randn(bs[0].item(), H, generator=g).to(dtype)
    y, *_, ws = _forward(cell, args, reverse, True)
    if cell == "rnn":
        torch.library.opcheck(ops.rnn_packed_backward, (dy, dh, *args[:5], y, 0, reverse))
    elif cell == "lstm":
        assert y.dtype == dtype and ws.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        torch.library.opcheck(ops.lstm_packed_backward, (dy, dh, dh, *args[:6], y, ws, reverse))
    else:
        torch.library.opcheck(ops.gru_packed_backward, (dy, dh, *args[:5], y, ws, reverse))


GRAD_CASES = [("rnn", "tanh"), ("rnn", "relu"), ("lstm", None), ("gru", None)]


@pytest.mark.parametrize("size", ["loops", "gemm"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("cell,act", GRAD_CASES, ids=[c + (f"-{a}" if a else "") for c, a in GRAD_CASES])
def test_gradcheck_packed(cell, act, reverse, size):
    """Every input's gradient, h0 (and c0) included: the rows a reverse step starts from h0
    and the rows whose sequence has ended carry their own gradients."""
    sizes = dict(batch_sizes=GEMM_BATCH_SIZES, C=GEMM_C, H=GEMM_H, scale=0.2) if size == "gemm" else {}
    args = _packed_args(cell, requires_grad=True, **sizes)
    x, bs, rest = args[0], args[1], args[2:]
    if cell == "rnn":
        fn = lambda x, *a: RNNFunction.apply(x, *a, ACTIVATIONS[act], reverse, bs)  # noqa: E731
    elif cell == "lstm":
        fn = lambda x, *a: LSTMFunction.apply(x, *a, reverse, bs)  # noqa: E731
    else:
        fn = lambda x, *a: GRUFunction.apply(x, *a, reverse, bs)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, *rest), fast_mode=size == "gemm")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("size", ["loops", "gemm"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("cell", list(G))
def test_packed_inference_equals_training(cell, reverse, size, dtype):
    """Inference keeps only two steps of the LSTM's c (a row's last c must survive the
    steps after its sequence ends) and saves no workspace; its results are the training
    forward's, bit for bit."""
    sizes = dict(batch_sizes=GEMM_BATCH_SIZES, C=GEMM_C, H=GEMM_H) if size == "gemm" else {}
    args = _packed_args(cell, dtype=dtype, **sizes)
    train, infer = _forward(cell, args, reverse, True), _forward(cell, args, reverse, False)
    if train[-1] is not None:
        assert train[-1].size(0) == args[0].size(0) and infer[-1].numel() == 0
    for a, b in zip(train[:-1], infer[:-1]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("cell", list(G))
def test_equal_lengths_match_the_dense_ops(cell, reverse, dtype):
    """batch_sizes [N] * T lays the data out as the dense ops' [T, N, C]: the same steps
    in the same order, so every output and gradient is the dense op's, bit for bit, but
    dW_hh: the dense op sums h0's step apart from the rest (two GEMMs, no gather), the
    packed one sums all steps in one GEMM, so they round differently."""
    T, N = 5, 3
    args = _packed_args(cell, batch_sizes=[N] * T, C=GEMM_C, H=GEMM_H, dtype=dtype)
    x, bs, rest = args[0], args[1], list(args[2:])
    dense = [x.view(T, N, GEMM_C)] + rest
    packed = _forward(cell, args, reverse, True)
    if cell == "rnn":
        ref = ops.rnn_forward(*dense, 0, reverse, True)
    elif cell == "lstm":
        ref = ops.lstm_forward(*dense, reverse, True)
    else:
        ref = ops.gru_forward(*dense, reverse, True)
    assert torch.equal(packed[0], ref[0].view(T * N, GEMM_H))
    for a, b in zip(packed[1:-1], ref[1:]):
        assert torch.equal(a, b.view(a.shape))
    g = torch.Generator().manual_seed(3)
    dy = torch.randn(T * N, GEMM_H, generator=g, dtype=dtype)
    dh = torch.randn(N, GEMM_H, generator=g, dtype=dtype)
    y, ws = packed[0], packed[-1]
    if cell == "rnn":
        got = ops.rnn_packed_backward(dy, dh, x, bs, *rest[:3], y, 0, reverse)
        want = ops.rnn_backward(dy.view(T, N, -1), dh, *dense[:4], ref[0], 0, reverse)
    elif cell == "lstm":
        got = ops.lstm_packed_backward(dy, dh, dh, x, bs, *rest[:4], y, ws, reverse)
        want = ops.lstm_backward(dy.view(T, N, -1), dh, dh, *dense[:5], ref[0], ref[3], reverse)
    else:
        got = ops.gru_packed_backward(dy, dh, x, bs, *rest[:3], y, ws, reverse)
        want = ops.gru_backward(dy.view(T, N, -1), dh, *dense[:4], ref[0], ref[2], reverse)
    dw_hh = 4 if cell == "lstm" else 3
    for i, (a, b) in enumerate(zip(got, want)):
        if i == dw_hh:
            torch.testing.assert_close(a, b)
        else:
            assert torch.equal(a, b.view(a.shape)), f"gradient {i}"


@pytest.mark.parametrize("batch_sizes,rows,match", [
    (torch.tensor([2.0, 2.0]), 4, "int64"),
    (torch.tensor([[2, 2]]), 4, "1-D"),
    (torch.tensor([], dtype=torch.int64), 0, "non-empty"),
    (torch.tensor([3, 1]), 4, r"batch_sizes\[0\] \(3\) to be the rows of h0 \(2\)"),
    (torch.tensor([2, 3]), 5, r"non-increasing .* batch_sizes\[1\] is 3"),
    (torch.tensor([2, 0]), 2, r"positive .* batch_sizes\[1\] is 0"),
    (torch.tensor([2, 2]), 5, "adds up to 4 rows, but x has 5"),
    (torch.tensor([2, 2]), 3, r"adds up to more than the 3 rows of x \(past them at batch_sizes\[1\]\)"),
])
@pytest.mark.parametrize("cell", list(G))
def test_bad_batch_sizes_are_clear_errors(cell, batch_sizes, rows, match):
    """The ops check what they are given themselves (the modules check it too, earlier):
    nothing reaches the kernels that could read past the data."""
    args = list(_packed_args(cell, batch_sizes=[2, 2], dtype=torch.float32))
    args[0] = torch.randn(rows, C)
    args[1] = batch_sizes
    with pytest.raises(RuntimeError, match=match):
        _forward(cell, args, False, True)


def test_batch_sizes_too_large_to_add_up_are_refused():
    """Counts whose sum would overflow int64 (h0 of 2**62 empty rows, H = 0) are refused
    before they are added up."""
    big = 2 ** 62
    with pytest.raises(RuntimeError, match="adds up to more than the 3 rows of x"):
        ops.gru_packed_forward(torch.randn(3, C), torch.tensor([big] * 4), torch.empty(big, 0),
                               torch.empty(0, C), torch.empty(0, 0), None, None, False, True)


@pytest.mark.parametrize("cell", list(G))
def test_packed_backward_checks_its_saved_tensors(cell):
    args = _packed_args(cell, dtype=torch.float32)
    x, bs = args[:2]
    y, *_, ws = _forward(cell, args, False, True)
    dy, dh = torch.zeros_like(y), torch.zeros_like(args[2])
    short = y[:-1]  # a y of the wrong number of rows
    with pytest.raises(RuntimeError, match=r"expected y of shape \[11, 5\]"):
        if cell == "rnn":
            ops.rnn_packed_backward(dy, dh, *args[:5], short, 0, False)
        elif cell == "lstm":
            ops.lstm_packed_backward(dy, dh, dh, *args[:6], short, ws, False)
        else:
            ops.gru_packed_backward(dy, dh, *args[:5], short, ws, False)
    if ws is not None:
        with pytest.raises(RuntimeError, match="workspace of a training forward"):
            if cell == "lstm":
                ops.lstm_packed_backward(dy, dh, dh, *args[:6], y, ws[:-1], False)
            else:
                ops.gru_packed_backward(dy, dh, *args[:5], y, ws[:-1], False)
