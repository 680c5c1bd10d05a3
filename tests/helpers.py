"""Shared test helpers: building matched torch.nn / rnnfast / float64 reference runs and
the tolerance rule.

Tolerance rule (after flash-attention's tests): rnnfast's error against the float64
reference may be at most twice torch.nn's own error in the same dtype, plus a few ulps
of the dtype at the tensor's scale (for values that torch.nn happens to get exact).
"""
import copy

import torch

import rnnfast
from rnnfast import reference

CELLS = {
    "rnn_tanh": (torch.nn.RNN, rnnfast.RNN, {"nonlinearity": "tanh"}),
    "rnn_relu": (torch.nn.RNN, rnnfast.RNN, {"nonlinearity": "relu"}),
    "lstm": (torch.nn.LSTM, rnnfast.LSTM, {}),
    "gru": (torch.nn.GRU, rnnfast.GRU, {}),
}


# Gates per cell family, as the ops see them, and the forward op cases that both the CPU
# and the CUDA op tests check (cell, reverse, training, bias), with readable ids.
OP_GATES = {"rnn": 1, "lstm": 4, "gru": 3}
FORWARD_CASES = [(cell, rev, train, bias) for cell in OP_GATES for rev in (False, True)
                 for train in (False, True) for bias in (True, False)]
FORWARD_CASE_IDS = [f"{c}-{'rev' if r else 'fwd'}-{'train' if t else 'infer'}-"
                    f"{'bias' if b else 'nobias'}" for c, r, t, b in FORWARD_CASES]


def ulp_floor(dtype, ref):
    return 8 * torch.finfo(dtype).eps * max(1.0, ref.abs().max().item() if ref.numel() else 1.0)


def assert_close_to_ref(name, ours, theirs, ref):
    """ours and theirs (torch.nn) in one dtype, ref in float64."""
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    assert ours.dtype == theirs.dtype
    if ref.numel() == 0:
        return
    err = (ours.double() - ref).abs().max().item()
    err_torch = (theirs.double() - ref).abs().max().item()
    tol = 2 * err_torch + ulp_floor(ours.dtype, ref)
    assert err <= tol, f"{name}: error {err:.3e} vs float64 reference exceeds {tol:.3e} " \
                       f"(torch.nn's error {err_torch:.3e})"


def make_pair(cell, input_size, hidden_size, dtype=torch.float32, seed=0, **kwargs):
    """A torch.nn module, an rnnfast module loaded from its state_dict, and a float64 copy
    of the torch.nn module for the reference."""
    nn_cls, fast_cls, extra = CELLS[cell]
    torch.manual_seed(seed)
    m = nn_cls(input_size, hidden_size, **extra, **kwargs).to(dtype)
    f = fast_cls(input_size, hidden_size, **extra, **kwargs).to(dtype)
    f.load_state_dict(m.state_dict())
    m64 = copy.deepcopy(m).double()
    return m, f, m64


def run_and_grad(module, x, hx, is_lstm, upstream, forward=None):
    """Runs forward, builds loss = (y*dy).sum() + (hn*dhn).sum() [+ (cn*dcn).sum()] so that
    every output carries a gradient, and returns outputs and named gradients."""
    x = x.detach().clone().requires_grad_()
    if hx is not None:
        hx = tuple(s.detach().clone().requires_grad_() for s in hx) if is_lstm else \
            hx.detach().clone().requires_grad_()
    out, state = module(x, hx) if forward is None else forward(module, x, hx)
    states = state if is_lstm else (state,)
    loss = (out * upstream[0].to(out.dtype)).sum()
    for s, u in zip(states, upstream[1:]):
        loss = loss + (s * u.to(s.dtype)).sum()
    named = {"x": x}
    if hx is not None:
        for n, s in zip(("h0", "c0"), hx if is_lstm else (hx,)):
            named[n] = s
    named.update(dict(module.named_parameters()))
    grads = torch.autograd.grad(loss, list(named.values()), allow_unused=True)
    results = {"output": out.detach()}
    for n, s in zip(("h_n", "c_n"), states):
        results[n] = s.detach()
    for n, g in zip(named, grads):
        assert g is not None, f"no gradient for {n}"
        results["grad_" + n] = g
    return results


def compare_all(ours, theirs, ref):
    assert set(ours) == set(ref) == set(theirs)
    for name in ref:
        assert_close_to_ref(name, ours[name], theirs[name], ref[name])


def run_three(cell, x, hx, m, f, m64, upstream):
    is_lstm = cell == "lstm"
    ours = run_and_grad(f, x, hx, is_lstm, upstream)
    theirs = run_and_grad(m, x, hx, is_lstm, upstream)
    hx64 = None if hx is None else (tuple(s.double() for s in hx) if is_lstm else hx.double())
    ref = run_and_grad(m64, x.double(), hx64, is_lstm, [u.double() for u in upstream],
                       forward=reference.forward)
    return ours, theirs, ref
