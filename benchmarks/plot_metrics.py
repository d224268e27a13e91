"""
Plot train and validation loss from one or more runs' metrics.jsonl (written by train.py).

    python benchmarks/plot_metrics.py out/metrics.jsonl --out benchmarks/results/curves.png
    python benchmarks/plot_metrics.py a/metrics.jsonl b/metrics.jsonl --labels muon adamw

The gap between the two curves is memorisation: both are measured the same way (eval mode, the
same fixed windows each time), so when validation loss turns up while train loss keeps falling,
the model has started to learn its training text rather than the language.
"""

import argparse
import json
from pathlib import Path


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("metrics", nargs="+", help="metrics.jsonl files")
    p.add_argument("--labels", nargs="*", default=None, help="one label per file (default: the run folder)")
    p.add_argument("--x", default="epoch", choices=["epoch", "step", "elapsed_s"], help="the horizontal axis")
    p.add_argument("--title", default="train vs validation loss")
    p.add_argument("--out", default="curves.png", help="PNG to write")
    args = p.parse_args()
    labels = args.labels or [Path(m).parent.name for m in args.metrics]

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for path, label in zip(args.metrics, labels, strict=True):
        records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        x = [r[args.x] for r in records]
        line, = ax.plot(x, [r["train_loss"] for r in records], "--", label=f"{label} train")
        ax.plot(x, [r["val_loss"] for r in records], "-", color=line.get_color(), label=f"{label} validation")
        best = min(records, key=lambda r: r["val_loss"])
        ax.plot(best[args.x], best["val_loss"], "o", color=line.get_color())
        ax.annotate(f"best {best['val_loss']:.2f}", (best[args.x], best["val_loss"]), textcoords="offset points",
                    xytext=(0, -14), ha="center", fontsize=8)
    ax.set_xlabel({"epoch": "epochs", "step": "optimizer steps", "elapsed_s": "seconds"}[args.x])
    ax.set_ylabel("loss (nats per token)")
    ax.set_title(args.title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
