"""
Train a Qwen3 from scratch, and keep what it learns.

    python train.py                          # offline, ~10 minutes on a 2-core CPU (embedded corpus)
    python train.py --data smollm            # the upstream corpus from the hub; on a GPU: the seed config
    python train.py --resume                 # continue out/last after Ctrl-C, SIGTERM, a crash or --stop-at
    python train.py --time-budget 10         # as many steps as fit in ten minutes on this machine
    python train.py --help                   # every flag, with its defaults on a CPU and on a GPU
    torchrun --standalone --nproc_per_node=8 train.py ...   # data-parallel on 8 GPUs (or CPU processes)

Read it top to bottom:
    1. Flags          parsed by flags.py; then this process's device, its place in a torchrun job,
                      the out-dir made this run's alone, and on --resume the flags saved in last/
    2. A run          its fixed parts (data, model, optimizers) and its state, saved for --resume
    3. Evaluation     loss, perplexity, accuracy and bits per byte on fixed windows of each split; a
                      sample, OUT/curves.png; best/, last/
    4. The loop       warmup + cosine schedule, gradient accumulation, clipping, bf16 on CUDA; Ctrl-C
                      and SIGTERM save last/ at the end of the step
The rest is in modules named for what they do: flags.py, data.py (where the tokens come from, in
which order), checkpoint.py (saves that survive a crash; one run per out-dir), report.py (what a run
prints and logs), plots.py, budget.py (what fits: memory, --time-budget), ranks.py (torchrun), stopping.py.

Under torchrun the same loop runs in every process (a "rank") with DistributedDataParallel: the
flags fix the global batch, each rank trains on its share of it, the gradients are averaged, and
every rank takes the same step; rank 0 alone prints and writes files.
"""

import argparse
import math
import shlex
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

import budget
import flags
import report
from checkpoint import (check_out_dir, check_outside_saves, open_out_dir, own_out_dir, read_training_info,
                        release_out_dirs, restore_training_state, save_checkpoint, training_state)
from common import UserError, error, pick_device
from data import Batches, TokenData, fixed_starts, prepare_data, split_bytes, windows
from engine import FastMuon, FusedLoss, cuda_graphed, graphable
from guards import CheckpointError
from plots import redraw_curves
from qwen3 import MoE, Muon, Qwen3, configure_optimizers, from_pretrained
from ranks import all_ranks, first_on_each_machine, init_distributed, rank_and_world, same_on_every_rank, say
from stopping import StopRequest

# %% 1. Flags
# flags.py holds every flag, its range and its default on each device. What is left here depends
# on this invocation: --device, this process's place in a torchrun job, and the out-dir, which is
# made this run's alone (and a save a crash cut short finished) before anything reads it.


def parse_args(argv=None):
    """Flags -> (args, device, last/'s training_state.json when resuming, else None)."""
    parser = flags.build_parser()
    args = parser.parse_args(argv)
    device = init_distributed(pick_device(args.device))  # --device is a session flag: not from a checkpoint
    out = Path(args.out_dir)
    # Rank 0 locks OUT/; all ranks learn together whether it could (one stopping alone would leave
    # the others waiting), which also holds them back until last/ is whole.
    problem = own_out_dir(out) if rank_and_world()[0] == 0 else None
    if all_ranks([problem is not None], device)[0]:
        raise UserError(problem or f"rank 0 could not take --out-dir {out} (its error says why)")
    info = None
    if args.resume:
        info = read_training_info(out / "last")
        args = flags.with_saved_flags(parser, argv, info, out / "last")
    flags.for_device(args, device, world=rank_and_world()[1])
    check_outside_saves(Path(args.cache_dir), "--cache-dir")  # the cache is shared: no save may delete it
    return args, device, info


# %% 2. A run
# A run is made of fixed parts, set up once per session from the flags (the data, the model, its
# optimizers, how each rank shares a step), and of a small state that changes as it trains (the
# step, the best score, the time spent). last/ holds both: the flags and the state in
# training_state.json, the optimizer moments and RNG streams in training_state.pt, so --resume
# rebuilds the fixed parts, puts the state back, and the run goes on as if it had never stopped.


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
    out: Path  # --out-dir: metrics.jsonl, curves.png, best/ and last/
    last: Path
    device: torch.device
    rank: int  # this process, of `world` (0 of 1 outside torchrun)
    world: int
    data: TokenData
    batches: Batches  # the training order
    eval_starts: dict  # {"train": starts, "val": starts}: the fixed windows each evaluation scores
    eval_bytes: dict  # {"train": n, "val": n}: the UTF-8 bytes their scored targets stand for
    model: Qwen3  # what evaluation, sampling and checkpoints use
    fused_loss: torch.nn.Module  # the training loss: FusedLoss(model), compiled with --compile, in DDP under torchrun
    cuda_graphs: bool  # fused_loss replays CUDA graphs (use_cuda_graphs)
    optimizers: list
    autocast: object
    batch: int  # this rank's share of a step: `accum` micro-batches of `batch` sequences
    accum: int

    @property
    def tokens_per_step(self) -> int:
        return self.args.batch_size * self.args.seq_len * self.args.grad_accum

    @property
    def schedule(self) -> tuple:  # lr_multiplier's arguments after the step
        a = self.args
        return a.max_steps, a.warmup_frac, a.min_lr_frac, a.decay_frac if a.schedule == "wsd" else None

    def bits_per_byte(self, loss: float, split: str) -> float:
        """An evaluation's mean loss (nats per token) on `split` as bits per byte (section 3)."""
        targets = len(self.eval_starts[split]) * self.args.seq_len
        return loss * targets / math.log(2) / self.eval_bytes[split]


def setup(args, device: torch.device, info: dict | None, log=say) -> Run:
    """The data, the model (last/'s weights with --resume), its optimizers, and the share of each
    step this rank trains on."""
    rank, world = rank_and_world()
    out = Path(args.out_dir)
    last = out / "last"
    data = first_on_each_machine(lambda: prepare_data(
        args.data, str(last) if info else args.tokenizer, vocab_size=args.vocab_size, max_docs=args.max_docs,
        max_tokens=args.max_tokens, val_frac=args.val_frac, split_seed=args.split_seed, text_field=args.text_field,
        cache_dir=args.cache_dir, log=log))
    if not same_on_every_rank([len(data.train), len(data.val), len(data.tokenizer)], device):
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
    eval_starts = {split: fixed_starts(getattr(data, split), args.seq_len, args.eval_batches * args.batch_size)
                   for split in ("train", "val")}
    eval_bytes = split_bytes(data, eval_starts, args.seq_len, log)

    config = flags.model_config(args, data.tokenizer)
    budget.check_memory(config, device)  # a model too big is one line, not the allocator's traceback
    torch.manual_seed(args.seed)
    model = Qwen3(config)
    if args.zero_init_output:
        for layer in model.model.layers:
            torch.nn.init.zeros_(layer.self_attn.o_proj.weight)
            torch.nn.init.zeros_(layer.mlp.experts.down_proj if isinstance(layer.mlp, MoE) else layer.mlp.down_proj.weight)
    if info is not None:
        model.load_state_dict(from_pretrained(last).state_dict())
    model.to(device)
    optimizers = configure_optimizers(model, args.optimizer, lr=args.lr, muon_lr=args.muon_lr,
                                      weight_decay=args.weight_decay, betas=tuple(args.betas), eps=args.adam_eps,
                                      muon=FastMuon)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    fused_loss = FusedLoss(model)  # the loss without the logits (engine.py), compiled with --compile
    fused_loss = torch.compile(fused_loss) if args.compile else fused_loss
    # on CUDA its forward and backward replay as graphs: a step's thousand launches become two (engine.py)
    cuda_graphs = use_cuda_graphs(args, device, model, world) and cuda_graphed(
        fused_loss, args.batch_size, args.seq_len, torch.bfloat16 if args.dtype == "bfloat16" else None) is not None
    # Training passes go through DDP, which averages gradients across ranks in backward (and first
    # copies rank 0's weights to all); evaluation runs the model itself, no gradients to sync.
    if world > 1:
        fused_loss = DDP(fused_loss, device_ids=[device.index] if device.type == "cuda" else None)
    if args.grad_accum == 1:  # this rank's share of each step: a part of the one micro-batch ...
        batch, accum = args.batch_size // world, 1
    else:  # ... or some of the micro-batches
        batch, accum = args.batch_size, args.grad_accum // world
    autocast = torch.autocast(device.type, torch.bfloat16) if args.dtype == "bfloat16" else nullcontext()
    return Run(args=args, out=out, last=last, device=device, rank=rank, world=world, data=data, batches=batches,
               eval_starts=eval_starts, eval_bytes=eval_bytes, model=model, fused_loss=fused_loss,
               cuda_graphs=cuda_graphs, optimizers=optimizers, autocast=autocast, batch=batch, accum=accum)


def use_cuda_graphs(args, device: torch.device, model: Qwen3, world: int) -> bool:
    """Whether the training loss is replayed as CUDA graphs: on CUDA unless --no-cuda-graphs, for
    one process taking one micro-batch a step (a replay overwrites the last backward's gradients,
    so none accumulate, and DDP's hooks stay out of the graph), a dense model, not --compile."""
    return (device.type == "cuda" and args.cuda_graphs and world == 1 and args.grad_accum == 1 and graphable(model)
            and not args.compile)


def resume(run: Run, info: dict) -> RunState:
    """Put last/'s optimizer moments and RNG streams back into the run; its state from `info`."""
    restore_training_state(run.last, info, run.optimizers, run.device)
    return RunState(info["step"], info["best_val_loss"], info["best_step"], info["elapsed_s"],
                    info.get("steps_s", 0.0), saved_at=info["step"])  # .get: checkpoints from before steps_s


# %% 3. Evaluation
# Both splits are scored on the same fixed windows each time, in eval mode (no dropout): the numbers
# compare across evaluations, and the train/validation gap measures memorisation. Perplexity is
# exp(loss); accuracy, the share of next tokens the argmax predicts; bits per byte, the scored
# targets' summed loss in bits over the UTF-8 bytes they stand for (data.split_bytes), which compares
# runs whose tokenizers differ, as loss per token cannot. Under torchrun each rank scores every
# world-th batch and the sums are added. A mixture of experts also records its load-balancing loss
# (unweighted, not in val_loss) and the share of routing slots each expert took (OUT/experts.png).
# Each evaluation logs the scores and a sample from the same start and seed, redraws curves.png,
# keeps a new best validation loss in best/ and saves last/ (--save-every saves it more often).


@torch.no_grad()
def evaluate(run: Run, split: str) -> dict:
    """The model on `split`'s fixed windows, in eval mode: {"loss", "acc"}, and for a mixture of
    experts {"aux_loss", "expert_load": {layer: [share of each expert]}}."""
    starts, n = run.eval_starts[split], run.args.batch_size
    sparse = [(i, layer.mlp) for i, layer in enumerate(run.model.model.layers) if isinstance(layer.mlp, MoE)]
    sums = torch.zeros(4, dtype=torch.float64, device=run.device)  # loss, correct guesses, aux loss, tokens
    load = torch.zeros(len(sparse), run.model.config.num_experts, dtype=torch.float64, device=run.device)
    run.model.eval()
    for i in range(run.rank * n, len(starts), run.world * n):
        x, y = windows(getattr(run.data, split), starts[i:i + n], run.args.seq_len)
        x, y = torch.from_numpy(x).to(run.device), torch.from_numpy(y).to(run.device)
        with run.autocast:
            logits, _ = run.model(x)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten())  # the model's alone
        routers = [moe.router_logits for _, moe in sparse]
        aux = run.model.balance_loss().double() if sparse else torch.zeros((), dtype=torch.float64, device=run.device)
        sums += torch.stack([loss.double(), (logits.argmax(-1) == y).double().mean(), aux, torch.ones_like(aux)]) * y.numel()
        for j, (_, moe) in enumerate(sparse):  # routing slots each expert took
            load[j] += torch.bincount(moe.choose(routers[j])[1].flatten(), minlength=load.size(1))
    run.model.train()
    values = all_ranks(sums.tolist() + load.flatten().tolist(), run.device)  # summed over ranks
    loss_sum, correct, aux_sum, count = values[:4]
    scores = dict(loss=loss_sum / count, acc=correct / count)
    if sparse:
        load = torch.tensor(values[4:]).view(len(sparse), -1)
        scores.update(aux_loss=aux_sum / count, expert_load={i: (row / row.sum()).tolist() for (i, _), row in zip(sparse, load)})
    return scores


def evaluate_and_save(run: Run, state: RunState, write):
    """What happens between steps: at an evaluation step, score both splits, log them and keep a
    new best in best/; then save last/ at evaluations and every --save-every steps."""
    args, step = run.args, state.step
    evaluating, saving = due(args, step)
    if evaluating or saving:
        check_weights(run, state)
    if evaluating:
        train_scores, val = evaluate(run, "train"), evaluate(run, "val")
        train_loss, val_loss = train_scores["loss"], val["loss"]
        for split, loss in (("train", train_loss), ("validation", val_loss)):  # finite weights, diverged
            if not math.isfinite(loss):
                raise stopped(f"the {split} loss is {loss} at step {step}'s evaluation", run.last, state.saved_at)
        if run.rank == 0:
            lr = run.optimizers[0].param_groups[0]["base_lr"] * lr_multiplier(step, *run.schedule)
            record = dict(step=step, epoch=run.batches.epochs(step * args.batch_size * args.grad_accum),
                          tokens=step * run.tokens_per_step, train_loss=train_loss, val_loss=val_loss,
                          train_bpb=run.bits_per_byte(train_loss, "train"), val_bpb=run.bits_per_byte(val_loss, "val"),
                          val_ppl=report.perplexity(val_loss), val_acc=val["acc"], lr=lr, elapsed_s=state.elapsed_s,
                          steps_s=state.steps_s, **{k: val[k] for k in ("aux_loss", "expert_load") if k in val})
            if args.eval_sample_tokens > 0:
                record["sample"] = report.sample(run.model, run.data.tokenizer, args.eval_sample_tokens, run.device,
                                                 args.seed)
            report.log_eval(run.out, record, write)
            redraw_curves(run.out, run.model.num_params(), write)
        if step > 0 and (state.best_val_loss is None or val_loss < state.best_val_loss):
            state.best_val_loss, state.best_step = val_loss, step
            if run.rank == 0:
                save_checkpoint(run.out, "best", run.model, run.data.tokenizer)
    if saving:
        save_last(run, state)


def due(args, step: int) -> tuple[bool, bool]:
    """Whether the end of `step` is evaluated, and whether last/ is saved there."""
    evaluating = step % args.eval_every == 0 or step == args.max_steps
    return evaluating, step > 0 and (evaluating or bool(args.save_every and step % args.save_every == 0))


def save_last(run: Run, state: RunState):
    """last/: the model, and what --resume needs. Every rank holds the same weights and optimizer
    states, so rank 0's are the run's."""
    if run.rank == 0:
        args = run.args
        info = dict(step=state.step, max_steps=args.max_steps,
                    samples_seen=state.step * args.batch_size * args.grad_accum, best_val_loss=state.best_val_loss,
                    best_step=state.best_step, elapsed_s=state.elapsed_s, steps_s=state.steps_s, data_key=run.data.key,
                    args={k: v for k, v in vars(args).items() if k not in flags.SESSION_FLAGS})
        state_pt = training_state(run.optimizers, run.device)
        save_checkpoint(run.out, "last", run.model, run.data.tokenizer, state_pt, info)
    state.saved_at = state.step


# %% 4. The loop
# One optimizer step: --grad-accum micro-batches of equal size, each loss divided by their count
# before backward (so the gradients average), clipping, then every optimizer steps. The learning
# rate is a pure function of the step, which --resume therefore continues exactly: linear warmup
# over a fraction of the run, then a cosine down to a floor (--schedule wsd: hold the peak, then a
# straight line down). Muon's momentum warms up too, 0.85 to 0.95 over the first 30% (modded-
# nanogpt): the early gradients change fastest, so they average over a shorter past.
# Under torchrun each rank takes a contiguous share of the step's samples; DDP averages gradients
# once, in the step's last backward (no_sync skips the others), so every rank holds the
# single-process gradient, clips the global norm and takes the same step. Ctrl-C and SIGTERM save
# last/ and stop at the end of the step (stopping.py).
# The CPU only queues a step's work; the loop reads the loss of the step before once the next is
# queued, so a GPU computes one step while the CPU launches the next. A non-finite loss stops the
# run there, before any save: the step after it has run, but last/ and best/ never hold it. An
# update's own overflow shows in no loss yet: the weights are checked before each evaluation and save.


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


class StepLoss:
    """A step's loss (the global batch's mean) on its way from the device to the host."""

    def __init__(self, loss: torch.Tensor, step: int, last: Path, saved_at: int | None):
        cuda = loss.device.type == "cuda"
        self.host = torch.empty((), pin_memory=cuda).copy_(loss, non_blocking=cuda)  # pinned: copied, not waited for
        self.copied = torch.cuda.Event() if cuda else None
        if self.copied is not None:
            self.copied.record()
        self.step, self.last, self.saved_at = step, last, saved_at  # what last/ holds meanwhile

    def read(self) -> float:
        """Waits for the loss (and for nothing queued after it); a non-finite one stops the run."""
        if self.copied is not None:
            self.copied.synchronize()
        value = self.host.item()
        if not math.isfinite(value):
            raise stopped(f"loss is {value} at step {self.step}", self.last, self.saved_at)
        return value


def check_weights(run: Run, state: RunState):
    """A step's loss shows the weights before its update: an update that overflowed (a rate far too
    high) shows only in the next step's loss, or never, in rows no batch reads. So before anything is
    scored, sampled or saved, the weights must be finite (one wait for the device, there only)."""
    if not torch.stack([p.detach().isfinite().all() for p in run.model.parameters()]).all():
        raise stopped(f"the weights are NaN or infinite after step {state.step}", run.last, state.saved_at)


def stopped(what: str, last: Path, saved_at: int | None) -> UserError:
    """The one line that stops a run gone non-finite: what, and the checkpoint that is still good."""
    kept = f"{last} (step {saved_at})" if saved_at is not None else "none, nothing was saved yet"
    return UserError(f"{what}; stopped. Last good checkpoint: {kept}")


def train_step(run: Run, state: RunState) -> StepLoss:
    """One optimizer step, from state.step to state.step + 1, queued on the device: nothing waits for it."""
    args, step = run.args, state.step
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
        # a GPU copies pinned memory while it computes; from pageable memory it would wait for the copy
        x, y = (torch.from_numpy(a).pin_memory() if run.device.type == "cuda" else torch.from_numpy(a) for a in (x, y))
        x, y = x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)
        with run.fused_loss.no_sync() if run.world > 1 and micro < run.accum - 1 else nullcontext():  # sync once
            with run.autocast:
                loss = run.fused_loss(x, y)
            (loss / run.accum).backward()
        loss_sum += loss.detach()
    loss = loss_sum / (run.accum * run.world)
    if run.world > 1:
        dist.all_reduce(loss)  # summed: the global batch's mean, the same on every rank, so all stop together
    if args.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), args.grad_clip)  # on the device: no wait
    for opt in run.optimizers:
        opt.step()
        opt.zero_grad(set_to_none=True)  # not zeroed in place: under CUDA graphs .grad is the graph's own buffer
    state.step += 1
    return StepLoss(loss, state.step, run.last, state.saved_at)


def train(args, device: torch.device, info: dict | None, started: float) -> int:
    check_out_dir(Path(args.out_dir), flags.model_config(args), flags.SHAPE_FLAGS, resuming=info is not None,
                  overwrite=args.overwrite)
    if info is not None and info["step"] >= args.max_steps:
        say(f"{Path(args.out_dir) / 'last'} is at step {info['step']}, which already reaches --max-steps "
            f"{args.max_steps}; nothing to do (pass a larger --max-steps to train further)")
        return 0
    run = setup(args, device, info)
    if args.time_budget is not None and info is None:  # saved with the flags: --resume keeps it
        args.max_steps = budget.fit_max_steps(args, started, device, lambda folder: probe(run, folder))
    state = resume(run, info) if info is not None else RunState()
    if run.rank > 0:  # dropout: other ranks draw masks of their own (rank 0 keeps the checkpointed stream)
        torch.manual_seed(int(np.random.SeedSequence([args.seed, run.rank, state.step]).generate_state(1)[0]))
    if run.rank == 0:
        open_out_dir(run.out, args.overwrite, resumed_step=state.step if info is not None else None)
    report.describe(run, state, resuming=info is not None)

    with (tqdm(total=args.max_steps, initial=state.step, disable=None if run.rank == 0 else True,
               dynamic_ncols=True, unit="step") as bar,
          StopRequest(run.last, bar.write if run.rank == 0 else lambda s: None) as stop):
        start_time, start_elapsed = time.perf_counter(), state.elapsed_s
        run.model.train()
        in_flight, loss_value = None, None  # the last step's loss, not read yet; the last one read
        while True:
            state.elapsed_s = start_elapsed + time.perf_counter() - start_time
            if state.step != state.saved_at:
                evaluate_and_save(run, state, bar.write)
            if state.step == args.max_steps:
                break
            signum = stop.agreed(device)
            if signum or state.step == args.stop_at:
                if in_flight is not None:
                    in_flight.read()  # nothing unread is saved
                if state.saved_at != state.step:
                    check_weights(run, state)
                    save_last(run, state)
                why = signal.Signals(signum).name if signum else f"--stop-at {args.stop_at}"
                launcher = "python" if run.world == 1 else "torchrun ..."
                stop.write(f"stopped at step {state.step} ({why}); {run.last} saved. Continue with: "
                           f"{launcher} train.py --resume --out-dir {shlex.quote(str(run.out))}")
                return 128 + signum if signum else 0

            t0 = time.perf_counter()
            queued = train_step(run, state)
            if in_flight is not None:
                loss_value = in_flight.read()  # the step before's: the one wait for the device, once this one is queued
            in_flight = queued
            if any(due(args, state.step)):  # an evaluation or a save comes next: it must not hold an unread step
                loss_value, in_flight = in_flight.read(), None
            state.steps_s += time.perf_counter() - t0
            bar.update(1)
            bar.set_postfix(batch_loss="-" if loss_value is None else f"{loss_value:.3f}",
                            lr=f"{run.optimizers[0].param_groups[0]['lr']:.2e}",
                            tok_s=f"{run.tokens_per_step / (time.perf_counter() - t0):,.0f}")

    if args.sample_tokens > 0 and run.rank == 0:
        print(report.show_sample("sample: ", report.sample(run.model, run.data.tokenizer, args.sample_tokens, device, args.seed)))
    if state.best_step is not None:
        say(f"done: best val loss {state.best_val_loss:.4f} (ppl {report.perplexity(state.best_val_loss):.2f}, "
            f"{run.bits_per_byte(state.best_val_loss, 'val'):.3f} bits per byte) at step {state.best_step} in "
            f"{run.out / 'best'}; {run.last} is step {state.step}; {state.elapsed_s / 60:.1f} min of training")
    say(f"next: python generate.py --ckpt {shlex.quote(str(run.out))}   (an interactive prompt; --prompt TEXT "
        f"prints one sample)")
    return 0


def probe(run: Run, folder: str) -> tuple[list[float], float, float]:
    """--time-budget's throwaway copy of the run, in `folder`: the seconds of each of its steps, of
    an evaluation with its saves (the last step's: scores, sample, curves, best/ and last/), and of
    the end's sample (budget.py)."""
    quiet, args = lambda *a, **k: None, run.args
    copy = setup(argparse.Namespace(**{**vars(args), "max_steps": budget.PROBE_STEPS, "out_dir": folder}),
                 run.device, None, log=quiet)
    state = RunState()
    open_out_dir(copy.out, overwrite=False, resumed_step=None)
    # each step read at once, timed whole: on a GPU a little longer than the loop's, which overlaps
    # two steps, so the budget errs short
    steps = [budget.seconds(lambda: train_step(copy, state).read()) for _ in range(budget.PROBE_STEPS)]
    t_eval = budget.seconds(evaluate_and_save, copy, state, quiet)
    t_end = (budget.seconds(report.sample, copy.model, copy.data.tokenizer, args.sample_tokens, run.device, args.seed)
             if args.sample_tokens > 0 and run.rank == 0 else 0.0)
    return steps, t_eval, t_end


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
