"""Drop-in recurrent modules.

`RNN`, `LSTM` and `GRU` are torch.nn.RNNBase modules built as torch.nn's are: the
constructor, parameter names, shapes, initialisation and gate order are torch.nn's own,
so a torch.nn state_dict loads unchanged; only `forward` differs: it runs rnnfast's fused
kernels. They derive from RNNBase rather than from nn.RNN / nn.LSTM / nn.GRU because
torch.compile refuses to trace any instance of those three (it breaks the graph there),
and rnnfast's layers are meant to compile into one graph.

`SimpleRNN` is the classic tutorial cell (i2h and i2o over cat(input, hidden), LogSoftmax
output) with a fused path over whole sequences.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from . import functional as RF


def _weight_names(module: nn.RNNBase):
    """Per layer and direction, the attribute names of (w_ih, w_hh, b_ih, b_hh) with None
    for absent biases, and w_hr's last for an LSTM with proj_size (from torch.nn's
    _all_weights, which the constructor fixes)."""
    layers = []
    for names in module._all_weights:
        by_kind = {n.split("_l")[0]: n for n in names}
        w = tuple(by_kind.get(k) for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
        layers.append(w + (by_kind["weight_hr"],) if "weight_hr" in by_kind else w)
    return tuple(layers)


def _layer_weights(module: nn.RNNBase):
    """Per layer and direction, (w_ih, w_hh, b_ih, b_hh) with None for absent biases, and
    w_hr last for an LSTM with proj_size: each looked up by name at every call (so a
    replaced or parametrized weight is the one used), the names worked out once per
    module (a module unpickled from before they were kept works them out each call)."""
    layers = getattr(module, "_rnnfast_weight_names", None) or _weight_names(module)
    # a registered parameter straight from _parameters (Module.__getattr__ is a Python call
    # per name); a name not there (parametrized: a property now) by getattr. Plain loops:
    # at the smallest sizes a call's Python is most of its time
    params = module._parameters
    out = []
    for names in layers:
        ws = []
        for n in names:
            ws.append(None if n is None else params[n] if n in params else getattr(module, n))
        out.append(tuple(ws))
    return out


# whether autocast is on for any device (what torch.nn's RNNBase.check_input asks), or None
_ANY_AUTOCAST = getattr(torch._C, "_is_any_autocast_enabled", None)


def _autocast(module: nn.Module, x: Tensor, hx, weights):
    """Under torch.autocast, what torch.nn does: input, states and weights in the autocast
    dtype (float32 ones; float64 stays), run by the float16/bfloat16 kernels, which
    accumulate and keep the cell state in float32 (on the CPU every step runs in float32).
    On CUDA the layers (not the cells) use float16 whatever autocast asks for, as torch.nn's
    cuDNN layers do. On the CPU torch's autocast lowers RNN, RNNCell and LSTM but leaves
    GRU, GRUCell and LSTMCell in float32 (its CPU op lists); each module's _cpu_autocast
    follows that, so the output dtypes are torch.nn's.
    Returns (x, hx, weights)."""
    if _ANY_AUTOCAST is not None and not _ANY_AUTOCAST():  # the common case, cheaply
        return x, hx, weights
    dev = x.device.type
    if dev not in ("cpu", "cuda") or not torch.is_autocast_enabled(dev) or (
            dev == "cpu" and not module._cpu_autocast):
        return x, hx, weights
    # on CUDA torch's autocast casts cuDNN's RNN layers to float16 whatever dtype it was
    # asked for (the cells follow the asked dtype); the layers here do the same
    low = (torch.float16 if dev == "cuda" and isinstance(module, nn.RNNBase)
           else torch.get_autocast_dtype(dev))

    def cast(t):
        if t is None or not t.is_floating_point() or t.dtype in (torch.float64, low):
            return t
        return t.to(low)

    if isinstance(hx, tuple):
        hx = tuple(cast(s) for s in hx)
    else:
        hx = cast(hx)
    weights = [tuple(cast(w) for w in ws) for ws in weights]
    return cast(x), hx, weights


def _packed_forward(module: nn.RNNBase, input: PackedSequence, hx, n_states: int, run_packed):
    """forward over a PackedSequence, as torch.nn: hx (given in the caller's batch order)
    is permuted to the sorted order, the final states back to the caller's."""
    name = type(module).__name__
    data, batch_sizes, sorted_indices, unsorted_indices = input
    if data.dim() != 2:
        raise ValueError(f"{name}: expected PackedSequence data of 2 dims [rows, {module.input_size}], "
                         f"but got {data.dim()} dims")
    RF.check_batch_sizes(batch_sizes, data.size(0))
    if hx is None:
        shape = (module.num_layers * (2 if module.bidirectional else 1), int(batch_sizes[0]))
        zeros = torch.zeros(*shape, module.hidden_size, dtype=data.dtype, device=data.device)
        hx = (zeros.new_zeros(*shape, module.proj_size or module.hidden_size), zeros) \
            if n_states == 2 else zeros
    else:
        hx = module.permute_hidden(hx, sorted_indices)
    module.check_forward_args(data, hx, batch_sizes)
    data, hx, weights = _autocast(module, data, hx, _layer_weights(module))
    RF._check_input(data)
    out, state = run_packed(data, batch_sizes, hx, weights)
    return (PackedSequence(out, batch_sizes, sorted_indices, unsorted_indices),
            module.permute_hidden(state, unsorted_indices))


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


def _zeros_state(module: nn.RNNBase, input: Tensor, size: Optional[int] = None) -> Tensor:
    D = 2 if module.bidirectional else 1
    N = input.size(0) if module.batch_first else input.size(1)
    return torch.zeros(module.num_layers * D, N, size or module.hidden_size,
                       dtype=input.dtype, device=input.device)


def _time_major(module: nn.RNNBase, input: Tensor) -> Tensor:
    x = input.transpose(0, 1) if module.batch_first else input
    if x.size(0) == 0:  # torch.nn's own error (the functional layers do take T = 0)
        raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
    return x


def _restore(module: nn.RNNBase, output: Tensor, is_batched: bool) -> Tensor:
    if module.batch_first:
        output = output.transpose(0, 1)
    return output if is_batched else output.squeeze(0 if module.batch_first else 1)


def _forward_one_state(module: nn.RNNBase, input: Tensor, hx: Optional[Tensor], run):
    """forward of the cells with one state (RNN, GRU): torch.nn's checks and shapes around
    run(x [T, N, C], hx [L * D, N, H], weights) -> (output, h_n)."""
    input, hx, is_batched = _batch_input(module, input, hx, 1)
    if hx is None:
        hx = _zeros_state(module, input)
    module.check_forward_args(input, hx, None)
    input, hx, weights = _autocast(module, input, hx, _layer_weights(module))
    # (the input's checks, RF._check_input, are the layer functions' own)
    output, h_n = run(_time_major(module, input), hx, weights)
    return _restore(module, output, is_batched), h_n if is_batched else h_n.squeeze(1)


class RNN(nn.RNNBase):
    """Elman RNN with tanh or relu, drop-in for torch.nn.RNN (same arguments, in the same
    positional order, and parameters), computed by rnnfast's fused kernels."""
    _cpu_autocast = True

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 nonlinearity: str = "tanh", bias: bool = True, batch_first: bool = False,
                 dropout: float = 0.0, bidirectional: bool = False, device=None, dtype=None):
        modes = {"tanh": "RNN_TANH", "relu": "RNN_RELU"}
        if nonlinearity not in modes:
            raise ValueError(f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'.")
        self.nonlinearity = nonlinearity
        super().__init__(modes[nonlinearity], input_size, hidden_size, num_layers, bias, batch_first,
                         dropout, bidirectional, 0, device, dtype)
        self._rnnfast_weight_names = _weight_names(self)

    def forward(self, input, hx: Optional[Tensor] = None):
        if isinstance(input, PackedSequence):
            return _packed_forward(self, input, hx, 1, lambda x, b, h, w: RF.rnn_packed(
                x, b, h, w, self.num_layers, self.nonlinearity, self.bidirectional, self.dropout,
                self.training))
        return _forward_one_state(self, input, hx, lambda x, h, w: RF.rnn(
            x, h, w, self.num_layers, self.nonlinearity, self.bidirectional, self.dropout,
            self.training))


class LSTM(nn.RNNBase):
    """LSTM, drop-in for torch.nn.LSTM (same arguments, in the same positional order, and
    parameters), computed by rnnfast's fused kernels. With proj_size P each step's
    h = W_hr (o * tanh(c)) has P units (functional._lstm_projected says how)."""
    _cpu_autocast = True

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 proj_size: int = 0, device=None, dtype=None):
        super().__init__("LSTM", input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, proj_size, device, dtype)
        self._rnnfast_weight_names = _weight_names(self)

    # torch.nn.LSTM's own checks and state permutation (two states, c of hidden_size)
    get_expected_cell_size = nn.LSTM.get_expected_cell_size
    check_forward_args = nn.LSTM.check_forward_args
    permute_hidden = nn.LSTM.permute_hidden

    def forward(self, input, hx: Optional[Tuple[Tensor, Tensor]] = None):
        if isinstance(input, PackedSequence):
            return _packed_forward(self, input, hx, 2, lambda x, b, h, w: RF.lstm_packed(
                x, b, h, w, self.num_layers, self.bidirectional, self.dropout, self.training))
        input, hx, is_batched = _batch_input(self, input, hx, 2)
        if hx is None:  # h has proj_size units where there is a projection, c hidden_size
            hx = (_zeros_state(self, input, self.proj_size), _zeros_state(self, input))
        self.check_forward_args(input, hx, None)
        input, hx, weights = _autocast(self, input, hx, _layer_weights(self))
        RF._check_input(input)
        output, (h_n, c_n) = RF.lstm(_time_major(self, input), hx, weights, self.num_layers,
                                     self.bidirectional, self.dropout, self.training)
        if not is_batched:
            h_n, c_n = h_n.squeeze(1), c_n.squeeze(1)
        return _restore(self, output, is_batched), (h_n, c_n)


class GRU(nn.RNNBase):
    """GRU, drop-in for torch.nn.GRU (same arguments, in the same positional order, and
    parameters), computed by rnnfast's fused kernels."""
    _cpu_autocast = False

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 device=None, dtype=None):
        super().__init__("GRU", input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, 0, device, dtype)
        self._rnnfast_weight_names = _weight_names(self)

    def forward(self, input, hx: Optional[Tensor] = None):
        if isinstance(input, PackedSequence):
            return _packed_forward(self, input, hx, 1, lambda x, b, h, w: RF.gru_packed(
                x, b, h, w, self.num_layers, self.bidirectional, self.dropout, self.training))
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


def _cell_input(cell: nn.RNNCellBase, input: Tensor, hx, n_states: int):
    """torch.nn's cell checks: input [N, C] or [C]; states [N, H] or [H] to match, zeros
    when hx is None. Returns (input [N, C], states tuple, is_batched)."""
    name = type(cell).__name__
    if not isinstance(input, Tensor):
        raise TypeError(f"{name}: expected input to be a Tensor, but got {type(input).__name__}")
    if input.dim() not in (1, 2):
        raise ValueError(f"{name}: Expected input to be 1D or 2D, got {input.dim()}D instead")
    if input.size(-1) != cell.input_size:
        raise RuntimeError(f"{name}: expected input with {cell.input_size} features (input_size), "
                           f"but got {input.size(-1)}")
    is_batched = input.dim() == 2
    if not is_batched:
        input = input.unsqueeze(0)
    N = input.size(0)
    if hx is None:
        zeros = input.new_zeros(N, cell.hidden_size)
        return input, (zeros,) * n_states, is_batched
    states = (hx,) if n_states == 1 else tuple(hx)
    if len(states) != n_states:
        raise ValueError(f"{name}: expected hx to be a tuple (h_0, c_0), but got {len(states)} tensors")
    want = 2 if is_batched else 1
    for s in states:
        if not isinstance(s, Tensor) or s.dim() != want:
            got = f"{s.dim()}D" if isinstance(s, Tensor) else type(s).__name__
            raise RuntimeError(f"{name}: expected hidden state of {want}D to match the {input.dim() if is_batched else 1}D "
                               f"input, but got {got}")
    if not is_batched:
        states = tuple(s.unsqueeze(0) for s in states)
    for s in states:
        if s.shape != (N, cell.hidden_size):
            raise RuntimeError(f"{name}: expected hidden state of shape {[N, cell.hidden_size]}, "
                               f"but got {list(s.shape)}")
    return input, states, is_batched


def _cell_weights(cell: nn.RNNCellBase):
    return cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh


class RNNCell(nn.RNNCell):
    """One Elman step (tanh or relu), drop-in for torch.nn.RNNCell: one fused op call."""
    _cpu_autocast = True

    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tensor:
        x, (h,), is_batched = _cell_input(self, input, hx, 1)
        x, h, (w,) = _autocast(self, x, h, [_cell_weights(self)])
        RF._check_input(x)
        _, h1 = RF.rnn_layer(x.unsqueeze(0), h, *w, nonlinearity=self.nonlinearity)
        return h1 if is_batched else h1.squeeze(0)


class LSTMCell(nn.LSTMCell):
    """One LSTM step, drop-in for torch.nn.LSTMCell: one fused op call."""
    _cpu_autocast = False

    def forward(self, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]] = None) -> Tuple[Tensor, Tensor]:
        x, (h, c), is_batched = _cell_input(self, input, hx, 2)
        x, (h, c), (w,) = _autocast(self, x, (h, c), [_cell_weights(self)])
        RF._check_input(x)
        _, h1, c1 = RF.lstm_layer(x.unsqueeze(0), h, c, *w)
        return (h1, c1) if is_batched else (h1.squeeze(0), c1.squeeze(0))


class GRUCell(nn.GRUCell):
    """One GRU step, drop-in for torch.nn.GRUCell: one fused op call."""
    _cpu_autocast = False

    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tensor:
        x, (h,), is_batched = _cell_input(self, input, hx, 1)
        x, h, (w,) = _autocast(self, x, h, [_cell_weights(self)])
        RF._check_input(x)
        _, h1 = RF.gru_layer(x.unsqueeze(0), h, *w)
        return h1 if is_batched else h1.squeeze(0)


_CONVERSIONS = {nn.RNN: RNN, nn.LSTM: LSTM, nn.GRU: GRU,
                nn.RNNCell: RNNCell, nn.LSTMCell: LSTMCell, nn.GRUCell: GRUCell}


def convert(model: nn.Module) -> nn.Module:
    """Makes every torch.nn RNN, LSTM, GRU, RNNCell, LSTMCell and GRUCell inside `model`
    (`model` itself included) run on rnnfast, in place, and returns `model`.

    Each module keeps its identity, its parameters (the same Parameter objects, so an
    optimizer made before still updates them), buffers, hooks and state_dict keys; only
    its class changes to rnnfast's, whose forward runs the fused kernels (the layers then
    are nn.RNNBase but no longer nn.LSTM etc. instances; see the module docstring).
    Subclasses of the torch.nn modules (which may override forward) are left alone."""
    for module in model.modules():
        target = _CONVERSIONS.get(type(module))
        if target is None:
            continue
        module.__class__ = target
    return model
