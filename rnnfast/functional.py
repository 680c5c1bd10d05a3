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

LayerWeights = Sequence[Optional[Tensor]]  # (w_ih, w_hh, b_ih, b_hh), biases may be None

_CPU_DTYPES = (torch.float32, torch.float64)
_CUDA_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_HAS_CUDA_KERNELS = torch._C._dispatch_has_kernel_for_dispatch_key("rnnfast::rnn_forward", "CUDA")


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _check_input(x: Tensor) -> None:
    """What the kernels cannot take gets a clear error here, before any op runs."""
    if x.device.type == "cuda":
        if not _HAS_CUDA_KERNELS:
            raise RuntimeError("rnnfast: got a CUDA input, but this build of rnnfast has no "
                               "CUDA kernels (they need a CUDA build of torch and a CUDA "
                               "toolkit)")
        if x.dtype not in _CUDA_DTYPES:
            raise TypeError(f"rnnfast: expected CUDA input of dtype torch.float32, float64, "
                            f"float16 or bfloat16, but got {x.dtype}")
    elif x.dtype not in _CPU_DTYPES:
        raise TypeError(f"rnnfast: expected input of dtype torch.float32 or torch.float64 "
                        f"on the CPU (float16 and bfloat16 run on CUDA), but got {x.dtype}")


def rnn_layer(x: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor] = None,
              b_hh: Optional[Tensor] = None, nonlinearity: str = "tanh",
              reverse: bool = False) -> Tuple[Tensor, Tensor]:
    """One Elman layer over x [T, N, C] from h0 [N, H]; returns y [T, N, H] and hn [N, H].

    nonlinearity: "tanh", "relu" or "identity" (SimpleRNN's linear recurrence).
    """
    if nonlinearity not in ACTIVATIONS:
        raise ValueError(f"rnnfast: expected nonlinearity 'tanh', 'relu' or 'identity', "
                         f"but got {nonlinearity!r}")
    _check_input(x)
    args = (x.contiguous(), h0.contiguous(), w_ih.contiguous(), w_hh.contiguous(),
            None if b_ih is None else b_ih.contiguous(),
            None if b_hh is None else b_hh.contiguous())
    act = ACTIVATIONS[nonlinearity]
    if _needs_grad(*args):
        return RNNFunction.apply(*args, act, reverse)
    return ops.rnn_forward(*args, act, reverse, False)


def lstm_layer(x: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor,
               b_ih: Optional[Tensor] = None, b_hh: Optional[Tensor] = None,
               reverse: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
    """One LSTM layer over x [T, N, C]; returns y [T, N, H], hn and cn [N, H]."""
    _check_input(x)
    args = (x.contiguous(), h0.contiguous(), c0.contiguous(), w_ih.contiguous(),
            w_hh.contiguous(), None if b_ih is None else b_ih.contiguous(),
            None if b_hh is None else b_hh.contiguous())
    if _needs_grad(*args):
        return LSTMFunction.apply(*args, reverse)
    return ops.lstm_forward(*args, reverse, False)[:3]


def gru_layer(x: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor] = None,
              b_hh: Optional[Tensor] = None, reverse: bool = False) -> Tuple[Tensor, Tensor]:
    """One GRU layer over x [T, N, C]; returns y [T, N, H] and hn [N, H]."""
    _check_input(x)
    args = (x.contiguous(), h0.contiguous(), w_ih.contiguous(), w_hh.contiguous(),
            None if b_ih is None else b_ih.contiguous(),
            None if b_hh is None else b_hh.contiguous())
    if _needs_grad(*args):
        return GRUFunction.apply(*args, reverse)
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


def rnn(x: Tensor, hx: Tensor, weights: Sequence[LayerWeights], num_layers: int = 1,
        nonlinearity: str = "tanh", bidirectional: bool = False, dropout: float = 0.0,
        training: bool = False) -> Tuple[Tensor, Tensor]:
    """Stacked Elman RNN: x [T, N, C], hx [L * D, N, H] -> (output [T, N, D * H], h_n)."""
    def run(x, s, w, reverse):
        return rnn_layer(x, s[0], *w, nonlinearity=nonlinearity, reverse=reverse)
    out, (h,) = _stack(run, x, (hx,), weights, num_layers, bidirectional, dropout, training)
    return out, torch.stack(h)


def lstm(x: Tensor, hx: Tuple[Tensor, Tensor], weights: Sequence[LayerWeights],
         num_layers: int = 1, bidirectional: bool = False, dropout: float = 0.0,
         training: bool = False) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
    """Stacked LSTM: x [T, N, C], (h0, c0) [L * D, N, H] -> (output, (h_n, c_n))."""
    def run(x, s, w, reverse):
        return lstm_layer(x, s[0], s[1], *w, reverse=reverse)
    out, (h, c) = _stack(run, x, hx, weights, num_layers, bidirectional, dropout, training)
    return out, (torch.stack(h), torch.stack(c))


def gru(x: Tensor, hx: Tensor, weights: Sequence[LayerWeights], num_layers: int = 1,
        bidirectional: bool = False, dropout: float = 0.0,
        training: bool = False) -> Tuple[Tensor, Tensor]:
    """Stacked GRU: x [T, N, C], hx [L * D, N, H] -> (output [T, N, D * H], h_n)."""
    def run(x, s, w, reverse):
        return gru_layer(x, s[0], *w, reverse=reverse)
    out, (h,) = _stack(run, x, (hx,), weights, num_layers, bidirectional, dropout, training)
    return out, torch.stack(h)
