"""Decoding: batches of prompts of different lengths (left padding and an attention mask, as in
transformers); the engine's preallocated cache, its one-token steps (over the filled cache, and of
fixed shape as CUDA graphs replay it) and float16's overflow guard, against the chapter; generate and
stream refusing bad input. Oracles: transformers' Qwen3ForCausalLM (forward and generate), the
chapter's full forward pass without a cache, and each prompt generated on its own. fp32, CPU."""
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import Engine, Generation, StaticKVCache, decode_step, project, should_pack
from qwen3 import KVCache, Qwen3, Qwen3Config, generate, left_padding
from sampling import stream

V = 101  # vocab of the tiny test models (conftest.TINY)
PAD = 0  # the padding id we write; what stands in padded slots must not matter (see left_pad)
SLIDING = dict(num_hidden_layers=3, use_sliding_window=True, sliding_window=4, max_window_layers=1)
SHAPES = {  # dense and sliding, GQA and MQA, with and without biases
    "full_gqa": dict(),
    "full_gqa_attention_bias": dict(attention_bias=True),
    "sliding_w4_gqa": SLIDING,
    "all_sliding_mqa_tied": dict(use_sliding_window=True, sliding_window=3, max_window_layers=0,
                                 num_key_value_heads=1, tie_word_embeddings=True),
}


def rand_ids(shape, seed=0):
    return torch.randint(0, V, shape, generator=torch.Generator().manual_seed(seed))


def left_pad(prompts, seed=0):
    """Prompts (lists of ids) -> idx (B, T) left-padded with random ids (so that a model reading
    the padding would be caught) and mask (B, T), 1 for tokens, 0 for padding."""
    T = max(map(len, prompts))
    idx = rand_ids((len(prompts), T), seed)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for b, p in enumerate(prompts):
        idx[b, T - len(p):] = torch.tensor(p)
        mask[b, T - len(p):] = 1
    return idx, mask


def hf_positions(mask):
    """The position ids transformers' generate derives from a mask (its forward does not)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


# %% left padding: forward, generate

@pytest.mark.parametrize("name", SHAPES)
def test_padded_forward_matches_transformers_and_each_row_alone(name, model_pair, assert_logits_close):
    hf, ours = model_pair(seed=2, **SHAPES[name])
    prompts = [rand_ids((n,), seed=10 + n).tolist() for n in (9, 4, 1, 7)]
    idx, mask = left_pad(prompts, seed=3)
    with torch.no_grad():
        got, _ = ours(idx, attention_mask=mask)
        want = hf(idx, attention_mask=mask, position_ids=hf_positions(mask)).logits
        assert torch.isfinite(got).all()  # padding rows (every key masked but their own) too
        real = mask.bool()
        assert_logits_close(got[real], want[real])
        for b, p in enumerate(prompts):  # a padded row computes what the row computes alone
            alone, _ = ours(torch.tensor([p]))
            assert_logits_close(got[b, -len(p):], alone[0])


@pytest.mark.parametrize("name", SHAPES)
@pytest.mark.parametrize("mode", [None, "filled", "fixed"])  # the chapter's loop, and the engine's two CPU steps
def test_padded_greedy_generate_matches_transformers_and_one_at_a_time(name, mode, model_pair):
    hf, ours = model_pair(seed=1, **SHAPES[name])
    prompts = [rand_ids((n,), seed=20 + n).tolist() for n in (6, 2, 9, 1)]
    idx, mask = left_pad(prompts, seed=4)
    n = 20  # far past every window
    decoder = {} if mode is None else dict(decoder=Engine(ours, mode))
    got = generate(ours, idx, n, temperature=0, attention_mask=mask, **decoder)
    want = hf.generate(idx, attention_mask=mask, do_sample=False, max_new_tokens=n, min_new_tokens=n,
                       eos_token_id=None, pad_token_id=PAD)
    assert got.shape == (4, idx.size(1) + n)
    assert torch.equal(got, want), f"ours {got.tolist()}\nhf   {want.tolist()}"
    for b, p in enumerate(prompts):
        alone = generate(ours, torch.tensor([p]), n, temperature=0, **decoder)
        assert got[b, idx.size(1):].tolist() == alone[0, len(p):].tolist(), b


@pytest.mark.parametrize("mode", ["filled", "fixed"])
def test_the_engine_samples_the_chapters_tokens(mode, model_pair):
    """With temperature, top-k and top-p, a padded batch: the engine's steps (the fixed one is what a
    CUDA graph replays) draw the chapter's tokens from the same generator state."""
    _, ours = model_pair(seed=7, **SLIDING)
    idx, mask = left_pad([rand_ids((n,), seed=40 + n).tolist() for n in (6, 2, 9)], seed=8)
    kw = dict(temperature=0.8, top_k=20, top_p=0.9, attention_mask=mask)
    want = generate(ours, idx, 16, generator=torch.Generator().manual_seed(3), **kw)
    got = generate(ours, idx, 16, generator=torch.Generator().manual_seed(3), decoder=Engine(ours, mode), **kw)
    assert torch.equal(got, want)
    assert len(set(got[:, idx.size(1):].flatten().tolist())) > 3  # sampled, not stuck on one token


def test_padded_sampling_draws_what_each_row_alone_draws(model_pair):
    # With temperature, each row's distribution is its own: a one-row batch and a padded batch
    # put the same probabilities on every token (the draws themselves differ: one generator).
    hf, ours = model_pair(seed=5, **SLIDING)
    prompts = [rand_ids((n,), seed=30 + n).tolist() for n in (5, 2)]
    idx, mask = left_pad(prompts, seed=6)
    with torch.no_grad():
        logits, _ = ours(idx, attention_mask=mask)
        for b, p in enumerate(prompts):
            alone, _ = ours(torch.tensor([p]))
            torch.testing.assert_close(logits[b, -1].softmax(-1), alone[0, -1].softmax(-1), rtol=1e-5, atol=1e-7)


def test_finished_rows_are_padded_as_transformers_does(model_pair):
    # transformers fills a row that has emitted an EOS with pad_token_id, else with the first EOS id
    hf, ours = model_pair(seed=8)
    prompt, n = rand_ids((3, 4), seed=9), 10
    free = generate(ours, prompt, n, temperature=0)[:, 4:]
    eos = [free[1, 2].item(), free[0, 1].item()]  # rows stop at different steps, on different EOS ids
    for pad in (7, None):
        got = generate(ours, prompt, n, temperature=0, eos_token_id=eos, pad_token_id=pad)
        want = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=n,
                           eos_token_id=eos, pad_token_id=pad)  # None: transformers falls back to eos[0]
        assert torch.equal(got, want), f"pad {pad}\nours {got.tolist()}\nhf   {want.tolist()}"
    ours.config.pad_token_id = 5  # without the argument, the config's pad id
    got = generate(ours, prompt, n, temperature=0, eos_token_id=eos)
    assert torch.equal(got, generate(ours, prompt, n, temperature=0, eos_token_id=eos, pad_token_id=5))
    assert (got[:, 4:] == 5).any()


# %% the engine's cache and steps, step by step, against the full forward pass

def decode_and_compare(ours, idx, mask, cuts, assert_logits_close):
    """Feed idx (B, T) in chunks (the first with the mask) through the chapter's forward pass on a
    StaticKVCache and on a KVCache, and through an engine Generation whose one-token chunks after the
    first take the engine's step over the filled cache; then, from the first chunk on, one token at
    a time through the fixed-shape step. At every step each gives the full pass's logits.
    Returns the StaticKVCache and the engine's weights."""
    with torch.no_grad():
        full, _ = ours(idx, attention_mask=mask)
        real = torch.ones_like(idx, dtype=torch.bool) if mask is None else mask.bool()
        B, T = idx.shape
        engine = Engine(ours, "filled")
        w = engine.weights_for(B)
        static, plain, filled = StaticKVCache(ours, B, T + 2), KVCache(ours.config), Generation(ours, B, T + 2)
        steps = 0
        for a, b in zip([0, *cuts], [*cuts, T]):
            m = mask[:, :b] if (a == 0 and mask is not None) else None  # the mask goes with the first call
            keep = real[:, a:b]
            for cache in (static, plain):
                logits, _ = ours(idx[:, a:b], cache=cache, attention_mask=m)
                assert_logits_close(logits[keep], full[:, a:b][keep])
                assert cache.seen_tokens == b
            if a == 0:
                logits = project(filled.prefill(ours, idx[:, :b], m), w.head)
                assert_logits_close(logits[keep[:, -1]], full[:, b - 1][keep[:, -1]])
            elif b - a == 1:
                logits = decode_step(ours, w, idx[:, a:b], filled, fixed=False)
                assert_logits_close(logits, full[:, a])
                steps += 1
            else:
                logits, _ = ours(idx[:, a:b], cache=filled.cache)
                assert_logits_close(logits[keep], full[:, a:b][keep])
            assert filled.cache.seen_tokens == b
        assert steps == sum(b - a == 1 for a, b in zip(cuts, [*cuts[1:], T]))
        fixed = Generation(ours, B, T + 2)
        first = cuts[0] if cuts else T
        fixed.prefill(ours, idx[:, :first], None if mask is None else mask[:, :first])
        for t in range(first, T):  # the fixed-shape step: the whole cache attended, its slot a tensor
            fixed.token.copy_(idx[:, t:t + 1])
            assert_logits_close(decode_step(ours, engine.weights_for(B), fixed.token, fixed, fixed=True), full[:, t])
            assert fixed.slot.item() == t + 1
        assert w.packed == (B == 1)  # one float32 row of a small model on a CPU: a packed copy, else views
    return static, w


@pytest.fixture(params=[1, 2, 3], ids=lambda n: f"{n}threads")
def threads(request):
    """The engine cuts each float32 CPU matrix into one column block per thread (3: not every width divides)."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("name", SHAPES)
@pytest.mark.parametrize("padded", [False, True])
def test_static_cache_matches_full_forward_every_step(name, padded, threads, model_pair, assert_logits_close):
    hf, ours = model_pair(seed=4, **SHAPES[name])
    if padded:  # three prompts (12, 5 and 1 tokens) in one call with their mask, then 8 steps of one token
        idx, mask = left_pad([rand_ids((n,), seed=n).tolist() for n in (12, 5, 1)], seed=7)
        idx, mask = torch.cat([idx, rand_ids((3, 8), seed=8)], 1), torch.cat([mask, torch.ones(3, 8, dtype=torch.long)], 1)
        cuts = list(range(12, 20))
    else:  # batch 1: a prefill of 4, then 16 steps of one token
        idx, mask, cuts = rand_ids((1, 20), seed=5), None, list(range(4, 20))
    cache, w = decode_and_compare(ours, idx, mask, cuts, assert_logits_close)
    assert cache.keys[0].shape[2] == idx.size(1) + 2  # allocated once, for the whole length
    assert w.layers[0].down.size(0) == (threads if 32 % threads == 0 else 1)  # one column block per thread


@st.composite
def padded_batches(draw):
    B = draw(st.integers(1, 3), label="B")
    lengths = draw(st.lists(st.integers(1, 10), min_size=B, max_size=B), label="lengths")
    return left_pad([rand_ids((n,), seed=i * 31 + n).tolist() for i, n in enumerate(lengths)],
                    seed=draw(st.integers(0, 99)))


@settings(derandomize=True, database=None, deadline=None, max_examples=40,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_static_cache_with_padding_matches_full_forward_and_transformers(data, model_pair, assert_logits_close):
    draw = data.draw
    L, n_kv, group = draw(st.integers(1, 3), label="layers"), draw(st.integers(1, 2)), draw(st.integers(1, 3))
    idx, mask = draw(padded_batches())
    prompt_len, extra = idx.size(1), draw(st.integers(0, 6), label="decoded")
    overrides = dict(num_hidden_layers=L, num_key_value_heads=n_kv, num_attention_heads=n_kv * group,
                     head_dim=2 * draw(st.integers(1, 4)), hidden_size=16, intermediate_size=24,
                     use_sliding_window=True, sliding_window=draw(st.integers(1, prompt_len + extra + 2), label="window"),
                     max_window_layers=draw(st.integers(0, L - 1)))
    hf, ours = model_pair(seed=draw(st.integers(0, 1000), label="seed"), **overrides)
    seq = torch.cat([idx, rand_ids((idx.size(0), extra), seed=extra)], dim=1)
    full_mask = torch.cat([mask, torch.ones(idx.size(0), extra, dtype=torch.long)], dim=1)
    # the prompt in one call (with its mask), then the extra tokens in chunks of random sizes
    cuts = sorted(draw(st.sets(st.integers(prompt_len + 1, seq.size(1) - 1)), label="cuts")) if extra > 1 else []
    with torch.no_grad():  # transformers is the oracle for the padded full pass
        real = full_mask.bool()
        ours_full, _ = ours(seq, attention_mask=full_mask)
        hf_full = hf(seq, attention_mask=full_mask, position_ids=hf_positions(full_mask)).logits
        assert_logits_close(ours_full[real], hf_full[real])
    decode_and_compare(ours, seq, full_mask, [prompt_len, *cuts] if extra else [], assert_logits_close)


def test_left_padding_helper():
    assert left_padding(torch.tensor([[0, 0, 1], [1, 1, 1], [0, 1, 1]]), (3, 3)).tolist() == [2, 0, 1]
    with pytest.raises(ValueError, match="left padding"):
        left_padding(torch.tensor([[1, 0, 1]]), (1, 3))
    with pytest.raises(ValueError, match="only 0"):
        left_padding(torch.tensor([[0, 2]]), (1, 2))
    with pytest.raises(ValueError, match="shape"):
        left_padding(torch.tensor([[0, 1]]), (1, 3))


# %% float16 and its overflow guard

def overflowing_pair(model_pair):
    """(fp32 model, its fp16 copy) whose layer-0 MLP writes ~1e5 into the residual stream: finite in
    float32, beyond float16's 65504."""
    _, ours = model_pair(seed=11)
    with torch.no_grad():
        ours.model.layers[0].mlp.down_proj.weight *= 1e5
    half = type(ours)(ours.config).eval()
    half.load_state_dict(ours.state_dict())
    return ours, half.half()


def test_float16_overflow_is_caught_and_generation_goes_on_in_float32(model_pair):
    ours, half = overflowing_pair(model_pair)
    prompt = rand_ids((2, 6), seed=12)
    with torch.no_grad():
        logits32, _ = ours(prompt)
        assert torch.isfinite(logits32).all() and logits32.abs().max() < 1e5
        assert not torch.isfinite(half(prompt)[0]).all()  # the chapter's float16 pass overflows
    want = generate(ours, prompt, 8, temperature=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = generate(half, prompt, 8, temperature=0, decoder=Engine(half))
    assert any("float16 overflowed" in str(w.message) for w in caught)
    assert torch.equal(got, want)  # recomputed in float32 from the start: float32's tokens
    assert half.lm_head.weight.dtype == torch.float32  # and it stays in float32 from then on


def test_compiled_fixed_shape_step_gives_the_chapters_tokens(model_pair):
    """Engine(compile=True): the fixed-shape step through torch.compile, as a GPU would replay it in a
    graph, gives the chapter's greedy tokens, padded batch and sliding windows included."""
    _, ours = model_pair(seed=14, **SLIDING)
    idx, mask = left_pad([rand_ids((n,), seed=n).tolist() for n in (7, 3)], seed=15)
    want = generate(ours, idx, 8, temperature=0, attention_mask=mask)
    assert torch.equal(generate(ours, idx, 8, temperature=0, attention_mask=mask,
                                decoder=Engine(ours, "fixed", compile=True)), want)
    with pytest.raises(ValueError, match="compile without a fixed shape"):
        Engine(ours, "filled", compile=True)


def test_float16_decoding_stays_close_to_float32(model_pair):
    _, ours = model_pair(seed=13, **SLIDING)
    half = type(ours)(ours.config).eval()
    half.load_state_dict(ours.state_dict())
    half.half()
    idx, mask = left_pad([rand_ids((n,), seed=n).tolist() for n in (7, 3)], seed=14)
    with torch.no_grad():
        want, _ = ours(idx, attention_mask=mask)
        got, _ = half(idx, attention_mask=mask)
    real = mask.bool()
    assert got.dtype == torch.float16 and torch.isfinite(got).all()
    err = (got[real].float() - want[real]).abs().max().item()
    assert err < 2e-2 * want.abs().max().item(), err  # float16 keeps 11 bits: ~1e-3 relative per op


# %% bad input: one clear ValueError before any work

@pytest.mark.parametrize("kwargs, match", [
    (dict(idx=torch.zeros(1, 0, dtype=torch.long)), "empty"),
    (dict(idx=torch.zeros(4, dtype=torch.long)), r"shape \(B, T\)"),
    (dict(idx=torch.zeros(1, 3)), "token ids"),
    (dict(max_new_tokens=-3), "max_new_tokens"),
    (dict(max_new_tokens=2.5), "max_new_tokens"),
    (dict(max_new_tokens=10**9), "exceed the model's context of 1024 tokens"),  # no cache sized for 10**9
    (dict(temperature=-1.0), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=-1), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(attention_mask=torch.ones(1, 2, dtype=torch.long)), "shape"),
    (dict(attention_mask=torch.tensor([[1, 1, 0]])), "left padding"),
    (dict(attention_mask=torch.tensor([[0, 0, 0]])), "needs a token"),
])
def test_generate_and_stream_refuse_bad_input_up_front(kwargs, match, model_pair):
    _, ours = model_pair(seed=0)
    args = dict(idx=rand_ids((1, 3)), max_new_tokens=4, temperature=0.0)
    args.update(kwargs)
    mask = args.pop("attention_mask", None)
    with pytest.raises(ValueError, match=match):
        generate(ours, **args, attention_mask=mask)
    if mask is None:
        with pytest.raises(ValueError, match=match):
            stream(ours, **args)  # at the call, not at the first token
    with pytest.raises(ValueError, match="one sequence"):
        stream(ours, rand_ids((2, 3)), 4)


def test_zero_new_tokens_returns_the_prompt(model_pair):
    _, ours = model_pair(seed=0)
    prompt = rand_ids((2, 3))
    assert torch.equal(generate(ours, prompt, 0), prompt)
    assert list(stream(ours, prompt[:1], 0)) == []


def test_packed_copy_only_where_it_was_measured_to_pay():
    """The engine packs for one float32 row on a CPU, while a step's matrices fit in 256 MB."""
    def model(hidden, intermediate=64, **kw):  # 1 layer: q, k, v, o (hidden, hidden), gate, up, down, the head
        cfg = Qwen3Config(vocab_size=V, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=1,
                          num_attention_heads=1, num_key_value_heads=1, head_dim=hidden, **kw)
        with torch.device("meta"):
            m = Qwen3(cfg)
        return m.to_empty(device="cpu")  # uninitialised memory, never touched

    def matrix_bytes(m):
        return 4 * sum(p.numel() for p in [*m.model.layers.parameters(), m.lm_head.weight] if p.dim() == 2)

    tiny = model(16)
    assert should_pack(tiny, 1) and not should_pack(tiny, 8) and not should_pack(tiny.half(), 1)
    at, over = model(4000, 225), model(4000, 226)  # 4 h^2 + (3 I + 101) h floats: 256 MB lies between
    assert matrix_bytes(at) <= 256 * 2**20 < matrix_bytes(over)
    assert should_pack(at, 1) and not should_pack(over, 1)
    tied = model(4000, 225, tie_word_embeddings=True)  # the head is the embedding's matrix, and still read every step
    assert matrix_bytes(tied) == matrix_bytes(at) and should_pack(tied, 1)


def test_an_engine_holds_its_packed_copy_and_a_new_one_sees_new_weights(model_pair):
    """An engine makes its packed copy once and keeps it across generations; after an optimizer
    step, a load_state_dict (in place or assigned) or a round trip through float16, a new engine
    reads the new weights: the greedy tokens are always those of transformers with the same weights."""
    hf, ours = model_pair(seed=3)
    prompt = rand_ids((1, 5), seed=1)

    def generate_and_compare():
        engine = Engine(ours)
        got = generate(ours, prompt, 8, temperature=0, decoder=engine)
        with torch.no_grad():
            hf.load_state_dict(ours.state_dict())
        want = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, min_new_tokens=8,
                           do_sample=False, eos_token_id=None, pad_token_id=0)
        assert torch.equal(got, want)
        packed = engine.weights_for(1)
        assert packed.packed
        assert torch.equal(generate(ours, prompt, 8, temperature=0, decoder=engine), got)
        assert engine.weights_for(1) is packed  # the same copy for the next generation
        return packed

    first = generate_and_compare()
    opt = torch.optim.SGD(ours.parameters(), lr=0.5)
    ours.train()
    ours(prompt, rand_ids((1, 5), seed=2))[1].backward()
    opt.step()
    ours.eval()
    second = generate_and_compare()
    assert not torch.equal(second.layers[0].qkv, first.layers[0].qkv)  # the old copy is stale, the new is not
    ours.load_state_dict(model_pair(seed=4)[1].state_dict())
    generate_and_compare()
    ours.half().float()  # new storage, float16-rounded weights
    generate_and_compare()
    ours.load_state_dict(model_pair(seed=5)[1].state_dict(), assign=True)  # the parameters themselves replaced
    generate_and_compare()
