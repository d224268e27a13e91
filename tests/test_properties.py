"""Property-based tests (hypothesis) for the pure pieces of qwen3.py: the top-k and top-p filters,
the support of sampling, attention masks, RoPE's relative-position property and the KV cache.
Each property is checked against a brute-force oracle written here in plain Python, against a
full forward pass, or against transformers. The search is derandomized and keeps no example
database, so a given pytest command tries the same examples on every run (and in CI)."""
import math
from itertools import accumulate

import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from qwen3 import KVCache, apply_rope, can_attend, rope_cos_sin, sample_next_token, top_k_filter, top_p_filter

NEG_INF = float("-inf")
PROPERTY = settings(derandomize=True, database=None, deadline=None, max_examples=60)

# Small integers make ties (which top-k must keep together); fp32 floats cover everything else,
# from near-uniform rows to probabilities of e^-40.
LOGIT = st.one_of(st.integers(-3, 3).map(float), st.floats(-20, 20, width=32))


@st.composite
def logit_rows(draw, max_rows=3, max_vocab=16):
    """Random logits (B, V), fp32."""
    B, V = draw(st.integers(1, max_rows)), draw(st.integers(1, max_vocab))
    return torch.tensor(draw(st.lists(st.lists(LOGIT, min_size=V, max_size=V), min_size=B, max_size=B)))


@st.composite
def gaussian_rows(draw, max_rows=4, min_vocab=1, max_vocab=16):
    """Seeded N(0, scale^2) logits (B, V): no ties, but the moderate spreads where the filters interact."""
    B, V, scale = draw(st.integers(1, max_rows)), draw(st.integers(min_vocab, max_vocab)), draw(st.floats(0.3, 3.0))
    return scale * torch.randn(B, V, generator=torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1))))


# %% brute-force oracles, one row at a time, in Python floats (fp64)

def softmax64(row):
    top = max(row)
    e = [math.exp(x - top) for x in row]
    return [x / sum(e) for x in e]


def brute_top_k(row, k):
    """Indices whose logit is >= the k-th largest (ties with it all kept); all of them if k is off."""
    if not k or k >= len(row):
        return set(range(len(row)))
    kth = sorted(row, reverse=True)[k - 1]
    return {j for j, x in enumerate(row) if x >= kth}


def brute_top_p_size(probs, p):
    """Size of the smallest prefix of the sorted distribution whose mass reaches p. Skips the
    example (assume) when a cumulative mass lies within 1e-6 of p, where fp32 rounding decides."""
    mass = list(accumulate(sorted(probs, reverse=True)))
    assume(all(abs(m - p) > 1e-6 for m in mass))
    return next(n for n, m in enumerate(mass, 1) if m >= p)


def assert_renormalised(filtered_row, row, kept):
    """softmax(filtered) is a distribution on `kept`, proportional there to softmax(row)."""
    probs = softmax64(row)
    total = sum(probs[j] for j in kept)
    want = torch.tensor([probs[j] / total if j in kept else 0.0 for j in range(len(row))], dtype=torch.float64)
    got = filtered_row.softmax(-1).double()
    assert torch.all(got[want == 0] == 0)  # exactly nothing outside the support
    assert abs(got.sum().item() - 1) < 1e-5
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


# %% top-k, top-p, sampling

@PROPERTY
@given(logits=logit_rows(), data=st.data())
def test_top_k_keeps_every_logit_at_least_the_kth_largest(logits, data):
    V = logits.size(-1)
    k = data.draw(st.one_of(st.none(), st.integers(0, V + 2)), label="k")  # None, 0 and k >= V: off
    before = logits.clone()
    out = top_k_filter(logits, k)
    assert torch.equal(logits, before)  # not in place
    for row, out_row in zip(logits.tolist(), out):
        kept = brute_top_k(row, k)
        want = torch.tensor([x if j in kept else NEG_INF for j, x in enumerate(row)])
        assert torch.equal(out_row, want)  # survivors keep their logits exactly, the rest are -inf
        assert_renormalised(out_row, row, kept)


@PROPERTY
@given(logits=logit_rows(), p=st.one_of(st.none(), st.just(1.0), st.floats(0, 1, exclude_min=True, width=32)))
def test_top_p_keeps_the_smallest_prefix_reaching_p(logits, p):
    before = logits.clone()
    out = top_p_filter(logits, p)
    assert torch.equal(logits, before)
    if p is None or p >= 1:
        assert torch.equal(out, logits)
        return
    for row, out_row in zip(logits.tolist(), out):
        n = brute_top_p_size(softmax64(row), p)
        kept = {j for j, x in enumerate(out_row.tolist()) if x != NEG_INF}
        dropped = set(range(len(row))) - kept
        # n tokens, none less likely than a dropped one: a sorted prefix (tied tokens in either order)
        assert len(kept) == n
        assert not dropped or min(row[j] for j in kept) >= max(row[j] for j in dropped)
        assert max(row[j] for j in kept) == max(row)  # the likeliest token always survives
        assert all(out_row[j].item() == row[j] for j in kept)
        assert_renormalised(out_row, row, kept)


def test_top_p_below_fp32_resolution_keeps_the_likeliest_token():
    assert torch.equal(top_p_filter(torch.tensor([[0.0, 1.0]]), 1e-300), torch.tensor([[NEG_INF, 1.0]]))


@settings(PROPERTY, max_examples=100)  # cheap, and the interesting cases need top-p, top-k and temperature together
@given(logits=st.one_of(logit_rows(max_rows=4), gaussian_rows()), data=st.data())
def test_sampled_tokens_cover_the_kept_support_and_nothing_else(logits, data):
    B, V = logits.shape
    temperature = data.draw(st.floats(0.25, 4.0), label="temperature")
    top_k = data.draw(st.one_of(st.none(), st.integers(1, V)), label="top_k")
    # p in whole percents, as people pass it: hypothesis' floats crowd near 0 and 1, where top-k and
    # top-p rarely interact (1 is "off", tested above)
    top_p = data.draw(st.one_of(st.none(), st.integers(1, 99).map(lambda x: x / 100)), label="top_p")
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    allowed, likely = [], []
    # the tempered logits both filters see, in float32 as next_token_probs makes them: shifted by the
    # best first, which can round a near-tie into a tie (2 + 6e-8 - 2 is 0 there, not 6e-8)
    tempered = (logits.float() - logits.float().amax(dim=-1, keepdim=True)) / temperature
    for row in tempered.tolist():
        kept = brute_top_k(row, top_k)
        probs = softmax64([x if j in kept else NEG_INF for j, x in enumerate(row)])
        n = brute_top_p_size(probs, top_p) if top_p is not None and top_p < 1 else len(kept)
        ranked = sorted(probs, reverse=True)
        least, mass = ranked[n - 1], sum(ranked[:n])
        allowed.append({j for j in kept if probs[j] >= least})  # a tie at the boundary allows either token
        sure = allowed[-1] if len(allowed[-1]) == n else {j for j in kept if probs[j] > least}
        likely.append({j for j in sure if probs[j] / mass >= 0.1})
    # 256 draws per row from one seeded generator: a token with >= 10% of the kept mass is missed
    # with probability < 0.9^256 ~ 2e-12, so "every likely token shows up" is safe to assert
    draws = 256
    tokens = sample_next_token(logits.repeat_interleave(draws, 0), temperature, top_k, top_p,
                               generator=torch.Generator().manual_seed(seed))
    assert tokens.dtype == torch.long and tokens.shape == (B * draws,)
    for b, row_tokens in enumerate(tokens.view(B, draws).tolist()):
        assert set(row_tokens) <= allowed[b], (b, sorted(set(row_tokens)), sorted(allowed[b]))
        assert likely[b] <= set(row_tokens), (b, sorted(set(row_tokens)), sorted(likely[b]))


@PROPERTY
@given(logits=gaussian_rows(max_rows=1, min_vocab=3), data=st.data())
def test_top_p_sees_the_top_k_renormalised_distribution(logits, data):
    # Temperature, then top-k, then top-p on what top-k left, renormalised (transformers' order).
    # A p above the likeliest token's probability but below its share of the top-k mass then keeps
    # only that token; top-p first would keep a second one, which top-k would pass on.
    V = logits.size(-1)
    temperature = data.draw(st.floats(0.5, 2.0), label="temperature")
    k = data.draw(st.integers(2, V - 1), label="k")
    ranked = sorted(softmax64((logits[0].float() / temperature).tolist()), reverse=True)
    first, share = ranked[0], ranked[0] / sum(ranked[:k])
    assume(share - first > 1e-3)
    p = first + data.draw(st.floats(0.1, 0.9), label="u") * (share - first)
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    tokens = sample_next_token(logits.expand(256, V), temperature, k, p, generator=torch.Generator().manual_seed(seed))
    assert set(tokens.tolist()) == {logits[0].argmax().item()}


# %% attention masks

def brute_mask(q_pos, k_pos, window):
    return [[k <= q and (window is None or q - k < window) for k in k_pos] for q in q_pos]


@st.composite
def positions(draw):
    """A run of consecutive positions (a prompt, a chunk, the keys of a cache), or any positions."""
    start, n = draw(st.integers(0, 40)), draw(st.integers(1, 12))
    return draw(st.one_of(st.just(list(range(start, start + n))), st.lists(st.integers(0, 40), min_size=1, max_size=12)))


WINDOW = st.one_of(st.none(), st.integers(1, 15))


@PROPERTY
@given(q_pos=positions(), k_pos=positions(), window=WINDOW)
def test_attention_mask_matches_brute_force(q_pos, k_pos, window):
    got = can_attend(torch.tensor(q_pos), torch.tensor(k_pos), window)
    assert got.dtype == torch.bool
    assert got.tolist() == brute_mask(q_pos, k_pos, window)


@PROPERTY
@given(start=st.integers(0, 40), T=st.integers(1, 12), window=WINDOW)
def test_mask_over_cached_keys_sees_what_a_full_pass_sees(start, T, window):
    # A chunk of T queries at [start, start + T) behind a cache that kept the last W - 1 past keys
    # (all of them without a window): each query must see as many keys as in one full forward pass.
    held = start if window is None else min(start, window - 1)
    S = held + T
    mask = can_attend(torch.arange(start, start + T), torch.arange(start + T - S, start + T), window)
    assert mask.sum(-1).tolist() == [q + 1 if window is None else min(q + 1, window) for q in range(start, start + T)]


# %% RoPE

@PROPERTY
@given(half=st.integers(1, 32), theta=st.floats(100.0, 1e6), m=st.integers(0, 256), n=st.integers(0, 256),
       data=st.data())
def test_rope_dot_product_depends_only_on_the_offset(half, theta, m, n, data):
    head_dim = 2 * half
    d = data.draw(st.integers(-min(m, n), 256), label="d")
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(2, head_dim, generator=g, dtype=torch.float64)
    # heads (q, k) x positions (m, n, m + d, n + d); fp32 angles as the model computes them,
    # applied in fp64 so that the angles' rounding is the only error
    x = torch.stack((q, k))[None, :, None, :].expand(1, 2, 4, head_dim)
    cos, sin = rope_cos_sin(torch.tensor([m, n, m + d, n + d]), head_dim, theta, torch.float64)
    r = apply_rope(x, cos, sin)[0]  # (2, 4, head_dim)
    before, after = r[0, 0] @ r[1, 1], r[0, 2] @ r[1, 3]
    # Each fp32 angle pos * inv_freq is rounded by <= half an ulp of the largest position P (an error
    # in inv_freq itself is the same at every position, so it cancels in the offset); four angles
    # move the dot product by <= 2 ulp(P) |q||k| <= 4 P 2^-24 |q||k|, plus cos/sin rounding.
    # P <= 512 here: about 1.2e-4 |q||k|, where a broken rotation errs by O(|q||k|).
    P = max(m, n, m + d, n + d, 1)
    tol = (4 * P * 2.0**-24 + 1e-6) * q.norm() * k.norm()
    assert abs(before - after) <= tol, (before.item(), after.item(), tol.item())
    # a rotation: every rotated vector keeps its length (cos^2 + sin^2 = 1 to fp32 rounding)
    torch.testing.assert_close(r.norm(dim=-1), x[0].norm(dim=-1), rtol=1e-6, atol=0)


# %% KV cache vs one full forward pass

LAYER_TYPE = st.sampled_from(["full_attention", "sliding_attention"])


@settings(PROPERTY, max_examples=50, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_kv_cache_chunks_match_full_forward(data, model_pair, assert_logits_close):
    # (model_pair and assert_logits_close are stateless factories: sharing them across examples is safe)
    draw = data.draw
    L, n_kv, group = draw(st.integers(1, 3), label="layers"), draw(st.integers(1, 2)), draw(st.integers(1, 3))
    T, B = draw(st.integers(1, 16), label="T"), draw(st.integers(1, 2), label="B")
    overrides = dict(num_hidden_layers=L, num_key_value_heads=n_kv, num_attention_heads=n_kv * group,
                     head_dim=2 * draw(st.integers(1, 4)), hidden_size=16, intermediate_size=24,
                     use_sliding_window=draw(st.sampled_from([True, True, False])),  # mostly on: more to test
                     sliding_window=draw(st.integers(1, T + 3), label="window"),
                     max_window_layers=draw(st.integers(0, L - 1)),
                     layer_types=draw(st.one_of(st.none(), st.lists(LAYER_TYPE, min_size=L, max_size=L))))
    cuts = sorted(draw(st.sets(st.integers(1, T - 1)), label="cuts")) if T > 1 else []
    seed = draw(st.integers(0, 1000), label="seed")
    hf, ours = model_pair(seed=seed, **overrides)
    idx = torch.randint(0, hf.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))
    # transformers' reading of the config: which layers slide, and by how much (None: not at all).
    # Its sliding_window is None without use_sliding_window; it then refuses to run "sliding_attention"
    # layers, which ours runs as full attention, so it is the oracle only where it runs.
    windows = [hf.config.sliding_window if t == "sliding_attention" else None for t in hf.config.layer_types]
    hf_runs = hf.config.sliding_window is not None or "sliding_attention" not in hf.config.layer_types
    with torch.no_grad():
        full, _ = ours(idx)
        if hf_runs:
            assert_logits_close(full, hf(idx, use_cache=False).logits)
        cache = KVCache(ours.config)
        for a, b in zip([0, *cuts], [*cuts, T]):  # a prefill, then chunks of random sizes
            logits, _ = ours(idx[:, a:b], cache=cache)
            assert_logits_close(logits, full[:, a:b])
            assert cache.seen_tokens == b
            for i, window in enumerate(windows):
                held = b if window is None else min(b, window - 1)  # a sliding layer keeps W - 1 keys
                shape = (B, n_kv, held, overrides["head_dim"])
                assert cache.keys[i].shape == cache.values[i].shape == shape, (i, b, window)
