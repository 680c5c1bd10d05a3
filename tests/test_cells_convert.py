"""rnnfast.RNNCell / LSTMCell / GRUCell against torch.nn's cells and the float64
reference cells (outputs and every gradient), and rnnfast.convert on whole models."""
import copy

import pytest
import torch
from torch import nn

import rnnfast
from rnnfast import reference
from helpers import assert_close_to_ref

CELL_CASES = {
    "rnn_tanh": (nn.RNNCell, rnnfast.RNNCell, {"nonlinearity": "tanh"}),
    "rnn_relu": (nn.RNNCell, rnnfast.RNNCell, {"nonlinearity": "relu"}),
    "lstm": (nn.LSTMCell, rnnfast.LSTMCell, {}),
    "gru": (nn.GRUCell, rnnfast.GRUCell, {}),
}


def reference_cell(cell, module, x, hx):
    """The float64 reference step for a torch.nn-style cell module."""
    w = (module.weight_ih, module.weight_hh, module.bias_ih, module.bias_hh)
    batched = x.dim() == 2
    if not batched:
        x = x.unsqueeze(0)
        hx = None if hx is None else (tuple(s.unsqueeze(0) for s in hx) if cell == "lstm" else hx.unsqueeze(0))
    if hx is None:
        z = x.new_zeros(x.size(0), module.hidden_size)
        hx = (z, z) if cell == "lstm" else z
    if cell == "lstm":
        out = reference.lstm_cell(x, *hx, *w)
    elif cell == "gru":
        out = reference.gru_cell(x, hx, *w)
    else:
        out = reference.rnn_cell(x, hx, *w, nonlinearity=module.nonlinearity)
    if not batched:
        out = tuple(o.squeeze(0) for o in out) if cell == "lstm" else out.squeeze(0)
    return out


def run_cell(cell, module, x, hx, upstream, forward):
    x = x.detach().clone().requires_grad_()
    if hx is not None:
        hx = tuple(s.detach().clone().requires_grad_() for s in hx) if cell == "lstm" else \
            hx.detach().clone().requires_grad_()
    out = forward(module, x, hx)
    outs = out if cell == "lstm" else (out,)
    loss = sum((o * u.to(o.dtype)).sum() for o, u in zip(outs, upstream))
    named = {"x": x}
    if hx is not None:
        named.update(zip(("h0", "c0"), hx if cell == "lstm" else (hx,)))
    named.update(dict(module.named_parameters()))
    grads = torch.autograd.grad(loss, list(named.values()), allow_unused=True)
    results = {n: o.detach() for n, o in zip(("h1", "c1"), outs)}
    results.update({f"grad {n}": g for n, g in zip(named, grads)})
    return results


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=["f32", "f64", "bf16", "f16"])
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
@pytest.mark.parametrize("given_hx", [True, False], ids=["hx", "no_hx"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("cell", list(CELL_CASES))
def test_cell_matches_torch_and_reference(cell, bias, given_hx, batched, dtype):
    nn_cls, fast_cls, extra = CELL_CASES[cell]
    C, H, N = 7, 11, 5
    torch.manual_seed(0)
    m = nn_cls(C, H, bias=bias, **extra).to(dtype)
    f = fast_cls(C, H, bias=bias, **extra).to(dtype)
    f.load_state_dict(m.state_dict())
    m64 = copy.deepcopy(m).double()
    shape = (N, C) if batched else (C,)
    x = torch.randn(*shape, dtype=torch.float64)
    hshape = (N, H) if batched else (H,)
    hx = None
    if given_hx:
        hx = (torch.randn(*hshape, dtype=torch.float64), torch.randn(*hshape, dtype=torch.float64)) \
            if cell == "lstm" else torch.randn(*hshape, dtype=torch.float64)
    upstream = [torch.randn(*hshape, dtype=torch.float64) for _ in range(2 if cell == "lstm" else 1)]
    cast = (lambda s: None if s is None else (tuple(t.to(dtype) for t in s) if cell == "lstm" else s.to(dtype)))
    ours = run_cell(cell, f, x.to(dtype), cast(hx), upstream, lambda mod, a, h: mod(a, h))
    theirs = run_cell(cell, m, x.to(dtype), cast(hx), upstream, lambda mod, a, h: mod(a, h))
    ref = run_cell(cell, m64, x, hx, upstream, lambda mod, a, h: reference_cell(cell, mod, a, h))
    assert set(ours) == set(ref)
    for name in ref:
        if ref[name] is None:
            assert ours[name] is None, name
            continue
        assert_close_to_ref(name, ours[name], theirs[name], ref[name])


@pytest.mark.parametrize("cell", list(CELL_CASES))
def test_cell_bad_input_raises(cell):
    nn_cls, fast_cls, extra = CELL_CASES[cell]
    f = fast_cls(4, 6, **extra)
    with pytest.raises(ValueError, match="1D or 2D"):
        f(torch.randn(2, 3, 4))
    with pytest.raises(RuntimeError, match="4 features"):
        f(torch.randn(3, 5))
    bad_h = torch.randn(2, 6)
    with pytest.raises(RuntimeError, match=r"shape \[3, 6\]"):
        f(torch.randn(3, 4), (bad_h, bad_h) if cell == "lstm" else bad_h)
    with pytest.raises(TypeError, match="dtype"):
        f(torch.randn(3, 4).to(torch.int64))


class Tagger(nn.Module):
    """An existing torch.nn model: embedding, 2-layer bidirectional LSTM, linear head (and
    a GRUCell that reads the LSTM's last step, so cells are converted too)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(40, 12)
        self.lstm = nn.LSTM(12, 16, num_layers=2, bidirectional=True, batch_first=True)
        self.cell = nn.GRUCell(32, 8)
        self.head = nn.Linear(32 + 8, 5)

    def forward(self, tokens):
        y, _ = self.lstm(self.embed(tokens))
        h = self.cell(y[:, -1])
        return self.head(torch.cat([y, h.unsqueeze(1).expand(-1, y.size(1), -1)], dim=2))


def train_losses(model, opt, steps, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 40, (6, 9), generator=g)
    target = torch.randint(0, 5, (6, 9), generator=g)
    losses = []
    for _ in range(steps):
        logits = model(tokens)
        loss = nn.functional.cross_entropy(logits.reshape(-1, 5), target.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 2e-4)], ids=["f64", "f32"])
def test_converted_model_trains_the_same(dtype, rtol):
    torch.manual_seed(0)
    original = Tagger().to(dtype)
    converted = copy.deepcopy(original)
    opt_a = torch.optim.SGD(original.parameters(), lr=0.5, momentum=0.9)
    opt_b = torch.optim.SGD(converted.parameters(), lr=0.5, momentum=0.9)  # made before convert
    params_before = [id(p) for p in converted.parameters()]
    keys_before = list(converted.state_dict())
    assert rnnfast.convert(converted) is converted
    assert type(converted.lstm) is rnnfast.LSTM and type(converted.cell) is rnnfast.GRUCell
    assert isinstance(converted.lstm, nn.RNNBase)
    assert [id(p) for p in converted.parameters()] == params_before
    assert list(converted.state_dict()) == keys_before
    a = train_losses(original, opt_a, 20, dtype)
    b = train_losses(converted, opt_b, 20, dtype)
    assert a[-1] < 0.9 * a[0]  # it learns
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=rtol, atol=0)
    for (na, pa), (nb, pb) in zip(original.named_parameters(), converted.named_parameters()):
        torch.testing.assert_close(pb, pa, rtol=rtol * 10, atol=rtol * 10, msg=na)


def test_convert_module_itself_subclasses_and_projected_lstm():
    lstm = nn.LSTM(3, 4)
    assert type(rnnfast.convert(lstm)) is rnnfast.LSTM

    class MyRNN(nn.RNN):  # may override forward: left alone
        pass
    seq = nn.Sequential(MyRNN(3, 4), nn.RNNCell(3, 4), nn.LSTMCell(3, 4), nn.GRU(3, 4))
    rnnfast.convert(seq)
    assert [type(m) for m in seq] == [MyRNN, rnnfast.RNNCell, rnnfast.LSTMCell, rnnfast.GRU]
    proj = nn.LSTM(3, 4, proj_size=2)
    x = torch.randn(5, 2, 3)
    expected = proj(x)[0]
    torch.testing.assert_close(rnnfast.convert(proj)(x)[0], expected, rtol=1e-5, atol=1e-6)
