"""
Plot train and validation loss (and bits per byte) of one or more runs' metrics.jsonl. One file
gives the picture train.py draws as OUT/curves.png (the same function draws both: plots.py).

    python benchmarks/plot_metrics.py out/metrics.jsonl --out benchmarks/results/curves-cpu.png
    python benchmarks/plot_metrics.py a/metrics.jsonl b/metrics.jsonl --labels muon adamw --x elapsed_s

The gap between the two curves is memorisation: both are measured the same way (eval mode, the
same fixed windows each time), so when validation loss turns up while train loss keeps falling,
the model has started to learn its training text rather than the language.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None):
    from plots import X_LABELS, parameters, plot_curves, read_metrics, run_title
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("metrics", nargs="+", help="metrics.jsonl files")
    p.add_argument("--labels", nargs="*", default=None, help="one label per file (default: the run folder; "
                   "none for a single file, as in curves.png)")
    p.add_argument("--x", default="step", choices=list(X_LABELS), help="the horizontal axis")
    p.add_argument("--title", default=None, help="a title above the plot (default for a single file: the run's "
                   "folder, model size and best validation score, as in curves.png)")
    p.add_argument("--out", default="curves.png", help="PNG to write")
    args = p.parse_args(argv)
    paths = [Path(m) for m in args.metrics]
    labels = args.labels or ([""] if len(paths) == 1 else [path.parent.name for path in paths])
    if len(labels) != len(paths):
        p.error(f"{len(paths)} files but {len(labels)} labels")
    runs = {label: read_metrics(path) for path, label in zip(paths, labels)}
    empty = [str(path) for path, records in zip(paths, runs.values()) if not records]
    if empty:
        p.error(f"no metrics in {', '.join(empty)}")
    title = args.title
    if title is None and len(paths) == 1:
        folder = paths[0].parent
        title = run_title(folder, runs[labels[0]], parameters(folder))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    plot_curves(runs, Path(args.out), x=args.x, title=title)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
