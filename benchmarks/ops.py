"""
How many operations a step dispatches, ours against transformers': a training step (forward and
backward, bf16 autocast, each of our loss paths), the optimizer update after it (ours, and with
torch.optim.Muon in place of our Muon), and one decoded token (bf16 weights). Where a step
is small, as the seed config's is on a GPU, each operation costs a kernel launch and the step's
time follows this count more than its FLOPs. Counted on fake tensors (shapes, no values, no memory,
no GPU), in seconds, on any machine:

    python benchmarks/ops.py                       # seed config, B=24, T=512: the GPU defaults
    python benchmarks/ops.py --preset cpu --batch-size 8 --seq-len 256

Views are not counted (they launch nothing). The operations are the CPU's dispatch: on CUDA a few
differ (F.rms_norm is one fused kernel there, counted here as the five operations it takes on a
CPU; cuBLAS may launch two kernels for one product), so compare rows with each other, and the
count with the profiler's on a GPU (benchmarks/gpu.py) when one is at hand.
"""
import argparse
import collections
import sys
import warnings
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import engine  # noqa: E402
from qwen3 import KVCache, Qwen3, Qwen3Config, configure_optimizers, hf_config  # noqa: E402

VIEWS = {"view", "_unsafe_view", "_reshape_alias", "reshape", "t", "transpose", "permute", "expand", "slice", "select",
         "unsqueeze", "squeeze", "as_strided", "alias", "detach", "split", "split_with_sizes", "chunk", "unbind",
         "diagonal", "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "lift_fresh", "device"}


class Count(TorchDispatchMode):
    """Counts the operations dispatched inside it, by name, views left out."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ not in VIEWS:
            self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def count(fn) -> collections.Counter:
    with Count() as c:
        fn()
    return c.ops


def training_step(model, loss_fn) -> collections.Counter:
    """A step's forward and backward, from no gradients (a step after zero_grad(set_to_none=True))."""
    model.zero_grad(set_to_none=True)

    def step():
        with torch.autocast("cpu", torch.bfloat16):
            loss = loss_fn()
        loss.backward()
    return count(step)


def optimizer_update(model, muon) -> collections.Counter:
    """train.py's update once a backward is done, as on CUDA: clipping in foreach kernels, then Muon
    (muon: its class; Newton-Schulz in bf16) and AdamW. Counted at its second call: the first makes
    the optimizers' states."""
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # what a backward leaves (the values do not matter here)
    optimizers = configure_optimizers(model, "muon", muon=muon)
    optimizers[0].param_groups[0]["ns_dtype"] = torch.bfloat16  # torch.optim.Muon's always, ours on a GPU

    def update():
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)  # CUDA's default
        for opt in optimizers:
            opt.step()
    update()
    return count(update)


def models(cfg, dtype):
    """Ours and transformers' Qwen3 of config cfg, with weights in dtype."""
    import transformers
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # made in dtype (converting fake weights afterwards is refused)
    try:
        return Qwen3(cfg), transformers.Qwen3ForCausalLM(hf_config(cfg))
    finally:
        torch.set_default_dtype(default)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="seed")
    p.add_argument("--vocab-size", type=int, default=49152)
    p.add_argument("--batch-size", type=int, default=24)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--top", type=int, default=0, help="also list the N commonest operations of each row")
    args = p.parse_args(argv)
    import transformers
    transformers.logging.set_verbosity_error()  # past_key_values, as transformers 4.51 names it, is deprecated in 5
    warnings.filterwarnings("ignore", message=".*past_key_values.*", category=FutureWarning)
    cfg = Qwen3Config.preset(args.preset, vocab_size=args.vocab_size, max_position_embeddings=max(args.seq_len, 256))
    rows = {}
    with FakeTensorMode():  # every tensor made in here is fake: the models' weights too
        ours, theirs = models(cfg, torch.float32)
        ids = torch.zeros(args.batch_size, args.seq_len, dtype=torch.long)
        for name, budget in (("plain logits (a GPU's path)", 2**60), ("256-row chunks (a CPU's path)", None)):
            loss = engine.FusedLoss(ours)
            loss.budget = budget  # the memory budget FusedLoss takes on a GPU, or none (a CPU)
            rows[f"training step, ours, {name}"] = training_step(ours, lambda: loss(ids, ids))
        rows["training step, transformers"] = training_step(theirs, lambda: theirs(input_ids=ids, labels=ids).loss)
        rows["optimizer update, ours: clipping, FastMuon, AdamW"] = optimizer_update(ours, engine.FastMuon)
        rows["optimizer update, torch.optim.Muon in FastMuon's place"] = optimizer_update(ours, torch.optim.Muon)
        ours, theirs = (m.eval() for m in models(cfg, torch.bfloat16))
        prompt, token = ids[:1, :16], ids[:1, :1]
        with torch.no_grad():
            gen = engine.Generation(ours, 1, 256)
            weights = engine.decode_weights(ours, 1, pack=True)
            rows["decoded token, ours, the graph's fixed-shape step"] = count(
                lambda: engine.decode_step(ours, weights, gen.token, gen, fixed=True))
            cache = KVCache(cfg)
            ours.model(prompt, cache)
            rows["decoded token, ours, the chapter's forward pass"] = count(lambda: ours.lm_head(ours.model(token, cache)))
            past = theirs(input_ids=prompt, use_cache=True).past_key_values
            rows["decoded token, transformers"] = count(lambda: theirs(input_ids=token, past_key_values=past, use_cache=True))
    print(f"operations dispatched, {args.preset} config (vocabulary {cfg.vocab_size:,}), training B={args.batch_size}, "
          f"T={args.seq_len}, bf16 autocast; decoding one token after 16, bf16 weights")
    for name, ops in rows.items():
        print(f"{name:<56} {sum(ops.values()):>6,}")
        if args.top:
            print("    " + ", ".join(f"{op} {n}" for op, n in ops.most_common(args.top)))
    return {name: sum(ops.values()) for name, ops in rows.items()}


if __name__ == "__main__":
    main()
