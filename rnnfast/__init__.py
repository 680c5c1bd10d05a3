"""rnnfast: fused recurrent layers for PyTorch, drop-in for torch.nn."""
from . import functional, reference
from .modules import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell, SimpleRNN, convert

__all__ = ["RNN", "LSTM", "GRU", "RNNCell", "LSTMCell", "GRUCell", "SimpleRNN", "convert",
           "functional", "reference"]
__version__ = "0.1.0"
