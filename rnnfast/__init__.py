"""rnnfast: fused recurrent layers for PyTorch, drop-in for torch.nn."""
from . import functional, reference
from ._ops import cuda_path, get_cuda_path, last_cuda_path, set_cuda_path
from .modules import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell, SimpleRNN, convert

__all__ = ["RNN", "LSTM", "GRU", "RNNCell", "LSTMCell", "GRUCell", "SimpleRNN", "convert",
           "functional", "reference", "cuda_path", "get_cuda_path", "set_cuda_path",
           "last_cuda_path"]
__version__ = "0.1.0"
