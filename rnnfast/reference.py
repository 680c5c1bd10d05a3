"""Plain PyTorch reference: time loops written from the cell equations, independent of
the kernels. This is the ground truth the tests compare rnnfast with (in float64).

`forward(module, input, hx)` runs any module with torch.nn's parameter names (a torch.nn
or an rnnfast RNN/LSTM/GRU) without dropout; `simple_rnn_sequence` is the tutorial's
step loop for SimpleRNN, and `TutorialRNN` the tutorial's cell itself, as users have it in
their code (the module rnnfast.SimpleRNN replaces).
"""
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn


def rnn_cell(x: Tensor, h: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor],
             b_hh: Optional[Tensor], nonlinearity: str = "tanh") -> Tensor:
    pre = x @ w_ih.t() + h @ w_hh.t()
    if b_ih is not None:
        pre = pre + b_ih
    if b_hh is not None:
        pre = pre + b_hh
    if nonlinearity == "tanh":
        return torch.tanh(pre)
    if nonlinearity == "relu":
        return torch.relu(pre)
    if nonlinearity == "identity":
        return pre
    raise ValueError(f"unknown nonlinearity {nonlinearity!r}")


def lstm_cell(x: Tensor, h: Tensor, c: Tensor, w_ih: Tensor, w_hh: Tensor,
              b_ih: Optional[Tensor], b_hh: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    gates = x @ w_ih.t() + h @ w_hh.t()
    if b_ih is not None:
        gates = gates + b_ih
    if b_hh is not None:
        gates = gates + b_hh
    i, f, g, o = gates.chunk(4, dim=-1)
    i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
    c = f * c + i * g
    return o * torch.tanh(c), c


def gru_cell(x: Tensor, h: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor],
             b_hh: Optional[Tensor]) -> Tensor:
    gi = x @ w_ih.t()
    gh = h @ w_hh.t()
    if b_ih is not None:
        gi = gi + b_ih
    if b_hh is not None:
        gh = gh + b_hh
    i_r, i_z, i_n = gi.chunk(3, dim=-1)
    h_r, h_z, h_n = gh.chunk(3, dim=-1)
    r = torch.sigmoid(i_r + h_r)
    z = torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    return (1 - z) * n + z * h


def _params(module, layer: int, suffix: str):
    """(w_ih, w_hh, b_ih, b_hh) of one layer and direction, and w_hr (LSTM proj_size) or None."""
    get = lambda name: getattr(module, f"{name}_l{layer}{suffix}", None)  # noqa: E731
    return (get("weight_ih"), get("weight_hh"), get("bias_ih"), get("bias_hh")), get("weight_hr")


def forward(module, input: Tensor, hx=None, cells: Optional[Dict[str, Callable]] = None):
    """Runs `module` (torch.nn or rnnfast RNN/LSTM/GRU, no dropout) step by step.
    Same inputs and outputs as the module's forward, unbatched input included.
    `cells` may replace the cell functions by name ("rnn", "lstm", "gru"), with the same
    signatures (the benchmark passes torch.compile'd ones)."""
    cells = cells or {}
    rnn_step = cells.get("rnn", rnn_cell)
    lstm_step = cells.get("lstm", lstm_cell)
    gru_step = cells.get("gru", gru_cell)
    kind = {"RNN_TANH": "tanh", "RNN_RELU": "relu", "LSTM": "lstm", "GRU": "gru"}[module.mode]
    is_lstm = kind == "lstm"
    batched = input.dim() == 3
    if not batched:
        input = input.unsqueeze(0 if module.batch_first else 1)
        if hx is not None:
            hx = tuple(s.unsqueeze(1) for s in hx) if is_lstm else hx.unsqueeze(1)
    x = input.transpose(0, 1) if module.batch_first else input
    T, N = x.shape[:2]
    D = 2 if module.bidirectional else 1
    L, H = module.num_layers, module.hidden_size
    P = getattr(module, "proj_size", 0) or H  # LSTM proj_size: h has P units, c has H
    if hx is None:
        hx = (x.new_zeros(L * D, N, P), x.new_zeros(L * D, N, H)) if is_lstm else x.new_zeros(L * D, N, H)
    h0, c0 = hx if is_lstm else (hx, None)
    h_n: List[Tensor] = []
    c_n: List[Tensor] = []
    layer_input = x
    for layer in range(L):
        outputs = []
        for d in range(D):
            k = layer * D + d
            w, w_hr = _params(module, layer, "_reverse" if d == 1 else "")
            h, c = h0[k], (c0[k] if is_lstm else None)
            steps = range(T - 1, -1, -1) if d == 1 else range(T)
            ys: List[Optional[Tensor]] = [None] * T
            for t in steps:
                if is_lstm:
                    h, c = lstm_step(layer_input[t], h, c, *w)
                    if w_hr is not None:
                        h = h @ w_hr.t()
                elif kind == "gru":
                    h = gru_step(layer_input[t], h, *w)
                else:
                    h = rnn_step(layer_input[t], h, *w, nonlinearity=kind)
                ys[t] = h
            outputs.append(torch.stack(ys) if T else layer_input.new_zeros(0, N, P))
            h_n.append(h)
            if is_lstm:
                c_n.append(c)
        layer_input = torch.cat(outputs, dim=2)
    output = layer_input.transpose(0, 1) if module.batch_first else layer_input
    state = (torch.stack(h_n), torch.stack(c_n)) if is_lstm else torch.stack(h_n)
    if not batched:
        output = output.squeeze(0 if module.batch_first else 1)
        state = tuple(s.squeeze(1) for s in state) if is_lstm else state.squeeze(1)
    return output, state


def simple_rnn_sequence(module, inputs: Tensor, hidden: Optional[Tensor] = None):
    """The tutorial's loop for SimpleRNN: inputs [T, N, C] -> (log-probs [T, N, O], hidden)."""
    C = inputs.shape[2]
    w, b = module.i2h.weight, module.i2h.bias
    wo, bo = module.i2o.weight, module.i2o.bias
    if hidden is None:
        hidden = inputs.new_zeros(inputs.shape[1], module.hidden_size)
    outs = []
    for t in range(inputs.shape[0]):
        x = inputs[t]
        outs.append(torch.log_softmax(x @ wo[:, :C].t() + hidden @ wo[:, C:].t() + bo, dim=1))
        hidden = rnn_cell(x, hidden, w[:, :C], w[:, C:], b, None,
                          module.nonlinearity or "identity")
    return torch.stack(outs), hidden


class TutorialRNN(nn.Module):
    """The classic tutorial's cell in plain torch.nn: `i2h` and `i2o` over
    cat(input, hidden), LogSoftmax output, `initHidden()`."""

    def __init__(self, input_size, hidden_size, output_size):
        super().__init__()
        self.hidden_size = hidden_size
        self.i2h = nn.Linear(input_size + hidden_size, hidden_size)
        self.i2o = nn.Linear(input_size + hidden_size, output_size)
        self.softmax = nn.LogSoftmax(dim=1)

    def forward(self, input, hidden):
        combined = torch.cat((input, hidden), 1)
        hidden = self.i2h(combined)
        output = self.i2o(combined)
        output = self.softmax(output)
        return output, hidden

    def initHidden(self):
        return torch.zeros(1, self.hidden_size)
