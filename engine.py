"""
The engine: what qwen3.py computes, computed faster. Read qwen3.py first; nothing here changes what
the model computes, only how, and tests/ hold each path to the chapter's.

    1. FusedLoss         the training loss in fewer kernels (fused norms, RoPE from tables, experts'
                         tokens grouped in one sort) and without holding the logits where they cost more
                         than they save (chunk by chunk on a CPU, or where memory is short); on CUDA
                         its forward and backward replayed as CUDA graphs (cuda_graphed)
    2. StaticKVCache     generation's cache allocated once and written in place
    3. Engine            generation: one new token in few, fused operations, from weights laid out
                         for it; on CUDA a fixed-shape step replayed as a CUDA graph; float16's guard
    4. FastMuon          Muon's Newton-Schulz on the small Gram matrix, reusing its buffers, and
                         split across ranks under torch.distributed

Each is switched on by one explicit call: `FusedLoss(model)` and `cuda_graphed(loss, ...)` in train.py,
`Engine(model)` given to qwen3.generate / sampling.stream as their `decoder` in generate.py,
`configure_optimizers(..., muon=FastMuon)`.
Measurements behind the choices made here are in benchmarks/README.md.
"""

import warnings
from dataclasses import dataclass

import torch
import torch.distributed
import torch.nn as nn
import torch.nn.functional as F

from guards import check_finite
from qwen3 import (NS_COEFFICIENTS, KVCache, MoE, Muon, Qwen3, can_attend, next_token_probs, next_tokens, rope_cos_sin,
                   sample_next_token)


def rope_tables(config, length: int, device, dtype):
    """The chapter's cos and sin for positions 0..length-1, (length, head_dim), made once; sin with
    rotate_half's sign folded in, so that rotate_half(x) sin = roll(x, head_dim / 2) sin'."""
    cos, sin = rope_cos_sin(torch.arange(length, device=device), config.head_dim, config.rope_theta, dtype,
                            config.rope_scaling)
    half = config.head_dim // 2
    return cos, torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)  # the sign rotate_half puts on x2


# %% 1. The training loss, in fewer kernels and without the logits
# A training step of a small model is many small operations, and each costs a launch (on a GPU) or
# a dispatch (on a CPU) whatever its size. hidden_states computes the chapter's forward pass from
# fewer: F.rms_norm (one fused kernel on GPUs, forward and backward, for the chapter's five-op
# RMSNorm), RoPE from tables, and moe_forward, the routing slots sorted by expert once.
# Then the loss. The logits are only a stepping stone to it, yet at B*T rows by vocab columns in
# fp32 they are the step's largest tensor, and softmax, its backward and their gradients stream
# through that many bytes again and again. linear_cross_entropy takes the rows of h a chunk at a
# time: logits, loss and at once the loss's gradient, dlogits = (softmax - onehot) / n_kept, folded
# into grad_h = dlogits W and grad_W += dlogits^T h before the next chunk; backward only scales the
# two saved gradients (the idea of Liger Kernel's fused linear cross-entropy, Hsu et al. 2024, and of
# Cut Cross-Entropy, Wijmans et al. 2024). Chunks pay where memory is short or slow to touch (a CPU);
# a GPU takes the plain logits while they fit a memory budget: chunks launch many more kernels.
# Even so a small model's step on a GPU is a thousand kernels of microseconds, each launched by the
# CPU in more time than it runs: the GPU waits. cuda_graphed records the loss's forward and its
# backward once each as a CUDA graph, and every step replays them: two launches, not a thousand.


class LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, chunk_size, with_grad):
        # h (N, H), weight (vocab, H), targets (N,). The matmuls run in the dtype lm_head would use
        # (the autocast one under autocast), the softmax in fp32.
        device = h.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
        need_h, need_w = with_grad and ctx.needs_input_grad[0], with_grad and ctx.needs_input_grad[1]
        with torch.autocast(device, enabled=False):
            w = weight.to(dtype)
            kept = targets != -100
            n_kept = kept.sum()
            row_scale = kept / n_kept.clamp(min=1)  # dloss/dnll of each row: 1/n_kept, 0 if ignored
            targets = torch.where(kept, targets, 0)  # any valid index for ignored rows: their scale is 0
            grad_h = torch.empty_like(h) if need_h else None
            grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None  # fp32 sum over chunks
            nll_sum = torch.zeros((), dtype=torch.float32, device=h.device)
            # the chunks take turns in the same two buffers: on a CPU fresh memory costs a page
            # fault per 4 KB when first written, more than the softmax itself
            size = (min(chunk_size, h.size(0)), weight.size(0))
            logits_buf = torch.empty(size, dtype=dtype, device=h.device)
            probs_buf = torch.empty(size, dtype=torch.float32, device=h.device)
            for start in range(0, h.size(0), chunk_size):
                rows = slice(start, start + chunk_size)
                hc, t, scale = h[rows], targets[rows, None], row_scale[rows, None]  # (n, H), (n, 1), (n, 1)
                n = hc.size(0)
                logits = torch.mm(hc.to(dtype), w.T, out=logits_buf[:n]).float()  # (n, vocab), fp32
                probs = torch.softmax(logits, dim=-1, out=probs_buf[:n])
                # -log p_t = logsumexp - logit_t, and logsumexp = max logit - log p_max: exact even
                # where p_t underflows to 0, as p_max >= 1/vocab cannot (and cheaper than log_softmax)
                nll = logits.amax(-1, keepdim=True) - probs.amax(-1, keepdim=True).log() - logits.gather(1, t)
                nll_sum += torch.where(kept[rows, None], nll, 0.0).sum()
                if not (need_h or need_w):
                    continue
                # dloss/dlogits = scale (probs - onehot); the scale goes on the narrow (n, H) factors
                dlogits = probs.scatter_add_(1, t, torch.full_like(scale, -1.0)).to(dtype)
                if need_h:
                    grad_h[rows] = (dlogits @ w).float() * scale
                if need_w and dtype == torch.float32:
                    grad_w.addmm_(dlogits.mT, hc * scale)  # in place: no (vocab, H) temporary
                elif need_w:
                    grad_w += dlogits.mT @ (hc.float() * scale).to(dtype)
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype) if need_w else None)
        return nll_sum / n_kept  # nan if every target is ignored, as in torch

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        return (grad_h * grad_loss if grad_h is not None else None,
                grad_w * grad_loss if grad_w is not None else None, None, None, None)


def linear_cross_entropy(h, weight, targets, chunk_size: int = 256):
    """F.cross_entropy(h @ weight.T, targets, ignore_index=-100) for h (N, H), weight (vocab, H),
    targets (N,), holding chunk_size rows of logits at a time."""
    return LinearCrossEntropy.apply(h, weight, targets, chunk_size, torch.is_grad_enabled())


def moe_forward(moe: MoE, x):
    """The chapter's MoE.forward with the routing slots sorted by expert once (not scanned once per
    expert): each expert's tokens gathered into one contiguous group, its three products on that
    group, and every output scattered back in one index_add. No padding: a busy expert costs its
    own tokens, whatever the others received."""
    h = x.flatten(0, 1)  # (N, hidden)
    moe.router_logits, weights, chosen = moe.route(h)
    k, expert = chosen.size(1), chosen.flatten()  # (N k,): each routing slot's expert
    order = expert.argsort(stable=True)  # the slots, grouped by expert
    counts = torch.bincount(expert, minlength=moe.experts.gate_proj.size(0)).tolist()  # the groups' sizes
    groups = h[order // k].split(counts)  # each expert's tokens, (count, hidden)
    out = torch.cat([moe.experts(group, e) for e, group in enumerate(groups) if counts[e]])  # (N k, hidden)
    return torch.zeros_like(h).index_add_(0, order // k, out * weights.flatten()[order, None]).view_as(x)


# Devices whose fused attention kernel takes grouped-query heads beside a mask (a sliding window's).
# The CPU's does. On CUDA only flash attention takes grouped heads, and it takes no mask: sdpa would
# fall back to its unfused math path, all (T, T) scores in memory, so there the heads are repeated.
MASKED_GQA_DEVICES = {"cpu"}


def hidden_states(model: Qwen3, input_ids, rope):
    """The chapter's model.model(input_ids) for training (no cache, no padding), in fewer kernels:
    F.rms_norm, whose fused kernel (on GPUs) replaces the chapter's five-op RMSNorm forward and
    backward, and RoPE as x cos + roll(x) sin' from tables `rope` (engine.rope_tables). Norms of bf16
    activations under autocast run in fp32, as in the chapter (which rounds once more, to bf16)."""
    c, m = model.config, model.model
    B, T = input_ids.shape
    H, hd, eps, nh, nkv = c.hidden_size, c.head_dim, c.rms_norm_eps, c.num_attention_heads, c.num_key_value_heads
    cos, sin = (t[:T, None] for t in rope)  # (T, 1, hd): the same angles for every head
    p = c.dropout if model.training else 0.0
    masks = {}  # per sliding window: which keys each query sees, made once a pass
    x = m.embed_tokens(input_ids)  # (B, T, hidden)
    for layer in m.layers:
        a, mlp = layer.self_attn, layer.mlp
        h = F.rms_norm(x, (H,), layer.input_layernorm.weight, eps)
        q = F.rms_norm(a.q_proj(h).view(B, T, nh, hd).float(), (hd,), a.q_norm.weight, eps)  # (B, T, nh, hd)
        k = F.rms_norm(a.k_proj(h).view(B, T, nkv, hd).float(), (hd,), a.k_norm.weight, eps)  # (B, T, nkv, hd)
        q, k = (torch.addcmul(t * cos, t.roll(hd // 2, -1), sin) for t in (q, k))  # RoPE
        v = a.v_proj(h).view(B, T, nkv, hd)
        window = a.window if a.window is not None and a.window < T else None
        if window is not None and window not in masks:
            masks[window] = can_attend(*(torch.arange(T, device=x.device),) * 2, window)  # (T, T)
        mask = masks.get(window)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, hd)
        if mask is not None and nkv != nh and x.device.type not in MASKED_GQA_DEVICES:
            k, v = (t.repeat_interleave(nh // nkv, dim=1) for t in (k, v))  # (B, nh, T, hd): each query head's own
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=p,
                                           enable_gqa=k.size(1) != nh)  # (B, nh, T, hd)
        x = x + F.dropout(a.o_proj(y.transpose(1, 2).reshape(B, T, nh * hd)), p, model.training)
        h = F.rms_norm(x, (H,), layer.post_attention_layernorm.weight, eps)
        x = x + F.dropout(moe_forward(mlp, h) if isinstance(mlp, MoE) else mlp(h), p, model.training)
    return F.rms_norm(x, (H,), m.norm.weight, eps)


def chunk_rows(rows: int, vocab_size: int, budget: float | None) -> int | None:
    """Rows of logits per chunk for a batch of `rows`: 256 without a memory budget (a CPU), else
    None (the plain logits, all at once) while logits, their fp32 copy and its gradient fit the
    budget (bytes), and the most rows that fit when they do not."""
    if budget is None:
        return 256
    fit = int(budget) // (vocab_size * (2 + 4 + 4))
    return None if fit >= rows else max(1, fit)


class FusedLoss(nn.Module):
    """model(idx, targets)'s loss, computed in fewer kernels (hidden_states) and without holding all
    the logits where they cost more than they save: `loss = FusedLoss(model)(idx, targets)`, made
    once the model is on its device. Wrap it, not the model, in torch.compile and DDP. On a CPU,
    chunks of 256 rows (touching fresh memory is slow there); on a GPU the plain logits while they
    fit memory_fraction of its memory (one chunk of the fused loss launches as many kernels, and
    more chunks many more), else chunks as large as fit (chunk_rows)."""

    def __init__(self, model: Qwen3, memory_fraction: float = 0.125):
        super().__init__()
        self.model, device = model, model.lm_head.weight.device
        total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else 16 * 2**30
        self.budget = None if device.type == "cpu" else memory_fraction * total
        self.rope = {}  # (length, device) -> RoPE tables, made once

    def forward(self, input_ids, targets):
        key = (input_ids.size(1), input_ids.device)
        if key not in self.rope:
            self.rope[key] = rope_tables(self.model.config, *key, dtype=torch.float32)
        h = hidden_states(self.model, input_ids, self.rope[key])  # (B, T, hidden)
        chunk = chunk_rows(targets.numel(), self.model.config.vocab_size, self.budget)
        if chunk is None:  # as the chapter's Qwen3.forward
            loss = F.cross_entropy(self.model.lm_head(h).flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
        else:
            loss = linear_cross_entropy(h.flatten(0, 1), self.model.lm_head.weight, targets.flatten(), chunk)
        return loss + self.model.aux_loss()  # a mixture of experts' load balancing, if on


def graphable(model: Qwen3) -> bool:
    """Whether the training pass can be a CUDA graph: dense (moe_forward sizes its groups on the host)."""
    return not any(isinstance(layer.mlp, MoE) for layer in model.model.layers)


def cuda_graphed(loss: FusedLoss, batch_size: int, seq_len: int, autocast_dtype=None) -> FusedLoss | None:
    """loss, its forward and backward each recorded once as a CUDA graph and replayed at every call
    (torch.cuda.make_graphed_callables, after three warm-up passes that change no weight), for
    batches of (batch_size, seq_len) under autocast to autocast_dtype (None: none). Gradients arrive
    in .grad as views of the graph's memory, which the next backward overwrites: one backward per
    optimizer step (no accumulation), then zero_grad(set_to_none=True). A graph cannot wait for
    the host, so a mixture of experts (it reads its groups' sizes) is refused. Returns loss itself,
    its forward now replaying the graphs; None if recording failed (with a warning; loss as it was)."""
    if not graphable(loss.model):
        raise ValueError("a mixture of experts reads its groups' sizes back from the GPU: no CUDA graph")
    ids = torch.zeros(batch_size, seq_len, dtype=torch.long, device=loss.model.lm_head.weight.device)
    try:  # autocast's cache of cast weights would outlive the recording: graphs refuse it
        with torch.autocast("cuda", autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None,
                            cache_enabled=False):
            return torch.cuda.make_graphed_callables(loss, (ids, ids.clone()))
    except Exception as e:  # noqa: BLE001  the eager loss computes the same, only slower
        warnings.warn(f"CUDA graphs off, recording failed: {type(e).__name__}: {e}", RuntimeWarning, stacklevel=2)
        return None


# %% 2. A preallocated KV cache
# The chapter's cache grows by torch.cat: every new token copies the whole past of every layer.
# This one allocates each layer's keys and values once, for the whole generation, and writes in
# place; update returns a view of the filled part, the keys KVCache would return. Its storage never
# moves: a CUDA graph can replay a step that reads and writes it. The buffers start at zero, since
# a step of fixed shape attends over all of them, the unwritten part masked (0 x NaN would be NaN).


class StaticKVCache(KVCache):
    """KVCache's contract on storage for max_len tokens of batch_size rows.
    keys[i] and values[i] are the whole buffers (B, n_kv, max_len, hd)."""

    def __init__(self, model: Qwen3, batch_size: int, max_len: int):
        super().__init__(model.config)
        c, w = model.config, model.lm_head.weight
        shape = (batch_size, c.num_key_value_heads, max_len, c.head_dim)
        self.keys = [torch.zeros(shape, dtype=w.dtype, device=w.device) for _ in self.windows]
        self.values = [torch.zeros(shape, dtype=w.dtype, device=w.device) for _ in self.windows]

    def update(self, layer: int, k, v):
        start, end = self.seen_tokens, self.seen_tokens + k.size(2)
        if end > self.keys[layer].size(2):
            raise ValueError(f"the cache holds {self.keys[layer].size(2)} tokens, not {end}")
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        S = self.kept(layer, start) + k.size(2)  # as many keys as KVCache returns
        return self.keys[layer][:, :, end - S:end], self.values[layer][:, :, end - S:end]


# %% 3. Generation, one token at a time in few operations
# A decoding step does little arithmetic per weight but many small operations: the chapter's
# forward pass launches ~60 per layer (an RMSNorm alone is seven), and each costs dispatch time
# whatever its size (on a CPU, a thread wake-up too; on a GPU, a kernel launch). For one new token
# per row this step computes the same from fewer, fused ones: F.rms_norm; one product for q, k and v
# and one for gate and up where their weights are fused; QK-norm and RoPE on all heads at once,
# RoPE from cos/sin tables built once, rotate_half's sign folded into sin (rotate_half(x) sin =
# roll(x) sin'); the residual stream updated in place. Grouped-query attention with one query per
# row is plain attention with the group's query heads as that many queries of one key head: no
# enable_gqa, which CUDA's fused kernels refuse beside a mask (the step's fixed shape always has one).
#
# How the weights are read. One vector through a matrix is all memory traffic, and PyTorch's CPU
# product of one vector with a whole matrix leaves bandwidth unused; cut into one column block per
# thread and multiplied by torch.bmm, each thread streaming its own block, the same bytes go faster.
# So on a CPU every float32 matrix is read as k = threads column blocks of its (in, out) transpose,
# (k, in, out / k); of nn.Linear's (out, in) weight that is a view, free. Small models at batch 1
# read a packed copy instead, contiguous blocks with q/k/v side by side as one matrix and gate/up as
# another (two products fewer a layer), like the weight repacking of CPU inference engines; it costs
# the matrices' memory again, so only where that is small. float16 on a CPU, and GPUs, read one
# block: a plain product (on a GPU from fused copies: fewer kernels).
#
# On CUDA the step's hundreds of kernels are launched by the CPU one by one, and launching, not
# computing, is what a step costs. So there the step has fixed shapes (it attends over the whole
# cache with a mask; its position is a tensor on the device), which lets one CUDA graph record its
# kernels once and replay them per token with no work on the CPU (gpt-fast's approach).
# The prompt itself goes through the chapter's forward pass, filling the same cache.
#
# float16 halves the bytes a step reads, and x86 CPUs with F16C convert it fast. But Qwen3 was
# trained in bfloat16, whose range float16 lacks (to 65504): an activation may overflow to inf and
# a norm over it gives NaN. The engine checks every float16 step's hidden states; on an overflow it
# converts the model to float32 (with a warning), recomputes the sequence so far and goes on, so
# every token from then on is float32's.


class Float16Overflow(FloatingPointError):
    """A float16 forward pass produced inf or NaN (a value beyond float16's +-65504)."""


def check_float16(x):
    if x.dtype == torch.float16 and not torch.isfinite(x).all():
        raise Float16Overflow("float16 overflowed (inf or NaN in the hidden states)")


@dataclass(slots=True)
class DecodeLayer:
    """One block's weights as the step reads them. Each matrix is held as k column blocks of its
    (in, out) transpose, (k, in, out / k), multiplied by project; qkv and gate_up are one fused
    matrix, or a tuple of views of the module weights."""
    input_norm: torch.Tensor  # (hidden,)
    qkv: torch.Tensor | tuple  # (hidden, (n_head + 2 n_kv) hd) in blocks: q, k and v side by side
    qkv_bias: torch.Tensor | None  # ((n_head + 2 n_kv) hd,), with attention_bias
    qk_gain: torch.Tensor  # (n_head + n_kv, hd): q_norm's gain for every query head, k_norm's for every key head
    o: torch.Tensor  # (n_head hd, hidden) in blocks
    o_bias: torch.Tensor | None
    post_norm: torch.Tensor  # (hidden,)
    gate_up: torch.Tensor | tuple | None  # (hidden, 2 intermediate) in blocks: gate and up side by side
    down: torch.Tensor | None  # (intermediate, hidden) in blocks
    moe: MoE | None  # a sparse layer's router and experts, in place of gate_up and down
    window: int | None


@dataclass(slots=True)
class DecodeWeights:
    layers: list[DecodeLayer]
    head: torch.Tensor  # (hidden, vocab) in blocks
    packed: bool  # a copy of the model's matrices, not views of them

    def matrices(self) -> list:
        """Every matrix in the order a step reads them (a tuple's one by one): for benchmarks."""
        ms = [m for layer in self.layers for m in (layer.qkv, layer.o, layer.gate_up, layer.down)] + [self.head]
        return [p for m in ms if m is not None for p in (m if isinstance(m, tuple) else (m,))]  # (experts: per token)


def project(h, w, bias=None):
    """h (B, in) times the matrix held as column blocks w (k, in, out / k), or a tuple of such
    matrices side by side (their outputs concatenated): (B, out)."""
    if isinstance(w, tuple):
        y = torch.cat([project(h, m) for m in w], dim=-1)
    elif w.size(0) == 1:
        y = h @ w[0]  # one block: a plain product (a batched product of one is slower in float16)
    else:  # one product per block, (k, B, out / k), then the blocks side by side (a view when B = 1)
        y = torch.bmm(h.expand(w.size(0), *h.shape), w).transpose(0, 1).reshape(h.size(0), -1)
    return y if bias is None else y.add_(bias)


def project_add_(x, h, w, bias=None):
    """x += project(h, w, bias), in place: (B, out). With one block, x + h W is one product whose
    result lands on x (the product adds x itself: one kernel, no temporary)."""
    if isinstance(w, tuple) or w.size(0) > 1:
        return x.add_(project(h, w, bias))
    x.addmm_(h, w[0])
    return x if bias is None else x.add_(bias)


def block_count(w) -> int:
    """How many column blocks each matrix of a model with weights like w is read in: one per
    thread for float32 on a CPU, else 1."""
    return torch.get_num_threads() if w.device.type == "cpu" and w.dtype == torch.float32 else 1


def should_pack(model: Qwen3, rows: int) -> bool:
    """Whether decoding `rows` sequences reads a packed copy of the weights rather than views: on a
    GPU always (fused matrices, fewer kernels); on a CPU for one float32 row while a step's matrices
    fit in 256 MB (the copy doubles them; it streams slower than views at more rows)."""
    w = model.lm_head.weight
    if w.device.type == "cuda":
        return True
    matrices = [p for p in model.model.layers.parameters() if p.dim() == 2] + [w]  # what a step reads
    small = sum(p.numel() * p.element_size() for p in matrices) <= 256 * 2**20
    return rows == 1 and w.dtype == torch.float32 and w.device.type == "cpu" and small


@torch.no_grad()
def decode_weights(model: Qwen3, k: int, pack: bool) -> DecodeWeights:
    """The model's weights as the step reads them, each matrix in k column blocks (fewer where k does
    not divide its width): copies with q/k/v and gate/up fused if pack, else views."""
    def blocks(w):  # nn.Linear's (out, in) weight as (k, in, out / k): a view, or a contiguous copy
        n = k if w.size(0) % k == 0 else 1
        v = w.view(n, w.size(0) // n, w.size(1)).transpose(1, 2)  # block b: rows b out / n onwards, transposed
        return v.contiguous() if pack and n > 1 else v  # one block stays in nn.Linear's layout

    def side_by_side(*ws):  # (out_i, in) weights as one matrix of all the outputs, or a tuple of them
        return blocks(torch.cat(ws)) if pack else tuple(blocks(w) for w in ws)

    layers = []
    for layer in model.model.layers:
        a, mlp = layer.self_attn, layer.mlp
        qkv = (a.q_proj, a.k_proj, a.v_proj)
        layers.append(DecodeLayer(
            input_norm=layer.input_layernorm.weight, qkv=side_by_side(*(p.weight for p in qkv)),
            qkv_bias=torch.cat([p.bias for p in qkv]) if a.q_proj.bias is not None else None,
            qk_gain=torch.cat([a.q_norm.weight.expand(a.n_head, -1), a.k_norm.weight.expand(a.n_kv_head, -1)]),
            o=blocks(a.o_proj.weight), o_bias=a.o_proj.bias, post_norm=layer.post_attention_layernorm.weight,
            gate_up=None if isinstance(mlp, MoE) else side_by_side(mlp.gate_proj.weight, mlp.up_proj.weight),
            down=None if isinstance(mlp, MoE) else blocks(mlp.down_proj.weight),
            moe=mlp if isinstance(mlp, MoE) else None, window=a.window))
    return DecodeWeights(layers, blocks(model.lm_head.weight), pack)


def experts_step(moe: MoE, h):
    """A sparse layer for one token per row, h (B, hidden): each row's k experts gathered from the
    stacks by the router's choice (on the device: a CUDA graph replays it), their outputs weighted
    and summed. (B, hidden)."""
    _, weights, chosen = moe.route(h)  # (B, k)
    B, k, w, e = h.size(0), chosen.size(1), moe.experts, chosen.flatten()
    rows = h.repeat_interleave(k, dim=0)[:, None]  # (B k, 1, hidden)
    a = F.silu(torch.bmm(rows, w.gate_proj[e].mT)) * torch.bmm(rows, w.up_proj[e].mT)  # (B k, 1, I)
    return (torch.bmm(a, w.down_proj[e].mT).view(B, k, -1) * weights[..., None]).sum(1)


class Generation:
    """One generation's state on the engine's side: the static cache, its RoPE tables, the prompt's
    padding and, for the fixed-shape step, the position as a tensor on the device."""

    def __init__(self, model: Qwen3, batch_size: int, max_len: int):
        self.cache = StaticKVCache(model, batch_size, max_len)
        w = model.lm_head.weight
        self.rope = rope_tables(model.config, max_len, w.device, w.dtype)
        self.pad = torch.zeros(batch_size, dtype=torch.long, device=w.device)  # (B,) filled at each prefill
        self.slot = torch.zeros((), dtype=torch.long, device=w.device)  # the next token's cache slot
        self.token = torch.zeros(batch_size, 1, dtype=torch.long, device=w.device)  # the step's input
        self.graph = self.logits = None  # a CUDA graph of the step, and the tensor it writes

    def prefill(self, model: Qwen3, idx, attention_mask=None):
        """The prompt (B, T) through the chapter's forward pass into the (emptied) cache: the last
        position's hidden states (B, hidden)."""
        self.cache.seen_tokens, self.cache.pad = 0, None
        h = model.model(idx, self.cache, attention_mask)[:, -1]
        self.pad.copy_(self.cache.pad if self.cache.pad is not None else torch.zeros_like(self.pad))
        self.slot.fill_(self.cache.seen_tokens)
        return h


@torch.no_grad()
def decode_step(model: Qwen3, w: DecodeWeights, token, gen: Generation, fixed: bool):
    """The chapter's model(token, cache)[0][:, -1] for one new token per row, token (B, 1), on a
    filled cache: (B, vocab). fixed: attend over the whole cache, the slot a device tensor (for CUDA
    graphs); else over its filled part, as the chapter does."""
    c, m, cache = model.config, model.model, gen.cache
    B, H, hd, eps = token.size(0), c.hidden_size, c.head_dim, c.rms_norm_eps
    nh, nkv = c.num_attention_heads, c.num_key_value_heads
    slot = gen.slot if fixed else torch.tensor(cache.seen_tokens, device=token.device)  # () cache slot
    position = slot - gen.pad  # (B,): each row counts its own tokens (the chapter's section 7)
    cos, sin = (t[position].view(B, 1, hd) for t in gen.rope)  # (B, 1, hd), broadcast over heads
    padded = fixed or cache.pad is not None
    keys_at = torch.arange(cache.keys[0].size(2), device=token.device)  # every slot of the cache
    masks = {}  # per window: which slots each row's new query sees, (B, 1, 1, S): 0, else -inf
    x = m.embed_tokens(token[:, 0])  # (B, hidden)
    for i, lw in enumerate(w.layers):
        h = F.rms_norm(x, (H,), lw.input_norm, eps)
        qkv = project(h, lw.qkv, lw.qkv_bias)  # (B, (nh + 2 nkv) hd)
        qk = F.rms_norm(qkv[:, :(nh + nkv) * hd].view(B, nh + nkv, hd), (hd,), None, eps) * lw.qk_gain  # QK-norm
        qk = torch.addcmul(qk * cos, qk.roll(hd // 2, -1), sin)  # apply_rope, every query and key head at once
        q = qk[:, :nh].view(B, nkv, nh // nkv, hd)  # each key head's group of query heads, as queries of one position
        k, v = qk[:, nh:, None], qkv[:, (nh + nkv) * hd:].view(B, nkv, 1, hd)  # (B, nkv, 1, hd)
        if fixed:  # written at the slot on the device; attend over all slots, the others masked
            cache.keys[i].index_copy_(2, slot.view(1), k)
            cache.values[i].index_copy_(2, slot.view(1), v)
            k, v, key_slots = cache.keys[i], cache.values[i], keys_at
        else:
            k, v = cache.update(i, k, v)  # (B, nkv, S, hd): the filled part
            key_slots = keys_at[cache.seen_tokens + 1 - k.size(2):cache.seen_tokens + 1]
        mask = None  # all S keys visible: no mask, unless rows are padded or the shape is fixed
        if padded:
            if (lw.window, k.size(2)) not in masks:  # made once a step, as the additive mask sdpa makes of a bool one
                seen = can_attend(position[:, None], key_slots - gen.pad[:, None], lw.window)[:, None]  # (B, 1, 1, S)
                masks[lw.window, k.size(2)] = torch.zeros(seen.shape, dtype=q.dtype, device=q.device).masked_fill_(
                    ~seen, float("-inf"))
            mask = masks[lw.window, k.size(2)]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, nkv, nh / nkv, hd)
        project_add_(x, y.view(B, nh * hd), lw.o, lw.o_bias)  # (B, nkv, nh / nkv, hd) is (B, nh hd) in memory
        h = F.rms_norm(x, (H,), lw.post_norm, eps)
        if lw.moe is not None:
            x += experts_step(lw.moe, h)
        else:
            gate, up = project(h, lw.gate_up).chunk(2, dim=-1)
            project_add_(x, F.silu(gate).mul_(up), lw.down)
    if fixed:
        gen.slot += 1
    else:
        cache.seen_tokens += 1
    return project(F.rms_norm(x, (H,), m.norm.weight, eps), w.head)  # (B, vocab)


class Engine:
    """Generation for one model, faster: give it as the decoder to qwen3.generate or sampling.stream,
    `generate(model, idx, n, decoder=Engine(model))`, for the chapter's tokens. It reads the weights
    when it first needs them (a packed copy, or views): after changing them, make a new engine.
    mode: "auto" (a CUDA graph on CUDA, else "filled", or "fixed" to compile), "filled" (the step over the cache's filled
    part), "fixed" (the graph's fixed-shape step, run eagerly) or "graph". compile: the fixed-shape
    step through torch.compile first (its elementwise chains fused into fewer kernels; minutes to
    compile a large model, so only where many tokens pay it back)."""

    def __init__(self, model: Qwen3, mode: str = "auto", compile: bool = False):
        if mode == "auto":
            mode = "graph" if model.lm_head.weight.device.type == "cuda" else "fixed" if compile else "filled"
        if mode not in ("filled", "fixed", "graph") or (compile and mode == "filled"):
            raise ValueError(f"unknown engine mode {mode!r}, or compile without a fixed shape; choose auto, "
                             f"filled, fixed or graph")
        self.model, self.mode = model, mode
        self.decode_step = torch.compile(decode_step, dynamic=False) if compile else decode_step
        self.weights = {}  # packed or not -> DecodeWeights, made at first use
        self.last = None  # graph mode: the last generation, whose graph a generation of its shape replays

    def weights_for(self, rows: int) -> DecodeWeights:
        pack = should_pack(self.model, rows)
        if pack not in self.weights:
            self.weights[pack] = decode_weights(self.model, block_count(self.model.lm_head.weight), pack)
        return self.weights[pack]

    @torch.no_grad()
    def __call__(self, model: Qwen3, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, generator=None,
                 attention_mask=None, with_probs=False):
        """qwen3.next_tokens' contract: yields next tokens (B,) and, with_probs, their distributions."""
        if model is not self.model:
            raise ValueError("this engine was made for another model")
        if model.training:  # dropout: only the chapter's forward pass has it
            yield from next_tokens(model, idx, max_new_tokens, temperature, top_k, top_p, generator,
                                   attention_mask, with_probs)
            return
        fed, length, gen, x = [idx], idx.size(1) + max_new_tokens, None, None  # gen, x: from the prompt's pass, each token
        for i in range(max_new_tokens):
            try:
                if i == 0:
                    gen, logits = self.prefill(idx, attention_mask, length)
                else:
                    logits = self.step(gen, x)
                check_float16(logits)
            except Float16Overflow as e:  # redo everything so far in float32, and go on so
                warnings.warn(f"{e}; the model now runs in float32", RuntimeWarning, stacklevel=3)
                model.float()
                self.weights.clear()
                self.last = None
                seq = torch.cat(fed, dim=1)
                mask = None if attention_mask is None else F.pad(attention_mask, (0, seq.size(1) - idx.size(1)), value=1)
                gen, logits = self.prefill(seq, mask, length)
            if i == 0:
                check_finite(logits)  # once a generation: broken weights show here; a step waits for nothing
            probs = next_token_probs(logits, temperature, top_k, top_p) if with_probs else None
            x = sample_next_token(logits, temperature, top_k, top_p, generator, probs)[:, None]  # (B, 1)
            fed.append(x)
            yield x[:, 0], probs

    def prefill(self, idx, attention_mask, length):
        """The prompt (B, T) through the chapter's forward pass into a fresh cache: (the generation,
        the last position's logits (B, vocab))."""
        B = idx.size(0)
        if self.mode == "graph":  # cache and graph sized in steps of 256, to be replayed by the next of that size
            length = -(-length // 256) * 256
            if self.last is None or self.last.cache.keys[0].shape[::2] != (B, length):
                self.last = Generation(self.model, B, length)
            gen = self.last
        else:
            gen = Generation(self.model, B, length)
        return gen, project(gen.prefill(self.model, idx, attention_mask), self.weights_for(B).head)

    def step(self, gen: Generation, x):
        """The logits (B, vocab) after one new token per row, x (B, 1)."""
        w = self.weights_for(x.size(0))
        if self.mode == "filled":
            return decode_step(self.model, w, x, gen, fixed=False)
        gen.token.copy_(x)
        if self.mode == "fixed":
            return self.decode_step(self.model, w, gen.token, gen, fixed=True)
        if gen.graph is None:  # its first step runs eagerly on a side stream (as CUDA asks), then is recorded
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                logits = self.decode_step(self.model, w, gen.token, gen, fixed=True)
            torch.cuda.current_stream().wait_stream(side)
            gen.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(gen.graph):  # recorded, not run: the slot stays where the eager step left it
                gen.logits = self.decode_step(self.model, w, gen.token, gen, fixed=True)
            return logits
        gen.graph.replay()
        return gen.logits  # overwritten by the next replay: sampled before it


# %% 4. Muon, faster
# Newton-Schulz on the Gram matrix. Each step of the chapter's iteration multiplies the whole
# (rows, cols) matrix twice: A = X X^T and h(A) X, with h(A) = a I + b A + c A^2. But every iterate
# is a polynomial in A_0 = X_0 X_0^T times X_0: X_k = Q_k X_0, and the Gram matrices follow without
# X at all, A_{k+1} = h(A_k) A_k h(A_k). So iterate on (rows, rows) matrices, Q_{k+1} = h(A_k) Q_k,
# and touch X twice in all. Per matrix, in units of rows^3 multiply-adds, five steps cost
# 10 (cols/rows) + 5 the chapter's way and 2 (cols/rows) + 17 this way: equal at cols = 1.5 rows,
# so it is taken from 2 on. The same X up to rounding in fp32 (tests hold both to an fp64 run). In
# half precision the Gram form drifts (spurious negative eigenvalues) unless restarted, as the
# authors of "Gram Newton-Schulz" found (Amsel, Chen, Dao et al. 2026), so bf16 keeps the loop,
# its steps taking turns in the same few buffers (fresh memory costs a page fault per 4 KB on a CPU).
# Under torch.distributed every rank holds the same all-reduced gradients, so each orthogonalises
# only its share of a stack of same-shape matrices, and the shares are all-gathered: the cost is
# split across ranks, not repeated on each.


def gram_newton_schulz(X, steps: int, coefficients):
    """The chapter's Newton-Schulz iterate for X (n, rows, cols), normalised and wide: Q X."""
    a, b, c = coefficients
    A, Q = X @ X.mT, None  # (n, rows, rows)
    for i in range(steps):
        h = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b A + c A^2
        h.diagonal(dim1=-2, dim2=-1).add_(a)  # + a I: h(A), this step's polynomial
        Q = h if Q is None else h @ Q  # X_{i+1} = h(A_i) X_i = (h(A_i) Q_i) X_0
        if i < steps - 1:
            A = h @ (A @ h)  # X_{i+1} X_{i+1}^T = h A_i h
    return Q @ X


def newton_schulz(G, steps: int = 5, dtype=torch.bfloat16, eps: float = 1e-7):
    """qwen3.zeropower_via_newtonschulz, with fewer FLOPs and allocations."""
    a, b, c = NS_COEFFICIENTS
    X = G.to(dtype).reshape(-1, *G.shape[-2:])  # (n, rows, cols)
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT
    X = X / X.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    if dtype == torch.float32 and X.size(-1) >= 2 * X.size(-2):
        X = gram_newton_schulz(X, steps, NS_COEFFICIENTS)
    else:
        A = X.new_empty(X.size(0), X.size(1), X.size(1))  # (n, rows, rows)
        B, out = torch.empty_like(A), [X.new_empty(X.shape), X.new_empty(X.shape)]
        for i in range(steps):
            torch.bmm(X, X.mT, out=A)  # A = X X^T
            torch.baddbmm(A, A, A, beta=b, alpha=c, out=B)  # b A + c A^2, one fused op
            X = torch.baddbmm(X, B, X, beta=a, out=out[i % 2])  # a X + B X
    return (X.mT if tall else X).reshape(G.shape)


class FastMuon(Muon):
    """qwen3.Muon, orthogonalising with newton_schulz, split across ranks under torch.distributed."""

    def orthogonalize(self, updates, steps: int, dtype):
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return newton_schulz(updates, steps, dtype)
        stack = updates.reshape(-1, *updates.shape[-2:])  # (n, rows, cols): every matrix, each expert's too
        world, rank, n = torch.distributed.get_world_size(), torch.distributed.get_rank(), stack.size(0)
        per_rank = -(-n // world)
        padded = F.pad(stack, (0, 0, 0, 0, 0, per_rank * world - n))  # (world * per_rank, rows, cols)
        mine = newton_schulz(padded[rank * per_rank:(rank + 1) * per_rank], steps, dtype)
        gathered = [torch.empty_like(mine) for _ in range(world)]
        torch.distributed.all_gather(gathered, mine.contiguous())
        return torch.cat(gathered)[:n].view_as(updates)
