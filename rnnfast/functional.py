"""Functional entry points: one layer and direction (`rnn_layer`, `lstm_layer`,
`gru_layer`), and the whole stack of layers and directions that torch.nn's recurrent
modules run (`rnn`, `lstm`, `gru`).

Inputs here are time-major: x [T, N, C], states [L * D, N, H] (L layers, D directions).
"""
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._ops import ACTIVATIONS, GRUFunction, LSTMFunction, RNNFunction, ops

LayerWeights = Sequence[Optional[Tensor]]  # (w_ih, w_hh, b_ih, b_hh[, w_hr]), biases may be None

_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_HAS_CUDA_KERNELS = torch._C._dispatch_has_kernel_for_dispatch_key("rnnfast::rnn_forward", "CUDA")


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _check_input(x: Tensor, batch_sizes: Optional[Tensor] = None) -> None:
    """What the kernels cannot take gets a clear error here, before any op runs."""
    if batch_sizes is not None and x.is_cuda:
        raise ValueError("rnnfast: the packed layer ops (batch_sizes given) run on the CPU; "
                         "on CUDA, give the modules a PackedSequence (they run it by segments)")
    if x.is_cuda and not _HAS_CUDA_KERNELS:  # is_cuda: no torch.device made (a call's fixed cost)
        raise RuntimeError("rnnfast: got a CUDA input, but this build of rnnfast has no "
                           "CUDA kernels (they need a CUDA build of torch and a CUDA "
                           "toolkit)")
    if x.dtype not in _DTYPES:
        raise TypeError(f"rnnfast: expected input of dtype torch.float32, float64, float16 "
                        f"or bfloat16, but got {x.dtype}")


def rnn_layer(x: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor] = None,
              b_hh: Optional[Tensor] = None, nonlinearity: str = "tanh",
              reverse: bool = False, batch_sizes: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """One Elman layer over x [T, N, C] from h0 [N, H]; returns y [T, N, H] and hn [N, H].

    nonlinearity: "tanh", "relu" or "identity" (SimpleRNN's linear recurrence).
    batch_sizes: a PackedSequence's (CPU only): x is then its data [R, C] and y [R, H].
    """
    if nonlinearity not in ACTIVATIONS:
        raise ValueError(f"rnnfast: expected nonlinearity 'tanh', 'relu' or 'identity', "
                         f"but got {nonlinearity!r}")
    _check_input(x, batch_sizes)
    args = (x.contiguous(), h0.contiguous(), w_ih.contiguous(), w_hh.contiguous(),
            None if b_ih is None else b_ih.contiguous(),
            None if b_hh is None else b_hh.contiguous())
    act = ACTIVATIONS[nonlinearity]
    if _needs_grad(*args):
        return RNNFunction.apply(*args, act, reverse, batch_sizes)
    if batch_sizes is not None:
        return ops.rnn_packed_forward(args[0], batch_sizes, *args[1:], act, reverse, False)
    return ops.rnn_forward(*args, act, reverse, False)


def lstm_layer(x: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor,
               b_ih: Optional[Tensor] = None, b_hh: Optional[Tensor] = None,
               reverse: bool = False, w_hr: Optional[Tensor] = None,
               batch_sizes: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """One LSTM layer over x [T, N, C]; returns y [T, N, H], hn and cn [N, H].
    With w_hr [P, H] (torch.nn's proj_size P): h0, y and hn have P units, w_hh is [4H, P].
    batch_sizes: as rnn_layer's."""
    if w_hr is not None:
        return _lstm_projected(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, batch_sizes)
    _check_input(x, batch_sizes)
    args = (x.contiguous(), h0.contiguous(), c0.contiguous(), w_ih.contiguous(),
            w_hh.contiguous(), None if b_ih is None else b_ih.contiguous(),
            None if b_hh is None else b_hh.contiguous())
    if _needs_grad(*args):
        return LSTMFunction.apply(*args, reverse, batch_sizes)
    if batch_sizes is not None:
        return ops.lstm_packed_forward(args[0], batch_sizes, *args[1:], reverse, False)[:3]
    return ops.lstm_forward(*args, reverse, False)[:3]


def _lstm_projected(x: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor,
                    b_ih: Optional[Tensor], b_hh: Optional[Tensor], w_hr: Tensor,
                    reverse: bool, batch_sizes: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """The LSTM with a projection, h_t = W_hr m_t with m_t = o_t * tanh(c_t), on the fused
    LSTM op by a change of variables: W_hh h_{t-1} = (W_hh W_hr) m_{t-1}, so the sequence is
    an ordinary LSTM in m with the square recurrent weight W_hh W_hr [4H, H] from m = 0;
    h0's term W_hh h0 enters each sequence's first step through the input projection (x
    extended by h0 at that step only, W_ih by W_hh), and y = m W_hr^T is one GEMM after the
    loop. Packed data (batch_sizes): a sequence's first step read in reverse is its own last."""
    H, P = w_hh.shape[0] // 4, w_hr.shape[0]
    N = h0.shape[0]
    if x.shape[0] == 0:
        return x.new_zeros(*x.shape[:-1], P), h0, c0
    # in float32 at least: the product is one more rounding than torch.nn's per-step path
    w_rec = (w_hh.float() @ w_hr.float()).to(w_hh.dtype) if w_hh.dtype in (torch.float16, torch.bfloat16) \
        else w_hh @ w_hr
    h0 = h0.to(x.dtype)
    if batch_sizes is None:
        zeros = x.new_zeros(x.shape[0] - 1, N, P)
        extra = torch.cat([zeros, h0.unsqueeze(0)] if reverse else [h0.unsqueeze(0), zeros])
    elif not reverse:  # every sequence starts at time 0: the first N rows
        extra = torch.cat([h0, x.new_zeros(x.shape[0] - N, P)])
    else:  # rows [batch_sizes[t+1], batch_sizes[t]) start at time t, at rows offset(t) + those
        sizes = batch_sizes.tolist()
        rows, seqs, offset = [], [], 0
        for t, n in enumerate(sizes):
            after = sizes[t + 1] if t + 1 < len(sizes) else 0
            rows.extend(range(offset + after, offset + n))
            seqs.extend(range(after, n))
            offset += n
        extra = x.new_zeros(x.shape[0], P).index_put((torch.tensor(rows),), h0[torch.tensor(seqs)])
    m, m_n, c_n = lstm_layer(torch.cat([x, extra], dim=-1), x.new_zeros(N, H), c0,
                             torch.cat([w_ih, w_hh], dim=1), w_rec, b_ih, b_hh, reverse=reverse,
                             batch_sizes=batch_sizes)
    return m @ w_hr.t(), m_n @ w_hr.t(), c_n


def gru_layer(x: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor] = None,
              b_hh: Optional[Tensor] = None, reverse: bool = False,
              batch_sizes: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """One GRU layer over x [T, N, C]; returns y [T, N, H] and hn [N, H].
    batch_sizes: as rnn_layer's."""
    _check_input(x, batch_sizes)
    args = (x.contiguous(), h0.contiguous(), w_ih.contiguous(), w_hh.contiguous(),
            None if b_ih is None else b_ih.contiguous(),
            None if b_hh is None else b_hh.contiguous())
    if _needs_grad(*args):
        return GRUFunction.apply(*args, reverse, batch_sizes)
    if batch_sizes is not None:
        return ops.gru_packed_forward(args[0], batch_sizes, *args[1:], reverse, False)[:2]
    return ops.gru_forward(*args, reverse, False)[:2]


def _stack(run_layer, x: Tensor, states: Tuple[Tensor, ...], weights: Sequence[LayerWeights],
           num_layers: int, bidirectional: bool, dropout: float,
           training: bool) -> Tuple[Tensor, List[List[Tensor]]]:
    """Runs the layers and directions in torch.nn's order: each layer's directions see the
    same input, their outputs are concatenated on the feature axis, and dropout (in
    training, between layers only) is applied to that concatenation."""
    D = 2 if bidirectional else 1
    finals: List[List[Tensor]] = [[] for _ in states]
    for layer in range(num_layers):
        outputs = []
        for d in range(D):
            k = layer * D + d
            y, *final = run_layer(x, [s[k] for s in states], weights[k], reverse=d == 1)
            outputs.append(y)
            for acc, f in zip(finals, final):
                acc.append(f)
        x = outputs[0] if D == 1 else torch.cat(outputs, dim=2)
        if dropout > 0 and training and layer < num_layers - 1:
            x = F.dropout(x, dropout, training=True)
    return x, finals


# One layer and direction as _stack / _stack_packed call it:
# run(x, states, weights, reverse, batch_sizes=None)
def _rnn_runner(nonlinearity: str):
    def run(x, s, w, reverse, batch_sizes=None):
        return rnn_layer(x, s[0], *w, nonlinearity=nonlinearity, reverse=reverse,
                         batch_sizes=batch_sizes)
    return run


def _lstm_run(x, s, w, reverse, batch_sizes=None):
    return lstm_layer(x, s[0], s[1], *w[:4], reverse=reverse, w_hr=w[4] if len(w) > 4 else None,
                      batch_sizes=batch_sizes)


def _gru_run(x, s, w, reverse, batch_sizes=None):
    return gru_layer(x, s[0], *w, reverse=reverse, batch_sizes=batch_sizes)


def rnn(x: Tensor, hx: Tensor, weights: Sequence[LayerWeights], num_layers: int = 1,
        nonlinearity: str = "tanh", bidirectional: bool = False, dropout: float = 0.0,
        training: bool = False) -> Tuple[Tensor, Tensor]:
    """Stacked Elman RNN: x [T, N, C], hx [L * D, N, H] -> (output [T, N, D * H], h_n)."""
    # one layer and direction: no stacking, and its final state a view of the op's, which
    # every op returns freshly allocated (never a view of its output), so nothing is copied
    if num_layers == 1 and not bidirectional:
        out, h = rnn_layer(x, hx[0], *weights[0], nonlinearity=nonlinearity)
        return out, h.unsqueeze(0)
    out, (h,) = _stack(_rnn_runner(nonlinearity), x, (hx,), weights, num_layers, bidirectional, dropout, training)
    return out, torch.stack(h)


def lstm(x: Tensor, hx: Tuple[Tensor, Tensor], weights: Sequence[LayerWeights],
         num_layers: int = 1, bidirectional: bool = False, dropout: float = 0.0,
         training: bool = False) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
    """Stacked LSTM: x [T, N, C], (h0, c0) [L * D, N, H] -> (output, (h_n, c_n))."""
    if num_layers == 1 and not bidirectional:  # one layer: as rnn's
        out, h, c = _lstm_run(x, (hx[0][0], hx[1][0]), weights[0], False)
        return out, (h.unsqueeze(0), c.unsqueeze(0))
    out, (h, c) = _stack(_lstm_run, x, hx, weights, num_layers, bidirectional, dropout, training)
    return out, (torch.stack(h), torch.stack(c))


def gru(x: Tensor, hx: Tensor, weights: Sequence[LayerWeights], num_layers: int = 1,
        bidirectional: bool = False, dropout: float = 0.0,
        training: bool = False) -> Tuple[Tensor, Tensor]:
    """Stacked GRU: x [T, N, C], hx [L * D, N, H] -> (output [T, N, D * H], h_n)."""
    if num_layers == 1 and not bidirectional:  # one layer: as rnn's
        out, h = gru_layer(x, hx[0], *weights[0])
        return out, h.unsqueeze(0)
    out, (h,) = _stack(_gru_run, x, (hx,), weights, num_layers, bidirectional, dropout, training)
    return out, torch.stack(h)


# ---- PackedSequence: sequences of different lengths, sorted longest first ----
# Packed data [sum(batch_sizes), C] holds, for each step t, the rows of the batch_sizes[t]
# sequences still running. On the CPU the packed ops take it as it is: one call per layer
# and direction, each step over its live rows only. On CUDA, runs of steps with the same
# batch size ("segments") are rectangles
# [t1 - t0, n, C] in that layout, each one a single op call over only its live rows;
# across segments the state is carried (forward: the finished rows drop off; reverse: rows
# that start join with their h0). Either way padded steps are never computed.


# Whether the CPU runs PackedSequence input through the packed ops (False: by segments, as
# CUDA does; the tests turn it off to check that path on the CPU too).
PACKED_OPS = True


def check_batch_sizes(batch_sizes: Tensor, rows: int) -> List[int]:
    """A PackedSequence's batch_sizes as a list, checked: a 1-D integer CPU tensor of
    positive, non-increasing counts that add up to the data's rows."""
    if not isinstance(batch_sizes, Tensor) or batch_sizes.dim() != 1 or batch_sizes.dtype != torch.int64:
        raise ValueError(f"rnnfast: expected PackedSequence.batch_sizes to be a 1-D int64 tensor, but got "
                         f"{batch_sizes.dtype if isinstance(batch_sizes, Tensor) else type(batch_sizes).__name__}"
                         f"{'' if not isinstance(batch_sizes, Tensor) else f' of {batch_sizes.dim()} dims'}")
    sizes = batch_sizes.tolist()
    if not sizes:
        raise ValueError("rnnfast: expected a PackedSequence of at least one step, but batch_sizes is empty")
    if sizes[-1] < 1 or any(a < b for a, b in zip(sizes, sizes[1:])):
        raise ValueError(f"rnnfast: expected PackedSequence.batch_sizes to be positive and non-increasing "
                         f"(sequences sorted longest first), but got {sizes[:16]}{'...' if len(sizes) > 16 else ''}")
    if sum(sizes) != rows:
        raise ValueError(f"rnnfast: PackedSequence.batch_sizes adds up to {sum(sizes)} rows, but its data "
                         f"has {rows}")
    return sizes


def _segments(sizes: List[int]) -> List[Tuple[int, int, int, int]]:
    """Maximal runs of steps with the same batch size: (t0, t1, n, row offset of t0)."""
    segs, t0, row = [], 0, 0
    for t in range(1, len(sizes) + 1):
        if t == len(sizes) or sizes[t] != sizes[t0]:
            segs.append((t0, t, sizes[t0], row))
            row += (t - t0) * sizes[t0]
            t0 = t
    return segs


def _packed_direction(run_layer, data: Tensor, segs, states0: Tuple[Tensor, ...], weights,
                      reverse: bool) -> Tuple[Tensor, Tuple[Tensor, ...]]:
    """One layer and direction over packed data; states0 [N, H] each (N = batch_sizes[0]).
    Returns the packed output [rows, H] and the final states [N, H] in batch order."""
    outs: List[Optional[Tensor]] = [None] * len(segs)
    if not reverse:
        parts: List[List[Tensor]] = [[] for _ in states0]
        state = states0
        for k, (t0, t1, n, row) in enumerate(segs):
            x = data[row:row + (t1 - t0) * n].view(t1 - t0, n, data.size(1))
            y, *final = run_layer(x, [s[:n] for s in state], weights, reverse=False)
            outs[k] = y.reshape((t1 - t0) * n, y.size(2))
            n_next = segs[k + 1][2] if k + 1 < len(segs) else 0
            for acc, f in zip(parts, final):
                acc.append(f[n_next:])  # rows n_next..n-1 end here
            state = tuple(final)
        finals = tuple(torch.cat(acc[::-1]) if len(acc) > 1 else acc[0] for acc in parts)
    else:
        state = None
        for k in range(len(segs) - 1, -1, -1):
            t0, t1, n, row = segs[k]
            x = data[row:row + (t1 - t0) * n].view(t1 - t0, n, data.size(1))
            if state is None:
                init = [s[:n] for s in states0]
            else:  # rows state[0].size(0)..n-1 start here, from their h0
                m = state[0].size(0)
                init = [torch.cat([s, s0[m:n]]) if n > m else s for s, s0 in zip(state, states0)]
            y, *final = run_layer(x, init, weights, reverse=True)
            outs[k] = y.reshape((t1 - t0) * n, y.size(2))
            state = tuple(final)
        finals = state
    return torch.cat(outs) if len(outs) > 1 else outs[0], finals


def _stack_packed(run_layer, data: Tensor, batch_sizes: Tensor, states: Tuple[Tensor, ...],
                  weights: Sequence[LayerWeights], num_layers: int, bidirectional: bool,
                  dropout: float, training: bool) -> Tuple[Tensor, List[List[Tensor]]]:
    """_stack over packed data [rows, C] with states [L * D, N, H] in sorted batch order."""
    sizes = check_batch_sizes(batch_sizes, data.size(0))
    native = PACKED_OPS and not data.is_cuda
    segs = None if native else _segments(sizes)  # the segments only where they run
    D = 2 if bidirectional else 1
    finals: List[List[Tensor]] = [[] for _ in states]
    x = data
    for layer in range(num_layers):
        outputs = []
        for d in range(D):
            k = layer * D + d
            if native:
                y, *final = run_layer(x, [s[k] for s in states], weights[k], reverse=d == 1,
                                      batch_sizes=batch_sizes)
            else:
                y, final = _packed_direction(run_layer, x, segs, tuple(s[k] for s in states),
                                             weights[k], reverse=d == 1)
            outputs.append(y)
            for acc, f in zip(finals, final):
                acc.append(f)
        x = outputs[0] if D == 1 else torch.cat(outputs, dim=1)
        if dropout > 0 and training and layer < num_layers - 1:
            x = F.dropout(x, dropout, training=True)
    return x, finals


def rnn_packed(data: Tensor, batch_sizes: Tensor, hx: Tensor, weights: Sequence[LayerWeights],
               num_layers: int = 1, nonlinearity: str = "tanh", bidirectional: bool = False,
               dropout: float = 0.0, training: bool = False) -> Tuple[Tensor, Tensor]:
    """Stacked Elman RNN over packed data [rows, C] (sorted order) -> (packed output, h_n)."""
    out, (h,) = _stack_packed(_rnn_runner(nonlinearity), data, batch_sizes, (hx,), weights, num_layers, bidirectional,
                              dropout, training)
    return out, torch.stack(h)


def lstm_packed(data: Tensor, batch_sizes: Tensor, hx: Tuple[Tensor, Tensor],
                weights: Sequence[LayerWeights], num_layers: int = 1, bidirectional: bool = False,
                dropout: float = 0.0, training: bool = False) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
    """Stacked LSTM over packed data [rows, C] (sorted order) -> (packed output, (h_n, c_n))."""
    out, (h, c) = _stack_packed(_lstm_run, data, batch_sizes, hx, weights, num_layers, bidirectional,
                                dropout, training)
    return out, (torch.stack(h), torch.stack(c))


def gru_packed(data: Tensor, batch_sizes: Tensor, hx: Tensor, weights: Sequence[LayerWeights],
               num_layers: int = 1, bidirectional: bool = False, dropout: float = 0.0,
               training: bool = False) -> Tuple[Tensor, Tensor]:
    """Stacked GRU over packed data [rows, C] (sorted order) -> (packed output, h_n)."""
    out, (h,) = _stack_packed(_gru_run, data, batch_sizes, (hx,), weights, num_layers, bidirectional,
                              dropout, training)
    return out, torch.stack(h)
