"""Character-level language model: a 2-layer LSTM that reads text one character at a time
and learns to predict the next one.

    python -m examples.charlm                          # on the Python standard library's source
    python -m examples.charlm --corpus PATH            # a text file, or a folder of them
    python -m examples.charlm --layer torch            # the same training with torch.nn.LSTM

The default corpus is the first `--max-chars` characters of the standard library's own
top-level .py files in name order (os.path.dirname(os.__file__)): present wherever Python
is. The last tenth is held out. Training is truncated backpropagation through time: the
text is cut into `--batch-size` parallel streams, each read in chunks of `--bptt`
characters, the hidden state carried from chunk to chunk (detached). The score is bits
per character on the held-out text; at the end the model writes a sample.
"""
import math
import os
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import nn

import rnnfast

from . import common


def read_corpus(path, max_chars: int) -> str:
    """A file's text, or a folder's UTF-8 files in path order (for the default folder, the
    standard library's, only its top-level .py files), cut at max_chars."""
    if path is None:
        files = sorted(Path(os.path.dirname(os.__file__)).glob("*.py"))
    else:
        path = Path(path)
        if not path.exists():
            raise SystemExit(f"charlm: no such file or folder: {path}")
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    parts, size = [], 0
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):  # binary or unreadable files in a folder
            continue
        parts.append(text)
        size += len(text)
        if size >= max_chars:
            break
    corpus = "".join(parts)[:max_chars]
    if len(corpus) < 1000:
        raise SystemExit(f"charlm: the corpus {path} has {len(corpus)} characters of UTF-8 text; "
                         f"at least 1000 are needed")
    return corpus


def streams(ids: torch.Tensor, n: int) -> torch.Tensor:
    """ids [L] -> [L // n, n]: n consecutive stretches of the text, side by side."""
    length = len(ids) // n
    return ids[:length * n].view(n, length).t().contiguous()


class CharLM(nn.Module):
    def __init__(self, vocab: int, embed: int, hidden: int, num_layers: int, dropout: float):
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.lstm = nn.LSTM(embed, hidden, num_layers, dropout=dropout)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x, state=None):
        """x [T, N] character ids -> (logits [T, N, vocab], state)."""
        out, state = self.lstm(self.embed(x), state)
        return self.head(out), state


def build(args, vocab: int, layer: str):
    torch.manual_seed(args.seed)
    model = CharLM(vocab, args.embed, args.hidden, 2, args.dropout)
    if layer == "rnnfast":
        rnnfast.convert(model)
    model.to(args.device)
    return model, torch.optim.Adam(model.parameters(), lr=args.lr)


def train_step(model, optimizer, batch):
    """One chunk: batch = (x, y, state carried in). Returns (loss, state to carry on)."""
    x, y, state = batch
    optimizer.zero_grad()
    logits, state = model(x, state)
    loss = nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # the usual guard of LSTM LMs
    optimizer.step()
    return loss.item(), tuple(s.detach() for s in state)


@torch.no_grad()
def mean_loss(model, data: torch.Tensor, bptt: int) -> float:
    """Mean cross-entropy (nats per character) over data [L, N], state carried."""
    total, count, state = 0.0, 0, None
    for i in range(0, data.size(0) - 1, bptt):
        x, y = data[i:i + bptt], data[i + 1:i + 1 + bptt]
        x = x[:y.size(0)]
        logits, state = model(x, state)
        total += nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
        count += y.numel()
    return total / count


@torch.no_grad()
def sample(model, prompt_ids: torch.Tensor, length: int, temperature: float,
           generator: torch.Generator) -> list:
    logits, state = model(prompt_ids.unsqueeze(1))
    out = []
    for _ in range(length):
        probs = torch.softmax(logits[-1, 0].double().cpu() / temperature, dim=0)
        nxt = torch.multinomial(probs, 1, generator=generator)
        out.append(int(nxt))
        logits, state = model(nxt.to(prompt_ids.device).view(1, 1), state)
    return out


@torch.no_grad()
def surprisal(model, ids: torch.Tensor, context: int) -> torch.Tensor:
    """Bits the model needs for each of ids[context:], having read all that comes before."""
    logits, _ = model(ids[:-1].unsqueeze(1))
    nats = nn.functional.cross_entropy(logits[:, 0], ids[1:], reduction="none")
    return nats[context - 1:] / math.log(2)


def plot_surprisal(path, text: str, bits: np.ndarray, title: str, cols: int = 80, rows: int = 24):
    """The held-out text as written, each character on a background as dark as the bits
    the model needed for it: what it finds predictable and what surprises it."""
    lines, line, cur = [], "", []
    for ch, b in zip(text, bits):
        if ch == "\n" or len(line) == cols:
            lines.append((line, cur))
            line, cur = "", []
            if ch == "\n":
                continue
        line += ch
        cur.append(b)
        if len(lines) == rows:
            break
    lines = lines[:rows]
    vmax = 6.0
    fig, ax = plt.subplots(figsize=(11, 0.28 * rows + 1.0))
    cmap = plt.get_cmap("Reds")
    for r, (chars, bs) in enumerate(lines):
        for c, (ch, b) in enumerate(zip(chars, bs)):
            ax.add_patch(plt.Rectangle((c, r), 1, 1, color=cmap(min(b, vmax) / vmax), lw=0))
            if not ch.isspace():
                ax.text(c + 0.5, r + 0.55, ch, ha="center", va="center", family="monospace",
                        fontsize=8, color="white" if b > 0.6 * vmax else "black")
    ax.set_xlim(0, cols)
    ax.set_ylim(rows, 0)
    ax.set_axis_off()
    ax.set_title(title, fontsize=10)
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, vmax))
    fig.colorbar(sm, ax=ax, fraction=0.025, pad=0.01, label=f"bits for the character (>= {vmax:g} dark)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    p = common.parser(__doc__, epochs=8)
    p.add_argument("--corpus", default=None,
                   help="a text file or a folder of them (default: the standard library's source)")
    p.add_argument("--max-chars", type=int, default=400_000)
    p.add_argument("--embed", type=int, default=64)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--dropout", type=float, default=0.1, help="between the two LSTM layers")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--bptt", type=int, default=100, help="characters per chunk")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--sample-chars", type=int, default=600)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--prompt", default="def ")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "charlm"

    common.seed_all(args.seed)
    text = read_corpus(args.corpus, args.max_chars)
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    ids = torch.tensor([index[c] for c in text])
    n_train = int(0.9 * len(ids))
    train = streams(ids[:n_train], args.batch_size).to(args.device)
    held_out = streams(ids[n_train:], 8).to(args.device)
    print(f"corpus {args.corpus or 'standard library source'}: {len(text):,} characters, "
          f"{len(chars)} distinct; {n_train:,} for training in {args.batch_size} streams, "
          f"{len(ids) - n_train:,} held out; layer {args.layer}")

    def batches(epoch):
        for i in range(0, train.size(0) - args.bptt, args.bptt):
            yield train[i:i + args.bptt], train[i + 1:i + 1 + args.bptt], i == 0

    state = None

    def step(batch):
        nonlocal state
        x, y, first = batch
        loss, state = train_step(model, optimizer, (x, y, None if first else state))
        return loss

    def evaluate():
        model.eval()
        loss = mean_loss(model, held_out, args.bptt)
        model.train()
        return {"loss": loss, "bpc": loss / math.log(2)}

    model, optimizer = build(args, len(chars), args.layer)
    history = common.fit(args.epochs, batches, step, evaluate, f"charlm/{args.layer}")

    x0, y0, _ = next(iter(batches(0)))
    speed = common.speed_ratio(lambda layer: build(args, len(chars), layer), train_step,
                               (x0, y0, None), args.speed_seconds, args.device)

    model.eval()
    bpc = history["eval"][-1]["bpc"]
    prompt = "".join(c for c in args.prompt if c in index) or text[0]
    generated = sample(model, torch.tensor([index[c] for c in prompt], device=args.device),
                       args.sample_chars, args.temperature,
                       torch.Generator().manual_seed(args.seed))
    sampled = prompt + "".join(chars[i] for i in generated)
    print(f"held-out bits per character: {bpc:.3f} (uniform over the {len(chars)} characters: "
          f"{math.log2(len(chars)):.2f})")
    print(f"sample (temperature {args.temperature}):\n{'-' * 60}\n{sampled}\n{'-' * 60}")
    sample_path = args.out / f"{stem}-{args.layer}-sample.txt"
    sample_path.write_text(sampled)
    # the start of the held-out text, read after the 200 characters before it
    shown = ids[n_train - 200:n_train + 2000].to(args.device)
    bits = surprisal(model, shown, 200).cpu().numpy()
    surprisal_png = args.out / f"{stem}-{args.layer}-surprisal.png"
    plot_surprisal(surprisal_png, text[n_train:n_train + len(bits)], bits,
                   f"Held-out text, each character shaded by the bits the LSTM ({args.layer} "
                   f"layer) needed for it; {bpc:.2f} bits per character over all held-out text")
    metrics = {"held_out_bpc": bpc, "uniform_bpc": math.log2(len(chars)), "sample": sampled,
               "corpus_chars": len(text), "vocab": len(chars)}
    return common.finish(stem, args, history, speed, metrics, [surprisal_png, sample_path],
                         f"Character-level LM, 2-layer LSTM ({args.layer} layer)",
                         ylabel="cross-entropy (nats per character)")


if __name__ == "__main__":
    main()
