"""
Qwen3, from scratch, in one file.

Read it top to bottom: each `# %%` section is one idea, opens with why it exists and where it
comes from, and the sections build on each other:

    1. Configuration           every number that defines a Qwen3
    2. RMSNorm                 the normalisation used everywhere
    3. RoPE                    how attention knows where a token is (YaRN: past the trained length)
    4. Attention               grouped-query attention with QK-norm and an optional sliding window
    5. SwiGLU MLP              the feed-forward half of a block
    6. The model               blocks stacked into Qwen3, logits and loss; left-padded batches
    7. KV cache                incremental decoding without recomputing the past
    8. Sampling                temperature, top-k, top-p, generate (prompts of different lengths too)
    9. Checkpoints             Hugging Face format in and out (config.json + safetensors)
   10. Optimizers              Muon for hidden matrices, AdamW for the rest
    Appendix: making it fast   the same computations, faster, proven equal to the sections above
     A1. Linear + cross-entropy  the training loss without the logits, chunk by chunk
     A2. Preallocated KV cache   generation's cache, written in place instead of concatenated
     A3. float16 decoding        half the bytes per token, with an overflow guard
     A4. One new token           a decoding step in fewer, fused operations; matrices in blocks
     A5. Gram Newton-Schulz      Muon's iteration on the small Gram matrix, for wide matrices

The model is a spec as much as a program: given the same weights, its logits match Hugging Face
`transformers`' `Qwen3ForCausalLM` (tests/test_qwen3.py proves it), and module names mirror its
state-dict keys, so real Qwen3 checkpoints load with `strict=True` and no mapping table.

Reference: Qwen Team, "Qwen3 Technical Report", 2025 (arXiv:2505.09388).
"""

import json
import math
import warnings
import weakref
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.distributed
import torch.nn as nn
import torch.nn.functional as F

# %% 1. Configuration
# A Qwen3 is fully described by a handful of integers. Field names are exactly those of
# transformers' `Qwen3Config`, so a `config.json` from the hub reads straight into this class
# (the translation, with its few wrinkles, is in section 9, beside the checkpoints that use it).
# Two facts surprise newcomers: `head_dim` is its own field (Qwen3-0.6B has 16 heads x 128 = 2048,
# not its hidden size 1024), and there are fewer key/value heads than query heads (section 4).


@dataclass
class Qwen3Config:
    vocab_size: int = 49152  # rows of the embedding table (and of the output head)
    hidden_size: int = 384  # width of the residual stream, "d_model"
    intermediate_size: int = 1536  # width of the MLP's hidden layer, "d_ff"
    num_hidden_layers: int = 6  # number of transformer blocks
    num_attention_heads: int = 8  # query heads
    num_key_value_heads: int = 4  # key/value heads, shared by groups of query heads (GQA)
    head_dim: int = 48  # width of one head; independent of hidden_size in Qwen3
    max_position_embeddings: int = 512  # longest context the model is meant to see
    rope_theta: float = 10_000.0  # RoPE base; real Qwen3 uses 1e6 for long contexts
    rope_scaling: dict | None = None  # YaRN's parameters, to read past the trained context (section 3); None: none
    rms_norm_eps: float = 1e-6  # keeps RMSNorm finite for all-zero inputs
    tie_word_embeddings: bool = True  # the output head reuses the embedding matrix
    attention_bias: bool = False  # bias on q/k/v/o projections (Qwen3: none)
    dropout: float = 0.0  # on attention probabilities and residual branches, training only
    use_sliding_window: bool = False  # master switch for sliding-window attention
    sliding_window: int | None = 4096  # W: a query sees the W most recent keys, itself included
    max_window_layers: int = 28  # layers i >= this use the window (transformers' rule)
    layer_types: list[str] | None = None  # explicit "full_attention"/"sliding_attention" per layer
    initializer_range: float = 0.02  # std of the random initial weights
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple "
                             f"of num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.use_sliding_window and not (isinstance(self.sliding_window, int) and self.sliding_window >= 1):
            raise ValueError(f"sliding_window must be a positive integer, got {self.sliding_window!r}")
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_hidden_layers:
                raise ValueError(f"layer_types has {len(self.layer_types)} entries for "
                                 f"{self.num_hidden_layers} layers")
            unknown = set(self.layer_types) - {"full_attention", "sliding_attention"}
            if unknown:
                raise ValueError(f"unknown layer type(s) {sorted(unknown)}")
        if self.rope_scaling is not None:  # checked, and completed with the defaults, once
            self.rope_scaling = yarn_parameters(self.rope_scaling, self.max_position_embeddings)

    def layer_window(self, i: int) -> int | None:
        """The sliding window of layer i, or None if it attends to the whole past."""
        if not self.use_sliding_window:
            return None  # the master switch is off: every layer attends to the whole past
        if self.layer_types is not None:
            return self.sliding_window if self.layer_types[i] == "sliding_attention" else None
        return self.sliding_window if i >= self.max_window_layers else None

    @classmethod
    def preset(cls, name: str, **overrides) -> "Qwen3Config":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


PRESETS = {
    # The upstream "seed" model: small enough for one GPU in minutes, big enough to write English.
    "seed": dict(vocab_size=49152, hidden_size=384, intermediate_size=1536, num_hidden_layers=6,
                 num_attention_heads=8, num_key_value_heads=4, head_dim=48, max_position_embeddings=512),
    # A model that learns as much as it can on a laptop CPU in ten minutes. At ~3e13 FLOPs that is
    # a small model shown many tokens (Hoffmann et al. 2022, "Chinchilla"): hidden 128 went further
    # in the same minutes than 192 and 256, and at 256 an untied head beat a tied one (README,
    # "what we tried"). Its vocab_size only applies to a model built directly from the preset:
    # train.py always sizes the vocabulary to its tokenizer (a 4096-token BPE by default on CPU).
    "cpu": dict(vocab_size=8192, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
                tie_word_embeddings=False),
    # The real Qwen3-0.6B shape (Qwen/Qwen3-0.6B config.json).
    "qwen3-0.6b": dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                       max_position_embeddings=40960, rope_theta=1_000_000.0, tie_word_embeddings=True,
                       bos_token_id=151643, eos_token_id=151645),
}

# %% 2. RMSNorm
# Zhang & Sennrich 2019, "Root Mean Square Layer Normalization". LayerNorm without the mean:
# rescale each vector to unit root-mean-square, then multiply by a learned gain. Cheaper than
# LayerNorm and just as stable. The statistic is taken in fp32 even when activations are bf16,
# because a sum of squares over thousands of bf16 numbers loses most of its digits.


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)  # back to the input dtype, then the gain (transformers' order)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))  # starts as the identity
        self.eps = eps

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


# %% 3. RoPE: rotary position embeddings
# Su et al. 2021, "RoFormer". Attention by itself is blind to order. RoPE rotates each query and
# key by an angle proportional to its position, pair of dimensions by pair, each pair at its own
# frequency theta^(-2i/d). A dot product of two rotated vectors then depends only on their
# *offset*, so the model learns relative positions for free and no position table is stored.
# Qwen3 pairs dimension i with i + d/2 ("rotate half"), not neighbours. Angles are computed in
# fp32 from the integer positions every time: bf16 keeps 8 significant bits, so at position 1000
# an angle rounded to bf16 could be off by up to 2 radians.


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype=torch.float32, rope_scaling=None):
    """cos and sin of every rotation angle, (..., head_dim), for integer positions of any shape (...,).
    rope_scaling: None for plain RoPE, or YaRN's parameters (below) as yarn_parameters completes them."""
    powers = theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=positions.device) / head_dim)
    inv_freq, scale = 1.0 / powers, 1.0  # (head_dim/2,): pair i turns theta^(-2i/d) radians per position
    if rope_scaling is not None:  # YaRN: each pair between its own frequency and 1/factor of it
        keep = yarn_keep(head_dim, theta, rope_scaling).to(positions.device)
        inv_freq = inv_freq * keep + 1.0 / (rope_scaling["factor"] * powers) * (1 - keep)
        scale = rope_scaling["attention_factor"]
    angles = positions.float()[..., None] * inv_freq  # (..., head_dim/2), fp32
    angles = torch.cat((angles, angles), dim=-1)  # (..., head_dim): pair i and i + d/2 share an angle
    return (angles.cos() * scale).to(dtype), (angles.sin() * scale).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, n_head, T, head_dim) by the angles of its positions."""
    x1, x2 = x.chunk(2, dim=-1)  # each (B, n_head, T, head_dim/2)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


# YaRN (Peng et al. 2023, "YaRN: Efficient Context Window Extension of Large Language Models") is
# how Qwen3 reads beyond the L tokens it was trained on (32k to 128k with factor s = 4). Past L,
# the slowly turning pairs reach angles never seen in training. Dividing every frequency by s
# ("position interpolation", Chen et al. 2023) keeps all angles in range but blurs the fast pairs
# that tell neighbouring tokens apart. YaRN splits the pairs by how often they turn within L:
# a pair that turns more than beta_fast (32) times keeps its frequency, one that turns fewer than
# beta_slow (1) times is divided by s, and the pairs between are blended linearly ("NTK-by-parts").
# Longer contexts also flatten the softmax, so q and k are scaled by 0.1 ln(s) + 1 (through cos and
# sin). Nothing is learned: a checkpoint gains YaRN by one entry in its config.json.

YARN_KEYS = ("rope_type", "factor", "original_max_position_embeddings", "attention_factor", "beta_fast",
             "beta_slow", "mscale", "mscale_all_dim", "truncate")


def yarn_parameters(rope_scaling: dict, max_position_embeddings: int) -> dict:
    """A YaRN rope_scaling dict checked and completed with transformers' defaults (ValueError if bad)."""
    p = rope_scaling
    if not isinstance(p, dict):
        raise ValueError(f"rope_scaling must be an object, got {p!r}")
    if p.get("rope_type") != "yarn":
        raise ValueError(f"RoPE type {p.get('rope_type')!r} is not supported (only 'default' and 'yarn')")
    unknown = sorted(set(p) - set(YARN_KEYS))
    if unknown:
        raise ValueError(f"unknown YaRN parameter(s) {', '.join(unknown)}")

    def number(name, default=None):
        value = default if p.get(name) is None else p[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"YaRN {name} must be a positive number, got {p.get(name)!r}")
        return float(value)

    factor, original = number("factor"), number("original_max_position_embeddings", max_position_embeddings)
    beta_fast, beta_slow, truncate = number("beta_fast", 32.0), number("beta_slow", 1.0), p.get("truncate", True)
    if factor < 1 or original != int(original) or beta_fast <= beta_slow or not isinstance(truncate, bool):
        raise ValueError(f"YaRN needs factor >= 1, an integer original_max_position_embeddings, beta_fast > "
                         f"beta_slow and a true/false truncate; got {factor:g}, {original:g}, {beta_fast:g}, "
                         f"{beta_slow:g}, {truncate!r}")

    def mscale(m):  # the paper's sqrt(1/t) = 0.1 ln(s) + 1, with DeepSeek's optional multiplier m
        return 0.1 * m * math.log(factor) + 1.0
    if p.get("attention_factor") is None and p.get("mscale") and p.get("mscale_all_dim"):
        attention = mscale(number("mscale")) / mscale(number("mscale_all_dim"))
    else:
        attention = number("attention_factor", mscale(1.0))
    return dict(rope_type="yarn", factor=factor, original_max_position_embeddings=int(original),
                attention_factor=attention, beta_fast=beta_fast, beta_slow=beta_slow, truncate=truncate)


def yarn_keep(head_dim: int, theta: float, p: dict) -> torch.Tensor:
    """(head_dim/2,) per pair: 1 keeps its frequency, 0 divides it by the factor, linear between."""
    # Pair i turns L * theta^(-2i/d) / (2 pi) times within the original context L; solved for i, the
    # pair that turns r times sits at i = d ln(L / (2 pi r)) / (2 ln theta). As in the paper's code
    # (and transformers), the ramp is linear in i between the pairs of beta_fast and beta_slow turns,
    # rounded outwards to whole pairs unless truncate is false.
    def pair_turning(r):
        return head_dim * math.log(p["original_max_position_embeddings"] / (2 * math.pi * r)) / (2 * math.log(theta))
    lo, hi = pair_turning(p["beta_fast"]), pair_turning(p["beta_slow"])  # lo < hi: pair 0 turns fastest
    if p["truncate"]:
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, head_dim - 1)
    width = hi - lo if hi != lo else 1e-3  # lo == hi: a step at lo
    return 1 - ((torch.arange(head_dim // 2, dtype=torch.float) - lo) / width).clamp(0, 1)


# %% 4. Attention: grouped-query, QK-norm, optional sliding window
# Vaswani et al. 2017 scaled dot-product attention, with three refinements used by Qwen3:
# - Grouped-query attention (Ainslie et al. 2023, "GQA"): n_head query heads share n_kv_head
#   key/value heads (query head h reads kv head h // (n_head / n_kv_head)). The KV cache shrinks by
#   that factor at almost no quality cost. One kv head is multi-query attention (Shazeer 2019).
# - QK-norm (Dehghani et al. 2023, "Scaling Vision Transformers to 22B"; new in Qwen3 vs Qwen2):
#   RMSNorm over head_dim on every query and key head before RoPE, which bounds the attention
#   logits and keeps training stable at high learning rates.
# - Sliding-window attention (Beltagy et al. 2020, "Longformer"; Jiang et al. 2023, "Mistral 7B"):
#   a layer may look only at the W most recent tokens, so its cost and cache stay bounded. Qwen3
#   ships with it off; the config can switch it on for the top layers, as transformers does.
# The softmax itself runs in F.scaled_dot_product_attention, which picks a fused kernel (flash
# attention on GPUs) and handles GQA without materialising repeated keys and values.


def attention_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """(..., Tq, Tk) bool for positions (..., Tq) and (..., Tk), True where a query may attend:
    causal, and within the window if any. Negative positions are left padding (section 6): no
    real token sees one, and a padding query sees only padding (its output is never used, but a
    softmax over no keys at all would be NaN)."""
    offset = q_pos[..., :, None] - k_pos[..., None, :]  # how far back each key lies from each query
    allowed = offset >= 0
    if window is not None:
        allowed &= offset < window  # W keys: the query itself and W - 1 before it
    return allowed & ((k_pos[..., None, :] >= 0) | (q_pos[..., :, None] < 0))


def latest_keys_mask(positions: torch.Tensor, S: int, window: int | None) -> torch.Tensor:
    """attention_mask of queries at positions (T,), or (B, T) for left-padded rows, over the S latest
    keys, those up to the last query's position: (T, S), or (B, 1, T, S), the same for every head."""
    k_pos = positions[..., -1:] + torch.arange(1 - S, 1, device=positions.device)  # (S,), or (B, S)
    mask = attention_mask(positions, k_pos, window)  # (T, S), or (B, T, S)
    return mask[:, None] if positions.dim() == 2 else mask


class Attention(nn.Module):
    def __init__(self, config: Qwen3Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = (config.num_attention_heads, config.num_key_value_heads,
                                                      config.head_dim)
        self.window = config.layer_window(layer_idx)
        self.dropout = config.dropout
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.n_head * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv_head * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv_head * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, config.hidden_size, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(self, x, cos, sin, positions, cache=None):
        """x (B, T, hidden) at positions (T,), or (B, T) when rows are left-padded (section 6)."""
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.n_head, self.head_dim)).transpose(1, 2)  # (B, n_head, T, hd)
        k = self.k_norm(self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim)).transpose(1, 2)  # (B, n_kv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, n_kv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # prepend the cached past: (B, n_kv, S, hd)
        S, padded = k.size(2), positions.dim() == 2  # the keys: the S latest positions, up to the last query's
        mask, causal = None, False
        if S == T and not padded and (self.window is None or self.window >= T):
            causal = True  # no past and nothing outside the window: plain causal attention
        elif padded or not (T == 1 and (self.window is None or S <= self.window)):  # one new token seeing all keys needs no mask
            mask = latest_keys_mask(positions, S, self.window)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0.0,
                                           enable_gqa=self.n_kv_head != self.n_head)  # (B, n_head, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


# %% 5. SwiGLU MLP
# Shazeer 2020, "GLU Variants Improve Transformer". Instead of up-project, ReLU, down-project,
# a SiLU-activated "gate" projection multiplies a second linear "up" projection elementwise.
# The gating costs a third matrix but buys noticeably better loss per FLOP.


class MLP(nn.Module):
    def __init__(self, config: Qwen3Config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# %% 6. The model
# A pre-norm transformer (Xiong et al. 2020): each block normalises its input, computes a branch
# (attention, then MLP) and *adds* it to the residual stream, so gradients flow straight through
# the additions from the loss to the embeddings. A final RMSNorm and a linear head turn the last
# residual state into next-token logits. Names mirror transformers' keys: `model.layers.3.mlp...`.
# A batch of prompts of different lengths is left-padded to one length, with transformers'
# attention_mask (1 for a token, 0 for padding): each row's positions then count from its own
# first token, the padding at negative positions, and section 4's mask hides the padding.


def left_padding(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) mask of 1 (token) and 0 (padding) -> (B,) how many padding tokens open each row."""
    if not ((attention_mask == 0) | (attention_mask == 1)).all():
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (token)")
    real = attention_mask.bool()
    if (real[:, :-1] & ~real[:, 1:]).any():
        raise ValueError("attention_mask must be left padding: in each row, all 0s before all 1s")
    return (~real).sum(dim=1)


class Block(nn.Module):
    def __init__(self, config: Qwen3Config, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, cos, sin, positions, cache=None):
        x = x + self.dropout(self.self_attn(self.input_layernorm(x), cos, sin, positions, cache))
        return x + self.dropout(self.mlp(self.post_attention_layernorm(x)))


class Qwen3Model(nn.Module):
    """The transformer body, token ids (B, T) -> final hidden states (B, T, hidden_size)."""

    def __init__(self, config: Qwen3Config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids, cache=None, attention_mask=None):
        """attention_mask (B, T): 1 for tokens, 0 for left padding. With a cache, pass it with the
        first call (the prompt) only: the cache remembers each row's padding; later tokens are real."""
        start = cache.seen_tokens if cache is not None else 0  # positions continue after the cache
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, "
                             f"input_ids {tuple(input_ids.shape)}")
        pad = left_padding(attention_mask) if attention_mask is not None else None  # (B,)
        if cache is not None:
            if pad is not None and start:
                raise ValueError("attention_mask goes with the first call on a cache: padding opens a sequence")
            pad = cache.pad = pad if pad is not None else cache.pad
        x = self.embed_tokens(input_ids)  # (B, T, hidden)
        positions = torch.arange(start, start + input_ids.size(1), device=input_ids.device)  # (T,)
        if pad is not None:
            positions = positions - pad[:, None]  # (B, T): each row counts from its first token
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, x.dtype, self.config.rope_scaling)  # shared by all layers
        if pad is not None:
            cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, hd): the same angles for every head
        for layer in self.layers:
            x = layer(x, cos, sin, positions, cache)
        if cache is not None:
            cache.seen_tokens += input_ids.size(1)
        if x.dtype == torch.float16:
            check_float16(x)  # the Appendix, A3: an overflow raises, never yields inf or NaN
        return self.norm(x)


class Qwen3(nn.Module):
    """Qwen3ForCausalLM. `logits, loss = model(idx, targets)`; loss is None without targets."""

    def __init__(self, config: Qwen3Config):
        super().__init__()
        self.config = config
        self.model = Qwen3Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight  # one matrix reads and writes tokens
        self._init_weights()

    def _init_weights(self):
        # N(0, 0.02) everywhere, as transformers does; the two projections that write into the
        # residual stream get std / sqrt(2 * layers) (GPT-2) so the stream's variance does not
        # grow with depth. Gains start at one (RMSNorm's constructor).
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                std = self.config.initializer_range
                if name.endswith(("o_proj", "down_proj")):
                    std /= math.sqrt(2 * self.config.num_hidden_layers)
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, input_ids, targets=None, cache=None, return_logits=True, attention_mask=None):
        """input_ids (B, T) -> logits (B, T, vocab); targets (B, T) are the next tokens, -100 to skip.
        With targets and return_logits=False, returns (None, loss) without ever holding the logits:
        the same loss and gradients, in less time and memory (train.py's path). attention_mask
        (B, T), 1 for tokens and 0 for left padding, lets prompts of different lengths share a batch."""
        h = self.model(input_ids, cache, attention_mask)  # (B, T, hidden)
        if targets is not None and not return_logits:  # the fused loss of the Appendix, A1
            return None, linear_cross_entropy(h.flatten(0, 1), self.lm_head.weight, targets.flatten())
        logits = self.lm_head(h)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
        return logits, loss

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # a tied matrix is counted once
        return n - self.model.embed_tokens.weight.numel() if non_embedding else n

    # generate(), stream(), from_pretrained() and save_pretrained() are attached below, in the
    # sections that explain them.


# %% 7. KV cache
# Generating token t+1 needs the keys and values of tokens 0..t, which do not change once
# computed. The cache keeps them per layer, so each new token costs one row of work instead of a
# full forward pass over the whole sequence. Positions continue from `seen_tokens`. A sliding
# layer only ever looks back W - 1 tokens, so it keeps only those: memory stays bounded however
# long the generation runs.


class KVCache:
    def __init__(self, config: Qwen3Config):
        self.windows = [config.layer_window(i) for i in range(config.num_hidden_layers)]
        self.keys: list[torch.Tensor | None] = [None] * config.num_hidden_layers  # each (B, n_kv, S, hd)
        self.values: list[torch.Tensor | None] = [None] * config.num_hidden_layers
        self.seen_tokens = 0  # absolute position of the next token to be fed
        self.pad = None  # (B,) padding tokens opening each row, from the prompt's attention_mask

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Append new keys/values (B, n_kv, T, hd); return everything the new queries may need."""
        if self.keys[layer] is not None:
            k = torch.cat((self.keys[layer], k), dim=2)
            v = torch.cat((self.values[layer], v), dim=2)
        window = self.windows[layer]
        keep = k.size(2) if window is None else min(k.size(2), window - 1)  # the next query's view
        self.keys[layer], self.values[layer] = k[:, :, k.size(2) - keep:], v[:, :, v.size(2) - keep:]
        return k, v

    def __len__(self):
        return self.seen_tokens


# %% 8. Sampling
# A language model gives a distribution over the next token; decoding picks from it. Temperature
# sharpens (< 1) or flattens (> 1) it, 0 means always take the argmax (greedy). Top-k (Fan et al.
# 2018) keeps the k likeliest tokens; top-p, "nucleus" (Holtzman et al. 2019), keeps the smallest
# set whose probability reaches p. Both cut off the long tail of unlikely tokens that makes
# samples derail. Order as in transformers: temperature, then top-k, then top-p.


def top_k_filter(logits: torch.Tensor, k: int | None) -> torch.Tensor:
    """Set all but the k largest logits to -inf (ties with the k-th are kept)."""
    if k is not None and k < 0:
        raise ValueError(f"top_k must be >= 0, got {k}")
    if not k or k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float | None) -> torch.Tensor:
    """Keep the smallest set of likeliest tokens whose probability mass reaches p (at least one)."""
    if p is None or p >= 1.0:
        return logits
    if p <= 0.0:
        raise ValueError(f"top_p must be in (0, 1], got {p}")
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.float().softmax(dim=-1)
    drop = probs.cumsum(dim=-1) - probs >= p  # the strictly likelier tokens already hold mass p
    drop[..., 0] = False  # the likeliest token always stays (even for a p below fp32's resolution)
    drop = drop.scatter(-1, order, drop)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def next_token_probs(logits, temperature=1.0, top_k=None, top_p=None) -> torch.Tensor:
    """logits (B, vocab) -> the distribution the next token is drawn from, (B, vocab) fp32: after
    temperature, top-k and top-p. Temperature 0 puts all the mass on the argmax (greedy)."""
    if not temperature >= 0:  # also refuses nan
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    logits = logits.float()
    if temperature == 0:
        return F.one_hot(logits.argmax(dim=-1), logits.size(-1)).float()
    # shift the best logit to 0 before dividing: the scaled logits are then all <= 0, so a tiny
    # temperature sends the rest to -inf, never the best to +inf, and its limit is greedy as it should be
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    return top_p_filter(top_k_filter(logits, top_k), top_p).softmax(dim=-1)


def sample_next_token(logits, temperature=1.0, top_k=None, top_p=None, generator=None, probs=None) -> torch.Tensor:
    """logits (B, vocab) -> next token ids (B,). probs: their next_token_probs, if already computed."""
    if temperature == 0:
        return logits.argmax(dim=-1)  # greedy draws no random numbers
    probs = next_token_probs(logits, temperature, top_k, top_p) if probs is None else probs
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def _check_decoding(idx, max_new_tokens, temperature, top_k, top_p, attention_mask):
    """Refuse, before any work, what would otherwise fail deep inside or quietly do the wrong thing."""
    if not (isinstance(idx, torch.Tensor) and idx.dim() == 2 and not idx.is_floating_point()):
        raise ValueError(f"the prompt must be token ids of shape (B, T), got {getattr(idx, 'shape', type(idx))}")
    if idx.size(1) == 0:
        raise ValueError("the prompt is empty: give at least one token (a BOS, say)")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    next_token_probs(torch.zeros(1, 1), temperature)  # the sampler's own checks, on a dummy row
    top_p_filter(top_k_filter(torch.zeros(1, 1), top_k), top_p)
    if attention_mask is not None:
        if attention_mask.shape != idx.shape:
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, the prompt {tuple(idx.shape)}")
        if not attention_mask[:, -1].all():  # left padding ends every row with a token
            raise ValueError("every row of attention_mask must end with a token (1): left padding only")


@torch.no_grad()
def _next_tokens(model: Qwen3, idx, max_new_tokens, temperature, top_k, top_p, generator, with_probs=False,
                 attention_mask=None):
    """Prefill the prompt once, then feed one token per step; yields next tokens (B,) and, if
    with_probs, the distributions (B, vocab) they were drawn from (else None)."""
    length = idx.size(1) + max_new_tokens
    cache = StaticKVCache(model, idx.size(0), length)  # the Appendix, A2: section 7's cache, preallocated
    x, mask, fed = idx, attention_mask, [idx]
    for step in range(max_new_tokens):
        try:  # the prompt through the readable forward pass; in eval mode its logits and each new token through A4
            if step == 0 or model.training:
                h = model.model(x, cache, mask)[:, -1]  # (B, hidden): only the last position matters
                logits = model.lm_head(h) if model.training else decode_logits(model, h, cache)  # (B, vocab)
            else:
                logits = decode_one(model, x, cache)
        except Float16Overflow as e:  # the Appendix, A3: redo everything so far in float32, and go on so
            cache, logits = continue_in_float32(model, torch.cat(fed, dim=1), attention_mask, length, e)
        probs = next_token_probs(logits, temperature, top_k, top_p) if with_probs else None
        x, mask = sample_next_token(logits, temperature, top_k, top_p, generator, probs)[:, None], None  # (B, 1)
        fed.append(x)
        yield x[:, 0], probs


def _eos_ids(eos_token_id) -> list[int]:
    return [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)


@torch.no_grad()
def generate(self: Qwen3, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
             eos_token_id=None, generator=None, attention_mask=None, pad_token_id=None) -> torch.Tensor:
    """Continue idx (B, T) by up to max_new_tokens; returns (B, T + new). Prompts of different
    lengths come left-padded, with attention_mask (B, T): 1 for tokens, 0 for padding (as in
    transformers). A row that has emitted an EOS is filled after it with pad_token_id, else the
    config's pad_token_id, else the first EOS id (transformers' rule); generation ends early once
    every row has. Call model.eval() first."""
    _check_decoding(idx, max_new_tokens, temperature, top_k, top_p, attention_mask)
    eos = torch.tensor(_eos_ids(eos_token_id), dtype=torch.long, device=idx.device)
    fill = pad_token_id if pad_token_id is not None else self.config.pad_token_id
    fill = fill if fill is not None else eos[:1]  # transformers' rule: the pad id, else the first EOS
    out, done = [idx], torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
    for token, _ in _next_tokens(self, idx, max_new_tokens, temperature, top_k, top_p, generator,
                                 attention_mask=attention_mask):
        if len(eos):
            token = torch.where(done, fill, token)
            done |= torch.isin(token, eos)
        out.append(token[:, None])
        if len(eos) and done.all():
            break
    return torch.cat(out, dim=1)


def stream(self: Qwen3, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
           eos_token_id=None, generator=None, with_probs=False):
    """Like generate for one sequence (1, T), but yields each new token id as soon as it exists.
    Stops at EOS without yielding it. with_probs=True yields (token id, probs) instead, probs (vocab,)
    being the distribution the token was drawn from (what temperature, top-k and top-p made of it).
    Bad arguments raise here, not at the first token."""
    _check_decoding(idx, max_new_tokens, temperature, top_k, top_p, None)
    if idx.size(0) != 1:
        raise ValueError(f"stream takes one sequence, shape (1, T), got {tuple(idx.shape)}: use generate for batches")
    eos = set(_eos_ids(eos_token_id))

    def tokens():
        for token, probs in _next_tokens(self, idx, max_new_tokens, temperature, top_k, top_p, generator, with_probs):
            if token.item() in eos:
                return
            yield (token.item(), probs[0]) if with_probs else token.item()
    return tokens()


Qwen3.generate, Qwen3.stream = generate, stream


# %% 9. Checkpoints in Hugging Face format
# A checkpoint is a directory: config.json (the Qwen3Config of section 1, in transformers' JSON)
# and the weights in safetensors, a format that holds only tensors (no pickle, so loading one can
# never run code), in one file or sharded with a model.safetensors.index.json. Tied models store
# the embedding once, without lm_head.weight. Because our parameter names are transformers',
# nothing is renamed either way: a downloaded Qwen3-0.6B runs here, and our trained models run in
# transformers.
#
# config.json first. Field names are already transformers', so translating is mostly copying; the
# wrinkles are RoPE's spellings and that where a config.json is silent, transformers' own defaults
# apply, not this file's. transformers 4.x writes `rope_theta` and `rope_scaling` (YaRN or null),
# 5.x `rope_parameters` with the theta inside; we write both. Reading, we do as transformers 5
# does: a non-empty `rope_scaling` replaces `rope_parameters` whole, and a theta missing from it
# comes from `rope_theta`, else 10,000 (not from `rope_parameters`).


def config_to_dict(self: Qwen3Config) -> dict:
    d = {k: v for k, v in asdict(self).items() if k != "dropout"}
    d["layer_types"] = ["full_attention" if self.layer_window(i) is None else "sliding_attention"
                        for i in range(self.num_hidden_layers)]
    rope = d["rope_scaling"] or {"rope_type": "default"}
    return {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_act": "silu",
            **d, "attention_dropout": self.dropout, "rope_parameters": {**rope, "rope_theta": self.rope_theta}}


@classmethod
def config_from_dict(cls, d: dict) -> Qwen3Config:
    if not isinstance(d, dict):
        raise ValueError(f"expected a JSON object, got {type(d).__name__}")
    if d.get("model_type", "qwen3") != "qwen3":
        raise ValueError(f"model_type is {d['model_type']!r}, not 'qwen3'")
    if d.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {d['hidden_act']!r} is not supported (Qwen3 uses silu)")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if k not in d]
    if missing:
        raise ValueError(f"missing field(s) {', '.join(missing)}")
    rope = d.get("rope_scaling") or d.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise ValueError(f"rope_scaling / rope_parameters must be an object, got {rope!r}")
    rope_type = rope.get("rope_type", rope.get("type", "default"))  # "type": the oldest spelling
    known = {f.name for f in fields(cls)}
    hf_defaults = dict(num_key_value_heads=d["num_attention_heads"], head_dim=128, rope_theta=10_000.0,
                       max_position_embeddings=32768, tie_word_embeddings=False)  # transformers' Qwen3Config
    kwargs = {**hf_defaults, **{k: v for k, v in d.items() if k in known}}
    kwargs["rope_theta"] = float(rope.get("rope_theta", kwargs["rope_theta"]))
    kwargs["rope_scaling"] = None if rope_type == "default" else {  # Qwen3Config rejects all but YaRN
        **{k: v for k, v in rope.items() if k not in ("type", "rope_theta")}, "rope_type": rope_type}
    kwargs["dropout"] = float(d.get("attention_dropout", 0.0))
    if kwargs.get("num_key_value_heads") is None:
        kwargs["num_key_value_heads"] = d["num_attention_heads"]
    return cls(**kwargs)


@classmethod
def config_from_hf(cls, hf_config) -> Qwen3Config:
    """From a transformers Qwen3Config object."""
    return cls.from_dict(hf_config.to_dict())


def config_to_hf(self: Qwen3Config):
    from transformers import Qwen3Config as HFQwen3Config
    return HFQwen3Config.from_dict(self.to_dict())


@classmethod
def config_from_json(cls, path) -> Qwen3Config:
    return cls.from_dict(json.loads(Path(path).read_text()))


def config_to_json(self: Qwen3Config, path):
    Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


Qwen3Config.to_dict, Qwen3Config.from_dict = config_to_dict, config_from_dict
Qwen3Config.to_hf, Qwen3Config.from_hf = config_to_hf, config_from_hf
Qwen3Config.to_json, Qwen3Config.from_json = config_to_json, config_from_json

# Then the weights.


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message is one line naming the file."""


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        return [path / s for s in shards]
    if (path / "model.safetensors").exists():
        return [path / "model.safetensors"]
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")


def load_state_dict(path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory, on the CPU, as stored."""
    from safetensors.torch import load_file
    state = {}
    for file in _weight_files(Path(path)):
        try:
            state.update(load_file(file))
        except Exception as e:  # safetensors raises several types for truncated or garbled files
            reason = " ".join(str(e).split()) or type(e).__name__
            raise CheckpointError(f"{file}: unreadable safetensors file ({reason})") from None
    return state


@classmethod
def from_pretrained(cls, path, dtype=None, device=None) -> Qwen3:
    """Load a transformers Qwen3 checkpoint directory. dtype None keeps the stored dtype."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: not a checkpoint directory (no config.json)")
    try:
        config = Qwen3Config.from_json(path / "config.json")
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path / 'config.json'}: {' '.join(str(e).split())}") from None
    state = load_state_dict(path)
    with torch.device("meta"):  # shapes only: no time spent on random weights we overwrite
        model = cls(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # some exporters store the tied head anyway
        del expected["lm_head.weight"]  # the embedding, tied below
    missing = sorted(k for k in expected if state.get(k) is None)
    unexpected = sorted(k for k in state if k not in expected)
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise CheckpointError(f"{path}: weights do not match config.json ({what})")
    for k, shape in expected.items():
        if tuple(state[k].shape) != shape:
            raise CheckpointError(f"{path}: {k} has shape {list(state[k].shape)}, config.json implies {list(shape)}")
    state = {k: v.to(device=device, dtype=dtype if dtype is not None and v.is_floating_point() else v.dtype)
             for k, v in state.items()}  # before tying, so a tied embedding is converted once
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight  # assign=True replaced both; re-tie
    return model.eval()


def save_pretrained(self: Qwen3, path, dtype=None):
    """Write config.json, generation_config.json and model.safetensors into directory `path`."""
    from safetensors.torch import save_file
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in self.state_dict().items()}
    if self.config.tie_word_embeddings:
        del state["lm_head.weight"]  # stored once, as the embedding
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    config = self.config.to_dict()
    config["dtype"] = config["torch_dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {k: getattr(self.config, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                  if getattr(self.config, k) is not None}
    (path / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


Qwen3.from_pretrained, Qwen3.save_pretrained = from_pretrained, save_pretrained


# %% 10. Optimizers: Muon for hidden matrices, AdamW for the rest
# Muon (Keller Jordan 2024, "Muon: An optimizer for hidden layers in neural networks"; the
# optimizer behind the modded-nanogpt speedrun records). SGD-momentum produces updates whose
# energy concentrates in a few directions. Muon replaces each weight matrix's momentum by the
# nearest (semi-)orthogonal matrix, U V^T from its SVD, so every direction moves at the same rate.
# The SVD is too slow, so five steps of a quintic Newton-Schulz iteration approximate it with
# matmuls; its coefficients (3.4445, -4.7750, 2.0315) push all singular values into roughly
# (0.5, 1.5) as fast as possible rather than exactly to 1, which trains just as well. The
# reference runs it in bf16, fast on GPUs; CPUs without bf16 units emulate it ~15x slower than
# fp32, so there the default is fp32 (more accurate, same iteration).
# Muon is defined for 2-D matrices inside the network. Embeddings (a lookup, not a linear map),
# the output head and the 1-D gains go to AdamW (Loshchilov & Hutter 2019, decoupled weight decay).


def zeropower_via_newtonschulz(G: torch.Tensor, steps: int = 5, eps: float = 1e-7,
                               dtype=torch.bfloat16) -> torch.Tensor:
    """Approximately orthogonalise each matrix of G (..., rows, cols): U S V^T -> U S' V^T, S' ~ 1."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.to(dtype).reshape(-1, *G.shape[-2:])  # (n, rows, cols): a batch of matrices
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT  # iterate on the wide orientation: the Gram matrix X X^T is then the smaller one
    X = X / X.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # Frobenius norm >= spectral: all s.v. <= 1
    if dtype == torch.float32 and X.size(-1) >= 2 * X.size(-2):  # the Appendix, A5: the same X, fewer FLOPs
        X = gram_newton_schulz(X, steps, (a, b, c))
    else:
        # the steps take turns writing into the same few buffers (on a CPU fresh memory costs a
        # page fault per 4 KB); the result is bit-identical to fresh tensors for each product
        A = X.new_empty(X.size(0), X.size(1), X.size(1))  # (n, rows, rows)
        B, out = torch.empty_like(A), [X.new_empty(X.shape), X.new_empty(X.shape)]
        for i in range(steps):
            torch.bmm(X, X.mT, out=A)  # A = X X^T
            torch.baddbmm(A, A, A, beta=b, alpha=c, out=B)  # b A + c A^2, one fused op (as torch.optim.Muon)
            X = torch.baddbmm(X, B, X, beta=a, out=out[i % 2])  # a X + B X: a quintic polynomial in the s.v.
    return (X.mT if tall else X).reshape(G.shape)


class Muon(torch.optim.Optimizer):
    """MomentUm Orthogonalized by Newton-Schulz, for 2-D parameters. Same-shape matrices are
    orthogonalised together in one batched call, which is where Muon spends its time.
    ns_dtype: precision of Newton-Schulz; None means bf16 on GPUs and fp32 on CPUs."""

    def __init__(self, params, lr=0.02, momentum=0.95, weight_decay=0.0, nesterov=True, ns_steps=5,
                 ns_dtype=None):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      nesterov=nesterov, ns_steps=ns_steps, ns_dtype=ns_dtype))
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon takes only 2-D parameters, got shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            by_shape = {}
            for p in group["params"]:
                if p.grad is not None:
                    by_shape.setdefault(p.shape, []).append(p)
            for shape, params in by_shape.items():
                grads = [p.grad for p in params]
                for p in params:
                    if "momentum_buffer" not in self.state[p]:
                        self.state[p]["momentum_buffer"] = torch.zeros_like(p)
                bufs = [self.state[p]["momentum_buffer"] for p in params]
                torch._foreach_lerp_(bufs, grads, 1 - group["momentum"])  # buf = beta buf + (1 - beta) g
                if group["nesterov"]:  # written straight into the stack: one pass over the matrices
                    updates = grads[0].new_empty(len(params), *shape)  # (n, rows, cols)
                    for g, b, u in zip(grads, bufs, updates):
                        torch.lerp(g, b, group["momentum"], out=u)
                else:
                    updates = torch.stack(bufs)
                dtype = group["ns_dtype"] or (torch.float32 if updates.device.type == "cpu" else torch.bfloat16)
                updates = self._orthogonalize(updates, group["ns_steps"], dtype)
                scale = max(1.0, shape[0] / shape[1]) ** 0.5  # tall matrices: keep the update's RMS up
                torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])  # decoupled decay
                torch._foreach_add_(params, list(updates.unbind(0)), alpha=-group["lr"] * scale)
        return loss

    @staticmethod
    def _orthogonalize(updates: torch.Tensor, ns_steps: int, dtype) -> torch.Tensor:
        """Newton-Schulz on a stack (n, rows, cols). Under torch.distributed every rank holds the
        same all-reduced gradients, so each orthogonalises only its slice of the stack and the
        slices are all-gathered: the cost is split across ranks, not repeated on each."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return zeropower_via_newtonschulz(updates, ns_steps, dtype=dtype)
        world, rank, n = torch.distributed.get_world_size(), torch.distributed.get_rank(), updates.size(0)
        per_rank = -(-n // world)
        padded = F.pad(updates, (0, 0, 0, 0, 0, per_rank * world - n))  # (world * per_rank, rows, cols)
        mine = zeropower_via_newtonschulz(padded[rank * per_rank:(rank + 1) * per_rank], ns_steps, dtype=dtype)
        gathered = [torch.empty_like(mine) for _ in range(world)]
        torch.distributed.all_gather(gathered, mine.contiguous())
        return torch.cat(gathered)[:n]


def configure_optimizers(model: Qwen3, optimizer: str = "muon", lr: float = 3e-3, muon_lr: float = 0.02,
                         weight_decay: float = 0.1, betas=(0.9, 0.95), eps: float = 1e-8):
    """The optimizers for training `model`, as a list to step together.

    "muon": Muon on every 2-D matrix inside the blocks, AdamW on embeddings, lm_head and gains.
    "adamw": AdamW on everything (the baseline), weight decay on 2-D weights only, as is usual:
    decaying gains and biases toward zero only fights the normalisation.
    Every param group records `base_lr`; a schedule sets group["lr"] = base_lr * multiplier.
    """
    if optimizer not in ("muon", "adamw"):
        raise ValueError(f"unknown optimizer {optimizer!r}; choose muon or adamw")
    params = {id(p): (name, p) for name, p in model.named_parameters()}.values()  # a tied matrix once
    hidden = [p for name, p in params if p.ndim == 2 and name.startswith("model.layers.")]
    decay = [p for name, p in params if p.ndim == 2 and not (optimizer == "muon" and name.startswith("model.layers."))]
    no_decay = [p for name, p in params if p.ndim < 2]
    adamw_groups = [dict(params=decay, weight_decay=weight_decay, base_lr=lr),
                    dict(params=no_decay, weight_decay=0.0, base_lr=lr)]
    # the fused kernel updates all tensors in one pass: ~5x faster than the default loop on CPU
    fused = dict(fused=True) if {p.device.type for p in model.parameters()} <= {"cpu", "cuda", "mps"} else {}
    optimizers = [torch.optim.AdamW(adamw_groups, lr=lr, betas=betas, eps=eps, **fused)]
    if optimizer == "muon":
        optimizers.insert(0, Muon([dict(params=hidden, base_lr=muon_lr)], lr=muon_lr, weight_decay=weight_decay))
    return optimizers


# %% Appendix: making it fast
# Everything above is the readable reference: each piece written the way it is explained. What
# follows computes exactly the same things faster, and lives here so the story above never has to
# step around it. Each speed-up is switched on from one line in the main text and proven equal to
# the readable path in tests/.

# %% A1. Fused linear + cross-entropy
# In training the logits are only a stepping stone to the loss, yet at B*T rows by vocab columns in
# fp32 they are the largest tensor of the step (400 MB for the seed model at B=8, T=256), and
# softmax, its backward and their gradients stream through that many bytes again and again.
# Instead, take the rows of h a chunk at a time: logits, loss and at once the loss's gradient,
# dlogits = (softmax - onehot) / n_kept, folded into grad_h = dlogits W and grad_W += dlogits^T h
# before the next chunk. Backward only scales the two saved gradients. On a 2-core CPU a seed
# training step (B=8, T=256) gets ~1.1x faster and its activation memory halves. The idea of Liger
# Kernel's fused linear cross-entropy (Hsu et al. 2024, arXiv:2410.10989) and of Cut Cross-Entropy
# (Wijmans et al. 2024, "Cut Your Losses in Large-Vocabulary Language Models"). The loss and
# gradients are those of F.cross_entropy(h @ W^T, targets, ignore_index=-100), up to rounding.


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
            # every chunk reuses the same two buffers: on a CPU, fresh memory costs a page fault per
            # 4 KB when first written (~0.2 s per 400 MB here, more than the softmax itself)
            size = (min(chunk_size, h.size(0)), weight.size(0))
            logits_buf = torch.empty(size, dtype=dtype, device=h.device)
            probs_buf = torch.empty(size, dtype=torch.float32, device=h.device)
            for start in range(0, h.size(0), chunk_size):
                rows = slice(start, start + chunk_size)
                hc, t, scale = h[rows], targets[rows, None], row_scale[rows, None]  # (n, H), (n, 1), (n, 1)
                n = hc.size(0)  # chunk_size, or fewer in the last chunk
                logits = torch.mm(hc.to(dtype), w.T, out=logits_buf[:n]).float()  # (n, vocab), fp32
                probs = torch.softmax(logits, dim=-1, out=probs_buf[:n])
                # -log p_t = logsumexp - logit_t, and logsumexp = max logit - log p_max: exact even
                # where p_t underflows to 0, as p_max >= 1/vocab cannot (and cheaper than log_softmax)
                nll = logits.amax(-1, keepdim=True) - probs.amax(-1, keepdim=True).log() - logits.gather(1, t)
                nll_sum += torch.where(kept[rows, None], nll, 0.0).sum()
                if not (need_h or need_w):
                    continue
                # dloss/dlogits = scale * (probs - onehot); the scale goes on the narrow (n, H)
                # factors, not on this wide tensor: one pass over it fewer
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


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk_size: int = 256) -> torch.Tensor:
    """F.cross_entropy(h @ weight.T, targets, ignore_index=-100) for h (N, H), weight (vocab, H) and
    targets (N,), holding chunk_size rows of logits at a time. With the seed model on a 2-core CPU,
    256 was among the fastest: smaller chunks re-read W more often, larger ones gain nothing and
    hold more memory."""
    return LinearCrossEntropy.apply(h, weight, targets, chunk_size, torch.is_grad_enabled())


# %% A2. A preallocated KV cache
# Section 7's cache grows by torch.cat: every new token copies the whole past of every layer into
# fresh memory. This one allocates each layer's keys and values once, for the whole generation,
# and writes each new token in place; what update returns is a view of the filled part, the same
# keys KVCache would return (a sliding layer: only those its queries may still see). The storage
# never moves or changes shape: the first thing CUDA graphs need (the second, fixed shapes for
# attention too, would mean attending over the whole buffer with a mask; not done here).


class StaticKVCache(KVCache):
    """KVCache's contract on storage for max_len tokens of batch_size rows, in the model's dtype.
    keys[i] and values[i] are the whole buffers (B, n_kv, max_len, hd)."""

    def __init__(self, model: Qwen3, batch_size: int, max_len: int):
        super().__init__(model.config)
        c, w = model.config, model.lm_head.weight
        shape = (batch_size, c.num_key_value_heads, max_len, c.head_dim)
        self.keys = [torch.empty(shape, dtype=w.dtype, device=w.device) for _ in self.windows]
        self.values = [torch.empty(shape, dtype=w.dtype, device=w.device) for _ in self.windows]
        self.weights = None  # A4's DecodeWeights, fetched at its first step
        self.rope = None  # A4's cos/sin tables for every position, built then too

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        start, end = self.seen_tokens, self.seen_tokens + k.size(2)
        if end > self.keys[layer].size(2):
            raise ValueError(f"the cache holds {self.keys[layer].size(2)} tokens, not {end}")
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        window = self.windows[layer]
        S = end if window is None else min(end, window - 1 + k.size(2))  # as many keys as KVCache returns
        return self.keys[layer][:, :, end - S:end], self.values[layer][:, :, end - S:end]


# %% A3. float16 decoding, with an overflow guard
# Decoding one token reads every weight once, so halving the bytes per weight can nearly halve the
# time, where the hardware converts float16 fast: x86 CPUs with F16C do (one vector through the
# Qwen3-0.6B head: 18.8 ms in float16, 41.3 ms in float32 on the 2-core development machine),
# while many have no bfloat16 arithmetic at all. But Qwen3 was trained in bfloat16, whose range
# (to 3e38) float16 lacks (to 65504): an activation may overflow to inf. inf plus anything finite
# stays inf and a norm or softmax over it gives NaN, so an overflow anywhere reaches the final
# hidden states; that is where it is checked, once per forward pass. Qwen3Model raises
# Float16Overflow; generation catches it, converts the model to float32 (with a warning),
# recomputes the sequence so far and goes on, so every token from then on is float32's.


class Float16Overflow(FloatingPointError):
    """A float16 forward pass produced inf or NaN (a value beyond float16's +-65504)."""


def check_float16(x: torch.Tensor):
    if not torch.isfinite(x).all():
        raise Float16Overflow("float16 overflowed (inf or NaN in the hidden states)")


def continue_in_float32(model: Qwen3, seq, attention_mask, max_len: int, error: Float16Overflow):
    """Convert model to float32 and prefill seq (B, T') afresh; returns (cache, last logits (B, vocab))."""
    warnings.warn(f"{error}; the model now runs in float32", RuntimeWarning, stacklevel=4)
    model.float()
    cache = StaticKVCache(model, seq.size(0), max_len)
    if attention_mask is not None:  # the prompt's padding; every token since is real
        attention_mask = F.pad(attention_mask, (0, seq.size(1) - attention_mask.size(1)), value=1)
    return cache, model.lm_head(model.model(seq, cache, attention_mask)[:, -1])


# %% A4. One new token, in fewer operations, from weights laid out for it
# A decoding step does little arithmetic per weight but many small operations: the readable
# forward pass launches ~60 per layer (each RMSNorm alone is seven: cast, square, mean, add,
# rsqrt, multiply, gain), and on a CPU each costs microseconds of dispatch and thread wake-up
# whatever its size. For one new token per row this path computes the same step from fewer, fused
# kernels: F.rms_norm for every norm; one product for q, k and v together and one for gate and up;
# QK-norm and RoPE on all query and key heads at once, RoPE from cos/sin tables built once per
# generation, with rotate_half's sign folded into the sin table, so that rotate_half(x) * sin =
# roll(x) * sin'; the residual stream updated in place. Inference only: no dropout, no gradients.
# Generation feeds the prompt through the readable path and, in eval mode, every token after it
# through this one (and the prompt's logits through its head, decode_logits); tests/test_decode.py
# holds its logits to the readable path's at every step.
# It also reads the weights the way they stream fastest. One vector through a matrix is all memory
# traffic, and PyTorch's CPU product of one vector with a whole matrix leaves bandwidth unused; cut
# into one block per thread and multiplied by torch.bmm, each thread streaming its own block, the
# same bytes go 1.4-1.7x faster in float32 (benchmarks/gemv_layouts.py on the 2-core development
# machine: a seed-model step's matrices at 1 and 8 rows, and Qwen3-0.6B's). So on a CPU every
# float32 matrix is read as k = torch.get_num_threads() column blocks of its (in, out) transpose,
# (k, in, out / k); of nn.Linear's (out, in) weight, block b is rows b * out / k onwards, transposed:
# a view, free. Small matrices gain more from a repacked copy in which the blocks are contiguous and
# q, k, v stand side by side as one matrix, gate and up as another (two products fewer a layer):
# 2.37x F.linear for one row through the seed model's, against 1.67x from views. Like the weight
# repacking of CPU inference engines (llama.cpp's, say), the copy is made once and kept while the
# model lives with the same weights, in REPACKED beside the model (so it never travels with it: not
# in state_dict, deepcopy, pickle). Every generation checks each parameter's storage and version
# counter, which every in-place change bumps (an optimizer step, load_state_dict; writes through
# .data are the one way around it), and repacks after a change. The copy costs as much memory as the
# matrices, so only batch-1 float32 decoding on a CPU with at most 256 MB of them repacks (the seed
# model has 129 MB): at 8 rows the copy streams slower than views (1.20x against 1.51x), and
# Qwen3-0.6B's matrices (2.4 GB) gained 0-8% from it in three runs. float16 streams fastest
# through F.linear's own kernel (blocks: 0.95x) and GPUs are not measured: both read one block, a
# plain product.


def rope_tables(config: Qwen3Config, length: int, dtype, device):
    """cos and sign-folded sin (length, head_dim) for positions 0..length-1: section 3's values."""
    cos, sin = rope_cos_sin(torch.arange(length, device=device), config.head_dim, config.rope_theta, dtype,
                            config.rope_scaling)
    half = config.head_dim // 2
    return cos, torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)  # the sign rotate_half puts on x2


@dataclass(slots=True)
class DecodeLayer:
    """One block's weights as decode_one reads them. Every matrix is held as k column blocks of its
    (in, out) transpose, (k, in, out / k), multiplied by project; qkv and gate_up are one repacked
    matrix, or a tuple of views of the module weights."""
    input_norm: torch.Tensor  # (hidden,)
    qkv: torch.Tensor | tuple  # (hidden, (n_head + 2 * n_kv) * hd) in blocks: q, k and v side by side
    qkv_bias: torch.Tensor | None  # ((n_head + 2 * n_kv) * hd,), with attention_bias
    qk_gain: torch.Tensor  # (n_head + n_kv, hd): q_norm's gain for every query head, k_norm's for every key head
    o: torch.Tensor  # (n_head * hd, hidden) in blocks
    o_bias: torch.Tensor | None
    post_norm: torch.Tensor  # (hidden,)
    gate_up: torch.Tensor | tuple  # (hidden, 2 * intermediate) in blocks: gate and up side by side
    down: torch.Tensor  # (intermediate, hidden) in blocks
    window: int | None


@dataclass(slots=True)
class DecodeWeights:
    layers: list[DecodeLayer]
    head: torch.Tensor  # (hidden, vocab) in blocks

    def matrices(self) -> list[torch.Tensor]:
        """Every matrix in the order a step reads them (a tuple's one by one): for benchmarks."""
        ms = [m for layer in self.layers for m in (layer.qkv, layer.o, layer.gate_up, layer.down)] + [self.head]
        return [p for m in ms for p in (m if isinstance(m, tuple) else (m,))]


def project(h: torch.Tensor, w, bias=None) -> torch.Tensor:
    """h (B, in) times the matrix held as column blocks w (k, in, out / k), or as a tuple of such
    matrices side by side (their outputs concatenated): (B, out)."""
    if isinstance(w, tuple):
        y = torch.cat([project(h, m) for m in w], dim=-1)
    elif w.size(0) == 1:
        y = h @ w[0]  # one block: a plain product (a batched product of one is slower in float16 here)
    else:  # one product per block, (k, B, out / k), then the blocks side by side (a view when B = 1)
        y = torch.bmm(h.expand(w.size(0), *h.shape), w).transpose(0, 1).reshape(h.size(0), -1)
    return y if bias is None else y.add_(bias)


def decode_blocks(w: torch.Tensor) -> int:
    """How many column blocks decode_one cuts the matrices of a model with weights like w into:
    one per thread for float32 on a CPU, else 1 (measured: see above)."""
    return torch.get_num_threads() if w.device.type == "cpu" and w.dtype == torch.float32 else 1


def repacks(model: Qwen3, rows: int) -> bool:
    """Whether decoding `rows` sequences reads A4's repacked copy of the weights (else views of them)."""
    w = model.lm_head.weight
    matrices = [p for p in model.model.layers.parameters() if p.dim() == 2] + [w]  # what a step reads
    small = sum(p.numel() * p.element_size() for p in matrices) <= 256 * 2**20  # a copy's memory is affordable
    return rows == 1 and w.dtype == torch.float32 and w.device.type == "cpu" and small


REPACKED: "weakref.WeakKeyDictionary[Qwen3, tuple]" = weakref.WeakKeyDictionary()  # model -> (key, pins, copy)


@torch.no_grad()
def decode_weights(model: Qwen3, rows: int) -> DecodeWeights:
    """The weights decode_one reads for `rows` sequences: the model's repacked copy where `repacks`
    says so, made once and kept until a parameter changes, else views of the weights (no copy)."""
    params, k = list(model.parameters()), decode_blocks(model.lm_head.weight)
    key = (k, [(p.data_ptr(), p._version) for p in params])  # storage and in-place writes: what any change alters
    held = REPACKED.get(model)
    if held is not None and held[0] != key:
        del REPACKED[model]  # stale: free its memory before anything else
        held = None
    if not repacks(model, rows):
        return gather_decode_weights(model, k, repack=False)
    if held is None:
        # pins hold the storage the key names, so that no later tensor can be given its address while held
        pins = [p.detach() for p in params]
        held = REPACKED[model] = (key, pins, gather_decode_weights(model, k, repack=True))
    return held[2]


def gather_decode_weights(model: Qwen3, k: int, repack: bool) -> DecodeWeights:
    """model's weights as decode_one reads them, each matrix in k column blocks (fewer where k does not
    divide its width): contiguous copies with q/k/v and gate/up fused if repack, else views."""
    def blocks(w):  # nn.Linear's (out, in) weight as (k, in, out / k): a view, or repacked contiguous
        n = k if w.size(0) % k == 0 else 1
        v = w.view(n, w.size(0) // n, w.size(1)).transpose(1, 2)  # block b: rows b * out / n onwards of w, transposed
        return v.contiguous() if repack else v

    def side_by_side(*ws):  # (out_i, in) weights as one matrix of all the outputs, or a tuple of them
        return blocks(torch.cat(ws)) if repack else tuple(blocks(w) for w in ws)

    layers = []
    for layer in model.model.layers:
        a, mlp = layer.self_attn, layer.mlp
        qkv = (a.q_proj, a.k_proj, a.v_proj)
        layers.append(DecodeLayer(
            input_norm=layer.input_layernorm.weight, qkv=side_by_side(*(p.weight for p in qkv)),
            qkv_bias=torch.cat([p.bias for p in qkv]) if a.q_proj.bias is not None else None,
            qk_gain=torch.cat([a.q_norm.weight.expand(a.n_head, -1), a.k_norm.weight.expand(a.n_kv_head, -1)]),
            o=blocks(a.o_proj.weight), o_bias=a.o_proj.bias, post_norm=layer.post_attention_layernorm.weight,
            gate_up=side_by_side(mlp.gate_proj.weight, mlp.up_proj.weight), down=blocks(mlp.down_proj.weight),
            window=a.window))
    return DecodeWeights(layers, blocks(model.lm_head.weight))


@torch.no_grad()
def decode_one(model: Qwen3, token: torch.Tensor, cache: StaticKVCache) -> torch.Tensor:
    """model(token, cache)'s last logits for one new token per row, token (B, 1), on a filled cache:
    (B, vocab)."""
    c, m = model.config, model.model
    B, H, hd, eps = token.size(0), c.hidden_size, c.head_dim, c.rms_norm_eps
    nh, nkv = c.num_attention_heads, c.num_key_value_heads
    if cache.rope is None:  # once per generation, cos/sin for every position the cache can hold
        cache.rope = rope_tables(c, cache.keys[0].size(2), m.embed_tokens.weight.dtype, token.device)
    position = torch.tensor([cache.seen_tokens], device=token.device)  # (1,)
    if cache.pad is not None:
        position = position - cache.pad  # (B,): each row counts its own tokens (section 6)
    cos, sin = (t[position].view(-1, 1, hd) for t in cache.rope)  # (1 or B, 1, hd)
    masks = {}  # left padding only: per number of keys, the same for every layer that sees as many
    x = m.embed_tokens(token[:, 0])  # (B, hidden)
    for i, w in enumerate(cache_weights(model, cache).layers):
        h = F.rms_norm(x, (H,), w.input_norm, eps)
        qkv = project(h, w.qkv, w.qkv_bias)  # (B, (nh + 2 nkv) hd)
        qk = F.rms_norm(qkv[:, :(nh + nkv) * hd].view(B, nh + nkv, hd), (hd,), None, eps) * w.qk_gain  # QK-norm
        qk = torch.addcmul(qk * cos, qk.roll(hd // 2, -1), sin)  # apply_rope, on every query and key head at once
        q, k = qk[:, :nh, None], qk[:, nh:, None]  # (B, nh, 1, hd), (B, nkv, 1, hd)
        k, v = cache.update(i, k, qkv[:, (nh + nkv) * hd:].view(B, nkv, 1, hd))  # (B, nkv, S, hd)
        mask = None  # S keys within the window: no mask, unless rows are padded
        if cache.pad is not None:
            S = k.size(2)
            if S not in masks:
                masks[S] = latest_keys_mask(position[:, None], S, w.window)  # (B, 1, 1, S)
            mask = masks[S]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=nkv != nh)  # (B, nh, 1, hd)
        x += project(y.view(B, nh * hd), w.o, w.o_bias)  # (B, nh, 1, hd) is (B, nh * hd) in memory
        h = F.rms_norm(x, (H,), w.post_norm, eps)
        gate, up = project(h, w.gate_up).chunk(2, dim=-1)
        x += project(F.silu(gate).mul_(up), w.down)
    cache.seen_tokens += 1
    if x.dtype == torch.float16:
        check_float16(x)  # A3
    return decode_logits(model, F.rms_norm(x, (H,), m.norm.weight, eps), cache)


def cache_weights(model: Qwen3, cache: StaticKVCache) -> DecodeWeights:
    """decode_weights for the rows of this cache, fetched once per generation."""
    if cache.weights is None:
        cache.weights = decode_weights(model, cache.keys[0].size(0))
    return cache.weights


def decode_logits(model: Qwen3, h: torch.Tensor, cache: StaticKVCache) -> torch.Tensor:
    """lm_head(h) for final hidden states h (B, hidden), the head read as A4 reads it: (B, vocab)."""
    return project(h, cache_weights(model, cache).head)


# %% A5. Newton-Schulz on the Gram matrix
# Each step of section 10's iteration multiplies the whole (rows, cols) matrix twice: A = X X^T and
# h(A) X, with h(A) = a I + b A + c A^2. But every iterate is a polynomial in A_0 = X_0 X_0^T times
# X_0: X_k = Q_k X_0, and the Gram matrices follow without X at all, A_{k+1} = h(A_k) A_k h(A_k).
# So iterate on (rows, rows) matrices only, Q_{k+1} = h(A_k) Q_k, and touch X twice in all: for
# A_0 and for the result Q_5 X_0. Per matrix, in units of rows^3 multiply-adds, five steps cost
# 10 (cols/rows) + 5 that way and 2 (cols/rows) + 17 this way: a third less for the 128 x 384
# matrices of train.py's CPU model, equal at cols = 1.5 rows, so it is taken from 2 on. The same
# X up to rounding in fp32 (tests/test_qwen3.py holds both to an fp64 run). In half precision the
# Gram form drifts (spurious negative eigenvalues) unless restarted, as the authors of "Gram
# Newton-Schulz" found on GPUs (Amsel, Chen, Dao et al. 2026, tridao.me/blog/2026/gram-newton-schulz),
# so bf16 keeps section 10's loop.


def gram_newton_schulz(X: torch.Tensor, steps: int, coefficients) -> torch.Tensor:
    """zeropower_via_newtonschulz's iterate for X (n, rows, cols), normalised, wide: Q X."""
    a, b, c = coefficients
    A, Q = X @ X.mT, None  # (n, rows, rows)
    for i in range(steps):
        h = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b A + c A^2
        h.diagonal(dim1=-2, dim2=-1).add_(a)  # + a I: h(A), this step's polynomial
        Q = h if Q is None else h @ Q  # X_{i+1} = h(A_i) X_i = (h(A_i) Q_i) X_0
        if i < steps - 1:
            A = h @ (A @ h)  # X_{i+1} X_{i+1}^T = h A_i h
    return Q @ X
