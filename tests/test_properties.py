"""Property tests (hypothesis): random cells, shapes, layers, directions, batch_first,
bias, dtypes, initial states and seeds, each against torch.nn and the float64 reference
(every output, final state and gradient; helpers' tolerance rule). The example count is
bounded for CI: RNNFAST_HYPOTHESIS_EXAMPLES (default 100)."""
import os

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import CELLS, compare_all, make_pair, run_three

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
