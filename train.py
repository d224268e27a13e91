"""
Train a Qwen3 from scratch, and keep what it learns.

    python train.py                          # offline, ~10 minutes on a 2-core CPU (embedded corpus)
    python train.py --data smollm            # the upstream corpus from the hub; on a GPU: the seed config
    python train.py --resume                 # continue out/last after Ctrl-C, SIGTERM, a crash or --stop-at
    python train.py --help                   # every flag
    torchrun --standalone --nproc_per_node=8 train.py ...   # data-parallel on 8 GPUs (or CPU processes)

Read it top to bottom:
    1. Flags          every hyperparameter, with device-dependent defaults; joining a torchrun job
    2. A run          its fixed parts (data, model, optimizers) and its state, saved for --resume
    3. Evaluation     loss, perplexity and next-token accuracy on fixed windows of each split; best/, last/
    4. Stopping       Ctrl-C and SIGTERM: save last/ at the end of the step
    5. The loop       warmup + cosine schedule, gradient accumulation, clipping, bf16 on CUDA
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
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from checkpoint import load_training_state, read_training_info, recover, save_checkpoint
from data import Batches, DataError, TokenData, default_cache_dir, fixed_starts, prepare_data, windows
from qwen3 import PRESETS, CheckpointError, Qwen3, Qwen3Config, configure_optimizers

# %% 1. Flags
# Flags left at None take the value for the device: on a CPU a small model that learns something
# in ten minutes, on a GPU the upstream "seed" configuration. The embedded corpus is ~2.1M
# training tokens, so on a GPU (~12k tokens per step) 600 steps is ~3.5 epochs, about where a
# model this size stops generalising and starts memorising; dropout slows that down.
DEVICE_DEFAULTS = {
    "cpu": dict(preset="cpu", vocab_size=4096, batch_size=8, seq_len=256, max_steps=500, eval_every=50,
                eval_batches=8, dropout=0.0),
    "gpu": dict(preset="seed", vocab_size=8192, batch_size=24, seq_len=512, max_steps=600, eval_every=50,
                eval_batches=20, dropout=0.1),
}
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
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def positive_int(s):
    if not s.isdigit() or int(s) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return int(s)


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
    g.add_argument("--val-frac", type=float, default=0.05, help="fraction of documents held out for validation")
    g.add_argument("--split-seed", type=int, default=0, help="seed of the train/validation document split")
    g.add_argument("--text-field", default="text", help="the text column of .jsonl/.parquet/hub data")
    g.add_argument("--cache-dir", default=str(default_cache_dir()), help="where tokenised data and trained "
                   "tokenizers are cached, shared by all runs")

    g = p.add_argument_group("model")
    g.add_argument("--preset", default=None, help=f"model shape: {', '.join(PRESETS)} (default: device)")
    for flag, kind, what in [("hidden-size", int, "width of the residual stream"),
                             ("intermediate-size", int, "width of the MLP"),
                             ("num-hidden-layers", int, "number of blocks"),
                             ("num-attention-heads", int, "query heads"),
                             ("num-key-value-heads", int, "key/value heads (GQA)"),
                             ("head-dim", int, "width of one head"),
                             ("rope-theta", float, "RoPE base")]:
        g.add_argument(f"--{flag}", type=kind, default=None, help=f"{what} (default: the preset's)")
    g.add_argument("--tie-word-embeddings", action=argparse.BooleanOptionalAction, default=None,
                   help="share the embedding and output matrices (default: the preset's)")
    g.add_argument("--dropout", type=float, default=None, help="dropout on attention and residual branches "
                   "(default: device, 0 on CPU, 0.1 on GPU)")

    g = p.add_argument_group("training")
    g.add_argument("--batch-size", type=positive_int, default=None, help="sequences per micro-batch, over all "
                   "processes; under torchrun with --grad-accum 1 the processes share it (default: device)")
    g.add_argument("--seq-len", type=positive_int, default=None, help="tokens per sequence (default: device)")
    g.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches per optimizer step; "
                   "their gradients are averaged. Under torchrun the processes share them when it is above 1")
    g.add_argument("--max-steps", type=positive_int, default=None, help="optimizer steps; the LR schedule ends "
                   "here. With --resume, a larger value stretches the remaining schedule (default: device)")
    g.add_argument("--optimizer", default="muon", help="muon (Muon for hidden matrices + AdamW) or adamw")
    g.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate")
    g.add_argument("--muon-lr", type=float, default=0.02, help="peak Muon learning rate")
    g.add_argument("--betas", type=float, nargs=2, default=[0.9, 0.95], help="AdamW betas")
    g.add_argument("--adam-eps", type=float, default=1e-8, help="AdamW epsilon")
    g.add_argument("--weight-decay", type=float, default=0.1, help="decoupled weight decay on matrices")
    g.add_argument("--warmup-frac", type=float, default=0.05, help="linear warmup, as a fraction of --max-steps")
    g.add_argument("--min-lr-frac", type=float, default=0.1, help="the cosine decays to this fraction of the peak")
    g.add_argument("--grad-clip", type=float, default=1.0, help="clip the global gradient norm (0: off)")
    g.add_argument("--seed", type=int, default=1337, help="seed of the initial weights, dropout and data order")

    g = p.add_argument_group("evaluation and checkpoints")
    g.add_argument("--eval-every", type=positive_int, default=None, help="evaluate (and save last/) every N "
                   "steps (default: device)")
    g.add_argument("--eval-batches", type=positive_int, default=None, help="batches of each split per "
                   "evaluation (default: device)")
    g.add_argument("--sample-tokens", type=int, default=80, help="tokens to sample at the end (0: none)")
    g.add_argument("--out-dir", default="out", help="checkpoints (best/, last/) and metrics.jsonl go here")
    g.add_argument("--save-every", type=int, default=0, help="also save last/ every N steps (0: only at "
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


class TrainError(Exception):
    """A problem for the user; the message is one line."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if name not in available:
        raise TrainError(f"unknown --device {name!r}; choose auto, cpu, cuda or mps")
    if not available[name]:
        raise TrainError(f"--device {name} requested but not available here")
    return torch.device(name)


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
            raise TrainError(f"LOCAL_RANK {local_rank}, but only {torch.cuda.device_count()} GPU(s) are visible; "
                             f"start at most that many processes per machine")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    elif device.type == "cpu":
        dist.init_process_group("gloo")
    else:
        raise TrainError(f"data-parallel training runs on cuda or cpu, not {device.type}")
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


def parse_args(argv=None):
    """Flags -> (args, device, the checkpoint's training_state.json when resuming, else None).
    Under torchrun, also joins the job: the device depends on the rank."""
    parser = build_parser()
    args = parser.parse_args(argv)
    device = init_distributed(resolve_device(args.device))  # --device is a session flag: not from a checkpoint
    rank, world = rank_and_world()
    if rank == 0:
        recover(Path(args.out_dir))
    if world > 1:
        dist.barrier()  # the others read last/ once rank 0 has made it whole
    info = None
    if args.resume:
        info = read_training_info(Path(args.out_dir) / "last")
        parser.set_defaults(**{k: v for k, v in info["args"].items() if k not in SESSION_FLAGS})
        args = parser.parse_args(argv)  # the checkpoint's flags, overridden by those given now
    for k, v in DEVICE_DEFAULTS["cpu" if device.type == "cpu" else "gpu"].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.dtype == "auto":
        args.dtype = "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    if args.dtype not in ("float32", "bfloat16"):
        raise TrainError(f"unknown --dtype {args.dtype!r}; choose auto, float32 or bfloat16")
    if args.optimizer not in ("muon", "adamw"):
        raise TrainError(f"unknown --optimizer {args.optimizer!r}; choose muon or adamw")
    if not 0 < args.val_frac < 1:
        raise TrainError(f"--val-frac must be between 0 and 1, got {args.val_frac}")
    # The global batch stays what the flags say: the processes share the micro-batches of a step,
    # or, without accumulation, the sequences of the one micro-batch.
    if args.grad_accum > 1 and args.grad_accum % world:
        raise TrainError(f"--grad-accum {args.grad_accum} does not split over {world} processes; "
                         f"use a multiple of {world}")
    if args.grad_accum == 1 and args.batch_size % world:
        raise TrainError(f"--batch-size {args.batch_size} does not split over {world} processes (with "
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
        raise TrainError(str(e)) from None


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
    try:
        theirs = Qwen3Config.from_json(existing / "config.json")
    except (ValueError, TypeError) as e:
        raise TrainError(f"{existing / 'config.json'} is unreadable ({e})") from None
    diff = [f"{k} {getattr(theirs, k)} there, {getattr(config, k)} here" for k in SHAPE_FLAGS
            if getattr(theirs, k) != getattr(config, k)]
    if diff:
        raise TrainError(f"{out} holds a different model ({'; '.join(diff)}); use another --out-dir"
                         + ("" if resuming else " or --overwrite"))
    if not resuming:
        raise TrainError(f"{out} already holds a checkpoint ({existing}); pass --resume to continue it "
                         f"or --overwrite to start again")


@dataclass
class RunState:
    """How far the run has got: saved in last/training_state.json, restored by --resume."""
    step: int = 0  # optimizer steps taken
    best_val_loss: float | None = None  # the lowest validation loss so far, at best_step: what best/ holds
    best_step: int | None = None
    elapsed_s: float = 0.0  # training time, over all sessions
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
    model: Qwen3
    net: torch.nn.Module  # what runs forward passes: the model, compiled with --compile ...
    train_net: torch.nn.Module  # ... and for training, under torchrun, wrapped in DDP
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
        return self.args.max_steps, self.args.warmup_frac, self.args.min_lr_frac


def setup(args, device: torch.device, info: dict | None) -> Run:
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
                        log=say)
    if local_rank == 0 and world > 1:
        dist.barrier()
    sizes = [len(data.train), len(data.val), len(data.tokenizer)]
    if all_ranks(sizes, device, dist.ReduceOp.MAX) != all_ranks(sizes, device, dist.ReduceOp.MIN):
        raise TrainError("the processes read different data (--data auto may have resolved differently, or the "
                         "machines' files differ); give every machine the same files and name them with --data")
    args.data = data.spec  # "auto" resolved: --resume must read the same data
    batches = Batches(data.train, args.seq_len, args.seed)
    if batches.windows_per_epoch < 1 or len(data.val) < args.seq_len + 1:
        raise TrainError(f"corpus too small for --seq-len {args.seq_len}: {len(data.train)} training and "
                         f"{len(data.val)} validation tokens, need at least {2 * args.seq_len} and "
                         f"{args.seq_len + 1}; use more data or a shorter --seq-len")
    if info is not None and info.get("data_key") != data.key:
        say("warning: the data differ from the checkpoint's; resuming on the new data", file=sys.stderr)
    eval_count = args.eval_batches * args.batch_size
    train_eval = fixed_starts(data.train, args.seq_len, eval_count)
    val_eval = fixed_starts(data.val, args.seq_len, eval_count)

    torch.manual_seed(args.seed)
    model = Qwen3(model_config(args, data.tokenizer))
    if info is not None:
        model.load_state_dict(Qwen3.from_pretrained(last).state_dict())
    model.to(device)
    optimizers = configure_optimizers(model, args.optimizer, lr=args.lr, muon_lr=args.muon_lr,
                                      weight_decay=args.weight_decay, betas=tuple(args.betas), eps=args.adam_eps)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    net = torch.compile(model) if args.compile else model
    # Training passes go through DDP, which averages gradients across ranks in backward (and first
    # copies rank 0's weights to all); evaluation runs the model itself, no gradients to sync.
    train_net = DDP(net, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else net
    if args.grad_accum == 1:  # this rank's share of each step: a part of the one micro-batch ...
        batch, accum = args.batch_size // world, 1
    else:  # ... or some of the micro-batches
        batch, accum = args.batch_size, args.grad_accum // world
    autocast = torch.autocast(device.type, torch.bfloat16) if args.dtype == "bfloat16" else nullcontext()
    return Run(args=args, device=device, rank=rank, world=world, data=data, batches=batches, train_eval=train_eval,
               val_eval=val_eval, model=model, net=net, train_net=train_net, optimizers=optimizers,
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
        raise TrainError(f"{run.last / 'training_state.pt'} does not fit this run (was --optimizer changed?): "
                         f"{' '.join(str(e).split())[:200]}") from None
    return RunState(info["step"], info["best_val_loss"], info["best_step"], info["elapsed_s"], saved_at=info["step"])


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
                    best_step=state.best_step, elapsed_s=state.elapsed_s,
                    data_key=run.data.key, args={k: v for k, v in vars(args).items() if k not in SESSION_FLAGS})
        save_checkpoint(run.out, "last", run.model, run.data.tokenizer, training, info)
    state.saved_at = state.step


def open_out_dir(run: Run, state: RunState, resuming: bool):
    """--overwrite deletes the old checkpoints; a resumed metrics.jsonl goes on from its step."""
    if run.rank > 0:
        return
    if run.args.overwrite and not resuming:
        for name in ("best", "last"):
            shutil.rmtree(run.out / name, ignore_errors=True)
    run.out.mkdir(parents=True, exist_ok=True)
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
# Every --eval-every steps (and at the end) the scores are logged, a new best validation loss
# replaces best/, and last/ is saved; --save-every saves last/ more often.


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


def log_eval(out: Path, record: dict, write):
    write(f"step {record['step']:>5} | epoch {record['epoch']:.2f} | train loss {record['train_loss']:.4f} | "
          f"val loss {record['val_loss']:.4f} | ppl {record['val_ppl']:.2f} | acc {record['val_acc']:.3f} | "
          f"{record['elapsed_s'] / 60:.1f} min")
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
    """A short continuation of an empty document (the EOS separator), to see what the model writes."""
    model.eval()
    idx = torch.tensor([[tokenizer.eos_token_id]], device=device)
    out = model.generate(idx, n, temperature=0.8, top_k=50, eos_token_id=tokenizer.eos_token_id,
                         generator=torch.Generator(device).manual_seed(seed))
    return tokenizer.decode(out[0, 1:], skip_special_tokens=True)


def evaluate_and_save(run: Run, state: RunState, write):
    """What happens between steps: at an evaluation step, score both splits, log them and keep a
    new best in best/; then save last/ at evaluations and every --save-every steps."""
    args, step = run.args, state.step
    evaluating = step % args.eval_every == 0 or step == args.max_steps
    if evaluating:
        train_loss, _ = evaluate(run.net, run.data.train, run.train_eval, args, run.device, run.autocast)
        val_loss, val_acc = evaluate(run.net, run.data.val, run.val_eval, args, run.device, run.autocast)
        if run.rank == 0:
            lr = run.optimizers[0].param_groups[0]["base_lr"] * lr_multiplier(step, *run.schedule)
            log_eval(run.out, dict(step=step, epoch=run.batches.epochs(step * args.batch_size * args.grad_accum),
                                   tokens=step * run.tokens_per_step, train_loss=train_loss, val_loss=val_loss,
                                   val_ppl=math.exp(val_loss), val_acc=val_acc, lr=lr, elapsed_s=state.elapsed_s),
                     write)
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
# learns), then a cosine down to a floor at --max-steps.
#
# Under torchrun the step's samples are cut into one contiguous share per rank: its micro-batches
# (or, without accumulation, its part of the one micro-batch). Each rank divides its losses by its
# own micro-batch count; DDP averages the gradients over ranks, once, during the last backward of
# the step (no_sync skips the others), so every rank ends up holding the single-process mean
# gradient. Clipping then sees the global norm, and the optimizers take identical steps
# (Muon splits its Newton-Schulz work across ranks, see qwen3.py).


def lr_multiplier(step: int, max_steps: int, warmup_frac: float, min_lr_frac: float) -> float:
    warmup = max(1, round(warmup_frac * max_steps))
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return min_lr_frac + (1 - min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress))


def train(args, device: torch.device, info: dict | None) -> int:
    check_out_dir(Path(args.out_dir), model_config(args), resuming=info is not None, overwrite=args.overwrite)
    if info is not None and info["step"] >= args.max_steps:
        say(f"{Path(args.out_dir) / 'last'} is at step {info['step']}, which already reaches --max-steps "
            f"{args.max_steps}; nothing to do (pass a larger --max-steps to train further)")
        return 0
    run = setup(args, device, info)
    state = resume(run, info) if info is not None else RunState()
    if run.rank > 0:  # dropout: other ranks draw masks of their own (rank 0 keeps the checkpointed stream)
        torch.manual_seed(int(np.random.SeedSequence([args.seed, run.rank, state.step]).generate_state(1)[0]))
    open_out_dir(run, state, resuming=info is not None)
    describe(run, state, resuming=info is not None)
    model, optimizers, world = run.model, run.optimizers, run.world

    with (tqdm(total=args.max_steps, initial=state.step, disable=None if run.rank == 0 else True,
               dynamic_ncols=True, unit="step") as bar,
          StopRequest(run.last, bar.write if run.rank == 0 else lambda s: None) as stop):
        start_time, start_elapsed = time.perf_counter(), state.elapsed_s
        model.train()
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

            # one optimizer step
            t0 = time.perf_counter()
            for opt in optimizers:
                for group in opt.param_groups:
                    group["lr"] = group["base_lr"] * lr_multiplier(state.step, *run.schedule)
            loss_sum = 0.0
            for micro in range(run.accum):
                first = (state.step * args.grad_accum * args.batch_size  # global sample number: the step's first,
                         + run.rank * run.accum * run.batch + micro * run.batch)  # this rank's share, this micro-batch
                x, y = windows(run.data.train, run.batches.starts(np.arange(first, first + run.batch)), args.seq_len)
                x, y = (torch.from_numpy(a).to(device, non_blocking=True) for a in (x, y))
                with run.train_net.no_sync() if world > 1 and micro < run.accum - 1 else nullcontext():  # sync once
                    with run.autocast:
                        _, loss = run.train_net(x, y, return_logits=False)  # no full logits (qwen3.py, A1)
                    (loss / run.accum).backward()
                loss_sum += loss.detach()
            loss_value = all_ranks([(loss_sum / run.accum).item()], device)[0] / world  # the global batch's mean
            if not math.isfinite(loss_value):  # the same value on every rank: all stop here together
                kept = f"{run.last} (step {state.saved_at})" if state.saved_at is not None else None
                raise TrainError(f"loss is {loss_value} at step {state.step + 1}; stopped. "
                                 f"Last good checkpoint: {kept or 'none, nothing was saved yet'}")
            if args.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            for opt in optimizers:
                opt.step()
                opt.zero_grad(set_to_none=True)
            state.step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{optimizers[0].param_groups[0]['lr']:.2e}",
                            tok_s=f"{run.tokens_per_step / (time.perf_counter() - t0):,.0f}")

    if args.sample_tokens > 0 and run.rank == 0:
        print(f"sample: {sample(model, run.data.tokenizer, args.sample_tokens, device, args.seed)!r}")
    if state.best_step is not None:
        say(f"done: best val loss {state.best_val_loss:.4f} (ppl {math.exp(state.best_val_loss):.2f}) at step "
            f"{state.best_step} in {run.out / 'best'}; {run.last} is step {state.step}; "
            f"{state.elapsed_s / 60:.1f} min of training")
    return 0


def main(argv=None) -> int:
    try:
        args, device, info = parse_args(argv)
        return train(args, device, info)
    except (TrainError, DataError, CheckpointError, OSError) as e:  # OSError: e.g. an unwritable folder
        print(f"error: {e}", file=sys.stderr)  # on every rank: some errors are one rank's alone
        return 1
    except KeyboardInterrupt:
        print("interrupted; nothing saved", file=sys.stderr)
        return 130
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
