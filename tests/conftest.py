"""Shared test setup: offline Hugging Face, repo root importable, tiny random Qwen3 models.

The helpers are exposed as fixtures (`tiny_hf_config`, `model_pair`, `assert_logits_close`)
so every test file can use them without importing this module.
"""
import os
import sys
from pathlib import Path

# Before transformers / datasets are imported anywhere: tests never touch the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pytest
import torch

# Tiny tensors gain nothing from threads, and the test machine is shared.
torch.set_num_threads(1)

# A tiny Qwen3 in transformers' field names. head_dim * heads (48) != hidden (32) on purpose,
# and 4 query heads share 2 kv heads (GQA).
TINY = dict(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=12,
            max_position_embeddings=1024, rope_theta=10_000.0, rms_norm_eps=1e-6,
            tie_word_embeddings=False)


def _tiny_hf_config(**overrides):
    """A transformers.Qwen3Config (eager attention) from TINY plus overrides in our field names."""
    import transformers
    kw = {**TINY, **overrides}
    theta = kw.pop("rope_theta")
    return transformers.Qwen3Config(**kw, rope_parameters={"rope_type": "default", "rope_theta": theta},
                                    attn_implementation="eager")


def randomize_(model, seed=0):
    """Random weights everywhere, norm gains included (ones would hide a missing or misplaced norm)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # a tied lm_head is listed once
            if name.endswith("norm.weight"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)  # gains in [0.5, 1.5)
            elif p.ndim == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))  # biases
            else:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[1] ** -0.5)  # unit-scale outputs
    return model


def _model_pair(seed=0, **overrides):
    """(transformers Qwen3ForCausalLM, our Qwen3) in eval mode, fp32, with identical random weights."""
    import transformers
    from qwen3 import Qwen3, config_from_dict
    hf = randomize_(transformers.Qwen3ForCausalLM(_tiny_hf_config(**overrides)), seed).eval()
    ours = Qwen3(config_from_dict(hf.config.to_dict()))
    ours.load_state_dict(hf.state_dict(), strict=True)
    return hf, ours.eval()


def _assert_logits_close(got, want, rel=1e-5):
    """max |got - want| <= rel * max(1, |want|_max): a tolerance relative to the logit scale."""
    assert got.shape == want.shape, f"shape {tuple(got.shape)} != {tuple(want.shape)}"
    scale = max(1.0, want.abs().max().item())
    err = (got.float() - want.float()).abs().max().item()
    assert err <= rel * scale, f"max abs diff {err:.3g} > {rel:g} * {scale:.3g}"


@pytest.fixture
def tiny_hf_config():
    return _tiny_hf_config


@pytest.fixture
def model_pair():
    return _model_pair


@pytest.fixture
def assert_logits_close():
    return _assert_logits_close
