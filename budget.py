"""
What fits on this machine: the model in its memory, and with --time-budget MINUTES the --max-steps
that ends the whole run (setup, steps, evaluations, saves, the final sample) on time.

The schedule (its warmup too) depends on --max-steps, so the count is fixed before the first step:
a throwaway copy of the run, built the same way and writing to a temporary folder, takes a few
real steps and one evaluation with its saves, and the largest step count that fits what is left of
the budget is kept. The run itself is untouched by this (its random stream is put back), and the
count is saved with its flags: the run is the `--max-steps N` run, and --resume continues it
exactly, without timing anything again.
"""

import math
import tempfile
import time

import torch
import torch.distributed as dist

from common import UserError, free_memory
from qwen3 import Qwen3
from ranks import all_ranks, say

PROBE_STEPS = 4  # the first includes one-off costs (allocation, compilation): timed apart


def check_memory(config, device):
    """Refuse a model whose training cannot fit the device's free memory: at least 12 bytes a
    parameter (fp32 weights, gradients and one moment: Muon's; AdamW keeps two) before any
    activation. Counted on the meta device, where building a model allocates nothing."""
    with torch.device("meta"):
        params = Qwen3(config).num_params()
    need, free = 12 * params, free_memory(device)
    if free is not None and need > free:
        raise UserError(f"the model has {params / 1e9:.2f}B parameters: training needs at least {need / 2**30:.1f} "
                        f"GiB, {device.type} has {free / 2**30:.1f} GiB free; choose a smaller model")


def seconds(f, *args) -> float:
    """How long f(*args) takes."""
    t0 = time.perf_counter()
    f(*args)
    return time.perf_counter() - t0


def fit_max_steps(args, started: float, device, probe) -> int:
    """The largest --max-steps whose run, begun at `started` (perf_counter), ends within
    args.time_budget. probe(folder) runs the throwaway copy there and returns its seconds: of each
    of its PROBE_STEPS steps, of an evaluation with its saves, of the end's sample."""
    rng = torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    with tempfile.TemporaryDirectory(prefix="qwen3-budget-") as tmp:
        times, t_eval, t_end = probe(tmp)
    torch.set_rng_state(rng[0])
    if rng[1] is not None:
        torch.cuda.set_rng_state(rng[1], device)
    t_step = sum(times[1:]) / (PROBE_STEPS - 1)
    # what is left, less the end's sample and the one-off costs of the run's own first step
    left = args.time_budget * 60 - (time.perf_counter() - started) - t_end - (times[0] - t_step)

    def cost(n):  # n steps, evaluations at 0, every eval_every and at n
        return n * t_step + (1 + math.ceil(n / args.eval_every)) * t_eval

    n = max(0, int((left - 2 * t_eval) / (t_step + t_eval / args.eval_every)))
    while cost(n + 1) <= left:
        n += 1
    n = int(all_ranks([n], device, dist.ReduceOp.MIN)[0])  # the slowest rank decides
    if n < 1:
        raise UserError(f"--time-budget {args.time_budget:g} min is too short: setting up took "
                        f"{time.perf_counter() - started:.0f} s, a step takes {t_step:.3g} s and an "
                        f"evaluation {t_eval:.3g} s")
    say(f"budget {args.time_budget:g} min: {n} steps of {t_step:.3g} s, {1 + math.ceil(n / args.eval_every)} "
        f"evaluations of {t_eval:.3g} s (with saves), {time.perf_counter() - started:.0f} s of setup and timing")
    return n
