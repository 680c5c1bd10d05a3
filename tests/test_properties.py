"""Property tests (hypothesis): random cells, shapes, layers, directions, batch_first,
bias, dtypes, initial states and seeds, each against torch.nn and the float64 reference
(every output, final state and gradient; helpers' tolerance rule). The example count is
bounded for CI: RNNFAST_HYPOTHESIS_EXAMPLES (default 100)."""
import os

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import CELLS, assert_close_to_ref, compare_all, make_pair, run_three

EXAMPLES = int(os.environ.get("RNNFAST_HYPOTHESIS_EXAMPLES", "100"))


@st.composite
def cases(draw):
    cell = draw(st.sampled_from(sorted(CELLS)))
    return dict(
        cell=cell,
        T=draw(st.integers(1, 12)), N=draw(st.integers(1, 6)),
        C=draw(st.integers(1, 20)), H=draw(st.integers(1, 24)),
        layers=draw(st.integers(1, 3)), bidirectional=draw(st.booleans()),
        batch_first=draw(st.booleans()), bias=draw(st.booleans()),
        dtype=draw(st.sampled_from([torch.float32, torch.float64])),
        given_hx=draw(st.booleans()), unbatched=draw(st.booleans()),
        proj=draw(st.integers(0, 3)) if cell == "lstm" else 0,
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@settings(max_examples=EXAMPLES, deadline=None, derandomize=bool(os.environ.get("CI")),
          suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_random_configurations_match_torch_and_reference(case):
    cell, T, N, C, H = case["cell"], case["T"], case["N"], case["C"], case["H"]
    is_lstm = cell == "lstm"
    P = case["proj"] if case["proj"] < H else 0
    kwargs = dict(num_layers=case["layers"], bidirectional=case["bidirectional"],
                  batch_first=case["batch_first"], bias=case["bias"])
    if P:
        kwargs["proj_size"] = P
    m, f, m64 = make_pair(cell, C, H, dtype=case["dtype"], seed=case["seed"] % 1000, **kwargs)
    g = torch.Generator().manual_seed(case["seed"])
    D, L = (2 if case["bidirectional"] else 1), case["layers"]
    Hout = P or H
    if case["unbatched"]:
        x = torch.randn(T, C, generator=g)
        sdims = lambda n: (L * D, n)  # noqa: E731
        ydims = (T, D * Hout)
    else:
        x = torch.randn(*((N, T) if case["batch_first"] else (T, N)), C, generator=g)
        sdims = lambda n: (L * D, N, n)  # noqa: E731
        ydims = (N, T, D * Hout) if case["batch_first"] else (T, N, D * Hout)
    hx = None
    if case["given_hx"]:
        h0 = torch.randn(*sdims(Hout), generator=g)
        hx = (h0, torch.randn(*sdims(H), generator=g)) if is_lstm else h0
    upstream = [torch.randn(*ydims, generator=g), torch.randn(*sdims(Hout), generator=g)]
    if is_lstm:
        upstream.append(torch.randn(*sdims(H), generator=g))
    x = x.to(case["dtype"])
    if hx is not None:
        hx = tuple(s.to(case["dtype"]) for s in hx) if is_lstm else hx.to(case["dtype"])
    compare_all(*run_three(cell, x, hx, m, f, m64, upstream))


@st.composite
def packed_cases(draw):
    cell = draw(st.sampled_from(sorted(CELLS)))
    N = draw(st.integers(1, 8))
    return dict(
        cell=cell, lengths=draw(st.lists(st.integers(1, 12), min_size=N, max_size=N)),
        # H up to 40: past the small-size loops too (csrc/cpu/common.h, kSmallGemmFma)
        C=draw(st.integers(1, 24)), H=draw(st.integers(1, 40)),
        layers=draw(st.integers(1, 3)), bidirectional=draw(st.booleans()),
        bias=draw(st.booleans()), dtype=draw(st.sampled_from([torch.float32, torch.float64])),
        given_hx=draw(st.booleans()), enforce_sorted=draw(st.booleans()),
        proj=draw(st.integers(0, 3)) if cell == "lstm" else 0,
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@settings(max_examples=EXAMPLES, deadline=None, derandomize=bool(os.environ.get("CI")),
          suppress_health_check=[HealthCheck.too_slow])
@given(packed_cases())
def test_random_packed_sequences_match_torch_and_reference(case):
    """PackedSequence input (the packed ops; by segments with proj_size): every packed
    output, each sequence's final state and every gradient, against torch.nn and each
    sequence run alone through the float64 reference."""
    from test_packed import per_sequence_reference, run

    cell, lengths, C, H = case["cell"], case["lengths"], case["C"], case["H"]
    is_lstm = cell == "lstm"
    if case["enforce_sorted"]:
        lengths = sorted(lengths, reverse=True)
    P = case["proj"] if case["proj"] < H else 0
    kwargs = dict(num_layers=case["layers"], bidirectional=case["bidirectional"], bias=case["bias"])
    if P:
        kwargs["proj_size"] = P
    m, f, m64 = make_pair(cell, C, H, dtype=case["dtype"], seed=case["seed"] % 1000, **kwargs)
    g = torch.Generator().manual_seed(case["seed"])
    N, T, D, L, Hout = len(lengths), max(lengths), 2 if case["bidirectional"] else 1, case["layers"], P or H
    x = torch.randn(T, N, C, generator=g, dtype=torch.float64)
    upstream = [torch.randn(T, N, D * Hout, generator=g, dtype=torch.float64),
                torch.randn(L * D, N, Hout, generator=g, dtype=torch.float64)]
    if is_lstm:
        upstream.append(torch.randn(L * D, N, H, generator=g, dtype=torch.float64))
    for b, n in enumerate(lengths):
        x[n:, b] = 0
        upstream[0][n:, b] = 0
    hx = None
    if case["given_hx"]:
        h0 = torch.randn(L * D, N, Hout, generator=g, dtype=torch.float64)
        hx = (h0, torch.randn(L * D, N, H, generator=g, dtype=torch.float64)) if is_lstm else h0
    cast = (lambda s: None if s is None else (tuple(t.to(case["dtype"]) for t in s) if is_lstm
                                              else s.to(case["dtype"])))
    xd = x.to(case["dtype"])
    ours = run(f, xd, lengths, cast(hx), is_lstm, upstream, case["enforce_sorted"])
    theirs = run(m, xd, lengths, cast(hx), is_lstm, upstream, case["enforce_sorted"])
    ref = run(m64, x, lengths, hx, is_lstm, upstream, case["enforce_sorted"], forward=per_sequence_reference)
    assert set(ours) == set(theirs) == set(ref)
    for name in ref:
        assert_close_to_ref(name, ours[name], theirs[name], ref[name])
