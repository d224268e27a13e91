"""
One command measures a GPU: correctness on the device, the training rows, the decoding rows, the
default training run with Muon and with AdamW, each side by side with transformers where there is a
counterpart, within a time budget; JSON and PNGs to --out, a summary table at the end.

    python benchmarks/gpu.py --out benchmarks/results/gpu            # on a machine with one CUDA GPU
    python benchmarks/gpu.py --quick --out /tmp/gpu-smoke           # tiny shapes, any device (checks the script)

Sections, in order (one that fails is recorded and the next goes on; one that would not fit in what
is left of --minutes is skipped):
    peaks        a large bf16 matmul (TFLOP/s) and a device-to-device copy (GB/s, read + write): the
                 MFU and bandwidth-bound denominators, measured here rather than read off a datasheet
    correctness  logits against transformers' Qwen3ForCausalLM in fp32 (three configs) and bf16;
                 greedy tokens of the chapter, transformers, and the engine's CUDA graph; a padded
                 batch against each prompt alone; sampled tokens through the graph; the fused loss
    decode       tokens/s of generate.py's way (bf16 weights, the engine's graph) against
                 transformers' generate, batch 1 and 8, seed config and Qwen3-0.6B's shape, each
                 with the bound: weight bytes per step over the measured copy bandwidth
    default-run  `python train.py` (the GPU defaults: CUDA graphs) with Muon, with --optimizer adamw,
                 and with Muon launching eagerly (--no-cuda-graphs, 150 steps): ms a step of each;
                 then 30 steps in this process with torch's sync debug mode armed inside each step:
                 the times a step waited for the device, and where (expected: never)
    train        the default run's update alone (gradient clipping and the optimizer steps, Muon and
                 AdamW: ms a step against its kernels' own ms); a training step (AdamW, bf16 autocast)
                 of the seed config, eager, replaying CUDA graphs (checked against eager first) and
                 compiled, and of Qwen3-0.6B's shape (B=4, T=2048), with MFU, peak memory, CUDA
                 kernels per step and how busy they keep the GPU, and after how many steps compiling
                 pays for its first step
    decode-compiled  Qwen3-0.6B's shape, batch 1, through the graph of the compiled step, with its
                 compile time: last, since that compile may take minutes
"""
import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import bench  # noqa: E402
import flags  # noqa: E402
from engine import Engine, FastMuon, FusedLoss, cuda_graphed  # noqa: E402
from qwen3 import Qwen3, Qwen3Config, configure_optimizers, generate, hf_config  # noqa: E402

# in this order: the budget may run out
SECTIONS = ("peaks", "correctness", "decode", "default-run", "train", "decode-compiled")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/gpu", help="folder for gpu.json, the runs' curves and logs")
    p.add_argument("--minutes", type=float, default=8.0, help="time budget for the whole script")
    p.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections to run")
    p.add_argument("--quick", action="store_true", help="tiny shapes and runs, on any device: checks the script")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per row (the median is kept)")
    return p.parse_args()


# %% helpers

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fns, device, repeats, warmup=1):
    """bench.timed's rounds (the functions take turns) on this device."""
    return bench.timed(fns, argparse.Namespace(repeats=repeats, device=str(device)), warmup=warmup)


def randomize_(model, seed=0):
    """Weights whose outputs are of unit scale, norm gains away from one (as the CPU tests do)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif p.ndim == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[1] ** -0.5)
    return model


def pair(cfg, device, dtype=torch.float32, attn="sdpa", seed=0, random=True):
    """(ours, transformers') with the same weights, in eval mode, on device, in dtype."""
    import transformers
    torch.manual_seed(seed)
    hf_cfg = hf_config(cfg)
    hf_cfg._attn_implementation = attn
    with torch.device(device):
        theirs = transformers.Qwen3ForCausalLM(hf_cfg)
    if random:
        randomize_(theirs, seed)
    with torch.device(device):
        ours = Qwen3(cfg)
    ours.load_state_dict(theirs.state_dict())
    return ours.to(dtype).eval(), theirs.to(dtype).eval()


def hf_greedy(theirs, idx, n, mask=None):
    return theirs.generate(idx, attention_mask=torch.ones_like(idx) if mask is None else mask, max_new_tokens=n,
                           min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)


def rel_err(got, want):
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()


def kernels_per_call(fn, device) -> tuple[int, float]:
    """How many kernels one call of fn launches on the GPU, and the ms they run for in all: where
    that is far below the call's time, the GPU waits for the CPU to launch them (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        sync(device)
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    return len(kernels), sum(e.time_range.elapsed_us() for e in kernels) / 1000


# %% sections

def peaks(args, device):
    n = 1024 if args.quick else 8192
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    t_mm = median_time([lambda: a @ b], device, args.repeats, warmup=3)[0]
    size = (64 if args.quick else 2048) * 2**20  # bytes
    x = torch.randn(size // 4, device=device)
    y = torch.empty_like(x)
    t_copy = median_time([lambda: y.copy_(x)], device, args.repeats, warmup=3)[0]
    return dict(matmul_tflops=2 * n**3 / t_mm / 1e12, matmul_n=n, copy_gb_per_s=2 * size / t_copy / 1e9)


CORRECTNESS_CONFIGS = {  # GQA with a narrow head; MHA with sliding windows; MQA with a wide head
    "gqa_hd24": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=24),
    "mha_sliding": dict(num_attention_heads=4, num_key_value_heads=4, head_dim=32, use_sliding_window=True,
                        sliding_window=8, max_window_layers=1),
    "mqa_hd128": dict(num_attention_heads=4, num_key_value_heads=1, head_dim=128),
}


def correctness(args, device):
    out = RESULTS["correctness"] = {}  # filled as it goes: a failure keeps what came before it
    base = dict(vocab_size=1000, hidden_size=96, intermediate_size=192, num_hidden_layers=3, max_position_embeddings=512)
    idx = torch.randint(0, 1000, (2, 64), device=device)
    for name, kw in CORRECTNESS_CONFIGS.items():
        cfg = Qwen3Config(**base, **kw)
        ours, theirs = pair(cfg, device, attn="eager")
        r = {}
        with torch.no_grad():
            want = theirs(idx).logits
            r["fp32_logits_rel_err"] = rel_err(ours(idx)[0], want)
            ours16, theirs16 = pair(cfg, device, torch.bfloat16, attn="eager")
            r["bf16_logits_rel_err_ours"] = rel_err(ours16(idx)[0], want)
            r["bf16_logits_rel_err_transformers"] = rel_err(theirs16(idx).logits, want)
        prompt, n = idx[:1, :12], 40  # 40 new tokens: far past the window of 8
        chapter = generate(ours, prompt, n, temperature=0)
        r["greedy_chapter_equals_transformers"] = torch.equal(chapter, hf_greedy(theirs, prompt, n))
        engine = Engine(ours)  # a CUDA graph on CUDA; on a CPU (--quick) the step over the filled cache
        r["engine_mode"] = engine.mode
        r["greedy_engine_equals_chapter"] = torch.equal(generate(ours, prompt, n, temperature=0, decoder=engine), chapter)
        # a padded batch of three prompts of different lengths: each row as that prompt alone
        lengths = [12, 5, 1]
        padded = torch.randint(0, 1000, (3, 12), device=device)
        mask = (torch.arange(12, device=device)[None] >= 12 - torch.tensor(lengths, device=device)[:, None]).long()
        batch = generate(ours, padded, n, temperature=0, attention_mask=mask, decoder=engine)
        alone = [generate(ours, padded[b:b + 1, 12 - L:], n, temperature=0, decoder=engine)[0, L:] for b, L in enumerate(lengths)]
        r["padded_batch_equals_each_alone"] = all(torch.equal(batch[b, 12:], alone[b]) for b in range(3))
        r["padded_batch_equals_chapter"] = torch.equal(batch, generate(ours, padded, n, temperature=0, attention_mask=mask))
        # sampling through the graph: the same generator state draws the chapter's tokens
        kw_s = dict(temperature=0.8, top_k=50, top_p=0.95)
        drawn = [generate(ours, prompt, n, **kw_s, generator=torch.Generator(device).manual_seed(1), **d)
                 for d in ({}, dict(decoder=engine))]
        r["sampled_engine_equals_chapter"] = torch.equal(*drawn)
        # bf16 weights (generate.py's way on CUDA): the graph against the chapter's loop in bf16
        g16 = generate(ours16, prompt, n, temperature=0, decoder=Engine(ours16))
        r["bf16_greedy_engine_agreement"] = (g16 == generate(ours16, prompt, n, temperature=0)).float().mean().item()
        # the fused loss under autocast against the chapter's loss under autocast
        y = torch.roll(idx, -1, 1)
        with torch.autocast(device.type, torch.bfloat16), torch.no_grad():
            r["fused_loss_rel_diff"] = abs(FusedLoss(ours)(idx, y).item() / ours(idx, y)[1].item() - 1)
        out[name] = r
        print(f"  {name}: {r}", flush=True)
    return out


def prompt1(cfg, device):
    return torch.randint(0, cfg.vocab_size, (1, 16), device=device, generator=torch.Generator(device).manual_seed(0))


def decode(args, device):
    """generate.py's way (bf16 weights on CUDA, the engine) against transformers' generate."""
    rows = RESULTS["decode"] = {}  # filled as it goes, as every section's results
    n = 8 if args.quick else 64
    copy_bw = RESULTS.get("peaks", {}).get("copy_gb_per_s")
    shapes = {"seed": Qwen3Config.preset("seed", max_position_embeddings=512)}
    if not args.quick:
        shapes["qwen3-0.6b"] = Qwen3Config.preset("qwen3-0.6b")
    else:
        shapes = {"tiny": Qwen3Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16)}
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for shape, cfg in shapes.items():
        ours, theirs = pair(cfg, device, dtype, random=False)
        engine = Engine(ours)
        if shape != "qwen3-0.6b":  # what the graph buys: the same fixed-shape step, launched eagerly
            eager = Engine(ours, "fixed")  # made once: its packed weights are not timed
            rows[f"{shape}, batch 1, eager fixed-shape step"] = dict(tokens_per_s_ours=n / median_time(
                [lambda: generate(ours, prompt1(cfg, device), n, temperature=0, decoder=eager)], device, 3)[0],
                engine_mode="fixed")
        for B in (1, 8):
            prompt, mask = (prompt1(cfg, device), None) if B == 1 else bench.padded_prompts(cfg, B, device)

            def ours_fn(k):
                return lambda: generate(ours, prompt, k, temperature=0, attention_mask=mask, decoder=engine)

            def theirs_fn(k):
                return lambda: hf_greedy(theirs, prompt, k, mask)

            with torch.no_grad():
                t_ours, t_theirs, t_ours_1, t_theirs_1 = median_time(
                    [ours_fn(n), theirs_fn(n), ours_fn(1), theirs_fn(1)], device, max(3, args.repeats - 2))
            per_step = sum(m.numel() * m.element_size() for m in engine.weights_for(B).matrices())
            row = dict(tokens_per_s_ours=B * n / t_ours, tokens_per_s_transformers=B * n / t_theirs,
                       steps_per_s_ours=(n - 1) / (t_ours - t_ours_1), steps_per_s_transformers=(n - 1) / (t_theirs - t_theirs_1),
                       weight_bytes_per_step=per_step, engine_mode=engine.mode)
            row["ratio"] = row["tokens_per_s_ours"] / row["tokens_per_s_transformers"]
            if copy_bw:  # B tokens a step; a step reads every weight once
                row["bound_tokens_per_s"] = B * copy_bw * 1e9 / per_step
                row["fraction_of_bound_steps"] = B * row["steps_per_s_ours"] / row["bound_tokens_per_s"]
            rows[f"{shape}, batch {B}"] = row
            print(f"  decode {shape}, batch {B}: {row}", flush=True)
        if shape == "seed" and left() > 200:  # Qwen3-0.6B's (--quick: the tiny one's) is the last section
            compiled_decode_row(ours, cfg, device, n, rows, shape)
        ours = theirs = engine = None  # free this shape's models before the next is built
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def compiled_decode_row(ours, cfg, device, n, rows, shape):
    """Batch 1 through the graph of a torch.compile'd step (its elementwise chains fused): tokens/s,
    the bound's fraction, the compile's seconds and its greedy tokens' agreement with the eager graph's."""
    fused, prompt = Engine(ours, compile=True), prompt1(cfg, device)
    t0 = time.perf_counter()
    tokens = generate(ours, prompt, n, temperature=0, decoder=fused)  # compiles first
    t_first = time.perf_counter() - t0
    t, t_1 = median_time([lambda: generate(ours, prompt, n, temperature=0, decoder=fused),
                          lambda: generate(ours, prompt, 1, temperature=0, decoder=fused)], device, 3)
    per_step = sum(m.numel() * m.element_size() for m in fused.weights_for(1).matrices())
    agree = (tokens == generate(ours, prompt, n, temperature=0, decoder=Engine(ours))).float().mean().item()
    row = dict(tokens_per_s_ours=n / t, steps_per_s_ours=(n - 1) / (t - t_1), first_call_s=t_first,
               greedy_agreement_with_eager_graph=agree, engine_mode=f"{fused.mode}, compiled")
    copy_bw = RESULTS.get("peaks", {}).get("copy_gb_per_s")
    if copy_bw:
        row["fraction_of_bound_steps"] = row["steps_per_s_ours"] / (copy_bw * 1e9 / per_step)
    rows[f"{shape}, batch 1, compiled graph"] = row
    print(f"  decode {shape}, batch 1, compiled: {row}", flush=True)


def decode_compiled(args, device):
    """Qwen3-0.6B's shape, batch 1, through the compiled graph: last, as its compile may take minutes."""
    rows = RESULTS["decode-compiled"] = {}
    cfg = Qwen3Config.preset("qwen3-0.6b") if not args.quick else Qwen3Config(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16)
    with torch.device(device):
        ours = Qwen3(cfg).to(torch.bfloat16 if device.type == "cuda" else torch.float32).eval()
    compiled_decode_row(ours, cfg, device, 8 if args.quick else 64, rows, "qwen3-0.6b" if not args.quick else "tiny")
    return rows


def loss_and_grads(loss_fn, model, x, y):
    """One forward and backward under bf16 autocast: the loss and every parameter's gradient."""
    model.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, torch.bfloat16):
        loss = loss_fn(x, y)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return loss.detach().clone(), grads


def graphs_against_eager(model, graphed, x, y) -> dict:
    """A loss replaying CUDA graphs (engine.cuda_graphed) against the eager FusedLoss: loss and
    gradients, same weights and batch."""
    (l0, g0), (l1, g1) = (loss_and_grads(f, model, x, y) for f in (FusedLoss(model), graphed))
    return dict(graphs_loss_rel_diff=abs(l1.item() / l0.item() - 1), graphs_grad_rel_err=max(map(rel_err, g1, g0)))


def train_rows(args, device, cfg, B, T, compile_too, out, graphs_too=False):
    """AdamW steps of ours (engine.FusedLoss, as train.py) and transformers', eager, with ours
    replaying CUDA graphs (train.py's way on CUDA; transformers' eager beside it) and compiled, into
    the dict out."""
    ours, theirs = pair(cfg, device, random=False)
    ours.train(), theirs.train()
    x = torch.randint(0, cfg.vocab_size, (B, T), device=device)
    y = torch.roll(x, -1, 1)
    opts = bench.adamw(ours), bench.adamw(theirs)
    amp = argparse.Namespace(device=str(device))
    flops = bench.train_flops_per_token(cfg, T) * B * T
    peak = RESULTS.get("peaks", {}).get("matmul_tflops")

    def timed_mode(mode):
        fns = [FusedLoss(ours), lambda a, b: theirs(input_ids=a, labels=a).loss]
        if mode == "compiled":
            fns = [torch.compile(f) for f in fns]
        check = {}
        if mode == "graphs":  # the same loss and gradients first, then its speed
            fns[0] = cuda_graphed(fns[0], B, T, torch.bfloat16)
            if fns[0] is None:
                raise RuntimeError("recording the CUDA graphs failed (the warning above says why)")
            check = graphs_against_eager(ours, fns[0], x, y)
        steps = [bench.train_step_fn(f, o, x, y, amp) for f, o in zip(fns, opts)]
        first = []
        for s in steps:  # the first call compiles
            t0 = time.perf_counter()
            s()
            sync(device)
            first.append(time.perf_counter() - t0)
        t_ours, t_theirs = median_time(steps, device, args.repeats)
        row = dict(tokens_per_s_ours=B * T / t_ours, tokens_per_s_transformers=B * T / t_theirs,
                   ratio=t_theirs / t_ours, step_ms_ours=1000 * t_ours, step_ms_transformers=1000 * t_theirs,
                   first_step_s_ours=first[0], first_step_s_transformers=first[1], **check)
        if peak:
            row["mfu_ours"], row["mfu_transformers"] = (flops / t / (peak * 1e12) for t in (t_ours, t_theirs))
        if device.type == "cuda":
            for side, s in zip(("ours", "transformers"), steps):
                torch.cuda.reset_peak_memory_stats(device)
                s()
                row[f"peak_gib_{side}"] = torch.cuda.max_memory_allocated(device) / 2**30
            if mode == "eager":
                (row["kernels_ours"], row["kernel_ms_ours"]), (row["kernels_transformers"], row["kernel_ms_transformers"]) = (
                    kernels_per_call(s, device) for s in steps)
        print(f"  train {mode}: {row}", flush=True)
        return row

    for mode in ["eager"] + (["graphs"] if graphs_too else []) + (["compiled"] if compile_too else []):
        out[mode] = attempt(lambda: timed_mode(mode), f"train {mode}")
    if "ratio" in out["eager"] and "ratio" in out.get("compiled", {}):
        out["compile_pays_after_steps"] = {side: pays_after(out["eager"], out["compiled"], side)
                                           for side in ("ours", "transformers")}


def pays_after(eager: dict, compiled: dict, side: str) -> float | None:
    """How many steps a run takes before compiling has paid for itself: what the compiled first
    step costs beyond the eager one, over what each compiled step saves (None: it saves nothing)."""
    saved_s = (eager[f"step_ms_{side}"] - compiled[f"step_ms_{side}"]) / 1000
    extra_s = compiled[f"first_step_s_{side}"] - eager[f"first_step_s_{side}"]
    return max(0.0, extra_s) / saved_s if saved_s > 0 else None


def optimizer_steps(args, device, cfg) -> dict:
    """train.py's update alone, after the gradients (clip_grad_norm_ at its default --grad-clip,
    then each optimizer's step), with Muon and with AdamW: ms a step and, on CUDA, its kernels' own
    ms. The gap between the two is the CPU launching them: what a CUDA graph of the update would save."""
    with torch.device(device):
        model = Qwen3(cfg)
    for p in model.parameters():
        p.grad = 1e-3 * torch.randn_like(p)  # kept: the same gradients every step
    clip = flags.build_parser().get_default("grad_clip")

    def update(optimizers):
        def step():
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            for opt in optimizers:
                opt.step()
        return step
    steps = {name: update(configure_optimizers(model, name, muon=FastMuon)) for name in ("muon", "adamw")}
    rows = {}
    for (name, step), t in zip(steps.items(), median_time(list(steps.values()), device, args.repeats)):
        rows[name] = dict(step_ms=1000 * t)
        if device.type == "cuda":
            rows[name]["kernels"], rows[name]["kernel_ms"] = kernels_per_call(step, device)
        print(f"  optimizer step {name}: {rows[name]}", flush=True)
    return rows


def train(args, device):
    out = RESULTS["train"] = {}  # filled row by row: a failure keeps the rows before it
    if args.quick:
        cfg = Qwen3Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64)
        train_rows(args, device, cfg, 2, 64, compile_too=False, out=out.setdefault("tiny", {}),
                   graphs_too=device.type == "cuda")
        out["tiny, the update alone"] = attempt(lambda: optimizer_steps(args, device, cfg), "optimizer steps")
        return out
    gpu = flags.DEVICE_DEFAULTS["gpu"]  # the default run's model, as train.py builds it on a GPU
    cfg = Qwen3Config.preset(gpu["preset"], vocab_size=gpu["vocab_size"], max_position_embeddings=gpu["seq_len"])
    out["default run's model, the update alone"] = attempt(lambda: optimizer_steps(args, device, cfg), "optimizer steps")
    train_rows(args, device, Qwen3Config.preset("seed", max_position_embeddings=512), 24, 512, compile_too=left() > 100,
               out=out.setdefault("seed, B=24, T=512", {}), graphs_too=device.type == "cuda")  # where graphs pay
    torch.cuda.empty_cache()
    if left() > 40:  # compiling Qwen3-0.6B's shape, both sides, takes minutes
        train_rows(args, device, Qwen3Config.preset("qwen3-0.6b"), 4, 2048, compile_too=left() > 180,
                   out=out.setdefault("qwen3-0.6b, B=4, T=2048", {}))
    return out


def default_run(args, device):
    """python train.py with the device's defaults, Muon and AdamW, and Muon's first 150 steps launched
    eagerly: best val bpb, time per step (in all, and past the first evaluation: no warm-up), where
    Muon first reaches AdamW's final validation loss; then the waits in a step (step_waits)."""
    out_dir, runs, work = Path(args.out), {}, Path(tempfile.mkdtemp(prefix="gpu-runs-"))
    RESULTS["default-run"] = runs  # filled as it goes
    quick = ["--max-steps", "20", "--eval-every", "10", "--preset", "cpu", "--seq-len", "64", "--batch-size", "4",
             "--vocab-size", "512", "--eval-batches", "1"] if args.quick else []
    for name, extra in (("muon", []), ("adamw", ["--optimizer", "adamw"]),
                        ("muon, eager launches", ["--no-cuda-graphs", "--max-steps", "150"])):
        run = work / name.replace(", ", "-").replace(" ", "-")  # stays here; its metrics and curves go to --out
        runs[name] = attempt(lambda: one_run(run, [*extra, *quick], device, out_dir), f"default run {name}")
        if "error" not in runs[name]:
            r = runs[name]
            print(f"  default run {name}: best val {r['best_val_loss']:.4f} ({r['best_val_bpb']:.3f} bpb) at step "
                  f"{r['best_step']}, {r['ms_per_step']:.1f} ms a step ({r['ms_per_step_warm']:.1f} warm), "
                  f"{r['wall_s']:.0f} s wall", flush=True)
    runs["waits in a step"] = attempt(lambda: step_waits(work / "waits", quick, device, out_dir), "waits in a step")
    if "records" in runs["adamw"] and "records" in runs["muon"]:
        target, muon = runs["adamw"]["records"][-1]["val_loss"], runs["muon"]["records"]
        reach = next(((a, b) for a, b in zip(muon, muon[1:]) if a["val_loss"] > target >= b["val_loss"]), None)
        if reach:  # interpolated between evaluations
            a, b = reach
            fraction = (a["val_loss"] - target) / (a["val_loss"] - b["val_loss"])
            runs["muon_reaches_adamw_final_at_step"] = a["step"] + (b["step"] - a["step"]) * fraction
    for r in runs.values():
        if isinstance(r, dict):
            r.pop("records", None)
    return runs


def one_run(run: Path, flags: list, device, out_dir: Path) -> dict:
    """train.py into the folder run, its log, metrics and curves copied to out_dir: its numbers."""
    cmd = [sys.executable, str(ROOT / "train.py"), "--out-dir", str(run), "--device", device.type, *flags]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}, cwd=ROOT)
    wall = time.perf_counter() - t0
    (out_dir / f"run-{run.name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode:
        raise RuntimeError(f"train.py exited {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    best, last = min(records, key=lambda r: r["val_loss"]), records[-1]
    warm = records[1]  # the first evaluation after step 0: what came before it includes warming up
    shutil.copy(run / "curves.png", out_dir / f"curves-{run.name}.png")
    shutil.copy(run / "metrics.jsonl", out_dir / f"metrics-{run.name}.jsonl")
    return dict(best_val_loss=best["val_loss"], best_val_bpb=best["val_bpb"], best_step=best["step"],
                steps=last["step"], steps_s=last["steps_s"], elapsed_s=last["elapsed_s"], wall_s=wall,
                ms_per_step=1000 * last["steps_s"] / last["step"],
                ms_per_step_warm=1000 * (last["steps_s"] - warm["steps_s"]) / max(1, last["step"] - warm["step"]),
                records=records)


def step_waits(run: Path, flags: list, device, out_dir: Path) -> dict:
    """train.py in this process (the device's defaults: on CUDA, graphs), every step from the second
    on under torch's sync debug mode: the times a step waited for the device, and the lines that
    did. The loop reads a step's loss outside the step, once the next is queued: expected none.
    On a CPU nothing can wait: the steps run, uncounted."""
    import train
    step, steps, sites = train.train_step, [], []

    def checked(run_, state):
        steps.append(state.step)
        if device.type != "cuda" or len(steps) == 1:  # the first step makes the optimizers' states
            return step(run_, state)
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                return step(run_, state)
        finally:
            torch.cuda.set_sync_debug_mode("default")
            sites.extend(f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message))

    argv = ["--out-dir", str(run), "--device", device.type, "--max-steps", "30", "--eval-every", "10",
            "--sample-tokens", "0", *flags]
    train.train_step = checked
    try:
        with open(out_dir / "run-waits.log", "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            code = train.main(argv)
    finally:
        train.train_step = step
    if code:
        raise RuntimeError(f"train.py exited {code} (its log: run-waits.log)")
    checked_steps = len(steps) - 1 if device.type == "cuda" else 0
    return dict(steps=len(steps), steps_checked=checked_steps, waits=len(sites), sites=sorted(set(sites)))


def attempt(fn, what: str) -> dict:
    """fn()'s dict of results, or {"error": why} if it raised: one row's failure costs that row alone."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001  recorded, printed, and the next row goes on
        print(f"  {what}: {traceback.format_exc()[-2000:]}", file=sys.stderr, flush=True)
        return {"error": error_line(e)}


def error_line(e: Exception) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"


# %% the budget, the run, the table

START, BUDGET, RESULTS = time.perf_counter(), 0.0, {}
ESTIMATES = {"peaks": 15, "correctness": 40, "decode": 90, "default-run": 190, "train": 150,  # seconds, on an H200
             "decode-compiled": 150}  # a guess: its compile has not been timed


def left() -> float:
    return BUDGET - (time.perf_counter() - START)


def summary(res):
    lines = [f"{res['device']}, torch {res['torch']}, transformers {res['transformers']}, {res['date']}"]
    p = res.get("peaks", {})
    if "matmul_tflops" in p:
        lines.append(f"peaks: bf16 matmul {p['matmul_tflops']:.0f} TFLOP/s, copy {p['copy_gb_per_s']:.0f} GB/s")
    for name, r in res.get("correctness", {}).items():
        if isinstance(r, dict):
            unequal = [k for k, v in r.items() if v is False]
            lines.append(f"correct {name}: fp32 rel err {r['fp32_logits_rel_err']:.1e}, bf16 ours/theirs "
                         f"{r['bf16_logits_rel_err_ours']:.1e}/{r['bf16_logits_rel_err_transformers']:.1e}, "
                         + ("all token checks equal" if not unequal else f"NOT EQUAL: {', '.join(unequal)}"))
    for name, r in [*res.get("decode", {}).items(), *res.get("decode-compiled", {}).items()]:
        if isinstance(r, dict) and "ratio" in r:
            bound = f", {r['fraction_of_bound_steps']:.2f} of the bound" if "fraction_of_bound_steps" in r else ""
            lines.append(f"decode {name:<22} ours {r['tokens_per_s_ours']:>8,.0f} tok/s  transformers "
                         f"{r['tokens_per_s_transformers']:>7,.0f}  {r['ratio']:5.2f}x{bound}")
        elif isinstance(r, dict):
            bound = f", {r['fraction_of_bound_steps']:.2f} of the bound" if "fraction_of_bound_steps" in r else ""
            lines.append(f"decode {name:<22} ours {r['tokens_per_s_ours']:>8,.0f} tok/s{bound}")
    for shape, modes in res.get("train", {}).items():
        if isinstance(modes, dict) and isinstance(modes.get("error"), str):  # a row that failed as a whole
            lines.append(f"train {shape}: {modes['error']}")
        for mode, r in (modes.items() if isinstance(modes, dict) else ()):
            if isinstance(r, dict) and "error" in r:
                lines.append(f"train {shape} {mode}: {r['error']}")
            elif isinstance(r, dict) and "ratio" in r:
                mfu = f", MFU {100 * r['mfu_ours']:.1f}% vs {100 * r['mfu_transformers']:.1f}%" if "mfu_ours" in r else ""
                busy = (f", GPU busy {r['kernel_ms_ours'] / r['step_ms_ours']:.0%} vs "
                        f"{r['kernel_ms_transformers'] / r['step_ms_transformers']:.0%}") if "kernel_ms_ours" in r else ""
                lines.append(f"train {shape} {mode:<8} ours {r['tokens_per_s_ours']:>10,.0f} tok/s  transformers "
                             f"{r['tokens_per_s_transformers']:>10,.0f}  {r['ratio']:5.2f}x{mfu}{busy}")
            elif isinstance(r, dict) and "step_ms" in r:  # the update alone
                busy = f", its {r['kernels']} kernels {r['kernel_ms']:.2f} ms" if "kernels" in r else ""
                lines.append(f"train {shape}, {mode}: {r['step_ms']:.2f} ms a step{busy}")
        pays = modes.get("compile_pays_after_steps") if isinstance(modes, dict) else None
        if pays:
            lines.append(f"train {shape}: compiling pays after " + ", ".join(
                f"{'never' if n is None else f'{n:,.0f} steps'} ({side})" for side, n in pays.items()))
    runs = res.get("default-run", {})
    for name in ("muon", "adamw", "muon, eager launches"):
        if isinstance(runs.get(name), dict) and "error" in runs[name]:
            lines.append(f"default run {name}: {runs[name]['error']}")
        elif isinstance(runs.get(name), dict):
            r = runs[name]
            lines.append(f"default run {name}: {r['steps']} steps, {r['best_val_bpb']:.3f} bpb, {r['ms_per_step']:.1f} "
                         f"ms a step ({r['ms_per_step_warm']:.1f} warm), {r['wall_s']:.0f} s wall")
    waits = runs.get("waits in a step")
    if isinstance(waits, dict) and "error" in waits:
        lines.append(f"waits in a step: {waits['error']}")
    elif isinstance(waits, dict):
        where = f" ({', '.join(waits['sites'])})" if waits["sites"] else ""
        lines.append(f"train.py's steps waited for the device {waits['waits']} times in {waits['steps_checked']} "
                     f"steps checked{where}")
    if "muon_reaches_adamw_final_at_step" in runs:
        lines.append(f"Muon reaches AdamW's final loss at step {runs['muon_reaches_adamw_final_at_step']:.0f}")
    for name in SECTIONS:
        if isinstance(res.get(name), dict) and ("error" in res[name] or "skipped" in res[name]):
            lines.append(f"{name}: {res[name].get('error') or res[name]['skipped']}")
    return "\n".join(lines)


def main():
    global BUDGET
    args = parse_args()
    BUDGET = 60 * args.minutes
    import transformers
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    Path(args.out).mkdir(parents=True, exist_ok=True)
    RESULTS.update(date=str(date.today()), device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                   torch=torch.__version__, transformers=transformers.__version__, quick=args.quick)
    wanted = set(args.only.split(","))
    for name, fn in (("peaks", peaks), ("correctness", correctness), ("decode", decode), ("default-run", default_run),
                     ("train", train), ("decode-compiled", decode_compiled)):
        if name not in wanted:
            continue
        if not args.quick and left() < ESTIMATES[name] * 0.6:
            RESULTS[name] = {"skipped": f"skipped: {left():.0f} s left of the budget"}
            continue
        print(f"{name} ({left():.0f} s left)", flush=True)
        t0 = time.perf_counter()
        try:
            RESULTS[name] = fn(args, device)
        except Exception as e:  # one section's failure is recorded beside what it measured; the next goes on
            RESULTS.setdefault(name, {}).update(error=error_line(e), traceback=traceback.format_exc()[-3000:])
            print(RESULTS[name]["traceback"], file=sys.stderr, flush=True)
        RESULTS.setdefault("section_seconds", {})[name] = time.perf_counter() - t0
        Path(args.out, "gpu.json").write_text(json.dumps(RESULTS, indent=2, default=str) + "\n")
    try:
        print("\n" + summary(RESULTS))
    except Exception as e:  # the numbers are safe in gpu.json whatever the table makes of them
        print(f"\nno summary ({type(e).__name__}: {e}); the results are in {Path(args.out, 'gpu.json')}")


if __name__ == "__main__":
    main()
