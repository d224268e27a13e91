"""YaRN RoPE (qwen3.py section 3) and the checkpoint translation that carries it (section 9),
against transformers: the same cos/sin tables, the same logits from both config.json spellings,
kept through save_pretrained either way; other RoPE types refused with one line. Also: a tied
bf16 checkpoint loaded as fp32 converts its embedding once (peak memory, in a subprocess).
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

from conftest import randomize_
from guards import CheckpointError
from qwen3 import (KVCache, Qwen3, Qwen3Config, config_from_dict, config_to_dict, from_pretrained, generate,
                   rope_cos_sin, save_pretrained, yarn_parameters)

ROOT = Path(__file__).resolve().parent.parent
V = 101  # conftest.TINY's vocabulary
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
# head_dim 32, theta 1e4, L = 16: pairs 0..4 keep 1, 0.8, ..., 0.2 of their frequency with
# beta_slow 0.25 (fractional ramp), pairs 0..1 with the defaults; T = 80 is 5 L.
VARIANTS = {
    "defaults": {**YARN, "rope_theta": 10_000.0},
    "ramp_no_truncate": {**YARN, "factor": 8.0, "beta_fast": 16, "beta_slow": 0.25, "truncate": False,
                         "rope_theta": 10_000.0},
    "theta_100": {**YARN, "rope_theta": 100.0, "beta_slow": 0.25},
    "attention_factor": {**YARN, "attention_factor": 1.5, "rope_theta": 10_000.0},
    "mscale": {**YARN, "mscale": 0.707, "mscale_all_dim": 1.0, "rope_theta": 10_000.0},
}


@pytest.mark.parametrize("name", VARIANTS)
def test_yarn_logits_match_transformers(name, model_pair, assert_logits_close):
    # transformers takes rope_scaling over the default rope_parameters that model_pair sets
    hf, ours = model_pair(head_dim=32, rope_scaling=dict(VARIANTS[name]))
    assert hf.config.rope_parameters["rope_type"] == "yarn" and ours.config.rope_scaling["rope_type"] == "yarn"
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (2, 80), generator=g)
    with torch.no_grad():
        want = hf(ids).logits
        assert_logits_close(ours(ids)[0], want)
        plain = Qwen3(Qwen3Config(**{**vars(ours.config), "rope_scaling": None}))
        plain.load_state_dict(ours.state_dict())
        assert (plain.eval()(ids)[0] - want).abs().max() > 1e-2  # YaRN changes these logits
        cache = KVCache(ours.config)  # decoding past L continues YaRN's positions
        pieces = [ours(ids[:, :40], cache=cache)[0]] + [ours(ids[:, t:t + 1], cache=cache)[0] for t in range(40, 80)]
        assert_logits_close(torch.cat(pieces, dim=1), want)


def test_rope_tables_equal_transformers_at_long_positions():
    positions = torch.tensor([0, 1, 7, 4095, 32767, 32768, 40000, 131071])  # beyond L = 32768
    for head_dim, theta, rope in [(128, 1e6, {**YARN, "original_max_position_embeddings": 32768}),  # Qwen3's
                                  (128, 1e6, {**YARN, "original_max_position_embeddings": 4096, "truncate": False}),
                                  (16, 10_000.0, {**YARN, "original_max_position_embeddings": 5}),
                                  (64, 10_000.0, {**YARN, "factor": 2.5, "beta_fast": 8, "beta_slow": 2})]:
        hf_config = transformers.Qwen3Config(head_dim=head_dim, max_position_embeddings=131072,
                                             rope_parameters={**rope, "rope_theta": theta})
        want_cos, want_sin = Qwen3RotaryEmbedding(hf_config)(torch.zeros(1), positions[None])  # (1, T, hd)
        p = yarn_parameters(rope, 131072)
        cos, sin = rope_cos_sin(positions, head_dim, theta, torch.float32, p)
        assert torch.equal(cos, want_cos[0]) and torch.equal(sin, want_sin[0])  # bit for bit
        # positions of any shape: (B, T) gives (B, T, hd), row by row the same
        cos2, sin2 = rope_cos_sin(torch.stack((positions, positions.flip(0))), head_dim, theta, rope_scaling=p)
        assert cos2.shape == (2, len(positions), head_dim)
        assert torch.equal(cos2[0], cos) and torch.equal(sin2[1], sin.flip(0))


def edited_checkpoint(tmp_path, spelling):
    """A transformers checkpoint whose config.json is edited to YaRN in one of its spellings."""
    hf_config = transformers.Qwen3Config(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                         max_position_embeddings=64, tie_word_embeddings=True,
                                         rope_parameters={"rope_type": "default", "rope_theta": 500.0})
    path = tmp_path / spelling
    randomize_(transformers.Qwen3ForCausalLM(hf_config)).save_pretrained(path)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["rope_parameters"] == {"rope_type": "default", "rope_theta": 500.0} and "rope_scaling" not in cfg
    if spelling == "rope_parameters":  # transformers 5's own
        cfg["rope_parameters"] = {**YARN, "rope_theta": 500.0}
    elif spelling == "rope_scaling_beside_default":  # Qwen's instructions applied to a 5.x config.json:
        cfg["rope_scaling"] = dict(YARN)  # rope_scaling wins whole, so theta falls back to 10,000
    else:  # transformers 4.x: rope_theta beside rope_scaling, with the oldest "type" key
        del cfg["rope_parameters"]
        cfg.update(rope_theta=2000.0,
                   rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16})
    (path / "config.json").write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize("spelling", ["rope_parameters", "rope_scaling_beside_default", "legacy_4x"])
def test_yarn_is_read_from_either_key(spelling, tmp_path, assert_logits_close):
    path = edited_checkpoint(tmp_path, spelling)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    ours = from_pretrained(path)
    want = hf.config.rope_parameters
    assert want["rope_type"] == "yarn"
    assert ours.config.rope_theta == want["rope_theta"] == {"rope_parameters": 500.0, "legacy_4x": 2000.0}.get(
        spelling, 10_000.0)
    assert (ours.config.rope_scaling["factor"], ours.config.rope_scaling["original_max_position_embeddings"]) == (4, 16)
    ids = torch.randint(0, V, (1, 70), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_logits_close(ours(ids)[0], hf(ids).logits)


def test_yarn_survives_save_pretrained_both_ways(model_pair, assert_logits_close, tmp_path):
    hf, ours = model_pair(head_dim=32, rope_scaling=dict(VARIANTS["ramp_no_truncate"]))
    cfg = ours.config
    assert config_from_dict(json.loads(json.dumps(config_to_dict(cfg)))) == cfg
    assert Qwen3Config(**vars(cfg)) == cfg  # completing a completed rope_scaling changes nothing
    ids = torch.randint(0, V, (2, 72), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = hf(ids).logits
        save_pretrained(ours, tmp_path / "ours")  # ours -> transformers
        theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager")
        assert theirs.config.rope_parameters["rope_type"] == "yarn"
        assert_logits_close(theirs.eval()(ids).logits, want)
        theirs.save_pretrained(tmp_path / "theirs")  # and back
        back = from_pretrained(tmp_path / "theirs")
        assert back.config == cfg
        assert_logits_close(back(ids)[0], want)


@pytest.mark.parametrize("rope, message", [
    ({"rope_type": "linear", "factor": 2.0}, "RoPE type 'linear' is not supported (only 'default' and 'yarn')"),
    ({"type": "dynamic", "factor": 2.0}, "RoPE type 'dynamic' is not supported"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}, "RoPE type 'llama3' is not supported"),
    ({**YARN, "factor": 0.5}, "YaRN needs factor >= 1"),
    ({**YARN, "factor": "4"}, "YaRN factor must be a positive number, got '4'"),
    ({**YARN, "beta_fast": 1, "beta_slow": 2}, "beta_fast > beta_slow"),
    ({**YARN, "partial_rotary_factor": 0.5}, "unknown YaRN parameter(s) partial_rotary_factor"),
    ("yarn", "rope_scaling / rope_parameters must be an object"),
])
def test_other_rope_settings_are_refused(rope, message, tmp_path):
    base = config_to_dict(Qwen3Config(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=8))
    with pytest.raises(ValueError) as e:
        config_from_dict({**base, "rope_scaling": rope})
    assert message in str(e.value)
    if isinstance(rope, dict) and "rope_type" in rope:  # the dataclass checks it too
        with pytest.raises(ValueError, match=message.split("(")[0]):
            Qwen3Config(rope_scaling=rope)


def test_generate_refuses_an_unknown_rope_type(tmp_path):
    path = tmp_path / "ckpt"
    save_pretrained(Qwen3(Qwen3Config(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=8)), path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["rope_scaling"] = {"rope_type": "longrope", "short_factor": [1.0], "long_factor": [2.0]}
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="config.json: RoPE type 'longrope' is not supported"):
        from_pretrained(path)
    result = subprocess.run([sys.executable, str(ROOT / "generate.py"), "--ckpt", str(path), "--device", "cpu"],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "RoPE type 'longrope' is not supported" in lines[0], result.stderr


LOAD_PEAK = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from qwen3 import from_pretrained
def status(field):  # kB; VmHWM is this process's peak resident size
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field + ":")) * 1024
open("/proc/self/clear_refs", "w").write("5")  # the peak starts again from now
before = status("VmRSS")
model = from_pretrained(sys.argv[2], dtype=torch.float32)
assert model.lm_head.weight is model.model.embed_tokens.weight and model.lm_head.weight.dtype == torch.float32
print(status("VmHWM") - before)
"""


def test_tied_bf16_checkpoint_converts_its_embedding_once(tmp_path):
    # 65536 x 1024: 128 MiB stored in bf16, 256 MiB in fp32. Loading holds the stored tensors and
    # the fp32 result (measured: +460 MiB); converting the tied matrix under both keys, as before,
    # added another 256 MiB (+716 MiB).
    cfg = Qwen3Config(vocab_size=65536, hidden_size=1024, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=32, tie_word_embeddings=True)
    with torch.device("meta"):
        model = Qwen3(cfg)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    save_pretrained(model, tmp_path, dtype=torch.bfloat16)
    del model
    result = subprocess.run([sys.executable, "-c", LOAD_PEAK, str(ROOT), str(tmp_path)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    growth, fp32 = int(result.stdout), 65536 * 1024 * 4
    assert growth < fp32 / 2 + 1.75 * fp32, f"loading grew the process by {growth / 2**20:.0f} MiB"
