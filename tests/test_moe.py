"""Qwen3-MoE (qwen3.py section 6; engine.moe_forward and the engine's decoding step) against
transformers' Qwen3MoeForCausalLM: logits, the loss with its load-balancing term, greedy tokens
through the cache, checkpoints both ways; the engine's fast forms against the chapter's loop;
Muon on stacks of experts against torch.optim.Muon on each expert; bad configs. fp32, CPU."""
import dataclasses
import json

import pytest
import torch
import transformers
from safetensors import safe_open
from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

from conftest import randomize_
from engine import Engine, FusedLoss, moe_forward
from qwen3 import (MoE, Muon, Qwen3, Qwen3Config, config_from_dict, configure_optimizers, from_pretrained, generate,
                   hf_config, load_balancing_loss, save_pretrained)

V = 101
BASE = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=12, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=16)
CONFIGS = {  # every rule that decides which layers are sparse and how tokens are weighted
    "plain": dict(),
    "norm_topk_prob": dict(norm_topk_prob=True),
    "sparse_step_2": dict(decoder_sparse_step=2),
    "mlp_only_layers": dict(mlp_only_layers=[0, 2], num_experts_per_tok=3),
    "sliding_tied": dict(use_sliding_window=True, sliding_window=4, tie_word_embeddings=True),
    "aux_loss": dict(output_router_logits=True, router_aux_loss_coef=0.3, norm_topk_prob=True),
}


def rand_ids(shape, seed=0):
    return torch.randint(0, V, shape, generator=torch.Generator().manual_seed(seed))


def moe_pair(tmp_path, seed=0, **overrides):
    """(transformers' Qwen3MoeForCausalLM, ours loaded from the folder transformers saved), fp32, eval."""
    hf_cfg = transformers.Qwen3MoeConfig(**{**BASE, **overrides}, attn_implementation="eager")
    hf = randomize_(transformers.Qwen3MoeForCausalLM(hf_cfg), seed).eval()
    hf.save_pretrained(tmp_path / f"hf{seed}")
    return hf, from_pretrained(tmp_path / f"hf{seed}")


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_and_loss_match_transformers(name, tmp_path, assert_logits_close):
    hf, ours = moe_pair(tmp_path, **CONFIGS[name])
    assert [isinstance(layer.mlp, MoE) for layer in ours.model.layers] == [
        "SparseMoe" in type(layer.mlp).__name__ for layer in hf.model.layers]
    idx = rand_ids((2, 24), seed=1)
    targets = torch.roll(idx, -1, 1)
    targets[:, -1] = -100  # transformers shifts labels itself: labels=idx is the same task
    with torch.no_grad():
        want = hf(idx, labels=idx)
        got, loss = ours(idx, targets)
    assert_logits_close(got, want.logits)
    assert abs(loss.item() - want.loss.item()) <= 1e-6 * want.loss.item()
    if ours.config.output_router_logits:  # the term is there, and it is transformers'
        assert want.aux_loss is not None and ours.aux_loss().item() > 0
        assert abs(ours.aux_loss().item() - 0.3 * want.aux_loss.item()) <= 1e-6


def test_load_balancing_loss_matches_transformers_with_padding():
    g = torch.Generator().manual_seed(2)
    logits = [torch.randn(3 * 5, 6, generator=g) * 3 for _ in range(2)]  # 2 layers, B=3, T=5, 6 experts
    mask = torch.ones(3, 5, dtype=torch.long)
    mask[0, :2] = mask[2, :4] = 0
    for m in (None, mask):
        want = load_balancing_loss_func(tuple(logits), 6, 2, m)
        torch.testing.assert_close(load_balancing_loss(logits, 2, m), want, rtol=1e-6, atol=0)
        each = torch.stack([load_balancing_loss_func((r,), 6, 2, m) for r in logits]).mean()  # a layer at a time
        torch.testing.assert_close(load_balancing_loss(logits, 2, m, per_layer=True), each, rtol=1e-6, atol=0)
        assert abs(each - want) > 1e-3  # the two ways of counting differ on these logits
    balanced = torch.zeros(4, 4)  # every expert equally likely, ties broken evenly by topk: the loss is k
    assert load_balancing_loss([balanced], 1).item() == pytest.approx(1.0)


def test_each_layer_balanced_on_its_own_when_asked(tmp_path):
    """router_aux_loss_per_layer: the loss adds coef x the mean over sparse layers of transformers'
    loss on that layer alone, and config.json carries the choice, to us and to transformers."""
    hf, pooled = moe_pair(tmp_path, **CONFIGS["aux_loss"])
    ours = Qwen3(dataclasses.replace(pooled.config, router_aux_loss_per_layer=True))
    ours.load_state_dict(pooled.state_dict())
    idx = rand_ids((2, 24), seed=3)
    targets = torch.roll(idx, -1, 1)
    targets[:, -1] = -100
    with torch.no_grad():
        want = hf(idx, labels=idx)  # cross-entropy + 0.3 x the loss over all layers together
        _, loss = ours.eval()(idx, targets)
    each = torch.stack([load_balancing_loss_func((r,), 6, 2) for r in want.router_logits]).mean()
    assert abs(loss.item() - (want.loss.item() - 0.3 * want.aux_loss.item() + 0.3 * each.item())) <= 1e-6
    assert abs(each - want.aux_loss) > 1e-4  # a test that could tell the two apart
    with torch.no_grad():
        assert abs(FusedLoss(ours)(idx, targets).item() - loss.item()) <= 1e-6  # the loss train.py trains on
    save_pretrained(ours, tmp_path / "ours")
    assert from_pretrained(tmp_path / "ours").config.router_aux_loss_per_layer is True
    assert transformers.AutoConfig.from_pretrained(tmp_path / "ours").router_aux_loss_per_layer is True


@pytest.mark.parametrize("name", ["plain", "mlp_only_layers", "sliding_tied"])
@pytest.mark.parametrize("mode", [None, "filled", "fixed"])  # the chapter's loop, the engine's two CPU steps
def test_greedy_tokens_through_the_cache_match_transformers(name, mode, tmp_path):
    hf, ours = moe_pair(tmp_path, seed=3, **CONFIGS[name])
    decoder = {} if mode is None else dict(decoder=Engine(ours, mode))
    prompts = [rand_ids((n,), seed=n).tolist() for n in (6, 2, 9)]
    idx = torch.zeros(3, 9, dtype=torch.long)
    mask = torch.zeros(3, 9, dtype=torch.long)
    for b, p in enumerate(prompts):
        idx[b, 9 - len(p):], mask[b, 9 - len(p):] = torch.tensor(p), 1
    n = 16  # past the window of 4
    got = generate(ours, idx, n, temperature=0, attention_mask=mask, **decoder)
    want = hf.generate(idx, attention_mask=mask, do_sample=False, max_new_tokens=n, min_new_tokens=n,
                       eos_token_id=None, pad_token_id=0)
    assert torch.equal(got, want), f"ours {got.tolist()}\nhf   {want.tolist()}"
    for b, p in enumerate(prompts):  # a padded row computes what the row computes alone
        alone = generate(ours, torch.tensor([p]), n, temperature=0, **decoder)
        assert got[b, 9:].tolist() == alone[0, len(p):].tolist()


@pytest.mark.parametrize("shard", [None, "20KB"])
def test_checkpoints_both_ways(shard, tmp_path, assert_logits_close):
    """transformers' folders (one tensor per expert on disk, sharded, bf16) load into ours; ours load
    into Qwen3MoeForCausalLM with the same logits."""
    hf, _ = moe_pair(tmp_path, seed=4, **CONFIGS["norm_topk_prob"])
    hf.to(torch.bfloat16).save_pretrained(tmp_path / "bf16", max_shard_size=shard or "5GB")
    ours = from_pretrained(tmp_path / "bf16")
    assert ours.model.layers[0].mlp.experts.down_proj.dtype == torch.bfloat16
    idx = rand_ids((2, 12), seed=5)
    with torch.no_grad():
        ours = from_pretrained(tmp_path / "bf16", dtype=torch.float32)  # the stored bf16 values, in fp32
        hf = transformers.Qwen3MoeForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32,
                                                              attn_implementation="eager").eval()
        assert_logits_close(ours(idx)[0], hf(idx).logits)
        save_pretrained(ours, tmp_path / "ours")
        with safe_open(str(tmp_path / "ours" / "model.safetensors"), "pt") as f:
            keys = set(f.keys())
        assert "model.layers.1.mlp.experts.5.up_proj.weight" in keys and "model.layers.1.mlp.gate.weight" in keys
        assert json.loads((tmp_path / "ours" / "config.json").read_text())["model_type"] == "qwen3_moe"
        theirs = transformers.Qwen3MoeForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
        assert_logits_close(theirs(idx).logits, ours(idx)[0])


def test_engine_forms_equal_the_chapter_outputs_and_gradients():
    """engine.moe_forward (the routing slots sorted by expert, a group each) and the FusedLoss built on
    it give the chapter's outputs, gradients and loss, the load-balancing term included; routing
    deliberately lopsided (one expert busy, one idle), so groups of every size and an empty one."""
    torch.manual_seed(6)
    model = Qwen3(Qwen3Config(**{**BASE, **CONFIGS["aux_loss"]}))
    moe = model.model.layers[0].mlp
    x = (torch.randn(3, 11, 32) + 1).requires_grad_()  # every token's entries sum to well above 0
    with torch.no_grad():
        moe.gate.weight[0], moe.gate.weight[5] = 1.0, -1.0  # so expert 0 takes every token, expert 5 none
    params = [x, moe.gate.weight, moe.experts.gate_proj, moe.experts.up_proj, moe.experts.down_proj]
    outs = []
    for forward in (moe, lambda h: moe_forward(moe, h)):
        y = forward(x)
        outs.append((y, torch.autograd.grad((y * torch.linspace(-1, 1, 32)).sum(), params)))
        assert not (moe.router_logits.topk(2).indices == 5).any()
    (y0, g0), (y1, g1) = outs
    torch.testing.assert_close(y1, y0, rtol=1e-6, atol=1e-6)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    idx, targets = rand_ids((2, 20), seed=7), rand_ids((2, 20), seed=8)
    want = model(idx, targets)[1]
    want_grads = torch.autograd.grad(want, list(model.parameters()))
    got = FusedLoss(model)(idx, targets)
    assert abs(got.item() - want.item()) <= 1e-6 * want.item()
    for a, b in zip(torch.autograd.grad(got, list(model.parameters())), want_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_muon_orthogonalises_each_expert_and_the_router_goes_to_adamw():
    """A stack of experts is a batch of matrices: Muon's step on the stack equals torch.optim.Muon's
    step on each expert's matrix alone."""
    model = Qwen3(Qwen3Config(**BASE))
    opts = configure_optimizers(model, "muon", weight_decay=0.1)
    muon = {id(p) for p in opts[0].param_groups[0]["params"]}
    moe = model.model.layers[1].mlp
    assert id(moe.experts.gate_proj) in muon and id(moe.gate.weight) not in muon
    assert id(moe.gate.weight) in {id(p) for g in opts[1].param_groups for p in g["params"]}
    g = torch.Generator().manual_seed(9)
    stack = torch.nn.Parameter(torch.randn(4, 16, 24, generator=g))  # 4 experts, each (16, 24)
    alone = [torch.nn.Parameter(m.detach().clone()) for m in stack]
    ours = Muon([stack], lr=0.02, weight_decay=0.1)
    ref = torch.optim.Muon(alone, lr=0.02, weight_decay=0.1, adjust_lr_fn="original")
    for _ in range(3):
        grads = torch.randn(4, 16, 24, generator=g)
        stack.grad = grads.clone()
        for p, grad in zip(alone, grads):
            p.grad = grad.clone()
        ours.step()
        ref.step()
    for got, want in zip(stack, alone):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)  # bf16 Newton-Schulz on both sides


@pytest.mark.parametrize("overrides, message", [
    (dict(num_experts_per_tok=7), "num_experts_per_tok"),
    (dict(decoder_sparse_step=0), "decoder_sparse_step"),
    (dict(use_sliding_window=True, sliding_window=4, layer_types=["full_attention", "sliding_attention",
                                                                   "full_attention"]), "every layer or in none"),
])
def test_bad_moe_configs_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        Qwen3Config(**{**BASE, **overrides})


def test_a_missing_expert_tensor_is_one_line(tmp_path):
    from guards import CheckpointError
    hf, _ = moe_pair(tmp_path, seed=10)
    path = tmp_path / "hf10"
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != "model.layers.2.mlp.experts.4.down_proj.weight"}
    from safetensors.torch import save_file
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing \['model.layers.2.mlp.experts.4.down_proj.weight'\]") as e:
        from_pretrained(path)
    assert "\n" not in str(e.value)


def test_the_real_shapes_count_as_transformers_counts():
    """qwen3-30b-a3b holds about 30.5B parameters, 3.3B of them active a token; cpu-moe as many
    active as the dense cpu preset's. Counted against transformers' model on the meta device."""
    for name in ("qwen3-30b-a3b", "cpu-moe"):
        cfg = Qwen3Config.preset(name)
        with torch.device("meta"):
            ours, theirs = Qwen3(cfg), transformers.Qwen3MoeForCausalLM(hf_config(cfg))
        assert ours.num_params() == sum(p.numel() for p in theirs.parameters())
        c = cfg
        inactive = c.num_hidden_layers * (c.num_experts - c.num_experts_per_tok) * 3 * c.hidden_size * c.moe_intermediate_size
        assert ours.num_params(active=True) == ours.num_params() - inactive
        if name == "qwen3-30b-a3b":
            assert 30.4e9 < ours.num_params() < 30.6e9 and 3.2e9 < ours.num_params() - inactive < 3.4e9
        else:
            with torch.device("meta"):
                dense = Qwen3(Qwen3Config.preset("cpu"))
            assert ours.num_params() - inactive - dense.num_params() == c.num_hidden_layers * c.hidden_size * c.num_experts


def test_config_json_round_trips_through_transformers(tmp_path):
    cfg = Qwen3Config(**{**BASE, **CONFIGS["aux_loss"], "mlp_only_layers": [1], "decoder_sparse_step": 1})
    back = config_from_dict(hf_config(cfg).to_dict())
    assert back == cfg
    d = transformers.Qwen3MoeConfig(**BASE).to_dict()  # transformers 5 writes num_local_experts
    assert config_from_dict(d).num_experts == 6
