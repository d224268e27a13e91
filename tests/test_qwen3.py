"""Tests for qwen3.py against independent oracles: transformers' Qwen3ForCausalLM, torch.optim.Muon,
torch.nn.RMSNorm, brute-force attention and hand-computed distributions. fp32, CPU, offline."""
import dataclasses
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm, Qwen3RotaryEmbedding, apply_rotary_pos_emb

from guards import CheckpointError, check_finite, check_sampling
from qwen3 import (PRESETS, KVCache, Muon, Qwen3, Qwen3Config, RMSNorm, apply_rope, can_attend, config_from_dict,
                   config_to_dict, configure_optimizers, from_pretrained, generate, hf_config, next_token_probs,
                   read_config, rope_cos_sin, sample_next_token, save_pretrained, top_k_filter, top_p_filter,
                   zeropower_via_newtonschulz)
from sampling import stream

V = 101  # vocab of the tiny test models (conftest.TINY)
NEG_INF = float("-inf")


def rand_ids(shape, seed=0, vocab=V):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def sliding_layer_flags(hf_config):
    return [t == "sliding_attention" for t in hf_config.layer_types]


# %% logit parity with transformers

PARITY = {
    "gqa1": dict(num_attention_heads=4, num_key_value_heads=4),
    "gqa2": dict(),  # TINY: 4 query heads on 2 kv heads, 4 * 12 != hidden 32
    "gqa4": dict(num_attention_heads=8, num_key_value_heads=2),
    "mqa": dict(num_attention_heads=4, num_key_value_heads=1),
    "heads_narrower_than_hidden": dict(hidden_size=64, head_dim=8),  # 4 * 8 = 32 < 64
    "tied": dict(tie_word_embeddings=True),
    "attention_bias": dict(attention_bias=True),
    "theta_1e6_eps_1e-5": dict(rope_theta=1e6, rms_norm_eps=1e-5),
    "sliding_max_window_layers": dict(num_hidden_layers=3, use_sliding_window=True, sliding_window=4,
                                      max_window_layers=1),
    "sliding_layer_types": dict(num_hidden_layers=3, use_sliding_window=True, sliding_window=3,
                                layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
}
WINDOW_FIELDS = ("use_sliding_window", "sliding_window", "max_window_layers", "layer_types")


@pytest.mark.parametrize("name", PARITY)
def test_logits_match_transformers(name, model_pair, tiny_hf_config, assert_logits_close):
    hf, ours = model_pair(**PARITY[name])
    idx = rand_ids((2, 16))
    with torch.no_grad():
        want = hf(idx).logits
        got, loss = ours(idx)
    assert loss is None
    assert got.dtype == torch.float32
    assert_logits_close(got, want)
    if hf.config.use_sliding_window:
        # the window (smaller than T = 16) must really be in play on some layers, not on all
        flags = sliding_layer_flags(hf.config)
        assert any(flags) and not all(flags)
        cfg = config_from_dict(hf.config.to_dict())
        assert [cfg.layer_window(i) for i in range(len(flags))] == \
            [hf.config.sliding_window if f else None for f in flags]
        no_window = {k: v for k, v in PARITY[name].items() if k not in WINDOW_FIELDS}
        full = transformers.Qwen3ForCausalLM(tiny_hf_config(**no_window)).eval()
        full.load_state_dict(hf.state_dict())
        with torch.no_grad():
            assert (full(idx).logits - want).abs().max() > 1e-3


def test_loss_is_cross_entropy_of_transformers_logits(model_pair):
    hf, ours = model_pair(tie_word_embeddings=True)
    idx = rand_ids((3, 12), seed=1)
    targets = rand_ids((3, 12), seed=2)
    targets[0, :4] = -100  # ignored positions
    targets[2, -1] = -100
    with torch.no_grad():
        want = F.cross_entropy(hf(idx).logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        logits, loss = ours(idx, targets)
    assert logits.shape == (3, 12, V)
    assert loss.ndim == 0
    assert abs(loss.item() - want.item()) <= 1e-5 * max(1.0, want.item())


def test_num_params_matches_transformers(model_pair):
    for tied in (False, True):
        hf, ours = model_pair(tie_word_embeddings=tied)
        assert ours.num_params() == sum(p.numel() for p in hf.parameters())  # tied weights once


# %% generation and the KV cache

SLIDING = dict(num_hidden_layers=3, use_sliding_window=True, sliding_window=4, max_window_layers=1)
GENERATE = {
    "full": dict(),
    "sliding_w4": SLIDING,
    "sliding_w10": dict(SLIDING, sliding_window=10),  # prompt shorter than the window
    "all_sliding_mqa_tied": dict(use_sliding_window=True, sliding_window=4, max_window_layers=0,
                                 num_key_value_heads=1, tie_word_embeddings=True),
}


@pytest.mark.parametrize("name", GENERATE)
def test_greedy_generate_matches_transformers(name, model_pair):
    hf, ours = model_pair(seed=1, **GENERATE[name])
    prompt, n = rand_ids((2, 6), seed=3), 30  # 36 tokens: far past a window of 4
    got = generate(ours, prompt, n, temperature=0)
    want = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=n,
                       min_new_tokens=n, eos_token_id=None, pad_token_id=0)
    assert got.dtype == torch.long and got.shape == (2, 6 + n)
    assert torch.equal(got, want), f"ours {got.tolist()}\nhf   {want.tolist()}"
    # and without any cache at all: every new token is the argmax of a full forward pass
    with torch.no_grad():
        full = hf(got[:, :-1]).logits
    assert torch.equal(full[:, 5:].argmax(-1), got[:, 6:])


@pytest.mark.parametrize("name", ["full", "sliding_w4", "sliding_w10"])
def test_cached_decoding_matches_full_forward(name, model_pair, assert_logits_close):
    hf, ours = model_pair(seed=4, **GENERATE[name])
    idx = rand_ids((2, 24), seed=5)
    with torch.no_grad():
        want = hf(idx).logits
    # prefill 7 then one token at a time; one at a time from the start; chunks of mixed sizes
    for sizes in ([7] + [1] * 17, [1] * 24, [5, 1, 6, 2, 1, 9]):
        cache = KVCache(config_from_dict(hf.config.to_dict()))
        start = 0
        for size in sizes:
            with torch.no_grad():
                logits, _ = ours(idx[:, start:start + size], cache=cache)
            assert_logits_close(logits, want[:, start:start + size])
            start += size
            assert cache.seen_tokens == start
            # memory: a sliding layer keeps only the W - 1 keys its next query can still see
            for i, flag in enumerate(sliding_layer_flags(hf.config)):
                held = min(start, hf.config.sliding_window - 1) if flag else start
                shape = (2, hf.config.num_key_value_heads, held, hf.config.head_dim)
                assert cache.keys[i].shape == cache.values[i].shape == shape, (i, start)
        assert start == 24


def test_generate_stops_at_eos_and_stream(model_pair):
    hf, ours = model_pair(seed=6)
    prompt, n = rand_ids((1, 5), seed=7), 12
    free = generate(ours, prompt, n, temperature=0)[0, 5:].tolist()
    eos = free[3]
    first = free.index(eos)
    out = generate(ours, prompt, n, temperature=0, eos_token_id=eos)
    assert out[0, :5].tolist() == prompt[0].tolist()
    assert out[0, 5:].tolist() == free[:first + 1]  # stops right after emitting eos
    unused = min(set(range(V)) - set(free))
    out = generate(ours, prompt, n, temperature=0, eos_token_id=[unused, eos])
    assert out[0, 5:].tolist() == free[:first + 1]
    assert list(stream(ours, prompt, n, temperature=0)) == free
    assert list(stream(ours, prompt, n, temperature=0, eos_token_id=eos)) == free[:first]  # eos not yielded


def test_generate_batch_rows_that_finished_keep_emitting_eos(model_pair):
    hf, ours = model_pair(seed=8)
    prompt, n = rand_ids((3, 4), seed=9), 10
    free = generate(ours, prompt, n, temperature=0)[:, 4:].tolist()
    eos = free[0][2]
    firsts = [row.index(eos) if eos in row else None for row in free]
    length = n if None in firsts else max(firsts) + 1
    want = [row[:length] if f is None else (row[:f + 1] + [eos] * n)[:length] for row, f in zip(free, firsts)]
    out = generate(ours, prompt, n, temperature=0, eos_token_id=eos)
    assert out[:, 4:].tolist() == want


# %% checkpoints in Hugging Face format

def safetensors_keys(directory):
    keys = []
    for f in sorted(os.listdir(directory)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(directory, f), "pt") as st:
                keys += list(st.keys())
    return keys


def assert_no_pickle(directory):
    assert not [f for f in os.listdir(directory) if f.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]


@pytest.mark.parametrize("tied", [False, True])
def test_save_pretrained_loads_in_transformers(tied, model_pair, assert_logits_close, tmp_path):
    hf, ours = model_pair(seed=10, tie_word_embeddings=tied, **SLIDING)
    save_pretrained(ours, tmp_path)
    assert (tmp_path / "config.json").exists() and (tmp_path / "model.safetensors").exists()
    assert_no_pickle(tmp_path)
    keys = safetensors_keys(tmp_path)
    assert ("lm_head.weight" in keys) == (not tied)
    assert set(keys) | {"lm_head.weight"} == set(hf.state_dict()) | {"lm_head.weight"}
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert isinstance(theirs, transformers.Qwen3ForCausalLM)
    assert theirs.config.layer_types == hf.config.layer_types
    assert theirs.config.tie_word_embeddings == tied
    idx = rand_ids((2, 12), seed=11)
    with torch.no_grad():
        assert_logits_close(theirs(idx).logits, ours(idx)[0])


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("shard", [None, "20KB"])
def test_transformers_checkpoint_loads_in_ours(tied, shard, model_pair, assert_logits_close, tmp_path):
    hf, _ = model_pair(seed=12, tie_word_embeddings=tied, **SLIDING)
    if shard:
        hf.save_pretrained(tmp_path, max_shard_size=shard)
        assert (tmp_path / "model.safetensors.index.json").exists()
        assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 1
    else:
        hf.save_pretrained(tmp_path)
    assert ("lm_head.weight" in safetensors_keys(tmp_path)) == (not tied)
    ours = from_pretrained(tmp_path).eval()
    assert next(ours.parameters()).dtype == torch.float32
    idx = rand_ids((2, 12), seed=13)
    with torch.no_grad():
        assert_logits_close(ours(idx)[0], hf(idx).logits)


def test_bf16_checkpoint_matches_transformers_and_keeps_rope_fp32(model_pair, assert_logits_close, tmp_path):
    hf, _ = model_pair(seed=14, head_dim=16)
    hf.to(torch.bfloat16).save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as st:
        assert st.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
    ours = from_pretrained(tmp_path).eval()  # dtype None keeps bf16
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    idx = rand_ids((1, 512), seed=15)
    with torch.no_grad():
        want = hf(idx).logits.float()
        got = ours(idx)[0].float()
    # bf16 rounding alone gives max 0.15 / mean 0.013 here; angles rounded to bf16 (off by up to
    # ~1 rad at positions 256..511) give max 1.4 / mean 0.10.
    scale = max(1.0, want.abs().max().item())
    late = (got - want)[:, 256:].abs()
    assert late.max().item() <= 0.06 * scale, late.max().item()
    assert late.mean().item() <= 0.01 * scale, late.mean().item()
    # an fp32 load of the bf16 file is exact again
    ours32 = from_pretrained(tmp_path, dtype=torch.float32).eval()
    hf32 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32,
                                                             attn_implementation="eager").eval()
    with torch.no_grad():
        assert_logits_close(ours32(idx[:, :64])[0], hf32(idx[:, :64]).logits)


HOSTILE_FILES = {  # what a checkpoint folder may hold instead of what it should -> words the one line must hold
    "config_is_a_fifo": ("config.json", "fifo", "not a regular file"),
    "weights_are_a_fifo": ("model.safetensors", "fifo", "not a regular file"),
    "config_nested_deep": ("config.json", "[" * 100_000 + "]" * 100_000, "nested too deep"),
    "config_too_large": ("config.json", " " * (2**24 + 1) + "{}", "at most 16,777,216 bytes"),
    "string_for_a_boolean": ("config.json", {"tie_word_embeddings": "false"}, "tie_word_embeddings must be true or false"),
    "nan_theta": ("config.json", {"rope_theta": float("nan"), "rope_parameters": {"rope_type": "default", "rope_theta": float("nan")}},
                  "rope_theta must be a finite number > 0"),
    "negative_eps": ("config.json", {"rms_norm_eps": -1e-6}, "rms_norm_eps must be a finite number > 0"),
    "float_layer_count": ("config.json", {"num_hidden_layers": 2.5}, "num_hidden_layers must be an integer"),
    "many_layers": ("config.json", {"num_hidden_layers": 100_000, "layer_types": None}, "config.json says 100000 layers, the weights hold 2"),
    "index_escapes": ("model.safetensors.index.json", {"weight_map": {"lm_head.weight": "../model.safetensors"}},
                      "not a file of this folder"),
    "index_value_not_a_name": ("model.safetensors.index.json", {"weight_map": {"lm_head.weight": 7}},
                               "not a file of this folder"),
    "integer_weights": ("model.safetensors", "int", "holds torch.int64 values, not floating point weights"),
}


@pytest.mark.parametrize("name", HOSTILE_FILES)
def test_hostile_checkpoint_files_are_one_line(name, model_pair, tmp_path):
    """Issue #23: every file of a checkpoint is checked, cheap facts first, before anything expensive
    (a pipe never read, a 100,000-layer config never built): one CheckpointError line naming the file."""
    from safetensors.torch import load_file, save_file
    _, ours = model_pair()
    save_pretrained(ours, tmp_path)
    file, content, words = HOSTILE_FILES[name]
    path = tmp_path / file
    if content == "fifo":
        path.unlink()
        os.mkfifo(path)
    elif content == "int":
        weights = load_file(path)
        weights["model.norm.weight"] = weights["model.norm.weight"].long()
        save_file(weights, path)
    elif isinstance(content, dict) and file == "config.json":
        path.write_text(json.dumps({**json.loads(path.read_text()), **content}))
    else:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(CheckpointError) as e:
        from_pretrained(tmp_path)
    assert "\n" not in str(e.value) and words in str(e.value) and file.split(".")[0] in str(e.value), str(e.value)


def test_checkpoint_errors(model_pair, tmp_path):
    _, ours = model_pair()

    def fails(path, *needles):
        with pytest.raises(CheckpointError) as e:
            from_pretrained(path)
        msg = str(e.value)
        assert "\n" not in msg.strip(), msg
        for needle in needles:
            assert needle in msg, msg

    assert issubclass(CheckpointError, ValueError)
    fails(tmp_path / "does-not-exist")
    good = tmp_path / "good"
    save_pretrained(ours, good)

    def variant(name):
        d = tmp_path / name
        d.mkdir()
        for f in os.listdir(good):
            (d / f).write_bytes((good / f).read_bytes())
        return d

    d = variant("no-weights")
    os.remove(d / "model.safetensors")
    fails(d)
    d = variant("garbage")
    (d / "model.safetensors").write_bytes(b"this is not a safetensors file")
    fails(d, "model.safetensors")
    d = variant("truncated")
    blob = (good / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    fails(d, "model.safetensors")
    d = variant("bad-json")
    (d / "config.json").write_text("{not json")
    fails(d, "config.json")
    d = variant("no-config")
    os.remove(d / "config.json")
    fails(d, "config.json")
    d = variant("wrong-shapes")
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] += 8
    (d / "config.json").write_text(json.dumps(cfg))
    fails(d)
    d = variant("missing-tensor")
    tensors = load_file(str(d / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(d / "model.safetensors"))
    fails(d)


# %% config

def hf_arch(c):
    """The architecture of a transformers.Qwen3Config in our field names."""
    return dict(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim,
                max_position_embeddings=c.max_position_embeddings, rope_theta=c.rope_parameters["rope_theta"],
                rms_norm_eps=c.rms_norm_eps, tie_word_embeddings=c.tie_word_embeddings,
                attention_bias=c.attention_bias, layer_types=list(c.layer_types),
                sliding_window=c.sliding_window if "sliding_attention" in c.layer_types else None)


def our_arch(c):
    layer_types = ["sliding_attention" if c.layer_window(i) else "full_attention"
                   for i in range(c.num_hidden_layers)]
    windows = {c.layer_window(i) for i in range(c.num_hidden_layers)} - {None}
    assert len(windows) <= 1
    return dict(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim,
                max_position_embeddings=c.max_position_embeddings, rope_theta=c.rope_theta,
                rms_norm_eps=c.rms_norm_eps, tie_word_embeddings=c.tie_word_embeddings,
                attention_bias=c.attention_bias, layer_types=layer_types,
                sliding_window=windows.pop() if windows else None)


@pytest.mark.parametrize("name", ["gqa2", "tied", "attention_bias", "theta_1e6_eps_1e-5",
                                  "sliding_max_window_layers", "sliding_layer_types"])
def test_config_round_trips(name, tiny_hf_config, tmp_path):
    hf_cfg = tiny_hf_config(bos_token_id=1, eos_token_id=2, **PARITY[name])
    cfg = config_from_dict(hf_cfg.to_dict())
    assert our_arch(cfg) == hf_arch(hf_cfg)
    assert (cfg.bos_token_id, cfg.eos_token_id) == (1, 2)
    back = hf_config(cfg)
    assert isinstance(back, transformers.Qwen3Config)
    assert hf_arch(back) == hf_arch(hf_cfg)
    assert config_from_dict(back.to_dict()) == cfg
    d = config_to_dict(cfg)
    json.dumps(d)  # plain JSON
    assert config_from_dict(d) == cfg
    assert hf_arch(transformers.Qwen3Config.from_dict(d)) == hf_arch(hf_cfg)  # transformers reads our dict
    (tmp_path / "config.json").write_text(json.dumps(d))
    assert read_config(tmp_path / "config.json") == cfg


# config.json of the real Qwen/Qwen3-0.6B (written by transformers 4.51: rope_theta, rope_scaling null)
QWEN3_06B_CONFIG_JSON = {
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
    "hidden_size": 1024, "initializer_range": 0.02, "intermediate_size": 3072,
    "max_position_embeddings": 40960, "max_window_layers": 28, "model_type": "qwen3",
    "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16", "transformers_version": "4.51.0", "use_cache": True,
    "use_sliding_window": False, "vocab_size": 151936,
}


def test_legacy_config_json_and_presets():
    cfg = config_from_dict(dict(QWEN3_06B_CONFIG_JSON))
    assert our_arch(cfg) == hf_arch(transformers.Qwen3Config.from_dict(dict(QWEN3_06B_CONFIG_JSON)))
    assert our_arch(cfg)["rope_theta"] == 1e6
    assert (cfg.bos_token_id, cfg.eos_token_id) == (151643, 151645)
    real = Qwen3Config.preset("qwen3-0.6b")
    assert our_arch(real) == our_arch(cfg)
    assert set(PRESETS) >= {"seed", "cpu", "qwen3-0.6b"}
    seed = Qwen3Config.preset("seed")
    assert (seed.hidden_size, seed.num_hidden_layers, seed.num_attention_heads, seed.num_key_value_heads,
            seed.head_dim, seed.intermediate_size, seed.vocab_size, seed.max_position_embeddings,
            seed.tie_word_embeddings) == (384, 6, 8, 4, 48, 1536, 49152, 512, True)
    cpu = Qwen3Config.preset("cpu", vocab_size=1000)
    assert (cpu.hidden_size, cpu.num_hidden_layers, cpu.num_attention_heads, cpu.num_key_value_heads,
            cpu.head_dim, cpu.intermediate_size, cpu.vocab_size, cpu.tie_word_embeddings) == (
        128, 4, 4, 2, 32, 384, 1000, False)
    for preset in (real, seed, cpu):  # through config.json and back
        assert our_arch(config_from_dict(json.loads(json.dumps(config_to_dict(preset))))) == our_arch(preset)
    with pytest.raises(ValueError, match="seed"):
        Qwen3Config.preset("qwen3-7b-typo")


# %% components: RMSNorm, RoPE, attention

def test_rms_norm_matches_torch_and_transformers():
    g = torch.Generator().manual_seed(0)
    for dim, eps in [(12, 1e-6), (64, 1e-5), (7, 0.5)]:
        x = 3 * torch.randn(3, 5, dim, generator=g)
        weight = torch.rand(dim, generator=g) + 0.5
        ours, ref, hf = RMSNorm(dim, eps), torch.nn.RMSNorm(dim, eps=eps), Qwen3RMSNorm(dim, eps)
        with torch.no_grad():
            for m in (ours, ref, hf):
                m.weight.copy_(weight)
            torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-6)
            # bf16: statistics in fp32, cast back, then the gain; exactly transformers' rounding
            assert torch.equal(ours(x.bfloat16()), hf(x.bfloat16()))
            assert torch.equal(ours.bfloat16()(x.bfloat16()), hf.bfloat16()(x.bfloat16()))


def test_rope_matches_transformers(tiny_hf_config):
    g = torch.Generator().manual_seed(0)
    positions = torch.tensor([0, 1, 2, 7, 100, 1000, 4095, 40000])  # gaps, and far beyond training lengths
    for head_dim, theta in [(12, 10_000.0), (128, 1e6)]:
        rotary = Qwen3RotaryEmbedding(tiny_hf_config(head_dim=head_dim, rope_theta=theta))
        q, k = torch.randn(2, 2, 4, len(positions), head_dim, generator=g)
        want_cos, want_sin = rotary(q, positions[None])  # (1, T, hd)
        cos, sin = rope_cos_sin(positions, head_dim, theta)
        torch.testing.assert_close(cos, want_cos[0], rtol=0, atol=1e-6)
        torch.testing.assert_close(sin, want_sin[0], rtol=0, atol=1e-6)
        want_q, want_k = apply_rotary_pos_emb(q, k, want_cos, want_sin)
        torch.testing.assert_close(apply_rope(q, cos, sin), want_q, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(apply_rope(k, cos, sin), want_k, rtol=1e-6, atol=1e-6)
        # bf16 tables: fp32 angles, rounded only at the end (bf16 angles would be radians off)
        cos16, sin16 = rope_cos_sin(positions, head_dim, theta, torch.bfloat16)
        assert torch.equal(cos16, cos.bfloat16()) and torch.equal(sin16, sin.bfloat16())
    # what RoPE is for: rotated q.k depends only on the offset between positions
    q, k = torch.randn(2, 1, 1, 1, 16, generator=g, dtype=torch.float64)
    dots = []
    for shift in (0, 5, 333):
        cos, sin = rope_cos_sin(torch.tensor([3 + shift, 10 + shift]), 16, 10_000.0, torch.float64)
        dots.append((apply_rope(q, cos[:1], sin[:1]) * apply_rope(k, cos[1:], sin[1:])).sum().item())
    assert max(dots) - min(dots) < 1e-4 * max(1.0, abs(dots[0]))


def brute_force_mask(q_pos, k_pos, window):
    return torch.tensor([[k <= q and (window is None or q - window < k) for k in k_pos] for q in q_pos])


def test_attention_mask_helper():
    for window in (None, 1, 2, 5, 100):
        for q_pos, k_pos in [(range(0, 9), range(0, 9)), (range(6, 9), range(2, 9)), (range(8, 9), range(4, 9))]:
            got = can_attend(torch.tensor(list(q_pos)), torch.tensor(list(k_pos)), window)
            assert torch.equal(got, brute_force_mask(q_pos, k_pos, window)), (window, q_pos, k_pos)


def brute_force_attention(attn, x, window, hf_config):
    """Qwen3 attention for x (B, T, hidden), one query and one key at a time."""
    B, T, _ = x.shape
    n_head, n_kv, hd = hf_config.num_attention_heads, hf_config.num_key_value_heads, hf_config.head_dim
    eps = hf_config.rms_norm_eps
    q = F.rms_norm(attn.q_proj(x).view(B, T, n_head, hd), (hd,), attn.q_norm.weight, eps).transpose(1, 2)
    k = F.rms_norm(attn.k_proj(x).view(B, T, n_kv, hd), (hd,), attn.k_norm.weight, eps).transpose(1, 2)
    v = attn.v_proj(x).view(B, T, n_kv, hd).transpose(1, 2)
    cos, sin = Qwen3RotaryEmbedding(hf_config)(x, torch.arange(T)[None])
    q, k = apply_rotary_pos_emb(q, k, cos, sin)  # (B, heads, T, hd)
    out = torch.zeros(B, n_head, T, hd)
    for h in range(n_head):
        kv = h // (n_head // n_kv)  # query heads share kv heads in consecutive groups
        for t in range(T):
            seen = [j for j in range(T) if j <= t and (window is None or j > t - window)]
            scores = torch.stack([(q[:, h, t] * k[:, kv, j]).sum(-1) for j in seen], -1) / math.sqrt(hd)
            p = scores.softmax(-1)  # (B, len(seen))
            out[:, h, t] = sum(p[:, i, None] * v[:, kv, j] for i, j in enumerate(seen))
    return attn.o_proj(out.transpose(1, 2).reshape(B, T, n_head * hd))


@pytest.mark.parametrize("window", [None, 1, 3, 10, 16])
def test_attention_matches_brute_force(window, model_pair):
    win = dict(use_sliding_window=True, sliding_window=window, max_window_layers=0) if window else {}
    hf, ours = model_pair(seed=18, attention_bias=True, **win)
    attn = ours.model.layers[1].self_attn
    calls = []
    attn.register_forward_hook(lambda module, args, out: calls.append((args[0], out)))
    idx = rand_ids((2, 10), seed=19)
    with torch.no_grad():
        ours(idx)  # full sequence
        (x, y), = calls
        torch.testing.assert_close(y, brute_force_attention(attn, x, window, hf.config), rtol=1e-5, atol=1e-5)
        calls.clear()
        cache = KVCache(ours.config)  # and in pieces through the cache: prefill 4, then 1, 2, 1, 1, 1
        for a, b in [(0, 4), (4, 5), (5, 7), (7, 8), (8, 9), (9, 10)]:
            ours(idx[:, a:b], cache=cache)
        x = torch.cat([args for args, _ in calls], dim=1)
        y = torch.cat([out for _, out in calls], dim=1)
        torch.testing.assert_close(y, brute_force_attention(attn, x, window, hf.config), rtol=1e-5, atol=1e-5)


# %% sampling

def test_top_k_filter():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0, -1.0], [0.5, -2.0, 4.0, 1.0, 3.5]])
    before = logits.clone()
    want = torch.tensor([[NEG_INF, 3.0, 2.0, NEG_INF, NEG_INF], [NEG_INF, NEG_INF, 4.0, NEG_INF, 3.5]])
    assert torch.equal(top_k_filter(logits, 2), want)
    assert torch.equal(top_k_filter(logits, 1)[1], torch.tensor([NEG_INF, NEG_INF, 4.0, NEG_INF, NEG_INF]))
    for k in (None, 0, 5, 50):  # disabled, or k >= vocab
        assert torch.equal(top_k_filter(logits, k), logits)
    assert torch.equal(logits, before)  # not modified in place


def logits_for(probs):
    return torch.tensor(probs).log()


def kept(filtered):
    return torch.isfinite(filtered).nonzero().flatten().tolist()


def test_top_p_filter_hand_computed():
    logits = logits_for([0.10, 0.50, 0.15, 0.25])  # sorted: 0.50, 0.25, 0.15, 0.10; mass 0.5, 0.75, 0.9, 1
    before = logits.clone()
    for p, want in [(1e-6, [1]), (0.3, [1]), (0.49, [1]), (0.51, [1, 3]), (0.6, [1, 3]), (0.74, [1, 3]),
                    (0.76, [1, 2, 3]), (0.89, [1, 2, 3]), (0.91, [0, 1, 2, 3])]:
        out = top_p_filter(logits, p)
        assert kept(out) == want, p
        assert torch.equal(out[want], logits[want])  # survivors keep their logits
    for p in (None, 1.0):
        assert torch.equal(top_p_filter(logits, p), logits)
    assert torch.equal(logits, before)
    # ties at the boundary: mass 0.4 + 0.3 reaches p = 0.5, so exactly one of the tied 0.3s is kept
    out = top_p_filter(logits_for([0.3, 0.4, 0.3]), 0.5)
    assert 1 in kept(out) and len(kept(out)) == 2
    # rows are independent
    rows = torch.stack([logits_for([0.7, 0.2, 0.1]), logits_for([0.2, 0.3, 0.5])])
    out = top_p_filter(rows, 0.65)
    assert kept(out[0]) == [0] and kept(out[1]) == [1, 2]


def frequencies(samples, vocab):
    return torch.bincount(samples, minlength=vocab).double() / len(samples)


def test_tiny_temperatures_are_greedy_and_broken_logits_say_so(model_pair):
    """A positive temperature below float32's range (1 / t overflows) is greedy, not NaN; NaN or inf
    logits are an error that says what happened, in the chapter's loop (every token) and the engine
    (the prompt's pass, where broken weights show, without a wait for the device at every step)."""
    from engine import Engine
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(1))
    for t in (1e-300, 1e-40, 1e-30):
        assert torch.equal(next_token_probs(logits, t), F.one_hot(logits.argmax(-1), V).float())
        assert torch.equal(sample_next_token(logits, t, generator=torch.Generator().manual_seed(0)), logits.argmax(-1))
    check_finite(logits)
    for bad in (float("nan"), float("inf")):
        broken = logits.clone()
        broken[2, 7] = bad
        with pytest.raises(FloatingPointError, match="NaN or infinite logits"):
            check_finite(broken)
    _, ours = model_pair()
    with torch.no_grad():
        ours.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    for decoder in ({}, dict(decoder=Engine(ours))):
        for t in (0.0, 0.8):
            with pytest.raises(FloatingPointError, match="NaN or infinite logits"):
                generate(ours, rand_ids((1, 4)), 3, temperature=t, **decoder)


def test_sample_next_token():
    logits = torch.randn(16, V, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample_next_token(logits, temperature=0), logits.argmax(-1))
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        out = sample_next_token(logits, temperature=1.0, top_k=1, generator=g)
        assert out.dtype == torch.long and torch.equal(out, logits.argmax(-1))
    a = sample_next_token(logits, generator=torch.Generator().manual_seed(123))
    b = sample_next_token(logits, generator=torch.Generator().manual_seed(123))
    c = sample_next_token(logits, generator=torch.Generator().manual_seed(124))
    assert torch.equal(a, b) and not torch.equal(a, c)

    # frequencies against hand-computed distributions: 4000 draws, 5-sigma bands (sigma <= 0.008)
    flat = logits_for([0.6, 0.25, 0.1, 0.05]).expand(4000, 4)
    cases = [(dict(), [0.6, 0.25, 0.1, 0.05]),
             (dict(top_k=2), [0.6 / 0.85, 0.25 / 0.85, 0, 0]),
             (dict(top_p=0.9), [0.6 / 0.95, 0.25 / 0.95, 0.1 / 0.95, 0]),
             (dict(temperature=2.0), [x / sum(y ** 0.5 for y in (0.6, 0.25, 0.1, 0.05))
                                      for x in (0.6 ** 0.5, 0.25 ** 0.5, 0.1 ** 0.5, 0.05 ** 0.5)])]
    for i, (kwargs, want) in enumerate(cases):
        got = frequencies(sample_next_token(flat, generator=torch.Generator().manual_seed(i), **kwargs), 4)
        want = torch.tensor(want, dtype=torch.double)
        assert torch.all(got[want == 0] == 0), (kwargs, got)
        assert (got - want).abs().max() < 0.04, (kwargs, got, want)


# %% Muon and the optimizer setup

MUON_SHAPES = [(16, 16), (32, 8), (8, 32), (48, 20), (20, 48)]  # square, tall, wide
# Both run Newton-Schulz in bf16 with the same coefficients (bitwise equal on the CPUs tried), but
# bf16 matmul kernels may round differently elsewhere. bf16 rounding alone moves the parameters by
# <= 0.8% (relative Frobenius, 6 steps, measured against fp64 NS); the smallest plausible bug tried
# (momentum 0.9 for 0.95) moves them by >= 4%, no Nesterov or no shape scale by >= 9%.
MUON_RTOL = 2e-2


@pytest.mark.parametrize("ns_dtype, rtol", [(torch.bfloat16, 1e-3), (None, MUON_RTOL)])
@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_matches_torch_muon(nesterov, ns_dtype, rtol):
    """bf16 Newton-Schulz is torch.optim.Muon's own arithmetic; None (fp32 on CPU) differs from it
    by bf16 rounding only (<= ~1%), well inside what a wrong momentum or scale produces (>= 4%)."""
    g = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=g) for s in MUON_SHAPES]
    grads = [[torch.randn(s, generator=g) for s in MUON_SHAPES] for _ in range(6)]
    ours = [torch.nn.Parameter(x.clone()) for x in init]
    ref = [torch.nn.Parameter(x.clone()) for x in init]
    idle = torch.nn.Parameter(torch.randn(8, 8, generator=g))  # never gets a gradient
    opt = Muon(ours + [idle], lr=0.02, momentum=0.95, weight_decay=0.1, nesterov=nesterov, ns_dtype=ns_dtype)
    ref_opt = torch.optim.Muon(ref, lr=0.02, momentum=0.95, weight_decay=0.1, nesterov=nesterov,
                               adjust_lr_fn="original")
    idle_before = idle.detach().clone()
    for step, step_grads in enumerate(grads):
        if step == 3:  # the training loop rescales group["lr"] in place
            for o in (opt, ref_opt):
                for group in o.param_groups:
                    group["lr"] = 0.01
        for p, q, grad in zip(ours, ref, step_grads):
            p.grad, q.grad = grad.clone(), grad.clone()
        opt.step()
        ref_opt.step()
        for p, q, x in zip(ours, ref, init):
            moved_ours, moved_ref = (p - x).detach(), (q - x).detach()
            err = ((moved_ours - moved_ref).norm() / moved_ref.norm()).item()
            assert err <= rtol, (p.shape, step, err)
    assert torch.equal(idle, idle_before)


def test_muon_update_is_orthogonalised():
    g = torch.Generator().manual_seed(1)
    q1, _ = torch.linalg.qr(torch.randn(24, 24, generator=g))
    q2, _ = torch.linalg.qr(torch.randn(24, 24, generator=g))
    conditioned = q1 @ torch.diag(torch.linspace(0.1, 3.0, 24)) @ q2  # square, condition number 30
    for grad in [torch.randn(64, 16, generator=g), torch.randn(16, 64, generator=g), conditioned]:
        s = torch.linalg.svdvals(zeropower_via_newtonschulz(grad).float())
        assert s.min() > 0.5 and s.max() < 1.5, (grad.shape, s)
        p = torch.nn.Parameter(torch.zeros_like(grad))
        p.grad = grad * 7.0  # the gradient's scale must not matter
        Muon([p], lr=1.0, momentum=0.0, weight_decay=0.0).step()
        rows, cols = grad.shape
        update = -p.detach() / max(1.0, rows / cols) ** 0.5  # undo the shape scale
        s = torch.linalg.svdvals(update)
        assert s.min() > 0.5 and s.max() < 1.5, (grad.shape, s)
        # the update keeps the gradient's singular vectors: <update, grad> > 0 and aligned
        assert (update * grad).sum() / (update.norm() * grad.norm()) > 0.7


def param_ids(groups):
    return [id(p) for group in groups for p in group["params"]]


@pytest.mark.parametrize("tied", [False, True])
def test_configure_optimizers_muon_split(tied, model_pair):
    _, model = model_pair(tie_word_embeddings=tied, attention_bias=True)
    opts = configure_optimizers(model, "muon", lr=3e-3, muon_lr=0.02, weight_decay=0.1)
    muon = [o for o in opts if isinstance(o, Muon)]
    adamw = [o for o in opts if isinstance(o, torch.optim.AdamW)]
    assert len(muon) == 1 and len(adamw) == 1 and len(opts) == 2
    named = dict(model.named_parameters())  # a tied lm_head appears once
    hidden = {id(p) for n, p in named.items()
              if p.ndim == 2 and "embed_tokens" not in n and "lm_head" not in n}
    muon_ids, adamw_ids = param_ids(muon[0].param_groups), param_ids(adamw[0].param_groups)
    assert len(muon_ids) == len(set(muon_ids)) and len(adamw_ids) == len(set(adamw_ids))
    assert set(muon_ids) == hidden
    assert set(adamw_ids) == {id(p) for p in named.values()} - hidden
    assert id(model.model.embed_tokens.weight) in adamw_ids and id(model.lm_head.weight) in adamw_ids
    for group in muon[0].param_groups:
        assert group["base_lr"] == 0.02
    for group in adamw[0].param_groups:
        assert group["base_lr"] == 3e-3


def test_configure_optimizers_adamw(model_pair):
    _, model = model_pair(attention_bias=True)
    opts = configure_optimizers(model, "adamw", lr=1e-3, weight_decay=0.1, betas=(0.8, 0.9), eps=1e-7)
    assert len(opts) == 1 and isinstance(opts[0], torch.optim.AdamW)
    groups = opts[0].param_groups
    ids = param_ids(groups)
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in model.parameters()}
    for group in groups:
        assert group["base_lr"] == 1e-3 and group["betas"] == (0.8, 0.9) and group["eps"] == 1e-7
        for p in group["params"]:
            assert group["weight_decay"] == (0.1 if p.ndim == 2 else 0.0)
    with pytest.raises(ValueError):
        configure_optimizers(model, "sgd")


def test_hybrid_optimizer_lowers_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
    model = Qwen3(cfg).train()
    opts = configure_optimizers(model, "muon", lr=1e-2, muon_lr=0.02, weight_decay=0.0)
    batch = rand_ids((4, 17), seed=16, vocab=64)
    losses = []
    for step in range(30):
        for o in opts:
            for group in o.param_groups:
                group["lr"] = group["base_lr"]  # as the training loop does (multiplier 1)
        _, loss = model(batch[:, :-1], batch[:, 1:])
        for o in opts:
            o.zero_grad(set_to_none=True)
        loss.backward()
        for o in opts:
            o.step()
        losses.append(loss.item())
    assert abs(losses[0] - math.log(64)) < 0.5  # starts near uniform
    assert losses[-1] < 0.5 * losses[0], losses


# %% dropout

def test_dropout_only_in_training(model_pair, assert_logits_close):
    hf, _ = model_pair()
    cfg = dataclasses.replace(config_from_dict(hf.config.to_dict()), dropout=0.2)
    model = Qwen3(cfg)
    model.load_state_dict(hf.state_dict(), strict=True)
    idx = rand_ids((2, 10), seed=17)
    with torch.no_grad():
        want = hf(idx).logits
        model.eval()
        a, b = model(idx)[0], model(idx)[0]
        assert torch.equal(a, b)
        assert_logits_close(a, want)
        model.train()
        c, d = model(idx)[0], model(idx)[0]
    assert not torch.equal(c, d)
    assert (c - a).abs().max() > 1e-3
    no_dropout = Qwen3(dataclasses.replace(cfg, dropout=0.0)).train()
    no_dropout.load_state_dict(hf.state_dict(), strict=True)
    with torch.no_grad():
        assert_logits_close(no_dropout(idx)[0], want)


def test_sampling_settings_refuse_nonsense():
    """The sampling settings' checks (guards.py), which generate and stream run before any work."""
    for settings, match in [((-1.0, None, None), "temperature"), ((float("nan"), None, None), "temperature"),
                            ((1.0, -1, None), "top_k"), ((1.0, None, 0.0), "top_p"), ((1.0, None, float("nan")), "top_p")]:
        with pytest.raises(ValueError, match=match):
            check_sampling(*settings)
    check_sampling(0.0, 0, 1.0)  # greedy, top-k off, all the mass: nothing to refuse
