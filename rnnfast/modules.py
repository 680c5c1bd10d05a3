"""Drop-in recurrent modules.

`RNN`, `LSTM` and `GRU` are subclasses of their torch.nn counterparts: the constructor,
parameter names, shapes, initialisation and gate order are torch.nn's own, so a torch.nn
state_dict loads unchanged and `isinstance(m, torch.nn.LSTM)` still holds. Only `forward`
differs: it runs rnnfast's fused kernels.

`SimpleRNN` is the classic tutorial cell (i2h and i2o over cat(input, hidden), LogSoftmax
output) with a fused path over whole sequences.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from . import functional as RF


def _layer_weights(module: nn.RNNBase):
    """Per layer and direction, (w_ih, w_hh, b_ih, b_hh) with None for absent biases."""
    weights = []
    for names in module._all_weights:
        params = [getattr(module, n) for n in names]
        weights.append(tuple(params) if len(params) == 4 else (params[0], params[1], None, None))
    return weights


def _unsupported(module: nn.RNNBase, input) -> None:
    if isinstance(input, PackedSequence):
        raise NotImplementedError(
            f"rnnfast.{type(module).__name__}: PackedSequence input is not supported yet; "
            "pass a padded tensor")


def _batch_input(module: nn.RNNBase, input: Tensor, hx, n_states: int):
    """torch.nn's shape handling: 2-D (unbatched) or 3-D input, states to match.
    Returns (input [3-D], hx or None, is_batched)."""
    name = type(module).__name__
    if not isinstance(input, Tensor):
        raise TypeError(f"{name}: expected input to be a Tensor, but got {type(input).__name__}")
    if input.dim() not in (2, 3):
        raise ValueError(f"{name}: Expected input to be 2D or 3D, got {input.dim()}D tensor instead")
    is_batched = input.dim() == 3
    states = () if hx is None else ((hx,) if n_states == 1 else tuple(hx))
    if hx is not None and n_states == 2 and len(states) != 2:
        raise ValueError(f"{name}: expected hx to be a tuple (h_0, c_0), but got {len(states)} tensors")
    want = 3 if is_batched else 2
    for s in states:
        if s.dim() != want:
            kind = "batched 3-D" if is_batched else "unbatched 2-D"
            raise RuntimeError(
                f"For {kind} input, hx and cx should also be {want}-D but got {s.dim()}-D tensors"
                if n_states == 2 else
                f"For {kind} input, hx should also be {want}-D but got {s.dim()}-D tensor")
    if not is_batched:
        input = input.unsqueeze(0 if module.batch_first else 1)
        states = tuple(s.unsqueeze(1) for s in states)
    if hx is None:
        return input, None, is_batched
    return input, (states[0] if n_states == 1 else states), is_batched


def _zeros_state(module: nn.RNNBase, input: Tensor) -> Tensor:
    D = 2 if module.bidirectional else 1
    N = input.size(0) if module.batch_first else input.size(1)
    return torch.zeros(module.num_layers * D, N, module.hidden_size,
                       dtype=input.dtype, device=input.device)


def _time_major(module: nn.RNNBase, input: Tensor) -> Tensor:
    return input.transpose(0, 1) if module.batch_first else input


def _restore(module: nn.RNNBase, output: Tensor, is_batched: bool) -> Tensor:
    if module.batch_first:
        output = output.transpose(0, 1)
    return output if is_batched else output.squeeze(0 if module.batch_first else 1)


def _forward_one_state(module: nn.RNNBase, input: Tensor, hx: Optional[Tensor], run):
    """forward of the cells with one state (RNN, GRU): torch.nn's checks and shapes around
    run(x [T, N, C], hx [L * D, N, H], weights) -> (output, h_n)."""
    _unsupported(module, input)
    input, hx, is_batched = _batch_input(module, input, hx, 1)
    if hx is None:
        hx = _zeros_state(module, input)
    module.check_forward_args(input, hx, None)
    RF._check_input(input)
    output, h_n = run(_time_major(module, input), hx, _layer_weights(module))
    return _restore(module, output, is_batched), h_n if is_batched else h_n.squeeze(1)


class RNN(nn.RNN):
    """Elman RNN with tanh or relu, drop-in for torch.nn.RNN (same arguments and
    parameters), computed by rnnfast's fused kernels."""

    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        return _forward_one_state(self, input, hx, lambda x, h, w: RF.rnn(
            x, h, w, self.num_layers, self.nonlinearity, self.bidirectional, self.dropout,
            self.training))


class LSTM(nn.LSTM):
    """LSTM, drop-in for torch.nn.LSTM (same arguments and parameters), computed by
    rnnfast's fused kernels. proj_size is not supported yet."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.proj_size > 0:
            raise NotImplementedError("rnnfast.LSTM: proj_size > 0 is not supported yet")

    def forward(self, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]] = None
                ) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
        _unsupported(self, input)
        input, hx, is_batched = _batch_input(self, input, hx, 2)
        if hx is None:
            zeros = _zeros_state(self, input)
            hx = (zeros, zeros)
        self.check_forward_args(input, hx, None)
        RF._check_input(input)
        output, (h_n, c_n) = RF.lstm(_time_major(self, input), hx, _layer_weights(self),
                                     self.num_layers, self.bidirectional, self.dropout,
                                     self.training)
        if not is_batched:
            h_n, c_n = h_n.squeeze(1), c_n.squeeze(1)
        return _restore(self, output, is_batched), (h_n, c_n)


class GRU(nn.GRU):
    """GRU, drop-in for torch.nn.GRU (same arguments and parameters), computed by
    rnnfast's fused kernels."""

    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        return _forward_one_state(self, input, hx, lambda x, h, w: RF.gru(
            x, h, w, self.num_layers, self.bidirectional, self.dropout, self.training))


class SimpleRNN(nn.Module):
    """The classic tutorial RNN cell, drop-in (same submodules and state_dict keys):

        combined   = cat(input, hidden)
        new_hidden = i2h(combined)                 (tanh(i2h(combined)) with nonlinearity="tanh")
        output     = LogSoftmax(i2o(combined))

    `forward(input, hidden)` runs one step, as the tutorial does; `forward_sequence` runs a
    whole sequence with the recurrence fused into one kernel call.
    """

    def __init__(self, input_size: int, hidden_size: int, output_size: int,
                 nonlinearity: Optional[str] = None, device=None, dtype=None):
        super().__init__()
        if nonlinearity not in (None, "tanh"):
            raise ValueError(f"SimpleRNN: expected nonlinearity None or 'tanh', but got {nonlinearity!r}")
        factory = {"device": device, "dtype": dtype}
        self.input_size, self.hidden_size, self.output_size = input_size, hidden_size, output_size
        self.nonlinearity = nonlinearity
        self.i2h = nn.Linear(input_size + hidden_size, hidden_size, **factory)
        self.i2o = nn.Linear(input_size + hidden_size, output_size, **factory)
        self.softmax = nn.LogSoftmax(dim=1)

    def forward(self, input: Tensor, hidden: Tensor) -> Tuple[Tensor, Tensor]:
        combined = torch.cat((input, hidden), 1)
        new_hidden = self.i2h(combined)
        if self.nonlinearity == "tanh":
            new_hidden = torch.tanh(new_hidden)
        return self.softmax(self.i2o(combined)), new_hidden

    def initHidden(self) -> Tensor:
        w = self.i2h.weight
        return torch.zeros(1, self.hidden_size, device=w.device, dtype=w.dtype)

    def forward_sequence(self, inputs: Tensor, hidden: Optional[Tensor] = None
                         ) -> Tuple[Tensor, Tensor]:
        """inputs [T, N, input_size], hidden [N, hidden_size] (zeros when None) ->
        (log-probs of every step [T, N, output_size], last hidden [N, hidden_size]);
        the same as calling forward step by step."""
        if inputs.dim() != 3 or inputs.size(2) != self.input_size:
            raise ValueError(f"SimpleRNN.forward_sequence: expected inputs of shape "
                             f"[T, N, {self.input_size}], but got {list(inputs.shape)}")
        T, N, C = inputs.shape
        if hidden is None:
            hidden = inputs.new_zeros(N, self.hidden_size)
        if hidden.shape != (N, self.hidden_size):
            raise ValueError(f"SimpleRNN.forward_sequence: expected hidden of shape "
                             f"[{N}, {self.hidden_size}], but got {list(hidden.shape)}")
        RF._check_input(inputs)
        w = self.i2h.weight
        hs, h_last = RF.rnn_layer(inputs, hidden, w[:, :C], w[:, C:], self.i2h.bias, None,
                                  nonlinearity=self.nonlinearity or "identity")
        # the output at step t reads the hidden state *before* the step: h_{t-1}
        h_before = torch.cat((hidden.unsqueeze(0), hs[:-1]), 0)
        logits = self.i2o(torch.cat((inputs, h_before), 2))
        return torch.log_softmax(logits, dim=2), h_last
