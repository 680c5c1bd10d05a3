"""Speedup of rnnfast over each contender against hidden size, per cell and mode.

    python -m rnnfast.bench.plot benchmarks/results/cpu-2026-11-26.json [out.png]

One panel per (dtype, mode) row and cell column; x is H (log scale), y is rnnfast's
speedup over a contender (log scale; above the dashed line at 1 rnnfast is faster). A
colour per contender, a line style and marker per shape family (shapes that differ
only in H: same T, N, layers, directions).
"""
import json
import sys
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

COLORS = {"torch.nn": "tab:blue", "reference loop": "tab:orange", "compiled loop": "tab:green",
          "flashrnn": "tab:red", "haste": "tab:purple"}
STYLES = [("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"), ((0, (5, 1)), "v"), ((0, (1, 1)), "P")]


def _family(rec):
    return (f"T={rec['T']} N={rec['N']}" + (f" L={rec['layers']}" if rec["layers"] > 1 else "")
            + (" bidir" if rec["D"] == 2 else ""))


def plot(payload: dict, path: str) -> Optional[str]:
    """Writes the PNG; returns its path, or None when no case has a speedup to show."""
    records = [r for r in payload["records"]
               if any(v.get("rnnfast_speedup") for n, v in r["results"].items() if n != "rnnfast")]
    if not records:
        return None
    cells = [c for c in ("rnn", "lstm", "gru") if any(r["cell"] == c for r in records)]
    rows = list(dict.fromkeys((r["dtype"], r["mode"]) for r in records))
    families = sorted(dict.fromkeys(_family(r) for r in records),
                      key=lambda f: (-len([r for r in records if _family(r) == f]), f))
    style = {f: STYLES[i % len(STYLES)] for i, f in enumerate(families)}
    contenders = [c for c in COLORS if any(c in r["results"] for r in records)]
    fig, axes = plt.subplots(len(rows), len(cells), figsize=(4.6 * len(cells), 3.4 * len(rows)),
                             squeeze=False, sharex=True)
    for i, (dtype, mode) in enumerate(rows):
        for j, cell in enumerate(cells):
            ax = axes[i][j]
            for other in contenders:
                for fam in families:
                    pts = sorted((r["H"], r["results"][other]["rnnfast_speedup"]) for r in records
                                 if r["dtype"] == dtype and r["mode"] == mode and r["cell"] == cell
                                 and _family(r) == fam and r["results"].get(other, {}).get("rnnfast_speedup"))
                    if not pts:
                        continue
                    ls, mk = style[fam]
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], color=COLORS[other], linestyle=ls,
                            marker=mk, markersize=5, linewidth=1.5)
            ax.axhline(1.0, color="black", linestyle="--", linewidth=0.8)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
            ax.yaxis.set_minor_formatter(FuncFormatter(
                lambda v, _: f"{v:g}x" if f"{v:g}"[0] in "25" else ""))
            ax.grid(True, which="both", alpha=0.3)
            ax.set_title(f"{cell.upper() if cell != 'rnn' else 'Elman RNN (tanh)'}, {mode}, {dtype}", fontsize=10)
            if i == len(rows) - 1:
                ax.set_xlabel("hidden size H (= input size C)")
            if j == 0:
                ax.set_ylabel("rnnfast speedup (x)")
            hs = sorted({r["H"] for r in records})
            ax.set_xticks(hs)
            ax.set_xticklabels([str(h) for h in hs])
    handles = [plt.Line2D([], [], color=COLORS[c], linewidth=2, label=f"over {c}") for c in contenders]
    handles += [plt.Line2D([], [], color="gray", linestyle=style[f][0], marker=style[f][1], label=f)
                for f in families]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 5), fontsize=9,
               frameon=False, bbox_to_anchor=(0.5, 0.0))
    m = payload.get("machine", {})
    where = m.get("gpu") or f"{m.get('cpu', '?')}, {m.get('cpu_threads', '?')} threads"
    fig.suptitle(f"rnnfast speedup over other implementations ({where}; torch {m.get('torch', '?')}, "
                 f"{m.get('date', '')[:10]}; above 1 = rnnfast faster)", fontsize=11)
    rows_of_legend = (len(handles) + 4) // 5
    fig.tight_layout(rect=(0, 0.04 * rows_of_legend / max(1, len(rows) / 2), 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    src = argv[0]
    dst = argv[1] if len(argv) > 1 else src.rsplit(".", 1)[0] + ".png"
    with open(src) as f:
        payload = json.load(f)
    out = plot(payload, dst)
    print(out or "nothing to plot: no case has a speedup")


if __name__ == "__main__":
    main()
