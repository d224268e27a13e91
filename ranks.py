"""
train.py's processes under torchrun: joining the job, one voice for all of them, and values they
agree on. Outside torchrun there is one process, rank 0 of 1, and each helper here is a no-op.

torchrun starts one process per GPU (or CPU worker) and tells each, in environment variables, how
many there are (WORLD_SIZE), which one it is (RANK) and which one on its machine (LOCAL_RANK).
"""

import os

import torch
import torch.distributed as dist

from common import UserError


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


def first_on_each_machine(f):
    """f() in each machine's first process while the others wait, then in the others: the first
    fills a cache (a trained tokenizer, token files) that the others then read."""
    first = not dist.is_initialized() or int(os.environ.get("LOCAL_RANK", "0")) == 0
    if not first:
        dist.barrier()
    result = f()
    if first and dist.is_initialized():
        dist.barrier()
    return result


def same_on_every_rank(values: list[float], device) -> bool:
    return all_ranks(values, device, dist.ReduceOp.MAX) == all_ranks(values, device, dist.ReduceOp.MIN)
