"""rnnfast vs torch.nn vs the float64 reference: every output, final state and gradient
(input, h0/c0, every parameter by name), across cells, layers, directions, layouts, bias,
given or absent initial states, in float32 and float64, and in float16 and bfloat16
(computed in float32 on the CPU, so well inside torch.nn's own error there)."""
import itertools

import pytest
import torch

from helpers import CELLS, compare_all, make_pair, run_three

T, N, C, H = 5, 3, 4, 6


def _inputs(cell, num_layers, bidirectional, batch_first, with_h0, dtype, T=T, N=N, C=C, H=H,
            seed=1):
    g = torch.Generator().manual_seed(seed)
    D = 2 if bidirectional else 1
    x = torch.randn((N, T, C) if batch_first else (T, N, C), generator=g, dtype=dtype)
    hx = None
    if with_h0:
        h0 = torch.randn(num_layers * D, N, H, generator=g, dtype=dtype)
        hx = (h0, torch.randn(num_layers * D, N, H, generator=g, dtype=dtype)) \
            if cell == "lstm" else h0
    out_shape = (N, T, D * H) if batch_first else (T, N, D * H)
    upstream = [torch.randn(out_shape, generator=g, dtype=dtype),
                torch.randn(num_layers * D, N, H, generator=g, dtype=dtype)]
    if cell == "lstm":
        upstream.append(torch.randn(num_layers * D, N, H, generator=g, dtype=dtype))
    return x, hx, upstream


GRID = list(itertools.product(CELLS, [1, 2], [False, True], [False, True], [True, False],
                              [True, False], [torch.float32, torch.float64]))


def _id(p):
    cell, L, bi, bf, bias, h0, dt = p
    return (f"{cell}-L{L}-{'bi' if bi else 'uni'}-{'bf' if bf else 'tm'}-"
            f"{'bias' if bias else 'nobias'}-{'h0' if h0 else 'noh0'}-{str(dt)[6:]}")


@pytest.mark.parametrize("case", GRID, ids=[_id(p) for p in GRID])
def test_matches_torch_and_reference(case):
    cell, L, bi, bf, bias, with_h0, dtype = case
    m, f, m64 = make_pair(cell, C, H, dtype, num_layers=L, bidirectional=bi, batch_first=bf,
                          bias=bias)
    x, hx, upstream = _inputs(cell, L, bi, bf, with_h0, dtype)
    compare_all(*run_three(cell, x, hx, m, f, m64, upstream))


# float16 and bfloat16 on the CPU: every cell in three configurations each
HALF_GRID = [(cell, L, bi, bf, bias, h0, dt) for cell in CELLS
             for L, bi, bf, bias, h0 in [(1, False, False, True, True), (2, True, True, False, False),
                                         (1, True, False, True, False)]
             for dt in (torch.bfloat16, torch.float16)]


@pytest.mark.parametrize("case", HALF_GRID, ids=[_id(p) for p in HALF_GRID])
def test_half_precision_matches_torch_and_reference(case):
    cell, L, bi, bf, bias, with_h0, dtype = case
    m, f, m64 = make_pair(cell, C, H, dtype, num_layers=L, bidirectional=bi, batch_first=bf,
                          bias=bias)
    x, hx, upstream = _inputs(cell, L, bi, bf, with_h0, dtype, T=12)
    ours, theirs, ref = run_three(cell, x, hx, m, f, m64, upstream)
    compare_all(ours, theirs, ref)
    assert all(t.dtype == dtype for t in ours.values())


EDGE = [  # (T, N, C, H)
    (1, 3, 4, 6),     # one step
    (6, 1, 4, 6),     # batch of one
    (4, 3, 5, 37),    # odd hidden size (no multiple of the vector width)
    (3, 2, 1, 1),     # one feature, one hidden unit
]


@pytest.mark.parametrize("shape", EDGE, ids=[f"T{t}-N{n}-C{c}-H{h}" for t, n, c, h in EDGE])
@pytest.mark.parametrize("cell", list(CELLS))
def test_edge_shapes(cell, shape):
    T_, N_, C_, H_ = shape
    m, f, m64 = make_pair(cell, C_, H_, torch.float32, num_layers=2, bidirectional=True)
    x, hx, upstream = _inputs(cell, 2, True, False, True, torch.float32, T=T_, N=N_, C=C_, H=H_)
    compare_all(*run_three(cell, x, hx, m, f, m64, upstream))


@pytest.mark.parametrize("H_", [12, 37])
@pytest.mark.parametrize("N_", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("cell", list(CELLS))
def test_batch_sizes(cell, N_, H_):
    """Small batches switch between the float32 step kernels (W_hh read directly, or
    packed) by N; partial blocks of 8 units and K tails of the 8-wide loops included."""
    m, f, m64 = make_pair(cell, 9, H_, torch.float32, bidirectional=True)
    x, hx, upstream = _inputs(cell, 1, True, False, True, torch.float32, T=4, N=N_, C=9, H=H_)
    compare_all(*run_three(cell, x, hx, m, f, m64, upstream))


@pytest.mark.parametrize("cell", list(CELLS))
def test_long_sequence(cell):
    T_, N_, C_, H_ = 600, 2, 8, 16
    m, f, m64 = make_pair(cell, C_, H_, torch.float32, bidirectional=True)
    x, hx, upstream = _inputs(cell, 1, True, False, True, torch.float32, T=T_, N=N_, C=C_, H=H_)
    compare_all(*run_three(cell, x, hx, m, f, m64, upstream))


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_input_projection_in_chunks(cell):
    """Past 4M floats of pre-activations the input projection runs in chunks of steps
    (here 3, the last one short), both directions."""
    T_, C_, H_ = 1100, 4, 128
    N_ = 16 if cell == "lstm" else 24  # T * N * G * H over 2 * 2**22
    m, f, m64 = make_pair(cell, C_, H_, torch.float32, bidirectional=True)
    x, hx, upstream = _inputs(cell, 1, True, False, True, torch.float32, T=T_, N=N_, C=C_, H=H_)
    compare_all(*run_three(cell, x, hx, m, f, m64, upstream))


@pytest.mark.parametrize("cell", list(CELLS))
def test_unbatched_input(cell):
    m, f, m64 = make_pair(cell, C, H, torch.float32, num_layers=2, bidirectional=True)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(T, C, generator=g)
    h0 = torch.randn(4, H, generator=g)
    hx = (h0, torch.randn(4, H, generator=g)) if cell == "lstm" else h0
    upstream = [torch.randn(T, 2 * H, generator=g), torch.randn(4, H, generator=g),
                torch.randn(4, H, generator=g)][: 3 if cell == "lstm" else 2]
    compare_all(*run_three(cell, x, hx, m, f, m64, upstream))
    # and without an initial state
    compare_all(*run_three(cell, x, None, m, f, m64, upstream))


@pytest.mark.parametrize("cell", list(CELLS))
def test_saturating_inputs(cell):
    """Pre-activations far into the flat tails of sigmoid and tanh."""
    m, f, m64 = make_pair(cell, C, H, torch.float32)
    x, hx, upstream = _inputs(cell, 1, False, False, True, torch.float32)
    compare_all(*run_three(cell, x * 60, hx, m, f, m64, upstream))
