"""SimpleRNN: the classic tutorial cell, its one-step forward and its fused sequence path,
against the tutorial's cell (rnnfast.reference.TutorialRNN) and the float64 reference loop."""
import copy

import pytest
import torch

import rnnfast
from rnnfast import reference
from rnnfast.reference import TutorialRNN

from helpers import assert_close_to_ref

C, H, O, T, N = 7, 9, 5, 6, 3



def _pair(nonlinearity=None):
    torch.manual_seed(0)
    tut = TutorialRNN(C, H, O)
    fast = rnnfast.SimpleRNN(C, H, O, nonlinearity=nonlinearity)
    fast.load_state_dict(tut.state_dict())
    return tut, fast


def test_state_dict_keys_and_init_hidden():
    tut, fast = _pair()
    assert list(fast.state_dict()) == list(tut.state_dict()) == \
        ["i2h.weight", "i2h.bias", "i2o.weight", "i2o.bias"]
    assert torch.equal(fast.initHidden(), tut.initHidden())


def test_step_matches_tutorial():
    tut, fast = _pair()
    x = torch.randn(1, C)
    hidden = tut.initHidden()
    for _ in range(4):
        a, ha = tut(x, hidden)
        b, hb = fast(x, hidden)
        assert torch.equal(a, b) and torch.equal(ha, hb)
        hidden = ha


@pytest.mark.parametrize("nonlinearity", [None, "tanh"], ids=["linear", "tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=["float32", "float64", "bfloat16", "float16"])
def test_sequence_matches_step_loop(nonlinearity, dtype):
    _, fast = _pair(nonlinearity)
    fast = fast.to(dtype)
    fast64 = copy.deepcopy(fast).double()
    g = torch.Generator().manual_seed(2)
    xs = torch.randn(T, N, C, generator=g, dtype=dtype)
    h0 = torch.randn(N, H, generator=g, dtype=dtype) * 0.3
    dout = torch.randn(T, N, O, generator=g, dtype=dtype)
    dh = torch.randn(N, H, generator=g, dtype=dtype)

    def run(model, seq_fn, x, h, do, dhh):
        x = x.detach().clone().requires_grad_()
        h = h.detach().clone().requires_grad_()
        out, hT = seq_fn(model, x, h)
        loss = (out * do).sum() + (hT * dhh).sum()
        params = dict(model.named_parameters())
        grads = torch.autograd.grad(loss, [x, h, *params.values()])
        res = {"log_probs": out.detach(), "hidden": hT.detach()}
        res.update({f"grad_{n}": gr for n, gr in zip(["x", "h0", *params], grads)})
        return res

    def step_loop(model, x, h):
        outs = []
        for t in range(x.shape[0]):
            o, h = model(x[t], h)
            outs.append(o)
        return torch.stack(outs), h

    fused = run(fast, lambda m, x, h: m.forward_sequence(x, h), xs, h0, dout, dh)
    steps = run(fast, step_loop, xs, h0, dout, dh)
    ref = run(fast64, reference.simple_rnn_sequence, xs.double(), h0.double(), dout.double(),
              dh.double())
    for name in ref:
        assert_close_to_ref(name, fused[name], steps[name], ref[name])


def test_sequence_default_hidden_is_zeros():
    _, fast = _pair()
    xs = torch.randn(T, N, C)
    a, ha = fast.forward_sequence(xs)
    b, hb = fast.forward_sequence(xs, torch.zeros(N, H))
    assert torch.equal(a, b) and torch.equal(ha, hb)


def test_sequence_rejects_bad_shapes():
    _, fast = _pair()
    with pytest.raises(ValueError, match=r"expected inputs of shape \[T, N, 7\]"):
        fast.forward_sequence(torch.randn(T, N, C + 1))
    with pytest.raises(ValueError, match=r"expected hidden of shape \[3, 9\]"):
        fast.forward_sequence(torch.randn(T, N, C), torch.randn(N + 1, H))
    with pytest.raises(ValueError, match="nonlinearity"):
        rnnfast.SimpleRNN(C, H, O, nonlinearity="relu")
