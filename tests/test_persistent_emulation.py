"""The CPU emulation of the persistent CUDA kernels (scripts/emulate_persistent.py): its
default case set (both variants, grid and cluster) matches the float64 reference with
nothing flagged, and its self-test catches every planted bug; the planners' sizes, and the
tracker's checks of distributed shared memory and of clusters on small made-up kernels.
No GPU needed; without a built rnnfast only the comparison with the CPU ops is left out."""
import importlib.util
import os
import re
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_emulation():
    path = os.path.join(ROOT, "scripts", "emulate_persistent.py")
    spec = importlib.util.spec_from_file_location("emulate_persistent", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


emu = load_emulation()
OPS = emu.cpu_ops()  # None without a built rnnfast


def test_default_cases_match_the_reference_and_flag_nothing():
    case_list = emu.cases()
    report = emu.run_suite(case_list, OPS)
    assert report.mismatches == []
    assert report.findings == {}
    assert report.uncovered == set()
    assert report.stats["cases"] == len(case_list)
    assert report.stats["cluster"] == sum(1 for c in case_list if c.get("cluster"))
    assert report.stats["cluster"] >= 10


def test_self_test_cases_are_clean_without_a_planted_bug():
    report = emu.run_suite(emu.self_test_cases(), OPS, coverage=False)
    assert report.mismatches == []
    assert report.findings == {}


@pytest.mark.parametrize("bug", list(emu.MUTATIONS))
def test_self_test_catches_the_planted_bug(bug):
    assert emu.catch(bug, OPS), f"not caught: {emu.MUTATIONS[bug]}"


def plan(dtype, backward, N, smem_optin=227 * 1024):
    """The emulated plan_persistent for an LSTM with H = 20 on 3 SMs (7 units a block)."""
    device = emu.FakeDevice(3, smem_optin=smem_optin)
    return emu.plan_persistent(emu.LstmCell, backward, N, 20, device, emu.dtype_of(dtype))


# Shared-memory bytes for the LSTM with H = 20, U = 7, worked out by hand from
# persistent.cuh's smem_layout: ws, xs, out, scratch (every sum a multiple of 128 here).
# forward: 28 rows, K = 20
FFMA_16_4 = 4480 + 2560 + 3584  # r_pad 28 (7 chunks: one k range each), no scratch
FFMA_4_8 = 5120 + 640 + 1024 + 2048  # r_pad 32, 4 chunks split twice: 2 * 4 * 32 doubles
MMA_16_16 = 2560 + 1280 + 2048 + 8192  # r_pad 32, ld 40 halves; 2 tiles x 4 splits x 1 KiB
# backward in float16: 7 rows, K = 80, ws in halves, the rest in float
BWD_16_4 = 1280 + 5120 + 512 + 2048  # r_pad 8 (2 chunks split 4 ways: 4 * 16 * 8 floats)
BWD_16_8 = 1280 + 5120 + 512 + 4096  # r_pad 8 (1 chunk split 8 ways: 8 * 16 * 8 floats)
# float32: forward 28 rows (8 a warp would pad to 32: so 4), backward 7 rows (8 either way)
F32_FWD_16_4 = 2304 + 1280 + 1792  # ws 28 x 20 floats (2240, aligned up), xs 16 x 20, out 16 x 28
F32_BWD_16_8 = 2560 + 5120 + 512 + 4096  # ws 8 x 80, xs 16 x 80, out 16 x 8, 8 splits


@pytest.mark.parametrize("dtype, backward, N, tile, smem", [
    ("float64", False, 5, (16, 4), FFMA_16_4),
    ("float64", False, 4, (4, 8), FFMA_4_8),
    ("float16", False, 1, (16, 16), MMA_16_16),
    ("float16", False, 5, (16, 16), MMA_16_16),
    ("float16", True, 5, (16, 8), BWD_16_8),
    ("float16", True, 4, (4, 8), None),
    ("float32", False, 5, (16, 4), F32_FWD_16_4),
    ("float32", True, 5, (16, 8), F32_BWD_16_8),
], ids=["fp64-fwd-N5", "fp64-fwd-N4", "fp16-fwd-N1", "fp16-fwd-N5", "fp16-bwd-N5", "fp16-bwd-N4",
        "fp32-fwd-N5", "fp32-bwd-N5"])
def test_plan_picks_the_tile_and_sizes_the_shared_memory(dtype, backward, N, tile, smem):
    p = plan(dtype, backward, N)
    assert (p.nt, p.rpw) == tile
    assert (p.blocks, p.units) == (3, 7)
    if smem is not None:
        assert p.smem == smem


def test_plan_takes_two_tiles_of_xs_where_several_tiles_fit():
    """N = 17 in tiles of 16: two tiles of xs (the second staged by cp.async during the
    first's work); one tile where N fits in one, or where two do not fit."""
    two = plan("float32", False, 17)
    assert (two.nt, two.rpw, two.xs_tiles) == (16, 4, 2)
    assert two.smem == 2304 + 2 * 1280 + 1792  # ws, two tiles of xs 16 x 20, out
    assert plan("float32", False, 16).xs_tiles == 1
    tight = plan("float32", False, 17, smem_optin=F32_FWD_16_4)
    assert (tight.nt, tight.xs_tiles, tight.smem) == (16, 1, F32_FWD_16_4)


@pytest.fixture
def mma_rows():
    """RNNFAST_MMA_ROWS for the emulated planner, for one test."""
    def set_rows(value):
        emu.KNOBS["RNNFAST_MMA_ROWS"] = value
    try:
        yield set_rows
    finally:
        emu.KNOBS.clear()


@pytest.mark.parametrize("asked, N, nt", [
    ("64", 70, 64), ("64", 40, 64), ("64", 33, 64), ("64", 32, 32), ("64", 17, 32),
    ("64", 16, 16), ("32", 70, 32), ("32", 17, 32), ("32", 16, 16), ("16", 70, 16),
    ("", 70, 64), ("", 33, 64), ("", 20, 32), ("", 9, 16),
])
def test_mma_rows_picks_the_tensor_core_tile(mma_rows, asked, N, nt):
    """The largest tile the batch has more than half as many rows as, RNNFAST_MMA_ROWS (64
    unless set) capping it; the backward and float32 (FFMA) keep their tiles of at most 16
    rows."""
    mma_rows(asked)
    p = plan("float16", False, N)
    assert (p.nt, p.rpw) == (nt, 16)
    assert p.smem >= emu.mma_scratch_bytes(nt, 32)  # the scratch grows with the row tiles
    assert plan("float16", True, N).nt <= 16
    assert plan("float32", False, N).nt <= 16


def test_unknown_mma_rows_is_refused(mma_rows):
    mma_rows("48")
    with pytest.raises(emu.Finding, match="RNNFAST_MMA_ROWS is '48'"):
        plan("float16", False, 5)


@pytest.mark.parametrize("cell, N, H, sms, reg, units", [
    ("lstm", 16, 768, 132, True, 6), ("lstm", 16, 1024, 132, True, 8),
    ("gru", 1, 1024, 132, True, 8), ("rnn", 16, 256, 132, True, 2),
    ("lstm", 17, 768, 132, False, 6), ("lstm", 16, 1056, 132, False, 8),
    ("lstm", 16, 100, 132, False, 1), ("lstm", 16, 768, 66, False, 12),
], ids=["lstm-N16-H768", "lstm-N16-H1024", "gru-N1-H1024", "rnn-N16-H256", "N17", "H1056-chunks",
        "H100-not-mult-8", "H768-66-SMs-rows"])
def test_register_tile_where_it_holds_the_layer(cell, N, H, sms, reg, units):
    """RNNFAST_REG_TILE unset or 1: the 16-bit forward on the register tile where N <= 16,
    H % 8 == 0, at most 32 rows of W a block (not so for the LSTM with H = 768 on 66 SMs:
    48) and 4 chunks of 32 columns a warp (H up to 1024); else the tiled forward; never the
    backward or float32; off with 0."""
    Cell = {"lstm": emu.LstmCell, "gru": emu.GruCell, "rnn": emu.ElmanCell}[cell]
    device = emu.FakeDevice(sms)
    emu.reset_stats()  # the planner's coverage notes go there
    try:
        emu.KNOBS["RNNFAST_REG_TILE"] = "1"
        p = emu.plan_persistent(Cell, False, N, H, device, emu.dtype_of("float16"))
        assert (p.reg, p.units) == (reg, units)
        if reg:
            assert (p.nt, p.rpw, p.smem) == (16, 0, 8 * 16 * 40 * 4)
        assert not emu.plan_persistent(Cell, True, N, H, device, emu.dtype_of("float16")).reg
        assert not emu.plan_persistent(Cell, False, N, H, device, emu.dtype_of("float32")).reg
        emu.KNOBS.clear()  # the default: on
        assert emu.plan_persistent(Cell, False, N, H, device, emu.dtype_of("float16")).reg == reg
        emu.KNOBS["RNNFAST_REG_TILE"] = "0"
        assert not emu.plan_persistent(Cell, False, N, H, device, emu.dtype_of("float16")).reg
        emu.KNOBS["RNNFAST_REG_TILE"] = "2"
        with pytest.raises(emu.Finding, match="RNNFAST_REG_TILE is '2'"):
            emu.plan_persistent(Cell, False, N, H, device, emu.dtype_of("float16"))
    finally:
        emu.KNOBS.clear()


def test_register_tile_constants_are_the_headers():
    """The emulation's sizes of the register tile are persistent.cuh's."""
    text = open(emu.HEADER).read()
    for name, value in (("kRegMaxN8", emu.REG_MAX_N8), ("kRegMaxChunks", emu.REG_MAX_CHUNKS),
                        ("kRegScratchLd", emu.REG_SCRATCH_LD)):
        m = re.search(rf"\b{name} = (\d+);", text)
        assert m is not None and int(m.group(1)) == value, name


# backward in float64, 8 rows a tile: ws 8 x 80 doubles, xs 8 x 80, out 8 x 8, scratch 8
# splits of 8 x 8 (1 chunk)
BWD_8_8 = 5120 + 5120 + 512 + 4096


def test_plan_takes_8_rows_a_tile_when_16_do_not_fit_in_the_backward():
    p = plan("float64", True, 9, smem_optin=16000)  # (16, 4) needs 20480 bytes
    assert (p.nt, p.rpw, p.smem) == (8, 8, BWD_8_8)
    f = plan("float64", False, 9, smem_optin=16000)  # the forward has no (8, 8)
    assert (f.nt, f.rpw) == (16, 4)


def test_plan_falls_back_to_16_4_when_16_8_does_not_fit():
    p = plan("float16", True, 5, smem_optin=BWD_16_8 - 1)
    assert (p.nt, p.rpw, p.smem) == (16, 4, BWD_16_4)


def test_plan_falls_back_to_4_8_when_16_4_does_not_fit():
    p = plan("float64", False, 5, smem_optin=FFMA_16_4 - 1)
    # N = 5 is two tiles of 4 rows: two tiles of xs (4 x 20 doubles each) fit too
    assert (p.nt, p.rpw, p.xs_tiles, p.smem) == (4, 8, 2, FFMA_4_8 + 640)


def test_plan_has_no_fallback_for_the_mma_forward():
    with pytest.raises(emu.Finding, match="cannot run"):
        plan("float16", False, 5, smem_optin=MMA_16_16 - 1)


class Flat:
    """A stand-in for 16-bit shared memory without the tracker: element offsets."""

    def __init__(self, v):
        self.v = np.asarray(v, float).reshape(-1)

    def addr(self, idx):
        return np.asarray(idx) * 2

    def read(self, idx, ctx, thr, where=""):
        return self.v[idx]


def test_ldmatrix_flags_a_row_not_16_byte_aligned():
    half = Flat(np.zeros(4096))
    warp = np.array([0])
    emu.FINDINGS.clear()
    try:
        emu.ldmatrix_x4(half, (emu.LANES * 24)[None, :], warp, None, "rows 48 bytes apart")
        assert emu.FINDINGS == {}
        emu.ldmatrix_x4(half, (emu.LANES * 20)[None, :], warp, None, "rows 40 bytes apart")
        assert list(emu.FINDINGS) == [
            "ldmatrix (rows 40 bytes apart): a row address not 16-byte aligned"]
    finally:
        emu.FINDINGS.clear()


def test_mma_fragments_compute_one_tile():
    """tile_dot_mma's lane maps for ldmatrix, through the PTX ISA's fragment layouts, give
    x @ w.T for one 16 x 16 tile and one k step (the kernels' cases check the whole)."""
    rng = np.random.default_rng(0)
    ld = 24  # mma_ld(16)
    x, w = rng.standard_normal((16, 16)), rng.standard_normal((16, 16))
    xb, wb = np.zeros((16, ld)), np.zeros((16, ld))
    xb[:, :16], wb[:, :16] = x, w
    lanes = emu.LANES
    a_off = (lanes % 16) * ld + (lanes // 16) * 8
    b_off = (8 * (lanes // 16) + lanes % 8) * ld + ((lanes // 8) % 2) * 8

    a = emu.ldmatrix_x4(Flat(xb), a_off[None, :], np.array([0]), None, "x")
    b = emu.ldmatrix_x4(Flat(wb), b_off[None, :], np.array([0]), None, "w")
    want = x @ w.T
    for h in range(2):
        d = emu.mma_16816(np.zeros((1, 32, 4)), a, b[:, :, 2 * h:2 * h + 2])
        for i in range(4):
            got = d[0, :, i]
            rows, cols = emu.GROUP + 8 * (i // 2), 8 * h + 2 * emu.TIG + i % 2
            np.testing.assert_allclose(got, want[rows, cols], rtol=1e-12, atol=1e-12)


# ---- the cluster variant's plan (PersistentPlanner::cluster) ----
def cluster_plan(cell, backward, N, H, sms, dtype="float64", size=None, rows=None,
                 smem_optin=227 * 1024):
    device = emu.FakeDevice(sms, smem_optin=smem_optin)
    return emu.plan_cluster(cell, backward, N, H, device, emu.dtype_of(dtype), size, rows)


# LSTM forward, H = 20, float64, clusters of 2 blocks (U = 10: 40 rows of W) on 4 SMs (2
# clusters at once), N = 5: guessed 3 rows a cluster, so the (4, 8) tile; N_c = 3. ws 40 x 20
# doubles, xs two turns of 4 rows of 20, out 4 x 40; 5 chunks of 8 rows, no split-K scratch.
CLUSTER_FWD = 6400 + 1280 + 1280


def test_cluster_plan_sizes_two_turns():
    p = cluster_plan(emu.LstmCell, False, 5, 20, 4, size=2)
    assert (p.cluster, p.units, p.group_rows, p.blocks, p.nt, p.rpw, p.at_once) == \
        (2, 10, 3, 4, 4, 8, 2)
    assert p.smem == CLUSTER_FWD


def test_cluster_plan_caps_the_rows_where_two_turns_do_not_fit():
    # 5 rows forced: two turns of 8 rows need 1280 bytes more than allowed, so 4 rows
    p = cluster_plan(emu.LstmCell, False, 5, 20, 4, size=2, rows=5,
                     smem_optin=CLUSTER_FWD + 1000)
    assert (p.group_rows, p.blocks, p.smem) == (4, 4, CLUSTER_FWD)


@pytest.mark.parametrize("H, size, cs, units", [
    (27, 16, 14, 2), (40, 16, 14, 3), (5, 4, 3, 2), (7, 8, 7, 1), (3, 1, 1, 3)])
def test_cluster_plan_block_count(H, size, cs, units):
    """C = ceil(H / U), U = ceil(H / C0): not always C0, nor a power of two."""
    p = cluster_plan(emu.GruCell, True, 3, H, 16, size=size)
    clusters = -(-3 // p.group_rows)  # 3 rows over as many clusters as run at once
    assert (p.cluster, p.units, p.blocks) == (cs, units, clusters * cs)
    assert clusters == min(3, 16 // cs)


def test_cluster_plan_refusals():
    with pytest.raises(emu.Finding, match="cannot run"):  # 2 blocks a cluster, 1 SM
        cluster_plan(emu.LstmCell, False, 5, 20, 1, size=2)
    with pytest.raises(emu.Finding, match="cannot run"):  # not one of 16, 8, 4, 2, 1
        cluster_plan(emu.LstmCell, False, 5, 20, 16, size=3)


# ---- the tracker on made-up cluster kernels (64 bytes of shared memory a block) ----
def run_toy(kernel, blocks=4, cluster=2, at_once=2, bufs=()):
    emu.FINDINGS.clear()
    try:
        emu.run_clusters(kernel, blocks, cluster, 64, None, list(bufs), 0, at_once)
        return list(emu.FINDINGS)
    finally:
        emu.FINDINGS.clear()


THREADS = np.arange(4)


def own(ctx):
    return emu.Ptr(ctx.shared_memory(), 0, 8)


def zero(ctx):
    own(ctx).write(THREADS, 0.0, ctx, THREADS)


def store_into(ctx, rank):
    emu.peer_shared(own(ctx), rank, ctx).write(THREADS, 1.0, ctx, THREADS)


def test_dsmem_store_barrier_read_is_clean():
    def kernel(p, ctx):
        zero(ctx)
        yield emu.CLUSTER_SYNC
        store_into(ctx, (ctx.rank + 1) % ctx.group_blocks)
        yield emu.CLUSTER_SYNC
        assert (own(ctx).read(THREADS, ctx, THREADS) == 1.0).all()
        yield emu.CLUSTER_SYNC
    assert run_toy(kernel) == []


def test_dsmem_store_before_the_first_cluster_sync_is_flagged():
    def kernel(p, ctx):
        zero(ctx)
        store_into(ctx, (ctx.rank + 1) % ctx.group_blocks)
        yield emu.CLUSTER_SYNC
    assert any("before the first cluster_sync" in f for f in run_toy(kernel))


def test_dsmem_store_in_the_interval_of_the_owners_read_is_a_race():
    def kernel(p, ctx):
        zero(ctx)
        yield emu.CLUSTER_SYNC
        store_into(ctx, (ctx.rank + 1) % ctx.group_blocks)
        own(ctx).read(THREADS, ctx, THREADS)
        yield emu.CLUSTER_SYNC
    assert any(f.startswith("RACE") and "smem" in f for f in run_toy(kernel))


def test_dsmem_two_peers_storing_one_address_in_an_interval_is_a_race():
    def kernel(p, ctx):
        zero(ctx)
        yield emu.CLUSTER_SYNC
        if ctx.rank > 0:
            store_into(ctx, 0)
        yield emu.CLUSTER_SYNC
    assert any(f.startswith("RACE (WAW)") for f in run_toy(kernel, blocks=3, cluster=3))


def test_dsmem_store_into_a_peer_that_may_have_exited_is_flagged():
    def kernel(p, ctx):  # no cluster_sync after the store
        zero(ctx)
        yield emu.CLUSTER_SYNC
        if ctx.rank == 1:
            store_into(ctx, 0)
    assert any("exit" in f for f in run_toy(kernel, blocks=2, cluster=2, at_once=1))


def test_dsmem_store_between_arrive_and_wait_may_meet_the_peers_next_interval():
    """A block's accesses between its cluster_arrive and cluster_wait overlap the peers'
    after their wait; its own data loaded there is fine."""
    data = emu.Buf("data", np.zeros(8))

    def kernel(p, ctx, early):
        zero(ctx)
        yield emu.CLUSTER_SYNC
        if not early:
            store_into(ctx, (ctx.rank + 1) % ctx.group_blocks)
        yield emu.CLUSTER_ARRIVE
        if early:
            store_into(ctx, (ctx.rank + 1) % ctx.group_blocks)
        emu.Ptr(data).read(ctx.block * 2 + THREADS[:2], ctx, THREADS[:2])
        yield emu.CLUSTER_WAIT
        own(ctx).read(THREADS, ctx, THREADS)
        yield emu.CLUSTER_SYNC
    assert run_toy(lambda p, ctx: kernel(p, ctx, False), bufs=[data]) == []
    found = run_toy(lambda p, ctx: kernel(p, ctx, True), bufs=[data])
    assert any(f.startswith("RACE") and "smem" in f for f in found)


def test_global_accesses_of_two_clusters_race_whatever_their_epochs():
    """Clusters one after another (one at a time), in different barrier intervals: still
    nothing orders them."""
    out = emu.Buf("out", np.zeros(4))

    def kernel(p, ctx):
        yield emu.CLUSTER_SYNC
        if ctx.group == 1:
            yield emu.CLUSTER_SYNC
        emu.Ptr(out).write(THREADS, 1.0, ctx, THREADS)
        yield emu.CLUSTER_SYNC
    found = run_toy(kernel, blocks=2, cluster=1, at_once=1, bufs=[out])
    assert any("two clusters" in f for f in found)


def test_a_cluster_barrier_with_an_exited_block_deadlocks():
    def kernel(p, ctx):
        yield emu.CLUSTER_SYNC
        if ctx.rank == 0:
            yield emu.CLUSTER_SYNC
    with pytest.raises(emu.Finding, match="DEADLOCK"):
        run_toy(kernel, blocks=2, cluster=2)
