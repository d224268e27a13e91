"""
Side-by-side benchmark: our Qwen3 vs transformers' Qwen3ForCausalLM, same config, same weights,
one process, one machine, alternating between the two so both see the same machine state.

    python bench.py                      # CPU defaults: seed config, B=8 T=256, fp32
    python bench.py --device cuda        # GPU defaults: B=24 T=512, bf16 autocast
    python bench.py --device cuda --compile
    python bench.py --shape qwen3-0.6b           # decode rows only, at the real Qwen3-0.6B shape (slow)

Prints a table of ratios (ours / theirs; above 1 means we are faster, or use less memory for the
memory row) and writes the raw numbers as JSON (--json). Ours decodes as generate.py does
(qwen3.generate with an engine.Engine; on a GPU, bf16 weights). Every decode row also prints its
bandwidth bound: the bytes of weights one decoding step reads, over the speed at which they can be
streamed, measured in the same rounds as the two models: on a CPU through the step's own
matrix-vector products (the model's weights, one vector or one row per sequence through each, in
the order and layout of the engine's step), on a GPU by a device-to-device copy of as many bytes;
the fraction of that bound each side reaches; and both again for the decoding steps alone, the
prompt's prefill (timed on its own in the same rounds) taken out. benchmarks/gpu.py measures a GPU
in one command, bench.py's rows among its sections.
"""

import argparse
import copy
import json
import math
import multiprocessing
import os
import platform
import resource
import statistics
import time
from contextlib import nullcontext
from datetime import date

import torch

from engine import Engine, FastMuon, FusedLoss, project, should_pack
from qwen3 import PRESETS, Qwen3, Qwen3Config, generate, hf_config


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="seed", help="model shape (a qwen3.PRESETS name)")
    p.add_argument("--vocab-size", type=int, default=49152, help="vocabulary (the seed config uses SmolLM's 49152)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--batch-size", type=int, default=None, help="default 8 on CPU, 24 on GPU")
    p.add_argument("--seq-len", type=int, default=None, help="default 256 on CPU, 512 on GPU")
    p.add_argument("--decode-tokens", type=int, default=64, help="new tokens per decoding run")
    p.add_argument("--decode-dtypes", default="float32,float16",
                   help="comma-separated dtypes of the batch-1 decode rows (CPU; on GPUs, bf16 autocast)")
    p.add_argument("--shape", default=None, choices=["qwen3-0.6b"],
                   help="decode rows only, at this preset's full shape and vocabulary, random weights (no hub)")
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions per measurement (median is kept)")
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument("--skip", default="", help="comma-separated measurements to skip: "
                   "train,forward,decode,batch-decode,memory,muon")
    p.add_argument("--json", default=None, help="write the results here as JSON")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.decode_tokens < 2:
        p.error("--decode-tokens must be at least 2 (the decode rows also time the steps after the first token)")
    return args


def model_config(args) -> Qwen3Config:
    return Qwen3Config.preset(args.preset, vocab_size=args.vocab_size,
                              max_position_embeddings=max(args.seq_len, 2 * args.decode_tokens))


def build(args):
    """Both models from one config and one set of random weights."""
    from transformers import Qwen3ForCausalLM
    torch.manual_seed(args.seed)
    cfg = model_config(args)
    ours = Qwen3(cfg).to(args.device)
    theirs = Qwen3ForCausalLM(hf_config(cfg)).to(args.device)  # transformers' default attention (sdpa)
    theirs.load_state_dict(ours.state_dict())
    return cfg, ours, theirs


def losses(ours, theirs, args):
    """The training loss of each, as train.py computes ours (engine.FusedLoss), compiled with --compile."""
    # transformers shifts labels itself: labels=x is the same next-token task as targets=y
    fns = [FusedLoss(ours), lambda x, y: theirs(input_ids=x, labels=x).loss]
    return [torch.compile(f) for f in fns] if args.compile else fns


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fns, args, warmup=2):
    """Median seconds of each fn() over args.repeats rounds; the fns take turns within every round
    so that both sides see the same machine (other load, clocks, caches) as closely as possible."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(args.repeats):
        for fn, t in zip(fns, times):
            sync(args.device)
            t0 = time.perf_counter()
            fn()
            sync(args.device)
            t.append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def autocast(args):
    return torch.autocast("cuda", dtype=torch.bfloat16) if args.device.startswith("cuda") else nullcontext()


def train_step_fn(loss_fn, opt, x, y, args):
    def step():
        with autocast(args):
            loss = loss_fn(x, y)
        loss.backward()
        for o in opt:
            o.step()
            o.zero_grad(set_to_none=True)
    return step


def forward_fn(model, x, ours, args):
    model = torch.compile(model) if args.compile else model

    @torch.no_grad()
    def fwd():
        with autocast(args):
            model(x) if ours else model(input_ids=x)
    return fwd


def decode_fn(model, prompt, n, ours, args, mask=None):
    """Greedy decoding of n new tokens per row; mask (B, T): left padding, as in transformers. Ours
    decodes as generate.py does: qwen3.generate with an engine.Engine made once for the model."""
    engine = Engine(getattr(model, "_orig_mod", model)) if ours else None

    @torch.no_grad()
    def dec():  # no autocast: on a GPU the weights are bf16 themselves, as generate.py loads them
        if ours:
            generate(engine.model, prompt, n, temperature=0, attention_mask=mask, decoder=engine)
        else:
            model.generate(prompt, attention_mask=torch.ones_like(prompt) if mask is None else mask,
                           max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return dec


def decode_matrices(model, rows):
    """The matrices one decoding step of `rows` sequences reads, held as the engine holds them
    (column blocks, packed or views), in the order it reads them: every layer's projections, then
    the output head (the embedding contributes one row per token, nothing to speak of)."""
    return Engine(getattr(model, "_orig_mod", model)).weights_for(rows).matrices()  # the model itself, if compiled


def gemv_fn(matrices, rows, n):
    """n passes of `rows` vectors through `matrices`, each multiplied as the engine multiplies it: the
    matrix-vector work of n decoding steps and nothing else, so 1 / (its time / n) bounds the steps
    per second."""
    xs = [torch.randn(rows, m.size(1), dtype=m.dtype, device=m.device) for m in matrices]

    @torch.no_grad()
    def passes():
        for _ in range(n):
            for m, x in zip(matrices, xs):
                project(x, m)
    return passes


def copy_fn(nbytes, n, device):
    """n device-to-device copies moving nbytes each (half read, half written): a GPU's bandwidth,
    the bound of a decoding step that reads nbytes of weights (a GPU's matrix-vector products of
    one vector are too small to stream at it)."""
    src = torch.empty(nbytes // 4, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)

    def copies():
        for _ in range(n):
            dst.copy_(src)
    return copies


def padded_prompts(cfg, B, device, seed=0):
    """B prompts of different lengths (4 to 32 tokens), left-padded: ids (B, 32) and mask (B, 32)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.linspace(4, 32, B).round().long().tolist()
    ids = torch.randint(0, cfg.vocab_size, (B, 32), generator=g)
    mask = (torch.arange(32)[None, :] >= 32 - torch.tensor(lengths)[:, None]).long()
    return ids.to(device), mask.to(device)


def adamw(model):
    """The same optimizer on both sides (torch's fused AdamW), so the step ratio measures the models."""
    return [torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)]


def muon_setup(model, muon_cls):
    """Muon on the 2-D matrices inside the blocks, AdamW on the rest: the same split for both."""
    hidden = [p for n, p in model.named_parameters() if p.ndim == 2 and ".layers." in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim == 2 and ".layers." in n)]
    kw = dict(adjust_lr_fn="original") if muon_cls is torch.optim.Muon else {}
    return [muon_cls(hidden, lr=0.02, weight_decay=0.0, **kw), torch.optim.AdamW(rest, lr=1e-4, fused=True)]


def matmul_peak_flops(args):
    """Measured, not from a datasheet: the best a big square matmul reaches here."""
    n = 4096 if args.device.startswith("cuda") else 1024
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    a, b = (torch.randn(n, n, device=args.device, dtype=dtype) for _ in range(2))
    best = min(timed([lambda: a @ b], args)[0] for _ in range(3))
    return 2 * n ** 3 / best


def train_flops_per_token(cfg, T):
    """6 N per token for the matmul weights (forward 2N + backward 4N, lm_head included) plus the
    attention scores and weighted sums: 6 * 2 * layers * heads * head_dim * T / 2 (causal half)."""
    c = cfg
    attn = c.hidden_size * (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim \
        + c.num_attention_heads * c.head_dim * c.hidden_size
    mlp = 3 * c.hidden_size * c.intermediate_size
    n = c.num_hidden_layers * (attn + mlp) + c.vocab_size * c.hidden_size  # lm_head counts
    return 6 * n + 6 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * T


def _peak_rss_child(args, ours, conn):
    from transformers import Qwen3ForCausalLM
    cfg = model_config(args)
    model = Qwen3(cfg) if ours else Qwen3ForCausalLM(hf_config(cfg))  # only this model in this process
    x = torch.randint(0, cfg.vocab_size, (args.batch_size, args.seq_len))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    loss_fn = losses(model, None, args)[0] if ours else losses(None, model, args)[1]
    step = train_step_fn(loss_fn, adamw(model), x, torch.roll(x, -1, 1), args)
    step()
    step()
    conn.send((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)


def peak_memory(args, ours):
    """Peak bytes that training steps add on top of the weights (activations, gradients, AdamW)."""
    if args.device.startswith("cuda"):
        _, m_ours, m_theirs = build(args)
        model = m_ours if ours else m_theirs
        del m_ours, m_theirs
        x = torch.randint(0, model.config.vocab_size, (args.batch_size, args.seq_len), device=args.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss_fn = losses(model, None, args)[0] if ours else losses(None, model, args)[1]
        step = train_step_fn(loss_fn, adamw(model), x, torch.roll(x, -1, 1), args)
        step()
        step()
        return torch.cuda.max_memory_allocated() - base
    # CPU: a fresh process per model, so the high-water mark of resident memory is its alone
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_peak_rss_child, args=(args, ours, child))
    proc.start()
    value = parent.recv()
    proc.join()
    return value


def main():
    args = parse_args()
    if args.shape:  # the real shape's decoding only: its training rows would take hours here
        args.preset, args.vocab_size = args.shape, PRESETS[args.shape]["vocab_size"]
        args.skip = ",".join(filter(None, [args.skip, "train,forward,memory,muon"]))
    gpu = args.device.startswith("cuda")
    args.batch_size = args.batch_size or (24 if gpu else 8)
    args.seq_len = args.seq_len or (512 if gpu else 256)
    skip = set(filter(None, args.skip.split(",")))
    cfg, ours, theirs = build(args)
    import transformers
    B, T = args.batch_size, args.seq_len
    x = torch.randint(0, cfg.vocab_size, (B, T), device=args.device)
    y = torch.roll(x, -1, dims=1)
    res = {"date": str(date.today()), "device": torch.cuda.get_device_name() if gpu else platform.processor() or platform.machine(),
           "threads": torch.get_num_threads(), "torch": torch.__version__, "transformers": transformers.__version__,
           "preset": args.preset, "vocab_size": cfg.vocab_size, "batch_size": B, "seq_len": T,
           "dtype": "bf16 autocast" if gpu else "fp32", "compile": args.compile, "results": {}}
    rows = []

    def record(name, unit, mine, peer, higher_is_better=True):
        num, den = (mine, peer) if higher_is_better else (peer, mine)
        ratio = num / den if den else math.nan  # (a tiny model's peak memory can read 0)
        res["results"][name] = {"ours": mine, "transformers": peer, "unit": unit, "ratio": ratio}
        rows.append((name, unit, mine, peer, ratio))
        print(f"{name:<28} {unit:<10} ours {mine:>12,.1f}   transformers {peer:>12,.1f}   ratio {ratio:5.2f}x", flush=True)

    l_ours, l_theirs = losses(ours, theirs, args)
    if "train" not in skip:
        t_ours, t_theirs = timed([train_step_fn(l_ours, adamw(ours), x, y, args),
                                  train_step_fn(l_theirs, adamw(theirs), x, y, args)], args)
        record("train step (AdamW)", "tok/s", B * T / t_ours, B * T / t_theirs)
        peak = matmul_peak_flops(args)
        flops = train_flops_per_token(cfg, T) * B * T
        res["matmul_peak_tflops"] = peak / 1e12
        record("train MFU (AdamW)", "%", 100 * flops / t_ours / peak, 100 * flops / t_theirs / peak)
    if "muon" not in skip:  # each side's AdamW step again, in the same rounds: Muon's overhead is a ratio of neighbours
        t_ours_adamw, t_ours_muon, t_theirs_adamw, t_theirs_muon = timed(
            [train_step_fn(l_ours, adamw(ours), x, y, args), train_step_fn(l_ours, muon_setup(ours, FastMuon), x, y, args),
             train_step_fn(l_theirs, adamw(theirs), x, y, args),
             train_step_fn(l_theirs, muon_setup(theirs, torch.optim.Muon), x, y, args)], args)
        record("train step (Muon)", "tok/s", B * T / t_ours_muon, B * T / t_theirs_muon)
        res["muon_overhead_ours"] = t_ours_muon / t_ours_adamw - 1
        res["muon_overhead_transformers_torch_muon"] = t_theirs_muon / t_theirs_adamw - 1
        print(f"Muon's extra step time over AdamW's, interleaved: ours {100 * res['muon_overhead_ours']:.1f}%, "
              f"transformers + torch.optim.Muon {100 * res['muon_overhead_transformers_torch_muon']:.1f}%")
    if "forward" not in skip:
        t_ours, t_theirs = timed([forward_fn(ours, x, True, args), forward_fn(theirs, x, False, args)], args)
        record("forward", "tok/s", B * T / t_ours, B * T / t_theirs)
    def decode_row(name, m_ours, m_theirs, prompt, mask=None):
        """New tokens/s of both, and the bandwidth bound measured in the same rounds; then the same
        without the prompt: the prefill alone (one new token) is timed in those rounds too, and the
        other n - 1 tokens' rate is what the decoding steps reach by themselves."""
        n, B = args.decode_tokens, prompt.size(0)
        m_ours.eval(), m_theirs.eval()  # as generate asks
        t0 = time.perf_counter()
        weights = decode_matrices(m_ours, B)  # where the engine packs, the copy is made here
        repack_s = time.perf_counter() - t0
        per_step = sum(w.numel() * w.element_size() for w in weights)
        bound_fn = copy_fn(per_step, n, args.device) if gpu else gemv_fn(weights, B, n)
        t_ours, t_theirs, t_gemv, t_ours_1, t_theirs_1 = timed(
            [decode_fn(m_ours, prompt, n, True, args, mask), decode_fn(m_theirs, prompt, n, False, args, mask),
             bound_fn, decode_fn(m_ours, prompt, 1, True, args, mask),
             decode_fn(m_theirs, prompt, 1, False, args, mask)], args, warmup=1)
        record(name, "tok/s", B * n / t_ours, B * n / t_theirs)
        bound = B * n / t_gemv
        steps_ours, steps_theirs = B * (n - 1) / (t_ours - t_ours_1), B * (n - 1) / (t_theirs - t_theirs_1)
        res["results"][name].update(bound=bound, weight_bytes_per_step=per_step, gemv_gb_per_s=per_step * n / t_gemv / 1e9,
                                    repacked=should_pack(m_ours, B), repack_seconds=repack_s if should_pack(m_ours, B) else None,
                                    bound_from="device-to-device copy" if gpu else "the step's matrix-vector products",
                                    fraction_ours=B * n / t_ours / bound, fraction_transformers=B * n / t_theirs / bound,
                                    prefill_seconds_ours=t_ours_1, prefill_seconds_transformers=t_theirs_1,
                                    steps_ours=steps_ours, steps_transformers=steps_theirs,
                                    steps_fraction_ours=steps_ours / bound, steps_fraction_transformers=steps_theirs / bound)
        r = res["results"][name]
        print(f"{'':<28} bound {bound:,.1f} tok/s ({per_step / 1e6:,.0f} MB of weights per step at "
              f"{r['gemv_gb_per_s']:.1f} GB/s): ours {r['fraction_ours']:.2f} of it, transformers "
              f"{r['fraction_transformers']:.2f}", flush=True)
        print(f"{'':<28} without the prompt (its prefill: ours {1000 * t_ours_1:,.0f} ms, transformers "
              f"{1000 * t_theirs_1:,.0f} ms): ours {steps_ours:,.1f} tok/s, {r['steps_fraction_ours']:.2f} of the bound, "
              f"transformers {steps_theirs:,.1f}, {r['steps_fraction_transformers']:.2f}; {steps_ours / steps_theirs:.2f}x",
              flush=True)
        if r["repacked"]:
            print(f"{'':<28} ours reads the engine's packed weights, made once for the model in {1000 * repack_s:.0f} ms",
                  flush=True)

    if "decode" not in skip:
        for dtype in ["bfloat16"] if gpu else args.decode_dtypes.split(","):  # a GPU: generate.py's bf16 weights
            d = getattr(torch, dtype)
            m_ours, m_theirs = (ours, theirs) if d == torch.float32 else (copy.deepcopy(ours).to(d), copy.deepcopy(theirs).to(d))
            suffix = "" if d == torch.float32 else f", {dtype}"  # the float32 row keeps its old name
            decode_row(f"decode, batch 1, greedy{suffix}", m_ours, m_theirs, x[:1, :16])
            del m_ours, m_theirs
    if "batch-decode" not in skip:
        ids, mask = padded_prompts(cfg, 8, args.device)
        m_ours, m_theirs = (copy.deepcopy(ours).bfloat16(), copy.deepcopy(theirs).bfloat16()) if gpu else (ours, theirs)
        decode_row("decode, batch 8, padded prompts" + (", bfloat16" if gpu else ""), m_ours, m_theirs, ids, mask)
    if "memory" not in skip:
        record("train step peak memory", "MiB", peak_memory(args, True) / 2**20, peak_memory(args, False) / 2**20,
               higher_is_better=False)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return res


if __name__ == "__main__":
    main()
