"""
What a training run tells you, apart from its curves (plots.py): its description at the start (the
data, the model, the steps, what the numbers shown mean), and at each evaluation a line of scores
and a sample, the same record appended to OUT/metrics.jsonl.
"""

import json
import math
import unicodedata
from pathlib import Path

import torch

import flags
from qwen3 import generate
from ranks import say


def describe(run, state, resuming: bool):
    """The run in a few lines: its data, its model, its steps, and what the numbers shown mean."""
    args, meta, config = run.args, run.data.meta, run.model.config
    say(f"data: {meta['source']}: {meta['train_tokens']:,} training tokens ({meta['train_docs']} documents), "
        f"{meta['val_tokens']:,} validation tokens ({meta['val_docs']} documents), tokenizer vocab "
        f"{len(run.data.tokenizer)}")
    moe = config.num_experts > 0  # else its three fields describe nothing
    shape = [k for k in ("vocab_size", *flags.SHAPE_FLAGS, "dropout", "max_position_embeddings")
             if moe or k not in ("num_experts", "num_experts_per_tok", "moe_intermediate_size")]
    say("model: " + json.dumps({k: getattr(config, k) for k in shape})
        + f", {run.model.num_params() / 1e6:.2f}M parameters"
        + (f", {run.model.num_params(active=True) / 1e6:.2f}M active a token" if moe else ""))
    epoch_steps = run.batches.windows_per_epoch * args.seq_len / run.tokens_per_step
    lrs = f"lr {args.lr:g}" + (f", muon lr {args.muon_lr:g}" if args.optimizer == "muon" else "")
    ranks = f" x {run.world} processes (each batch {run.batch} x accum {run.accum})" if run.world > 1 else ""
    say(f"training: {args.max_steps} steps of {run.tokens_per_step:,} tokens (batch {args.batch_size} x seq "
        f"{args.seq_len} x accum {args.grad_accum}), one epoch = {epoch_steps:.0f} steps; {args.optimizer} "
        f"({lrs}), device {run.device.type}{ranks}, {args.dtype}" + (", compiled" if args.compile else "")
        + (", CUDA graphs" if run.cuda_graphs else "")
        + (f"; resuming at step {state.step}" if resuming else ""))
    say("the bar's batch_loss is the loss of the last batch trained on (read a step late: the loop does not wait "
        "for the device), in training mode (--dropout on); 'eval:' lines score the same fixed windows of each "
        "split in eval mode, comparable from one to the next")


def show_sample(label: str, text: str) -> str:
    """`label` and a sample as the text reads, not a Python repr: its line breaks kept (indented
    under the label's end); control and format characters, which a terminal would act on, escaped."""
    text = "".join(repr(c)[1:-1] if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") and c not in "\n\t" else c
                   for c in text)
    return label + text.replace("\n", "\n" + " " * len(label))


def log_eval(out: Path, record: dict, write):
    write(f"step {record['step']:>5} | epoch {record['epoch']:.2f} | eval: train loss {record['train_loss']:.4f} "
          f"({record['train_bpb']:.3f} bpb) | val loss {record['val_loss']:.4f} ({record['val_bpb']:.3f} bpb) | "
          f"ppl {record['val_ppl']:.2f} | acc {record['val_acc']:.3f} | {record['elapsed_s'] / 60:.1f} min")
    if "sample" in record:
        write(show_sample("  sample: ", record["sample"]))
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def perplexity(loss: float) -> float:
    """exp(loss), or inf past the largest float (a diverged run)."""
    return math.exp(loss) if loss < 709 else math.inf


def sample(model, tokenizer, n: int, device, seed: int) -> str:
    """A short continuation of an empty document (the EOS separator), to see what the model writes.
    Its own random generator: training's random stream is left as it was."""
    training = model.training
    model.eval()
    idx = torch.tensor([[tokenizer.eos_token_id]], device=device)
    n = min(n, model.config.max_position_embeddings - 1)  # the context the model was trained on
    out = generate(model, idx, n, temperature=0.8, top_k=50, eos_token_id=tokenizer.eos_token_id,
                   generator=torch.Generator(device).manual_seed(seed))
    model.train(training)
    return tokenizer.decode(out[0, 1:], skip_special_tokens=True)
