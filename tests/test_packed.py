"""PackedSequence input and output against torch.nn and the float64 reference run
sequence by sequence: packed outputs, final states of each sequence, and every gradient.
Both ways rnnfast runs packed data: the packed ops (the CPU's way) and segments of equal
batch size through the dense ops (CUDA's way, and the projected LSTM's)."""
import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import rnnfast.functional as RF
from rnnfast import reference
from helpers import CELLS, assert_close_to_ref, make_pair

C, H = 5, 6


@pytest.fixture(params=["ops", "segments"])
def packed_path(request, monkeypatch):
    """Runs the test on one packed path, and checks afterwards that it was the one taken."""
    calls = []
    direction = RF._packed_direction
    monkeypatch.setattr(RF, "PACKED_OPS", request.param == "ops")
    monkeypatch.setattr(RF, "_packed_direction", lambda *a, **k: calls.append(1) or direction(*a, **k))
    yield request.param
    assert bool(calls) == (request.param == "segments"), f"the {request.param} path did not run"


def per_sequence_reference(m64, x, lengths, hx, is_lstm):
    """torch.nn's packed semantics from the plain reference loop: each sequence alone over
    its own length; the output padded with zeros, the final states at each one's end."""
    outs, hs, cs = [], [], []
    T = x.size(0)
    for b, n in enumerate(lengths):
        h_b = None if hx is None else (tuple(s[:, b:b + 1] for s in hx) if is_lstm else hx[:, b:b + 1])
        y, state = reference.forward(m64, x[:n, b:b + 1], h_b)
        outs.append(torch.cat([y, y.new_zeros(T - n, 1, y.size(2))]))
        if is_lstm:
            hs.append(state[0])
            cs.append(state[1])
        else:
            hs.append(state)
    out = torch.cat(outs, dim=1)
    return out, ((torch.cat(hs, dim=1), torch.cat(cs, dim=1)) if is_lstm else torch.cat(hs, dim=1))


def run(module, x, lengths, hx, is_lstm, upstream, enforce_sorted, forward=None):
    x = x.detach().clone().requires_grad_()
    if hx is not None:
        hx = tuple(s.detach().clone().requires_grad_() for s in hx) if is_lstm else \
            hx.detach().clone().requires_grad_()
    if forward is None:
        packed = pack_padded_sequence(x, lengths, enforce_sorted=enforce_sorted)
        out_packed, state = module(packed, hx)
        assert isinstance(out_packed, PackedSequence)
        assert torch.equal(out_packed.batch_sizes, packed.batch_sizes)
        out, out_lengths = pad_packed_sequence(out_packed, total_length=x.size(0))
        assert out_lengths.tolist() == list(lengths)
    else:
        out, state = forward(module, x, lengths, hx, is_lstm)
    states = state if is_lstm else (state,)
    loss = (out * upstream[0].to(out)).sum()
    for s, u in zip(states, upstream[1:]):
        loss = loss + (s * u.to(s)).sum()
    named = {"x": x}
    if hx is not None:
        named.update(zip(("h0", "c0"), hx if is_lstm else (hx,)))
    named.update(dict(module.named_parameters()))
    grads = torch.autograd.grad(loss, list(named.values()))
    res = {"output": out.detach()}
    res.update({n: s.detach() for n, s in zip(("h_n", "c_n"), states)})
    res.update({f"grad_{n}": g for n, g in zip(named, grads)})
    return res


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=["f32", "f64", "bf16", "f16"])
@pytest.mark.parametrize("given_hx", [True, False], ids=["hx", "no_hx"])
@pytest.mark.parametrize("layers,bidir", [(1, False), (1, True), (2, True)], ids=["L1", "L1-bi", "L2-bi"])
@pytest.mark.parametrize("lengths,enforce_sorted", [
    ([7, 7, 5, 2, 1], True),    # repeated lengths, a length-1 sequence
    ([2, 7, 1, 5, 7, 3], False),
    ([4], True),                # one sequence
    ([3, 3, 3], False),         # all equal: one segment
], ids=["sorted", "unsorted", "single", "equal"])
@pytest.mark.parametrize("cell", list(CELLS))
def test_packed_matches_torch_and_reference(cell, lengths, enforce_sorted, layers, bidir, given_hx, dtype,
                                            packed_path, size=(C, H), proj=0):
    is_lstm = cell == "lstm"
    C, H = size
    m, f, m64 = make_pair(cell, C, H, dtype=dtype, num_layers=layers, bidirectional=bidir,
                          **({"proj_size": proj} if proj else {}))
    N, T, D = len(lengths), max(lengths), 2 if bidir else 1
    Hout = proj or H  # h's units (the LSTM's c keeps H)
    torch.manual_seed(1)
    x = torch.randn(T, N, C, dtype=torch.float64)
    for b, n in enumerate(lengths):
        x[n:, b] = 0  # padding, which must not matter
    hx = None
    if given_hx:
        hx = tuple(torch.randn(layers * D, N, k, dtype=torch.float64) for k in ((Hout, H) if is_lstm else (H,)))
        hx = hx if is_lstm else hx[0]
    upstream = [torch.randn(T, N, D * Hout, dtype=torch.float64)] + \
        [torch.randn(layers * D, N, k, dtype=torch.float64) for k in ((Hout, H) if is_lstm else (H,))]
    for b, n in enumerate(lengths):
        upstream[0][n:, b] = 0
    cast = (lambda s: None if s is None else (tuple(t.to(dtype) for t in s) if is_lstm else s.to(dtype)))
    ours = run(f, x.to(dtype), lengths, cast(hx), is_lstm, upstream, enforce_sorted)
    theirs = run(m, x.to(dtype), lengths, cast(hx), is_lstm, upstream, enforce_sorted)
    ref = run(m64, x, lengths, hx, is_lstm, upstream, enforce_sorted, forward=per_sequence_reference)
    assert set(ours) == set(theirs) == set(ref)
    for name in ref:
        assert_close_to_ref(name, ours[name], theirs[name], ref[name])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("cell", list(CELLS))
def test_packed_at_gemm_size(cell, dtype, packed_path):
    """Sizes past the small-size loops (csrc/cpu/common.h, kSmallGemmFma): the input
    projection and the dx and dW GEMMs take ATen, the float32 steps the packed W_hh
    kernels; ten sequences of eight lengths, so the batch changes at most steps."""
    lengths = [9, 9, 8, 6, 6, 5, 3, 2, 2, 1]
    test_packed_matches_torch_and_reference(cell, lengths, False, 1, True, True, dtype, packed_path,
                                            size=(24, 40))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("layers,bidir", [(1, False), (2, True)], ids=["L1", "L2-bi"])
def test_packed_projected_lstm(layers, bidir, dtype, packed_path):
    """proj_size: the packed op runs the LSTM in m (rnnfast.functional._lstm_projected),
    h0's term entering at each sequence's first step, which in reverse is its own last."""
    test_packed_matches_torch_and_reference("lstm", [2, 7, 1, 5, 7, 3], False, layers, bidir, True,
                                            dtype, packed_path, proj=3)


def test_packed_dropout_between_layers_follows_torch():
    m, f, _ = make_pair("gru", C, H, num_layers=3, dropout=0.5)
    x = pack_padded_sequence(torch.randn(6, 4, C), [6, 4, 4, 1])
    for seed in (0, 1):
        torch.manual_seed(seed)
        out_m, h_m = m(x)
        torch.manual_seed(seed)
        out_f, h_f = f(x)
        torch.testing.assert_close(out_f.data, out_m.data, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(h_f, h_m, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch_sizes,match", [
    (torch.tensor([2, 3]), "non-increasing"),
    (torch.tensor([3, 0]), "positive"),
    (torch.tensor([3, 2]), "adds up to 5 rows, but its data has 6"),
    (torch.tensor([3.0, 3.0]), "int64"),
    (torch.tensor([], dtype=torch.int64), "at least one step"),
])
def test_inconsistent_batch_sizes_are_clear_errors(batch_sizes, match):
    f = make_pair("lstm", C, H)[1]
    packed = PackedSequence(torch.randn(6, C), batch_sizes, None, None)
    with pytest.raises(ValueError, match=match):
        f(packed)


def test_packed_state_shape_error_names_the_shape():
    f = make_pair("gru", C, H)[1]
    packed = pack_padded_sequence(torch.randn(4, 3, C), [4, 2, 1])
    with pytest.raises(RuntimeError, match="Expected hidden size"):
        f(packed, torch.zeros(1, 2, H))
