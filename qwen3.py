"""
Qwen3, from scratch, in one file: read it top to bottom.

     1. Configuration       every number that defines a Qwen3
     2. RMSNorm             the normalisation used everywhere
     3. RoPE                where a token is; YaRN, to read past the trained length
     4. Attention           grouped-query, with QK-norm and optional sliding windows
     5. SwiGLU MLP          the feed-forward half of a block
     6. Mixture of experts  a router and many small MLPs (Qwen3-MoE)
     7. The model           blocks stacked into Qwen3: logits, loss, padded batches
     8. KV cache            decoding without recomputing the past
     9. Sampling            temperature, top-k, top-p, and the generation loop
    10. Checkpoints         Hugging Face's format, both ways
    11. Optimizers          Muon for the hidden matrices, AdamW for the rest

It is also the spec: with the same weights its logits equal transformers' Qwen3ForCausalLM and
Qwen3MoeForCausalLM (tests/), and its module names are their state-dict keys. engine.py computes
the same things faster, each switched on by one explicit call in the scripts.
Reference: Qwen Team, "Qwen3 Technical Report", 2025 (arXiv:2505.09388).
"""

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import guards  # what a user or a file can get wrong (a hostile config.json, a prompt past the context), refused

# %% 1. Configuration
# A Qwen3 is a handful of numbers, named as transformers names them. Two surprises: `head_dim` is its
# own field (Qwen3-0.6B: 16 heads of 128 = 2048, hidden size 1024), and there are fewer key/value
# heads than query heads.


@dataclass
class Qwen3Config:
    vocab_size: int = 49152  # rows of the embedding table and of the output head
    hidden_size: int = 384  # width of the residual stream, "d_model"
    intermediate_size: int = 1536  # width of the MLP's hidden layer
    num_hidden_layers: int = 6  # transformer blocks
    num_attention_heads: int = 8  # query heads
    num_key_value_heads: int = 4  # key/value heads, each shared by a group of query heads (GQA)
    head_dim: int = 48  # width of one head
    max_position_embeddings: int = 512  # the longest context the model is meant to see
    rope_theta: float = 10_000.0  # RoPE's base; real Qwen3 uses 1e6
    rope_scaling: dict | None = None  # YaRN's parameters (section 3), or None
    rms_norm_eps: float = 1e-6  # keeps RMSNorm finite for all-zero inputs
    tie_word_embeddings: bool = True  # the output head reuses the embedding matrix
    attention_bias: bool = False  # biases on the q/k/v/o projections (Qwen3: none)
    dropout: float = 0.0  # on attention probabilities and residual branches, in training
    use_sliding_window: bool = False  # the master switch of sliding-window attention
    sliding_window: int | None = 4096  # W: a query sees the W latest keys, itself included
    max_window_layers: int = 28  # layers i >= this slide (transformers' rule)
    layer_types: list[str] | None = None  # or explicitly, "full_attention"/"sliding_attention" per layer
    initializer_range: float = 0.02  # std of the random initial weights
    num_experts: int = 0  # experts in each sparse layer (section 6); 0: a dense model, an MLP in every layer
    num_experts_per_tok: int = 8  # k: the experts each token is routed to
    moe_intermediate_size: int = 768  # width of one expert's MLP
    norm_topk_prob: bool = False  # rescale a token's k routing weights to sum to 1
    decoder_sparse_step: int = 1  # layer i is sparse when (i + 1) is a multiple of this ...
    mlp_only_layers: list[int] = field(default_factory=list)  # ... and i is not listed here
    router_aux_loss_coef: float = 0.001  # the weight of the load-balancing loss ...
    output_router_logits: bool = False  # ... added to the loss when this is on (transformers' name)
    router_aux_loss_per_layer: bool = False  # balance each layer, not all together (section 6; ours)
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        guards.check_config(self)  # every field's type and range: a config.json may hold anything
        if self.rope_scaling is not None:  # completed with YaRN's defaults, once (section 3)
            self.rope_scaling = yarn_parameters(self.rope_scaling, self.max_position_embeddings)
        if self.num_experts and self.layer_types is not None:  # Qwen3-MoE has no per-layer types
            self.use_sliding_window, self.layer_types = self.layer_window(0) is not None, None

    def layer_window(self, i: int) -> int | None:
        """The sliding window of layer i, or None if it sees the whole past."""
        if not self.use_sliding_window:
            return None
        if self.layer_types is not None:
            return self.sliding_window if self.layer_types[i] == "sliding_attention" else None
        if self.num_experts:
            return self.sliding_window  # transformers' Qwen3-MoE slides in every layer
        return self.sliding_window if i >= self.max_window_layers else None

    def is_sparse(self, i: int) -> bool:
        """Whether layer i is a mixture of experts rather than one MLP."""
        return self.num_experts > 0 and i not in self.mlp_only_layers and (i + 1) % self.decoder_sparse_step == 0

    @classmethod
    def preset(cls, name: str, **overrides) -> "Qwen3Config":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


PRESETS = {
    # The upstream "seed" model: small enough for one GPU in minutes, big enough to write English.
    "seed": dict(vocab_size=49152, hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=8,
                 num_key_value_heads=4, head_dim=48, max_position_embeddings=512),
    # What a laptop CPU trains best in ten minutes: small, shown many tokens (Hoffmann et al. 2022).
    "cpu": dict(vocab_size=8192, hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, head_dim=32, max_position_embeddings=256, tie_word_embeddings=False),
    # The real Qwen3-0.6B, and Qwen3-30B-A3B (30B parameters, 3B active a token; for loading).
    "qwen3-0.6b": dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                       rope_theta=1e6, tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645),
    "qwen3-30b-a3b": dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=48,
                          num_attention_heads=32, num_key_value_heads=4, head_dim=128, max_position_embeddings=40960,
                          rope_theta=1e6, tie_word_embeddings=False, num_experts=128, num_experts_per_tok=8,
                          moe_intermediate_size=768, norm_topk_prob=True, bos_token_id=151643, eos_token_id=151645),
}
# cpu with each MLP as 8 experts of half its width, 2 a token: as many active parameters, 4x the MLPs'.
# Each layer balanced on its own, at the Switch Transformer's weight (README, "Mixture of experts").
PRESETS["cpu-moe"] = dict(PRESETS["cpu"], num_experts=8, num_experts_per_tok=2, moe_intermediate_size=192,
                          norm_topk_prob=True, output_router_logits=True, router_aux_loss_coef=0.01,
                          router_aux_loss_per_layer=True)

# %% 2. RMSNorm
# Zhang & Sennrich 2019: LayerNorm without the mean. Scale each vector to unit root-mean-square,
# then multiply by a learned gain; cheaper, and as stable. The statistic is taken in fp32 even for
# bf16 activations: a sum of thousands of bf16 squares keeps few of its digits.


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))  # starts as the identity
        self.eps = eps

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)  # back to the input's dtype, then the gain (transformers' order)


# %% 3. RoPE: rotary position embeddings
# Su et al. 2021, "RoFormer". Attention alone is blind to order. RoPE rotates each query and key by
# an angle proportional to its position, pair of dimensions by pair, pair i at frequency
# theta^(-2i/d): the dot product of two rotated vectors then depends only on their offset. Qwen3
# pairs dimension i with i + d/2 ("rotate half"). Angles are computed in fp32 from integer
# positions: in bf16 (8 bits) an angle at position 1000 could be off by 2 radians.


def rope_cos_sin(positions, head_dim: int, theta: float, dtype=torch.float32, rope_scaling=None):
    """cos and sin of every angle, (..., head_dim), for integer positions (...,). rope_scaling:
    None, or YaRN's parameters as yarn_parameters completes them."""
    powers = theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=positions.device) / head_dim)
    inv_freq, scale = 1.0 / powers, 1.0  # (head_dim/2,): radians per position of each pair
    if rope_scaling is not None:  # YaRN: each pair between its own frequency and 1/factor of it
        keep = yarn_ramp(head_dim, theta, rope_scaling).to(positions.device)
        inv_freq = inv_freq * keep + 1.0 / (rope_scaling["factor"] * powers) * (1 - keep)
        scale = rope_scaling["attention_factor"]
    angles = positions.float()[..., None] * inv_freq  # (..., head_dim/2)
    angles = torch.cat((angles, angles), dim=-1)  # (..., head_dim): pairs i and i + d/2 share an angle
    return (angles.cos() * scale).to(dtype), (angles.sin() * scale).to(dtype)


def apply_rope(x, cos, sin):
    """Rotate x (B, n_head, T, head_dim) by the angles of its positions."""
    x1, x2 = x.chunk(2, dim=-1)  # each (B, n_head, T, head_dim/2)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


# YaRN (Peng et al. 2023) is how Qwen3 reads past the L tokens it was trained on (32k to 128k, factor
# s = 4). Past L the slow pairs reach angles training never showed; dividing every frequency by s
# (Chen et al. 2023) blurs the fast pairs that tell neighbours apart. YaRN keeps pairs that turn more
# than beta_fast (32) times within L, divides those that turn fewer than beta_slow (1) times by s,
# blends those between, and scales q and k by 0.1 ln(s) + 1 (longer contexts flatten the softmax).

YARN_KEYS = ("rope_type", "factor", "original_max_position_embeddings", "attention_factor", "beta_fast",
             "beta_slow", "mscale", "mscale_all_dim", "truncate")


def yarn_parameters(p: dict, max_position_embeddings: int) -> dict:
    """A YaRN rope_scaling dict, checked and completed with transformers' defaults (ValueError if bad)."""
    if not isinstance(p, dict) or p.get("rope_type") != "yarn":
        raise ValueError(f"RoPE type {p.get('rope_type') if isinstance(p, dict) else p!r} is not supported "
                         f"(only 'default' and 'yarn')")
    if set(p) - set(YARN_KEYS):
        raise ValueError(f"unknown YaRN parameter(s) {', '.join(sorted(set(p) - set(YARN_KEYS)))}")

    def number(name, default=None):
        value = default if p.get(name) is None else p[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise ValueError(f"YaRN {name} must be a positive number, got {p.get(name)!r}")
        return float(value)
    factor, original = number("factor"), number("original_max_position_embeddings", max_position_embeddings)
    beta_fast, beta_slow, truncate = number("beta_fast", 32.0), number("beta_slow", 1.0), p.get("truncate", True)
    if factor < 1 or original != int(original) or beta_fast <= beta_slow or not isinstance(truncate, bool):
        raise ValueError(f"YaRN needs factor >= 1, an integer original_max_position_embeddings, beta_fast > beta_slow "
                         f"and a true/false truncate; got {factor:g}, {original:g}, {beta_fast:g}, {beta_slow:g}, {truncate!r}")

    def mscale(m):  # the paper's sqrt(1/t) = 0.1 ln(s) + 1, with DeepSeek's optional multiplier m
        return 0.1 * m * math.log(factor) + 1.0
    use_mscales = p.get("attention_factor") is None and p.get("mscale") and p.get("mscale_all_dim")
    attention = mscale(number("mscale")) / mscale(number("mscale_all_dim")) if use_mscales else \
        number("attention_factor", mscale(1.0))
    return dict(rope_type="yarn", factor=factor, original_max_position_embeddings=int(original),
                attention_factor=attention, beta_fast=beta_fast, beta_slow=beta_slow, truncate=truncate)


def yarn_ramp(head_dim: int, theta: float, p: dict) -> torch.Tensor:
    """(head_dim/2,) per pair: 1 keeps its frequency, 0 divides it by the factor, linear between."""
    # Pair i turns L theta^(-2i/d) / 2pi times within L; it turns r times at i = d ln(L / 2pi r) / 2 ln theta.
    # As in the paper's code and transformers, rounded outwards to whole pairs unless truncate is false.
    def pair_turning(r):
        return head_dim * math.log(p["original_max_position_embeddings"] / (2 * math.pi * r)) / (2 * math.log(theta))
    lo, hi = pair_turning(p["beta_fast"]), pair_turning(p["beta_slow"])  # lo < hi: pair 0 turns fastest
    if p["truncate"]:
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, head_dim - 1)
    width = hi - lo if hi != lo else 1e-3  # lo == hi: a step at lo
    return 1 - ((torch.arange(head_dim // 2, dtype=torch.float) - lo) / width).clamp(0, 1)


# %% 4. Attention: grouped-query, QK-norm, optional sliding window
# Scaled dot-product attention (Vaswani et al. 2017) with three refinements:
# - Grouped-query attention (Ainslie et al. 2023): query head h reads kv head h // (n_head / n_kv),
#   so the KV cache shrinks by that factor at almost no cost in quality (1 kv head: Shazeer 2019).
# - QK-norm (Dehghani et al. 2023; new in Qwen3): RMSNorm on every query and key head before RoPE
#   bounds the attention logits, which keeps training stable at high learning rates.
# - Sliding windows (Beltagy et al. 2020; Mistral 2023): a layer sees only the W latest tokens, its
#   cost and cache bounded. Off in Qwen3's releases; configurable.


def can_attend(q_pos, k_pos, window: int | None) -> torch.Tensor:
    """(..., Tq, Tk) bool for positions (..., Tq) and (..., Tk), True where a query may see a key:
    not in its future, within the window if any. Negative positions are left padding (section 7):
    no token sees one, and a padding query sees only padding (its output is never used, but a
    softmax over no keys at all would be NaN)."""
    offset = q_pos[..., :, None] - k_pos[..., None, :]  # how far back each key lies
    allowed = offset >= 0
    if window is not None:
        allowed &= offset < window  # W keys: the query itself and W - 1 before it
    return allowed & ((k_pos[..., None, :] >= 0) | (q_pos[..., :, None] < 0))


class Attention(nn.Module):
    def __init__(self, config: Qwen3Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = (config.num_attention_heads, config.num_key_value_heads,
                                                      config.head_dim)
        self.window = config.layer_window(layer_idx)
        self.dropout = config.dropout
        H, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(H, self.n_head * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(H, self.n_kv_head * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(H, self.n_kv_head * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, H, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(self, x, cos, sin, positions, cache=None):
        """x (B, T, hidden) at positions (T,), or (B, T) when rows are left-padded (section 7)."""
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.n_head, self.head_dim)).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_norm(self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim)).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # the cached past, then these: (B, nkv, S, hd)
        S = k.size(2)
        if S == T and positions.dim() == 1 and (self.window is None or self.window >= T):
            mask, causal = None, True  # no past, no padding, no window inside: the kernel's own causal mask
        else:  # the S keys hold the S latest positions, up to the last query's
            k_pos = positions[..., -1:] + torch.arange(1 - S, 1, device=x.device)  # (S,), or (B, S)
            mask, causal = can_attend(positions, k_pos, self.window), False  # (T, S), or (B, T, S)
            mask = mask[:, None] if positions.dim() == 2 else mask  # (B, 1, T, S): the same for every head
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0.0,
                                           enable_gqa=self.n_kv_head != self.n_head)  # (B, nh, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


# %% 5. SwiGLU MLP
# Shazeer 2020, "GLU Variants Improve Transformer": a SiLU-activated "gate" projection multiplies a
# linear "up" projection elementwise, then "down": a third matrix, for a better loss per FLOP.


class MLP(nn.Module):
    def __init__(self, config: Qwen3Config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# %% 6. Mixture of experts
# Shazeer et al. 2017: in place of one MLP, E small ones (experts) and a router that sends each
# token to k of them, so a layer holds E experts' parameters while a token pays for k (Qwen3-30B-A3B:
# 128 experts, 8 a token; 30B parameters, 3B active). The router ("gate") gives one logit per
# expert; softmax in fp32, the k likeliest kept, their probabilities (renormalised with
# norm_topk_prob) weighting the chosen experts' outputs. No shared expert (Qwen2-MoE had one).
# Left alone, a router sends most tokens to the experts that learned first, which then learn
# fastest. The Switch Transformer's load-balancing loss (Fedus et al. 2021) pushes back: E sum_e
# f_e P_e, f_e the share of routing slots expert e took, P_e its mean router probability (uniform
# routing scores k). transformers counts the slots of all sparse layers together, as if expert e of
# each layer were one expert, so one layer's favourite can hide another's neglect; the paper adds
# a loss per layer (router_aux_loss_per_layer). engine.moe_forward groups the tokens by expert.


class Experts(nn.Module):
    """E SwiGLU MLPs, their weights stacked: expert e's gate_proj is gate_proj[e] (as transformers
    holds them in memory; files hold one tensor per expert, section 10)."""

    def __init__(self, config: Qwen3Config):
        super().__init__()
        E, H, I = config.num_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_proj, self.up_proj = nn.Parameter(torch.empty(E, I, H)), nn.Parameter(torch.empty(E, I, H))
        self.down_proj = nn.Parameter(torch.empty(E, H, I))

    def forward(self, h, e: int):
        """Expert e's MLP on h (n, hidden)."""
        return F.linear(F.silu(F.linear(h, self.gate_proj[e])) * F.linear(h, self.up_proj[e]), self.down_proj[e])


class MoE(nn.Module):
    """A sparse layer, in place of the MLP. Its last router logits stay in .router_logits (N, E): the
    load-balancing loss and the expert-load statistics read them."""

    def __init__(self, config: Qwen3Config):
        super().__init__()
        self.top_k, self.norm_topk_prob = config.num_experts_per_tok, config.norm_topk_prob
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)  # the router
        self.experts = Experts(config)
        self.router_logits = None

    def route(self, h):
        """h (N, hidden) -> router logits (N, E), and each token's k weights and experts (N, k)."""
        logits = self.gate(h)
        return logits, *self.choose(logits)

    def choose(self, logits):
        """Router logits (N, E) -> each token's k weights (in the logits' dtype) and experts (N, k)."""
        weights, chosen = logits.float().softmax(dim=-1).topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(logits.dtype), chosen

    def forward(self, x):
        h = x.flatten(0, 1)  # (N, hidden): every token routed on its own
        self.router_logits, weights, chosen = self.route(h)
        y = torch.zeros_like(h)
        for e in chosen.unique().tolist():  # each expert that received tokens, once, on all of them
            token, slot = torch.where(chosen == e)
            y.index_add_(0, token, self.experts(h[token], e) * weights[token, slot, None])
        return y.view_as(x)


def load_balancing_loss(router_logits: list, top_k: int, attention_mask=None, per_layer: bool = False):
    """The Switch Transformer's auxiliary loss over the router logits (N, E) of every sparse layer,
    counted over all of them together (transformers'), or per_layer, each layer's, averaged;
    attention_mask (B, T) leaves padding out."""
    if per_layer:
        return torch.stack([load_balancing_loss([r], top_k, attention_mask) for r in router_logits]).mean()
    logits = torch.cat(router_logits)  # (layers * N, E)
    keep = torch.ones(len(logits), device=logits.device) if attention_mask is None else \
        attention_mask.flatten().float().repeat(len(router_logits))
    probs = logits.float().softmax(dim=-1)
    slots = F.one_hot(probs.topk(top_k, dim=-1).indices, logits.size(-1)).sum(1).float()  # (rows, E): k ones a row
    f = (slots * keep[:, None]).sum(0) / keep.sum()  # slots each expert took, per token (sums to k)
    P = (probs * keep[:, None]).sum(0) / keep.sum()  # mean router probability of each expert
    return logits.size(-1) * (f * P).sum()


# %% 7. The model
# A pre-norm transformer (Xiong et al. 2020): each block normalises its input, computes a branch
# (attention, then the MLP) and adds it to the residual stream, so gradients flow straight through
# from the loss to the embeddings; a final RMSNorm and a linear head give next-token logits. Prompts
# of different lengths share a batch left-padded, with transformers' attention_mask (1: token, 0:
# padding): each row counts positions from its first token, and can_attend hides the padding.


def left_padding(attention_mask, shape) -> torch.Tensor:
    """(B, T) mask of 1 (token) and 0 (padding) for input_ids of `shape` -> (B,) padding tokens a row."""
    guards.check_attention_mask(attention_mask, shape)  # 0s and 1s, 0s first
    return (attention_mask == 0).sum(dim=1)


class Block(nn.Module):
    def __init__(self, config: Qwen3Config, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MoE(config) if config.is_sparse(layer_idx) else MLP(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, cos, sin, positions, cache=None):
        x = x + self.dropout(self.self_attn(self.input_layernorm(x), cos, sin, positions, cache))
        return x + self.dropout(self.mlp(self.post_attention_layernorm(x)))


class Qwen3Model(nn.Module):
    """The transformer body: token ids (B, T) -> final hidden states (B, T, hidden)."""

    def __init__(self, config: Qwen3Config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids, cache=None, attention_mask=None):
        """attention_mask (B, T): 1 for tokens, 0 for left padding. With a cache it goes with the
        first call (the prompt) only: the cache keeps each row's padding, later tokens are real."""
        start = cache.seen_tokens if cache is not None else 0  # positions go on after the cache's
        pad = left_padding(attention_mask, input_ids.shape) if attention_mask is not None else None  # (B,)
        if cache is not None:
            if pad is not None and start:
                raise ValueError("attention_mask goes with the first call on a cache: padding opens a sequence")
            pad = cache.pad = pad if pad is not None else cache.pad
        x = self.embed_tokens(input_ids)  # (B, T, hidden)
        positions = torch.arange(start, start + input_ids.size(1), device=input_ids.device)  # (T,)
        if pad is not None:
            positions = positions - pad[:, None]  # (B, T): each row counts from its first token
        c = self.config
        cos, sin = rope_cos_sin(positions, c.head_dim, c.rope_theta, x.dtype, c.rope_scaling)  # for every layer
        if pad is not None:
            cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, hd): the same angles for every head
        for layer in self.layers:
            x = layer(x, cos, sin, positions, cache)
        if cache is not None:
            cache.seen_tokens += input_ids.size(1)
        return self.norm(x)


class Qwen3(nn.Module):
    """Qwen3ForCausalLM: `logits, loss = model(idx, targets)`; loss is None without targets."""

    def __init__(self, config: Qwen3Config):
        super().__init__()
        self.config = config
        self.model = Qwen3Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight  # one matrix reads and writes tokens
        # N(0, 0.02) everywhere, as transformers does; the two projections that write into the
        # residual stream get std / sqrt(2 * layers) (GPT-2), so the stream's variance does not grow
        # with depth. Gains start at one (RMSNorm).
        std, out_std = config.initializer_range, config.initializer_range / math.sqrt(2 * config.num_hidden_layers)
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=out_std if name.endswith(("o_proj", "down_proj")) else std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, Experts):
                for p in (module.gate_proj, module.up_proj, module.down_proj):
                    nn.init.normal_(p, mean=0.0, std=out_std if p is module.down_proj else std)

    def forward(self, input_ids, targets=None, cache=None, attention_mask=None):
        """input_ids (B, T) -> logits (B, T, vocab). targets (B, T): the next tokens (-100: not
        scored). engine.FusedLoss computes the same loss without holding the logits (training)."""
        logits = self.lm_head(self.model(input_ids, cache, attention_mask))  # (B, T, vocab)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
            loss = loss + self.aux_loss(attention_mask)
        return logits, loss

    def aux_loss(self, attention_mask=None):
        """The load-balancing loss of the last forward pass, times its weight, when it is on (else 0)."""
        balance = self.balance_loss(attention_mask)
        on = balance is not None and self.config.output_router_logits
        return self.config.router_aux_loss_coef * balance if on else 0.0

    def balance_loss(self, attention_mask=None):
        """The last forward pass's load-balancing loss, unweighted, counted as the config says; None if dense."""
        routers = [layer.mlp.router_logits for layer in self.model.layers if isinstance(layer.mlp, MoE)]
        c = self.config
        return load_balancing_loss(routers, c.num_experts_per_tok, attention_mask, c.router_aux_loss_per_layer) \
            if routers else None

    def num_params(self, active: bool = False) -> int:
        """Parameters, a tied matrix once; active: of each sparse layer's experts, only the k a token uses."""
        n = sum(p.numel() for p in self.parameters())
        experts = [layer.mlp.experts.gate_proj for layer in self.model.layers if isinstance(layer.mlp, MoE)]
        return n - sum(3 * w[0].numel() * (len(w) - self.config.num_experts_per_tok) for w in experts) if active else n


# %% 8. KV cache
# Token t+1 needs the keys and values of tokens 0..t, which never change once computed: the cache
# keeps them per layer, so each new token costs one row of work, not a pass over the sequence. A
# sliding layer keeps only the W - 1 its next query can see: bounded memory however long it runs.
# engine.StaticKVCache allocates the whole length once and writes in place (the same keys).


class KVCache:
    def __init__(self, config: Qwen3Config):
        self.windows = [config.layer_window(i) for i in range(config.num_hidden_layers)]
        self.keys: list = [None] * config.num_hidden_layers  # each (B, n_kv, S, hd)
        self.values: list = [None] * config.num_hidden_layers
        self.seen_tokens = 0  # the position of the next token
        self.pad = None  # (B,) padding tokens opening each row, from the prompt's attention_mask

    def kept(self, layer: int, n: int) -> int:
        """Of the n latest keys, how many a later query of this layer can still see."""
        return n if self.windows[layer] is None else min(n, self.windows[layer] - 1)

    def update(self, layer: int, k, v):
        """Append new keys and values (B, n_kv, T, hd); return every key the new queries may see."""
        if self.keys[layer] is not None:
            k = torch.cat((self.keys[layer], k), dim=2)
            v = torch.cat((self.values[layer], v), dim=2)
        drop = k.size(2) - self.kept(layer, k.size(2))
        self.keys[layer], self.values[layer] = k[:, :, drop:], v[:, :, drop:]
        return k, v


# %% 9. Sampling
# The model gives a distribution over the next token. Temperature sharpens (< 1) or flattens (> 1)
# it, 0 takes the argmax (greedy); top-k (Fan et al. 2018) keeps the k likeliest tokens and top-p
# (Holtzman et al. 2019) the fewest whose mass reaches p, cutting the tail that derails samples.
# The order is transformers': temperature, top-k, top-p.


def top_k_filter(logits, k: int | None):
    """Set all but the k largest logits to -inf (ties with the k-th are kept); k 0 or None: keep all."""
    if not k or k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits, p: float | None):
    """Keep the fewest likeliest tokens whose probability mass reaches p (at least one)."""
    if p is None or p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.float().softmax(dim=-1)
    drop = probs.cumsum(dim=-1) - probs >= p  # the strictly likelier tokens hold p already
    drop[..., 0] = False  # the likeliest token stays, even for a p below fp32's resolution
    return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))  # back in vocabulary order


def next_token_probs(logits, temperature=1.0, top_k=None, top_p=None):
    """logits (B, vocab) -> the distribution the next token is drawn from, (B, vocab) fp32.
    Temperature 0 puts all the mass on the argmax (greedy)."""
    logits = logits.float()
    if temperature == 0 or 1 / temperature > torch.finfo(torch.float32).max:  # (1 / 1e-300 is no float32)
        return F.one_hot(logits.argmax(dim=-1), logits.size(-1)).float()
    # the best logit shifted to 0 before dividing: a tiny temperature then sends the others to -inf,
    # never the best to +inf, so its limit is greedy, as it should be
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    return top_p_filter(top_k_filter(logits, top_k), top_p).softmax(dim=-1)


def sample_next_token(logits, temperature=1.0, top_k=None, top_p=None, generator=None, probs=None):
    """logits (B, vocab) -> next token ids (B,). probs: their next_token_probs, if computed already."""
    if temperature == 0:
        return logits.argmax(dim=-1)  # greedy draws no random numbers
    probs = next_token_probs(logits, temperature, top_k, top_p) if probs is None else probs
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


# Generation: feed the prompt once (the "prefill"), which fills the cache, then one token at a
# time. A batch of prompts comes left-padded with its attention_mask (section 7). `decoder` is what
# computes the tokens: next_tokens below, or an engine.Engine, which computes the same tokens faster.


@torch.no_grad()
def next_tokens(model: Qwen3, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, generator=None,
                attention_mask=None, with_probs=False):
    """Yields, max_new_tokens times, the next tokens (B,) and, with_probs, the distributions
    (B, vocab) they were drawn from (else None)."""
    cache, x, mask = KVCache(model.config), idx, attention_mask
    for _ in range(max_new_tokens):
        h = model.model(x, cache, mask)[:, -1]  # (B, hidden): only the last position is continued
        logits = model.lm_head(h)  # (B, vocab)
        guards.check_finite(logits)  # NaN weights say so, rather than decode token 0 forever
        probs = next_token_probs(logits, temperature, top_k, top_p) if with_probs else None
        x, mask = sample_next_token(logits, temperature, top_k, top_p, generator, probs)[:, None], None  # (B, 1)
        yield x[:, 0], probs


def eos_ids(eos_token_id) -> list[int]:
    return [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)


@torch.no_grad()
def generate(model: Qwen3, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_token_id=None,
             generator=None, attention_mask=None, pad_token_id=None, decoder=next_tokens):
    """Continue idx (B, T) by up to max_new_tokens: (B, T + new). attention_mask (B, T): 1 for
    tokens, 0 for left padding. A row that has emitted an EOS is filled after it with pad_token_id,
    else the config's, else the first EOS id (transformers' rule); all rows done, it stops early.
    Call model.eval() first."""
    guards.check_decoding(model.config.max_position_embeddings, idx, max_new_tokens, temperature, top_k, top_p,
                   attention_mask)  # what would fail deep inside, refused before any work
    eos = torch.tensor(eos_ids(eos_token_id), dtype=torch.long, device=idx.device)
    fill = pad_token_id if pad_token_id is not None else model.config.pad_token_id
    fill = fill if fill is not None else eos[:1]
    out, done = [idx], torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
    for token, _ in decoder(model, idx, max_new_tokens, temperature, top_k, top_p, generator, attention_mask):
        if len(eos):
            token = torch.where(done, fill, token)
            done |= torch.isin(token, eos)
        out.append(token[:, None])
        if len(eos) and done.all():
            break
    return torch.cat(out, dim=1)


# %% 10. Checkpoints in Hugging Face's format
# A checkpoint is a folder: config.json and the weights in safetensors, tensors only (no pickle:
# loading cannot run code), in model.safetensors or in shards that model.safetensors.index.json
# names (guards.py reads them, refusing what is not a checkpoint in one line). The names are
# transformers', so nothing is renamed (experts aside: files hold one tensor per expert): a
# downloaded Qwen3 runs here, and ours run in transformers. config.json's wrinkles: where it is
# silent, transformers' defaults apply; RoPE is rope_theta + rope_scaling in transformers 4 and
# rope_parameters in 5: we write both, and read as transformers 5 does (a non-empty rope_scaling
# wins; a theta it lacks comes from rope_theta).


MOE_FIELDS = ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob", "decoder_sparse_step",
              "mlp_only_layers", "router_aux_loss_coef", "output_router_logits", "router_aux_loss_per_layer")
HF_DEFAULTS = {  # transformers' defaults for what a config.json leaves out
    "qwen3": dict(head_dim=128, rope_theta=10_000.0, max_position_embeddings=32768, tie_word_embeddings=False),
    "qwen3_moe": dict(rope_theta=10_000.0, max_position_embeddings=32768, tie_word_embeddings=False, num_experts=128,
                      num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=False, decoder_sparse_step=1,
                      mlp_only_layers=[], router_aux_loss_coef=0.001, output_router_logits=False),
}


def config_to_dict(config: Qwen3Config) -> dict:
    """config.json's contents, as transformers writes them: Qwen3's, or Qwen3-MoE's with experts."""
    moe = config.num_experts > 0
    d = {k: v for k, v in asdict(config).items() if k not in (("dropout", "max_window_layers", "layer_types")
                                                               if moe else ("dropout", *MOE_FIELDS))}
    if not moe:
        d["layer_types"] = ["full_attention" if config.layer_window(i) is None else "sliding_attention"
                            for i in range(config.num_hidden_layers)]
    rope = d["rope_scaling"] or {"rope_type": "default"}
    kind = ("Qwen3MoeForCausalLM", "qwen3_moe") if moe else ("Qwen3ForCausalLM", "qwen3")
    return {"architectures": [kind[0]], "model_type": kind[1], "hidden_act": "silu", **d,
            "attention_dropout": config.dropout, "rope_parameters": {**rope, "rope_theta": config.rope_theta}}


def config_from_dict(d: dict) -> Qwen3Config:
    """A Qwen3Config from config.json's contents (ValueError or TypeError if they do not make one)."""
    if not isinstance(d, dict):
        raise ValueError(f"expected a JSON object, got {type(d).__name__}")
    model_type = d.get("model_type", "qwen3")
    if model_type not in HF_DEFAULTS:
        raise ValueError(f"model_type is {model_type!r}, not 'qwen3' or 'qwen3_moe'")
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
    moe = model_type == "qwen3_moe"
    known = {f.name for f in fields(Qwen3Config)} - ({"max_window_layers", "layer_types"} if moe else set(MOE_FIELDS))
    d = {**d, "num_experts": d.get("num_experts", d.get("num_local_experts"))} if moe else d  # transformers 5 writes the latter
    kwargs = {**HF_DEFAULTS[model_type], **{k: v for k, v in d.items() if k in known and v is not None}}
    if "head_dim" not in kwargs:  # Qwen3-MoE's default (a wrong type is guards.check_config's to name)
        h, n = d["hidden_size"], d["num_attention_heads"]
        kwargs["head_dim"] = h // n if isinstance(h, int) and isinstance(n, int) and n > 0 else None
    kwargs["rope_theta"] = rope.get("rope_theta", kwargs["rope_theta"])
    kwargs["rope_scaling"] = None if rope_type == "default" else {  # Qwen3Config refuses all but YaRN
        **{k: v for k, v in rope.items() if k not in ("type", "rope_theta")}, "rope_type": rope_type}
    kwargs["dropout"] = d.get("attention_dropout", 0.0)
    kwargs.setdefault("num_key_value_heads", d["num_attention_heads"])
    return Qwen3Config(**kwargs)


def read_config(path) -> Qwen3Config:
    """A checkpoint's config.json (the file, or its folder); CheckpointError if unusable."""
    path = Path(path) / "config.json" if Path(path).is_dir() else Path(path)
    try:
        return config_from_dict(guards.read_json(path))
    except (ValueError, TypeError, OSError) as e:  # JSONDecodeError is a ValueError
        raise guards.CheckpointError(f"{path}: {' '.join(str(e).split())}") from None


def hf_config(config: Qwen3Config):
    """The same config as a transformers object (for its models; tests and benchmarks)."""
    import transformers
    kind = transformers.Qwen3MoeConfig if config.num_experts else transformers.Qwen3Config
    return kind.from_dict(config_to_dict(config))


def stack_experts(state: dict, config: Qwen3Config, path) -> dict:
    """Files hold one tensor per expert, mlp.experts.{e}.{proj}.weight (out, in); the model holds each
    sparse layer's experts stacked, mlp.experts.{proj} (E, out, in). Stacked in place."""
    for i in filter(config.is_sparse, range(config.num_hidden_layers)):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            keys = [f"model.layers.{i}.mlp.experts.{e}.{proj}.weight" for e in range(config.num_experts)]
            absent = [k for k in keys if k not in state]
            if absent:
                raise guards.CheckpointError(f"{path}: weights do not match config.json (missing {absent[:3]})")
            if len({state[k].shape for k in keys}) > 1:
                raise guards.CheckpointError(f"{path}: the experts' {proj} of layer {i} differ in shape")
            state[f"model.layers.{i}.mlp.experts.{proj}"] = torch.stack([state.pop(k) for k in keys])
    return state


def from_pretrained(path, dtype=None, device=None) -> Qwen3:
    """A transformers Qwen3 checkpoint folder as our model, in eval mode. dtype None: as stored."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise guards.CheckpointError(f"{path}: not a checkpoint directory (no config.json)")
    config, state = read_config(path), guards.read_weights(path)  # every tensor, refusing what is not a checkpoint
    guards.check_layers(state, config.num_hidden_layers, path)  # before building a model of that many layers
    state = stack_experts(state, config, path)
    with torch.device("meta"):  # shapes only: no time spent on random weights about to be replaced
        model = Qwen3(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # some exporters store the tied head anyway
        del expected["lm_head.weight"]  # the embedding, tied below
    guards.check_shapes(state, expected, path)  # every name, no other, each of its shape: one line if not
    state = {k: v.to(device=device, dtype=dtype or v.dtype) for k, v in state.items()}  # before tying: converted once
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight  # assign=True replaced both: tie again
    return model.eval()


def save_pretrained(model: Qwen3, path, dtype=None):
    """Write config.json, generation_config.json and model.safetensors into the folder `path`."""
    from safetensors.torch import save_file
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        del state["lm_head.weight"]  # stored once, as the embedding
    for key in [k for k in state if ".mlp.experts." in k]:  # one tensor per expert, as transformers' files
        folder, proj = key.rsplit(".", 1)
        state.update({f"{folder}.{e}.{proj}.weight": w.clone() for e, w in enumerate(state.pop(key))})
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    config = config_to_dict(model.config)
    config["dtype"] = config["torch_dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {k: getattr(model.config, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                  if getattr(model.config, k) is not None}
    (path / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


# %% 11. Optimizers: Muon for the hidden matrices, AdamW for the rest
# Muon (Keller Jordan 2024; the modded-nanogpt speedruns). SGD-momentum's updates put most of their
# energy in a few directions; Muon replaces each matrix's momentum by the nearest (semi-)orthogonal
# matrix, U V^T of its SVD, so every direction moves at the same rate. Five steps of a quintic
# Newton-Schulz iteration approximate it with matmuls, pushing the singular values into roughly
# (0.5, 1.5), which trains as well as exactly 1. bf16 on GPUs; fp32 on CPUs, which emulate bf16.
# The embedding (a lookup), the head and the gains go to AdamW (Loshchilov & Hutter 2019).
# engine.FastMuon computes the same with fewer FLOPs, and splits the work across ranks.


NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # a, b, c: the quintic a x + b x^3 + c x^5 applied to each singular value


def zeropower_via_newtonschulz(G, steps: int = 5, eps: float = 1e-7, dtype=torch.bfloat16):
    """Approximately orthogonalise each matrix of G (..., rows, cols): U S V^T -> U S' V^T, S' ~ 1."""
    a, b, c = NS_COEFFICIENTS
    X = G.to(dtype).reshape(-1, *G.shape[-2:])  # (n, rows, cols): a stack of matrices
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT  # the wide orientation: the Gram matrix X X^T is then the smaller one
    X = X / X.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # Frobenius >= spectral norm: s.v. <= 1
    for _ in range(steps):
        A = X @ X.mT
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b A + c A A, one rounding (as torch.optim.Muon)
        X = torch.baddbmm(X, B, X, beta=a)  # a X + b (X X^T) X + c (X X^T)^2 X: a quintic in the s.v.
    return (X.mT if tall else X).reshape(G.shape)


class Muon(torch.optim.Optimizer):
    """MomentUm Orthogonalized by Newton-Schulz, for matrices: 2-D parameters, and 3-D stacks of
    experts, each expert's matrix its own. Matrices of one shape are orthogonalised together, in one
    batched call. ns_dtype None: bf16 on GPUs, fp32 on CPUs."""

    def __init__(self, params, lr=0.02, momentum=0.95, weight_decay=0.0, nesterov=True, ns_steps=5, ns_dtype=None):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                                      ns_steps=ns_steps, ns_dtype=ns_dtype))
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim < 2:
                    raise ValueError(f"Muon takes matrices (or stacks of them), got shape {tuple(p.shape)}")

    def orthogonalize(self, updates, steps: int, dtype):
        """Newton-Schulz on a stack of updates (n, rows, cols)."""
        return zeropower_via_newtonschulz(updates, steps, dtype=dtype)

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            by_shape = {}
            for p in group["params"]:
                if p.grad is not None:
                    by_shape.setdefault(p.shape, []).append(p)
            for shape, params in by_shape.items():
                for p in params:  # momentum starts at zero, made once (a setdefault would build one every step)
                    if "momentum_buffer" not in self.state[p]:
                        self.state[p]["momentum_buffer"] = torch.zeros_like(p)
                grads, bufs = [p.grad for p in params], [self.state[p]["momentum_buffer"] for p in params]
                torch._foreach_lerp_(bufs, grads, 1 - group["momentum"])  # buf = beta buf + (1 - beta) g
                if group["nesterov"]:  # look ahead: (1 - beta) g + beta buf
                    updates = torch.stack(torch._foreach_lerp(grads, bufs, group["momentum"]))
                else:
                    updates = torch.stack(bufs)  # (n, ..., rows, cols): a stack of experts is a batch of matrices
                dtype = group["ns_dtype"] or (torch.float32 if updates.device.type == "cpu" else torch.bfloat16)
                updates = self.orthogonalize(updates, group["ns_steps"], dtype)
                scale = max(1.0, shape[-2] / shape[-1]) ** 0.5  # tall matrices: keep the update's RMS up
                torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])  # decoupled decay
                torch._foreach_add_(params, list(updates.unbind(0)), alpha=-group["lr"] * scale)


def configure_optimizers(model: Qwen3, optimizer: str = "muon", lr: float = 3e-3, muon_lr: float = 0.02,
                         weight_decay: float = 0.1, betas=(0.9, 0.95), eps: float = 1e-8, muon=Muon):
    """The optimizers that train `model`, a list to step together. "muon": Muon (or the class given
    as muon) on the matrices inside the blocks, AdamW on the embedding, the head, the routers and the
    gains; "adamw": AdamW on everything. A router is, like the head, a classifier (of experts, not
    tokens): Muon would equalise its logits' directions, which is not the point of it. Weight decay
    goes to matrices only: decaying gains and biases toward zero only fights the normalisation.
    Each group records `base_lr`, which a schedule multiplies."""
    if optimizer not in ("muon", "adamw"):
        raise ValueError(f"unknown optimizer {optimizer!r}; choose muon or adamw")
    params = {id(p): (name, p) for name, p in model.named_parameters()}.values()  # a tied matrix once

    def for_muon(name, p):
        return optimizer == "muon" and p.ndim >= 2 and name.startswith("model.layers.") and ".mlp.gate." not in name
    hidden = [p for name, p in params if for_muon(name, p)]
    decay = [p for name, p in params if p.ndim >= 2 and not for_muon(name, p)]
    no_decay = [p for name, p in params if p.ndim < 2]
    groups = [dict(params=decay, weight_decay=weight_decay, base_lr=lr), dict(params=no_decay, weight_decay=0.0, base_lr=lr)]
    fused = dict(fused=True) if {p.device.type for p in model.parameters()} <= {"cpu", "cuda", "mps"} else {}  # one kernel for all tensors
    optimizers = [torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **fused)]
    if optimizer == "muon":
        optimizers.insert(0, muon([dict(params=hidden, base_lr=muon_lr)], lr=muon_lr, weight_decay=weight_decay))
    return optimizers
