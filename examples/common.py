"""What the three examples share: the command line, seeding, the training loop with its
progress bar and epoch timing, the rnnfast-over-torch.nn speed measurement, the loss-curve
plot and the JSON record.

Every example builds its model with torch.nn layers under the seed and, for
`--layer rnnfast`, switches them to rnnfast in place (rnnfast.convert), so both layers
start from the same weights; the data order comes from its own generator seeded alike, so
both see the same batches and their loss curves agree to float32 rounding.
"""
import argparse
import json
import random
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, Optional

import matplotlib

matplotlib.use("Agg")  # files only: the examples run on machines without a display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from rnnfast.bench.timing import measure_cpu, measure_cuda, time_interleaved  # noqa: E402

LAYERS = ("rnnfast", "torch")
OUT_DIR = Path(__file__).resolve().parent / "out"
# The loss of one training step with the two layers, same seed, agrees to this relative
# difference while float32 rounding has not yet been amplified by the training itself;
# tests/test_examples.py says why, and why long runs drift apart anyway.
CURVE_RTOL = 1e-4
# Arguments that do not change the training itself, left out when matching runs.
_NOT_CONFIG = ("layer", "out", "speed_seconds")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except None, which the option's help explains."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def parser(doc: str, epochs: Optional[int], epochs_help: str = "passes over the training data"
           ) -> argparse.ArgumentParser:
    """The options every example has; `doc` is the example's docstring, whose first
    paragraph becomes the description."""
    p = argparse.ArgumentParser(description=" ".join(doc.split("\n\n")[0].split()),
                                formatter_class=_HelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--layer", choices=LAYERS, default="rnnfast",
                   help="recurrent layers to train with: rnnfast's or torch.nn's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=epochs, help=epochs_help)
    p.add_argument("--out", type=Path, default=OUT_DIR, help="folder for the PNGs and JSON")
    p.add_argument("--speed-seconds", type=float, default=3.0,
                   help="seconds of interleaved timing per layer for the speed ratio")
    return p


def seed_all(seed: int) -> torch.Generator:
    """Seeds Python, NumPy and torch (model initialisation, dropout) and returns a separate
    generator for the data order, so the batches do not depend on what the model drew."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def config(args: argparse.Namespace) -> dict:
    """The arguments that decide the training (all but layer and output), JSON-ready."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
            if k not in _NOT_CONFIG}


def fit(epochs: int, batches: Callable[[int], Iterable], step: Callable[[object], float],
        evaluate: Callable[[], Dict[str, float]], desc: str) -> dict:
    """Runs `step` (one optimizer step, returning its loss) over `batches(epoch)` for each
    epoch, then `evaluate()` (a dict with at least "loss"). Returns the per-step training
    losses, per-epoch evaluation results and the training seconds of each epoch."""
    history = {"step_loss": [], "epoch_end_step": [], "eval": [], "epoch_seconds": []}
    for epoch in range(epochs):
        t0 = time.perf_counter()
        bar = tqdm(list(batches(epoch)), desc=f"{desc} epoch {epoch + 1}/{epochs}", leave=False,
                   unit="batch", dynamic_ncols=True)
        for batch in bar:
            loss = step(batch)
            history["step_loss"].append(loss)
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        seconds = time.perf_counter() - t0
        result = evaluate()
        history["epoch_seconds"].append(seconds)
        history["epoch_end_step"].append(len(history["step_loss"]))
        history["eval"].append(result)
        shown = ", ".join(f"{k} {v:.4f}" for k, v in result.items())
        print(f"{desc} epoch {epoch + 1}/{epochs}: train loss "
              f"{np.mean(history['step_loss'][-len(bar):]):.4f}, eval {shown}, "
              f"{seconds:.2f} s", flush=True)
    return history


def speed_ratio(build: Callable[[str], tuple], step: Callable, batch, seconds: float,
                device: str) -> dict:
    """Times one training step (forward, backward, optimizer step on `batch`) of each layer,
    interleaved round by round so that a busy machine slows both alike. `build(layer)`
    returns (model, optimizer), copies of the same model. The ratio is torch.nn's median
    step time over rnnfast's: above 1, rnnfast trains faster."""
    runs = {layer: build(layer) for layer in LAYERS}
    fns = {layer: (lambda layer=layer: step(*runs[layer], batch)) for layer in LAYERS}
    measure = measure_cuda if torch.device(device).type == "cuda" else measure_cpu
    stats, errors = time_interleaved(fns, repeats=5, min_time=seconds, measure=measure)
    if errors:
        raise RuntimeError(f"speed measurement failed: {errors}")
    out = {f"{layer}_step_seconds": stats[layer][0] for layer in LAYERS}
    out["steps_timed"] = {layer: stats[layer][2] for layer in LAYERS}
    out["ratio"] = out["torch_step_seconds"] / out["rnnfast_step_seconds"]
    print(f"speed (median of one training step, interleaved): rnnfast "
          f"{1e3 * out['rnnfast_step_seconds']:.2f} ms, torch.nn "
          f"{1e3 * out['torch_step_seconds']:.2f} ms -> rnnfast is {out['ratio']:.2f}x "
          f"the speed of torch.nn", flush=True)
    return out


def rel_diff(a, b) -> np.ndarray:
    """|a - b| / max(|a|, |b|) per step (symmetric in a and b)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.abs(a - b) / np.maximum(np.abs(a), np.abs(b))


def compare_curves(history: dict, other: dict) -> dict:
    """How closely this run's per-step training losses follow the other layer's run."""
    rel = rel_diff(history["step_loss"], other["history"]["step_loss"])
    above = np.flatnonzero(rel > CURVE_RTOL)
    return {"layer": other["layer"], "max_rel_diff": float(rel.max()), "steps": len(rel),
            "steps_within_rtol": int(above[0]) if len(above) else len(rel),
            "final_eval_loss": [history["eval"][-1]["loss"], other["history"]["eval"][-1]["loss"]]}


def other_layer_run(out: Path, stem: str, args: argparse.Namespace) -> Optional[dict]:
    """The JSON record of the same run with the other layer, if one is in `out` with the
    same training configuration."""
    other = LAYERS[1 - LAYERS.index(args.layer)]
    path = out / f"{stem}-{other}.json"
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    return record if record.get("config") == config(args) else None


def plot_losses(path: Path, title: str, history: dict, layer: str,
                other: Optional[dict] = None, ylabel: str = "loss"):
    """Training loss per step (and its running mean), evaluation loss per epoch; with the
    other layer's record, its running mean too and, in a panel below, the relative
    difference of the two runs' losses at each step."""
    if other is None:
        fig, ax = plt.subplots(figsize=(8, 4.8))
    else:
        fig, (ax, diff_ax) = plt.subplots(2, 1, figsize=(8, 6.4), sharex=True,
                                          gridspec_kw={"height_ratios": [3, 1.3]})
    steps = np.arange(1, len(history["step_loss"]) + 1)
    loss = np.asarray(history["step_loss"])
    ax.plot(steps, loss, color="tab:blue", alpha=0.35, lw=0.8, label=f"train, per step ({layer} layer)")
    window = max(1, len(loss) // 25)

    def running_mean(x):
        return np.convolve(x, np.ones(window) / window, mode="valid")

    if window > 1:
        ax.plot(steps[window - 1:], running_mean(loss), color="navy", lw=1.8,
                label=f"train, mean of {window} steps ({layer} layer)")
    ax.plot(history["epoch_end_step"], [e["loss"] for e in history["eval"]], "o-",
            color="tab:red", lw=1.5, label="held-out, end of epoch")
    if other is not None:
        name = other["layer"]
        other_loss = np.asarray(other["history"]["step_loss"])
        if window > 1:
            ax.plot(steps[window - 1:], running_mean(other_loss), color="tab:orange", lw=1.2,
                    ls="--", label=f"train, mean of {window} steps ({name} layer, same seed)")
        diff_ax.semilogy(steps, np.maximum(rel_diff(loss, other_loss), 1e-9), color="0.3", lw=0.8,
                         label="per step (equal losses drawn at 1e-9)")
        diff_ax.axhline(CURVE_RTOL, color="tab:red", ls=":", lw=1.2,
                        label=f"{CURVE_RTOL:g}: tolerance of tests/test_examples.py")
        diff_ax.set_ylabel(f"|loss difference|\n/ loss vs {name}", fontsize=9)
        diff_ax.set_xlabel("training step")
        diff_ax.grid(alpha=0.3)
        diff_ax.legend(fontsize=8, loc="lower right")
    else:
        ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.set_yscale("log")  # early spikes would otherwise flatten the rest of the curve
    ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1, 2, 3, 5)))
    ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def finish(stem: str, args: argparse.Namespace, history: dict, speed: dict, metrics: dict,
           files: list, plot_title: str, ylabel: str = "loss") -> dict:
    """Prints the summary, draws the loss curves, writes `<stem>-<layer>.json` and returns
    the result dict that main() hands back; `files` are the example's own PNGs."""
    out = args.out
    other = other_layer_run(out, stem, args)
    result = {"example": stem, "layer": args.layer, "config": config(args), "history": history,
              "seconds_per_epoch": float(np.median(history["epoch_seconds"])),
              "speed": speed, "metrics": metrics}
    loss = history["step_loss"]
    k = max(1, len(loss) // 10)
    result["first_loss"], result["last_loss"] = float(np.mean(loss[:k])), float(np.mean(loss[-k:]))
    if other is not None:
        result["vs_other_layer"] = compare_curves(history, other)
    loss_png = out / f"{stem}-{args.layer}-loss.png"
    plot_losses(loss_png, plot_title, history, args.layer, other, ylabel)
    result["files"] = [str(loss_png)] + [str(f) for f in files]
    json_path = out / f"{stem}-{args.layer}.json"
    json_path.write_text(json.dumps(result, indent=1))
    print(f"training loss, mean of the first and last {k} steps: {result['first_loss']:.4f} -> "
          f"{result['last_loss']:.4f}")
    print(f"seconds per epoch ({args.layer}, median): {result['seconds_per_epoch']:.2f}")
    if other is not None:
        c = result["vs_other_layer"]
        within = ("at every step" if c["steps_within_rtol"] == c["steps"] else
                  f"for the first {c['steps_within_rtol']} of {c['steps']} steps, then drift "
                  f"apart as any two float32 runs of this training do")
        print(f"against the {c['layer']} run with the same seed: the training losses agree within "
              f"{CURVE_RTOL:.0e} (relative) {within} (max {c['max_rel_diff']:.1e}); held-out "
              f"loss at the end {c['final_eval_loss'][0]:.4f} here, {c['final_eval_loss'][1]:.4f} "
              f"there")
    print(f"wrote {json_path} and {', '.join(result['files'])}")
    return result
