"""Drop-in behaviour of rnnfast.RNN / LSTM / GRU: constructor, parameters, state_dict,
dropout, eval-mode backward, and clear errors for bad input."""
import inspect

import pytest
import torch

import rnnfast
from helpers import CELLS, assert_close_to_ref, make_pair
from rnnfast import reference

PAIRS = [(torch.nn.RNN, rnnfast.RNN), (torch.nn.LSTM, rnnfast.LSTM), (torch.nn.GRU, rnnfast.GRU)]
IDS = ["RNN", "LSTM", "GRU"]


@pytest.mark.parametrize("nn_cls,fast_cls", PAIRS, ids=IDS)
def test_constructor_and_parameters_match_torch(nn_cls, fast_cls):
    # RNNBase, not nn_cls: torch.compile refuses instances of nn.RNN / LSTM / GRU
    assert issubclass(fast_cls, torch.nn.RNNBase) and not issubclass(fast_cls, nn_cls)
    assert list(inspect.signature(fast_cls.__init__).parameters)[1:] == \
        [p for p in ("input_size", "hidden_size", "num_layers", "nonlinearity", "bias", "batch_first",
                     "dropout", "bidirectional", "proj_size", "device", "dtype")
         if (p != "nonlinearity" or nn_cls is torch.nn.RNN) and (p != "proj_size" or nn_cls is torch.nn.LSTM)]
    kwargs = dict(num_layers=2, bias=True, batch_first=True, dropout=0.1, bidirectional=True)
    torch.manual_seed(0)
    m = nn_cls(10, 20, **kwargs)
    torch.manual_seed(0)
    f = fast_cls(10, 20, **kwargs)  # same initialisation from the same seed
    assert list(f.state_dict()) == list(m.state_dict())
    for (n1, p1), (n2, p2) in zip(m.named_parameters(), f.named_parameters()):
        assert n1 == n2 and p1.shape == p2.shape and torch.equal(p1, p2)
    # positional arguments in torch.nn's order
    args = (10, 20, 2) + (("relu",) if nn_cls is torch.nn.RNN else ()) + (False, True, 0.0, True)
    a, b = nn_cls(*args), fast_cls(*args)
    assert list(a.state_dict()) == list(b.state_dict())
    assert (a.bias, a.batch_first, a.bidirectional) == (b.bias, b.batch_first, b.bidirectional)


@pytest.mark.parametrize("nn_cls,fast_cls", PAIRS, ids=IDS)
def test_acceptance_load_state_dict(nn_cls, fast_cls):
    """The issue's example: load a torch.nn state_dict, get the same outputs and gradients."""
    torch.manual_seed(0)
    m = nn_cls(10, 20, num_layers=2, bidirectional=True)
    f = fast_cls(10, 20, num_layers=2, bidirectional=True)
    f.load_state_dict(m.state_dict())
    x = torch.randn(7, 3, 10)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, sa = m(xa)
    yb, sb = f(xb)
    assert yb.shape == ya.shape
    torch.testing.assert_close(yb, ya)
    for u, v in zip(sb if isinstance(sb, tuple) else (sb,), sa if isinstance(sa, tuple) else (sa,)):
        torch.testing.assert_close(u, v)
    ya.sum().backward()
    yb.sum().backward()
    torch.testing.assert_close(xb.grad, xa.grad)
    for (n, p), q in zip(m.named_parameters(), f.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=lambda s: f"{n}: {s}")


@pytest.mark.parametrize("cell", ["rnn_tanh", "lstm", "gru"])
def test_dropout_between_layers_follows_torch(cell):
    """Training-mode dropout between layers: same masks as torch.nn under the same seed
    (both draw them with the same call in the same order), none in eval mode."""
    m, f, _ = make_pair(cell, 4, 6, num_layers=3, dropout=0.5, bidirectional=True)
    x = torch.randn(5, 2, 4)
    m.train(), f.train()
    torch.manual_seed(123)
    ya, _ = m(x)
    torch.manual_seed(123)
    yb, _ = f(x)
    torch.testing.assert_close(yb, ya)
    torch.manual_seed(7)
    assert not torch.equal(f(x)[0], yb)  # a different seed draws different masks
    m.eval(), f.eval()
    torch.testing.assert_close(f(x)[0], m(x)[0])
    torch.testing.assert_close(f(x)[0], f(x)[0], rtol=0, atol=0)


@pytest.mark.parametrize("cell", list(CELLS))
def test_backward_in_eval_mode(cell):
    m, f, m64 = make_pair(cell, 4, 6, num_layers=2)
    f.eval()
    x = torch.randn(5, 2, 4, requires_grad=True)
    y, _ = f(x)
    y.sum().backward()
    x64 = x.detach().double().requires_grad_()
    y64, _ = reference.forward(m64, x64)
    y64.sum().backward()
    xm = x.detach().clone().requires_grad_()
    m(xm)[0].sum().backward()
    assert_close_to_ref("grad_x", x.grad, xm.grad, x64.grad)


def test_deterministic_bitwise():
    _, f, _ = make_pair("lstm", 8, 16, num_layers=2, bidirectional=True)
    x = torch.randn(20, 4, 8, requires_grad=True)
    runs = []
    for _ in range(2):
        x.grad = None
        f.zero_grad()
        y, (h, c) = f(x)
        (y.sum() + h.sum() + c.sum()).backward()
        runs.append([y.detach(), x.grad.clone()] + [p.grad.clone() for p in f.parameters()])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_bias_grads_do_not_share_storage():
    f = rnnfast.LSTM(3, 4)
    f(torch.randn(2, 1, 3))[0].sum().backward()
    assert f.bias_ih_l0.grad.data_ptr() != f.bias_hh_l0.grad.data_ptr()


# ---- bad input: the same exception type as torch.nn, with a clear message ----

def _bad_inputs(cell):
    D, L, N, H = 1, 1, 3, 6
    is_lstm = cell == "lstm"

    def state(*shape):
        return (torch.zeros(*shape), torch.zeros(*shape)) if is_lstm else torch.zeros(*shape)
    return {
        "rank4_input": (torch.randn(2, 3, 4, 5), None),
        "rank1_input": (torch.randn(4), None),
        "wrong_features": (torch.randn(5, N, 7), None),
        "wrong_h0_batch": (torch.randn(5, N, 4), state(L * D, N + 1, H)),
        "wrong_h0_hidden": (torch.randn(5, N, 4), state(L * D, N, H + 1)),
        "wrong_h0_layers": (torch.randn(5, N, 4), state(L * D + 1, N, H)),
        "h0_rank_for_batched": (torch.randn(5, N, 4), state(N, H)),
        "h0_rank_for_unbatched": (torch.randn(5, 4), state(L * D, 1, H)),
        "dtype_mismatch": (torch.randn(5, N, 4, dtype=torch.float64), None),
    }


BAD = [(c, k) for c in CELLS for k in _bad_inputs(c)]


@pytest.mark.parametrize("cell,case", BAD, ids=[f"{c}-{k}" for c, k in BAD])
def test_bad_input_raises_like_torch(cell, case):
    m, f, _ = make_pair(cell, 4, 6)
    x, hx = _bad_inputs(cell)[case]
    with pytest.raises(Exception) as theirs:
        m(x, hx)
    with pytest.raises(type(theirs.value)) as ours:
        f(x, hx)
    assert str(ours.value), "the error must say what was expected"


@pytest.mark.parametrize("dtype", [torch.int64, torch.complex64])
def test_unsupported_dtype_is_a_clear_error(dtype):
    f = rnnfast.LSTM(4, 6)
    x = torch.ones(5, 2, 4, dtype=dtype)
    with pytest.raises((TypeError, ValueError), match=str(dtype)):
        f(x)


def test_proj_size_is_checked_as_in_torch():
    for bad in (6, 7, -1):  # proj_size must be in [0, hidden_size)
        with pytest.raises(ValueError, match="proj_size"):
            rnnfast.LSTM(4, 6, proj_size=bad)


def test_signature_matches_torch():
    for nn_cls, fast_cls in PAIRS:
        assert inspect.signature(fast_cls.forward).parameters.keys() == \
            inspect.signature(nn_cls.forward).parameters.keys()


@pytest.mark.parametrize("cell", list(CELLS))
def test_results_do_not_depend_on_thread_count(cell):
    """Each output of a step is summed by one thread in a fixed order."""
    _, f, _ = make_pair(cell, 8, 40, num_layers=2, bidirectional=True)
    x = torch.randn(6, 5, 8, requires_grad=True)
    before = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, max(2, before)):
            torch.set_num_threads(threads)
            x.grad = None
            f.zero_grad()
            y, _ = f(x)
            y.sum().backward()
            runs.append([y.detach(), x.grad.clone()] + [p.grad.clone() for p in f.parameters()])
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("layers,bidirectional", [(1, False), (2, True)], ids=["L1", "L2-bi"])
@pytest.mark.parametrize("cell", list(CELLS))
def test_final_states_are_their_own_tensors(cell, layers, bidirectional):
    """h_n (and c_n) share no memory with the output (a single layer's is a view of the
    op's freshly allocated state, not a copy), so changing one in place leaves the other
    and the gradients through the output as they were."""
    _, f, _ = make_pair(cell, 3, 5, num_layers=layers, bidirectional=bidirectional)
    x = torch.randn(4, 2, 3, requires_grad=True)
    out, state = f(x)
    states = state if cell == "lstm" else (state,)
    out_storage = out.untyped_storage().data_ptr()
    for s in states:
        assert s.untyped_storage().data_ptr() != out_storage
    before = out.detach().clone()
    (grad_before,) = torch.autograd.grad(out.sum(), x, retain_graph=True)
    for s in states:
        s.data.add_(1.0)
    assert torch.equal(out.detach(), before)
    (grad_after,) = torch.autograd.grad(out.sum(), x)
    assert torch.equal(grad_after, grad_before)


class _Scale(torch.nn.Module):
    def forward(self, w):
        return 0.5 * w


@pytest.mark.parametrize("nn_cls,fast_cls", PAIRS, ids=IDS)
def test_parametrized_and_replaced_weights(nn_cls, fast_cls):
    """The weights are looked up at every call: a parametrized W_hh (a property then, not in
    _parameters) gives torch.nn's output and the gradient of its original, and a parameter
    replaced between calls is the one the next call uses."""
    from torch.nn.utils import parametrize
    torch.manual_seed(0)
    m = nn_cls(6, 5)
    f = fast_cls(6, 5)
    f.load_state_dict(m.state_dict())
    for mod in (m, f):
        parametrize.register_parametrization(mod, "weight_hh_l0", _Scale())
    x = torch.randn(4, 3, 6)
    ya, yb = m(x)[0], f(x)[0]
    torch.testing.assert_close(yb, ya)
    ya.sum().backward()
    yb.sum().backward()
    ga = m.parametrizations.weight_hh_l0.original.grad
    gb = f.parametrizations.weight_hh_l0.original.grad
    assert gb is not None
    torch.testing.assert_close(gb, ga)
    before = f(x)[0].detach()
    new = torch.nn.Parameter(torch.randn_like(f.weight_ih_l0))
    f.weight_ih_l0 = new
    m.weight_ih_l0 = torch.nn.Parameter(new.detach().clone())
    after = f(x)[0]
    torch.testing.assert_close(after, m(x)[0])
    assert not torch.allclose(after, before)
