"""PackedSequence and LSTM proj_size against torch.nn, side by side (interleaved timing):
    python -m benchmarks.packed_proj
T=100, N=32 sequences of random lengths 20-100 (one of 100), C=H=256, 2 threads."""
import torch, rnnfast
from torch.nn.utils.rnn import pack_padded_sequence
from rnnfast.bench.timing import time_interleaved
torch.set_num_threads(2)
g = torch.Generator().manual_seed(0)
for cell, kw in (("lstm", {}), ("gru", {}), ("lstm", {"num_layers": 2, "bidirectional": True}), ("lstm-proj", {"proj_size": 128})):
    nn_cls = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "lstm-proj": torch.nn.LSTM}[cell]
    f_cls = {"lstm": rnnfast.LSTM, "gru": rnnfast.GRU, "lstm-proj": rnnfast.LSTM}[cell]
    torch.manual_seed(0)
    m = nn_cls(256, 256, **kw); f = f_cls(256, 256, **kw); f.load_state_dict(m.state_dict())
    T, N = 100, 32
    lengths = torch.randint(20, T + 1, (N,), generator=g).tolist(); lengths[0] = T
    x = torch.randn(T, N, 256, generator=g)
    packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
    inp = packed if cell != "lstm-proj" else x
    for mode in ("fwd", "fwdbwd"):
        def mk(mod):
            def step():
                if mode == "fwd":
                    with torch.no_grad(): mod(inp)
                else:
                    out = mod(inp)[0]
                    (out.data if hasattr(out, "batch_sizes") else out).sum().backward(); mod.zero_grad(set_to_none=True)
            return step
        res, err = time_interleaved({"rnnfast": mk(f), "torch.nn": mk(m)}, repeats=7, min_time=1.0)
        print(cell, kw, "packed" if cell != "lstm-proj" else "padded", mode, {k: round(v[0]*1e3, 2) for k, v in res.items()}, "speedup %.2fx" % (res["torch.nn"][0] / res["rnnfast"][0]), err or "", flush=True)
