"""torch.compile over models with rnnfast layers: one graph (fullgraph=True, where
torch.nn's RNNs break the graph), the same outputs and gradients as eager, and no
recompilation for each new sequence length."""
import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import rnnfast


class Net(nn.Module):
    def __init__(self, cell):
        super().__init__()
        cls = {"lstm": rnnfast.LSTM, "gru": rnnfast.GRU, "rnn": rnnfast.RNN}[cell]
        self.rnn = cls(5, 7, num_layers=2, bidirectional=True, batch_first=True)
        self.head = nn.Linear(14, 3)

    def forward(self, x):
        y, _ = self.rnn(x)
        return self.head(y).tanh()


def run(model, x):
    x = x.detach().clone().requires_grad_()
    out = model(x)
    grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(),
                                [x, *model.parameters()])
    return out.detach(), grads


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_fullgraph_matches_eager_without_recompiling_per_length(cell):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Net(cell)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    for T in (3, 5, 8, 13, 21):
        x = torch.randn(4, T, 5)
        out_e, grads_e = run(model, x)
        out_c, grads_c = run(compiled, x)
        torch.testing.assert_close(out_c, out_e, rtol=1e-6, atol=1e-6)
        for ge, gc in zip(grads_e, grads_c):
            torch.testing.assert_close(gc, ge, rtol=1e-6, atol=1e-6)
    # the first length compiles a static graph, the second a dynamic one that serves the rest
    assert counter.frame_count <= 2, f"{counter.frame_count} compilations for 5 lengths"


def test_inductor_compiles_lstm_model():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Net("lstm")
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(3, 6, 5)
    out_e, grads_e = run(model, x)
    out_c, grads_c = run(compiled, x)
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-6)
    for ge, gc in zip(grads_e, grads_c):
        torch.testing.assert_close(gc, ge, rtol=1e-5, atol=1e-6)
