"""
The chapter's border with the outside world: what qwen3.py refuses, and how.

A config.json can hold a string where a number belongs, a weight index can name ../../etc/passwd, a
"file" can be a named pipe that blocks its reader forever, a prompt can ask for 10**9 new tokens.
qwen3.py stays the story of the model and calls these checks where its input arrives; each refuses
with one ValueError whose message is one line (CheckpointError for a checkpoint folder), which the
scripts print as it is. Nothing here imports the chapter. The tests give each check its bad input.
"""

import json
import math
from pathlib import Path

import torch


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message is one line naming the file."""


# %% A configuration


def check_config(c):
    """Every field of a Qwen3Config, its type and range, and how the fields fit together: a ValueError
    naming the first that does not. A string where a boolean belongs must not read as true, nor a NaN
    theta as a number."""
    def need(names: str, ok, what: str):
        for name in names.split():
            if not ok(getattr(c, name)):
                raise ValueError(f"{name} must be {what}, got {getattr(c, name)!r}")

    def integer(v, lo=0):
        return isinstance(v, int) and not isinstance(v, bool) and lo <= v < 2**31

    def number(v, hi=math.inf):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < hi
    need("vocab_size hidden_size intermediate_size num_hidden_layers num_attention_heads num_key_value_heads "
         "head_dim max_position_embeddings num_experts_per_tok moe_intermediate_size decoder_sparse_step",
         lambda v: integer(v, 1), "an integer in [1, 2**31)")
    need("num_experts max_window_layers", integer, "an integer in [0, 2**31)")
    need("rope_theta rms_norm_eps initializer_range", lambda v: number(v) and v > 0, "a finite number > 0")
    need("dropout", lambda v: number(v, 1.0), "a number in [0, 1)")
    need("router_aux_loss_coef", number, "a finite number >= 0")
    need("tie_word_embeddings attention_bias use_sliding_window norm_topk_prob output_router_logits "
         "router_aux_loss_per_layer",
         lambda v: isinstance(v, bool), "true or false")
    need("sliding_window", lambda v: integer(v, 1) or (v is None and not c.use_sliding_window), "a positive integer")
    need("layer_types", lambda v: v is None or (isinstance(v, list) and len(v) == c.num_hidden_layers and set(v) <= {
        "full_attention", "sliding_attention"}), f"null or {c.num_hidden_layers} of 'full_attention'/'sliding_attention'")
    need("mlp_only_layers", lambda v: isinstance(v, list) and all(integer(i) for i in v), "a list of layer indices")
    need("bos_token_id pad_token_id", lambda v: v is None or integer(v), "null or a token id")
    need("eos_token_id", lambda v: v is None or integer(v) or (isinstance(v, list) and all(map(integer, v))),
         "null, a token id or a list of them")
    if c.num_attention_heads % c.num_key_value_heads or c.head_dim % 2:
        raise ValueError(f"num_attention_heads ({c.num_attention_heads}) must be a multiple of num_key_value_heads "
                         f"({c.num_key_value_heads}), and head_dim ({c.head_dim}) even for RoPE")
    if c.num_experts and c.num_experts_per_tok > c.num_experts:
        raise ValueError(f"num_experts_per_tok ({c.num_experts_per_tok}) must be at most num_experts ({c.num_experts})")
    if c.num_experts and len({c.layer_window(i) for i in range(c.num_hidden_layers)}) > 1:
        raise ValueError("a mixture of experts slides in every layer or in none (as transformers' Qwen3-MoE)")


# %% Checkpoint files


def read_json(path: Path, limit: int = 2**24):
    """A small JSON file, refused (ValueError) if it is not a regular file of at most `limit` bytes: a
    named pipe would block the reader forever, /dev/zero fill its memory."""
    if not path.is_file() or path.stat().st_size > limit:
        raise ValueError(f"not a regular file of at most {limit:,} bytes")
    try:
        return json.loads(path.read_text())
    except RecursionError:  # nested thousands deep
        raise ValueError("nested too deep") from None


def read_weights(path: Path) -> dict:
    """Every tensor of a checkpoint folder, on the CPU, as stored: model.safetensors, or the shards
    that model.safetensors.index.json's weight_map names (files of this folder only)."""
    from safetensors.torch import load_file
    index = path / "model.safetensors.index.json"
    try:
        files = sorted(set(read_json(index)["weight_map"].values())) if index.exists() else \
            ["model.safetensors"] if (path / "model.safetensors").exists() else None
        elsewhere = [f for f in files or () if not isinstance(f, str) or Path(f).name != f]  # ../x, /etc/x, 3
        if elsewhere:
            raise ValueError(f"its weight_map names {elsewhere[0]!r}, not a file of this folder")
    except (ValueError, KeyError, AttributeError, TypeError) as e:
        raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
    if files is None:
        raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")
    state = {}
    for file in files:
        try:
            if not (path / file).is_file():  # a named pipe would block forever
                raise ValueError("not a regular file")
            state.update(load_file(path / file))
        except Exception as e:  # safetensors raises several types for truncated or garbled files
            why = " ".join(str(e).split()) or type(e).__name__
            raise CheckpointError(f"{path / file}: unreadable safetensors file ({why})") from None
    odd = next((k for k, v in state.items() if not v.is_floating_point()), None)
    if odd:
        raise CheckpointError(f"{path}: {odd} holds {state[odd].dtype} values, not floating point weights")
    return state


def check_layers(state: dict, num_hidden_layers: int, path):
    """The weights hold exactly the layers config.json declares: checked before a model of that many is built."""
    layers = {int(k.split(".")[2]) for k in state if k.startswith("model.layers.") and k.split(".")[2].isdigit()}
    if layers != set(range(num_hidden_layers)):
        raise CheckpointError(f"{path}: config.json says {num_hidden_layers} layers, the weights hold {len(layers)}")


def check_shapes(state: dict, expected: dict, path):
    """The weights hold every name the model expects (name -> shape), no other, each of its shape."""
    missing = sorted(k for k in expected if state.get(k) is None)
    unexpected = sorted(k for k in state if k not in expected)
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise CheckpointError(f"{path}: weights do not match config.json ({what})")
    for k, shape in expected.items():
        if tuple(state[k].shape) != tuple(shape):
            raise CheckpointError(f"{path}: {k} has shape {list(state[k].shape)}, config.json implies {list(shape)}")


# %% Generation's arguments and output


def check_attention_mask(attention_mask, shape):
    """transformers' attention_mask for tokens of `shape` (B, T): only 0 (padding) and 1 (token), left padding."""
    if attention_mask.shape != shape:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, the tokens {tuple(shape)}")
    if not ((attention_mask == 0) | (attention_mask == 1)).all():
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (token)")
    real = attention_mask.bool()
    if (real[:, :-1] & ~real[:, 1:]).any():
        raise ValueError("attention_mask must be left padding: in each row, all 0s before all 1s")


def check_decoding(max_position_embeddings: int, idx, max_new_tokens, temperature, top_k, top_p, attention_mask):
    """Refuse, before any work, what would fail deep inside, quietly do the wrong thing, or ask for
    memory out of proportion (a cache for 10**9 tokens)."""
    if not (isinstance(idx, torch.Tensor) and idx.dim() == 2 and not idx.is_floating_point()):
        raise ValueError(f"the prompt must be token ids of shape (B, T), got {getattr(idx, 'shape', type(idx))}")
    if idx.size(1) == 0:
        raise ValueError("the prompt is empty: give at least one token (a BOS, say)")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if idx.size(1) + max_new_tokens > max_position_embeddings:
        raise ValueError(f"the prompt ({idx.size(1)} tokens) and max_new_tokens ({max_new_tokens}) exceed the model's "
                         f"context of {max_position_embeddings} tokens (max_position_embeddings)")
    check_sampling(temperature, top_k, top_p)
    if attention_mask is not None:
        check_attention_mask(attention_mask, idx.shape)
        if not attention_mask[:, -1].all():  # left padding: a row with a token has one last
            raise ValueError("every row of attention_mask needs a token (1)")


def check_sampling(temperature, top_k, top_p):
    """next_token_probs' settings: a negative temperature would invert the distribution, a top_p of 0
    asks for no probability mass at all; NaN is refused too. top_k and top_p may be None (off)."""
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and not top_k >= 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if top_p is not None and not top_p > 0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def check_finite(logits):
    """A broken model (NaN weights, an overflow) says so: else greedy decoding emits token 0, and
    sampling fails deep inside torch.multinomial."""
    if not torch.isfinite(logits).all():
        raise FloatingPointError("the model produced NaN or infinite logits: its weights are broken, or overflowed")
