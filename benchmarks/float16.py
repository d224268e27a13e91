"""
What float16 decoding costs against float32, with the same weights: the largest logit difference
(relative to the logit scale), validation loss in both dtypes, and greedy-token agreement.

    python benchmarks/float16.py --ckpt out             # a trained model (python train.py), its validation text
    python benchmarks/float16.py --shape qwen3-0.6b     # the Qwen3-0.6B shape, random weights, random tokens

The validation text of --ckpt is the embedded corpus' held-out documents as train.py splits them by
default (--val-frac 0.05, --split-seed 0), tokenized by the checkpoint's tokenizer. A float16 pass
that overflows (inf or NaN logits; the engine's generation falls back to float32) is reported.
"""
import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from engine import Engine  # noqa: E402
from qwen3 import PRESETS, Qwen3, Qwen3Config, from_pretrained, generate  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=None, help="checkpoint directory, or a train.py run directory (best/)")
    p.add_argument("--shape", default=None, choices=list(PRESETS), help="random weights of this preset instead")
    p.add_argument("--windows", type=int, default=8, help="validation windows")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per validation window")
    p.add_argument("--prompts", type=int, default=8, help="prompts for greedy agreement")
    p.add_argument("--new-tokens", type=int, default=32, help="greedy tokens per prompt")
    p.add_argument("--json", default=None, help="write the results here as JSON")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def trained(path):
    from transformers import AutoTokenizer

    import data
    path = Path(path)
    path = next(d for d in (path, path / "best", path / "last") if (d / "config.json").is_file())
    model = from_pretrained(path, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    _, val = data.split_documents(data.embedded_documents("wiki+kjv"), 0.05, 0)
    ids = [i for doc in val[:200] for i in tok.encode(doc) + [tok.eos_token_id]]
    return str(path), model, torch.tensor(ids)


def random_model(name, n_tokens, seed):
    torch.manual_seed(seed)
    cfg = Qwen3Config.preset(name)
    return f"random {name}", Qwen3(cfg).eval(), torch.randint(0, cfg.vocab_size, (n_tokens + 1,))


@torch.no_grad()
def main():
    args = parse_args()
    if (args.ckpt is None) == (args.shape is None):
        sys.exit("give --ckpt DIR or --shape NAME")
    n_tokens = args.windows * args.seq_len
    what, model, ids = trained(args.ckpt) if args.ckpt else random_model(args.shape, n_tokens, args.seed)
    if ids.numel() < n_tokens + 1:
        sys.exit(f"only {ids.numel()} validation tokens for {args.windows} windows of {args.seq_len}")
    half = Qwen3(model.config).eval()
    half.load_state_dict(model.state_dict())
    half.half()
    x = ids[:n_tokens].view(args.windows, args.seq_len)
    y = ids[1:n_tokens + 1].view(args.windows, args.seq_len)
    res = {"model": what, "windows": args.windows, "seq_len": args.seq_len}
    losses, worst, scale, overflowed = {"float32": [], "float16": []}, 0.0, 0.0, 0
    for xw, yw in zip(x.split(1), y.split(1)):  # one window at a time: bounded memory at 151936 vocab
        l32, l16 = model(xw)[0].float(), half(xw)[0].float()
        if not torch.isfinite(l16).all():
            overflowed += 1
            continue
        losses["float32"].append(F.cross_entropy(l32.flatten(0, 1), yw.flatten()).item())
        losses["float16"].append(F.cross_entropy(l16.flatten(0, 1), yw.flatten()).item())
        worst, scale = max(worst, (l16 - l32).abs().max().item()), max(scale, l32.abs().max().item())
    res["overflowed_windows"] = overflowed
    for k, v in losses.items():
        res[f"val_loss_{k}"] = sum(v) / len(v) if v else None
    res["max_logit_diff"], res["logit_scale"] = worst, scale
    first = []
    for p in x[:args.prompts, :16].split(1):
        a = generate(model, p, args.new_tokens, temperature=0, decoder=Engine(model))[0, 16:]
        b = generate(half, p, args.new_tokens, temperature=0, decoder=Engine(half))[0, 16:]
        if half.lm_head.weight.dtype != torch.float16:  # an overflow moved it to float32: start again
            half.half()
        diff = (a != b).nonzero()
        first.append(diff[0, 0].item() if len(diff) else args.new_tokens)
    res["greedy_mean_first_divergence"] = sum(first) / len(first)
    res["greedy_identical_continuations"] = sum(f == args.new_tokens for f in first) / len(first)
    print(json.dumps(res, indent=2))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
