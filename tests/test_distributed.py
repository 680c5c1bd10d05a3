"""rnnfast layers under DistributedDataParallel (gloo, 2 processes on the CPU): the
gradients after each step equal single-process training on the whole batch."""
import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import rnnfast

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.gru = rnnfast.GRU(6, 10, num_layers=2, bidirectional=True)
        self.lstm = rnnfast.LSTM(20, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        y, _ = self.gru(x)
        y, _ = self.lstm(y)
        return self.head(y[-1])


def make(seed=0):
    torch.manual_seed(seed)
    return Model().double()


def data(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(7, 8, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g)


def grads_after_steps(model, opt, steps, shard=None):
    """Gradients after each step (before the optimizer's update), as flat tensors."""
    out = []
    for step in range(steps):
        x, y = data(step)
        if shard is not None:  # this rank's half of the batch
            rank, world = shard
            n = x.size(1) // world
            x, y = x[:, rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        out.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).clone())
        opt.step()
    return out


def _worker(rank, world, port, path, steps):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = nn.parallel.DistributedDataParallel(make())
        opt = torch.optim.SGD(model.parameters(), lr=0.3)
        grads = grads_after_steps(model, opt, steps, shard=(rank, world))
        if rank == 0:
            torch.save(grads, path)
    finally:
        dist.destroy_process_group()
    # torch 2.14.1's gloo can abort ("terminate called without an active exception") while
    # the interpreter shuts down after a clean destroy_process_group: 9 of 40 runs with a bare
    # nn.Linear under DDP here, none of 100 when the worker leaves at once after its work is
    # done and saved. An error above still propagates and fails the spawn.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_gradients_equal_single_process(tmp_path):
    steps, world = 3, 2
    path = str(tmp_path / "ddp_grads.pt")
    mp.spawn(_worker, args=(world, _free_port(), path, steps), nprocs=world, join=True)
    ddp = torch.load(path)
    model = make()
    single = grads_after_steps(model, torch.optim.SGD(model.parameters(), lr=0.3), steps)
    assert len(ddp) == steps
    for step, (a, b) in enumerate(zip(ddp, single)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=f"step {step}")
