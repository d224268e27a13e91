"""
Plot train and validation loss (and bits per byte) of one or more runs' metrics.jsonl, as
train.py draws OUT/curves.png at every evaluation.

    python benchmarks/plot_metrics.py out/metrics.jsonl --x step --out benchmarks/results/curves-cpu.png
    python benchmarks/plot_metrics.py a/metrics.jsonl b/metrics.jsonl --labels muon adamw

The gap between the two curves is memorisation: both are measured the same way (eval mode, the
same fixed windows each time), so when validation loss turns up while train loss keeps falling,
the model has started to learn its training text rather than the language.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None):
    from plots import X_LABELS, plot_curves, read_metrics
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("metrics", nargs="+", help="metrics.jsonl files")
    p.add_argument("--labels", nargs="*", default=None, help="one label per file (default: the run folder)")
    p.add_argument("--x", default="epoch", choices=list(X_LABELS), help="the horizontal axis")
    p.add_argument("--title", default=None, help="a title above the plot")
    p.add_argument("--out", default="curves.png", help="PNG to write")
    args = p.parse_args(argv)
    labels = args.labels or [Path(m).parent.name for m in args.metrics]
    if len(labels) != len(args.metrics):
        p.error(f"{len(args.metrics)} files but {len(labels)} labels")
    runs = {label: read_metrics(Path(path)) for path, label in zip(args.metrics, labels)}
    empty = [path for path, records in zip(args.metrics, runs.values()) if not records]
    if empty:
        p.error(f"no metrics in {', '.join(empty)}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    plot_curves(runs, Path(args.out), x=args.x, title=args.title)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
