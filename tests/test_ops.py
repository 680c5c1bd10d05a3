"""The ops themselves: opcheck on every op (schema, fake/meta implementation, AOT
dispatch), gradcheck in float64 of every autograd.Function, and the inference path
saving nothing."""
import pytest
import torch

from helpers import FORWARD_CASE_IDS, FORWARD_CASES, OP_GATES
from rnnfast._ops import GRUFunction, LSTMFunction, RNNFunction, ops

T, N, C, H = 3, 2, 4, 5
G = OP_GATES


def _layer_args(cell, dtype=torch.float64, bias=True, seed=0, requires_grad=False,
                size=(T, N, C, H), scale=0.5):
    T_, N_, C_, H_ = size
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: (torch.randn(*s, generator=g, dtype=dtype) * scale).requires_grad_(requires_grad)  # noqa: E731
    x, h0 = r(T_, N_, C_), r(N_, H_)
    w_ih, w_hh = r(G[cell] * H_, C_), r(G[cell] * H_, H_)
    b_ih, b_hh = (r(G[cell] * H_), r(G[cell] * H_)) if bias else (None, None)
    if cell == "lstm":
        return x, h0, r(N_, H_), w_ih, w_hh, b_ih, b_hh
    return x, h0, w_ih, w_hh, b_ih, b_hh


@pytest.mark.parametrize("cell,reverse,training,bias", FORWARD_CASES, ids=FORWARD_CASE_IDS)
def test_opcheck_forward(cell, reverse, training, bias):
    args = _layer_args(cell, torch.float32, bias)
    if cell == "rnn":
        torch.library.opcheck(ops.rnn_forward, (*args, 0, reverse, training))
    elif cell == "lstm":
        torch.library.opcheck(ops.lstm_forward, (*args, reverse, training))
    else:
        torch.library.opcheck(ops.gru_forward, (*args, reverse, training))


@pytest.mark.parametrize("cell", list(G))
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_opcheck_backward(cell, reverse):
    args = _layer_args(cell, torch.float32)
    g = torch.Generator().manual_seed(5)
    dy, dh = torch.randn(T, N, H, generator=g), torch.randn(N, H, generator=g)
    if cell == "rnn":
        x, h0, w_ih, w_hh, b_ih, b_hh = args
        y, _ = ops.rnn_forward(*args, 1, reverse, True)
        torch.library.opcheck(ops.rnn_backward, (dy, dh, x, h0, w_ih, w_hh, y, 1, reverse))
    elif cell == "lstm":
        x, h0, c0, w_ih, w_hh, b_ih, b_hh = args
        y, _, _, ws = ops.lstm_forward(*args, reverse, True)
        dc = torch.randn(N, H, generator=g)
        torch.library.opcheck(ops.lstm_backward,
                              (dy, dh, dc, x, h0, c0, w_ih, w_hh, y, ws, reverse))
    else:
        x, h0, w_ih, w_hh, b_ih, b_hh = args
        y, _, ws = ops.gru_forward(*args, reverse, True)
        torch.library.opcheck(ops.gru_backward, (dy, dh, x, h0, w_ih, w_hh, y, ws, reverse))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("cell", list(G))
def test_opcheck_half_precision(cell, dtype):
    """float16/bfloat16: outputs in the input's dtype, the training workspace in float32
    (what the fake implementations say), forward and backward."""
    args = _layer_args(cell, dtype)
    g = torch.Generator().manual_seed(5)
    dy, dh = (torch.randn(T, N, H, generator=g).to(dtype), torch.randn(N, H, generator=g).to(dtype))
    if cell == "rnn":
        torch.library.opcheck(ops.rnn_forward, (*args, 0, True, True))
        y, _ = ops.rnn_forward(*args, 0, False, True)
        torch.library.opcheck(ops.rnn_backward, (dy, dh, *args[:4], y, 0, False))
    elif cell == "lstm":
        torch.library.opcheck(ops.lstm_forward, (*args, True, True))
        y, _, _, ws = ops.lstm_forward(*args, False, True)
        assert y.dtype == dtype and ws.dtype == torch.float32
        torch.library.opcheck(ops.lstm_backward, (dy, dh, dh, *args[:5], y, ws, False))
    else:
        torch.library.opcheck(ops.gru_forward, (*args, True, True))
        y, _, ws = ops.gru_forward(*args, False, True)
        assert y.dtype == dtype and ws.dtype == torch.float32
        torch.library.opcheck(ops.gru_backward, (dy, dh, *args[:4], y, ws, False))


GRAD_CASES = [("rnn", "tanh"), ("rnn", "relu"), ("rnn", "identity"), ("lstm", None), ("gru", None)]


# (T, N, C, H) where the input projection and the dx, dW_ih and dW_hh GEMMs all pass
# csrc/cpu/common.h's 4096 multiply-adds, so the ATen route runs (the module's T, N, C, H
# take the small loops)
GEMM_SIZE = (3, 4, 24, 24)


@pytest.mark.parametrize("size", ["loops", "gemm"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("cell,act", GRAD_CASES, ids=[c + (f"-{a}" if a else "") for c, a in GRAD_CASES])
def test_gradcheck(cell, act, bias, reverse, size):
    # at 24 units, weights of 0.5 * randn saturate every gate; 0.2 keeps the Jacobian lively
    args = _layer_args(cell, torch.float64, bias, requires_grad=True,
                       **(dict(size=GEMM_SIZE, scale=0.2) if size == "gemm" else {}))
    if cell == "rnn":
        from rnnfast._ops import ACTIVATIONS
        fn = lambda *a: RNNFunction.apply(*a, ACTIVATIONS[act], reverse)  # noqa: E731
    elif cell == "lstm":
        fn = lambda *a: LSTMFunction.apply(*a, reverse)  # noqa: E731
    else:
        fn = lambda *a: GRUFunction.apply(*a, reverse)  # noqa: E731
    # the larger size in fast mode (a random direction's derivative, both ways: thousands of
    # weight entries would each take two forward calls in the full check)
    assert torch.autograd.gradcheck(fn, args, fast_mode=size == "gemm")


@pytest.mark.parametrize("cell", list(G))
def test_inference_saves_nothing(cell):
    args = _layer_args(cell, torch.float32)
    if cell == "lstm":
        assert ops.lstm_forward(*args, False, False)[3].numel() == 0
        assert ops.lstm_forward(*args, False, True)[3].shape == (T, N, 5 * H)
    elif cell == "gru":
        assert ops.gru_forward(*args, False, False)[2].numel() == 0
        assert ops.gru_forward(*args, False, True)[2].shape == (T, N, 4 * H)
    # the inference result equals the training one
    if cell == "rnn":
        a, b = ops.rnn_forward(*args, 0, False, False), ops.rnn_forward(*args, 0, False, True)
    elif cell == "lstm":
        a, b = ops.lstm_forward(*args, False, False)[:3], ops.lstm_forward(*args, False, True)[:3]
    else:
        a, b = ops.gru_forward(*args, False, False)[:2], ops.gru_forward(*args, False, True)[:2]
    for u, v in zip(a, b):
        assert torch.equal(u, v)


@pytest.mark.parametrize("cell", list(G))
def test_no_grad_builds_no_graph(cell):
    import rnnfast
    m = {"rnn": rnnfast.RNN, "lstm": rnnfast.LSTM, "gru": rnnfast.GRU}[cell](C, H)
    x = torch.randn(T, N, C)
    with torch.no_grad():
        y, _ = m(x)
    assert y.grad_fn is None
    y, _ = m(x)
    assert y.grad_fn is not None


ZERO_CASES = [(cell, dim) for cell in G for dim in ("T", "N", "H")]


@pytest.mark.parametrize("cell,dim", ZERO_CASES, ids=[f"{c}-{d}0" for c, d in ZERO_CASES])
def test_zero_sized_dimension(cell, dim):
    """T, N or H of zero: forward and backward run and give the empty or zero results
    that an empty sum gives (dW and db zero, dh0/dc0 the incoming dhn/dcn)."""
    sizes = {"T": T, "N": N, "H": H, dim: 0}
    T_, N_, H_ = sizes["T"], sizes["N"], sizes["H"]
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float32)  # noqa: E731
    GH = G[cell] * H_
    x, h0, w_ih, w_hh, b = r(T_, N_, C), r(N_, H_), r(GH, C), r(GH, H_), r(GH)
    dy, dhn = r(T_, N_, H_), r(N_, H_)
    if cell == "rnn":
        y, hn = ops.rnn_forward(x, h0, w_ih, w_hh, b, b, 0, False, True)
        grads = ops.rnn_backward(dy, dhn, x, h0, w_ih, w_hh, y, 0, False)
        dh0, weight_grads = grads[1], grads[2:]
    elif cell == "lstm":
        c0, dcn = r(N_, H_), r(N_, H_)
        y, hn, cn, ws = ops.lstm_forward(x, h0, c0, w_ih, w_hh, b, b, False, True)
        grads = ops.lstm_backward(dy, dhn, dcn, x, h0, c0, w_ih, w_hh, y, ws, False)
        dh0, weight_grads = grads[1], grads[3:]
        assert cn.shape == (N_, H_)
        if T_ == 0:
            assert torch.equal(cn, c0) and torch.equal(grads[2], dcn)
    else:
        y, hn, ws = ops.gru_forward(x, h0, w_ih, w_hh, b, b, False, True)
        grads = ops.gru_backward(dy, dhn, x, h0, w_ih, w_hh, y, ws, False)
        dh0, weight_grads = grads[1], grads[2:]
    assert y.shape == (T_, N_, H_) and hn.shape == (N_, H_)
    assert grads[0].shape == x.shape and dh0.shape == (N_, H_)
    if T_ == 0:
        assert torch.equal(hn, h0) and torch.equal(dh0, dhn)
    for gw in weight_grads:
        assert not gw.any(), "gradients of a sum over no steps or rows must be zero"


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_autocast_does_not_reach_inside_the_ops(cell):
    """Under an enclosing CPU autocast the ops keep the dtypes they were given (an inner
    GEMM re-cast to bfloat16 used to fail): the functional layers, which call the ops
    directly, give the results they give without autocast, bit for bit. (The modules
    choose their autocast dtype before calling them: test_autocast.py.)"""
    import rnnfast.functional as RF
    torch.manual_seed(0)
    G = {"rnn": 1, "lstm": 4, "gru": 3}[cell]
    w = [torch.randn(G * H, C) * 0.3, torch.randn(G * H, H) * 0.3, torch.randn(G * H), torch.randn(G * H)]
    x = torch.randn(T, N, C)
    h0 = torch.randn(N, H)

    def run():
        xr = x.clone().requires_grad_()
        ws = [t.clone().requires_grad_() for t in w]
        if cell == "lstm":
            out = RF.lstm_layer(xr, h0, h0, *ws)[0]
        elif cell == "gru":
            out = RF.gru_layer(xr, h0, *ws)[0]
        else:
            out = RF.rnn_layer(xr, h0, *ws)[0]
        out.sum().backward()
        return out.detach(), [xr.grad] + [t.grad for t in ws]

    out, grads = run()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_ac, grads_ac = run()
    assert out_ac.dtype == torch.float32
    assert torch.equal(out, out_ac)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_ac))


# (T, N, C, H): the input projection by small_projection's loops (at most 4096
# multiply-adds), and by the GEMM
PROJECTION_SIZES = [(3, 2, 4, 5), (1, 1, 8, 8), (20, 8, 32, 32)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("size", PROJECTION_SIZES, ids=["small", "tiny", "gemm"])
@pytest.mark.parametrize("biases", ["ih", "hh", "both", "none"])
@pytest.mark.parametrize("cell", list(G))
def test_forward_each_bias(cell, biases, size, dtype):
    """Either bias alone, both, or none, on both routes of the input projection (the
    GRU's b_hh splits: b_hr, b_hz folded into it, b_hn inside r * (...)): outputs and
    final states against the reference cells in float64, both directions."""
    from rnnfast import reference
    T_, N_, C_, H_ = size
    g = torch.Generator().manual_seed(11)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64) * 0.5  # noqa: E731
    x, h0, c0 = r(T_, N_, C_), r(N_, H_), r(N_, H_)
    # W_hh scaled to a contracting recurrence: float32's rounding is then not amplified
    # over the 20 steps of the largest size (at 0.5 * randn the Elman RNN is chaotic there)
    w_ih, w_hh = r(G[cell] * H_, C_), r(G[cell] * H_, H_) / H_ ** 0.5
    b_ih = r(G[cell] * H_) if biases in ("ih", "both") else None
    b_hh = r(G[cell] * H_) if biases in ("hh", "both") else None
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    tol = dict(atol=1e-12, rtol=1e-12) if dtype == torch.float64 else dict(atol=2e-5, rtol=1e-5)
    for reverse in (False, True):
        h, c, ys = h0, c0, [None] * T_
        for t in (reversed(range(T_)) if reverse else range(T_)):
            if cell == "rnn":
                h = reference.rnn_cell(x[t], h, w_ih, w_hh, b_ih, b_hh)
            elif cell == "lstm":
                h, c = reference.lstm_cell(x[t], h, c, w_ih, w_hh, b_ih, b_hh)
            else:
                h = reference.gru_cell(x[t], h, w_ih, w_hh, b_ih, b_hh)
            ys[t] = h
        args = [cast(t) for t in (x, h0, w_ih, w_hh, b_ih, b_hh)]
        if cell == "rnn":
            out = ops.rnn_forward(*args, 0, reverse, False)
        elif cell == "lstm":
            out = ops.lstm_forward(*args[:2], cast(c0), *args[2:], reverse, False)[:3]
            torch.testing.assert_close(out[2].double(), c, **tol)
        else:
            out = ops.gru_forward(*args, reverse, False)[:2]
        torch.testing.assert_close(out[0].double(), torch.stack(ys), **tol)
        torch.testing.assert_close(out[1].double(), h, **tol)
