"""
train.py's flags: every hyperparameter with its range, the defaults that depend on the device,
and on --resume the flags saved with the checkpoint.

A flag left at None takes the value for the device (DEVICE_DEFAULTS, both listed in --help). A
bad value is one line and exit 2 as it is parsed; the flags --resume reads from
last/training_state.json go through the same checks before they become the defaults, so a
tampered file is refused the same way.
"""

import argparse
import math
from pathlib import Path

import torch

from common import ArgumentParser, UserError
from data import default_cache_dir
from guards import CheckpointError
from qwen3 import PRESETS, Qwen3Config, read_config

# On a CPU a small model that learns something in ten minutes, on a GPU the upstream "seed"
# configuration. On a GPU, 600 steps are ~3.5 epochs of the embedded corpus, about where a model
# this size starts memorising (dropout slows that down); on a CPU, few steps of large batches,
# where Muon's lead over AdamW is largest. The learning rates were swept (README, "what we tried",
# and the optimizer sweep): the embedding, head and gains want a 10x larger AdamW step than the
# usual 3e-3 on a CPU, Muon its reference 0.02. --lr drives those three under Muon but every
# weight with --optimizer adamw, so its default depends on the optimizer too (LR_DEFAULTS).
DEVICE_DEFAULTS = {
    "cpu": dict(preset="cpu", vocab_size=4096, batch_size=16, seq_len=256, max_steps=650, eval_every=50,
                eval_batches=4, dropout=0.0, muon_lr=0.02),
    "gpu": dict(preset="seed", vocab_size=8192, batch_size=24, seq_len=512, max_steps=600, eval_every=50,
                eval_batches=20, dropout=0.1, muon_lr=0.02),
}
LR_DEFAULTS = {("cpu", "muon"): 3e-2, ("cpu", "adamw"): 3e-3, ("gpu", "muon"): 3e-3, ("gpu", "adamw"): 3e-3}
# Model-shape flags: None keeps the preset's value.
SHAPE_FLAGS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "head_dim", "rope_theta", "tie_word_embeddings", "num_experts", "num_experts_per_tok",
               "moe_intermediate_size")
# Flags about this invocation rather than the run; --resume does not take them from the checkpoint.
SESSION_FLAGS = ("device", "dtype", "compile", "cuda_graphs", "out_dir", "resume", "overwrite", "stop_at")
# Flags that only the start of a run uses, and why --resume cannot change them.
FIXED_AT_START = {
    "tokenizer": "the tokenizer is last/'s",
    "vocab_size": "the tokenizer, and its vocabulary, is last/'s",
    "zero_init_output": "the weights are last/'s",
    "time_budget": "the budget chose --max-steps when the run started (pass --max-steps to change it)",
}


def on_each_device(flag: str) -> str:
    """--help's default of a flag that DEVICE_DEFAULTS sets: the value on a CPU and on a GPU."""
    cpu, gpu = DEVICE_DEFAULTS["cpu"][flag], DEVICE_DEFAULTS["gpu"][flag]
    return f"(default: {cpu})" if cpu == gpu else f"(default: {cpu} on CPU, {gpu} on GPU)"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # show defaults, except where the help text explains them
        if action.default is None or action.default is False or "default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


# Every numeric flag has a range, checked as it is parsed (and, on --resume, on the values the
# checkpoint holds: see with_saved_flags): a bad value is one line, not a traceback later.
def checked(kind, ok, expected: str, most=None):
    """An argparse type: the string as a `kind`, refused unless ok(value) (NaN fails every comparison)
    and, with `most`, unless it is at most that."""
    def parse(s: str):
        try:
            value = kind(s)
        except (ValueError, OverflowError):
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {s!r}")
        if most is not None and value > most:
            raise argparse.ArgumentTypeError(f"expected {expected} of at most {most:,}, got {s!r}")
        return value
    return parse


# Integers stop at 2**31 - 1: config.json's own bound on the model's sizes (guards.check_config),
# and for counts of steps, tokens or documents more than any run here will reach.
INT_MOST = 2**31 - 1
positive_int = checked(int, lambda v: v >= 1, "a positive integer", INT_MOST)
count = checked(int, lambda v: v >= 0, "an integer >= 0", INT_MOST)
seed = checked(int, lambda v: 0 <= v < 2**64, "an integer in [0, 2**64)")  # numpy refuses negatives, torch 2**64
positive = checked(float, lambda v: 0 < v < math.inf, "a finite number > 0")
# Adam adds eps to float32 moments: below float32's smallest normal number (1.2e-38) it loses its
# digits, below 1e-45 it is 0, and a parameter whose gradient has been 0 then steps by 0 / 0
adam_eps = checked(float, lambda v: 1e-38 <= v < math.inf, "a finite number >= 1e-38")
non_negative = checked(float, lambda v: 0 <= v < math.inf, "a finite number >= 0")
unit = checked(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")
below_one = checked(float, lambda v: 0 <= v < 1, "a number in [0, 1)")
open_unit = checked(float, lambda v: 0 < v < 1, "a number in (0, 1)")
# 1e30 is far past any useful rate, and leaves room under float32's 3.4e38 for Muon's lr x shape scale
rate = checked(float, lambda v: 0 < v <= 1e30, "a number in (0, 1e30]")
minutes = checked(float, lambda v: 0 < v <= 525_600, "a number of minutes in (0, 525600] (a year)")


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description="Train a Qwen3 language model from scratch. Where a default depends on the "
                       "device, both are given: a small model on a CPU, the upstream seed config on a GPU.",
                       epilog="Ctrl-C or SIGTERM saves OUT/last and exits with 130 or 143 (128 + signal); "
                       "--resume continues exactly where it stopped. Errors exit with 1 (2 for bad flags). "
                       "Under torchrun (torchrun --nproc_per_node=N train.py ...) it trains data-parallel on N "
                       "GPUs (NCCL) or CPU processes (gloo); the flags still fix the global batch.",
                       formatter_class=HelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", default="auto", help="auto (the hub corpus if reachable, else embedded), smollm "
                   "(HuggingFaceTB/smollm-corpus cosmopedia-v2), embedded[:wiki|kjv|wiki+kjv] (Wikipedia "
                   "summaries + King James Bible, shipped in pip packages, offline), a .txt/.jsonl/.json/.parquet "
                   "file, folder or glob, or a hub dataset NAME[:CONFIG]")
    g.add_argument("--tokenizer", default="auto", help="auto (SmolLM-135M's for smollm, else bpe), bpe (train a "
                   "byte-level BPE on the training split), or a Hugging Face tokenizer name or folder")
    g.add_argument("--vocab-size", type=positive_int, default=None, help="vocabulary size of a trained BPE "
                   + on_each_device("vocab_size"))
    g.add_argument("--max-docs", type=positive_int, default=None, help="use at most this many documents "
                   "(default: 2000 for smollm, all otherwise)")
    g.add_argument("--max-tokens", type=positive_int, default=None, help="cut the training split to this many "
                   "tokens (default: 500000 for smollm, all otherwise)")
    g.add_argument("--val-frac", type=open_unit, default=0.05, help="fraction of documents held out for validation")
    g.add_argument("--split-seed", type=seed, default=0, help="seed of the train/validation document split")
    g.add_argument("--text-field", default="text", help="the text column of .jsonl/.parquet/hub data")
    g.add_argument("--cache-dir", default=str(default_cache_dir()), help="where tokenised data and trained "
                   "tokenizers are cached, shared by all runs")

    g = p.add_argument_group("model")
    g.add_argument("--preset", default=None, help=f"model shape: {', '.join(PRESETS)} {on_each_device('preset')}")
    for flag, kind, what in [("hidden-size", positive_int, "width of the residual stream"),
                             ("intermediate-size", positive_int, "width of the MLP"),
                             ("num-hidden-layers", positive_int, "number of blocks"),
                             ("num-attention-heads", positive_int, "query heads"),
                             ("num-key-value-heads", positive_int, "key/value heads (GQA)"),
                             ("head-dim", positive_int, "width of one head"),
                             ("rope-theta", positive, "RoPE base"),
                             ("num-experts", count, "experts in each sparse layer; 0: dense (a mixture of experts: "
                              "--preset cpu-moe)"),
                             ("num-experts-per-tok", positive_int, "experts each token is routed to"),
                             ("moe-intermediate-size", positive_int, "width of one expert's MLP")]:
        g.add_argument(f"--{flag}", type=kind, default=None, help=f"{what} (default: the preset's)")
    g.add_argument("--tie-word-embeddings", action=argparse.BooleanOptionalAction, default=None,
                   help="share the embedding and output matrices (default: the preset's)")
    g.add_argument("--router-aux-loss-coef", type=non_negative, default=None, help="weight of a mixture of "
                   "experts' load-balancing loss in the training loss (default: the preset's; Qwen3-MoE's 0.001)")
    g.add_argument("--router-aux-loss-per-layer", action=argparse.BooleanOptionalAction, default=None,
                   help="balance each sparse layer's experts on its own, rather than all layers' counts together as "
                   "transformers does (default: the preset's; on in cpu-moe)")
    g.add_argument("--dropout", type=below_one, default=None, help="dropout on attention and residual branches "
                   + on_each_device("dropout"))
    g.add_argument("--zero-init-output", action="store_true", help="start o_proj and down_proj at zero, so every "
                   "block begins as the identity (modded-nanogpt); the default is qwen3.py's initialisation")

    g = p.add_argument_group("training")
    g.add_argument("--batch-size", type=positive_int, default=None, help="sequences per micro-batch, over all "
                   "processes; under torchrun with --grad-accum 1 the processes share it "
                   + on_each_device("batch_size"))
    g.add_argument("--seq-len", type=positive_int, default=None, help="tokens per sequence "
                   + on_each_device("seq_len"))
    g.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches per optimizer step; "
                   "their gradients are averaged. Under torchrun the processes share them when it is above 1")
    g.add_argument("--max-steps", type=positive_int, default=None, help="optimizer steps; the LR schedule ends "
                   "here. With --resume, a larger value stretches the remaining schedule "
                   + on_each_device("max_steps"))
    g.add_argument("--optimizer", default="muon", help="muon (Muon for hidden matrices + AdamW) or adamw")
    g.add_argument("--lr", type=rate, default=None, help="peak AdamW learning rate: of the embedding, head and "
                   "gains with muon, of everything with adamw (default with muon: {:g} on CPU, {:g} on GPU; with "
                   "adamw: {:g} on CPU, {:g} on GPU)".format(*(LR_DEFAULTS[d, o] for o in ("muon", "adamw")
                                                                for d in ("cpu", "gpu"))))
    g.add_argument("--muon-lr", type=rate, default=None, help="peak Muon learning rate "
                   + on_each_device("muon_lr"))
    g.add_argument("--betas", type=below_one, nargs=2, default=[0.9, 0.95], help="AdamW betas")
    g.add_argument("--adam-eps", type=adam_eps, default=1e-8, help="AdamW epsilon")
    g.add_argument("--weight-decay", type=non_negative, default=0.1, help="decoupled weight decay on matrices")
    g.add_argument("--warmup-frac", type=unit, default=0.05, help="linear warmup, as a fraction of --max-steps")
    g.add_argument("--min-lr-frac", type=unit, default=0.1, help="the schedule decays to this fraction of the peak")
    g.add_argument("--schedule", choices=("cosine", "wsd"), default="cosine", help="after the warmup: a cosine "
                   "down to --min-lr-frac, or warmup-stable-decay (the peak, then a straight line down over the "
                   "last --decay-frac of the run)")
    g.add_argument("--decay-frac", type=unit, default=0.4, help="with --schedule wsd: the fraction of --max-steps "
                   "spent decaying")
    g.add_argument("--momentum-warmup-frac", type=unit, default=0.3, help="Muon's momentum rises from 0.85 to 0.95 "
                   "over this fraction of --max-steps (0: 0.95 from the first step)")
    g.add_argument("--grad-clip", type=non_negative, default=1.0, help="clip the global gradient norm (0: off)")
    g.add_argument("--seed", type=seed, default=1337, help="seed of the initial weights, dropout and data order")
    g.add_argument("--time-budget", type=minutes, default=None, metavar="MINUTES", help="choose --max-steps so "
                   "that the whole run (setup, steps, evaluations, saves) ends within this many minutes on this "
                   "machine, timed on a copy of the run first; the choice is saved, so --resume keeps it")

    g = p.add_argument_group("evaluation and checkpoints")
    g.add_argument("--eval-every", type=positive_int, default=None, help="evaluate (and save last/) every N "
                   "steps " + on_each_device("eval_every"))
    g.add_argument("--eval-batches", type=positive_int, default=None, help="batches of each split per "
                   "evaluation " + on_each_device("eval_batches"))
    g.add_argument("--sample-tokens", type=count, default=80, help="tokens to sample at the end (0: none)")
    g.add_argument("--eval-sample-tokens", type=count, default=32, help="tokens to sample at every evaluation, "
                   "from the same start and seed each time, printed and kept in metrics.jsonl (0: none)")
    g.add_argument("--out-dir", default="out", help="checkpoints (best/, last/) and metrics.jsonl go here; a "
                   "folder that holds those names but that no run wrote is refused and left as it is, and so is a "
                   "folder inside a run's best/ or last/, or inside a running run's folder")
    g.add_argument("--save-every", type=count, default=0, help="also save last/ every N steps (0: only at "
                   "evaluations, on interruption and at the end)")
    g.add_argument("--resume", action="store_true", help="continue from OUT/last with its flags; flags given "
                   "now override them, except those only a run's start uses (--tokenizer, --vocab-size, "
                   "--zero-init-output, --time-budget), which cannot change")
    g.add_argument("--overwrite", action="store_true", help="start afresh even if --out-dir holds a run "
                   "(deletes its checkpoints and metrics; never what a run did not write)")
    g.add_argument("--stop-at", type=positive_int, default=None, help="save last/ and stop after this step, "
                   "schedule unchanged; continue later with --resume")

    g = p.add_argument_group("system")
    g.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda or mps")
    g.add_argument("--dtype", default="auto", help="autocast dtype: auto (bfloat16 on CUDA, else float32), "
                   "float32 or bfloat16")
    g.add_argument("--compile", action="store_true", help="torch.compile the training loss: a slow first step, "
                   "then faster ones (on a GPU it pays in long runs: README, On a GPU)")
    g.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True, help="on CUDA, record "
                   "the training loss's forward and backward once as CUDA graphs and replay them each step: "
                   "two launches, not a thousand (one process, --grad-accum 1, a dense model, no --compile); "
                   "--no-cuda-graphs launches every kernel from Python")
    return p


def check_saved(action: argparse.Action, value):
    """A flag's value as training_state.json holds it: what typing it would give (ArgumentTypeError if
    it could not be typed)."""
    if action.nargs == 0:  # a switch
        if not isinstance(value, bool):
            raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")
    elif action.type is None:  # a word
        if not isinstance(value, str) or (action.choices and value not in action.choices):
            raise argparse.ArgumentTypeError(f"expected {' or '.join(action.choices or ['a string'])}, got {value!r}")
    elif action.nargs is not None and not (isinstance(value, list) and len(value) == action.nargs):
        raise argparse.ArgumentTypeError(f"expected {action.nargs} values, got {value!r}")
    else:
        for v in value if action.nargs is not None else [value]:
            if isinstance(v, (bool, dict, list)) or action.type(str(v)) != v:  # str() of a number reads back exactly
                raise argparse.ArgumentTypeError(f"expected what {action.option_strings[0]} takes, got {v!r}")


def with_saved_flags(parser: ArgumentParser, argv, info: dict, last: Path) -> argparse.Namespace:
    """--resume: the flags last/ was saved with become the defaults, and those given now override
    them. argparse checks the flags typed, not (non-string) defaults: the saved ones go through the
    same checks first. The flags that only a run's start uses (FIXED_AT_START) cannot change: given
    with another value, they are refused, so that what the run records is what it used."""
    saved = {k: v for k, v in info["args"].items() if k not in SESSION_FLAGS}
    path = last / "training_state.json"
    for action in parser._actions:
        if saved.get(action.dest) is None:
            continue
        try:
            check_saved(action, saved[action.dest])
        except argparse.ArgumentTypeError as e:
            raise CheckpointError(f"{path} holds a bad {action.option_strings[0]}: {e}") from None
    # A run saved by an older train.py continues as it started: without the momentum warmup that
    # came later, and with the model it holds where it left the shape to a preset.
    saved.setdefault("momentum_warmup_frac", 0.0)
    held = read_config(last / "config.json")
    saved.update({k: getattr(held, k) for k in SHAPE_FLAGS if saved.get(k) is None})
    parser.set_defaults(**saved)
    args = parser.parse_args(argv)
    for action in parser._actions:
        if action.dest in FIXED_AT_START and action.dest in saved and getattr(args, action.dest) != saved[action.dest]:
            parser.error(f"{action.option_strings[0]} {getattr(args, action.dest)}: --resume goes on as the run "
                         f"started, with {saved[action.dest]} ({path}); {FIXED_AT_START[action.dest]}")
    return args


def for_device(args: argparse.Namespace, device, world: int):
    """The flags left at None take the device's values; then the checks that need the device or the
    number of processes."""
    kind = "cpu" if device.type == "cpu" else "gpu"
    for k, v in DEVICE_DEFAULTS[kind].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.dtype == "auto":
        args.dtype = "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    if args.dtype not in ("float32", "bfloat16"):
        raise UserError(f"unknown --dtype {args.dtype!r}; choose auto, float32 or bfloat16")
    if args.optimizer not in ("muon", "adamw"):
        raise UserError(f"unknown --optimizer {args.optimizer!r}; choose muon or adamw")
    if args.lr is None:
        args.lr = LR_DEFAULTS[kind, args.optimizer]
    # The global batch stays what the flags say: the processes share the micro-batches of a step,
    # or, without accumulation, the sequences of the one micro-batch.
    if args.grad_accum > 1 and args.grad_accum % world:
        raise UserError(f"--grad-accum {args.grad_accum} does not split over {world} processes; "
                        f"use a multiple of {world}")
    if args.grad_accum == 1 and args.batch_size % world:
        raise UserError(f"--batch-size {args.batch_size} does not split over {world} processes (with "
                        f"--grad-accum 1 they share each batch); use a multiple of {world}")


def model_config(args: argparse.Namespace, tokenizer=None) -> Qwen3Config:
    """The model the flags describe: the preset, its shape flags, trained on --seq-len tokens; with
    `tokenizer`, its vocabulary and special tokens."""
    overrides = {k: getattr(args, k) for k in SHAPE_FLAGS if getattr(args, k) is not None}
    overrides.update(dropout=args.dropout, max_position_embeddings=args.seq_len)  # the context it is trained on
    overrides.update({k: getattr(args, k) for k in ("router_aux_loss_coef", "router_aux_loss_per_layer")
                      if getattr(args, k) is not None})
    if tokenizer is not None:  # the vocabulary is the tokenizer's, whatever the preset says
        overrides.update(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)
    try:
        return Qwen3Config.preset(args.preset, **overrides)
    except ValueError as e:
        raise UserError(str(e)) from None
