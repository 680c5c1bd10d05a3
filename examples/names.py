"""Name classification, the classic use of the simple RNN cell: which language a surname
comes from, read letter by letter.

    python -m examples.names                      # rnnfast.SimpleRNN (fused sequence path)
    python -m examples.names --model gru          # or lstm: rnnfast.GRU / rnnfast.LSTM
    python -m examples.names --layer torch        # the same training with torch.nn

The surnames are the per-locale lists that Faker ships (read from its provider classes,
nothing is downloaded), folded to ASCII letters. `--model simple` is the tutorial's cell
(i2h and i2o over cat(letter, hidden), LogSoftmax): with `--layer torch` it is that cell
in plain torch.nn, stepped letter by letter as the tutorial does; with rnnfast it is
rnnfast.SimpleRNN, which runs the whole batch of names in one fused call.
"""
import importlib
import string
import unicodedata

import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import rnnfast
from rnnfast import reference

from . import common

# Language -> Faker locales whose surname lists stand for it (Latin-script locales, so that
# folding to ASCII keeps the names readable; Chinese through Faker's romanized lists).
# Not Czech: once the names it shares with Slovak are dropped, 128 are left, and those
# the models cannot tell from Slovak ones.
LANGUAGES = {
    "Chinese": ["zh_CN", "zh_TW"],
    "Croatian": ["hr_HR"],
    "Dutch": ["nl_NL", "nl_BE"],
    "English": ["en_US", "en_GB"],
    "Estonian": ["et_EE"],
    "Finnish": ["fi_FI"],
    "French": ["fr_FR"],
    "German": ["de_DE", "de_AT"],
    "Indonesian": ["id_ID"],
    "Irish": ["ga_IE"],
    "Italian": ["it_IT"],
    "Slovak": ["sk_SK"],
    "Spanish": ["es_ES", "es_MX"],
    "Swedish": ["sv_SE"],
    "Zulu": ["zu_ZA"],
}
SURNAME_LISTS = ("last_names", "last_names_male", "last_names_female", "last_romanized_names")
# The tutorial's alphabet, with the hyphen of double-barrelled names.
LETTERS = string.ascii_letters + " .,;'-"
# Letters that Unicode decomposition does not reduce to an ASCII base letter.
FOLD = str.maketrans({"ß": "ss", "ł": "l", "Ł": "L", "ø": "o", "Ø": "O", "æ": "ae", "Æ": "Ae",
                      "đ": "d", "Đ": "D", "ı": "i", "œ": "oe", "Œ": "Oe", "’": "'"})
DEFAULT_EPOCHS = {"simple": 20, "gru": 8, "lstm": 10}
MAX_PER_LANGUAGE = 1000  # keeps the largest lists (Irish, Slovak) from swamping the rest


def to_ascii(name: str) -> str:
    decomposed = unicodedata.normalize("NFKD", name.translate(FOLD))
    name = "".join(c for c in decomposed if c in LETTERS).strip()
    # some locales (zh_TW) list names in capitals: letter case must not give the label away
    return name.capitalize() if name.isupper() else name


def load_names(seed: int):
    """(names, labels) over LANGUAGES: each language's surnames from its Faker locales,
    folded to ASCII, deduplicated; a name found under two languages is dropped, as its
    label would be a coin toss; at most MAX_PER_LANGUAGE per language (a seeded sample)."""
    found = {}
    for language, locales in LANGUAGES.items():
        names = set()
        for locale in locales:
            provider = importlib.import_module(f"faker.providers.person.{locale}").Provider
            for attr in SURNAME_LISTS:
                if hasattr(provider, attr) and not (locale.startswith("zh") and attr == "last_names"):
                    names.update(to_ascii(n) for n in getattr(provider, attr))
        found[language] = names - {""}
    owners = {}
    for language, names in found.items():
        for n in names:
            owners.setdefault(n, []).append(language)
    rng = np.random.default_rng(seed)
    names, labels = [], []
    for k, language in enumerate(LANGUAGES):
        own = sorted(n for n in found[language] if len(owners[n]) == 1)
        if len(own) > MAX_PER_LANGUAGE:
            own = sorted(rng.choice(own, MAX_PER_LANGUAGE, replace=False).tolist())
        names += own
        labels += [k] * len(own)
    return names, np.array(labels)


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int):
    """Index arrays (train, test) with each language split in the same proportion."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for k in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == k))
        n_test = max(1, round(test_fraction * len(idx)))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.concatenate(train), np.concatenate(test)


def encode(names, device) -> tuple:
    """One-hot letters [T, N, len(LETTERS)], zero-padded after each name, and the lengths."""
    lengths = torch.tensor([len(n) for n in names])
    x = torch.zeros(int(lengths.max()), len(names), len(LETTERS))
    for i, n in enumerate(names):
        x[torch.arange(len(n)), i, [LETTERS.index(c) for c in n]] = 1.0
    return x.to(device), lengths.to(device)


class SimpleClassifier(nn.Module):
    """The tutorial's classifier: the cell's log-probs at each name's last letter."""

    def __init__(self, cell: nn.Module):
        super().__init__()
        self.cell = cell

    def forward(self, x, lengths):
        if isinstance(self.cell, rnnfast.SimpleRNN):
            log_probs, _ = self.cell.forward_sequence(x)
        else:
            hidden = x.new_zeros(x.size(1), self.cell.hidden_size)
            steps = []
            for t in range(x.size(0)):
                out, hidden = self.cell(x[t], hidden)
                steps.append(out)
            log_probs = torch.stack(steps)
        # the output at a name's last letter has not seen the padding after it
        return log_probs[lengths - 1, torch.arange(x.size(1), device=x.device)]


class RecurrentClassifier(nn.Module):
    """A GRU or LSTM over the letters (packed, so each name stops at its own length) and a
    linear layer on its final hidden state."""

    def __init__(self, kind: str, input_size: int, hidden_size: int, n_classes: int):
        super().__init__()
        self.rnn = {"gru": nn.GRU, "lstm": nn.LSTM}[kind](input_size, hidden_size)
        self.head = nn.Linear(hidden_size, n_classes)

    def forward(self, x, lengths):
        _, h = self.rnn(pack_padded_sequence(x, lengths.cpu(), enforce_sorted=False))
        h = h[0] if isinstance(h, tuple) else h
        return torch.log_softmax(self.head(h[-1]), dim=1)


def build(args, n_classes: int, layer: str):
    """The model built with torch.nn under the seed; for rnnfast the same weights on
    rnnfast's layers. Returns (model, optimizer)."""
    torch.manual_seed(args.seed)
    if args.model == "simple":
        cell = reference.TutorialRNN(len(LETTERS), args.hidden, n_classes)
        if layer == "rnnfast":
            fast = nn.utils.skip_init(rnnfast.SimpleRNN, len(LETTERS), args.hidden, n_classes)
            fast.load_state_dict(cell.state_dict())
            cell = fast
        model = SimpleClassifier(cell)
    else:
        model = RecurrentClassifier(args.model, len(LETTERS), args.hidden, n_classes)
        if layer == "rnnfast":
            rnnfast.convert(model)
    model.to(args.device)
    return model, torch.optim.Adam(model.parameters(), lr=args.lr)


def train_step(model, optimizer, batch) -> float:
    x, lengths, y = batch
    optimizer.zero_grad()
    loss = nn.functional.nll_loss(model(x, lengths), y)
    loss.backward()
    # linear recurrences and long names can spike; clipping keeps Adam's steps sane
    nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return loss.item()


@torch.no_grad()
def predict(model, x, lengths, batch_size=1024):
    return torch.cat([model(x[:, i:i + batch_size], lengths[i:i + batch_size])
                      for i in range(0, x.size(1), batch_size)])


def plot_confusion(path, confusion: np.ndarray, title: str):
    """Rows: true language; each row as fractions of that language's test names."""
    rows = confusion / confusion.sum(axis=1, keepdims=True).clip(min=1)
    k = len(LANGUAGES)
    fig, ax = plt.subplots(figsize=(9, 8))
    im = ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), list(LANGUAGES), rotation=45, ha="right")
    ax.set_yticks(range(k), list(LANGUAGES))
    for i in range(k):
        for j in range(k):
            if round(100 * rows[i, j]) >= 1:
                ax.text(j, i, f"{100 * rows[i, j]:.0f}", ha="center", va="center", fontsize=7,
                        color="white" if rows[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted language")
    ax.set_ylabel("true language")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true language (cells: %)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    p = common.parser(__doc__, epochs=None, epochs_help=(
        "passes over the training data (default: " +
        ", ".join(f"{k} for --model {m}" for m, k in DEFAULT_EPOCHS.items()) + ")"))
    p.add_argument("--model", choices=("simple", "gru", "lstm"), default="simple",
                   help="simple: the tutorial's cell (rnnfast.SimpleRNN); gru, lstm: the layers")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--max-names", type=int, default=None,
                   help="use only this many names (a seeded sample), for a quick try")
    args = p.parse_args(argv)
    if args.epochs is None:  # the gated cells learn faster and start to overfit sooner
        args.epochs = DEFAULT_EPOCHS[args.model]
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"names-{args.model}"

    data_gen = common.seed_all(args.seed)
    names, labels = load_names(args.seed)
    if args.max_names is not None and args.max_names < len(names):
        keep = np.sort(np.random.default_rng(args.seed).choice(len(names), args.max_names,
                                                               replace=False))
        names, labels = [names[i] for i in keep], labels[keep]
    train_idx, test_idx = stratified_split(labels, 0.2, args.seed)
    n_classes = len(LANGUAGES)
    print(f"{len(names)} surnames in {n_classes} languages ({len(train_idx)} train, "
          f"{len(test_idx)} test); layer {args.layer}, model {args.model}")
    x_test, len_test = encode([names[i] for i in test_idx], args.device)
    y_test = torch.as_tensor(labels[test_idx], device=args.device)

    def batches(epoch):
        order = train_idx[torch.randperm(len(train_idx), generator=data_gen).numpy()]
        for i in range(0, len(order), args.batch_size):
            idx = order[i:i + args.batch_size]
            yield (*encode([names[j] for j in idx], args.device),
                   torch.as_tensor(labels[idx], device=args.device))

    def evaluate():
        model.eval()
        log_probs = predict(model, x_test, len_test)
        model.train()
        return {"loss": nn.functional.nll_loss(log_probs, y_test).item(),
                "accuracy": (log_probs.argmax(1) == y_test).float().mean().item()}

    model, optimizer = build(args, n_classes, args.layer)
    history = common.fit(args.epochs, batches, lambda b: train_step(model, optimizer, b),
                         evaluate, f"names/{args.model}/{args.layer}")

    timing_batch = next(iter(batches(0)))
    speed = common.speed_ratio(lambda layer: build(args, n_classes, layer), train_step,
                               timing_batch, args.speed_seconds, args.device)

    model.eval()
    predicted = predict(model, x_test, len_test).argmax(1).cpu().numpy()
    confusion = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(confusion, (labels[test_idx], predicted), 1)
    accuracy = float(np.trace(confusion) / confusion.sum())
    majority = float(np.bincount(labels[test_idx]).max() / len(test_idx))
    print(f"test accuracy {accuracy:.3f} over {n_classes} languages (chance {1 / n_classes:.3f}, "
          f"always the largest class {majority:.3f})")
    label = {"simple": "SimpleRNN", "gru": "GRU", "lstm": "LSTM"}[args.model]
    confusion_png = args.out / f"{stem}-{args.layer}-confusion.png"
    plot_confusion(confusion_png, confusion,
                   f"Surname -> language, {label} ({args.layer}): test accuracy "
                   f"{100 * accuracy:.1f}% (row %)")
    metrics = {"test_accuracy": accuracy, "chance": 1 / n_classes, "majority_class": majority,
               "confusion": confusion.tolist(), "languages": list(LANGUAGES)}
    return common.finish(stem, args, history, speed, metrics, [confusion_png],
                         f"Surname classification, {label} ({args.layer} layer)",
                         ylabel="cross-entropy (nats)")


if __name__ == "__main__":
    main()
