"""
Muon against AdamW, measured: the same model, data, initial weights, batches and steps for every
run (train.py's defaults for the device, seed 1337), each optimizer over three peak learning rates.

    python benchmarks/optimizers.py                 # CPU, the default `python train.py` setup: ~55 minutes
    python benchmarks/optimizers.py --max-steps 6 --eval-every 3 --work-dir /tmp/opt --out /tmp/opt/optimizers
    python benchmarks/optimizers.py --device cuda --out benchmarks/results/optimizers-gpu

Sweeps: AdamW --lr 1e-3, 3e-3, 1e-2 (AdamW everywhere); Muon --muon-lr 0.005, 0.01, 0.02 for the
hidden matrices, with the AdamW part (embeddings, head, gains) at train.py's default --lr for Muon
(3e-2 on CPU). The
target is the best AdamW run's final validation loss; for every run the table gives its final
validation loss and bits per byte, its time per optimizer step (evaluations excluded; x the best
AdamW run's: Muon's step overhead), and when
it first reaches the target, interpolated linearly between evaluations, in steps, wall seconds
(evaluations included, the same for every run) and seconds of optimizer steps, with the ratio to
the best AdamW run's. Writes OUT.json (the flags, the table and every run's metrics), OUT.png
(validation loss and bits per byte against steps and seconds) and OUT.md (the table).

Each run is a plain train.py run in WORK_DIR/OPTIMIZER-LR. A run that already finished is read
back, one cut short (Ctrl-C, a crash) is continued with --resume, so an interrupted sweep picks
up where it was. Run it alone: the timings are only as quiet as the machine.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda: train.py's defaults for that device")
    p.add_argument("--max-steps", type=int, default=None, help="steps of every run (default: train.py's)")
    p.add_argument("--eval-every", type=int, default=None, help="evaluate every N steps (default: train.py's)")
    p.add_argument("--adamw-lrs", default="1e-3,3e-3,1e-2", help="AdamW peak learning rates "
                   "(3e-4 was the worst by far at every CPU setup measured)")
    p.add_argument("--muon-lrs", default="0.005,0.01,0.02", help="Muon peak learning rates (AdamW part: train.py's "
                   "default --lr with muon)")
    p.add_argument("--extra", default="", help="more train.py flags for every run, e.g. '--compile'")
    p.add_argument("--work-dir", default=str(ROOT / "out-optimizers"), help="the runs' out-dirs go here")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "optimizers-cpu"),
                   help="prefix of the .json, .png and .md written")
    return p.parse_args(argv)


def next_command(out: Path, flags: list[str], device: str) -> list[str] | None:
    """train.py's arguments for what is left of the run in `out`: all of it, the rest, or None.
    A run counts as the same only if it had the same flags *and* train.py's defaults they left
    alone were the same (a new default shape or step count, or a change to the preset the run
    trains, makes every old run stale)."""
    from flags import DEVICE_DEFAULTS
    from qwen3 import PRESETS
    defaults = DEVICE_DEFAULTS["cpu" if device == "cpu" else "gpu"]
    preset = flags[flags.index("--preset") + 1] if "--preset" in flags else defaults["preset"]
    stamp = dict(flags=flags, defaults=defaults, preset=PRESETS[preset])
    info_path, marker = out / "last" / "training_state.json", out / "benchmark-flags.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else None
    if info is None or not marker.is_file() or json.loads(marker.read_text()) != json.loads(json.dumps(stamp)):
        out.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps(stamp) + "\n")
        return [*flags, "--out-dir", str(out), "--overwrite"]  # a fresh run
    if info["step"] < info["max_steps"]:
        return ["--resume", "--out-dir", str(out)]  # cut short: continue it
    return None  # done


def train_run(out: Path, flags: list[str], device: str) -> list[dict]:
    """The train.py run with `flags` in `out`, made or finished (or read back, if done): its metrics."""
    from plots import read_metrics
    cmd = next_command(out, flags, device)
    if cmd is not None:
        print(" ".join(["python train.py", *cmd]), flush=True)
        done = subprocess.run([sys.executable, str(ROOT / "train.py"), *cmd])
        if done.returncode != 0:
            sys.exit(f"train.py exited with {done.returncode}; run this command again to continue")
    return read_metrics(out / "metrics.jsonl")


def run(args, optimizer: str, lr: str) -> list[dict]:
    """One run of the sweep (or what is left of it); its metrics records."""
    flags = ["--data", "embedded", "--device", args.device, "--optimizer", optimizer,
             "--lr" if optimizer == "adamw" else "--muon-lr", lr, "--sample-tokens", "0", *args.extra.split()]
    for flag, value in (("--max-steps", args.max_steps), ("--eval-every", args.eval_every)):
        if value is not None:
            flags += [flag, str(value)]
    return train_run(Path(args.work_dir) / f"{optimizer}-{lr}", flags, args.device)


def reach(curve: list[dict], target: float, x: str) -> float | None:
    """The first `x` at which the validation loss is at or below target, linear between evaluations."""
    for prev, cur in zip(curve, curve[1:]):
        if cur["val_loss"] <= target:
            f = (prev["val_loss"] - target) / (prev["val_loss"] - cur["val_loss"]) if prev["val_loss"] > target else 0
            return prev[x] + f * (cur[x] - prev[x])
    return None


def summarize(curves: dict[str, list[dict]]) -> dict:
    """The target (the best AdamW run's final validation loss) and one table row per run."""
    adamw = [name for name in curves if name.startswith("adamw")]
    best = min(adamw, key=lambda name: curves[name][-1]["val_loss"])
    target = curves[best][-1]["val_loss"]
    rows = []
    step_s = {name: curve[-1]["steps_s"] / curve[-1]["step"] for name, curve in curves.items()}
    for name, curve in curves.items():
        last = curve[-1]
        row = dict(run=name, final_val_loss=last["val_loss"], final_val_bpb=last.get("val_bpb"),
                   ms_per_step=1000 * step_s[name], step_time_ratio=step_s[name] / step_s[best])
        for x in ("step", "elapsed_s", "steps_s"):
            hit = reach(curve, target, x)
            row[f"{x}_to_target"] = hit
            row[f"{x}_ratio"] = hit / curves[best][-1][x] if hit is not None else None
        rows.append(row)
    return dict(target=target, target_run=best, rows=rows)


def table(summary: dict) -> str:
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)
    lines = [f"Target: {summary['target_run']}'s final validation loss, {summary['target']:.4f}.", "",
             "| run | final val loss | final val bpb | ms per step (x AdamW) | steps to target "
             "| wall s to target (x AdamW) | step s to target (x AdamW) |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in summary["rows"]:
        lines.append(f"| {r['run']} | {r['final_val_loss']:.4f} | {f(r['final_val_bpb'], '.4f')} | "
                     f"{r['ms_per_step']:.0f} ({r['step_time_ratio']:.2f}) | {f(r['step_to_target'], '.0f')} | "
                     f"{f(r['elapsed_s_to_target'], '.0f')} ({f(r['elapsed_s_ratio'], '.2f')}) | "
                     f"{f(r['steps_s_to_target'], '.0f')} ({f(r['steps_s_ratio'], '.2f')}) |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    curves = {f"{optimizer} lr={lr}": run(args, optimizer, lr)
              for optimizer, lrs in (("adamw", args.adamw_lrs), ("muon", args.muon_lrs)) for lr in lrs.split(",")}
    summary = summarize(curves)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps(dict(flags=vars(args), **summary, curves=curves), indent=1) + "\n")
    Path(f"{out}.md").write_text(table(summary))
    from plots import plot_sweep
    plot_sweep(curves, summary["target"], Path(f"{out}.png"))
    print(table(summary) + f"wrote {out}.json, {out}.md, {out}.png")


if __name__ == "__main__":
    main()
