#!/usr/bin/env python3
"""CPU emulation of the persistent CUDA kernels, to check them without a GPU.

Emulates, as of the removal of the LL exchange (2026-11-27):
csrc/cuda/persistent.cuh (stage_rows with its 16-byte vectors, stage_rows_async's cp.async
groups into two tiles of xs (a copy's destination is written at its issue, for the race
checks, and unreadable until its cp_async_wait), tile_dot with its vector
groups, their alignment checked, and its split-K, tile_dot_mma's ldmatrix / mma.sync
m16n8k16 forward for 16-bit types lane by lane (tiles of 16, 32 or 64 batch rows as the
planner picks them, a case's `mma_rows` capping them), the register tile
(persistent_forward_reg: W's b fragments held by each lane, h_{t-1} loaded from L2 into a
fragments, 8 consecutive columns a lane with the k order permuted alike in both, the
warps' partial sums; a case's `reg_tile` sets RNNFAST_REG_TILE), smem_layout with its xs_rows and the
scratch sizes, the grid barrier's arrive and wait, both kernels in both variants
(kCluster) with their loads between arrival and wait, PersistentPlanner's grid() and cluster() with the path forced)
and the cells and ops of lstm.cu, gru.cu and rnn.cu (forward returning h, backward handing
back dgh). Indices are the CUDA code's; values are float64. Blocks are generators that
yield at each barrier. The grid variant's blocks run in a shuffled order on the grid
barrier's one counter. The cluster variant's launch (run_clusters) puts at most the occupancy
query's number of clusters on the device at once, the rest waiting for a slot in a random
order (clusters need not be co-resident), and interleaves the blocks of the clusters on it
at random; a cluster_wait returns once every block of the cluster made its cluster_arrive
(cluster_sync: both), the accesses between a block's arrive and wait counting as
overlapping the peers' on both sides of the barrier, and blocks of different clusters
never wait on each other. block_work's rank, cluster_blocks and
cluster_index are the launch's; peer_shared maps a store into a peer block's shared
memory (distributed shared memory). A thread loop is one vectorised operation; a warp's
registers are a [32, ...] array (__shfl_xor_sync is lane ^ distance); ldmatrix hands
each lane the elements the PTX ISA says from the rows the lanes address (each row
16-byte aligned), and mma.sync assembles the a, b and c fragments by the ISA's layouts,
multiplies and hands d back the same way, so a wrong lane-to-row map shows as a wrong
result; shared memory is one byte array of the host's plan.smem per block. A tracker
flags out-of-bounds, misaligned or uninitialised accesses, cross-block races between
barriers (grid barriers for global memory; in a cluster launch, cluster barriers for
global memory and for every access to a block's shared memory by it or its peers, and any
conflicting accesses by blocks of two clusters, which nothing orders), plain loads of
another block's data (needs __ldcg), a peer's shared memory mapped before the first
cluster_sync or after the peer exited, and intra-block races between __syncthreads. A
case's dtype picks the element sizes and so the kernels and layout (16-bit: tensor
cores); its `cluster` = (RNNFAST_CLUSTER_SIZE, RNNFAST_CLUSTER_ROWS), None in either for
the planner's choice, picks the cluster variant, and its `cluster_exchange` "async" the
async exchange (RNNFAST_CLUSTER_EXCHANGE): st.async complete their bytes on the receiving
block's mbarrier of that turn (MBarrier: phase, pending arrival, transaction bytes), a
block's arrival expects the turn's bytes, and its wait returns once the phase of the
parity it names has completed; a wait that can never return is a deadlock, and bytes or
an arrival left over at the end are flagged. fused_step.cuh's fused_step_forward and
fused_step_backward (the per-step path's fused kernels, a case's `step_fused` setting
RNNFAST_STEP_FUSED; the emulator's 16-bit type standing for bfloat16, whose backward is
fused) run as one launch a step of blocks without barriers, their cp.async groups (4
buffers, 3 in flight), ldmatrix and mma.sync lane by lane as above. Results are compared with
rnnfast.reference and torch autograd, and with the CPU ops when a built rnnfast imports.

It cannot show memory ordering on real hardware (fences, __ldcg and the cluster barrier's
release/acquire are checked as rules), the rounding and summation order inside mma.sync,
float32/16-bit rounding, or timing (bank conflicts,
occupancy, the `auto` cost model). For the cluster variant in particular: the hardware's
cluster scheduling (a FakeDevice runs sms // C clusters at once; GPC limits, and whether a
16-block cluster fits at all, are the real occupancy query's), the choice among cluster
sizes (cluster_us runs on a stand-in device, an H100's clock and rates, not the CUDA
code's cudaDeviceProp), the cost of the stores into peers' shared memory, and the
__trap() of the cluster helpers below compute capability 9.0.

Run (exit status 1 on any mismatch or finding):
  python scripts/emulate_persistent.py                  # the default case set
  python scripts/emulate_persistent.py --full           # more shapes
  python scripts/emulate_persistent.py --dtype float16  # every case on one dtype's path
  python scripts/emulate_persistent.py --self-test      # every planted bug is caught
tests/test_persistent_emulation.py runs the default set and the self-test under pytest.
"""
import argparse
import contextlib
import dataclasses
import importlib.util
import math
import os
import re
import sys
import time

import numpy as np
import torch

BLOCK_DIM = 256  # kPersistentThreads
WARPS = BLOCK_DIM // 32
F64 = torch.float64

# sizeof(scalar_t), sizeof(acc_t). bfloat16 takes float16's path (kForwardMma tests the
# size only), so float16 stands for both.
DTYPES = {"float64": (8, 8), "float32": (4, 4), "float16": (2, 4)}


class Finding(Exception):
    pass


FINDINGS = {}

# --self-test: planted bugs, one at a time, each of which the emulation must catch
MUTATIONS = {
    "shfl_distance": "warp_split_stage: xor distance HALF * 16 / M instead of HALF * 32 / M",
    "split_keep_swapped": "warp_split_stage: the upper lane keeps the lower half",
    "out_lane_map": "tile_dot: out index from idx = j * 32 + lane",
    "fwd_ws_no_u0": "forward Ws load: W_hh row g * H + j (u0 missing)",
    "bwd_ws_transposed": "backward Ws store at q * r_pad + j",
    "r_pad_unrounded": "forward r_pad = G * U (not rounded up to RPW)",
    "plain_stage_load": "stage_rows with a plain load instead of __ldcg",
    "no_zero_rows": "stage_rows leaves the rows past N unwritten",
    "no_tile_sync": "no __syncthreads between the dot product and the pointwise loop",
    "no_bwd_barrier": "backward: no grid barrier between phase A and phase B",
    "barrier_target_low": "barrier target k * B - 1",
    "gru_direct_dh_off": "GRU phase B overwrites dh (kDirectDh ignored)",
    "here_is_U": "here = U for every block",
    "lstm_c_prev_t": "LSTM c_prev from cache[t] instead of cache[tp]",
    "split_k_remainder": "tile_dot split-K: g_end = g_begin + groups / splits (drops groups % splits)",
    "split_no_sync": "tile_dot split-K: no __syncthreads before the partials are summed",
    "split_scratch_short": "ffma_scratch: (splits - 1) * NT * r_pad elements",
    "split_slot_stride": "tile_dot split-K: partial sp at scratch + sp * NT * RPW",
    "mma_b_pointer": "tile_dot_mma: b = ws + rt * 16 * K + ks * 16 (K for ld)",
    "mma_ld_unpadded": "mma_ld(K) = K (no padding to a multiple of 16)",
    "mma_ld_odd": "mma_ld(K) = round_up(K, 16) + 4 (rows not 16-byte aligned)",
    "mma_split_slot": "tile_dot_mma: the sum over splits reads slot sp * r_tiles + rt",
    "mma_a_lane_map": "tile_dot_mma: ldmatrix of xs with the b operand's lane-to-row map",
    "mma_b_lane_map": "tile_dot_mma: ldmatrix of ws with the a operand's lane-to-row map",
    "mma_no_k_pad": "stage_rows leaves xs[n][K:ld] unwritten",
    "bwd_ahead_this_step": "backward: the inputs loaded ahead of the barrier are the step's own",
    "tile_ahead_row": "forward: a later tile's first items take tile 0's inputs",
    "ahead_this_step": "forward: the inputs loaded ahead of the barrier are the step's own",
    "no_next_tile_sync": "forward: no __syncthreads between one row tile and the next",
    "stage_vec_unaligned": "stage_rows takes 16-byte vectors without checking the alignment",
    "stage_batch_overlap": "stage_rows: a batch's units e0 + i instead of e0 + i * blockDim",
    "mma_ws_no_k_pad": "forward Ws load without k < K (reads W_hh past the row)",
    "mma_scratch_no_splits": "mma_scratch_bytes: r_tiles * 256 floats (splits missing)",
    "mma_scratch_one_row_tile": "mma_scratch_bytes: one row tile of 16 whatever NT (too short)",
    "mma_tile_order": "tile_dot_mma: job tile t's row tile t % m_tiles, column tile t / m_tiles",
    "mma_a_row_tile": "tile_dot_mma: every job reads xs's first 16 rows (row tile mt missing)",
    "ffma_ld_unpadded": "ffma_ld(K) = K (rows not padded to whole vectors)",
    "bwd_ws_no_k_pad": "backward Ws load without q < K (reads W_hh past its rows)",
    # the cluster variant
    "cluster_one_turn": "cluster: one turn of xs (each step stores into the turn it reads)",
    "cluster_no_self_store": "cluster: for_each_peer leaves out this block's own rank",
    "cluster_h_no_u0": "cluster forward: h stored at column j of the next turn (u0 missing)",
    "cluster_h_no_n0": "cluster forward: h stored at row nl of the next turn (n0 missing)",
    "cluster_no_pre_sync": "cluster: no cluster_sync before the loop",
    "cluster_no_n_begin": "cluster: the cell's row n0 + nl (n_begin missing)",
    "cluster_rows_unclamped": "cluster: rows = group_rows for the last cluster too",
    "cluster_fill_one_turn": "cluster: only turn 0 of xs written before the loop",
    "cluster_bwd_gru_dg_ih": "cluster backward: GRU stores its dg_ih, not dgh, into the turns",
    "cluster_phase_b_other_turn": "cluster backward: phase B reads turn (s + 1) & 1",
    "cluster_plan_smem_one_row": "cluster plan: smem sized for N_c = 1 (smem_bytes(..., 1))",
    "cluster_early_arrive": "cluster: cluster_arrive before the stores into the peers' turns",
    # the cluster variant's async exchange (RNNFAST_CLUSTER_EXCHANGE=async)
    "mbar_bytes_short": "async exchange: a turn's expected bytes one value short",
    "mbar_fwd_parity": "async exchange forward: the wait's parity s & 1, not (s >> 1) & 1",
    "mbar_bwd_parity": "async exchange backward: the wait's parity (s >> 1) & 1, from s not T - 1 - s",
    "mbar_no_init": "async exchange: the mbarriers left uninitialised",
    "mbar_fwd_this_turn": "async exchange forward: the arrival and wait on this step's turn's mbarrier",
    "grid_early_arrive": "grid forward: grid_arrive before the last tile's stores of h into y",
    # the grid variant's pipelined staging (cp.async into two tiles of xs)
    "async_no_wait": "pipelined staging: no cp_async_wait before a tile's dot product",
    "async_last_wait_one": "pipelined staging: the last tile waits with cp_async_wait<1>",
    "async_same_buffer": "pipelined staging: tile i + 1 copied into tile i's half of xs",
    "async_no_sync": "pipelined staging: no __syncthreads after cp_async_wait",
    "async_plan_one_tile": "pipelined staging: the plan sizes xs for one tile but asks for two",
    "prefetch_past_t": "forward: xp of step s + 2 prefetched at the step before the last too",
    # the register tile (persistent_forward_reg)
    "reg_a_perm": "register tile: k step 0's a fragment from columns 8c + {0..3}, not {0, 1, 4, 5}",
    "reg_plain_load": "register tile: h_{t-1} loaded with a plain load instead of __ldcg",
    "reg_idle_warp_silent": "register tile: a warp without chunks writes no partial sums",
    "reg_vec_unaligned": "register tile: 16-byte loads of h_{t-1} without checking the alignment",
    "reg_w_no_u0": "register tile: W's fragments from row g * H + j (u0 missing)",
    "reg_hi_rows": "register tile: the partial sums of rows g + 8 stored at row g",
    "reg_own_h_stale": "register tile: a thread's h_{t-1} (GRU) kept from step 0",
    "reg_no_sync": "register tile: no __syncthreads between the partial sums and the pointwise pass",
    "reg_chunk_split": "register tile: warp w's chunks from w * C // 8 to (w + 1) * C // 8 + 1",
    "reg_one_step_sum": "register tile: the partial sums leave out k step 1's accumulator",
    # the per-step path's fused forward (fused_step_forward)
    "fused_w_gate_row": "fused step: W's tile row g U + j from W_hh's row u0 + j (the gate's "
                        "offset g H missing)",
    "fused_stage_one_buffer": "fused step: every stage copied into buffer 0",
    "fused_wait_one_short": "fused step: cp.async.wait_group S - 1 before a stage's MMAs "
                            "(one group too many left pending)",
    "fused_no_top_sync": "fused step: no __syncthreads between a stage's wait and its MMAs",
    "fused_no_trailing_sync": "fused step: no __syncthreads between the last stage's MMAs and "
                              "the sums written over sa",
    "fused_h0_unaligned": "fused step: an unaligned h0 copied by cp.async as it is",
    "fused_bwd_one_buffer": "fused backward: the gate gradients of every step in buffer 0",
    "fused_bwd_no_direct": "fused backward: dh the GEMM alone, the GRU's direct term dropped",
}
MUT = set()


def mut(name):
    assert name in MUTATIONS, name
    return name in MUT


def finding(msg):
    FINDINGS[msg] = FINDINGS.get(msg, 0) + 1


# --------------------------------------------------------------------------------------
# memory with access tracking
# --------------------------------------------------------------------------------------
class Ctx:
    """One block: its index, the grid size, the launch's dynamic shared-memory bytes, its
    barrier epoch (grid or cluster barriers passed) and its __syncthreads count. Its group
    is the blocks that a barrier joins: the whole grid (rank = block index), or for a
    cluster launch its cluster (`group` the cluster index, `rank` the rank in it, `peers`
    the cluster's blocks, whose shared memory peer_shared maps). Its shared memory exists
    from the start, as a resident block's does (a peer may address it before this block
    ran a line)."""

    def __init__(self, block, grid, smem_bytes, rank=None, group=0, group_blocks=None,
                 peers=None):
        self.block, self.grid, self.smem_bytes = block, grid, smem_bytes
        self.rank = block if rank is None else rank
        self.group = group
        self.group_blocks = grid if group_blocks is None else group_blocks
        self.peers = peers  # filled in by run_clusters
        self.epoch, self.sync = 0, 0
        self.window = False  # between cluster_arrive and cluster_wait
        self.exited = False
        self.mbar = [MBarrier(), MBarrier()]  # the async exchange's, a turn each
        # a cluster launch tracks the peers' accesses to this block's shared memory too
        self.smem = Buf(f"smem[b{block}]", np.zeros(smem_bytes), initialized=False,
                        shared=True, cross=peers is not None)

    def syncthreads(self):
        self.sync += 1

    def key(self):
        """This block's current __syncthreads interval, for the intra-block checks."""
        return (self.block << 32) | self.sync

    def shared_memory(self):
        return self.smem


class Buf:
    """A device buffer. Global buffers hold one type and are addressed by element; shared
    memory (shared=True) is addressed by byte, a value living at its first byte with its
    size in `tsize`, so that a read can tell a value of its own type from bytes that a
    store through another region's pointer partly overwrote.

    Accesses by several blocks are checked between barriers (`cross`: global memory, and a
    cluster block's shared memory, which its peers store into): a block's access conflicts
    with another block's to the same address where one of them writes and the two may
    overlap in time (overlap()), and always where the two blocks are of different groups
    (clusters), which no barrier orders."""

    def __init__(self, name, data, initialized=True, shared=False, cross=None):
        self.name, self.shared = name, shared
        self.cross = not shared if cross is None else cross
        if isinstance(data, torch.Tensor):
            data = data.detach().to(F64).contiguous().reshape(-1).numpy()
        self.v = np.array(data, dtype=np.float64).reshape(-1).copy()
        n = self.v.size
        if not initialized:
            self.v[:] = np.nan
        self.init = np.full(n, bool(initialized))
        self.tsize = np.zeros(n, np.int64) if shared else None
        self.reset_launch()

    def reset_launch(self):
        n = self.v.size
        # the intra-block checks compare (block, __syncthreads count) keys; the cross-block
        # ones (self.cross) blocks, groups and barrier epochs
        self.wkey = np.full(n, -1, np.int64)  # writer's key during this launch
        self.wt = np.full(n, -1, np.int64)  # writer thread
        self.rkey = np.full(n, -1, np.int64)  # key of the last reads
        self.rt = np.full(n, -1, np.int64)  # their thread (-2: several)
        if self.cross:
            self.wb = np.full(n, -1, np.int64)  # writer block
            self.we = np.full(n, -1, np.int64)  # writer's barrier epoch
            self.re = np.full(n, -1, np.int64)  # barrier epoch of the last reads
            self.rmask = np.zeros(n, np.int64)  # ranks of the blocks that read at epoch re
            self.rg = np.full(n, -1, np.int64)  # the readers' group (-2: several groups)
            # accesses between cluster_arrive and cluster_wait (Ctx.window), once any
            self.windowed = False
            self.ww = np.zeros(n, bool)  # the writer wrote in its window
            self.rwe = np.full(n, -1, np.int64)  # epoch of the last reads in a window
            self.rwmask = np.zeros(n, np.int64)  # ranks of the blocks that made them

    @staticmethod
    def overlap(e, window, ctx):
        """Whether another block's access at barrier epoch e (in its window: between its
        cluster_arrive and cluster_wait) may overlap this block's now. Epoch k is the
        interval after the k-th wait; a window at k, after the (k + 1)-th arrival, lasts until
        this block's (k + 1)-th wait, which others can pass meanwhile. So: equal epochs, or
        epochs one apart where the earlier access was in its window."""
        hit = e == ctx.epoch
        if window is not None:
            hit |= window & (e + 1 == ctx.epoch)
        if ctx.window:
            hit |= e == ctx.epoch + 1
        return hit

    def _readers_overlap(self, addr, ctx):
        """Another block's reads of addr may overlap this block's write now."""
        bit = np.int64(1) << np.int64(ctx.rank)
        hit = ((self.rmask[addr] & ~bit) != 0) & self.overlap(self.re[addr], None, ctx)
        if self.windowed:
            hit |= ((self.rwmask[addr] & ~bit) != 0) & self.overlap(
                self.rwe[addr], np.ones(addr.size, bool), ctx)
        return hit

    def tensor(self, shape):
        return torch.from_numpy(self.v.copy()).reshape(shape)

    def _check_access(self, addr, size, what, where):
        if addr.min() < 0 or addr.max() + size > self.v.size:
            raise Finding(f"{what} at {where} out of bounds of {self.name} (size "
                          f"{self.v.size}): [{addr.min()}, {addr.max() + size - 1}]")
        if self.shared and size > 1 and (addr % size).any():
            finding(f"{what} at {where}: a {size}-byte access of {self.name} not "
                    f"{size}-byte aligned")

    @staticmethod
    def _flat(addr, thr, val=None):
        """Flattened addresses, with the threads (and values) broadcast to their shape."""
        addr = np.asarray(addr, np.int64)
        thr = np.asarray(thr, np.int64)
        if thr.shape != addr.shape:
            thr = np.broadcast_to(thr, addr.shape)
        if val is not None:
            val = np.asarray(val, np.float64)
            if val.shape != addr.shape:
                val = np.broadcast_to(val, addr.shape)
            val = val.reshape(-1)
        return addr.reshape(-1), thr.reshape(-1), val

    def read(self, addr, ctx, thr, cg=False, where="", size=1):
        """The values at addr, in its shape."""
        shape = np.shape(addr)
        addr, thr, _ = self._flat(addr, thr)
        if not addr.size:
            return np.zeros(shape)
        self._check_access(addr, size, "read", where)
        valid = self.init[addr]
        if self.shared:
            valid &= self.tsize[addr] == size
        if not valid.all():
            finding(f"uninitialised (or partly overwritten) read of {self.name} at {where}")
        if self.cross:
            wb = self.wb[addr]
            other = (wb >= 0) & (wb != ctx.block)
            groups = ctx.group_blocks != ctx.grid  # a launch of several clusters
            if other.any():
                ww = self.ww[addr] if self.windowed else None
                if (other & self.overlap(self.we[addr], ww, ctx)).any():
                    finding(f"RACE: {self.name} read at {where} in the same barrier interval "
                            f"in which another block writes it")
                if groups and (other & (wb // ctx.group_blocks != ctx.group)).any():
                    finding(f"RACE: {self.name} read at {where}, written by a block of "
                            f"another cluster (no barrier orders them)")
                if not cg and not self.shared:
                    finding(f"plain load of {self.name} at {where}, written by another "
                            f"block during the launch (needs __ldcg)")
            bit = np.int64(1) << np.int64(ctx.rank)
            if ctx.window:
                self.windowed = True
                same = self.rwe[addr] == ctx.epoch
                self.rwmask[addr] = np.where(same, self.rwmask[addr] | bit, bit)
                self.rwe[addr] = ctx.epoch
            else:
                same = self.re[addr] == ctx.epoch
                self.rmask[addr] = np.where(same, self.rmask[addr] | bit, bit)
                self.re[addr] = ctx.epoch
            if groups:
                rg = self.rg[addr]
                self.rg[addr] = np.where((rg == -1) | (rg == ctx.group), ctx.group, -2)
        key = ctx.key()
        if ((self.wkey[addr] == key) & (self.wt[addr] != thr)).any():
            finding(f"RACE (intra-block RAW): {self.name} at {where}")
        # the last readers, for the intra-block WAR check: -2 once two threads read an
        # address in one interval (two threads of this read among them when the stored
        # thread differs from one of theirs)
        newt = np.where((self.rkey[addr] == key) & (self.rt[addr] != thr), -2, thr)
        self.rkey[addr], self.rt[addr] = key, newt
        clash = self.rt[addr] != newt
        if clash.any():
            self.rt[addr[clash]] = -2
        return self.v[addr].reshape(shape)

    def write(self, addr, val, ctx, thr, where="", size=1):
        addr, thr, val = self._flat(addr, thr, val)
        if not addr.size:
            return
        self._check_access(addr, size, "write", where)
        if self.cross:
            wb = self.wb[addr]
            other = (wb >= 0) & (wb != ctx.block)
            ww = self.ww[addr] if self.windowed else None
            if (other & self.overlap(self.we[addr], ww, ctx)).any():
                finding(f"RACE (WAW): {self.name} at {where} written by two blocks in one "
                        f"barrier interval")
            groups = ctx.group_blocks != ctx.grid  # a launch of several clusters
            if groups and (other & (wb // ctx.group_blocks != ctx.group)).any():
                finding(f"RACE (WAW): {self.name} at {where} written by blocks of two "
                        f"clusters")
            if self._readers_overlap(addr, ctx).any():
                finding(f"RACE (WAR): {self.name} written at {where} in the barrier interval "
                        f"in which another block reads it")
            if groups and ((self.rg[addr] != -1) & (self.rg[addr] != ctx.group)).any():
                finding(f"RACE (WAR): {self.name} written at {where}, read by a block of "
                        f"another cluster")
            self.wb[addr], self.we[addr] = ctx.block, ctx.epoch
            if ctx.window:
                self.windowed = True
                self.ww[addr] = True
            elif self.windowed:
                self.ww[addr] = False
        key = ctx.key()
        if ((self.wkey[addr] == key) & (self.wt[addr] != thr)).any():
            finding(f"RACE (intra-block WAW): {self.name} at {where}")
        if ((self.rkey[addr] == key) & (self.rt[addr] != thr)).any():
            finding(f"RACE (intra-block WAR): {self.name} at {where}")
        self.wkey[addr], self.wt[addr] = key, thr
        if (self.wt[addr] != thr).any():
            finding(f"RACE: two threads of one store to {self.name} at {where} write the same "
                    f"address")
        if self.shared:
            # a value that starts up to 7 bytes below and reaches into this store is spoilt,
            # as is any value starting inside the bytes this store covers
            d = np.arange(1, 8)
            below = (addr[:, None] - d).reshape(-1)
            dist = np.broadcast_to(d, (addr.size, 7)).reshape(-1)
            keep = below >= 0
            below, dist = below[keep], dist[keep]
            hit = below[self.tsize[below] > dist]
            inside = (addr[:, None] + np.arange(1, size)).reshape(-1)
            self.init[hit], self.tsize[hit] = False, 0
            self.init[inside], self.tsize[inside] = False, 0
            self.tsize[addr] = size
        self.v[addr] = val
        self.init[addr] = True


class Ptr:
    """A typed device pointer: a buffer, an address and the pointee's size in the buffer's
    address units (bytes in shared memory; 1 in the element-addressed global buffers)."""

    def __init__(self, buf, off=0, size=1):
        self.buf, self.off, self.size = buf, int(off), size

    def __add__(self, n):
        return Ptr(self.buf, self.off + int(n) * self.size, self.size)

    def addr(self, idx):
        return self.off + np.asarray(idx, np.int64) * self.size

    def read(self, idx, ctx, thr, cg=False, where=""):
        return self.buf.read(self.addr(idx), ctx, thr, cg, where, self.size)

    def write(self, idx, val, ctx, thr, where=""):
        self.buf.write(self.addr(idx), val, ctx, thr, where, self.size)


# --------------------------------------------------------------------------------------
# device helpers (common.cuh, rnnfast.h)
# --------------------------------------------------------------------------------------
def sigmoid_act(x):
    return 1.0 / (1.0 + np.exp(-x))


tanh_act = np.tanh


def time_index(s, T, reverse):
    return T - 1 - s if reverse else s


def round_up(v, m):
    return (v + m - 1) // m * m


# --------------------------------------------------------------------------------------
# persistent.cuh: sizes and the shared-memory layout
# --------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DType:
    """What a kernel's code path depends on: sizeof(scalar_t) and sizeof(acc_t)."""
    scalar: int
    acc: int

    @property
    def mma(self):  # kForwardMma<scalar_t>
        return self.scalar == 2


def dtype_of(name):
    return DType(*DTYPES[name])


def ffma_splits(chunks, warps):
    return 1 if chunks >= warps else warps // chunks


def ffma_scratch(NT, RPW, r_pad):
    splits = ffma_splits(r_pad // RPW, WARPS)
    return 0 if splits == 1 else (splits - mut("split_scratch_short")) * NT * r_pad


def mma_splits(r_tiles, warps):
    return 1 if r_tiles >= warps else warps // r_tiles


FFMA_VEC = 4  # kFfmaVec


def ffma_ld(K):
    return K if mut("ffma_ld_unpadded") else round_up(K, FFMA_VEC)


def mma_ld(K):
    if mut("mma_ld_unpadded"):
        return K
    return round_up(K, 16) + (4 if mut("mma_ld_odd") else 8)


def mma_scratch_bytes(nt, r_pad):
    tiles = (16 if mut("mma_scratch_one_row_tile") else nt) // 16 * (r_pad // 16)
    splits = 1 if mut("mma_scratch_no_splits") else mma_splits(tiles, WARPS)
    return tiles * splits * 256 * 4


def scratch_bytes(NT, RPW, mma, acc_size, r_pad):
    return mma_scratch_bytes(NT, r_pad) if mma else ffma_scratch(NT, RPW, r_pad) * acc_size


def align128(v):
    return (v + 127) // 128 * 128


@dataclasses.dataclass(frozen=True)
class SmemLayout:
    xs_offset: int
    out_offset: int
    scratch_offset: int
    bytes: int


# kClusterStaticSmem: the cluster kernels' static shared memory (the async exchange's
# mbarriers; ptxas reports 128 bytes)
CLUSTER_STATIC_SMEM = 128


def smem_layout(xs_rows, nt, r_pad, ld, scratch, w_size, x_size, acc_size):
    xs = align128(r_pad * ld * w_size)
    out = align128(xs + xs_rows * ld * x_size)
    sc = align128(out + nt * r_pad * acc_size)
    return SmemLayout(xs, out, sc, sc + scratch)


def xs_rows(cluster, nt, group_rows, xs_tiles=1):
    """xs_rows<kCluster>: NT staged rows times the grid variant's xs_tiles, or the cluster
    variant's two turns of its rows."""
    return 2 * round_up(group_rows, nt) if cluster else nt * xs_tiles


# --------------------------------------------------------------------------------------
# persistent.cuh: the warp reduce, tile_dot, stage_rows
# --------------------------------------------------------------------------------------
LANES = np.arange(32, dtype=np.int64)
STATS = {}


def cover(*items):
    STATS.setdefault("cover", set()).update(items)  # a planner called outside a suite too


def shfl_xor_sync(val, dist):
    """__shfl_xor_sync(0xffffffff, ...) over val [jobs, 32 lanes, ...]: the partner lane's
    value. The full mask is right: every lane has left the k loop before the reduce."""
    return val[:, LANES ^ dist]


def warp_split_stage(v, M, HALF):
    kDist = HALF * 32 // M
    if mut("shfl_distance"):
        kDist = max(1, HALF * 16 // M)
    upper = (LANES & kDist) != 0
    if mut("split_keep_swapped"):
        upper = ~upper
    # `for i < HALF` (unrolled): iteration i reads v[i], v[i + HALF] and writes v[i] only,
    # so the HALF iterations run here side by side, column i being iteration i
    up = upper[None, :, None]
    send = np.where(up, v[:, :, :HALF], v[:, :, HALF:2 * HALF])
    keep = np.where(up, v[:, :, HALF:2 * HALF], v[:, :, :HALF])
    v[:, :, :HALF] = keep + shfl_xor_sync(send, kDist)
    if HALF > M // 32:
        warp_split_stage(v, M, HALF // 2)


def warp_split_reduce(v, M):
    assert M >= 32 and (M & (M - 1)) == 0
    warp_split_stage(v, M, M // 2)


def tile_dot(NT, RPW, ws, r_pad, xs, ld, out, scratch, ctx):
    M, kPerLane = NT * RPW, NT * RPW // 32
    V = FFMA_VEC if out.size == 4 else 2  # vectors of 2 for double sums
    chunks = r_pad // RPW
    splits = ffma_splits(chunks, WARPS)
    groups = ld // V
    cover("ffma: split-K" if splits > 1 else "ffma: one k range per chunk")
    if chunks > WARPS:
        cover("ffma: several jobs per warp")
    if splits > 1 and groups % splits:
        cover("ffma: groups % splits != 0")
    # `for (job = warp; job < chunks * splits; job += warps)`: row j of every array below
    # is job j, run by warp j % warps (a warp's later jobs touch other outputs, and nothing
    # orders the warps before the next __syncthreads, so all jobs run side by side)
    job = np.arange(chunks * splits, dtype=np.int64)
    r0, sp = job // splits * RPW, job % splits
    g_begin = sp * groups // splits
    if mut("split_k_remainder"):
        g_end = g_begin + groups // splits
    else:
        g_end = (sp + 1) * groups // splits
    thr = (job % WARPS * 32)[:, None] + LANES
    # `for (g = g_begin + lane; g < g_end; g += 32)`, per lane: iteration it at g[:, :, it];
    # group g is the vector of k = V * g + [0, V) of each row (the next group's rows of ws,
    # loaded ahead, are the same loads one iteration early; the last iteration's reload of
    # its own group reads nothing new)
    iters = max(1, -(-int((g_end - g_begin).max()) // 32))
    g = g_begin[:, None, None] + LANES[None, :, None] + 32 * np.arange(iters)
    act = g < g_end[:, None, None]
    ga = g[act]
    ta = np.broadcast_to(thr[:, :, None], g.shape)[act][:, None, None]
    ra = np.broadcast_to(r0[:, None, None], g.shape)[act][:, None, None]
    e = np.arange(V)
    x_first = np.arange(NT)[None, :] * ld + V * ga[:, None]  # [active, NT]
    w_first = (ra[:, :, 0] + np.arange(RPW)) * ld + V * ga[:, None]  # [active, RPW]
    for base, first, what in ((xs, x_first, "xs"), (ws, w_first, "ws")):
        if (base.addr(first) % (V * base.size)).any():
            finding(f"tile_dot: a vector load of {what} not {V * base.size}-byte aligned")
    xv = np.zeros(g.shape + (NT, V))
    xv[act] = xs.read(x_first[:, :, None] + e, ctx, ta, where="tile_dot xs")
    w = np.zeros(g.shape + (RPW, V))
    w[act] = ws.read(w_first[:, :, None] + e, ctx, ta, where="tile_dot ws")
    acc = np.zeros((job.size, 32, M))
    for it in range(iters):  # for n < NT, e < V, i < RPW: acc[n * RPW + i] += x[n][e] w[i][e]
        a = act[:, :, it]
        prod = np.einsum("jlne,jlie->jlni", xv[:, :, it], w[:, :, it]).reshape(job.size, 32, M)
        acc[a] += prod[a]
    warp_split_reduce(acc, M)
    jj = np.arange(kPerLane)
    idx = jj * 32 + LANES[:, None] if mut("out_lane_map") else LANES[:, None] * kPerLane + jj
    elem = (idx // RPW) * r_pad + r0[:, None, None] + idx % RPW  # [job, lane, j]
    slot = NT * (RPW if mut("split_slot_stride") else r_pad)  # scratch + sp * NT * r_pad
    if splits == 1:
        out.write(elem, acc[:, :, :kPerLane], ctx, thr[:, :, None], where="tile_dot out")
    else:
        scratch.write(sp[:, None, None] * slot + elem, acc[:, :, :kPerLane], ctx,
                      thr[:, :, None], where="tile_dot scratch")
        if not mut("split_no_sync"):
            ctx.syncthreads()
        idx = np.arange(NT * r_pad, dtype=np.int64)
        t = idx % BLOCK_DIM
        part = scratch.read(np.arange(splits) * slot + idx[:, None], ctx, t[:, None],
                            where="tile_dot split sum")
        v = part[:, 0].copy()
        for s in range(1, splits):
            v += part[:, s]
        out.write(idx, v, ctx, t, where="tile_dot out (split sum)")


STAGE_BATCH = 8  # kStageBatch


def stage_rows(NT, src, n0, N, K, ld, xs, ctx, x_size):
    # 16-byte vectors (V elements) where K and ld hold whole vectors and the tile's first
    # row is 16-byte aligned, else elements; unit e (vector or element) of xs is thread
    # e % blockDim's, in its batch `e0 + i * blockDim` (e0 = thread + j * kStageBatch *
    # blockDim). No barrier inside: every unit runs side by side here.
    V = 16 // x_size
    rows = min(NT, N - n0)
    base_bytes = (src.off + n0 * K) * x_size  # global buffers start 256-byte aligned
    vector = K % V == 0 and ld % V == 0 and (base_bytes % 16 == 0 or mut("stage_vec_unaligned"))
    cover("stage_rows: 16-byte vectors" if vector else "stage_rows: elements")
    e = np.arange(NT * ld, dtype=np.int64)
    unit = e // V if vector else e
    units = NT * ld // V if vector else NT * ld
    if units > STAGE_BATCH * BLOCK_DIM:
        cover("stage_rows: several batches per thread")
    thr = unit % BLOCK_DIM
    overlap = mut("stage_batch_overlap")  # e = e0 + i instead of e0 + i * blockDim:
    if overlap:  # unit u' of a batch is thread t's for t <= u' < t + kStageBatch, t < blockDim
        u = unit % (STAGE_BATCH * BLOCK_DIM)
        thr = np.minimum(u, BLOCK_DIM - 1)
    nl, k = e // ld, e % ld
    load = (nl < rows) & (k < K)
    if vector and load.any():
        starts = (base_bytes + (nl * K + k) * x_size)[load & (k % V == 0)]
        if (starts % 16).any():
            finding("stage_rows: a 16-byte vector load from an address not 16-byte aligned")
    val = np.zeros(NT * ld)
    val[load] = src.read((n0 * K + nl * K + k)[load], ctx, thr[load],
                         cg=not mut("plain_stage_load"), where="stage_rows (load_cg)")
    store = np.ones(NT * ld, bool)
    if mut("no_zero_rows"):
        store &= nl < rows
    if mut("mma_no_k_pad"):
        store &= k < K
    if overlap:
        store &= u < BLOCK_DIM + STAGE_BATCH - 1  # the units past every thread's batch
        again = store & (u >= 1) & (u <= BLOCK_DIM)  # and a second thread's store
    xs.write(e[store], val[store], ctx, thr[store], where="stage_rows xs")
    if overlap:
        xs.write(e[again], val[again], ctx, thr[again] - 1, where="stage_rows xs")


def async_rows_ok(src, K, ld, x_size):
    """async_rows_ok: whole 16-byte vectors in K and ld, src 16-byte aligned."""
    V = 16 // x_size
    return K % V == 0 and ld % V == 0 and (src.off * x_size) % 16 == 0


def stage_rows_async(NT, src, n0, N, K, ld, xs, ctx, x_size, pending):
    """stage_rows_async: one group of cp.async copies (vector e of xs is thread e %
    blockDim's; zero-filled past N and for K <= k < ld). The source is read now (after the
    barrier, through L2); the copies land at some time until the group's cp_async_wait: the
    destination is written now (so that a read or write of it by another thread in this
    __syncthreads interval is a race) and marked uninitialised until the wait (so that a
    read before it is flagged), when cp_async_wait writes it again. pending: the block's
    groups, oldest first."""
    V = 16 // x_size
    rows = min(NT, N - n0)
    e = np.arange(NT * ld, dtype=np.int64)
    nl, k = e // ld, e % ld
    thr = (e // V) % BLOCK_DIM
    load = (nl < rows) & (k < K)
    val = np.zeros(NT * ld)
    val[load] = src.read((n0 * K + nl * K + k)[load], ctx, thr[load], cg=True,
                         where="stage_rows_async (cp.async.cg)")
    xs.write(e, val, ctx, thr, where="stage_rows_async xs (cp.async issued)")
    xs.buf.init[xs.addr(e)] = False
    pending.append((xs, e, val, thr))
    cover("stage_rows_async: cp.async")


def cp_async_wait(n, pending, ctx):
    """cp_async_wait<n>: every group but the n committed last has landed."""
    while len(pending) > n:
        xs, e, val, thr = pending.pop(0)
        xs.write(e, val, ctx, thr, where="stage_rows_async xs (cp.async landed)")


def start_pipeline(cluster, p, NT, src, N, K, ld, xs, ctx, x_size):
    """A step's row-tile loop is pipelined in the grid variant with two tiles of xs and rows
    async_rows_ok allows: tile 0's copy issued before the loop. Returns (pipelined, the
    block's pending groups)."""
    pipelined = not cluster and p.xs_tiles == 2 and async_rows_ok(src, K, ld, x_size)
    pending = []
    if pipelined:
        stage_rows_async(NT, src, 0, N, K, ld, xs, ctx, x_size, pending)
    return pipelined, pending


def staged_tile(NT, src, n0, i, rows, N, K, ld, xs, ctx, x_size, pending):
    """The pipelined tile loop's staging of tile i (rows n0 ...): tile i + 1 issued into the
    other half of xs, then tile i waited for; returns tile i's half. The caller's
    __syncthreads follows."""
    half = 0 if mut("async_same_buffer") else ((i + 1) & 1)
    if n0 + NT < rows:
        stage_rows_async(NT, src, n0 + NT, N, K, ld, xs + half * NT * ld, ctx, x_size, pending)
        if not mut("async_no_wait"):
            cp_async_wait(1, pending, ctx)
        cover("stage_rows_async: a later tile issued during an earlier one")
    elif not mut("async_no_wait"):
        cp_async_wait(1 if mut("async_last_wait_one") else 0, pending, ctx)
    return xs + (i & 1) * NT * ld


# --------------------------------------------------------------------------------------
# persistent.cuh: tile_dot_mma on ldmatrix and mma.sync m16n8k16, lane by lane
# --------------------------------------------------------------------------------------
GROUP, TIG = LANES // 4, LANES % 4  # the PTX ISA's groupID and threadID_in_group


def ldmatrix_x4(base, row_off, warp, ctx, what):
    """ldmatrix.sync.aligned.m8n8.x4.shared.b16 for each job: row_off [jobs, 32] is each
    lane's row address (element offset from base). Matrix j's 8 rows are the 8 elements at
    lanes 8j .. 8j + 7's addresses; lane l receives row l // 4, elements 2 (l % 4) + {0, 1}
    of each matrix. Returns [jobs, 32 lanes, 4 registers, 2 elements]. Each row address
    must be 16-byte aligned (the smem base is 128-byte aligned, so offsets stand for
    addresses)."""
    if (base.addr(row_off) % 16).any():
        finding(f"ldmatrix ({what}): a row address not 16-byte aligned")
    thr = warp[:, None, None] * 32 + LANES[None, :, None]
    rows = base.read(row_off[:, :, None] + np.arange(8), ctx, thr,
                     where=f"ldmatrix ({what})")  # [jobs, 32, 8]: the row each lane addressed
    src = (8 * np.arange(4)[None, :] + GROUP[:, None])[:, :, None]  # [32, 4, 1]
    col = (2 * TIG[:, None, None] + np.arange(2))  # [32, 1, 2]
    return rows[:, src, col]


def mma_16816(d, a, b):
    """mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}: d [jobs, 32, 4] += a b, a [jobs,
    32, 4, 2] (registers a0..a3 of two elements), b [jobs, 32, 2, 2] (b0, b1), with the
    PTX ISA's fragment layouts: a_i element e at row g + 8 (i % 2), column 2t + e + 8 (i //
    2); b_i element e at k = 2t + e + 8 i, n = g; d_i at row g + 8 (i // 2), column 2t +
    i % 2 (g = groupID, t = threadID_in_group)."""
    jobs = d.shape[0]
    A, B, C = np.zeros((jobs, 16, 16)), np.zeros((jobs, 16, 8)), np.zeros((jobs, 16, 8))
    seen_a, seen_b = np.zeros((16, 16), int), np.zeros((16, 8), int)
    for i in range(4):
        for e in range(2):
            A[:, GROUP + 8 * (i % 2), 2 * TIG + e + 8 * (i // 2)] = a[:, :, i, e]
            seen_a[GROUP + 8 * (i % 2), 2 * TIG + e + 8 * (i // 2)] += 1
    for i in range(2):
        for e in range(2):
            B[:, 2 * TIG + e + 8 * i, GROUP] = b[:, :, i, e]
            seen_b[2 * TIG + e + 8 * i, GROUP] += 1
    for i in range(4):
        C[:, GROUP + 8 * (i // 2), 2 * TIG + i % 2] = d[:, :, i]
    assert (seen_a == 1).all() and (seen_b == 1).all(), "the fragment layouts must tile"
    D = A @ B + C
    return np.stack([D[:, GROUP + 8 * (i // 2), 2 * TIG + i % 2] for i in range(4)], axis=2)


def tile_dot_mma(NT, ws, r_pad, xs, K, ld, out, scratch, ctx):
    m_tiles, r_tiles, k_steps = NT // 16, r_pad // 16, K // 16
    splits = mma_splits(m_tiles * r_tiles, WARPS)
    cover("mma: split-K" if splits > 1 else "mma: one k range per tile")
    if m_tiles * r_tiles > WARPS:
        cover("mma: several jobs per warp")
    if m_tiles > 1:
        cover(f"mma: {NT} rows a tile")
    # `for (job = warp; job < m_tiles * r_tiles * splits; job += warps)`, every job side by
    # side as in tile_dot; the k loop runs in step over the jobs, inactive where a job's
    # range ended
    job = np.arange(m_tiles * r_tiles * splits, dtype=np.int64)
    tile, sp, warp = job // splits, job % splits, job % WARPS
    mt, rt = (tile % m_tiles, tile // m_tiles) if mut("mma_tile_order") else \
        (tile // r_tiles, tile % r_tiles)
    ks_begin, ks_end = sp * k_steps // splits, (sp + 1) * k_steps // splits
    if ((ks_end - ks_begin) % 2).any():
        cover("mma: an odd number of k steps")
    # lane l's row of xs (a) and of the tile's 16 rows of ws (b) for ldmatrix
    if mut("mma_a_lane_map"):
        a_off = (LANES % 8 + 8 * (LANES // 16)) * ld + ((LANES // 8) % 2) * 8
    else:
        a_off = (LANES % 16) * ld + (LANES // 16) * 8
    if mut("mma_b_lane_map"):
        b_off = (LANES % 16) * ld + (LANES // 16) * 8
    else:
        b_off = (8 * (LANES // 16) + LANES % 8) * ld + ((LANES // 8) % 2) * 8
    row_stride = K if mut("mma_b_pointer") else ld
    c = np.zeros((2, 2, job.size, 32, 4))  # [k step parity][column half][job][lane][reg]
    for it in range(int((ks_end - ks_begin).max())):
        ks = ks_begin + it
        on = ks < ks_end
        ks = ks[on]
        a_rows = 0 if mut("mma_a_row_tile") else mt[on] * 16 * ld
        a = ldmatrix_x4(xs, np.asarray(a_rows)[..., None] + a_off[None, :] + ks[:, None] * 16,
                        warp[on], ctx, "a = xs")
        b = ldmatrix_x4(ws, (rt[on] * 16 * row_stride)[:, None] + b_off[None, :]
                        + ks[:, None] * 16, warp[on], ctx, "b = ws")
        par = it % 2  # pairs of steps from the range's start; a last odd one takes c[0]
        for h in range(2):
            c[par, h, on] = mma_16816(c[par, h, on], a, b[:, :, 2 * h:2 * h + 2])
    # the job's tile: row g + 8 (i // 2), column 8 h + 2t + i % 2
    tot = c[0] + c[1]  # [2 halves, jobs, 32, 4]
    thr = warp[:, None] * 32 + LANES[None, :]
    for h in range(2):
        for i in range(4):
            elem = (GROUP + 8 * (i // 2)) * 16 + 8 * h + 2 * TIG + i % 2
            scratch.write(job[:, None] * 256 + elem[None, :], tot[h, :, :, i], ctx, thr,
                          where="tile_dot_mma scratch")
    ctx.syncthreads()
    idx = np.arange(NT * r_pad, dtype=np.int64)
    n, r = idx // r_pad, idx % r_pad
    sps = np.arange(splits)
    tile_of = (n // 16) * r_tiles + r // 16
    slot = sps * (m_tiles * r_tiles) + tile_of[:, None] if mut("mma_split_slot") else \
        tile_of[:, None] * splits + sps  # job tile * splits + sp
    t = idx % BLOCK_DIM
    part = scratch.read(slot * 256 + ((n % 16) * 16 + r % 16)[:, None], ctx, t[:, None],
                        where="tile_dot_mma split sum")
    v = np.zeros(idx.size)
    for s in range(splits):
        v += part[:, s]
    out.write(idx, v, ctx, t, where="tile_dot_mma out")


# --------------------------------------------------------------------------------------
# persistent.cuh: the kernels (generators that yield at each barrier: the grid barrier's
# target, or CLUSTER_ARRIVE / CLUSTER_WAIT / CLUSTER_SYNC)
# --------------------------------------------------------------------------------------
class Params:
    FIELDS = ("T N H units group_rows reverse activation xp w_hh b_hh h0 c0 y cache c_state dy "
              "dh dc dg_ih dg_hh barrier xs_tiles async_exchange dg16").split()

    def __init__(self, **kw):
        for f in self.FIELDS:
            setattr(self, f, None)
        self.activation = 0
        self.xs_tiles = 1
        self.async_exchange = False
        for k, v in kw.items():
            assert k in self.FIELDS, k
            setattr(self, k, v)


# what a cluster kernel yields: cluster_arrive(), cluster_wait(), cluster_sync() (both)
CLUSTER_ARRIVE, CLUSTER_WAIT, CLUSTER_SYNC = "cluster_arrive", "cluster_wait", "cluster_sync"
GRID_ARRIVE = "grid_arrive"  # grid_arrive; grid_wait is the int target that follows
# the async exchange (sync.cuh): (MBAR_ARRIVE, turn, bytes) is thread 0's
# mbar_arrive_expect on this block's mbarrier of that turn; (MBAR_WAIT, turn, parity) is
# every thread's mbar_wait on it
MBAR_ARRIVE, MBAR_WAIT = "mbar_arrive", "mbar_wait"


class MBarrier:
    """An mbarrier with one arrival a phase (mbar_init(bar, 1)): its phase count, the
    arrivals still pending and the transaction bytes still expected in the current phase
    (negative while st.async bytes land before the arrival that expects them)."""

    def __init__(self):
        self.init, self.phase, self.pending, self.tx = False, 0, 1, 0

    def complete_if_done(self):
        if self.pending == 0 and self.tx == 0:
            self.phase += 1
            self.pending = 1

    def arrive_expect(self, nbytes):
        if not self.init:
            finding("async exchange: an arrival on an uninitialised mbarrier")
        self.tx += nbytes
        self.pending -= 1
        if self.pending < 0:
            finding("async exchange: two arrivals in one phase of a one-arrival mbarrier")
        self.complete_if_done()

    def complete_tx(self, nbytes):
        if not self.init:
            finding("async exchange: st.async completes on an uninitialised mbarrier")
        self.tx -= nbytes
        self.complete_if_done()


def mbar_init(ctx):
    """turn_mbarriers: thread 0 initialises this block's two mbarriers, one a turn."""
    if not mut("mbar_no_init"):
        for bar in ctx.mbar:
            bar.init = True


def st_async(ptr, r, ctx, off, val, thr, turn, size, where):
    """st_async(dst, v, bar, r) for each value: the store into block r's shared memory (as
    peer_shared's), completing `size` bytes a value on that block's mbarrier of `turn`."""
    peer_shared(ptr, r, ctx).write(off, val, ctx, thr, where=where)
    ctx.peers[r].mbar[turn].complete_tx(int(np.asarray(off).size) * size)


@dataclasses.dataclass(frozen=True)
class BlockWork:
    rank: int
    group_blocks: int
    n_begin: int
    rows: int
    u0: int
    here: int


def block_work(cluster, p, ctx):
    """block_work<kCluster>: the units [u0, u0 + here) of the group's batch rows [n_begin,
    n_begin + rows); the grid is one group, a cluster launch a group per cluster
    (cluster_rank() = ctx.rank, cluster_blocks() = ctx.group_blocks, cluster_index() =
    ctx.group)."""
    if cluster:
        rank, group_blocks = ctx.rank, ctx.group_blocks
        n_begin = ctx.group * p.group_rows
        rows = p.group_rows if mut("cluster_rows_unclamped") else \
            min(p.N - n_begin, p.group_rows)
    else:
        rank, group_blocks, n_begin, rows = ctx.block, ctx.grid, 0, p.N
    u0 = rank * p.units
    here = p.units if mut("here_is_U") else min(p.H - u0, p.units)
    return BlockWork(rank, group_blocks, n_begin, rows, u0, here)


def peer_shared(ptr, r, ctx):
    """peer_shared(p, r): *p (in this block's shared memory) in the shared memory of the
    cluster's block r. Mapping a peer's memory is legal once the peer is known to have
    started (a cluster_sync passed) and while it has not exited."""
    if ctx.peers is None:
        raise Finding("peer_shared outside a cluster launch (it traps)")
    if not 0 <= r < len(ctx.peers):
        raise Finding(f"peer_shared: rank {r} outside the cluster of {len(ctx.peers)} blocks")
    assert ptr.buf is ctx.smem
    peer = ctx.peers[r]
    if peer is not ctx:
        if ctx.epoch == 0:
            finding("DSMEM: a peer's shared memory accessed before the first cluster_sync "
                    "(the peer may not have started, or may zero it after)")
        if peer.exited:
            finding("DSMEM: an access to the shared memory of a block that has exited")
    return Ptr(peer.smem, ptr.off, ptr.size)


def for_each_peer(w):
    """for_each_peer's order: every rank of the cluster from this block's own on."""
    first = 1 if mut("cluster_no_self_store") else 0
    return [(w.rank + i) % w.group_blocks for i in range(first, w.group_blocks)]


def turn_index(s):
    """The cluster variant's turn of xs for step s: s & 1."""
    return 0 if mut("cluster_one_turn") else s & 1


def prefetch_xp(p, G, t, n_begin, rows, u0, here):
    """prefetch_xp: prefetch.global.L2 of every line of xp[t][n][g * H + u0, ... + here) for
    the group's rows and every gate (the launch asks for it where xp outgrows L2; here at
    every step); a hint, so only its addresses are checked: its first and last inside xp."""
    idx = np.arange(rows * G, dtype=np.int64)
    n, g = n_begin + idx // G, idx % G
    first = (t * p.N + n) * G * p.H + g * p.H + u0
    for addr in (first, first + here - 1):
        if addr.size and (addr.min() < 0 or addr.max() >= p.xp.buf.v.size - p.xp.off):
            raise Finding(f"prefetch_xp out of bounds of xp: [{addr.min()}, {addr.max()}]")
    cover("forward: xp prefetched into L2")


def persistent_forward(Cell, NT, RPW, dt, cluster, p, ctx):
    G = Cell.kGates
    mma = dt.mma
    assert not mma or (NT % 16 == 0 and RPW == 16), "the MMA tile is whole 16 x 16 tiles"
    N, H = p.N, p.H
    U, K = p.units, H
    ld = mma_ld(K) if mma else ffma_ld(K)
    w = block_work(cluster, p, ctx)
    u0, n_begin, rows, here = w.u0, w.n_begin, w.rows, w.here
    nb = 0 if mut("cluster_no_n_begin") else n_begin  # the cell's row offset
    r_pad = round_up(G * U, RPW) if not mut("r_pad_unrounded") else G * U
    x_rows = xs_rows(cluster, NT, p.group_rows, p.xs_tiles)
    turn = xs_rows(cluster, NT, p.group_rows) // 2  # the cluster variant's
    lay = smem_layout(x_rows, NT, r_pad, ld, scratch_bytes(NT, RPW, mma, dt.acc, r_pad),
                      dt.scalar, dt.scalar, dt.acc)
    smem = ctx.shared_memory()
    ws, xs = Ptr(smem, 0, dt.scalar), Ptr(smem, lay.xs_offset, dt.scalar)
    out = Ptr(smem, lay.out_offset, dt.acc)
    scratch = Ptr(smem, lay.scratch_offset, 4 if mma else dt.acc)  # float* for tile_dot_mma

    idx = np.arange(r_pad * ld, dtype=np.int64)
    thr = idx % BLOCK_DIM
    r, k = idx // ld, idx % ld
    g, j = r // U, r % U
    valid = (g < G) & (j < here)
    if not mut("mma_ws_no_k_pad"):
        valid &= k < K
    val = np.zeros(idx.size)
    val[valid] = p.w_hh.read(((g * H + (0 if mut("fwd_ws_no_u0") else u0) + j) * H + k)[valid],
                             ctx, thr[valid], where="forward Ws load")
    ws.write(idx, val, ctx, thr, where="forward Ws store")
    if cluster:
        # batched_copy of both turns: turn 0 h0's rows of the group, zero elsewhere;
        # element e is thread e % blockDim's
        idx = np.arange((1 if mut("cluster_fill_one_turn") else 2) * turn * ld, dtype=np.int64)
        thr = idx % BLOCK_DIM
        nl, k = idx // ld, idx % ld
        load = (nl < rows) & (k < K)
        val = np.zeros(idx.size)
        val[load] = p.h0.read(((n_begin + nl) * H + k)[load], ctx, thr[load],
                              where="cluster forward h0 into turn 0")
        xs.write(idx, val, ctx, thr, where="cluster forward turns of xs")
    # the async exchange: 4- and 8-byte h only
    async_x = cluster and p.async_exchange and dt.scalar in (4, 8)
    if async_x:
        mbar_init(ctx)

    # this thread's first item of a step (tile 0, idx = threadIdx.x), its inputs loaded ahead
    ahead_thr = np.arange(min(min(rows, NT) * here, BLOCK_DIM), dtype=np.int64)
    if min(rows, NT) * here > BLOCK_DIM:
        cover("forward: tile 0 has more items than threads")
    ahead_n, ahead_u = nb + ahead_thr // here, u0 + ahead_thr % here
    ahead = Cell.load(p, 0, time_index(0, p.T, p.reverse), time_index(-1, p.T, p.reverse),
                      ahead_n, ahead_u, ctx, ahead_thr)
    if cluster:
        if not mut("cluster_no_pre_sync"):
            yield CLUSTER_SYNC
    else:
        ctx.syncthreads()

    for s in range(p.T):
        t, tp = time_index(s, p.T, p.reverse), time_index(s - 1, p.T, p.reverse)
        h_prev = p.h0 if s == 0 else p.y + tp * N * H
        nxt = xs + turn_index(s + 1) * turn * ld  # the cluster variant's next turn
        pipelined, pending = start_pipeline(cluster, p, NT, h_prev, N, K, ld, xs, ctx,
                                            dt.scalar)
        for i, n0 in enumerate(range(0, rows, NT)):
            if cluster:  # h_{t-1} of the tile's rows
                xt = xs + (turn_index(s) * turn + n0) * ld
            elif pipelined:
                xt = staged_tile(NT, h_prev, n0, i, rows, N, K, ld, xs, ctx, dt.scalar, pending)
                if not mut("async_no_sync"):
                    ctx.syncthreads()
            else:
                stage_rows(NT, h_prev, n0, N, K, ld, xs, ctx, dt.scalar)
                xt = xs
                ctx.syncthreads()
            if (mut("cluster_early_arrive") if cluster else mut("grid_early_arrive")) and \
                    s + 1 < p.T and n0 + NT >= rows:
                # before the last tile's pointwise loop and stores
                yield CLUSTER_ARRIVE if cluster else GRID_ARRIVE
            if n0 > 0:  # a later tile's first item per thread, loaded before the dot
                cur_thr = np.arange(min(min(NT, rows - n0) * here, BLOCK_DIM), dtype=np.int64)
                row0 = 0 if mut("tile_ahead_row") else n0  # tile 0's rows, not this tile's
                ahead = Cell.load(p, s, t, tp, nb + row0 + cur_thr // here,
                                  u0 + cur_thr % here, ctx, cur_thr)
                cover("forward: a later tile's inputs loaded before its dot")
            if mma:
                tile_dot_mma(NT, ws, r_pad, xt, round_up(K, 16), ld, out, scratch, ctx)
            else:
                tile_dot(NT, RPW, ws, r_pad, xt, ld, out, scratch, ctx)
            if not mut("no_tile_sync"):
                ctx.syncthreads()
            idx = np.arange(NT * here, dtype=np.int64)
            thr = idx % BLOCK_DIM
            nl, j = idx // here, idx % here
            keep = n0 + nl < rows  # `continue` for rows past the group's
            nl, j, thr = nl[keep], j[keep], thr[keep]
            hh = out.read(nl * r_pad + gate_offsets(G, U) + j, ctx, thr, where="forward out")
            hp = xt.read(nl * ld + u0 + j, ctx, thr, where="forward h_prev from xs")
            # items run side by side: each thread's first item takes `ahead`
            first = idx[keep] < BLOCK_DIM
            inp = np.zeros((Cell.kLoads, thr.size))
            if (~first).any():
                inp[:, ~first] = Cell.load(p, s, t, tp, nb + n0 + nl[~first], u0 + j[~first],
                                           ctx, thr[~first])
            if first.any():
                assert ahead.shape[1] == first.sum()  # the same threads' registers
                inp[:, first] = ahead
            h = Cell.forward(p, s, t, tp, nb + n0 + nl, u0 + j, hh, hp, inp, ctx, thr)
            if cluster and s + 1 < p.T:  # into every block's next turn, its own included
                col = j if mut("cluster_h_no_u0") else u0 + j
                row = nl if mut("cluster_h_no_n0") else n0 + nl
                for rk in for_each_peer(w):
                    if async_x:
                        st_async(nxt, rk, ctx, row * ld + col, h, thr, turn_index(s + 1),
                                 dt.scalar, where="cluster forward h into a turn (st.async)")
                    else:
                        peer_shared(nxt, rk, ctx).write(row * ld + col, h, ctx, thr,
                                                        where="cluster forward h into a turn")
            if n0 + NT < rows and not mut("no_next_tile_sync"):
                ctx.syncthreads()
        if s + 2 < p.T + mut("prefetch_past_t"):  # step s + 2's xp into L2 (bounds only)
            prefetch_xp(p, G, time_index(s + 2, p.T, p.reverse), nb, rows, u0, here)
        # the async exchange's mbarrier: the next turn's, in its (s / 2)-th phase
        bar = turn_index(s if mut("mbar_fwd_this_turn") else s + 1)
        if s + 1 < p.T and async_x:
            ctx.syncthreads()
            nbytes = (rows * H - mut("mbar_bytes_short")) * dt.scalar
            yield (MBAR_ARRIVE, bar, nbytes)
            ahead = Cell.load(p, s + 1, time_index(s + 1, p.T, p.reverse), t, ahead_n, ahead_u,
                              ctx, ahead_thr)
            yield (MBAR_WAIT, bar, (s & 1) if mut("mbar_fwd_parity") else (s >> 1) & 1)
            cover("cluster forward: the async exchange")
        elif s + 1 < p.T:
            # loads between the arrival and the wait
            if not mut("cluster_early_arrive" if cluster else "grid_early_arrive"):
                yield CLUSTER_ARRIVE if cluster else GRID_ARRIVE
            if mut("ahead_this_step"):  # loads step s's inputs again, not step s + 1's
                ahead = Cell.load(p, s, t, tp, ahead_n, ahead_u, ctx, ahead_thr)
            else:
                ahead = Cell.load(p, s + 1, time_index(s + 1, p.T, p.reverse), t, ahead_n,
                                  ahead_u, ctx, ahead_thr)
            if cluster:
                yield CLUSTER_WAIT
            else:
                yield (s + 1) * ctx.grid - mut("barrier_target_low")
    if cluster:  # no block leaves while a peer may still address its shared memory
        yield CLUSTER_SYNC


# --------------------------------------------------------------------------------------
# persistent.cuh: the register tile (persistent_forward_reg), lane by lane
# --------------------------------------------------------------------------------------
REG_MAX_N8, REG_MAX_CHUNKS, REG_SCRATCH_LD = 4, 4, 40


def reg_tile_fits(N, w_rows, H):
    chunks = -(-H // 32)
    return 1 <= N <= 16 and w_rows <= 8 * REG_MAX_N8 and H % 8 == 0 and \
        -(-chunks // WARPS) <= REG_MAX_CHUNKS


def reg_scratch_bytes():
    return WARPS * 16 * REG_SCRATCH_LD * 4


def load8_cg(src, off, vec, valid, ctx, thr, x_size, where):
    """load8_cg: the 8 values at src + off (element offsets [threads]), zeros where not
    valid: [threads, 8]. vec: one 16-byte load, whose address must be 16-byte aligned."""
    out = np.zeros(off.shape + (8,))
    if not valid.any():
        return out
    o = off[valid]
    if vec and ((src.off + o) * x_size % 16).any():
        finding(f"register tile: a 16-byte load of h_{{t-1}} not 16-byte aligned ({where})")
    out[valid] = src.read(o[:, None] + np.arange(8), ctx, thr[valid][:, None],
                          cg=not mut("reg_plain_load"), where=where)
    return out


def persistent_forward_reg(Cell, dt, p, ctx):
    """persistent_forward_reg: W's slice as b fragments in each lane's registers, h_{t-1}
    loaded from L2 into a fragments (8 consecutive columns a lane and chunk, the k order
    permuted alike in both), every warp's partial sums through shared memory."""
    G = Cell.kGates
    N, H, U = p.N, p.H, p.units
    w = block_work(False, p, ctx)
    u0, here = w.u0, w.here
    scratch = Ptr(ctx.shared_memory(), 0, 4)
    thr = np.arange(BLOCK_DIM, dtype=np.int64)
    warp, lane = thr // 32, thr % 32
    gid, tig = lane // 4, lane % 4
    n8 = (G * U + 7) // 8
    chunks = -(-H // 32)
    ch0 = warp * chunks // WARPS
    my = (warp + 1) * chunks // WARPS - ch0 + mut("reg_chunk_split")
    if (my == 0).any():
        cover("register tile: warps without chunks")
    if (my > 1).any():
        cover("register tile: several chunks a warp")
    if H % 32:
        cover("register tile: a chunk zero-padded past H")
    # W's fragments [threads, chunk, n-tile, 8 values]
    wb = np.zeros((BLOCK_DIM, REG_MAX_CHUNKS, REG_MAX_N8, 8))
    for c in range(REG_MAX_CHUNKS):
        for nt in range(REG_MAX_N8):
            r = nt * 8 + gid
            g, j = r // U, r % U
            k = (ch0 + c) * 32 + 8 * tig
            valid = (c < my) & (nt < n8) & (g < G) & (j < here) & (k < H)
            if valid.any():
                row = g * H + (0 if mut("reg_w_no_u0") else u0) + j
                wb[valid, c, nt] = p.w_hh.read(
                    ((row * H + k)[valid])[:, None] + np.arange(8), ctx, thr[valid][:, None],
                    where="register tile: W's fragments")
    items = N * here
    if items > BLOCK_DIM:
        cover("register tile: more items than threads")
    ahead_thr = np.arange(min(items, BLOCK_DIM), dtype=np.int64)
    ahead_n, ahead_u = ahead_thr // here, u0 + ahead_thr % here
    ahead = Cell.load(p, 0, time_index(0, p.T, p.reverse), time_index(-1, p.T, p.reverse),
                      ahead_n, ahead_u, ctx, ahead_thr)
    own_h = None
    if Cell.kNeedsHPrev:
        own_h = p.h0.read(ahead_n * H + ahead_u, ctx, ahead_thr, where="register tile: own h0")
    for s in range(p.T):
        t, tp = time_index(s, p.T, p.reverse), time_index(s - 1, p.T, p.reverse)
        h_prev = p.h0 if s == 0 else p.y + tp * N * H
        vec = (h_prev.off * dt.scalar) % 16 == 0 or mut("reg_vec_unaligned")
        if not vec:
            cover("register tile: h_{t-1} by 2-byte loads (unaligned)")
        a = np.zeros((BLOCK_DIM, REG_MAX_CHUNKS, 2, 8))  # [thread, chunk, row g / g + 8, 8]
        for c in range(REG_MAX_CHUNKS):
            k = (ch0 + c) * 32 + 8 * tig
            in_k = (c < my) & (k < H)
            for half in range(2):
                row = gid + 8 * half
                a[:, c, half] = load8_cg(h_prev, row * H + k, vec, in_k & (row < N), ctx, thr,
                                         dt.scalar, "register tile: h_{t-1}")
        A = a.reshape(WARPS, 32, REG_MAX_CHUNKS, 2, 8)
        Wb = wb.reshape(WARPS, 32, REG_MAX_CHUNKS, REG_MAX_N8, 8)
        acc = np.zeros((2, WARPS, 32, REG_MAX_N8, 4))  # k steps 0 and 1 summed apart
        my_w = my[::32]
        for c in range(REG_MAX_CHUNKS):
            on = my_w > c  # warp-uniform
            if not on.any():
                continue
            for step in range(2):
                # step 0: columns 8 tig + {0, 1} (a0 / a1, b0) and + {4, 5} (a2 / a3, b1); step 1:
                # + {2, 3} and + {6, 7}
                e0 = 2 * step
                lo, hi = (slice(e0, e0 + 2), slice(e0 + 4, e0 + 6))
                if mut("reg_a_perm"):
                    lo, hi = (slice(4 * step, 4 * step + 2), slice(4 * step + 2, 4 * step + 4))
                af = np.stack([A[on, :, c, 0, lo], A[on, :, c, 1, lo], A[on, :, c, 0, hi],
                               A[on, :, c, 1, hi]], axis=2)
                for nt in range(n8):
                    bf = np.stack([Wb[on, :, c, nt, e0:e0 + 2], Wb[on, :, c, nt, e0 + 4:e0 + 6]],
                                  axis=2)
                    acc[step, on, :, nt] = mma_16816(acc[step, on, :, nt], af, bf)
        # the partial sums (the two k steps' added): rows gid and gid + 8, columns 8 nt + 2 tig
        # + {0, 1}
        acc = (acc[0] if mut("reg_one_step_sum") else acc[0] + acc[1]).reshape(
            BLOCK_DIM, REG_MAX_N8, 4)
        writes = np.ones(BLOCK_DIM, bool)
        if mut("reg_idle_warp_silent"):
            writes = my > 0
        hi_row = 0 if mut("reg_hi_rows") else 8
        for nt in range(n8):
            col = nt * 8 + 2 * tig
            for i in range(4):
                row = gid + (hi_row if i >= 2 else 0)
                addr = (warp * 16 + row) * REG_SCRATCH_LD + col + i % 2
                scratch.write(addr[writes], acc[writes, nt, i], ctx, thr[writes],
                              where="register tile: partial sums")
        if not mut("reg_no_sync"):
            ctx.syncthreads()
        idx = np.arange(items, dtype=np.int64)
        it_thr = idx % BLOCK_DIM
        nl, j = idx // here, idx % here
        hh = np.zeros((G, items))
        for g in range(G):
            for wp in range(WARPS):  # a fixed order
                hh[g] += scratch.read((wp * 16 + nl) * REG_SCRATCH_LD + g * U + j, ctx, it_thr,
                                      where="register tile: the warps' sum")
        first = idx < BLOCK_DIM
        inp = np.zeros((Cell.kLoads, items))
        inp[:, first] = ahead
        if (~first).any():
            inp[:, ~first] = Cell.load(p, s, t, tp, nl[~first], u0 + j[~first], ctx,
                                       it_thr[~first])
        hp = np.zeros(items)
        if Cell.kNeedsHPrev:
            hp[first] = own_h
            if (~first).any():
                hp[~first] = h_prev.read(nl[~first] * H + u0 + j[~first], ctx, it_thr[~first],
                                         cg=True, where="register tile: h_{t-1} of an item")
        h = Cell.forward(p, s, t, tp, nl, u0 + j, hh, hp, inp, ctx, it_thr)
        if Cell.kNeedsHPrev and not mut("reg_own_h_stale"):
            own_h = h[first]
        if s + 2 < p.T:  # step s + 2's xp into L2, by warps 1 on (bounds only)
            prefetch_xp(p, G, time_index(s + 2, p.T, p.reverse), 0, N, u0, here)
        if s + 1 < p.T:
            yield GRID_ARRIVE
            ahead = Cell.load(p, s + 1, time_index(s + 1, p.T, p.reverse), t, ahead_n, ahead_u,
                              ctx, ahead_thr)
            yield (s + 1) * ctx.grid


# --------------------------------------------------------------------------------------
# fused_step.cuh: the per-step path's fused 16-bit forward (RNNFAST_STEP_FUSED=1), one
# launch a step, lane by lane
# --------------------------------------------------------------------------------------
FUSED_ROWS = FUSED_COLS = FUSED_K = 64
FUSED_LD = FUSED_K + 8
FUSED_STAGES = 4


def fused_units(G):
    return FUSED_COLS // G


def fused_smem_bytes(dt):
    return FUSED_STAGES * (FUSED_ROWS + FUSED_COLS) * FUSED_LD * dt.scalar  # sa, then sb


def fused_tile_sums(dt, K, src_a, src_b, ctx, what_a, what_b):
    """fused_tile_sums: the tile's 64 x 64 sums over k < K of A's rows by B's rows, staged by
    cp.async groups (4 buffers, 3 in flight), ldmatrix and mma.sync, stored as floats over
    the staging buffers; returns that Ptr (out[r * 68 + c]). src_a(r, k) / src_b(c, k) for
    arrays of rows and 16-byte vectors' first columns: (Ptr, element offsets, valid)."""
    x = dt.scalar
    S = FUSED_STAGES
    smem = ctx.shared_memory()
    stage_elems = FUSED_ROWS * FUSED_LD
    sa, sb = Ptr(smem, 0, x), Ptr(smem, S * stage_elems * x, x)
    vecs = FUSED_K // 8
    groups = []  # this block's committed cp.async groups, oldest first: [(ptr, idx, val, thr)]
    if K % FUSED_K:
        cover("fused step: a last stage zero-padded past K")

    def stage(buf, k0):
        """Columns [k0, k0 + 64) of both operands into buffer buf, one committed group: the
        sources read now, the destinations written now (a race with any other access in
        this __syncthreads interval) and unreadable until the group's wait."""
        e = np.arange((FUSED_ROWS + FUSED_COLS) * vecs, dtype=np.int64)
        thr = e % BLOCK_DIM
        w = e >= FUSED_ROWS * vecs
        ee = np.where(w, e - FUSED_ROWS * vecs, e)
        r, c = ee // vecs, (ee % vecs) * 8
        k = k0 + c
        val = np.zeros((e.size, 8))
        for part, src, what in ((~w, src_a, what_a), (w, src_b, what_b)):
            ptr, off, valid = src(r, k)
            on = part & valid
            if on.any():
                if ((ptr.addr(off[on]) * x) % 16).any():
                    finding(f"fused step: a cp.async source of {what} not 16-byte aligned")
                val[on] = ptr.read(off[on][:, None] + np.arange(8), ctx, thr[on][:, None],
                                   cg=True, where=f"fused step: cp.async of {what}")
        dst = (0 if mut("fused_stage_one_buffer") else buf * stage_elems) + r * FUSED_LD + c
        idx = (dst[:, None] + np.arange(8)).reshape(-1)
        t8 = np.repeat(thr, 8)
        v8 = val.reshape(-1)
        group = []
        for ptr, part in ((sa, ~w), (sb, w)):
            sel = np.repeat(part, 8)
            ptr.write(idx[sel], v8[sel], ctx, t8[sel], where="fused step: cp.async issued")
            smem.init[ptr.addr(idx[sel])] = False
            group.append((ptr, idx[sel], v8[sel], t8[sel]))
        groups.append(group)

    def wait(n):
        """cp.async.wait_group n: every group but the n committed last has landed."""
        while len(groups) > n:
            for ptr, idx, val, thr in groups.pop(0):
                ptr.write(idx, val, ctx, thr, where="fused step: cp.async landed")

    warp = np.arange(WARPS, dtype=np.int64)
    wm, wn = warp // 4, warp % 4
    acc = np.zeros((2, 2, WARPS, 32, 4))  # [16-row tile][8-column half][warp][lane][reg]
    stages = -(-K // FUSED_K)
    if stages > 1:
        cover("fused step: several stages")
    if stages > S:
        cover("fused step: more stages than buffers")
    for i in range(S - 1):
        if i < stages:
            stage(i, i * FUSED_K)
        else:
            groups.append([])  # an empty group keeps the count
    for kc in range(stages):
        wait(S - 1 if mut("fused_wait_one_short") else S - 2)
        if not mut("fused_no_top_sync"):
            ctx.syncthreads()
        nxt = kc + S - 1
        if nxt < stages:
            stage(nxt % S, nxt * FUSED_K)
        else:
            groups.append([])
        buf = kc % S
        for ks in range(FUSED_K // 16):
            b_off = (buf * stage_elems + (16 * wn[:, None] + 8 * (LANES[None, :] // 16)
                                          + LANES[None, :] % 8) * FUSED_LD
                     + 16 * ks + ((LANES[None, :] // 8) % 2) * 8)
            b = ldmatrix_x4(sb, b_off, warp, ctx, f"fused step: b = {what_b}")
            for mt in range(2):
                a_off = (buf * stage_elems + (32 * wm[:, None] + 16 * mt + LANES[None, :] % 16)
                         * FUSED_LD + 16 * ks + (LANES[None, :] // 16) * 8)
                a = ldmatrix_x4(sa, a_off, warp, ctx, f"fused step: a = {what_a}")
                for h in range(2):
                    acc[mt, h] = mma_16816(acc[mt, h], a, b[:, :, 2 * h:2 * h + 2])
    wait(0)
    if groups:
        finding("fused step: cp.async groups left pending")
    if not mut("fused_no_trailing_sync"):
        ctx.syncthreads()
    # the sums over sa: row 32 wm + 16 mt + g (+ 8), column 16 wn + 8 h + 2 t + {0, 1}
    out = Ptr(smem, 0, 4)
    thr = warp[:, None] * 32 + LANES[None, :]
    for mt in range(2):
        for h in range(2):
            for i in range(4):
                row = 32 * wm[:, None] + 16 * mt + GROUP[None, :] + 8 * (i // 2)
                col = 16 * wn[:, None] + 8 * h + 2 * TIG[None, :] + i % 2
                out.write(row * FUSED_LD_OUT + col, acc[mt, h, :, :, i], ctx, thr,
                          where="fused step: the sums")
    ctx.syncthreads()
    return out


FUSED_LD_OUT = FUSED_COLS + 4


def fused_items(n0, u0, units, N, H):
    """The epilogue's items (row nl, unit j) of a block, idx = nl * units + j thread idx %
    256's, those inside N and H: (nl, j, n, u, thread)."""
    idx = np.arange(FUSED_ROWS * units, dtype=np.int64)
    nl, j = idx // units, idx % units
    live = (n0 + nl < N) & (u0 + j < H)
    idx, nl, j = idx[live], nl[live], j[live]
    return nl, j, n0 + nl, u0 + j, idx % BLOCK_DIM


def fused_step_forward(Cell, dt, p, ctx, s):
    """fused_step_forward at step s, block ctx.block of the launch's (x, y) grid flattened
    x-fastest: batch rows [64 bx, 64 bx + 64) by units [U by, U by + U)."""
    G = Cell.kGates
    U = fused_units(G)
    N, H = p.N, p.H
    K = H
    gx = -(-N // FUSED_ROWS)
    bx, by = ctx.block % gx, ctx.block // gx
    n0, u0 = bx * FUSED_ROWS, by * U
    t, tp = time_index(s, p.T, p.reverse), time_index(s - 1, p.T, p.reverse)
    h_prev = p.h0 if s == 0 else p.y + tp * N * H
    if N % FUSED_ROWS:
        cover("fused step: rows past N zero")
    if H % U:
        cover("fused step: units past H")

    def src_a(r, k):
        return h_prev, (n0 + r) * H + k, (n0 + r < N) & (k < K)

    def src_b(r, k):
        g, j = r // U, r % U
        gate = 0 if mut("fused_w_gate_row") else H
        return p.w_hh, (g * gate + u0 + j) * H + k, (g < G) & (u0 + j < H) & (k < K)

    out = fused_tile_sums(dt, K, src_a, src_b, ctx, "h_{t-1}", "W_hh")
    nl, j, n, u, it_thr = fused_items(n0, u0, U, N, H)
    if n.size:
        hh = np.zeros((G, n.size))
        for g in range(G):
            hh[g] = out.read(nl * FUSED_LD_OUT + g * U + j, ctx, it_thr,
                             where="fused step: gates")
        inp = Cell.load(p, s, t, tp, n, u, ctx, it_thr)
        hp = np.zeros(n.size)
        if Cell.kNeedsHPrev:
            hp = h_prev.read(n * H + u, ctx, it_thr, where="fused step: h_{t-1} of an item")
        Cell.forward(p, s, t, tp, n, u, hh, hp, inp, ctx, it_thr)
    if False:  # a generator, as run_grid's kernels are (no barrier inside a step's launch)
        yield


def fused_step_backward(Cell, dt, p, ctx, s):
    """fused_step_backward, launch s of T + 1 (s = T, ..., 0), block (bx, by) of batch rows
    [64 bx, ...) by units [64 by, ...): for s < T, dh = dg16[s & 1] W_hh (p.w_hh holding
    W_hh^T [H, G H]) into p.dh (added where Cell.kDirectDh); for s >= 1, the pointwise
    backward of step s - 1 from it, its gate gradients into dg16[(s - 1) & 1]."""
    G = Cell.kGates
    N, H = p.N, p.H
    K = G * H
    gx = -(-N // FUSED_ROWS)
    bx, by = ctx.block % gx, ctx.block // gx
    n0, u0 = bx * FUSED_ROWS, by * FUSED_COLS
    buf_of = (lambda q: 0) if mut("fused_bwd_one_buffer") else (lambda q: q & 1)
    out = None
    if s < p.T:
        dg = p.dg16 + buf_of(s) * N * K

        def src_a(r, k):
            return dg, (n0 + r) * K + k, (n0 + r < N) & (k < K)

        def src_b(c, k):
            return p.w_hh, (u0 + c) * K + k, (u0 + c < H) & (k < K)

        out = fused_tile_sums(dt, K, src_a, src_b, ctx, "dg16", "W_hh^T")
    sa = s - 1
    ta, tpa = time_index(sa, p.T, p.reverse), time_index(sa - 1, p.T, p.reverse)
    nl, j, n, u, it_thr = fused_items(n0, u0, FUSED_COLS, N, H)
    if not n.size:
        return
    if s < p.T:
        v = out.read(nl * FUSED_LD_OUT + j, ctx, it_thr, where="fused step: dh sums")
        if Cell.kDirectDh and not mut("fused_bwd_no_direct"):
            v = v + p.dh.read(n * H + u, ctx, it_thr, where="fused step: dh's direct term")
        p.dh.write(n * H + u, v, ctx, it_thr, where="fused step: dh")
    if s >= 1:
        inp = Cell.load_backward(p, sa, ta, tpa, n, u, ctx, it_thr)
        dgh = Cell.backward(p, sa, ta, tpa, n, u, inp, ctx, it_thr)
        nxt = p.dg16 + buf_of(sa) * N * K
        for g in range(G):
            nxt.write(n * K + g * H + u, dgh[g], ctx, it_thr, where="fused step: dg16")
    if False:
        yield


def launch_fused(kernel, p, units, steps, dt, bufs, seed):
    """launch_fused: kernel(p, ctx, s) launched for each s of steps, blocks of 64 batch rows
    by `units`."""
    blocks = -(-p.N // FUSED_ROWS) * -(-p.H // units)
    for s in steps:
        run_grid(lambda q, ctx, s=s: kernel(q, ctx, s), blocks, fused_smem_bytes(dt), p, bufs,
                 seed + s)


def run_fused_steps(Cell, dt, p, bufs, seed):
    """run_fused_steps: T launches (s = 0, ..., T - 1)."""
    launch_fused(lambda q, ctx, s: fused_step_forward(Cell, dt, q, ctx, s), p,
                 fused_units(Cell.kGates), range(p.T), dt, bufs, seed)


def run_fused_backward(Cell, dt, p, bufs, seed):
    """run_fused_backward: T + 1 launches (s = T, ..., 0)."""
    launch_fused(lambda q, ctx, s: fused_step_backward(Cell, dt, q, ctx, s), p, FUSED_COLS,
                 range(p.T, -1, -1), dt, bufs, seed)


def persistent_backward(Cell, NT, RPW, dt, cluster, p, ctx):
    G = Cell.kGates
    N, H = p.N, p.H
    U, K = p.units, G * H
    ld = ffma_ld(K)
    w = block_work(cluster, p, ctx)
    u0, n_begin, rows, here = w.u0, w.n_begin, w.rows, w.here
    nb = 0 if mut("cluster_no_n_begin") else n_begin  # the cell's row offset
    r_pad = round_up(U, RPW)
    x_rows = xs_rows(cluster, NT, p.group_rows, p.xs_tiles)
    turn = xs_rows(cluster, NT, p.group_rows) // 2  # the cluster variant's
    lay = smem_layout(x_rows, NT, r_pad, ld, scratch_bytes(NT, RPW, False, dt.acc, r_pad),
                      dt.scalar, dt.acc, dt.acc)
    smem = ctx.shared_memory()
    ws, xs = Ptr(smem, 0, dt.scalar), Ptr(smem, lay.xs_offset, dt.acc)
    out, scratch = Ptr(smem, lay.out_offset, dt.acc), Ptr(smem, lay.scratch_offset, dt.acc)

    idx = np.arange(r_pad * ld, dtype=np.int64)
    thr = idx % BLOCK_DIM
    q, j = idx // r_pad, idx % r_pad
    valid = j < here
    if not mut("bwd_ws_no_k_pad"):
        valid &= q < K
    val = np.zeros(idx.size)
    val[valid] = p.w_hh.read(q[valid] * H + u0 + j[valid], ctx, thr[valid],
                             where="backward Ws load")
    ws.write(q * r_pad + j if mut("bwd_ws_transposed") else j * ld + q, val, ctx, thr,
             where="backward Ws store")
    if cluster:  # both turns zero (their padding rows and columns stay so)
        idx = np.arange((1 if mut("cluster_fill_one_turn") else 2) * turn * ld, dtype=np.int64)
        xs.write(idx, 0.0, ctx, idx % BLOCK_DIM, where="cluster backward turns of xs")
    async_x = cluster and p.async_exchange  # acc_t: 4 or 8 bytes
    if async_x:
        mbar_init(ctx)
    # phase A's inputs but dh of this thread's first item (idx = threadIdx.x), loaded ahead
    ahead_thr = np.arange(min(rows * here, BLOCK_DIM), dtype=np.int64)
    ahead_n, ahead_u = nb + ahead_thr // here, u0 + ahead_thr % here
    ahead = Cell.load_backward(p, p.T - 1, time_index(p.T - 1, p.T, p.reverse),
                               time_index(p.T - 2, p.T, p.reverse), ahead_n, ahead_u, ctx,
                               ahead_thr)
    if cluster:
        if not mut("cluster_no_pre_sync"):
            yield CLUSTER_SYNC
    else:
        ctx.syncthreads()

    for s in range(p.T - 1, -1, -1):
        t, tp = time_index(s, p.T, p.reverse), time_index(s - 1, p.T, p.reverse)
        cur = xs + turn_index(s) * turn * ld  # the cluster variant's turn for this step
        idx = np.arange(rows * here, dtype=np.int64)
        first = idx < BLOCK_DIM  # idx == threadIdx.x: the values loaded ahead
        inp = np.zeros((Cell.kBackwardLoads, idx.size))
        inp[:, first] = ahead
        if (~first).any():
            cover("backward: more phase A items than threads")
            rest = idx[~first]
            inp[:, ~first] = Cell.load_backward(p, s, t, tp, nb + rest // here,
                                                u0 + rest % here, ctx, rest % BLOCK_DIM)
        thr = idx % BLOCK_DIM
        nl, u = idx // here, u0 + idx % here
        dgh = Cell.backward(p, s, t, tp, nb + nl, u, inp, ctx, thr)
        if cluster:  # dgh into every block's turn, its own included
            if mut("cluster_early_arrive") and not async_x:
                yield CLUSTER_ARRIVE  # before the stores
            for rk in for_each_peer(w):
                if async_x:
                    st_async(cur, rk, ctx, nl * ld + u + gate_offsets(G, H), dgh, thr,
                             turn_index(s), dt.acc, where="cluster backward dgh into a turn "
                             "(st.async)")
                else:
                    peer_shared(cur, rk, ctx).write(nl * ld + u + gate_offsets(G, H), dgh, ctx,
                                                    thr, where="cluster backward dgh into a turn")
            if async_x:  # this step's turn receives rows x G x H gate gradients
                nbytes = (rows * G * H - mut("mbar_bytes_short")) * dt.acc
                yield (MBAR_ARRIVE, turn_index(s), nbytes)
            elif not mut("cluster_early_arrive"):
                yield CLUSTER_ARRIVE  # the loads below need no peer's data
        elif not mut("no_bwd_barrier"):
            yield GRID_ARRIVE
        if s > 0:
            if mut("bwd_ahead_this_step"):
                ahead = Cell.load_backward(p, s, t, tp, ahead_n, ahead_u, ctx, ahead_thr)
            else:
                ahead = Cell.load_backward(p, s - 1, tp, time_index(s - 2, p.T, p.reverse),
                                           ahead_n, ahead_u, ctx, ahead_thr)
        if async_x:  # turn s & 1's ((T - 1 - s) / 2)-th phase
            yield (MBAR_WAIT, turn_index(s),
                   (s >> 1) & 1 if mut("mbar_bwd_parity") else ((p.T - 1 - s) >> 1) & 1)
            cover("cluster backward: the async exchange")
        elif cluster:
            yield CLUSTER_WAIT
        elif not mut("no_bwd_barrier"):
            yield (p.T - s) * ctx.grid - mut("barrier_target_low")
        dg = p.dg_hh + t * N * K
        pipelined, pending = start_pipeline(cluster, p, NT, dg, N, K, ld, xs, ctx, dt.acc)
        for i, n0 in enumerate(range(0, rows, NT)):
            if cluster:  # dg_hh of the tile's rows
                xt = (xs + turn_index(s + 1) * turn * ld if mut("cluster_phase_b_other_turn")
                      else cur) + n0 * ld
            elif pipelined:
                xt = staged_tile(NT, dg, n0, i, rows, N, K, ld, xs, ctx, dt.acc, pending)
                if not mut("async_no_sync"):
                    ctx.syncthreads()
            else:
                stage_rows(NT, dg, n0, N, K, ld, xs, ctx, dt.acc)
                xt = xs
                ctx.syncthreads()
            tile_dot(NT, RPW, ws, r_pad, xt, ld, out, scratch, ctx)
            if not mut("no_tile_sync"):
                ctx.syncthreads()
            idx = np.arange(NT * here, dtype=np.int64)
            thr = idx % BLOCK_DIM
            nl, j = idx // here, idx % here
            keep = n0 + nl < rows
            nl, j, thr = nl[keep], j[keep], thr[keep]
            dh_addr = (nb + n0 + nl) * H + u0 + j
            v = out.read(nl * r_pad + j, ctx, thr, where="backward out")
            if Cell.kDirectDh and not mut("gru_direct_dh_off"):
                v = p.dh.read(dh_addr, ctx, thr, where="backward phase B dh") + v
            p.dh.write(dh_addr, v, ctx, thr, where="backward phase B dh")
            ctx.syncthreads()
    if cluster:
        yield CLUSTER_SYNC


def run_grid(kernel, grid, smem_bytes, p, bufs, seed):
    """The cooperative launch: `grid` blocks, the grid barrier emulated on one counter. A
    block yields GRID_ARRIVE (grid_arrive: __syncthreads, then thread 0's fence and add)
    and runs on, its accesses until the wait overlapping the other blocks' on both sides
    of the barrier (Ctx.window, as for the cluster barrier), then yields the wait's target
    (grid_wait); a target without an arrival before it is both halves at once."""
    for b in bufs:
        b.reset_launch()
    rng = np.random.default_rng(seed)
    counter = 0
    ctxs = [Ctx(b, grid, smem_bytes) for b in range(grid)]
    gens = [kernel(p, c) for c in ctxs]
    waiting = [None] * grid
    passed = [0] * grid
    done = [False] * grid
    while not all(done):
        # any block that can make progress may run next (a released block may race ahead)
        runnable = [b for b in range(grid)
                    if not done[b] and (waiting[b] is None or counter >= waiting[b])]
        if not runnable:
            raise Finding(f"DEADLOCK: blocks waiting at {waiting} with the counter at {counter}")
        b = runnable[rng.integers(len(runnable))]
        if waiting[b] is not None:
            passed[b] += 1
            if counter < passed[b] * grid:
                finding("the grid barrier released a block before every block arrived")
            waiting[b] = None
            ctxs[b].epoch += 1  # thread 0's ld.acquire wait + grid_wait's __syncthreads
            ctxs[b].window = False
            ctxs[b].syncthreads()
        try:
            target = next(gens[b])
            if target == GRID_ARRIVE or not ctxs[b].window:
                if ctxs[b].window:
                    finding("grid_arrive twice without a grid_wait between")
                ctxs[b].syncthreads()  # grid_arrive's __syncthreads
                counter += 1  # thread 0: fence.acq_rel.gpu; red.relaxed.gpu.add(counter, 1)
                ctxs[b].window = True
            if target != GRID_ARRIVE:
                assert isinstance(target, int), "a cluster barrier in a cooperative launch"
                waiting[b] = target
        except StopIteration:
            done[b] = True
            ctxs[b].exited = True
    if len(set(passed)) != 1:
        finding(f"blocks passed different numbers of grid barriers: {passed}")


def run_clusters(kernel, blocks, cluster, smem_bytes, p, bufs, seed, at_once):
    """The cluster launch: `blocks` blocks in clusters of `cluster`; at most `at_once`
    clusters on the device (the occupancy query's), the others waiting for a free slot in a
    random order (clusters need not be co-resident, so none may wait for another). A
    cluster's blocks start together; blocks of every cluster on the device run interleaved
    in a random order. The cluster barrier: a block's k-th CLUSTER_ARRIVE (release) counts
    it in, and its k-th CLUSTER_WAIT (acquire) returns once every block of the cluster
    arrived k times; in between (Ctx.window) it runs on, and its accesses may overlap
    the peers' on both sides of the barrier (Buf.overlap). CLUSTER_SYNC is both. The wait
    passes: the epoch and a __syncthreads (every thread of the block waits).
    The async exchange: (MBAR_ARRIVE, turn, bytes) is the block's arrival on its own
    mbarrier of that turn (MBarrier; the peers' st.async complete their bytes on it as they
    store), and (MBAR_WAIT, turn, parity) returns once that mbarrier's phase of that parity
    has completed (try_wait.parity: its phase count's parity differs); it counts as the
    cluster barrier does for the accesses (the window from the arrival, the epoch at the
    wait). A launch's mbarriers must end with no arrival or byte outstanding."""
    assert blocks % cluster == 0 and at_once >= 1
    for b in bufs:
        b.reset_launch()
    rng = np.random.default_rng(seed)
    queue = list(rng.permutation(blocks // cluster))
    active = []
    while queue or active:
        while queue and len(active) < at_once:
            c = int(queue.pop(0))
            ctxs = [Ctx(c * cluster + r, blocks, smem_bytes, rank=r, group=c,
                        group_blocks=cluster, peers=[]) for r in range(cluster)]
            for x in ctxs:
                x.peers = ctxs
            active.append(dict(c=c, ctxs=ctxs, gens=[kernel(p, x) for x in ctxs],
                               arrived=[0] * cluster, passed=[0] * cluster,
                               waiting=[False] * cluster, done=[False] * cluster,
                               mwait=[None] * cluster))

        def mbar_done(a, r):
            turn, parity = a["mwait"][r]
            return (a["ctxs"][r].mbar[turn].phase & 1) != parity
        runnable = [(a, r) for a in active for r in range(cluster)
                    if not a["done"][r] and (
                        mbar_done(a, r) if a["mwait"][r] is not None else
                        (not a["waiting"][r] or min(a["arrived"]) > a["passed"][r]))]
        if not runnable:
            stuck = [(a["c"], [r for r in range(cluster) if a["done"][r]]) for a in active]
            if any(w is not None for a in active for w in a["mwait"]):
                raise Finding(f"DEADLOCK: blocks wait on an mbarrier phase that never "
                              f"completes (cluster, exited blocks): {stuck}")
            raise Finding(f"DEADLOCK: blocks wait at a cluster barrier that the cluster's "
                          f"other blocks never arrive at (cluster, exited blocks): {stuck}")
        a, r = runnable[rng.integers(len(runnable))]
        ctx = a["ctxs"][r]
        if a["mwait"][r] is not None:  # the mbarrier wait returns
            a["mwait"][r] = None
            ctx.epoch += 1
            ctx.window = False
            ctx.syncthreads()
        elif a["waiting"][r]:  # the wait returns
            a["waiting"][r] = False
            a["passed"][r] += 1
            ctx.epoch += 1
            ctx.window = False
            ctx.syncthreads()
        try:
            what = next(a["gens"][r])
            if isinstance(what, tuple):  # the async exchange
                if what[0] == MBAR_ARRIVE:
                    ctx.mbar[what[1]].arrive_expect(what[2])
                    ctx.window = True
                else:
                    assert what[0] == MBAR_WAIT, what
                    a["mwait"][r] = (what[1], what[2])
                continue
            assert what in (CLUSTER_ARRIVE, CLUSTER_WAIT, CLUSTER_SYNC), what
            if what != CLUSTER_WAIT:
                if a["arrived"][r] > a["passed"][r]:
                    finding("cluster_arrive twice without a cluster_wait between")
                a["arrived"][r] += 1
                ctx.window = True
            if what != CLUSTER_ARRIVE:
                if a["arrived"][r] == a["passed"][r]:
                    finding("cluster_wait without a cluster_arrive before it")
                a["waiting"][r] = True
        except StopIteration:
            a["done"][r] = True
            ctx.exited = True
            if a["arrived"][r] != a["passed"][r]:
                finding("a block exits between cluster_arrive and cluster_wait")
        if all(a["done"]):
            active.remove(a)
            for x in a["ctxs"]:
                if any(bar.pending != 1 or bar.tx != 0 for bar in x.mbar):
                    finding("async exchange: an mbarrier left with an arrival or bytes "
                            "outstanding at the end of the launch")
            if len(set(a["passed"])) != 1:
                finding(f"cluster {a['c']}: blocks passed different numbers of cluster "
                        f"barriers: {a['passed']}")
            for x in a["ctxs"]:  # a peer's store that may land after x exited
                sm = x.smem
                late = sm.we >= x.epoch
                if sm.windowed:
                    late |= sm.ww & (sm.we + 1 == x.epoch)
                if ((sm.wb >= 0) & (sm.wb != x.block) & late).any():
                    finding("DSMEM: a store into a block's shared memory in the barrier "
                            "interval in which that block exits")


# --------------------------------------------------------------------------------------
# the cells (lstm.cu, gru.cu, rnn.cu)
# --------------------------------------------------------------------------------------
def read_xp(p, G, t, n, u, ctx, thr, where):
    """Cell::load's gather_gates of the input projection: [G, items]."""
    return p.xp.read((t * p.N + n) * G * p.H + u + gate_offsets(G, p.H), ctx, thr, where=where)


def gate_offsets(m, H):
    """Offsets of m gates H apart, one row each: a thread's m accesses read or written
    side by side (in program order, with no other access to that buffer between)."""
    return H * np.arange(m, dtype=np.int64)[:, None]


def lstm_point(pi, pf, pg, po, c_prev):
    """LstmGates i, f, g, o, c from the pre-activations and c_{t-1}."""
    i, f, g, o = sigmoid_act(pi), sigmoid_act(pf), tanh_act(pg), sigmoid_act(po)
    return i, f, g, o, f * c_prev + i * g


def lstm_point_backward(cr, dh_total, dc, c_prev):
    """The gate gradients dr[0, H, 2H, 3H] (rows; the cells pass stride 1 and a local dr)
    and dc_{t-1}, from the workspace row's values cr = i, f, g, o, c."""
    i, f, g, o, c = cr
    tc = tanh_act(c)
    dc_total = dc + dh_total * o * (1 - tc * tc)
    dr = np.stack((dc_total * g * i * (1 - i), dc_total * c_prev * f * (1 - f),
                   dc_total * i * (1 - g * g), dh_total * tc * o * (1 - o)))
    return dr, dc_total * f


class LstmCell:
    kGates = 4
    kDirectDh = False
    kNeedsHPrev = False

    @staticmethod
    def c_prev(p, s, tp, n, u, ctx, thr):
        if p.c_state is not None:
            return p.c_state.read(n * p.H + u, ctx, thr, where="lstm c_prev (c_state)")
        if s == 0:
            return p.c0.read(n * p.H + u, ctx, thr, where="lstm c_prev (c0)")
        tq = tp if not mut("lstm_c_prev_t") else tp + (1 if tp < p.T - 1 else -1)
        return p.cache.read((tq * p.N + n) * 5 * p.H + 4 * p.H + u, ctx, thr,
                            where="lstm c_prev (cache)")

    kLoads = 5

    @staticmethod
    def load(p, s, t, tp, n, u, ctx, thr):
        """x_i, x_f, x_g, x_o and c_{t-1}: [5, items]."""
        return np.concatenate([read_xp(p, 4, t, n, u, ctx, thr, "lstm xp"),
                               LstmCell.c_prev(p, s, tp, n, u, ctx, thr)[None]])

    @staticmethod
    def forward(p, s, t, tp, n, u, hh, _h_prev, inp, ctx, thr):
        """Writes y (and the cache or c_state); returns h as stored in y."""
        H = p.H
        row = t * p.N + n
        st = lstm_point(*(inp[:4] + hh), inp[4])
        if p.cache is not None:  # lstm_store_gates, then c at 4H
            p.cache.write(row * 5 * H + u + gate_offsets(5, H), np.stack(st), ctx, thr,
                          where="lstm cache")
        else:
            p.c_state.write(n * H + u, st[4], ctx, thr, where="lstm c_state")
        h = st[3] * tanh_act(st[4])
        p.y.write(row * H + u, h, ctx, thr, where="lstm y")
        return h

    kBackwardLoads = 8

    @staticmethod
    def load_backward(p, s, t, tp, n, u, ctx, thr):
        """The saved i, f, g, o, c, then dy, dc and c_{t-1}: [8, items]."""
        H = p.H
        row = t * p.N + n
        cr = p.cache.read(row * 5 * H + u + gate_offsets(5, H), ctx, thr,
                          where="lstm bwd cache")
        return np.concatenate([cr, p.dy.read(row * H + u, ctx, thr, where="lstm dy")[None],
                               p.dc.read(n * H + u, ctx, thr, where="lstm dc")[None],
                               LstmCell.c_prev(p, s, tp, n, u, ctx, thr)[None]])

    @staticmethod
    def backward(p, s, t, tp, n, u, inp, ctx, thr):
        """Phase A: writes dc and dg (dg_hh is dg_ih); returns dgh [4, items], what it wrote
        (lstm_point_backward with stride 1 into the local dgh, then stored)."""
        H = p.H
        row, idx = t * p.N + n, n * H + u
        dh_total = inp[5] + p.dh.read(idx, ctx, thr, where="lstm phase A dh")
        dgh, dc_prev = lstm_point_backward(inp[:5], dh_total, inp[6], inp[7])
        p.dc.write(idx, dc_prev, ctx, thr, where="lstm dc")
        p.dg_ih.write(row * 4 * H + u + gate_offsets(4, H), dgh, ctx, thr, where="lstm dg")
        return dgh


def gru_point(xr, xz, xn, hr, hz, hn):
    """GruGates r, z, n, hn (the hidden side's pre-activations include b_hh)."""
    r = sigmoid_act(xr + hr)
    z = sigmoid_act(xz + hz)
    return r, z, tanh_act(xn + r * hn), hn


def gru_h(st, h_prev):
    _, z, n, _ = st
    return (1 - z) * n + z * h_prev


def gru_point_backward(cr, dh_total, h_prev):
    """The gate gradients di and dhh (rows 0, H, 2H; the cell passes stride 1 and local
    arrays) and dh_{t-1}'s direct term, from the workspace row's values cr = r, z, n, hn."""
    r, z, nn, hn = cr
    dn = dh_total * (1 - z) * (1 - nn * nn)
    dz = dh_total * (h_prev - nn) * z * (1 - z)
    dr = dn * hn * r * (1 - r)
    return np.stack((dr, dz, dn)), np.stack((dr, dz, dn * r)), dh_total * z


class GruCell:
    kGates = 3
    kDirectDh = True
    kNeedsHPrev = True

    kLoads = 6

    @staticmethod
    def load(p, s, t, tp, n, u, ctx, thr):
        """x_r, x_z, x_n and b_hr, b_hz, b_hn (zero without b_hh): [6, items]."""
        xr = read_xp(p, 3, t, n, u, ctx, thr, "gru xp")
        b = (p.b_hh.read(u + gate_offsets(3, p.H), ctx, thr, where="gru b_hh")
             if p.b_hh is not None else np.zeros_like(xr))  # gru_hidden_bias
        return np.concatenate([xr, b])

    @staticmethod
    def forward(p, s, t, tp, n, u, hh, h_prev, inp, ctx, thr):
        """Writes y (and the cache); returns h as stored in y."""
        H = p.H
        row = t * p.N + n
        st = gru_point(*inp[:3], *(hh + inp[3:]))
        h = gru_h(st, h_prev)
        p.y.write(row * H + u, h, ctx, thr, where="gru y")
        if p.cache is not None:  # gru_store
            p.cache.write(row * 4 * H + u + gate_offsets(4, H), np.stack(st), ctx, thr,
                          where="gru cache")
        return h

    kBackwardLoads = 6

    @staticmethod
    def load_backward(p, s, t, tp, n, u, ctx, thr):
        """The saved r, z, n, hn, then dy and h_{t-1}: [6, items]."""
        H, N = p.H, p.N
        row = t * N + n
        cr = p.cache.read(row * 4 * H + u + gate_offsets(4, H), ctx, thr,
                          where="gru bwd cache")
        h_prev = (p.h0.read(n * H + u, ctx, thr, where="gru h0") if s == 0 else
                  p.y.read((tp * N + n) * H + u, ctx, thr, where="gru y (h_prev)"))
        return np.concatenate([cr, p.dy.read(row * H + u, ctx, thr, where="gru dy")[None],
                               h_prev[None]])

    @staticmethod
    def backward(p, s, t, tp, n, u, inp, ctx, thr):
        H, N = p.H, p.N
        row, idx = t * N + n, n * H + u
        dh_total = inp[4] + p.dh.read(idx, ctx, thr, where="gru phase A dh")
        di, dgh, dh_direct = gru_point_backward(inp[:4], dh_total, inp[5])
        p.dh.write(idx, dh_direct, ctx, thr, where="gru phase A dh")
        # `for g < 3: dgi[g * H] = di[g]; dgr[g * H] = dgh[g]`
        p.dg_ih.write(row * 3 * H + u + gate_offsets(3, H), di, ctx, thr, where="gru dg_ih")
        p.dg_hh.write(row * 3 * H + u + gate_offsets(3, H), dgh, ctx, thr, where="gru dg_hh")
        return di if mut("cluster_bwd_gru_dg_ih") else dgh


def elman_act(v, activation):
    if activation == 0:
        return tanh_act(v)
    if activation == 1:
        return np.where(v < 0, 0.0, v)
    return v


def elman_act_grad(h, activation):
    if activation == 0:
        return 1 - h * h
    if activation == 1:
        return np.where(h > 0, 1.0, 0.0)
    return np.ones_like(h)


class ElmanCell:
    kGates = 1
    kDirectDh = False
    kNeedsHPrev = False

    kLoads = 1

    @staticmethod
    def load(p, s, t, tp, n, u, ctx, thr):
        return read_xp(p, 1, t, n, u, ctx, thr, "elman xp")

    @staticmethod
    def forward(p, s, t, tp, n, u, hh, _h_prev, inp, ctx, thr):
        idx = (t * p.N + n) * p.H + u
        h = elman_act(inp[0] + hh[0], p.activation)
        p.y.write(idx, h, ctx, thr, where="elman y")
        return h

    kBackwardLoads = 2

    @staticmethod
    def load_backward(p, s, t, tp, n, u, ctx, thr):
        idx = (t * p.N + n) * p.H + u
        return np.stack([p.dy.read(idx, ctx, thr, where="elman dy"),
                         p.y.read(idx, ctx, thr, where="elman y")])

    @staticmethod
    def backward(p, s, t, tp, n, u, inp, ctx, thr):
        idx = (t * p.N + n) * p.H + u
        dgh = (inp[0] + p.dh.read(n * p.H + u, ctx, thr, where="elman phase A dh")) \
            * elman_act_grad(inp[1], p.activation)
        p.dg_ih.write(idx, dgh, ctx, thr, where="elman dg")
        return dgh[None]


# --------------------------------------------------------------------------------------
# host side: PersistentPlanner's grid() and cluster(), launch_persistent (persistent.cuh)
# --------------------------------------------------------------------------------------
class FakeDevice:
    def __init__(self, sms, smem_optin=227 * 1024, smem_per_sm=228 * 1024):
        self.sms, self.smem_optin, self.smem_per_sm = sms, smem_optin, smem_per_sm

    def occupancy(self, smem):  # __launch_bounds__(256, 1): registers allow one block
        return 1 if smem + 1024 <= self.smem_per_sm else 0

    def active_clusters(self, cs, smem):
        """cudaOccupancyMaxActiveClusters: a block an SM, so sms // cs clusters of cs blocks
        (a GPC's limits aside), none where a block does not fit or cs > 16."""
        return 0 if cs > 16 or not self.occupancy(smem) else self.sms // cs


@dataclasses.dataclass
class Plan:
    kernel: object = None
    blocks: int = 0
    units: int = 0
    cluster: int = 0  # blocks per cluster: the cluster variant; 0: the grid variant
    group_rows: int = 0  # the cluster variant's rows of N per cluster (N for the grid)
    smem: int = 0
    nt: int = 0
    rpw: int = 0
    at_once: int = 0  # the cluster variant: clusters the device runs at once
    us: float = 0.0  # the cluster variant: the stand-in cost (see cluster_us)
    xs_tiles: int = 1  # the grid variant's tiles of xs (2: stage_rows_async)
    reg: bool = False  # the grid variant's register tile (RNNFAST_REG_TILE unset or 1)
    async_exchange: bool = False  # the cluster variant's (RNNFAST_CLUSTER_EXCHANGE=async)
    fused: tuple = ()  # the per-step path's fused forward: (Cell, dt) (RNNFAST_STEP_FUSED=1)


# the environment knobs of the case running (RNNFAST_MMA_ROWS, RNNFAST_REG_TILE), read by
# the planner
KNOBS = {}


def for_tiles(n_rows, w_rows, try_tile, mma, backward, dt, tile=None):
    """PersistentPlanner::for_tiles: tries the tiles in order until try_tile(nt, rpw) says
    one ran. tile: force (NT, RPW) of the FFMA kernels; the MMA forward takes (64, 16),
    (32, 16) or (16, 16), the largest that the batch has more than half as many rows as,
    that fits and that RNNFAST_MMA_ROWS allows (64 unless it caps it)."""
    if mma:
        rows = int(KNOBS.get("RNNFAST_MMA_ROWS") or 64)
        done = False
        if rows == 64 and n_rows > 32:
            done = try_tile(64, 16)
        if not done and rows >= 32 and n_rows > 16:
            done = try_tile(32, 16)
        if not done:
            try_tile(16, 16)
    elif tile is not None:
        try_tile(*tile)
    else:
        done = False
        if n_rows > 4:
            if dt.acc == 4 and round_up(w_rows, 8) == round_up(w_rows, 4):
                done = try_tile(16, 8)
            if not done:
                done = try_tile(16, 4)
            if backward and not done:
                done = try_tile(8, 8)
        if not done:
            try_tile(4, 8)


def for_cluster_tiles(w_rows, try_tile, mma, dt, tile=None):
    """PersistentPlanner::for_cluster_tiles: every tile (the cost model picks among them).
    tile: force (NT, RPW) of the FFMA kernels."""
    if mma:
        try_tile(16, 16)
    elif tile is not None:
        try_tile(*tile)
    else:
        if dt.acc == 4 and round_up(w_rows, 8) == round_up(w_rows, 4):
            try_tile(16, 8)
        for nt, rpw in ((16, 4), (8, 8), (4, 8)):
            try_tile(nt, rpw)


def kernel_of(Cell, backward, nt, rpw, dt, cluster):
    kern = persistent_backward if backward else persistent_forward
    return lambda p, ctx: kern(Cell, nt, rpw, dt, cluster, p, ctx)


def plan_sizes(Cell, backward, H, units, dt):
    """K, the rows of W a block holds, the staged element's size, the MMA forward."""
    G = Cell.kGates
    K = G * H if backward else H
    w_rows = units if backward else G * units
    return K, w_rows, dt.acc if backward else dt.scalar, not backward and dt.mma


def smem_bytes(nt, rpw, r_pad, ld, group_rows, cluster, dt, backward, mma, xs_tiles=1):
    x_size = dt.acc if backward else dt.scalar
    return smem_layout(xs_rows(cluster, nt, group_rows, xs_tiles), nt, r_pad, ld,
                       scratch_bytes(nt, rpw, mma, dt.acc, r_pad), dt.scalar, x_size,
                       dt.acc).bytes


def plan_persistent(Cell, backward, N, H, dev, dt, tile=None):
    """PersistentPlanner::grid() with the path forced. tile: force (NT, RPW) of the FFMA
    kernels (the MMA forward's tile follows RNNFAST_MMA_ROWS, see for_tiles)."""
    sms = dev.sms
    if KNOBS.get("RNNFAST_MMA_ROWS", "") not in ("", "16", "32", "64"):
        raise Finding("the persistent path cannot run: RNNFAST_MMA_ROWS is "
                      f"{KNOBS['RNNFAST_MMA_ROWS']!r}")
    if KNOBS.get("RNNFAST_REG_TILE", "") not in ("", "0", "1"):
        raise Finding("the persistent path cannot run: RNNFAST_REG_TILE is "
                      f"{KNOBS['RNNFAST_REG_TILE']!r}")
    units = (H + sms - 1) // sms
    K, w_rows, _, mma = plan_sizes(Cell, backward, H, units, dt)
    reg_on = KNOBS.get("RNNFAST_REG_TILE", "") != "0"  # on unless 0, as reg_tile_knob
    if mma and reg_on and not reg_tile_fits(N, w_rows, H):
        cover("register tile: asked, the layer does not fit it")
    if mma and reg_on and reg_tile_fits(N, w_rows, H):
        smem = reg_scratch_bytes()
        blocks = (H + units - 1) // units
        if smem <= dev.smem_optin and dev.occupancy(smem) * sms >= blocks:
            plan = Plan(lambda p, ctx: persistent_forward_reg(Cell, dt, p, ctx), blocks, units,
                        0, N, smem, 16, 0)
            plan.reg = True
            return plan
    plan = Plan()

    def try_tile(nt, rpw):
        nonlocal plan
        r_pad = round_up(w_rows, rpw)
        ld = mma_ld(K) if mma else ffma_ld(K)
        # two tiles of xs where there are several and they fit
        xs_tiles = 1
        smem = smem_bytes(nt, rpw, r_pad, ld, 0, False, dt, backward, mma)
        if N > nt:
            two = smem_bytes(nt, rpw, r_pad, ld, 0, False, dt, backward, mma, 2)
            if two <= dev.smem_optin:
                xs_tiles = 2
                if not mut("async_plan_one_tile"):
                    smem = two
        if smem > dev.smem_optin:
            return False
        per_sm = dev.occupancy(smem)
        blocks = (H + units - 1) // units
        if per_sm * sms < blocks:
            return False
        plan = Plan(kernel_of(Cell, backward, nt, rpw, dt, False), blocks, units, 0, N, smem,
                    nt, rpw)
        plan.xs_tiles = xs_tiles
        return True

    for_tiles(N, w_rows, try_tile, mma, backward, dt, tile)
    if plan.kernel is None:
        raise Finding(f"the persistent path cannot run for H={H}")
    assert plan.blocks <= sms
    return plan


HEADER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc",
                      "cuda", "persistent.cuh")


def header_constants(path=HEADER):
    """kStageBatch and CostModel's constants, as persistent.cuh defines them."""
    text = open(path).read()
    consts = {}
    for name in ("kStageBatch", "kFloorUs", "kTileUs", "kFfmaShare", "kMmaShare",
                 "kBwdFloorUs", "kBwdTileUs", "kBwdFfmaShare", "kL2BytesPerS",
                 "kStepOverheadUs", "kBwdStepOverheadUs", "kStepDirectUs", "kBwdStepDirectUs",
                 "kGemmFfmaShare", "kGemmMmaShare", "kClusterTileUs", "kClusterMmaTileUs",
                 "kBwdClusterTileUs", "kClusterFfmaShare", "kClusterMmaShare",
                 "kBwdClusterFfmaShare", "kDsmemClkPerStore", "kWideRowUsPerKB", "kRegFloorUs"):
        m = re.search(rf"\b{name}\s*=\s*([0-9.eE+-]+)", text)
        if m is None:
            raise SystemExit(f"{name} not found in {path}")
        consts[name] = float(m.group(1))
    return consts


_HEADER_CONSTANTS = []


def cluster_us(group_rows, nt, r_pad, K, pushes, mma, waves, fp64, backward,
               clock_mhz=1755.0):
    """CostModel::cluster_us with the header's constants on a stand-in device (the emulator
    has no cudaDeviceProp): by default an H100's 1755 MHz, 128 FP32 lanes an SM (64 for
    FP64) and tensor cores 16x FFMA."""
    if not _HEADER_CONSTANTS:
        _HEADER_CONSTANTS.append(header_constants())
    c = _HEADER_CONSTANTS[0]
    if backward:
        tile_us, share = c["kBwdClusterTileUs"], c["kBwdClusterFfmaShare"]
    elif mma:
        tile_us, share = c["kClusterMmaTileUs"], 16.0 * c["kClusterMmaShare"]
    else:
        tile_us, share = c["kClusterTileUs"], c["kClusterFfmaShare"]
    rate = 2.0 * (64.0 if fp64 else 128.0) * clock_mhz * share
    tiles = (group_rows + nt - 1) // nt
    dot_us = 2.0 * nt * r_pad * K / rate
    push_us = pushes * c["kDsmemClkPerStore"] / clock_mhz
    return waves * ((tiles + 1) * tile_us + tiles * dot_us + push_us)


def plan_cluster(Cell, backward, N, H, dev, dt, size=None, rows=None, tile=None):
    """PersistentPlanner::cluster() with the path forced. size: RNNFAST_CLUSTER_SIZE (C0),
    rows: RNNFAST_CLUSTER_ROWS (N_c), None for the planner's choice; tile as in
    plan_persistent. The choice among cluster sizes and tiles uses cluster_us's stand-in device; the
    checks of the build's PTX version (cudaFuncGetAttributes) and of a launch's block limit
    are left out."""
    sms = dev.sms
    best = None
    for c0 in (16, 8, 4, 2, 1):
        if (c0 != size) if size else c0 > H:
            continue
        units = (H + c0 - 1) // c0
        cs = (H + units - 1) // units
        K, w_rows, _, mma = plan_sizes(Cell, backward, H, units, dt)
        guess_rows = -(-N // max(1, sms // cs))

        def try_tile(nt, rpw):
            nonlocal best
            r_pad = round_up(w_rows, rpw)
            ld = mma_ld(K) if mma else ffma_ld(K)

            def sm(group_rows):
                return smem_bytes(nt, rpw, r_pad, ld, group_rows, True, dt, backward, mma)
            # the kernels' static shared memory (kClusterStaticSmem) beside the dynamic
            if sm(1) + CLUSTER_STATIC_SMEM > dev.smem_optin:
                return False
            cap = nt  # the most rows whose two turns fit
            while cap < N and sm(cap + nt) + CLUSTER_STATIC_SMEM <= dev.smem_optin:
                cap += nt
            at_once = dev.active_clusters(cs, sm(min(cap, guess_rows)))
            if at_once < 1:
                return False
            n_c = -(-N // min(N, at_once))
            if rows:
                n_c = min(rows, N)
            n_c = min(n_c, cap)
            clusters = -(-N // n_c)
            # the clusters that run at once with this many rows (the first query's a guess)
            at_once = dev.active_clusters(cs, sm(n_c))
            if at_once < 1:
                return False
            plan = Plan(kernel_of(Cell, backward, nt, rpw, dt, True), clusters * cs, units, cs,
                        n_c, sm(1 if mut("cluster_plan_smem_one_row") else n_c), nt, rpw,
                        at_once)
            # cluster_async_ok: 4- and 8-byte values (the forward's h, the backward's acc_t)
            plan.async_exchange = KNOBS.get("RNNFAST_CLUSTER_EXCHANGE", "") == "async" and (
                backward or dt.scalar in (4, 8))
            pushes = n_c * units * (Cell.kGates if backward else 1) * cs
            plan.us = cluster_us(n_c, nt, r_pad, K, pushes, mma,
                                 -(-clusters // at_once), dt.scalar == 8, backward)
            if best is None or plan.us < best.us:
                best = plan
            return True

        for_cluster_tiles(w_rows, try_tile, mma, dt, tile)
    if best is None:
        raise Finding(f"the cluster variant cannot run for H={H} (size {size}, {sms} SMs)")
    return best


def fused_h0(plan, h0, h0b, h0_off, dt):
    """aligned16: the fused step copies h0 by 16-byte cp.async, so an unaligned view is
    cloned first."""
    if plan.fused and (h0_off * dt.scalar) % 16 and not mut("fused_h0_unaligned"):
        cover("fused step: an unaligned h0 cloned")
        return offset_buf("h0", h0, 0), 0
    return h0b, h0_off


def launch_persistent(plan, p, bufs, seed):
    if plan.fused:
        Cell, dt, backward = plan.fused
        if not backward:
            run_fused_steps(Cell, dt, p, bufs, seed)
            return
        # the op's W_hh^T (contiguous) and the gate gradients' two bfloat16 buffers
        GH = Cell.kGates * p.H
        w = p.w_hh.buf.v[p.w_hh.off:p.w_hh.off + GH * p.H].reshape(GH, p.H)
        wt = Buf("w_hh^T", w.T.copy())
        dg16 = empty("dg16", 2 * p.N * GH)
        p.w_hh, p.dg16 = Ptr(wt), Ptr(dg16)
        run_fused_backward(Cell, dt, p, bufs + [wt, dg16], seed)
        return
    p.units = plan.units
    p.group_rows = plan.group_rows
    p.xs_tiles = plan.xs_tiles
    p.async_exchange = plan.cluster > 0 and plan.async_exchange
    if plan.cluster > 0:
        run_clusters(plan.kernel, plan.blocks, plan.cluster, plan.smem, p, bufs, seed,
                     plan.at_once)
    else:
        run_grid(plan.kernel, plan.blocks, plan.smem, p, bufs, seed)


def plan_for(Cell, backward, N, H, dev, dt, tile, cluster):
    """The forced path of a case: the grid variant, or with cluster = (size, rows) the
    cluster variant (None in either for the planner's choice); the per-step path's fused
    forward where the case asks for it (RNNFAST_STEP_FUSED=1: fused_step_applies)."""
    # (the emulator's 16-bit type stands for bfloat16 here: the CUDA code fuses float16's
    # forward but not its backward, whose dh GEMM runs in float32)
    asked = KNOBS.get("RNNFAST_STEP_FUSED") == "1" and dt.mma
    if asked and H % 8:
        cover("fused step: asked, H % 8 != 0")
    if asked and H % 8 == 0:
        units = FUSED_COLS if backward else fused_units(Cell.kGates)
        plan = Plan(None, -(-N // FUSED_ROWS) * -(-H // units), units, 0, N,
                    fused_smem_bytes(dt), FUSED_ROWS, 0)
        plan.fused = (Cell, dt, backward)
        return plan
    if cluster is None:
        return plan_persistent(Cell, backward, N, H, dev, dt, tile)
    return plan_cluster(Cell, backward, N, H, dev, dt, *cluster, tile=tile)


# --------------------------------------------------------------------------------------
# host side: common.cuh's whole-sequence helpers, and the ops
# --------------------------------------------------------------------------------------
def empty(name, n):
    """at::empty: every element uninitialised."""
    return Buf(name, np.zeros(n), initialized=False)


def offset_buf(name, t, off):
    """A buffer holding t from element `off` on (a view that starts `off` elements into
    its allocation, so possibly not 16-byte aligned); read it through Ptr(buf, off)."""
    t = t.detach().to(F64).reshape(-1)
    return Buf(name, torch.cat([torch.zeros(off, dtype=F64), t]))


def input_projection(x, w_ih, bias):
    T, N, C = x.shape
    x2 = x.reshape(T * N, C)
    out = torch.addmm(bias, x2, w_ih.t()) if bias is not None else x2 @ w_ih.t()
    return out.reshape(T, N, w_ih.shape[0])


def sum_biases(a, b):
    if a is not None and b is not None:
        return a + b
    return a if a is not None else b


def recurrent_weight_grad(dg_hh, y, h0, reverse):
    T, GH, H = dg_hh.shape[0], dg_hh.shape[2], y.shape[2]
    first = T - 1 if reverse else 0
    dw = dg_hh[first].t() @ h0
    if T > 1:
        dg = dg_hh[: T - 1] if reverse else dg_hh[1:]
        hp = y[1:] if reverse else y[: T - 1]
        dw = dw + dg.reshape(-1, GH).t() @ hp.reshape(-1, H)
    return dw


def input_grads(dg_ih, x, w_ih):
    T, N, C = x.shape
    dg = dg_ih.reshape(T * N, -1)
    return (dg @ w_ih).reshape(T, N, C), dg.t() @ x.reshape(T * N, C)


def bias_grad(dg):
    return dg.sum(dim=(0, 1))


def lstm_forward_op(x, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse, training, dev, dt, tile, seed,
                    h0_off=0, cluster=None):
    T, N, _ = x.shape
    H = w_hh.shape[1]
    y = empty("y", T * N * H)
    ws = empty("workspace", (T if training else 0) * N * 5 * H)
    c0_acc = Buf("c0_acc", c0)
    xp = Buf("xp", input_projection(x, w_ih, sum_biases(b_ih, b_hh)))
    w = Buf("w_hh", w_hh)
    h0b = offset_buf("h0", h0, h0_off)
    plan = plan_for(LstmCell, False, N, H, dev, dt, tile, cluster)
    h0b, h0_off = fused_h0(plan, h0, h0b, h0_off, dt)
    c_state = None if training else Buf("c_state", c0)  # c0_acc.clone()
    p = Params(T=T, N=N, H=H, reverse=reverse, xp=Ptr(xp), w_hh=Ptr(w), h0=Ptr(h0b, h0_off),
               c0=Ptr(c0_acc), y=Ptr(y), cache=Ptr(ws) if training else None,
               c_state=None if training else Ptr(c_state))
    launch_persistent(plan, p, [b for b in (y, ws, c0_acc, xp, w, h0b, c_state) if b], seed)
    last = time_index(T - 1, T, reverse)
    yt = y.tensor((T, N, H))
    wst = ws.tensor(((T if training else 0), N, 5 * H))
    cn = wst[last][:, 4 * H:] if training else c_state.tensor((N, H))
    return yt, yt[last].clone(), cn.clone(), wst, plan


def lstm_backward_op(dy, dhn, dcn, x, h0, c0, w_ih, w_hh, y, workspace, reverse, dev, dt, tile,
                     seed, cluster=None):
    T, N, _ = x.shape
    H = w_hh.shape[1]
    dh = Buf("dh", dhn)
    dc = Buf("dc", dcn)
    dg = empty("dg", T * N * 4 * H)
    bufs = dict(w_hh=Buf("w_hh", w_hh), c0=Buf("c0_acc", c0), cache=Buf("workspace", workspace),
                dy=Buf("dy", dy))
    plan = plan_for(LstmCell, True, N, H, dev, dt, tile, cluster)
    p = Params(T=T, N=N, H=H, reverse=reverse, w_hh=Ptr(bufs["w_hh"]), c0=Ptr(bufs["c0"]),
               cache=Ptr(bufs["cache"]), dy=Ptr(bufs["dy"]), dh=Ptr(dh), dc=Ptr(dc),
               dg_ih=Ptr(dg), dg_hh=Ptr(dg))
    launch_persistent(plan, p, [dh, dc, dg, *bufs.values()], seed)
    dgt = dg.tensor((T, N, 4 * H))
    dx, dw_ih = input_grads(dgt, x, w_ih)
    return (dx, dh.tensor((N, H)), dc.tensor((N, H)), dw_ih,
            recurrent_weight_grad(dgt, y, h0, reverse), bias_grad(dgt)), plan


def gru_forward_op(x, h0, w_ih, w_hh, b_ih, b_hh, reverse, training, dev, dt, tile, seed, h0_off=0,
                    cluster=None):
    T, N, _ = x.shape
    H = w_hh.shape[1]
    y = empty("y", T * N * H)
    ws = empty("workspace", (T if training else 0) * N * 4 * H)
    xp = Buf("xp", input_projection(x, w_ih, b_ih))
    w = Buf("w_hh", w_hh)
    h0b = offset_buf("h0", h0, h0_off)
    bb = Buf("b_hh", b_hh) if b_hh is not None else None
    plan = plan_for(GruCell, False, N, H, dev, dt, tile, cluster)
    h0b, h0_off = fused_h0(plan, h0, h0b, h0_off, dt)
    p = Params(T=T, N=N, H=H, reverse=reverse, xp=Ptr(xp), w_hh=Ptr(w),
               b_hh=Ptr(bb) if bb is not None else None, h0=Ptr(h0b, h0_off), y=Ptr(y),
               cache=Ptr(ws) if training else None)
    launch_persistent(plan, p, [b for b in (y, ws, xp, w, h0b, bb) if b is not None], seed)
    yt = y.tensor((T, N, H))
    return (yt, yt[time_index(T - 1, T, reverse)].clone(),
            ws.tensor(((T if training else 0), N, 4 * H)), plan)


def gru_backward_op(dy, dhn, x, h0, w_ih, w_hh, y, workspace, reverse, dev, dt, tile, seed,
                    cluster=None):
    T, N, _ = x.shape
    H = w_hh.shape[1]
    dh = Buf("dh", dhn)
    dg_ih = empty("dg_ih", T * N * 3 * H)
    dg_hh = empty("dg_hh", T * N * 3 * H)
    bufs = [Buf("w_hh", w_hh), Buf("h0", h0), Buf("y", y), Buf("workspace", workspace),
            Buf("dy", dy)]
    plan = plan_for(GruCell, True, N, H, dev, dt, tile, cluster)
    p = Params(T=T, N=N, H=H, reverse=reverse, w_hh=Ptr(bufs[0]), h0=Ptr(bufs[1]),
               y=Ptr(bufs[2]), cache=Ptr(bufs[3]), dy=Ptr(bufs[4]), dh=Ptr(dh),
               dg_ih=Ptr(dg_ih), dg_hh=Ptr(dg_hh))
    launch_persistent(plan, p, [dh, dg_ih, dg_hh, *bufs], seed)
    dgi, dgh = dg_ih.tensor((T, N, 3 * H)), dg_hh.tensor((T, N, 3 * H))
    dx, dw_ih = input_grads(dgi, x, w_ih)
    return (dx, dh.tensor((N, H)), dw_ih, recurrent_weight_grad(dgh, y, h0, reverse),
            bias_grad(dgi), bias_grad(dgh)), plan


def rnn_forward_op(x, h0, w_ih, w_hh, b_ih, b_hh, activation, reverse, dev, dt, tile, seed,
                   h0_off=0, cluster=None):
    T, N, _ = x.shape
    H = w_hh.shape[1]
    y = empty("y", T * N * H)
    xp = Buf("xp", input_projection(x, w_ih, sum_biases(b_ih, b_hh)))
    w = Buf("w_hh", w_hh)
    h0b = offset_buf("h0", h0, h0_off)
    plan = plan_for(ElmanCell, False, N, H, dev, dt, tile, cluster)
    h0b, h0_off = fused_h0(plan, h0, h0b, h0_off, dt)
    p = Params(T=T, N=N, H=H, reverse=reverse, activation=activation, xp=Ptr(xp), w_hh=Ptr(w),
               h0=Ptr(h0b, h0_off), y=Ptr(y))
    launch_persistent(plan, p, [y, xp, w, h0b], seed)
    yt = y.tensor((T, N, H))
    return yt, yt[time_index(T - 1, T, reverse)].clone(), plan


def rnn_backward_op(dy, dhn, x, h0, w_ih, w_hh, y, activation, reverse, dev, dt, tile, seed,
                    cluster=None):
    T, N, _ = x.shape
    H = w_hh.shape[1]
    dh = Buf("dh", dhn)
    dg = empty("dg", T * N * H)
    bufs = [Buf("w_hh", w_hh), Buf("y", y), Buf("dy", dy)]
    plan = plan_for(ElmanCell, True, N, H, dev, dt, tile, cluster)
    p = Params(T=T, N=N, H=H, reverse=reverse, activation=activation, w_hh=Ptr(bufs[0]),
               y=Ptr(bufs[1]), dy=Ptr(bufs[2]), dh=Ptr(dh), dg_ih=Ptr(dg), dg_hh=Ptr(dg))
    launch_persistent(plan, p, [dh, dg, *bufs], seed)
    dgt = dg.tensor((T, N, H))
    dx, dw_ih = input_grads(dgt, x, w_ih)
    return (dx, dh.tensor((N, H)), dw_ih, recurrent_weight_grad(dgt, y, h0, reverse),
            bias_grad(dgt)), plan


# --------------------------------------------------------------------------------------
# references
# --------------------------------------------------------------------------------------
def load_reference():
    """rnnfast/reference.py by path: it needs torch only, not the built extension."""
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.path.join(here, "..", "rnnfast", "reference.py")
    spec = importlib.util.spec_from_file_location("rnnfast_reference", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


REF = load_reference()


def cpu_ops():
    """torch.ops.rnnfast on the CPU when a built rnnfast imports, else None."""
    try:
        import rnnfast  # noqa: F401  (loading it registers the ops)
        ops = torch.ops.rnnfast
        ops.lstm_forward  # noqa: B018  (raises if the ops are not registered)
        return ops
    except (ImportError, AttributeError, RuntimeError):
        return None


def reference_run(kind, x, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse, act):
    """(y, hn, cn, expected workspace) from the reference cells; differentiable."""
    T = x.shape[0]
    H = w_hh.shape[1]
    h, c = h0, c0
    ys, wsl = [None] * T, [None] * T
    for t in (range(T - 1, -1, -1) if reverse else range(T)):
        if kind == "lstm":
            gates = x[t] @ w_ih.t() + h @ w_hh.t()
            for b in (b_ih, b_hh):
                if b is not None:
                    gates = gates + b
            gi, gf, gg, go = gates.chunk(4, -1)
            h, c = REF.lstm_cell(x[t], h, c, w_ih, w_hh, b_ih, b_hh)
            wsl[t] = torch.cat([torch.sigmoid(gi), torch.sigmoid(gf), torch.tanh(gg),
                                torch.sigmoid(go), c], -1)
        elif kind == "gru":
            gi = x[t] @ w_ih.t() + (b_ih if b_ih is not None else 0)
            gh = h @ w_hh.t() + (b_hh if b_hh is not None else 0)
            r = torch.sigmoid(gi[:, :H] + gh[:, :H])
            z = torch.sigmoid(gi[:, H:2 * H] + gh[:, H:2 * H])
            n = torch.tanh(gi[:, 2 * H:] + r * gh[:, 2 * H:])
            wsl[t] = torch.cat([r, z, n, gh[:, 2 * H:]], -1)
            h = REF.gru_cell(x[t], h, w_ih, w_hh, b_ih, b_hh)
        else:
            h = REF.rnn_cell(x[t], h, w_ih, w_hh, b_ih, b_hh, ["tanh", "relu", "identity"][act])
        ys[t] = h
    ws = torch.stack(wsl) if kind != "rnn" else None
    return torch.stack(ys), h, c, ws


# --------------------------------------------------------------------------------------
# one case
# --------------------------------------------------------------------------------------
def reset_stats():
    STATS.clear()
    STATS.update(cases=0, backward=0, cluster=0, max_err=0.0, tiles=set(), cover=set())


def check(name, got, want, case, tol=1e-9):
    if got is None and want is None:
        return
    if want is None:
        want = torch.zeros_like(got)
    got, want = got.detach(), want.detach()
    if got.shape != want.shape:
        raise Finding(f"{case}: {name} shape {tuple(got.shape)} != {tuple(want.shape)}")
    if got.numel() == 0:
        return
    err = ((got - want).abs() / (1 + want.abs())).max().item()
    if not err <= tol:  # NaN fails too
        raise Finding(f"{case}: {name} differs from the reference, max rel err {err:.3g}")
    STATS["max_err"] = max(STATS["max_err"], err)


def cover_plan(plan, N, H, sms, dt, backward):
    STATS["tiles"].add((plan.nt, plan.rpw))
    if plan.fused:
        cover("fused step backward" if backward else "fused step")
        return
    if plan.reg:
        cover("register tile")
        return
    if plan.cluster:
        STATS["cluster"] += not backward
        cs, n_c = plan.cluster, plan.group_rows
        cover(*(c for c, on in (
            ("cluster: size 1", cs == 1), ("cluster: size 2", cs == 2),
            ("cluster: a size not a power of two", cs & (cs - 1) != 0),
            ("cluster: more than 8 blocks", cs > 8),
            ("cluster: the last block owns fewer units", H % plan.units != 0),
            ("cluster: N_c = 1", n_c == 1),
            ("cluster: several row tiles", n_c > plan.nt),
            ("cluster: a partial row tile", n_c % plan.nt != 0),
            ("cluster: a last cluster with fewer rows", N % n_c != 0),
            ("cluster: more clusters than run at once", plan.blocks // cs > plan.at_once),
            ("cluster: mma forward", dt.mma and not backward),
            ("cluster: ffma forward", not dt.mma and not backward),
            ("cluster: backward", backward)) if on))
        return
    cover(*(c for c, on in (
        ("last block owns fewer units", H % plan.units != 0),
        ("blocks own several units", plan.units > 1),
        ("H < SM count", H < sms), ("H > SM count", H > sms),
        ("several row tiles", N > plan.nt), ("a partial row tile", N % plan.nt != 0),
        ("K > 32 (several k per lane)", H > 32),
        ("mma: K % 16 != 0 (zero padding)", dt.mma and H % 16 != 0),
        ("mma: K % 16 == 0", dt.mma and H % 16 == 0),
        ("mma: several row tiles", dt.mma and N > 16)) if on))


def case_name(c):
    keys = ("kind", "dtype", "T", "N", "C", "H", "reverse", "training", "sms", "bias", "act",
            "gru_bhh", "tile", "h0_off", "smem_optin", "cluster", "mma_rows", "reg_tile",
            "cluster_exchange", "step_fused")
    return " ".join(f"{k}={c[k]}" for k in keys if k in c)


def run_case(kind, T, N, C, H, reverse, training, sms, bias, act=0, gru_bhh=True, tile=None,
             dtype="float64", seed=0, ops=None, h0_off=0, smem_optin=None, cluster=None,
             mma_rows=None, reg_tile=None, cluster_exchange=None, step_fused=None):
    """One case; cluster: (size, rows) for the cluster variant (RNNFAST_CLUSTER_SIZE and
    _ROWS; None in either for the planner's choice), None for the grid variant; mma_rows:
    RNNFAST_MMA_ROWS (the tensor-core tile's batch rows), reg_tile: RNNFAST_REG_TILE (1: the
    register tile where it holds the layer, the CUDA code's default), each set for this case
    only; cluster_exchange: RNNFAST_CLUSTER_EXCHANGE ("async": the cluster variant's async
    exchange); step_fused: RNNFAST_STEP_FUSED ("1": the per-step path's fused forward, in
    place of the persistent forward the case would run). A case without reg_tile runs with
    RNNFAST_REG_TILE=0, so that the tiled
    tensor-core forward keeps its cases at N <= 16 (tests/test_persistent_emulation.py
    checks the planner's default)."""
    KNOBS.clear()
    if mma_rows:
        KNOBS["RNNFAST_MMA_ROWS"] = str(mma_rows)
    KNOBS["RNNFAST_REG_TILE"] = "0" if reg_tile is None else str(reg_tile)
    if cluster_exchange:
        KNOBS["RNNFAST_CLUSTER_EXCHANGE"] = cluster_exchange
    if step_fused:
        KNOBS["RNNFAST_STEP_FUSED"] = str(step_fused)
    try:
        _run_case(kind, T, N, C, H, reverse, training, sms, bias, act, gru_bhh, tile, dtype,
                  seed, ops, h0_off, smem_optin, cluster)
    finally:
        KNOBS.clear()


def _run_case(kind, T, N, C, H, reverse, training, sms, bias, act, gru_bhh, tile, dtype, seed,
              ops, h0_off, smem_optin, cluster):
    g = torch.Generator().manual_seed(seed)
    G = {"lstm": 4, "gru": 3, "rnn": 1}[kind]
    scale = 1.0 / math.sqrt(H)
    dt = dtype_of(dtype)

    def rnd(*shape):
        return ((torch.rand(*shape, generator=g, dtype=F64) * 2 - 1) * scale * 2)\
            .requires_grad_()
    x = rnd(T, N, C)
    h0 = rnd(N, H)
    c0 = rnd(N, H) if kind == "lstm" else None
    w_ih, w_hh = rnd(G * H, C), rnd(G * H, H)
    b_ih = rnd(G * H) if bias else None
    b_hh = rnd(G * H) if bias and (kind != "gru" or gru_bhh) else None
    if kind == "rnn" and act == 1 and b_ih is not None:
        with torch.no_grad():
            b_ih += 0.05  # keep some units alive under relu
    dev = FakeDevice(sms) if smem_optin is None else FakeDevice(sms, smem_optin=smem_optin)
    case = case_name(dict(kind=kind, dtype=dtype, T=T, N=N, C=C, H=H, reverse=reverse,
                          training=training, sms=sms, bias=bias,
                          **({"act": act} if kind == "rnn" else {}),
                          **({"gru_bhh": gru_bhh} if kind == "gru" else {}),
                          **({"tile": tile} if tile else {}),
                          **({"h0_off": h0_off} if h0_off else {}),
                          **({"smem_optin": smem_optin} if smem_optin else {}),
                          **({"cluster": cluster} if cluster else {})))

    y_ref, hn_ref, cn_ref, ws_ref = reference_run(kind, x, h0, c0, w_ih, w_hh, b_ih, b_hh,
                                                  reverse, act)
    D = lambda t: t.detach() if t is not None else None  # noqa: E731
    args = [D(x), D(h0), D(c0), D(w_ih), D(w_hh), D(b_ih), D(b_hh)]
    if kind == "lstm":
        y, hn, cn, ws, plan = lstm_forward_op(*args, reverse, training, dev, dt, tile, seed,
                                              h0_off, cluster)
    elif kind == "gru":
        y, hn, ws, plan = gru_forward_op(*(args[:2] + args[3:]), reverse, training, dev, dt,
                                         tile, seed, h0_off, cluster)
        cn = None
    else:
        y, hn, plan = rnn_forward_op(*(args[:2] + args[3:]), act, reverse, dev, dt, tile, seed,
                                     h0_off, cluster)
        cn = ws = None
    cover_plan(plan, N, H, sms, dt, False)
    check("y", y, y_ref, case)
    check("hn", hn, hn_ref, case)
    if kind == "lstm":
        check("cn", cn, cn_ref, case)
    if kind != "rnn":
        if training:
            check("workspace", ws, ws_ref, case)
        elif ws.numel() != 0:
            raise Finding(f"{case}: inference workspace not empty")
    if ops is not None and kind != "rnn" and training:  # the per-step layout, from the CPU op
        if kind == "lstm":
            cpu = ops.lstm_forward(*args, reverse, True)
        else:
            cpu = ops.gru_forward(*(args[:2] + args[3:]), reverse, True)
        check("workspace vs the CPU op", ws, cpu[-1], case)
    STATS["cases"] += 1
    if not training:
        return

    # backward: autograd through the reference, with random output gradients
    dy = torch.randn(T, N, H, generator=g, dtype=F64)
    dhn = torch.randn(N, H, generator=g, dtype=F64)
    dcn = torch.randn(N, H, generator=g, dtype=F64) if kind == "lstm" else None
    loss = (y_ref * dy).sum() + (hn_ref * dhn).sum()
    if kind == "lstm":
        loss = loss + (cn_ref * dcn).sum()
    leaves = [x, h0, c0, w_ih, w_hh, b_ih, b_hh]
    live = [t for t in leaves if t is not None]
    grads = dict(zip(map(id, live), torch.autograd.grad(loss, live)))
    gr = lambda t: grads[id(t)] if t is not None else None  # noqa: E731
    if kind == "lstm":
        out, plan = lstm_backward_op(dy, dhn, dcn, D(x), D(h0), D(c0), D(w_ih), D(w_hh), y, ws,
                                     reverse, dev, dt, tile, seed + 1, cluster)
        dx, dh0, dc0, dw_ih, dw_hh, db = out
        check("dc0", dc0, gr(c0), case)
        db_ih = db_hh = db
    elif kind == "gru":
        out, plan = gru_backward_op(dy, dhn, D(x), D(h0), D(w_ih), D(w_hh), y, ws, reverse,
                                    dev, dt, tile, seed + 1, cluster)
        dx, dh0, dw_ih, dw_hh, db_ih, db_hh = out
    else:
        out, plan = rnn_backward_op(dy, dhn, D(x), D(h0), D(w_ih), D(w_hh), y, act, reverse,
                                    dev, dt, tile, seed + 1, cluster)
        dx, dh0, dw_ih, dw_hh, db = out
        db_ih = db_hh = db
    cover_plan(plan, N, H, sms, dt, True)
    STATS["backward"] += 1
    check("dx", dx, gr(x), case)
    check("dh0", dh0, gr(h0), case)
    check("dw_ih", dw_ih, gr(w_ih), case)
    check("dw_hh", dw_hh, gr(w_hh), case)
    if b_ih is not None:
        check("db_ih", db_ih, gr(b_ih), case)
    if b_hh is not None:
        check("db_hh", db_hh, gr(b_hh), case)
    if ops is not None:  # the CPU op's backward from the same forward results
        if kind == "lstm":
            cpu = ops.lstm_backward(dy, dhn, dcn, D(x), D(h0), D(c0), D(w_ih), D(w_hh), y, ws,
                                    reverse)
        elif kind == "gru":
            cpu = ops.gru_backward(dy, dhn, D(x), D(h0), D(w_ih), D(w_hh), y, ws, reverse)
        else:
            cpu = ops.rnn_backward(dy, dhn, D(x), D(h0), D(w_ih), D(w_hh), y, act, reverse)
        for i, (a, b) in enumerate(zip(out, cpu)):
            check(f"backward output {i} vs the CPU op", a, b, case)


# --------------------------------------------------------------------------------------
# the case sets
# --------------------------------------------------------------------------------------
def variants(kind):
    if kind == "rnn":
        return [dict(act=a) for a in (0, 1, 2)]
    if kind == "gru":
        return [dict(gru_bhh=b) for b in (True, False)]
    return [{}]


def cases(full=False):
    """A deterministic spread over the shape space. The FFMA set (float64, some float32):
    every kind and variant meets every H, and N, T, the SM count, reverse, training and
    bias cycle with co-prime strides. The MMA set (float16): every kind meets N in
    {1, 5, 17} and H = K a multiple of 16 or not; two larger H give one k range per tile
    and several tiles per warp."""
    Ns = [1, 3, 4, 5, 16, 17, 33]
    Ts = [1, 2, 3]
    Hs = [1, 2, 3, 5, 7, 8, 10, 13, 17, 33]
    smss = [3, 5, 7]
    out = []
    i = 0
    for kind in ("lstm", "gru", "rnn"):
        vs = variants(kind)
        for H in Hs:
            for rep in range(6 if full else 3):
                N = Ns[(i * 3 + rep * 5) % len(Ns)]
                out.append(dict(
                    kind=kind, T=Ts[(i + rep) % len(Ts)], N=N, C=3, H=H,
                    reverse=(i + rep) % 2 == 1, training=(i + 2 * rep) % 4 != 3,
                    sms=smss[(i + 2 * rep) % len(smss)], bias=(i + rep) % 5 != 4,
                    dtype="float32" if (i + rep) % 4 == 2 else "float64", seed=100 * i + rep,
                    **vs[(i + rep) % len(vs)]))
            i += 1
    # the planner's fallback tile (4, 8) when (16, 4) does not fit, at N > 4, and corners
    extra = [dict(kind=k, T=3, N=n, C=2, H=h, reverse=r, training=True, sms=sm, bias=True,
                  tile=(4, 8))
             for k in ("lstm", "gru", "rnn") for n, h, sm, r in
             ((5, 11, 3, True), (9, 10, 3, False), (17, 20, 5, True))]
    extra += [
        dict(kind="lstm", T=5, N=33, C=2, H=33, reverse=True, training=True, sms=7, bias=True),
        dict(kind="gru", T=5, N=16, C=2, H=17, reverse=False, training=True, sms=3, bias=True,
             gru_bhh=False),
        dict(kind="lstm", T=5, N=4, C=2, H=2, reverse=False, training=False, sms=7, bias=True),
        dict(kind="rnn", T=5, N=3, C=2, H=40, reverse=True, training=True, sms=3, bias=False,
             act=1),
        dict(kind="gru", T=1, N=1, C=1, H=1, reverse=True, training=True, sms=5, bias=False),
        # h0 one element into its allocation: the first step stages elements, later ones
        # 16-byte vectors
        dict(kind="gru", T=3, N=5, C=2, H=8, reverse=False, training=True, sms=3, bias=True,
             dtype="float32", h0_off=1),
        dict(kind="lstm", T=2, N=17, C=2, H=16, reverse=True, training=True, sms=5,
             bias=True, dtype="float16", h0_off=3),
        # the backward stages 16 rows of 3 * 45 elements: two batches per thread
        dict(kind="gru", T=2, N=17, C=2, H=45, reverse=False, training=True, sms=5,
             bias=True),
        # 16 rows of the backward's 4 * 20 do not fit in 16000 bytes beside W's slice: (8, 8)
        dict(kind="lstm", T=3, N=9, C=2, H=20, reverse=True, training=True, sms=3, bias=True,
             smem_optin=16000),
        dict(kind="gru", T=2, N=19, C=2, H=20, reverse=False, training=True, sms=3,
             bias=True, dtype="float32", smem_optin=12000),
    ]
    # the tensor-core forward
    m = 0
    for kind in ("lstm", "gru", "rnn"):
        vs = variants(kind)
        for H in ((5, 16, 20, 32, 33, 48) if full else (16, 20, 33)):
            for N in (1, 5, 17):
                extra.append(dict(
                    kind=kind, T=(1, 2, 3)[m % 3], N=N, C=2, H=H, reverse=m % 2 == 1,
                    training=m % 4 != 3, sms=(3, 5, 7)[(m // 3 + m) % 3], bias=m % 5 != 4,
                    dtype="float16", **vs[m % len(vs)]))
                m += 1
    extra += [
        dict(kind="lstm", T=2, N=5, C=2, H=120, reverse=False, training=False, sms=3,
             bias=True, dtype="float16"),
        dict(kind="gru", T=2, N=17, C=2, H=112, reverse=True, training=False, sms=3,
             bias=True, dtype="float16"),
    ]
    # the cluster variant: (size, rows) forced (RNNFAST_CLUSTER_SIZE, _ROWS) or the
    # planner's (None); the comments give the plan: clusters of cs blocks, U units a block
    # (the last block's), N_c rows a cluster (the last cluster's) and the tile
    C = dict(C=2, bias=True)
    extra += [
        # cs 4, U 2 (1); N_c 2 (1): 3 clusters, 2 at once; (4, 8)
        dict(kind="lstm", T=3, N=5, H=7, sms=8, cluster=(4, 2), reverse=True, training=True,
             **C),
        # cs 3, U 2 (1); the planner's N_c 9 (8); (16, 4)
        dict(kind="gru", T=2, N=17, H=5, sms=7, cluster=(4, None), reverse=False,
             training=True, gru_bhh=False, **C),
        # cs 2, U 5; N_c 17 (16): two tiles, the second of 1 row; (16, 8)
        dict(kind="rnn", act=1, T=3, N=33, H=10, sms=4, cluster=(2, 17), reverse=True,
             training=True, dtype="float32", **C),
        # cs 1, U 3; N_c 1: 4 clusters, 3 at once; (4, 8)
        dict(kind="rnn", act=2, T=3, N=4, H=3, sms=3, cluster=(1, 1), reverse=False,
             training=True, **C),
        # cs 14, U 2 (1); N_c 3; (4, 8)
        dict(kind="lstm", T=2, N=3, H=27, sms=16, cluster=(16, None), reverse=False,
             training=True, dtype="float32", **C),
        # tensor cores: cs 2, U 10; N_c 5 (2) in one tile of 16
        dict(kind="gru", T=2, N=17, H=20, sms=8, cluster=(2, 5), reverse=True, training=True,
             dtype="float16", **C),
        # tensor cores: cs 4, U 9 (6); N_c 17 (1): two tiles
        dict(kind="lstm", T=2, N=18, H=33, sms=8, cluster=(4, 17), reverse=False,
             training=False, dtype="float16", **C),
        # tensor cores: cs 8, U 2; h0 one element into its allocation
        dict(kind="rnn", act=0, T=2, N=5, H=16, sms=16, cluster=(8, None), reverse=True,
             training=True, dtype="float16", h0_off=1, **C),
        # inference: cs 7, U 2 (1); N_c 4 (1)
        dict(kind="gru", T=3, N=9, H=13, sms=14, cluster=(8, 4), reverse=True,
             training=False, dtype="float32", **C),
        dict(kind="lstm", T=3, N=6, H=8, sms=4, cluster=(2, 3), reverse=False,
             training=False, **C),
        # the planner's size and rows
        dict(kind="lstm", T=2, N=40, H=27, sms=16, cluster=(None, None), reverse=True,
             training=True, dtype="float32", **C),
        # T = 1: nothing stored into the turns in the forward
        dict(kind="rnn", act=0, T=1, N=2, H=2, sms=2, cluster=(2, None), reverse=False,
             training=True, **C),
        # the async exchange (RNNFAST_CLUSTER_EXCHANGE=async): float32 both ways, T even
        # (the backward's phases from an odd T - 1); 3 clusters of 4 (U 3, 0), 2 at once
        dict(kind="lstm", T=6, N=7, H=9, sms=8, cluster=(4, 3), reverse=True, training=True,
             dtype="float32", cluster_exchange="async", **C),
        # float16: the forward keeps the barrier, the backward (float sums) is async; T odd
        dict(kind="gru", T=5, N=5, H=10, sms=6, cluster=(2, 2), reverse=False, training=True,
             dtype="float16", cluster_exchange="async", **C),
        # float64 forward in inference (8-byte values); two tiles a cluster
        dict(kind="rnn", act=1, T=5, N=20, H=6, sms=4, cluster=(2, None), reverse=False,
             training=False, tile=(4, 8), cluster_exchange="async", **C),
        dict(kind="rnn", act=0, T=4, N=9, H=12, sms=12, cluster=(8, 4), reverse=True,
             training=True, cluster_exchange="async", **C),
    ]
    # the tensor-core forward's tiles of 64 and 32 rows and RNNFAST_MMA_ROWS capping them; the
    # comments give the tile and its rows
    M = dict(C=3, bias=True, dtype="float16")
    extra += [
        # 64: two tiles (64 + 6); U 5 (4): 320 items a tile, more than the threads
        dict(kind="lstm", T=3, N=70, H=19, sms=4, reverse=False, training=True,
             mma_rows=64, **M),
        # 64 asked, N = 40: 32 rows a tile (32 + 8)
        dict(kind="gru", T=2, N=40, H=20, sms=5, reverse=True, training=True, mma_rows=64,
             **M),
        # 32: N 17, one partial tile; K 33 (zero padding)
        dict(kind="rnn", act=1, T=3, N=17, H=33, sms=6, reverse=False, training=True,
             mma_rows=32, **M),
        # 64 at N = 64, one whole tile, inference; 8 column tiles of W (GRU U 43 -> r_pad 144)
        dict(kind="gru", T=2, N=64, H=43, sms=1, reverse=False, training=False, mma_rows=64,
             **M),
        # 32: three tiles (32, 32, 36 - 64 = 4 ... N 68: 32 + 32 + 4)
        dict(kind="lstm", T=2, N=68, H=16, sms=2, reverse=True, training=False, mma_rows=32,
             **M),
        # 64 asked, N <= 16: the 16-row tile
        dict(kind="rnn", act=0, T=2, N=9, H=24, sms=3, reverse=True, training=True,
             mma_rows=64, **M),
        # capped at 16: three 16-row tiles (16 + 16 + 8)
        dict(kind="lstm", T=2, N=40, H=21, sms=3, reverse=False, training=True, mma_rows=16,
             **M),
        # the default (64): N 35, one 64-row tile, 29 rows of it padding
        dict(kind="gru", T=2, N=35, H=18, sms=4, reverse=True, training=False, **M),
    ]
    # the register tile (RNNFAST_REG_TILE=1); the comments give U and W's rows a block
    R = dict(C=3, bias=True, dtype="float16", reg_tile=1)
    extra += [
        # U 4, 16 rows (2 n-tiles); one chunk: 7 warps without
        dict(kind="lstm", T=3, N=5, H=16, sms=4, reverse=False, training=True, **R),
        # U 8, 24 rows; N 16 (rows g + 8); h0 one element into its allocation: 2-byte loads
        dict(kind="gru", T=3, N=16, H=24, sms=3, reverse=True, training=True, h0_off=1, **R),
        # U 30 (the last block 26), 30 rows; 10 chunks (two warps take 2), the last half
        # padding; 480 items, more than the threads
        dict(kind="rnn", act=1, T=3, N=16, H=296, sms=10, reverse=False, training=True, **R),
        # inference: U 5, 20 rows, N 1; U 10, 30 rows (4 n-tiles)
        dict(kind="lstm", T=2, N=1, H=40, sms=8, reverse=True, training=False, **R),
        dict(kind="gru", T=2, N=7, H=20, sms=2, reverse=True, training=False, **R),
        # H % 8 != 0: the tiled forward runs
        dict(kind="lstm", T=2, N=4, H=21, sms=6, reverse=False, training=True, **R),
    ]
    # the per-step path's fused forward (RNNFAST_STEP_FUSED=1; the backward the persistent
    # one); the comments give the blocks (rows by units) and the stages of 64 columns
    F = dict(C=3, bias=True, dtype="float16", step_fused=1)
    extra += [
        # 2 x 5 blocks (LSTM U 16: 72 = 4 x 16 + 8), 2 stages (the second half padding);
        # h0 one element into its allocation: cloned
        dict(kind="lstm", T=3, N=65, H=72, sms=4, reverse=True, training=True, h0_off=1, **F),
        # GRU U 21 (the tile's row 63 zero): 1 x 7 blocks, 2 whole stages; inference
        dict(kind="gru", T=2, N=5, H=128, sms=3, reverse=False, training=False, **F),
        # one whole 64 x 64 tile, one stage
        dict(kind="rnn", act=1, T=3, N=64, H=64, sms=5, reverse=False, training=True, **F),
        # 3 stages; LSTM inference (c in place)
        dict(kind="lstm", T=2, N=2, H=136, sms=6, reverse=False, training=False, **F),
        # 5 stages, more than the 4 buffers: the first comes round again
        dict(kind="rnn", act=0, T=2, N=3, H=264, sms=7, reverse=True, training=True, **F),
        # H % 8 != 0: the persistent forward runs
        dict(kind="gru", T=2, N=3, H=12, sms=4, reverse=True, training=True, **F),
    ]
    for j, e in enumerate(extra):
        e.setdefault("seed", 100000 + j)
    return out + extra


COVERAGE = {"forward: tile 0 has more items than threads",
            "forward: a later tile's inputs loaded before its dot",
            "backward: more phase A items than threads", "stage_rows: 16-byte vectors", "stage_rows: elements",
            "stage_rows: several batches per thread", "last block owns fewer units", "blocks own several units", "H < SM count",
            "H > SM count", "several row tiles", "a partial row tile",
            "K > 32 (several k per lane)", "ffma: split-K", "ffma: one k range per chunk",
            "ffma: several jobs per warp", "ffma: groups % splits != 0", "mma: split-K", "mma: an odd number of k steps",
            "mma: one k range per tile", "mma: several jobs per warp",
            "mma: K % 16 != 0 (zero padding)", "mma: K % 16 == 0", "mma: several row tiles",
            "cluster: size 1", "cluster: size 2", "cluster: a size not a power of two",
            "cluster: more than 8 blocks", "cluster: the last block owns fewer units",
            "cluster: N_c = 1", "cluster: several row tiles", "cluster: a partial row tile",
            "cluster: a last cluster with fewer rows", "cluster: more clusters than run at once",
            "cluster: mma forward", "cluster: ffma forward", "cluster: backward",
            "cluster forward: the async exchange", "cluster backward: the async exchange",
            "stage_rows_async: cp.async",
            "stage_rows_async: a later tile issued during an earlier one",
            "forward: xp prefetched into L2", "mma: 32 rows a tile", "mma: 64 rows a tile",
            "register tile", "register tile: warps without chunks",
            "register tile: several chunks a warp", "register tile: a chunk zero-padded past H",
            "register tile: more items than threads",
            "register tile: h_{t-1} by 2-byte loads (unaligned)",
            "register tile: asked, the layer does not fit it",
            "fused step", "fused step: several stages",
            "fused step: a last stage zero-padded past K", "fused step: rows past N zero",
            "fused step backward",
            "fused step: more stages than buffers",
            "fused step: units past H", "fused step: an unaligned h0 cloned",
            "fused step: asked, H % 8 != 0"}
# (16, 0): the register tile; (64, 0): the fused step
TILES = {(16, 8), (16, 4), (8, 8), (4, 8), (16, 16), (32, 16), (64, 16), (16, 0), (64, 0)}


@dataclasses.dataclass
class Report:
    mismatches: list  # a Finding per case that raised one (mismatch, out of bounds, ...)
    findings: dict  # tracker findings: message -> count
    uncovered: set  # COVERAGE items and tiles no case reached
    stats: dict
    seconds: float


@contextlib.contextmanager
def one_torch_thread():
    """The torch calls here are tiny: on a busy machine, intra-op threads only wait for
    each other (the suite ran 3x slower on 2 shared cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run_suite(case_list, ops=None, coverage=True):
    """Runs every case; the Report says what failed. coverage: also require that the set
    reached COVERAGE and TILES."""
    MUT.clear()
    FINDINGS.clear()
    reset_stats()
    t0 = time.time()
    mismatches = []
    with one_torch_thread():
        for c in case_list:
            try:
                run_case(ops=ops, **c)
            except Finding as e:
                mismatches.append(str(e))
    uncovered = set()
    if coverage:
        uncovered = (COVERAGE - STATS["cover"]) | {str(t) for t in TILES - STATS["tiles"]}
    return Report(mismatches, dict(FINDINGS), uncovered, dict(STATS), time.time() - t0)


# --------------------------------------------------------------------------------------
# the self-test
# --------------------------------------------------------------------------------------
SELF_TEST_CASES = [
    dict(kind="lstm", T=3, N=5, C=2, H=7, reverse=False, training=True, sms=3, bias=True),
    dict(kind="gru", T=3, N=17, C=2, H=5, reverse=True, training=True, sms=3, bias=True),
    dict(kind="lstm", T=3, N=17, C=2, H=20, reverse=False, training=True, sms=3, bias=True,
         dtype="float16"),
    dict(kind="rnn", T=2, N=3, C=2, H=10, reverse=False, training=True, sms=7, bias=True,
         act=0),
    dict(kind="gru", T=2, N=5, C=2, H=33, reverse=True, training=True, sms=5, bias=True,
         dtype="float16"),
    dict(kind="lstm", T=2, N=33, C=2, H=40, reverse=True, training=True, sms=5, bias=True),
    dict(kind="rnn", T=2, N=3, C=2, H=8, reverse=False, training=True, sms=3, bias=True,
         dtype="float32", h0_off=1),
    # the cluster variant: clusters of 3 blocks (units 2, 2, 1), 6 rows each in tiles of 4
    # (forced: the planner would take one tile of 8; the last cluster 4 rows); the
    # tensor-core forward, 2 blocks, 5 rows padded to 16
    dict(kind="gru", T=3, N=10, C=2, H=5, reverse=True, training=True, sms=9, bias=True,
         cluster=(4, 6), tile=(4, 8)),
    dict(kind="lstm", T=2, N=7, C=2, H=20, reverse=False, training=True, sms=4, bias=True,
         dtype="float16", cluster=(2, 5)),
    # the tensor-core forward's 64-row tile (RNNFAST_MMA_ROWS=64): 70 rows in two tiles, 4
    # row tiles of 16 by 2 column tiles (LSTM U 5 -> 20 rows of W, padded to 32)
    dict(kind="lstm", T=2, N=70, C=2, H=19, reverse=False, training=True, sms=4, bias=True,
         dtype="float16", mma_rows=64),
    # 32 rows a tile with 5 column tiles (GRU U 26 -> 80 rows of W): 10 jobs, more than the
    # warps, so the scratch for 2 row tiles is twice that for one
    dict(kind="gru", T=2, N=40, C=2, H=26, reverse=True, training=False, sms=1, bias=True,
         dtype="float16", mma_rows=32),
    # the cluster variant's async exchange: float32 (3 clusters of 3, 2 rows each, T even),
    # and float64's forward (T odd, 2 clusters)
    dict(kind="lstm", T=4, N=6, C=2, H=7, reverse=True, training=True, sms=6, bias=True,
         dtype="float32", cluster=(4, 2), cluster_exchange="async"),
    dict(kind="rnn", T=5, N=5, C=2, H=6, reverse=False, training=True, sms=4, bias=True,
         act=0, cluster=(2, 3), cluster_exchange="async"),
    # the register tile: GRU U 8, 24 rows of W a block, one chunk (7 warps idle), N 11 (rows
    # g + 8), h0 unaligned (2-byte loads at step 0)
    dict(kind="gru", T=3, N=11, C=2, H=24, reverse=True, training=True, sms=3, bias=True,
         dtype="float16", reg_tile=1, h0_off=1),
    # the fused step: LSTM 2 x 5 blocks, 2 stages, h0 unaligned (cloned); GRU 5 stages (one
    # buffer used twice); both with the fused backward
    dict(kind="lstm", T=2, N=66, C=2, H=72, reverse=False, training=True, sms=4, bias=True,
         dtype="float16", step_fused=1, h0_off=1),
    dict(kind="gru", T=2, N=3, C=2, H=264, reverse=True, training=True, sms=3, bias=True,
         dtype="float16", step_fused=1),
]


def self_test_cases():
    return [dict(c, seed=i) for i, c in enumerate(SELF_TEST_CASES)]


def catch(name, ops=None):
    """Plants the bug `name` and runs SELF_TEST_CASES until one flags it; returns what that
    case flagged (tracker findings first, then the mismatch), empty when nothing did."""
    MUT.clear()
    MUT.add(name)
    # the cluster variant's bugs: its cases first (any case may catch any bug)
    order = sorted(self_test_cases(), key=lambda c: ("cluster" in c) != name.startswith("cluster_"))
    if name.startswith("mbar_"):  # the async exchange's: its cases first
        order = sorted(order, key=lambda c: "cluster_exchange" not in c)
    if name.startswith("fused_"):  # the fused step's: its cases first
        order = sorted(order, key=lambda c: "step_fused" not in c)
    try:
        with one_torch_thread():
            for c in order:
                FINDINGS.clear()
                reset_stats()
                try:
                    run_case(ops=ops, **c)
                    mismatch = []
                except Finding as e:
                    mismatch = [str(e)]
                if FINDINGS or mismatch:
                    return list(FINDINGS) + mismatch
        return []
    finally:
        MUT.clear()
        FINDINGS.clear()


def self_test(ops=None):
    """Every planted bug, after a clean run of SELF_TEST_CASES (so that a catch means the
    bug); returns 0 when all were caught."""
    clean = run_suite(self_test_cases(), ops, coverage=False)
    if clean.mismatches or clean.findings:
        print("self-test cases fail without a planted bug:",
              clean.mismatches + list(clean.findings))
        return 1
    missed = []
    for name in MUTATIONS:
        caught = catch(name, ops)
        print(f"self-test {name:28s} {'caught' if caught else 'MISSED'}: "
              f"{caught[0][:110] if caught else MUTATIONS[name]}")
        if not caught:
            missed.append(name)
    print(f"emulate_persistent self-test: {len(MUTATIONS) - len(missed)}/{len(MUTATIONS)} "
          f"planted bugs caught")
    return 1 if missed else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--full", action="store_true", help="more shapes")
    ap.add_argument("--dtype", choices=sorted(DTYPES),
                    help="run every case on this dtype's code path (coverage not required)")
    ap.add_argument("--self-test", action="store_true",
                    help="check that each planted bug in MUTATIONS is caught")
    ap.add_argument("--no-cpu-ops", action="store_true",
                    help="do not compare with the CPU ops even when rnnfast imports")
    args = ap.parse_args()
    ops = None if args.no_cpu_ops else cpu_ops()
    if args.self_test:
        return self_test(ops)
    case_list = cases(args.full)
    if args.dtype:
        case_list = [dict(c, dtype=args.dtype) for c in case_list]
    rep = run_suite(case_list, ops, coverage=not args.dtype)
    for f in rep.mismatches:
        print("MISMATCH:", f)
    for f, n in sorted(rep.findings.items()):
        print(f"FINDING ({n}x): {f}")
    if rep.uncovered:
        print("NOT COVERED:", sorted(rep.uncovered))
    ok = not rep.mismatches and not rep.findings and not rep.uncovered
    s = rep.stats
    print(f"emulate_persistent: {'OK' if ok else 'FAILED'}: {s['cases']} cases "
          f"(forward; {s['backward']} with backward; {s['cluster']} of the cluster variant), "
          f"{len(rep.mismatches)} mismatched, "
          f"{len(rep.findings)} distinct findings, tiles {sorted(s['tiles'])}, "
          f"max rel err {s['max_err']:.2e}, CPU ops {'on' if ops else 'off'}, "
          f"{rep.seconds:.1f}s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
