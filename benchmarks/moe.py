"""
A dense model against a mixture of experts, measured on train.py's default CPU run: the `cpu`
preset against `--preset cpu-moe` (each MLP as 8 experts of half its width, 2 a token: as many
active parameters), at equal steps (the same tokens), and at equal time: the mixture gets the steps
that cost what the dense run's 650 did, from the two training steps timed in turns in one process
(a ratio the machine's other load leaves alone, unlike two wall clocks hours apart). Then the
mixture at equal steps balanced other ways (--variants): as Qwen3-MoE is, all layers' routing
counted together at weight 0.001, or at 0.01, and each layer on its own at 0.1; and where each
run's routing ends: the busiest expert's share of a layer's routing slots, against the fair share
1/E, in the most lopsided layer and pooled over the layers.

    python benchmarks/moe.py                        # ~45 minutes on the 2-core CPU; run it alone
    python benchmarks/moe.py --max-steps 6 --eval-every 3 --repeats 2 --work-dir /tmp/moe --out /tmp/moe/moe

Writes OUT.json (the flags, the table, every run's metrics) and OUT.md (the table). Each run is a
plain train.py run in WORK_DIR/NAME, read back when done and continued when cut short.
"""

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from optimizers import train_run  # noqa: E402  (benchmarks/ is this script's own folder)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-steps", type=int, default=None, help="the dense run's steps (default: train.py's)")
    p.add_argument("--eval-every", type=int, default=None, help="evaluate every N steps (default: train.py's)")
    p.add_argument("--variants", default="--no-router-aux-loss-per-layer --router-aux-loss-coef 0.001; "
                   "--no-router-aux-loss-per-layer --router-aux-loss-coef 0.01; --router-aux-loss-coef 0.1",
                   help="train.py flags of each further cpu-moe run at equal steps, separated by ';'")
    p.add_argument("--repeats", type=int, default=10, help="rounds of the interleaved step timing (median kept)")
    p.add_argument("--work-dir", default=str(ROOT / "out-moe"), help="the runs' out-dirs go here")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "moe-cpu"), help="prefix of .json and .md")
    return p.parse_args(argv)


def step_seconds(presets: list[str], args) -> list[float]:
    """The median seconds of one training step of each preset as train.py takes it on a CPU (its
    default batch and context, FusedLoss, Muon and AdamW), the presets taking turns."""
    import torch

    import bench
    from engine import FastMuon, FusedLoss
    from flags import DEVICE_DEFAULTS
    from qwen3 import Qwen3, Qwen3Config, configure_optimizers
    d = DEVICE_DEFAULTS["cpu"]
    steps = []
    for name in presets:
        torch.manual_seed(0)
        model = Qwen3(Qwen3Config.preset(name, vocab_size=d["vocab_size"], max_position_embeddings=d["seq_len"]))
        x = torch.randint(0, d["vocab_size"], (d["batch_size"], d["seq_len"]))
        opts = configure_optimizers(model, "muon", lr=3e-2, muon_lr=d["muon_lr"], muon=FastMuon)
        steps.append(bench.train_step_fn(FusedLoss(model), opts, x, torch.roll(x, -1, 1), argparse.Namespace(device="cpu")))
    return bench.timed(steps, argparse.Namespace(repeats=args.repeats, device="cpu"))


def busiest(expert_load: dict | None) -> tuple:
    """From an evaluation's expert load ({layer: [share of each expert]}): the busiest expert's share
    times E in the most lopsided layer, and the same for the shares pooled over the layers (1: even)."""
    if not expert_load:
        return None, None
    loads = list(expert_load.values())
    pooled = [sum(column) / len(loads) for column in zip(*loads)]
    return max(max(row) * len(row) for row in loads), max(pooled) * len(pooled)


def main(argv=None):
    args = parse_args(argv)
    from flags import DEVICE_DEFAULTS
    from qwen3 import Qwen3, Qwen3Config
    steps = args.max_steps or DEVICE_DEFAULTS["cpu"]["max_steps"]
    dense_s, moe_s = step_seconds(["cpu", "cpu-moe"], args)
    equal_time = round(steps * dense_s / moe_s)
    common = ["--data", "embedded", "--device", "cpu", "--sample-tokens", "0"] + (
        ["--eval-every", str(args.eval_every)] if args.eval_every else [])
    runs = {"dense (cpu)": ("dense", ["--max-steps", str(steps)]),
            "MoE (cpu-moe), equal steps": ("moe-steps", ["--preset", "cpu-moe", "--max-steps", str(steps)]),
            "MoE (cpu-moe), equal time": ("moe-time", ["--preset", "cpu-moe", "--max-steps", str(equal_time)])}
    for variant in filter(None, (v.split() for v in args.variants.split(";"))):
        runs[f"MoE (cpu-moe), equal steps, {' '.join(variant)}"] = (
            "moe" + "".join(variant).replace("--", "-"), ["--preset", "cpu-moe", "--max-steps", str(steps), *variant])
    curves = {name: train_run(Path(args.work_dir) / folder, common + flags, "cpu") for name, (folder, flags) in runs.items()}
    rows = []
    for name, curve in curves.items():
        preset = "cpu-moe" if "MoE" in name else "cpu"
        model = Qwen3(Qwen3Config.preset(preset, vocab_size=DEVICE_DEFAULTS["cpu"]["vocab_size"]))
        best, last = min(curve, key=lambda r: r["val_loss"]), curve[-1]
        rows.append(dict(run=name, steps=last["step"], params=model.num_params(), active=model.num_params(active=True),
                         ms_per_step=1000 * (moe_s if preset == "cpu-moe" else dense_s),
                         best_val_bpb=best["val_bpb"], best_val_loss=best["val_loss"], aux_loss=last.get("aux_loss"),
                         busiest=busiest(last.get("expert_load")), wall_minutes=last["elapsed_s"] / 60))
    lines = [f"Training steps timed in turns: dense {1000 * dense_s:.0f} ms, MoE {1000 * moe_s:.0f} ms "
             f"({moe_s / dense_s:.2f}x); equal time: {equal_time} MoE steps for {steps} dense.", "",
             "| run | steps | parameters | active a token | ms per step | best val bpb (nats) | load-balancing loss "
             "| busiest expert x E: worst layer, pooled |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:  # (the runs' wall minutes are in the JSON: a shared machine makes them incomparable)
        aux = "-" if r["aux_loss"] is None else f"{r['aux_loss']:.3f}"
        load = "-" if r["busiest"][0] is None else "{:.2f}, {:.2f}".format(*r["busiest"])
        lines.append(f"| {r['run']} | {r['steps']} | {r['params'] / 1e6:.2f}M | {r['active'] / 1e6:.2f}M | "
                     f"{r['ms_per_step']:.0f} | {r['best_val_bpb']:.4f} ({r['best_val_loss']:.4f}) | {aux} | {load} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps(dict(flags=vars(args), rows=rows, curves=curves), indent=1) + "\n")
    Path(f"{out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines) + f"\nwrote {out}.json, {out}.md")


if __name__ == "__main__":
    main()
