"""
Muon's head start over AdamW, measured: train the same model on the same data with each optimizer
over a small learning-rate sweep, then plot validation loss against steps and against seconds.

    python benchmarks/optimizers.py                          # seed config on a GPU (~2 epochs)
    python benchmarks/optimizers.py --device cpu --preset cpu --max-steps 60 --batch-size 8 --seq-len 128

Each run is a plain `train.py` run (its metrics.jsonl has step, elapsed seconds and val loss).
Fairness: both optimizers get the same steps, data order, schedule and sweep size; AdamW's target
is its best final validation loss over its sweep, and for every Muon run we report the fraction of
AdamW's steps and wall time it needed to reach that loss. Writes a PNG and a JSON next to it.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda or cpu")
    p.add_argument("--preset", default="seed", help="model shape (a qwen3.PRESETS name)")
    p.add_argument("--batch-size", type=int, default=24)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--max-steps", type=int, default=184, help="184 steps of 24x512 is ~2 epochs of the embedded corpus")
    p.add_argument("--eval-every", type=int, default=8)
    p.add_argument("--adamw-lrs", default="1e-3,3e-3,6e-3", help="AdamW learning rates to sweep")
    p.add_argument("--muon-lrs", default="0.01,0.02,0.04", help="Muon learning rates to sweep (AdamW part: --lr 3e-3)")
    p.add_argument("--extra", default="", help="more train.py flags for every run, e.g. '--compile'")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "optimizers"), help="output prefix")
    return p.parse_args()


def run(args, optimizer, lr, run_dir):
    lr_flags = ["--lr", lr] if optimizer == "adamw" else ["--muon-lr", lr]
    cmd = [sys.executable, str(ROOT / "train.py"), "--data", "embedded", "--preset", args.preset,
           "--device", args.device, "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
           "--max-steps", str(args.max_steps), "--eval-every", str(args.eval_every), "--optimizer", optimizer,
           *lr_flags, "--out-dir", str(run_dir), "--overwrite", "--sample-tokens", "0", *args.extra.split()]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def reach(curve, target):
    """(step, seconds) of the first evaluation at or below target, or None."""
    for m in curve:
        if m["val_loss"] <= target:
            return m["step"], m["elapsed_s"]
    return None


def main():
    args = parse_args()
    out = Path(args.out)
    runs_dir = out.parent / "runs"
    curves = {}
    for optimizer, lrs in (("adamw", args.adamw_lrs), ("muon", args.muon_lrs)):
        for lr in lrs.split(","):
            curves[f"{optimizer} lr={lr}"] = run(args, optimizer, lr, runs_dir / f"{optimizer}-{lr}")
    adamw = {k: v for k, v in curves.items() if k.startswith("adamw")}
    best_name = min(adamw, key=lambda k: adamw[k][-1]["val_loss"])
    best = adamw[best_name]
    target = best[-1]["val_loss"]
    table = []
    for name, curve in curves.items():
        hit = reach(curve, target)
        table.append(dict(run=name, final_val_loss=curve[-1]["val_loss"], seconds=curve[-1]["elapsed_s"],
                          steps_to_target=hit and hit[0], seconds_to_target=hit and hit[1],
                          step_fraction=hit and hit[0] / best[-1]["step"],
                          time_fraction=hit and hit[1] / best[-1]["elapsed_s"]))
    result = dict(target=target, target_run=best_name, flags=vars(args), runs=table, curves=curves)
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"target: {best_name}'s final val loss {target:.3f}")
    print(f"{'run':<18} {'final val':>10} {'steps to target':>16} {'x AdamW steps':>14} {'x AdamW time':>13}")
    for r in table:
        frac = (f"{r['step_fraction']:.2f}", f"{r['time_fraction']:.2f}") if r["steps_to_target"] else ("-", "-")
        print(f"{r['run']:<18} {r['final_val_loss']:>10.3f} {str(r['steps_to_target'] or '-'):>16} "
              f"{frac[0]:>14} {frac[1]:>13}")
    plot(curves, target, f"{out}.png")


def plot(curves, target, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for name, curve in curves.items():
        style = "-" if name.startswith("muon") else "--"
        for ax, x in zip(axes, ("step", "elapsed_s")):
            ax.plot([m[x] for m in curve], [m["val_loss"] for m in curve], style, label=name)
    for ax, label in zip(axes, ("optimizer step", "seconds")):
        ax.axhline(target, color="gray", lw=0.8)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation loss")
    axes[0].legend()
    fig.suptitle("Muon (solid) vs AdamW (dashed); gray: best AdamW final validation loss")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
