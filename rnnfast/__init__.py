"""rnnfast: fused recurrent layers for PyTorch, drop-in for torch.nn."""
from . import functional, reference
from .modules import GRU, LSTM, RNN, SimpleRNN

__all__ = ["RNN", "LSTM", "GRU", "SimpleRNN", "functional", "reference"]
__version__ = "0.1.0"
