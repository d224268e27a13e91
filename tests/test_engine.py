"""The engine against the chapter: engine.py computes what qwen3.py computes. The fused loss
against F.cross_entropy on full logits and transformers' loss, Muon's fast Newton-Schulz against the
chapter's loop in fp64. (Decoding: tests/test_decode.py.) fp32, CPU."""
import pytest
import torch
import torch.nn.functional as F

import engine
from engine import FusedLoss, chunk_rows, gram_newton_schulz, linear_cross_entropy, newton_schulz
from conftest import TINY
from qwen3 import NS_COEFFICIENTS, Qwen3, Qwen3Config, zeropower_via_newtonschulz

V = 101  # vocab of the tiny test models (conftest.TINY)


def rand_ids(shape, seed=0, vocab=V):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


# %% 1. the fused loss, against F.cross_entropy on full logits

def max_rel_err(got, want):
    return ((got - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("chunk_size", [8, 37, 64])  # 37 rows: 4 chunks of 8 and a partial one, or one chunk
def test_linear_cross_entropy_matches_full_logits(chunk_size):
    g = torch.Generator().manual_seed(20)
    h = torch.randn(37, 16, generator=g, requires_grad=True)
    w = torch.randn(V, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, V, (37,), generator=g)
    targets[::3] = -100
    want = F.cross_entropy(h @ w.T, targets, ignore_index=-100)
    want_grads = torch.autograd.grad(2.5 * want, (h, w))  # an upstream gradient other than 1
    got = linear_cross_entropy(h, w, targets, chunk_size)
    got_grads = torch.autograd.grad(2.5 * got, (h, w))
    assert abs(got.item() - want.item()) <= 1e-6 * want.item()
    for a, b in zip(got_grads, want_grads):
        assert max_rel_err(a, b) <= 2e-6  # fp32 rounding: up to 7e-7 seen over 30 seeds


def test_linear_cross_entropy_edge_cases():
    g = torch.Generator().manual_seed(21)
    h = torch.randn(10, 16, generator=g, requires_grad=True)
    w = torch.randn(V, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, V, (10,), generator=g)
    # every target ignored: nan loss and zero gradients, as torch does
    ignored = torch.full((10,), -100)
    want = F.cross_entropy(h @ w.T, ignored, ignore_index=-100)
    got = linear_cross_entropy(h, w, ignored, 4)
    assert want.isnan() and got.isnan()
    for a, b in zip(torch.autograd.grad(got, (h, w)), torch.autograd.grad(want, (h, w))):
        assert torch.equal(a, b) and not a.any()
    # without autograd: the same loss and no graph
    want = F.cross_entropy(h @ w.T, targets)
    with torch.no_grad():
        got = linear_cross_entropy(h, w, targets, 4)
    assert not got.requires_grad
    assert abs(got.item() - want.item()) <= 1e-6 * want.item()
    # a frozen input gets no gradient; the other one still gets the right one
    got = linear_cross_entropy(h.detach(), w, targets, 4)
    assert max_rel_err(torch.autograd.grad(got, w)[0], torch.autograd.grad(want, w)[0]) <= 2e-6
    # a target outside the vocabulary is an error, as in torch, not a silent wrong loss
    for bad in (V, -1):
        with pytest.raises((IndexError, RuntimeError)):
            linear_cross_entropy(h, w, torch.where(torch.arange(10) == 3, bad, targets), 4)


SHAPES = {  # untied and tied; biases, GQA 4:1 and windows shorter than the sequence (hidden_states' own mask)
    "untied": dict(), "tied": dict(tie_word_embeddings=True),
    "bias_gqa4_sliding": dict(attention_bias=True, num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=3,
                              use_sliding_window=True, sliding_window=7, max_window_layers=1),
}


@pytest.mark.parametrize("name", SHAPES)
@pytest.mark.parametrize("plain", [False, True])  # chunks (a CPU's path), or all the logits at once (a GPU's)
def test_fused_loss_matches_logits_path_and_transformers(name, plain, model_pair, monkeypatch):
    hf, ours = model_pair(**SHAPES[name])
    if plain:
        monkeypatch.setattr(engine, "chunk_rows", lambda rows, vocab_size, budget: None)
    x = rand_ids((2, 300), seed=22)  # 600 rows: two chunks of 256 (the CPU's) and a partial one
    y = torch.roll(x, -1, 1)
    y[:, -1] = -100
    y[0, :7] = -100
    labels = x.clone()
    labels[0, 1:8] = -100  # transformers shifts labels itself: its labels[:, 1:] are our y[:, :-1]

    def loss_and_grads(model, compute_loss):
        model.zero_grad(set_to_none=True)
        loss = compute_loss()
        loss.backward()
        return loss.item(), {name: p.grad for name, p in model.named_parameters()}  # a tied matrix once

    loss, grads = loss_and_grads(ours, lambda: FusedLoss(ours)(x, y))
    for want_loss, want_grads, rel in (loss_and_grads(ours, lambda: ours(x, y)[1]) + (2e-6,),
                                       loss_and_grads(hf, lambda: hf(input_ids=x, labels=labels).loss) + (1e-5,)):
        assert abs(loss - want_loss) <= 1e-6 * want_loss
        assert grads.keys() == want_grads.keys()
        for name in grads:
            assert max_rel_err(grads[name], want_grads[name]) <= rel, name
    with torch.no_grad():
        assert abs(FusedLoss(ours)(x, y).item() - loss) <= 1e-6 * loss


def test_grouped_heads_repeated_beside_a_window_as_on_cuda(model_pair, monkeypatch):
    """Where the fused kernels take no grouped heads beside a mask (CUDA), the training pass repeats
    the key and value heads under a sliding window: the chapter's loss and gradients all the same."""
    _, ours = model_pair(**SHAPES["bias_gqa4_sliding"])
    x = rand_ids((2, 40), seed=24)
    y = torch.roll(x, -1, 1)
    a = ours.model.layers[-1].self_attn
    assert a.window < x.size(1) and a.n_kv_head < a.n_head  # a mask, and grouped heads: the path under test
    monkeypatch.setattr(engine, "MASKED_GQA_DEVICES", set())  # this CPU, taken for such a device
    got = torch.autograd.grad(FusedLoss(ours)(x, y), list(ours.parameters()))
    monkeypatch.undo()
    want = torch.autograd.grad(ours(x, y)[1], list(ours.parameters()))
    for a, b in zip(got, want):
        assert max_rel_err(a, b) <= 4e-6  # fp32 rounding, other summation orders (2e-6 to 3e-6 seen)


def test_loss_path_by_device_and_memory(model_pair):
    """Chunks of 256 rows on a CPU; elsewhere the plain logits while logits, their fp32 copy and its
    gradient fit an eighth of the device's memory, else the largest chunks that do."""
    _, ours = model_pair()
    assert FusedLoss(ours).budget is None and chunk_rows(10**6, V, None) == 256
    fit = 1010 * 5000  # vocabulary 101: 1010 bytes a row; 5000 rows fit
    assert chunk_rows(5000, V, fit) is None and chunk_rows(5001, V, fit) == 5000 and chunk_rows(9, V, 10) == 1
    with torch.device("meta"):  # neither CPU nor CUDA: a budget of an eighth of 16 GiB
        assert FusedLoss(Qwen3(ours.config)).budget == 2 * 2**30


def test_cuda_graphed_hands_torch_what_a_recording_needs(model_pair, monkeypatch):
    """engine.cuda_graphed gives torch.cuda.make_graphed_callables (which needs a GPU: replaced here
    by a stand-in) the loss and two distinct (B, T) token tensors on the model's device, under
    autocast with its cache off (torch refuses a recording otherwise); a failed recording is a
    warning and None, and a mixture of experts is refused. (That every parameter gets a gradient,
    which a recording also needs, test_fused_loss_matches_logits_path_and_transformers checks; the
    replay against the eager loss: benchmarks/gpu.py.)"""
    _, ours = model_pair()
    loss, seen = FusedLoss(ours), []

    def record(fn, sample_args):
        seen.append((fn, sample_args, torch.is_autocast_cache_enabled()))
        return fn
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", record)
    with pytest.warns(UserWarning, match="CUDA is not available"):  # autocast("cuda") on this CPU: disabled, as asked
        assert engine.cuda_graphed(loss, 3, 40, torch.bfloat16) is loss
    (fn, (x, y), cache), = seen
    assert fn is loss and cache is False
    for t in (x, y):
        assert t.shape == (3, 40) and t.dtype == torch.long and t.device == ours.lm_head.weight.device
    assert x.data_ptr() != y.data_ptr()  # the graph copies each argument into its own input

    def fail(fn, sample_args):
        raise RuntimeError("operation not permitted when stream is capturing")
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", fail)
    with pytest.warns(RuntimeWarning, match="CUDA graphs off, recording failed: RuntimeError: operation not"):
        assert engine.cuda_graphed(loss, 3, 40) is None
    experts = Qwen3(Qwen3Config(**TINY, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16))
    with pytest.raises(ValueError, match="mixture of experts"):
        engine.cuda_graphed(FusedLoss(experts), 3, 40)


def test_fused_loss_under_autocast(model_pair):
    """bf16 matmuls, fp32 softmax: as close to the fp32 result as the logits path under autocast."""
    _, model = model_pair(tie_word_embeddings=True)
    x = rand_ids((2, 40), seed=23)
    y = torch.roll(x, -1, 1)
    y[:, -1] = -100

    def loss_and_grads(fused, amp):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = FusedLoss(model)(x, y) if fused else model(x, y)[1]
        loss.backward()
        return loss, {name: p.grad for name, p in model.named_parameters()}

    def rel(got, want):
        return ((got - want).norm() / want.norm()).item()

    want_loss, want = loss_and_grads(False, amp=False)
    plain_loss, plain = loss_and_grads(False, amp=True)
    loss, grads = loss_and_grads(True, amp=True)
    assert loss.dtype == torch.float32
    assert abs(loss.item() - want_loss.item()) <= 1e-3 * want_loss.item()
    for name, grad in grads.items():
        assert grad.dtype == torch.float32
        # bf16 errors of the blocks dominate (a few %); fused/plain error ratios up to 1.2 were seen
        assert rel(grad, want[name]) <= 1.5 * rel(plain[name], want[name]) < 0.1, name


# %% 4. Muon's Newton-Schulz

@pytest.mark.parametrize("shape", [(4, 24, 72), (3, 72, 24), (2, 16, 32), (5, 20, 48)])  # wide, tall, 2x, 2.4x
def test_gram_newton_schulz_matches_the_loop_in_fp64(shape):
    """engine.newton_schulz takes the Gram form in fp32 for matrices at least twice as wide as tall
    (either orientation); its result is the chapter's loop's, run in fp64 as the oracle. One gradient-like stack:
    a few strong directions over noise, condition number in the thousands. There the Gram form in
    fp32 is off by <= 3e-5 (the fp32 loop by ~5e-6, the bf16 loop that the reference runs by ~1e-2;
    one step fewer or a wrong coefficient moves entries by > 1e-2)."""
    g = torch.Generator().manual_seed(3)
    n, rows, cols = shape
    low_rank = torch.randn(n, rows, 3, generator=g) @ torch.randn(n, 3, cols, generator=g)
    for G in (torch.randn(shape, generator=g), low_rank * 30 + 0.01 * torch.randn(shape, generator=g)):
        want = zeropower_via_newtonschulz(G.double(), dtype=torch.float64)  # the chapter's loop
        got = newton_schulz(G, dtype=torch.float32)
        torch.testing.assert_close(got, want.float(), atol=5e-5, rtol=0)
        X = (G.mT if rows > cols else G).double()
        X = X / X.norm(dim=(-2, -1), keepdim=True)
        gram = gram_newton_schulz(X, 5, NS_COEFFICIENTS)  # the algebra, exact up to fp64
        torch.testing.assert_close(gram.mT if rows > cols else gram, want, atol=1e-12, rtol=0)
