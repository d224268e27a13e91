"""
Pictures of training runs, drawn from their metrics.jsonl: OUT/curves.png (train.py redraws it at
every evaluation; benchmarks/plot_metrics.py draws the same picture from the file, or several runs
on one chart) and the optimizer sweep's chart (benchmarks/optimizers.py).

The train and validation curves of a run are measured the same way (eval mode, the same fixed
windows each time), so the gap between them is memorisation: when validation loss turns up while
train loss keeps falling, the model has started to learn its training text rather than the language.
"""

import json
import math
import os
from pathlib import Path

from common import one_line

X_LABELS = {"step": "optimizer steps", "epoch": "epochs", "elapsed_s": "seconds of training"}


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl, one per evaluation (none if the file is missing)."""
    records = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            records.append(json.loads(line))
        except ValueError:
            pass  # a line cut short by a hard kill
    return records


def parameters(out: Path) -> int | None:
    """The parameter count of the model a run folder holds in best/ or last/ (None if neither is there)."""
    for name in ("best", "last"):
        if (out / name / "config.json").is_file():
            import torch
            from qwen3 import Qwen3, read_config
            with torch.device("meta"):  # shapes only, nothing allocated
                return Qwen3(read_config(out / name)).num_params()
    return None


def run_title(out: Path, records: list[dict], params: int | None) -> str:
    """curves.png's title: the run's folder, its model's size, its best validation score so far."""
    best = min(records, key=lambda r: r["val_loss"])
    size = f", {params / 1e6:.2f}M parameters" if params else ""
    score = f"{best['val_bpb']:.3f} bpb" if "val_bpb" in best else f"loss {best['val_loss']:.4f}"
    return f"{out}{size}: best val {score} at step {best['step']}"


def fit_after_step_0(ax, curves, keys):
    """Fit the y-axis to the evaluations after step 0: a fresh model scores about log(vocab), far
    above all that follows, and would squash the curves flat at the bottom; its segment comes in
    from above the top. (A log scale would still spend most of the height on the first steps.)"""
    values = [r[k] for records in curves for r in records if r["step"] > 0 for k in keys
              if isinstance(r.get(k), (int, float)) and math.isfinite(r[k])]
    if values:
        lo, hi = min(values), max(values)
        pad = 0.05 * (hi - lo) or 0.05 * abs(hi) or 1.0
        ax.set_ylim(lo - pad, hi + pad)


def save(fig, path: Path):
    """The PNG is written under a temporary name and renamed: a viewer never sees half of it."""
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=110)
    os.replace(tmp, path)


def plot_curves(runs: dict[str, list[dict]], path: Path, x: str = "step", title: str | None = None):
    """Train (dashed) and validation (solid) loss, and bits per byte if every record has it, of
    each run {label: its metrics records} against `x`, the best validation point marked. One run
    against steps also gets elapsed minutes on the top axis. Returns the Figure, written to path."""
    from matplotlib.figure import Figure  # not pyplot: no window backend, no global figures to close
    panels = [("loss", "nats per token")]
    if all("val_bpb" in r for records in runs.values() for r in records):
        panels.append(("bpb", "bits per byte"))
    fig = Figure(figsize=(6 * len(panels), 4.5), layout="constrained")
    for ax, (key, unit) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        for label, records in runs.items():
            xs = [r[x] for r in records]
            line, = ax.plot(xs, [r[f"val_{key}"] for r in records], "-", label=f"{label} validation".strip())
            ax.plot(xs, [r[f"train_{key}"] for r in records], "--", color=line.get_color(),
                    label=f"{label} train".strip())
            best = min(records, key=lambda r: r["val_loss"])
            ax.plot(best[x], best[f"val_{key}"], "o", color=line.get_color())
            ax.annotate(f"best {best[f'val_{key}']:.3f} (step {best['step']})", (best[x], best[f"val_{key}"]),
                        textcoords="offset points", xytext=(0, 8), ha="right", fontsize=8)
        fit_after_step_0(ax, runs.values(), (f"val_{key}", f"train_{key}"))
        ax.set_xlabel(X_LABELS[x])
        ax.set_ylabel(f"{key} ({unit})")
        ax.grid(alpha=0.3)
        ax.legend()
        if x == "step" and len(runs) == 1:  # the minutes at some of the evaluations, above their steps
            ticks = records[::-(-len(records) // 6)]
            top = ax.secondary_xaxis("top")
            top.set_xticks([r["step"] for r in ticks], labels=[f"{r['elapsed_s'] / 60:.1f}" for r in ticks])
            top.set_xlabel("minutes of training")
    if title:
        fig.suptitle(title, fontsize=10, wrap=True)
    save(fig, path)
    return fig


def plot_expert_load(records: list[dict], path: Path, title: str | None = None):
    """A mixture of experts' routing over training: for each sparse layer, a heatmap of the share of
    routing slots each expert took (rows) at each evaluation (columns). Balanced routing is an even
    colour at 1/E; a collapsed router, one bright row."""
    from matplotlib.figure import Figure
    records = [r for r in records if "expert_load" in r]
    layers = records[0]["expert_load"]  # {layer index: [share of each expert]}
    top = max(share for r in records for shares in r["expert_load"].values() for share in shares)
    fig = Figure(figsize=(8, 1.2 + 1.6 * len(layers)), layout="constrained")
    axes = fig.subplots(len(layers), 1, squeeze=False, sharex=True)[:, 0]
    for ax, layer in zip(axes, layers):
        load = [[r["expert_load"][layer][e] for r in records] for e in range(len(layers[layer]))]
        image = ax.imshow(load, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0, vmax=top,
                          extent=(-0.5, len(records) - 0.5, len(load) - 0.5, -0.5))
        ax.set_ylabel(f"layer {layer}\nexpert")
    fig.colorbar(image, ax=list(axes), label="share of routing slots (one scale for all layers)")
    ticks = list(range(0, len(records), max(1, len(records) // 8)))
    ax.set_xticks(ticks, labels=[str(records[i]["step"]) for i in ticks])
    ax.set_xlabel("optimizer step of the evaluation")
    fig.suptitle(title or "expert load", fontsize=10, wrap=True)
    save(fig, path)


def redraw_curves(out: Path, params: int, warn):
    """OUT/curves.png from OUT/metrics.jsonl, as train.py keeps it at every evaluation, and for a
    mixture of experts OUT/experts.png beside it; a failure is one warning line: a picture is never
    worth the run."""
    try:
        records = read_metrics(out / "metrics.jsonl")
        title = run_title(out, records, params)
        plot_curves({"": records}, out / "curves.png", title=title)
        if "expert_load" in records[-1]:
            plot_expert_load(records, out / "experts.png", title=f"expert load on the validation windows: {title}")
    except Exception as e:
        warn(f"warning: {out / 'curves.png'} not updated ({type(e).__name__}: {one_line(e, 200)})")


def plot_sweep(curves: dict[str, list[dict]], target: float, path: Path):
    """The optimizer sweep: validation loss and bits per byte (rows) against steps and wall seconds
    (columns), every run; Muon solid, AdamW dashed, the target a gray line."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(12, 8), layout="constrained")
    axes = fig.subplots(2, 2, sharex="col", sharey="row")
    for name, curve in curves.items():
        style = "-" if name.startswith("muon") else "--"
        for row, key in zip(axes, ("val_loss", "val_bpb")):
            for ax, x in zip(row, ("step", "elapsed_s")):
                ax.plot([r[x] for r in curve], [r.get(key) for r in curve], style, label=name)
    for row, key in zip(axes, ("val_loss", "val_bpb")):
        fit_after_step_0(row[0], curves.values(), (key,))  # the rows share their y-axis
    for ax in axes[0]:
        ax.axhline(target, color="gray", lw=0.8)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    axes[1][0].set_xlabel("optimizer steps")
    axes[1][1].set_xlabel("wall seconds (evaluations included)")
    axes[0][0].set_ylabel("validation loss (nats per token)")
    axes[1][0].set_ylabel("validation bits per byte")
    axes[0][0].legend()
    fig.suptitle("Muon (solid) vs AdamW (dashed); gray: the best AdamW run's final validation loss")
    save(fig, path)
