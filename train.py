"""
Train a Qwen3 from scratch, and keep what it learns.

    python train.py                          # offline, ~10 minutes on a 2-core CPU (embedded corpus)
    python train.py --data smollm            # the upstream corpus from the hub; on a GPU: the seed config
    python train.py --resume                 # continue out/last after Ctrl-C, SIGTERM, a crash or --stop-at
    python train.py --time-budget 10         # as many steps as fit in ten minutes on this machine
    python train.py --help                   # every flag
    torchrun --standalone --nproc_per_node=8 train.py ...   # data-parallel on 8 GPUs (or CPU processes)

Read it top to bottom:
    1. Flags          every hyperparameter, with its range and device-dependent defaults; joining a
                      torchrun job; locking the out-dir (one run per folder)
    2. A run          its fixed parts (data, model, optimizers) and its state, saved for --resume
    3. Evaluation     loss, perplexity, accuracy and bits per byte on fixed windows of each split; a
                      sample, OUT/curves.png; best/, last/
    4. Stopping       Ctrl-C and SIGTERM: save last/ at the end of the step
    5. The loop       warmup + cosine schedule, gradient accumulation, clipping, bf16 on CUDA;
                      --time-budget: the step count that ends the run on time
Where the tokens come from, and in which order they are read, is data.py's story; how a checkpoint
survives a crash is checkpoint.py's.

Under torchrun the same loop runs in every process (a "rank") with PyTorch's
DistributedDataParallel: the flags still fix the global batch, each rank reads its own share of
the step's samples, gradients are averaged across ranks during the last backward pass of a step,
and every rank then takes the same optimizer step, so all hold the same weights. Decisions
(stop, NaN) are taken together; rank 0 alone prints and writes files.
"""

import argparse
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from checkpoint import (load_training_state, lock_out_dir, read_training_info, recover, release_out_dirs,
                        save_checkpoint)
from common import UserError, error, one_line, pick_device
from data import Batches, TokenData, default_cache_dir, fixed_starts, prepare_data, token_bytes, windows
from engine import FastMuon, FusedLoss
from qwen3 import PRESETS, CheckpointError, Muon, Qwen3, Qwen3Config, configure_optimizers, from_pretrained, generate, read_config

# %% 1. Flags
# Flags left at None take the value for the device: on a CPU a small model that learns something
# in ten minutes, on a GPU the upstream "seed" configuration. The embedded corpus is ~2.1M
# training tokens, so on a GPU (~12k tokens per step) 600 steps is ~3.5 epochs, about where a
# model this size stops generalising and starts memorising; dropout slows that down. On a CPU,
# 650 steps of 16 x 256 tokens (~1.1 epochs) fill ten minutes of a 2-core machine: 1500 steps
# of 8 learned a little more (0.007 bits per byte), but Muon's lead over AdamW is largest in short
# runs of large batches. Evaluating every 50 steps (as many rows per split as before, 4 x 16) keeps
# the curve and costs ~8% of the run. The learning rates were swept there (README, "what we
# tried", and the optimizer sweep): the embedding, head and gains want a 10x larger AdamW step
# than the usual 3e-3 (measured at an earlier, wider shape), and Muon its reference 0.02 at this
# batch (at batch 8 it wanted 0.01). --lr drives those three under Muon but every weight with
# --optimizer adamw, so its default depends on the optimizer too (LR_DEFAULTS).
DEVICE_DEFAULTS = {
    "cpu": dict(preset="cpu", vocab_size=4096, batch_size=16, seq_len=256, max_steps=650, eval_every=50,
                eval_batches=4, dropout=0.0, muon_lr=0.02),
    "gpu": dict(preset="seed", vocab_size=8192, batch_size=24, seq_len=512, max_steps=600, eval_every=50,
                eval_batches=20, dropout=0.1, muon_lr=0.02),
}
LR_DEFAULTS = {("cpu", "muon"): 3e-2, ("cpu", "adamw"): 3e-3, ("gpu", "muon"): 3e-3, ("gpu", "adamw"): 3e-3}
# Model-shape flags: None keeps the preset's value.
SHAPE_FLAGS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "head_dim", "rope_theta", "tie_word_embeddings")
# Flags about this invocation rather than the run; --resume does not take them from the checkpoint.
SESSION_FLAGS = ("device", "dtype", "compile", "out_dir", "resume", "overwrite", "stop_at")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # show defaults, except where the help text explains them
        if action.default is None or action.default is False or "default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage dump
        sys.exit(2 * error(f"{message} (see --help)"))


# Every numeric flag has a range, checked as it is parsed (and, on --resume, on the values the
# checkpoint holds: see check_saved_flags): a bad value is one line, not a traceback later.
def checked(kind, ok, expected: str):
    """An argparse type: the string as a `kind`, refused unless ok(value) (NaN fails every comparison)."""
    def parse(s: str):
        try:
            value = kind(s)
        except (ValueError, OverflowError):
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {s!r}")
        return value
    return parse


positive_int = checked(int, lambda v: v >= 1, "a positive integer")
count = checked(int, lambda v: v >= 0, "an integer >= 0")
seed = checked(int, lambda v: 0 <= v < 2**64, "an integer in [0, 2**64)")  # numpy refuses negatives, torch 2**64
positive = checked(float, lambda v: 0 < v < math.inf, "a finite number > 0")
non_negative = checked(float, lambda v: 0 <= v < math.inf, "a finite number >= 0")
unit = checked(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")
below_one = checked(float, lambda v: 0 <= v < 1, "a number in [0, 1)")
open_unit = checked(float, lambda v: 0 < v < 1, "a number in (0, 1)")
# 1e30 is far past any useful rate, and leaves room under float32's 3.4e38 for Muon's lr x shape scale
rate = checked(float, lambda v: 0 < v <= 1e30, "a number in (0, 1e30]")
minutes = checked(float, lambda v: 0 < v <= 525_600, "a number of minutes in (0, 525600] (a year)")


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description="Train a Qwen3 language model from scratch. Defaults marked 'device' "
                       "depend on the device: a small model on a CPU, the upstream seed config on a GPU.",
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
                   "(default: device, 4096 on CPU, 8192 on GPU)")
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
    g.add_argument("--preset", default=None, help=f"model shape: {', '.join(PRESETS)} (default: device)")
    for flag, kind, what in [("hidden-size", positive_int, "width of the residual stream"),
                             ("intermediate-size", positive_int, "width of the MLP"),
                             ("num-hidden-layers", positive_int, "number of blocks"),
                             ("num-attention-heads", positive_int, "query heads"),
                             ("num-key-value-heads", positive_int, "key/value heads (GQA)"),
                             ("head-dim", positive_int, "width of one head"),
                             ("rope-theta", positive, "RoPE base")]:
        g.add_argument(f"--{flag}", type=kind, default=None, help=f"{what} (default: the preset's)")
    g.add_argument("--tie-word-embeddings", action=argparse.BooleanOptionalAction, default=None,
                   help="share the embedding and output matrices (default: the preset's)")
    g.add_argument("--dropout", type=below_one, default=None, help="dropout on attention and residual branches "
                   "(default: device, 0 on CPU, 0.1 on GPU)")
    g.add_argument("--zero-init-output", action="store_true", help="start o_proj and down_proj at zero, so every "
                   "block begins as the identity (modded-nanogpt); the default is qwen3.py's initialisation")

    g = p.add_argument_group("training")
    g.add_argument("--batch-size", type=positive_int, default=None, help="sequences per micro-batch, over all "
                   "processes; under torchrun with --grad-accum 1 the processes share it (default: device)")
    g.add_argument("--seq-len", type=positive_int, default=None, help="tokens per sequence (default: device)")
    g.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches per optimizer step; "
                   "their gradients are averaged. Under torchrun the processes share them when it is above 1")
    g.add_argument("--max-steps", type=positive_int, default=None, help="optimizer steps; the LR schedule ends "
                   "here. With --resume, a larger value stretches the remaining schedule (default: device)")
    g.add_argument("--optimizer", default="muon", help="muon (Muon for hidden matrices + AdamW) or adamw")
    g.add_argument("--lr", type=rate, default=None, help="peak AdamW learning rate: of the embedding, head and "
                   "gains with muon, of everything with adamw (default: 3e-2 with muon on CPU, else 3e-3)")
    g.add_argument("--muon-lr", type=rate, default=None, help="peak Muon learning rate (default: 0.02)")
    g.add_argument("--betas", type=below_one, nargs=2, default=[0.9, 0.95], help="AdamW betas")
    g.add_argument("--adam-eps", type=positive, default=1e-8, help="AdamW epsilon")
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
                   "steps (default: device)")
    g.add_argument("--eval-batches", type=positive_int, default=None, help="batches of each split per "
                   "evaluation (default: device)")
    g.add_argument("--sample-tokens", type=count, default=80, help="tokens to sample at the end (0: none)")
    g.add_argument("--eval-sample-tokens", type=count, default=32, help="tokens to sample at every evaluation, "
                   "from the same start and seed each time, printed and kept in metrics.jsonl (0: none)")
    g.add_argument("--out-dir", default="out", help="checkpoints (best/, last/) and metrics.jsonl go here")
    g.add_argument("--save-every", type=count, default=0, help="also save last/ every N steps (0: only at "
                   "evaluations, on interruption and at the end)")
    g.add_argument("--resume", action="store_true", help="continue from OUT/last with its flags; flags given "
                   "now override them")
    g.add_argument("--overwrite", action="store_true", help="start afresh even if --out-dir holds a checkpoint "
                   "(deletes it)")
    g.add_argument("--stop-at", type=positive_int, default=None, help="save last/ and stop after this step, "
                   "schedule unchanged; continue later with --resume")

    g = p.add_argument_group("system")
    g.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda or mps")
    g.add_argument("--dtype", default="auto", help="autocast dtype: auto (bfloat16 on CUDA, else float32), "
                   "float32 or bfloat16")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (faster on GPUs, slow start)")
    return p


# torchrun starts one process per GPU (or CPU worker) and tells each, in environment variables,
# how many there are (WORLD_SIZE), which one it is (RANK) and which one on its machine (LOCAL_RANK).


def init_distributed(device: torch.device) -> torch.device:
    """Join the torchrun job, if this process is part of one: NCCL between GPUs, gloo between CPU
    processes. Returns the device to train on (cuda:LOCAL_RANK for GPUs)."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return device  # plain `python train.py` (or a one-process torchrun): nothing to join
    if device.type == "cuda":
        local_rank = int(os.environ["LOCAL_RANK"])
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {local_rank}, but only {torch.cuda.device_count()} GPU(s) are visible; "
                             f"start at most that many processes per machine")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    elif device.type == "cpu":
        dist.init_process_group("gloo")
    else:
        raise UserError(f"data-parallel training runs on cuda or cpu, not {device.type}")
    return device


def rank_and_world() -> tuple[int, int]:
    """(this process's rank, the number of processes): (0, 1) outside torchrun."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def say(*args, **kwargs):
    """print, on rank 0 alone: one voice for the whole job."""
    if rank_and_world()[0] == 0:
        print(*args, **kwargs)


def all_ranks(values: list[float], device, op=dist.ReduceOp.SUM) -> list[float]:
    """`values` reduced elementwise over all ranks (summed, or op); as they are in one process."""
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op)
    return t.tolist()


def check_saved_flags(parser: ArgumentParser, saved: dict, path: Path):
    """argparse checks the flags typed now, not (non-string) defaults: put the flags a checkpoint
    holds through the same checks before they become the defaults."""
    for action in parser._actions:
        value = saved.get(action.dest)
        if action.type is None or value is None:
            continue
        try:
            if action.nargs is not None and not (isinstance(value, list) and len(value) == action.nargs):
                raise argparse.ArgumentTypeError(f"expected {action.nargs} values, got {value!r}")
            for v in value if action.nargs is not None else [value]:
                action.type(str(v))  # str() of a number reads back exactly
        except argparse.ArgumentTypeError as e:
            raise CheckpointError(f"{path} holds a bad {action.option_strings[0]}: {e}") from None


def parse_args(argv=None):
    """Flags -> (args, device, the checkpoint's training_state.json when resuming, else None).
    Under torchrun, also joins the job: the device depends on the rank."""
    parser = build_parser()
    args = parser.parse_args(argv)
    device = init_distributed(pick_device(args.device))  # --device is a session flag: not from a checkpoint
    rank, world = rank_and_world()
    out, problem = Path(args.out_dir), None
    if rank == 0:  # before anything in OUT/ is touched: make it this run's alone, then finish a save cut short
        try:
            lock_out_dir(out)
            recover(out)
        except (CheckpointError, OSError) as e:
            problem = str(e)
    # Decided together (rank 0 alone stopping would leave the others waiting); this also holds
    # the other ranks back until last/ is whole.
    if all_ranks([problem is not None], device)[0]:
        raise UserError(problem or f"rank 0 could not take --out-dir {out} (its error says why)")
    info = None
    if args.resume:
        info = read_training_info(out / "last")
        saved = {k: v for k, v in info["args"].items() if k not in SESSION_FLAGS}
        check_saved_flags(parser, saved, out / "last" / "training_state.json")
        # A run saved by an older train.py continues as it started: without the momentum warmup
        # that came later, and with the model it holds where it left the shape to a preset.
        saved.setdefault("momentum_warmup_frac", 0.0)
        held = read_config(out / "last" / "config.json")
        saved.update({k: getattr(held, k) for k in SHAPE_FLAGS if saved.get(k) is None})
        parser.set_defaults(**saved)
        args = parser.parse_args(argv)  # the checkpoint's flags, overridden by those given now
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
    return args, device, info


def model_config(args, tokenizer=None) -> Qwen3Config:
    overrides = {k: getattr(args, k) for k in SHAPE_FLAGS if getattr(args, k) is not None}
    overrides.update(dropout=args.dropout, max_position_embeddings=args.seq_len)  # the context it is trained on
    if tokenizer is not None:  # the vocabulary is the tokenizer's, whatever the preset says
        overrides.update(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)
    try:
        return Qwen3Config.preset(args.preset, **overrides)
    except ValueError as e:
        raise UserError(str(e)) from None


# %% 2. A run
# A run is made of fixed parts, set up once per session from the flags (the data, the model, its
# optimizers, how each rank shares a step), and of a small state that changes as it trains (the
# step, the best score, the time spent). last/ holds both: the flags and the state in
# training_state.json, the optimizer moments and RNG streams in training_state.pt (see
# checkpoint.py for how it is written safely), so --resume rebuilds the fixed parts from the flags
# and puts the state back, and the run continues as if it had never stopped.


def check_out_dir(out: Path, config: Qwen3Config, resuming: bool, overwrite: bool):
    """Refuse to mix runs: a checkpoint already in --out-dir is continued (--resume), replaced
    (--overwrite) or left alone (error), and --resume must not change the model's shape."""
    existing = next((out / n for n in ("last", "best") if (out / n / "config.json").is_file()), None)
    if existing is None or (overwrite and not resuming):
        return
    theirs = read_config(existing / "config.json")
    diff = [f"{k} {getattr(theirs, k)} there, {getattr(config, k)} here" for k in SHAPE_FLAGS
            if getattr(theirs, k) != getattr(config, k)]
    if diff:
        raise UserError(f"{out} holds a different model ({'; '.join(diff)}); use another --out-dir"
                         + ("" if resuming else " or --overwrite"))
    if not resuming:
        raise UserError(f"{out} already holds a checkpoint ({existing}); pass --resume to continue it "
                         f"or --overwrite to start again")


@dataclass
class RunState:
    """How far the run has got: saved in last/training_state.json, restored by --resume."""
    step: int = 0  # optimizer steps taken
    best_val_loss: float | None = None  # the lowest validation loss so far, at best_step: what best/ holds
    best_step: int | None = None
    elapsed_s: float = 0.0  # training time, over all sessions
    steps_s: float = 0.0  # the part of it spent in optimizer steps (not evaluating or saving)
    saved_at: int | None = None  # the step last/ holds (not saved: a resumed run's is its step)


@dataclass
class Run:
    """The fixed parts of a run, made by setup()."""
    args: argparse.Namespace
    device: torch.device
    rank: int  # this process, of `world` (0 of 1 outside torchrun)
    world: int
    data: TokenData
    batches: Batches  # the training order
    train_eval: np.ndarray  # the fixed windows each evaluation scores
    val_eval: np.ndarray
    eval_bytes: dict  # {"train": n, "val": n}: the UTF-8 bytes their scored targets stand for
    model: Qwen3
    train_net: torch.nn.Module  # the training loss (engine.FusedLoss), compiled with --compile, in DDP under torchrun
    optimizers: list
    autocast: object
    batch: int  # this rank's share of a step: `accum` micro-batches of `batch` sequences
    accum: int

    @property
    def out(self) -> Path:
        return Path(self.args.out_dir)

    @property
    def last(self) -> Path:
        return self.out / "last"

    @property
    def tokens_per_step(self) -> int:
        return self.args.batch_size * self.args.seq_len * self.args.grad_accum

    @property
    def schedule(self) -> tuple:  # lr_multiplier's arguments after the step
        a = self.args
        return a.max_steps, a.warmup_frac, a.min_lr_frac, a.decay_frac if a.schedule == "wsd" else None

    def bits_per_byte(self, loss: float, split: str) -> float:
        """An evaluation's mean loss (nats per token) on `split` as bits per byte (section 3)."""
        targets = len(self.train_eval if split == "train" else self.val_eval) * self.args.seq_len
        return loss * targets / math.log(2) / self.eval_bytes[split]


def setup(args, device: torch.device, info: dict | None, log=say) -> Run:
    """The data, the model (last/'s weights with --resume), its optimizers, and the share of each
    step this rank trains on."""
    rank, world = rank_and_world()
    last = Path(args.out_dir) / "last"
    # Under torchrun the first process on each machine fills the cache (trains the tokenizer,
    # tokenises) while the others wait; then they read it.
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if world > 1 else 0
    if local_rank > 0:
        dist.barrier()
    data = prepare_data(args.data, str(last) if info else args.tokenizer, vocab_size=args.vocab_size,
                        max_docs=args.max_docs, max_tokens=args.max_tokens, val_frac=args.val_frac,
                        split_seed=args.split_seed, text_field=args.text_field, cache_dir=args.cache_dir,
                        log=log)
    if local_rank == 0 and world > 1:
        dist.barrier()
    sizes = [len(data.train), len(data.val), len(data.tokenizer)]
    if all_ranks(sizes, device, dist.ReduceOp.MAX) != all_ranks(sizes, device, dist.ReduceOp.MIN):
        raise UserError("the processes read different data (--data auto may have resolved differently, or the "
                         "machines' files differ); give every machine the same files and name them with --data")
    args.data = data.spec  # "auto" resolved: --resume must read the same data
    batches = Batches(data.train, args.seq_len, args.seed)
    if batches.windows_per_epoch < 1 or len(data.val) < args.seq_len + 1:
        raise UserError(f"corpus too small for --seq-len {args.seq_len}: {len(data.train)} training and "
                         f"{len(data.val)} validation tokens, need at least {2 * args.seq_len} and "
                         f"{args.seq_len + 1}; use more data or a shorter --seq-len")
    if info is not None and info.get("data_key") != data.key:
        say("warning: the data differ from the checkpoint's; resuming on the new data", file=sys.stderr)
    eval_count = args.eval_batches * args.batch_size
    train_eval = fixed_starts(data.train, args.seq_len, eval_count)
    val_eval = fixed_starts(data.val, args.seq_len, eval_count)
    table = token_bytes(data.tokenizer)
    if table is None:
        log(f"bits per byte: {type(data.tokenizer).__name__} is not a byte-level BPE; counting the bytes of "
            f"each evaluation window's decoded targets instead (exact except where a window cuts a character)")
    eval_bytes = {split: target_bytes(tokens, starts, args.seq_len, data.tokenizer, table)
                  for split, tokens, starts in (("train", data.train, train_eval), ("val", data.val, val_eval))}

    torch.manual_seed(args.seed)
    model = Qwen3(model_config(args, data.tokenizer))
    if args.zero_init_output:
        for layer in model.model.layers:
            torch.nn.init.zeros_(layer.self_attn.o_proj.weight)
            torch.nn.init.zeros_(layer.mlp.down_proj.weight)
    if info is not None:
        model.load_state_dict(from_pretrained(last).state_dict())
    model.to(device)
    optimizers = configure_optimizers(model, args.optimizer, lr=args.lr, muon_lr=args.muon_lr,
                                      weight_decay=args.weight_decay, betas=tuple(args.betas), eps=args.adam_eps,
                                      muon=FastMuon)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    net = FusedLoss(model)  # the loss without the logits (engine.py)
    net = torch.compile(net) if args.compile else net
    # Training passes go through DDP, which averages gradients across ranks in backward (and first
    # copies rank 0's weights to all); evaluation runs the model itself, no gradients to sync.
    train_net = DDP(net, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else net
    if args.grad_accum == 1:  # this rank's share of each step: a part of the one micro-batch ...
        batch, accum = args.batch_size // world, 1
    else:  # ... or some of the micro-batches
        batch, accum = args.batch_size, args.grad_accum // world
    autocast = torch.autocast(device.type, torch.bfloat16) if args.dtype == "bfloat16" else nullcontext()
    return Run(args=args, device=device, rank=rank, world=world, data=data, batches=batches, train_eval=train_eval,
               val_eval=val_eval, eval_bytes=eval_bytes, model=model, train_net=train_net, optimizers=optimizers,
               autocast=autocast, batch=batch, accum=accum)


def resume(run: Run, info: dict) -> RunState:
    """Put last/'s optimizer moments and RNG streams back into the run; its state from `info`."""
    state = load_training_state(run.last, info)
    try:
        for opt, opt_state in zip(run.optimizers, state["optimizers"], strict=True):
            flags = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
            opt.load_state_dict(opt_state)  # moments from the checkpoint ...
            for group, hyper in zip(opt.param_groups, flags, strict=True):
                group.update(hyper)  # ... learning rates, decay, betas from the flags
        torch.set_rng_state(state["rng_cpu"])
        if run.device.type == "cuda" and "rng_cuda" in state:
            torch.cuda.set_rng_state(state["rng_cuda"], run.device)
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise UserError(f"{run.last / 'training_state.pt'} does not fit this run (was --optimizer changed?): "
                         f"{one_line(e, 200)}") from None
    return RunState(info["step"], info["best_val_loss"], info["best_step"], info["elapsed_s"],
                    info.get("steps_s", 0.0), saved_at=info["step"])  # .get: checkpoints from before steps_s


def save_last(run: Run, state: RunState):
    """last/: the model, and what --resume needs. Every rank holds the same weights and optimizer
    states, so rank 0's are the run's."""
    if run.rank == 0:
        args = run.args
        training = dict(optimizers=[o.state_dict() for o in run.optimizers], rng_cpu=torch.get_rng_state())
        if run.device.type == "cuda":
            training["rng_cuda"] = torch.cuda.get_rng_state(run.device)
        info = dict(step=state.step, max_steps=args.max_steps,
                    samples_seen=state.step * args.batch_size * args.grad_accum, best_val_loss=state.best_val_loss,
                    best_step=state.best_step, elapsed_s=state.elapsed_s, steps_s=state.steps_s,
                    data_key=run.data.key, args={k: v for k, v in vars(args).items() if k not in SESSION_FLAGS})
        save_checkpoint(run.out, "last", run.model, run.data.tokenizer, training, info)
    state.saved_at = state.step


def open_out_dir(run: Run, state: RunState, resuming: bool):
    """--overwrite deletes the old checkpoints; a resumed metrics.jsonl goes on from its step. (OUT/
    exists: parse_args made it and holds its lock.)"""
    if run.rank > 0:
        return
    if run.args.overwrite and not resuming:
        for name in ("best", "last"):
            shutil.rmtree(run.out / name, ignore_errors=True)
    metrics = run.out / "metrics.jsonl"
    kept = [r for r in read_metrics(metrics) if r["step"] <= state.step] if resuming else []
    metrics.write_text("".join(json.dumps(r) + "\n" for r in kept))


def describe(run: Run, state: RunState, resuming: bool):
    """The run in three lines: its data, its model, its steps."""
    args, meta, config = run.args, run.data.meta, run.model.config
    say(f"data: {meta['source']}: {meta['train_tokens']:,} training tokens ({meta['train_docs']} documents), "
        f"{meta['val_tokens']:,} validation tokens ({meta['val_docs']} documents), tokenizer vocab "
        f"{len(run.data.tokenizer)}")
    say("model: " + json.dumps({k: getattr(config, k) for k in ("vocab_size", *SHAPE_FLAGS, "dropout",
                                                                "max_position_embeddings")})
        + f", {run.model.num_params() / 1e6:.2f}M parameters")
    epoch_steps = run.batches.windows_per_epoch * args.seq_len / run.tokens_per_step
    lrs = f"lr {args.lr:g}" + (f", muon lr {args.muon_lr:g}" if args.optimizer == "muon" else "")
    ranks = f" x {run.world} processes (each batch {run.batch} x accum {run.accum})" if run.world > 1 else ""
    say(f"training: {args.max_steps} steps of {run.tokens_per_step:,} tokens (batch {args.batch_size} x seq "
        f"{args.seq_len} x accum {args.grad_accum}), one epoch = {epoch_steps:.0f} steps; {args.optimizer} "
        f"({lrs}), device {run.device.type}{ranks}, {args.dtype}" + (", compiled" if args.compile else "")
        + (f"; resuming at step {state.step}" if resuming else ""))


# %% 3. Evaluation
# Both splits are scored on the same fixed windows every time, in eval mode (no dropout), so the
# numbers are comparable across evaluations and the train/validation gap measures memorisation.
# Perplexity is exp(validation loss); accuracy is the fraction of next tokens predicted by argmax.
# Under torchrun each rank scores every world-th batch and the sums are added up across ranks.
#
# Loss per token depends on the tokenizer (a bigger vocabulary packs more text into each token),
# so it cannot compare runs with different vocabularies; bits per byte can: the summed loss of
# every scored target, in bits, divided by the UTF-8 bytes those targets stand for. EOS targets
# count in the sum (predicting where a document ends is part of the task) and stand for 0 bytes.
# The windows are fixed, so each split's byte count is counted once, at setup: from a table of
# bytes per token id for a byte-level BPE (data.token_bytes), else by decoding each window's
# targets. (Gao et al. 2020, "The Pile: An 800GB Dataset of Diverse Text for Language Modeling",
# compare models across tokenizers this way.)
#
# Every --eval-every steps (and at the end) the scores are logged, with a short sample from the
# same start (an empty document) and seed each time, so the text can be watched turning from
# noise into words; OUT/curves.png is redrawn; a new best validation loss replaces best/, and
# last/ is saved; --save-every saves last/ more often.


@torch.no_grad()
def evaluate(model, tokens, starts, args, device, autocast) -> tuple[float, float]:
    rank, world = rank_and_world()
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for i in range(rank * args.batch_size, len(starts), world * args.batch_size):
        x, y = (torch.from_numpy(a).to(device) for a in windows(tokens, starts[i:i + args.batch_size], args.seq_len))
        with autocast:
            logits, loss = model(x, y)
        loss_sum += loss.item() * y.numel()
        correct += (logits.argmax(-1) == y).sum().item()
        count += y.numel()
    model.train()
    loss_sum, correct, count = all_ranks([loss_sum, correct, count], device)
    return loss_sum / count, correct / count


def perplexity(loss: float) -> float:
    """exp(loss), or inf past the largest float (a diverged run)."""
    return math.exp(loss) if loss < 709 else math.inf


def target_bytes(tokens, starts, seq_len: int, tokenizer, table) -> int:
    """The UTF-8 bytes that the targets of the windows at `starts` stand for."""
    targets = windows(tokens, starts, seq_len)[1]  # (len(starts), seq_len)
    if table is not None:
        return int(table[targets].sum())
    return sum(len(tokenizer.decode(t, skip_special_tokens=True).encode()) for t in targets)


def log_eval(out: Path, record: dict, write):
    write(f"step {record['step']:>5} | epoch {record['epoch']:.2f} | train loss {record['train_loss']:.4f} "
          f"({record['train_bpb']:.3f} bpb) | val loss {record['val_loss']:.4f} ({record['val_bpb']:.3f} bpb) | "
          f"ppl {record['val_ppl']:.2f} | acc {record['val_acc']:.3f} | {record['elapsed_s'] / 60:.1f} min")
    if "sample" in record:
        write(f"  sample: {record['sample']!r}")
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def read_metrics(path: Path) -> list[dict]:
    records = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            records.append(json.loads(line))
        except ValueError:
            pass  # a line cut short by a hard kill
    return records


def sample(model, tokenizer, n: int, device, seed: int) -> str:
    """A short continuation of an empty document (the EOS separator), to see what the model writes.
    Its own random generator: training's random stream is left as it was."""
    training = model.training
    model.eval()
    idx = torch.tensor([[tokenizer.eos_token_id]], device=device)
    out = generate(model, idx, n, temperature=0.8, top_k=50, eos_token_id=tokenizer.eos_token_id,
                         generator=torch.Generator(device).manual_seed(seed))
    model.train(training)
    return tokenizer.decode(out[0, 1:], skip_special_tokens=True)


X_LABELS = {"step": "optimizer steps", "epoch": "epochs", "elapsed_s": "seconds of training"}


def plot_curves(runs: dict[str, list[dict]], path: Path, x: str = "step", title: str | None = None):
    """Train (dashed) and validation (solid) loss, and bits per byte if every record has it, of
    each run {label: its metrics records} against `x`, the best validation point marked. One run
    against steps also gets elapsed minutes on the top axis. The PNG is written under a temporary
    name and renamed: a viewer never sees half of it."""
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
        fig.suptitle(title)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=110)
    os.replace(tmp, path)


def evaluate_and_save(run: Run, state: RunState, write):
    """What happens between steps: at an evaluation step, score both splits, log them and keep a
    new best in best/; then save last/ at evaluations and every --save-every steps."""
    args, step = run.args, state.step
    evaluating = step % args.eval_every == 0 or step == args.max_steps
    if evaluating:
        train_loss, _ = evaluate(run.model, run.data.train, run.train_eval, args, run.device, run.autocast)
        val_loss, val_acc = evaluate(run.model, run.data.val, run.val_eval, args, run.device, run.autocast)
        if run.rank == 0:
            lr = run.optimizers[0].param_groups[0]["base_lr"] * lr_multiplier(step, *run.schedule)
            record = dict(step=step, epoch=run.batches.epochs(step * args.batch_size * args.grad_accum),
                          tokens=step * run.tokens_per_step, train_loss=train_loss, val_loss=val_loss,
                          train_bpb=run.bits_per_byte(train_loss, "train"), val_bpb=run.bits_per_byte(val_loss, "val"),
                          val_ppl=perplexity(val_loss), val_acc=val_acc, lr=lr, elapsed_s=state.elapsed_s,
                          steps_s=state.steps_s)
            if args.eval_sample_tokens > 0:
                record["sample"] = sample(run.model, run.data.tokenizer, args.eval_sample_tokens, run.device,
                                          args.seed)
            log_eval(run.out, record, write)
            try:
                plot_curves({"": read_metrics(run.out / "metrics.jsonl")}, run.out / "curves.png")
            except Exception as e:  # a picture is never worth the run
                write(f"warning: {run.out / 'curves.png'} not updated ({type(e).__name__}: "
                      f"{one_line(e, 200)})")
        if step > 0 and (state.best_val_loss is None or val_loss < state.best_val_loss):
            state.best_val_loss, state.best_step = val_loss, step
            if run.rank == 0:
                save_checkpoint(run.out, "best", run.model, run.data.tokenizer)
    if step > 0 and (evaluating or (args.save_every and step % args.save_every == 0)):
        save_last(run, state)


# %% 4. Stopping
# Ctrl-C and SIGTERM (sent by `kill`, schedulers, shutdowns; torchrun passes them on to every
# rank) ask the loop to save last/ and stop at the end of the current step; a second one stops
# at once (the previous last/ survives). Ranks agree on the stop step: any rank's request counts.


class StopRequest:
    """While in a `with` block, Ctrl-C and SIGTERM are noted rather than fatal (the second one is)."""

    def __init__(self, last: Path, write):
        self.last, self.write, self.signum = last, write, 0

    def __enter__(self):
        self.handlers = {s: signal.signal(s, self.request) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, h in self.handlers.items():
            signal.signal(s, h)

    def request(self, signum, frame):
        if self.signum:
            raise KeyboardInterrupt
        self.signum = signum
        self.write(f"{signal.Signals(signum).name}: saving {self.last} at the end of this step "
                   f"(again to quit without saving)")

    def agreed(self, device) -> int:
        """The signal any rank has received (0: none), the same on every rank."""
        return int(all_ranks([self.signum], device, dist.ReduceOp.MAX)[0])


# %% 5. The loop
# One optimizer step = --grad-accum micro-batches whose losses are averaged (each is divided by
# the count before backward, and all hold the same number of tokens), then gradient clipping,
# then every optimizer steps with the learning rate of this step. The schedule is a pure function
# of the step: linear warmup over a fraction of the run (so even a 20-step run warms up and then
# learns), then a cosine down to a floor at --max-steps (--schedule wsd holds the peak and ends in
# a straight line down instead; the ten-minute CPU run learned less that way, see the README).
# Muon's momentum is one too: it starts at 0.85 and climbs to its usual 0.95 over the first 30% of
# the run (--momentum-warmup-frac), so the early steps, whose gradients change fastest, average
# over a shorter past (modded-nanogpt's momentum warmup; it helped here, a little).
#
# Under torchrun the step's samples are cut into one contiguous share per rank: its micro-batches
# (or, without accumulation, its part of the one micro-batch). Each rank divides its losses by its
# own micro-batch count; DDP averages the gradients over ranks, once, during the last backward of
# the step (no_sync skips the others), so every rank ends up holding the single-process mean
# gradient. Clipping then sees the global norm, and the optimizers take identical steps
# (Muon splits its Newton-Schulz work across ranks, see qwen3.py).
#
# --time-budget turns minutes into --max-steps before the first step, since the schedule (its
# warmup too) depends on it: a throwaway copy of the run, built the same way and writing to a
# temporary folder, takes a few real steps and one evaluation with its saves, and the step count
# that fits what is left of the budget is fixed. The run itself is untouched by this (its random
# stream is put back), and the count is saved with its flags: the run is the `--max-steps N` run,
# and --resume continues it exactly, without timing anything again.


def lr_multiplier(step: int, max_steps: int, warmup_frac: float, min_lr_frac: float,
                  decay_frac: float | None = None) -> float:
    """The peak's multiplier at `step`: warmup, then a cosine, or with decay_frac warmup-stable-decay."""
    warmup = max(1, round(warmup_frac * max_steps))
    if step < warmup:
        return (step + 1) / warmup
    if decay_frac is not None:  # hold the peak, then a straight line from it to the floor
        start = max(warmup, max_steps - round(decay_frac * max_steps))
        return 1 - (1 - min_lr_frac) * min(1.0, max(0, step - start) / max(1, max_steps - start))
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return min_lr_frac + (1 - min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress))


def muon_momentum(step: int, max_steps: int, warmup_frac: float) -> float:
    warmup = warmup_frac * max_steps
    return 0.95 if step >= warmup else 0.85 + 0.10 * step / warmup


def train_step(run: Run, state: RunState) -> float:
    """One optimizer step, from state.step to state.step + 1; returns the global batch's mean loss."""
    args, step, world = run.args, state.step, run.world
    for opt in run.optimizers:
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * lr_multiplier(step, *run.schedule)
            if isinstance(opt, Muon):
                group["momentum"] = muon_momentum(step, args.max_steps, args.momentum_warmup_frac)
    loss_sum = 0.0
    for micro in range(run.accum):
        first = (step * args.grad_accum * args.batch_size  # global sample number: the step's first,
                 + run.rank * run.accum * run.batch + micro * run.batch)  # this rank's share, this micro-batch
        x, y = windows(run.data.train, run.batches.starts(np.arange(first, first + run.batch)), args.seq_len)
        x, y = (torch.from_numpy(a).to(run.device, non_blocking=True) for a in (x, y))
        with run.train_net.no_sync() if world > 1 and micro < run.accum - 1 else nullcontext():  # sync once
            with run.autocast:
                loss = run.train_net(x, y)
            (loss / run.accum).backward()
        loss_sum += loss.detach()
    loss_value = all_ranks([(loss_sum / run.accum).item()], run.device)[0] / world  # the global batch's mean
    if not math.isfinite(loss_value):  # the same value on every rank: all stop here together
        kept = f"{run.last} (step {state.saved_at})" if state.saved_at is not None else None
        raise UserError(f"loss is {loss_value} at step {step + 1}; stopped. "
                         f"Last good checkpoint: {kept or 'none, nothing was saved yet'}")
    if args.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), args.grad_clip)
    for opt in run.optimizers:
        opt.step()
        opt.zero_grad(set_to_none=True)
    state.step += 1
    return loss_value


PROBE_STEPS = 4  # the first includes one-off costs (allocation, compilation): timed apart


def fit_time_budget(run: Run, started: float) -> int:
    """--time-budget: the largest --max-steps whose run, begun at `started` (perf_counter), ends on time."""
    args, quiet = run.args, lambda *a, **k: None
    rng = torch.get_rng_state(), torch.cuda.get_rng_state(run.device) if run.device.type == "cuda" else None
    with tempfile.TemporaryDirectory(prefix="qwen3-budget-") as tmp:
        probe = setup(argparse.Namespace(**{**vars(args), "max_steps": PROBE_STEPS, "out_dir": tmp}), run.device,
                      None, log=quiet)
        state = RunState()
        open_out_dir(probe, state, resuming=False)
        times = []
        for _ in range(PROBE_STEPS):
            t0 = time.perf_counter()
            train_step(probe, state)
            times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        evaluate_and_save(probe, state, quiet)  # the last step: scores, sample, curves, best/ and last/
        t_eval = time.perf_counter() - t0
        if args.sample_tokens > 0 and run.rank == 0:  # the end's sample
            sample(probe.model, probe.data.tokenizer, args.sample_tokens, run.device, args.seed)
        t_end = time.perf_counter() - t0 - t_eval
        del probe
    torch.set_rng_state(rng[0])
    if rng[1] is not None:
        torch.cuda.set_rng_state(rng[1], run.device)
    t_step = sum(times[1:]) / (PROBE_STEPS - 1)
    # what is left, less the end's sample and the one-off costs of the run's own first step
    left = args.time_budget * 60 - (time.perf_counter() - started) - t_end - (times[0] - t_step)

    def cost(n):  # n steps, evaluations at 0, every eval_every and at n
        return n * t_step + (1 + math.ceil(n / args.eval_every)) * t_eval

    n = max(0, int((left - 2 * t_eval) / (t_step + t_eval / args.eval_every)))
    while cost(n + 1) <= left:
        n += 1
    n = int(all_ranks([n], run.device, dist.ReduceOp.MIN)[0])  # the slowest rank decides
    evals = 1 + math.ceil(n / args.eval_every)
    if n < 1:
        raise UserError(f"--time-budget {args.time_budget:g} min is too short: setting up took "
                         f"{time.perf_counter() - started:.0f} s, a step takes {t_step:.3g} s and an "
                         f"evaluation {t_eval:.3g} s")
    say(f"budget {args.time_budget:g} min: {n} steps of {t_step:.3g} s, {evals} evaluations of {t_eval:.3g} s "
        f"(with saves), {time.perf_counter() - started:.0f} s of setup and timing")
    return n


def train(args, device: torch.device, info: dict | None, started: float | None = None) -> int:
    started = time.perf_counter() if started is None else started
    check_out_dir(Path(args.out_dir), model_config(args), resuming=info is not None, overwrite=args.overwrite)
    if info is not None and info["step"] >= args.max_steps:
        say(f"{Path(args.out_dir) / 'last'} is at step {info['step']}, which already reaches --max-steps "
            f"{args.max_steps}; nothing to do (pass a larger --max-steps to train further)")
        return 0
    run = setup(args, device, info)
    if args.time_budget is not None and info is None:
        args.max_steps = fit_time_budget(run, started)  # saved with the flags: --resume keeps it
    state = resume(run, info) if info is not None else RunState()
    if run.rank > 0:  # dropout: other ranks draw masks of their own (rank 0 keeps the checkpointed stream)
        torch.manual_seed(int(np.random.SeedSequence([args.seed, run.rank, state.step]).generate_state(1)[0]))
    open_out_dir(run, state, resuming=info is not None)
    describe(run, state, resuming=info is not None)

    with (tqdm(total=args.max_steps, initial=state.step, disable=None if run.rank == 0 else True,
               dynamic_ncols=True, unit="step") as bar,
          StopRequest(run.last, bar.write if run.rank == 0 else lambda s: None) as stop):
        start_time, start_elapsed = time.perf_counter(), state.elapsed_s
        run.model.train()
        while True:
            state.elapsed_s = start_elapsed + time.perf_counter() - start_time
            if state.step != state.saved_at:
                evaluate_and_save(run, state, bar.write)
            if state.step == args.max_steps:
                break
            signum = stop.agreed(device)
            if signum or state.step == args.stop_at:
                if state.saved_at != state.step:
                    save_last(run, state)
                why = signal.Signals(signum).name if signum else f"--stop-at {args.stop_at}"
                stop.write(f"stopped at step {state.step} ({why}); {run.last} saved, continue with --resume")
                return 128 + signum if signum else 0

            t0 = time.perf_counter()
            loss_value = train_step(run, state)
            state.steps_s += time.perf_counter() - t0
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{run.optimizers[0].param_groups[0]['lr']:.2e}",
                            tok_s=f"{run.tokens_per_step / (time.perf_counter() - t0):,.0f}")

    if args.sample_tokens > 0 and run.rank == 0:
        print(f"sample: {sample(run.model, run.data.tokenizer, args.sample_tokens, device, args.seed)!r}")
    if state.best_step is not None:
        say(f"done: best val loss {state.best_val_loss:.4f} (ppl {perplexity(state.best_val_loss):.2f}, "
            f"{run.bits_per_byte(state.best_val_loss, 'val'):.3f} bits per byte) at step {state.best_step} in "
            f"{run.out / 'best'}; {run.last} is step {state.step}; {state.elapsed_s / 60:.1f} min of training")
    return 0


def main(argv=None) -> int:
    started = time.perf_counter()  # --time-budget counts from here
    try:
        args, device, info = parse_args(argv)
        return train(args, device, info, started)
    except (UserError, CheckpointError, OSError) as e:  # OSError: e.g. an unwritable folder
        return error(e)  # on every rank: some errors are one rank's alone
    except KeyboardInterrupt:
        print("interrupted; nothing saved", file=sys.stderr)
        return 130
    finally:
        release_out_dirs()
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
