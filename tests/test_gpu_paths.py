"""What a GPU asks of the engine, proven without one. A CUDA graph records kernels, not Python:
the decode step it replays must not read a value back to the host (.item(), .tolist(), bool(t)),
make a shape from values (nonzero, boolean indexing, unique), or take a tensor from the host (a CPU
scalar would be frozen into the graph at its recorded value). A training step that does any of the
first two waits for the device there. The meta device holds shapes without values, so each of those
fails on it: code that runs on meta tensors does none of them. (Values on a GPU: benchmarks/gpu.py;
the same steps' values on a CPU: tests/test_decode.py, tests/test_engine.py.)"""
import pytest
import torch
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import engine
from conftest import TINY
from qwen3 import MoE, Qwen3, Qwen3Config, configure_optimizers, sample_next_token

CONFIGS = {
    "dense": {},
    "windows, biases, tied": dict(use_sliding_window=True, sliding_window=4, max_window_layers=1, attention_bias=True,
                                  tie_word_embeddings=True),
    "experts": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16),
}


def meta_model(**overrides):
    with torch.device("meta"):
        return Qwen3(Qwen3Config(**{**TINY, **overrides}))


class HostTensors(TorchDispatchMode):
    """Records every operation that is handed a tensor not on the meta device."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(isinstance(t, torch.Tensor) and t.device.type != "meta" for t in tree_leaves((args, kwargs))):
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_meta_refuses_what_a_graph_cannot_hold():
    """The oracle can fail: each trap, on meta, raises or is recorded."""
    x = torch.zeros(3, device="meta")
    for read_back in (lambda: x.sum().item(), lambda: x.tolist(), lambda: bool(x.sum()), lambda: x.nonzero(),
                      lambda: x[x > 0], lambda: x.unique()):
        with pytest.raises((RuntimeError, NotImplementedError)):
            read_back()
    with pytest.raises(RuntimeError, match="device"):  # a tensor made on the host, mixed in
        x * torch.ones(3)
    with HostTensors() as host:
        x * torch.tensor(2.0)  # a CPU scalar mixes in anywhere, and a graph would freeze its value
    assert "aten.mul.Tensor" in host.ops
    # the chapter's mixture of experts reads back which experts were chosen, once per expert
    moe = meta_model(**CONFIGS["experts"]).model.layers[0].mlp
    assert isinstance(moe, MoE)
    with pytest.raises(NotImplementedError):
        moe(torch.zeros(1, 2, TINY["hidden_size"], device="meta"))


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_the_graphs_decode_step_has_fixed_shapes_and_no_host_values(name, batch):
    """engine.decode_step(fixed=True), the step Engine records as a CUDA graph, with the weights
    laid out as on CUDA (packed, one block): it runs on meta tensors, takes nothing from the host,
    and gives (B, vocab) logits, twice from the same state (the slot advances on the device)."""
    model = meta_model(**CONFIGS[name]).eval()
    weights = engine.decode_weights(model, 1, pack=True)
    gen = engine.Generation(model, batch, 256)
    with HostTensors() as host:
        for _ in range(2):
            logits = engine.decode_step(model, weights, gen.token, gen, fixed=True)
            assert logits.shape == (batch, TINY["vocab_size"]) and logits.device.type == "meta"
    assert host.ops == []


@pytest.mark.parametrize("settings", [dict(temperature=0), dict(temperature=0.7, top_k=5, top_p=0.9)])
def test_sampling_between_replays_waits_for_nothing(settings):
    """What runs between two replays, the next token from the logits, reads nothing back either."""
    with HostTensors() as host:
        token = sample_next_token(torch.empty(3, TINY["vocab_size"], device="meta"), **settings)
    assert token.shape == (3,) and host.ops == []


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_a_dense_training_step_waits_for_nothing(optimizer):
    """FusedLoss as a GPU runs it (the plain logits: meta has a memory budget, as CUDA does), with
    dropout (the GPU default run's), its backward, the gradient clipping and the optimizers: no value
    read back. The loss's forward and backward, which engine.cuda_graphed records, take nothing from
    the host either. train.py reads each step's loss once the next step is queued (tests/test_train.py)."""
    model = meta_model(**CONFIGS["windows, biases, tied"], dropout=0.1).train()
    loss_fn = engine.FusedLoss(model)
    ids = torch.zeros(2, 16, dtype=torch.long, device="meta")
    assert engine.chunk_rows(ids.numel(), model.config.vocab_size, loss_fn.budget) is None  # the GPU's path
    loss_fn(ids, ids)  # the first call makes the RoPE tables, as cuda_graphed's warm-up passes do
    with HostTensors() as host:
        loss = loss_fn(ids, ids)
        loss.backward()
    assert host.ops == []
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    for opt in configure_optimizers(model, optimizer, muon=engine.FastMuon):
        opt.step()
    assert loss.shape == () and all(p.grad.device.type == "meta" for p in model.parameters())


def test_the_chunked_loss_under_autocast_waits_for_nothing():
    """Where the logits do not fit, chunks: their loop is sized by shapes alone. (Fake tensors: meta
    has no autocast; a fake tensor refuses to give a value just as meta does.)"""
    with FakeTensorMode(), torch.device("cpu"):
        model = Qwen3(Qwen3Config(**TINY)).train()
        h = torch.randn(600, TINY["hidden_size"], requires_grad=True)
        targets = torch.randint(0, TINY["vocab_size"], (600,))
        with torch.autocast("cpu", torch.bfloat16):
            loss = engine.linear_cross_entropy(h, model.lm_head.weight, targets, chunk_size=256)  # 3 chunks
        loss.backward()
        with pytest.raises(DataDependentOutputException):
            loss.item()  # the same mode refuses a read-back, so the lines above made none
    assert h.grad.shape == h.shape


def test_a_sparse_training_step_sizes_its_expert_groups_on_the_host():
    """The one wait a training step of experts makes, per sparse layer: engine.moe_forward groups
    each expert's tokens, and counting them (bincount: its length depends on the values) is read
    back to size the groups (no padding to a fixed capacity)."""
    model = meta_model(**CONFIGS["experts"]).train()
    with pytest.raises(NotImplementedError, match="bincount"):
        engine.FusedLoss(model)(*(torch.zeros(2, 16, dtype=torch.long, device="meta"),) * 2)
