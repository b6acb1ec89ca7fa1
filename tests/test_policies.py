"""Eviction policies: hand-computed cases, openvino-genai's pinned block behaviours, a loop-based
reference of the paper's KVCrush, and property tests of the keep-mask contract for every policy."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvcrush_ov.core.errors import ConfigError
from kvcrush_ov.core.policies import (KVCRUSH_BASES, POLICIES, H2O, AttentionStats, FullCache, KVCrush,
                                 KVCrushBlock, KVCrushConfig, PyramidKV, SnapKV, StreamingLLM,
                                 make_policy)
from kvcrush_ov.core.policies.base import pool_tokens, topk_keep_mask
from kvcrush_ov.core.policies.kvcrush import (anchor_keys, diffuseness, split_by_layer, bucket_bounds, bucket_representatives,
                                         hamming, make_anchor, pack_signatures, token_signatures)
from kvcrush_ov.core.policies.kvcrush_block import (block_anchor, block_hamming, block_indicators,
                                               select_blocks_at_stride)

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def stats_of(scores, hkv: int = 1) -> AttentionStats:
    return AttentionStats(np.asarray(scores, dtype=np.float32), num_kv_heads=hkv)


def random_stats(seed: int, L: int, hkv: int, g: int, T: int) -> AttentionStats:
    rng = np.random.default_rng(seed)
    return AttentionStats(rng.random((L, hkv * g, T), dtype=np.float32), num_kv_heads=hkv)


# ------------------------------------------------------------------------------------------------
# shared kernels
# ------------------------------------------------------------------------------------------------
def test_pool_max_and_avg_by_hand():
    x = np.array([[1, 5, 2, 0, 0, 3]], dtype=np.float32)
    assert pool_tokens(x, 3, "max").tolist() == [[5, 5, 5, 2, 3, 3]]
    np.testing.assert_allclose(pool_tokens(x, 3, "avg"), [[3, 8 / 3, 7 / 3, 2 / 3, 1, 1.5]], rtol=1e-6)
    assert pool_tokens(x, 1, "max") is x


@SETTINGS
@given(st.integers(1, 40), st.sampled_from([1, 3, 5, 7, 9]), st.integers(0, 2**16))
def test_pool_max_matches_naive(T, k, seed):
    x = np.random.default_rng(seed).random((2, T)).astype(np.float32)
    r = k // 2
    naive = np.array([[row[max(0, t - r): t + r + 1].max() for t in range(T)] for row in x])
    np.testing.assert_array_equal(pool_tokens(x, k, "max"), naive)


@SETTINGS
@given(st.integers(1, 40), st.sampled_from([1, 3, 5]), st.integers(0, 6), st.integers(0, 2**16))
def test_pool_reaching_back_matches_naive(T, k, back, seed):
    """pool_back: token t pools t-r-back .. t+r, so the tokens after a well-scored one inherit its score."""
    x = np.random.default_rng(seed).random((2, T)).astype(np.float32)
    r = k // 2
    for mode, red in (("max", np.max), ("avg", np.mean)):
        naive = np.array([[red(row[max(0, t - r - back): t + r + 1]) for t in range(T)] for row in x])
        np.testing.assert_allclose(pool_tokens(x, k, mode, back), naive, rtol=1e-6)


def test_topk_keep_mask_by_hand():
    s = np.array([[[9, 1, 5, 3, 4, 0, 9]]], dtype=np.float32)
    m = topk_keep_mask(s, 4, sink=1, recent=1)
    assert m[0, 0].tolist() == [True, False, True, False, True, False, True]


# ------------------------------------------------------------------------------------------------
# baselines by hand
# ------------------------------------------------------------------------------------------------
def test_streaming_keeps_sinks_and_most_recent():
    p = StreamingLLM(sink_tokens=2, recent_tokens=2)
    m = p.keep_mask(stats_of(np.zeros((1, 1, 10))), budget=5)
    assert np.flatnonzero(m[0, 0]).tolist() == [0, 1, 7, 8, 9]


def test_h2o_sums_query_heads_of_each_group():
    # 2 KV heads, 2 query heads each; middle slots 1..4; keep 1 middle slot per KV head
    s = np.zeros((1, 4, 6), dtype=np.float32)
    s[0, 0, 1], s[0, 1, 1] = 0.6, 0.0  # group 0: slot 1 total 0.6
    s[0, 0, 2], s[0, 1, 2] = 0.35, 0.35  # group 0: slot 2 total 0.7 -> kept (sum, not max)
    s[0, 2, 4] = 1.0  # group 1: slot 4
    m = H2O(sink_tokens=1, recent_tokens=1).keep_mask(stats_of(s, hkv=2), budget=3)
    assert np.flatnonzero(m[0, 0]).tolist() == [0, 2, 5]
    assert np.flatnonzero(m[0, 1]).tolist() == [0, 4, 5]
    m = H2O(sink_tokens=1, recent_tokens=1, head_reduce="max").keep_mask(stats_of(s, hkv=2), budget=3)
    assert np.flatnonzero(m[0, 0]).tolist() == [0, 1, 5]


def test_snapkv_pooling_keeps_neighbours():
    s = np.zeros((1, 1, 12), dtype=np.float32)
    s[0, 0, 5] = 1.0
    s[0, 0, 9] = 0.5
    p = SnapKV(sink_tokens=1, recent_tokens=2, window=2, kernel=3)
    m = p.keep_mask(stats_of(s), budget=6)
    assert np.flatnonzero(m[0, 0]).tolist() == [0, 4, 5, 6, 10, 11]
    assert p.score_source == "window" and p.window == 2


def test_full_keeps_everything():
    m = FullCache().keep_mask(random_stats(0, 2, 1, 2, 50), budget=3)
    assert m.all() and m.shape == (2, 1, 50)


# ------------------------------------------------------------------------------------------------
# PyramidKV budgets
# ------------------------------------------------------------------------------------------------
def test_pyramid_budgets_by_hand():
    p = PyramidKV(sink_tokens=2, recent_tokens=2, window=2, beta=2.0)
    # extra = 8; top = 4, bottom = 12; layers 12, 8, 4 above the 4 protected
    assert p.layer_budgets(3, 12, 1000).tolist() == [16, 12, 8]
    # capped at T=14: surplus 2 spread over the other two layers
    assert p.layer_budgets(3, 12, 14).tolist() == [14, 13, 9]
    assert p.layer_budgets(3, 12, 10).tolist() == [10, 10, 10]  # T <= budget: keep all


@SETTINGS
@given(st.integers(1, 40), st.integers(0, 8), st.integers(0, 8), st.integers(0, 200),
       st.integers(0, 400), st.floats(1.0, 50.0))
def test_pyramid_budgets_sum_exactly(L, sink, recent, extra, T, beta):
    p = PyramidKV(sink_tokens=sink, recent_tokens=max(recent, 1), window=1, beta=beta)
    budget = p.protected_tokens + extra
    b = p.layer_budgets(L, budget, T)
    assert b.dtype.kind == "i" and b.shape == (L,)
    if T <= budget:
        assert (b == T).all()
    else:
        assert b.sum() == L * budget
        assert (b >= p.protected_tokens).all() and (b <= T).all()
        assert (np.diff(b) <= 0).all()  # more budget in lower layers


# ------------------------------------------------------------------------------------------------
# KVCrush pieces by hand
# ------------------------------------------------------------------------------------------------
def test_signatures_thresholds_by_hand():
    v = np.array([[[1, 2, 3, 10], [4, 3, 2, 1]]], dtype=np.float32)  # [R=1, H=2, n=4]
    assert token_signatures(v, "mean")[0].astype(int).tolist() == [[0, 0, 0, 1], [1, 1, 0, 0]]
    assert token_signatures(v, "median")[0].astype(int).tolist() == [[0, 0, 1, 1], [1, 1, 0, 0]]
    assert token_signatures(v, "top", 0.25)[0].astype(int).tolist() == [[0, 0, 0, 1], [1, 0, 0, 0]]


@SETTINGS
@given(st.integers(1, 30), st.integers(0, 2**16), st.booleans())
def test_median_signature_equals_numpy_median(n, seed, ties):
    rng = np.random.default_rng(seed)
    v = rng.integers(0, 3, (2, 3, n)).astype(np.float32) if ties else rng.random((2, 3, n), np.float32)
    np.testing.assert_array_equal(token_signatures(v, "median"), v > np.median(v, -1, keepdims=True))


def test_anchors_by_hand():
    bits = np.array([[[1, 1, 0], [0, 1, 0], [1, 0, 0], [0, 0, 1]]], dtype=bool)  # H=4, n=3
    assert make_anchor("zeros", bits)[0].astype(int).tolist() == [0, 0, 0, 0]
    assert make_anchor("ones", bits)[0].astype(int).tolist() == [1, 1, 1, 1]
    assert make_anchor("alternate", bits)[0].astype(int).tolist() == [0, 1, 0, 1]
    assert make_anchor("mean", bits)[0].astype(int).tolist() == [1, 0, 0, 0]  # majority of 3
    even = np.array([[[1, 0], [1, 1]]], dtype=bool)  # exactly half -> 0
    assert make_anchor("mean", even)[0].astype(int).tolist() == [0, 1]
    r1 = make_anchor("random", bits, np.random.default_rng(3))
    r2 = make_anchor("random", bits, np.random.default_rng(3))
    assert (r1 == r2).all()


@SETTINGS
@given(st.integers(1, 140), st.integers(1, 20), st.integers(0, 2**16))
def test_packed_hamming_matches_bitwise_sum(H, n, seed):
    rng = np.random.default_rng(seed)
    bits = rng.random((2, H, n)) < 0.5
    anchor = rng.random((2, H)) < 0.5
    d = hamming(pack_signatures(bits), pack_signatures(anchor[:, :, None])[..., 0])
    np.testing.assert_array_equal(d, (bits != anchor[:, :, None]).sum(axis=1))


def test_multi_anchor_keys_by_hand():
    # signatures (H=2) of 3 tokens: 00, 01, 11 -> distance to zeros 0,1,2; to alternate(01) 1,0,1
    bits = np.array([[[0, 0, 1], [0, 1, 1]]], dtype=bool)
    codes = pack_signatures(bits)
    assert anchor_keys(bits, codes, ("zeros",))[0].tolist() == [0, 1, 2]
    assert anchor_keys(bits, codes, ("zeros", "alternate"), "sum")[0].tolist() == [1, 1, 3]
    assert anchor_keys(bits, codes, ("zeros", "alternate"), "lex")[0].tolist() == [1, 3, 7]


def test_bucket_bounds_like_array_split():
    for n, b in [(10, 3), (10, 4), (6, 6), (7, 1)]:
        sizes = np.diff(np.append(bucket_bounds(n, b), n)).tolist()
        assert sizes == [len(a) for a in np.array_split(np.arange(n), b)]


def _bits(*sigs: str) -> np.ndarray:
    """'01' = head0 0, head1 1; -> bool [1, H, n]."""
    return np.array([[[c == "1" for c in s] for s in sigs]], dtype=bool).transpose(0, 2, 1)


def test_buckets_and_representatives_by_hand():
    bits = _bits("00", "11", "01", "00", "11", "10")  # tokens t0..t5
    codes = pack_signatures(bits)
    keys = anchor_keys(bits, codes, ("zeros",))
    assert keys[0].tolist() == [0, 2, 1, 0, 2, 1]
    # sorted (key, t): t0 t3 t2 | t5 t1 t4. Bucket 0 centre (0, 1/3): t0, t3 at 1/3 -> t0.
    # Bucket 1 centre (1, 2/3): t1, t4 at 1/3 < t5 at 2/3 -> t1.
    assert sorted(bucket_representatives(codes, keys, 2, 2)[0].tolist()) == [0, 1]
    # 3 buckets: {t0,t3} -> t0; {t2,t5} tie -> t2; {t1,t4} -> t1
    assert sorted(bucket_representatives(codes, keys, 2, 3)[0].tolist()) == [0, 1, 2]
    # one bucket, clear medoid: centre (1, 3/4, 1/4); t1 and t3 at 1/2 -> earliest t1
    bits = _bits("111", "110", "100", "110")
    codes = pack_signatures(bits)
    reps = bucket_representatives(codes, anchor_keys(bits, codes, ("ones",)), 3, 1)
    assert reps[0].tolist() == [1]


# ------------------------------------------------------------------------------------------------
# KVCrush end to end vs a loop reference of the paper
# ------------------------------------------------------------------------------------------------
def reference_kvcrush(scores, hkv, sink, recent, budget, fraction, threshold, anchors, combine, top_fraction,
                      span=1, pick="medoid"):
    """Slow reading written from the paper's description (not from the policy's code), per layer:
    the H2O base keeps its top tokens per KV head (group-summed attention) at budget - R, R a fraction
    of what lies above sinks + recent; tokens no KV head kept are the evicted ones; each gets one bit
    per attention head (above that head's threshold over the evicted tokens); Hamming distance to the
    anchor(s) orders them; R equal groups in that order; each group's token nearest the group's
    centre (then the earliest) is kept for every KV head. With span s, R // s groups each keep their
    token and its evicted neighbours within s // 2; a head left short takes its own next-best tokens.
    pick="best": a group keeps its member with the highest base score (mean over KV heads) instead."""
    L, H, T = scores.shape
    g = H // hkv
    keep = np.zeros((L, hkv, T), dtype=bool)
    n_rep = int(fraction * (budget - sink - recent) + 1e-9)
    for l in range(L):
        if T <= budget:
            keep[l] = True
            continue
        per_head = [scores[l, j * g:(j + 1) * g].sum(axis=0) for j in range(hkv)]
        middle = list(range(sink, T - recent))
        k = budget - n_rep - sink - recent
        protected = set(range(sink)) | set(range(T - recent, T))
        base = [protected | set(sorted(middle, key=lambda t: -per_head[j][t])[:k]) for j in range(hkv)]
        cand = [t for t in range(T) if all(t not in b for b in base)]
        n = len(cand)
        reps = set()
        if n <= n_rep:
            reps = set(cand)
        elif n_rep > 0:
            sig = {t: [] for t in cand}
            for h in range(H):
                vals = np.array([scores[l, h, t] for t in cand])
                if threshold == "mean":
                    on = {t for t in cand if scores[l, h, t] > vals.mean()}
                elif threshold == "median":
                    on = {t for t in cand if scores[l, h, t] > np.median(vals)}
                else:
                    on = set(sorted(cand, key=lambda t: -scores[l, h, t])[: int(top_fraction * n + 1e-9)])
                for t in cand:
                    sig[t].append(int(t in on))
            key = {t: 0 for t in cand}
            for kind in anchors:
                if kind == "zeros":
                    a = [0] * H
                elif kind == "ones":
                    a = [1] * H
                elif kind == "alternate":
                    a = [h % 2 for h in range(H)]
                else:  # mean
                    a = [int(sum(sig[t][h] for t in cand) > n / 2) for h in range(H)]
                for t in cand:
                    d = sum(x != y for x, y in zip(sig[t], a))
                    key[t] = key[t] + d if combine == "sum" else key[t] * (H + 1) + d
            order = sorted(cand, key=lambda t: (key[t], t))
            if n_rep < span:  # no room for one whole span: single tokens
                span = 1
            for bucket in np.array_split(np.array(order), n_rep // span):
                bucket = bucket.tolist()
                centre = [Fraction(sum(sig[t][h] for t in bucket), len(bucket)) for h in range(H)]
                if pick == "best":
                    importance = np.stack(per_head).mean(axis=0)
                    rep = min(bucket, key=lambda t: (-importance[t], t))
                else:
                    rep = min(bucket, key=lambda t: (sum(abs(x - c) for x, c in zip(sig[t], centre)), t))
                reps |= {t for t in range(rep - span // 2, rep + span // 2 + 1) if t in sig}
        for j in range(hkv):
            kept = base[j] | reps
            rest = sorted((t for t in range(T) if t not in kept), key=lambda t: -per_head[j][t])
            kept |= set(rest[: budget - len(kept)])
            keep[l, j, sorted(kept)] = True
    return keep


@SETTINGS
@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 4), st.integers(8, 70), st.integers(0, 3),
       st.integers(0, 3), st.integers(0, 40), st.sampled_from(["mean", "median", "top"]),
       st.sampled_from([("mean",), ("zeros",), ("alternate",), ("mean", "alternate"), ("ones", "zeros")]),
       st.sampled_from(["sum", "lex"]), st.sampled_from([0.25, 0.5, 0.0, 1.0]), st.sampled_from([1, 1, 3]),
       st.sampled_from(["medoid", "best"]), st.integers(0, 2**16))
def test_kvcrush_matches_loop_reference(L, hkv, g, T, sink, recent, extra, threshold, anchors, combine,
                                        frac, span, pick, seed):
    stats = random_stats(seed, L, hkv, g, T)
    budget = sink + recent + extra
    cfg = KVCrushConfig(representative_fraction=frac, threshold=threshold, anchors=anchors,
                        anchor_combine=combine, top_fraction=0.3, span=span, pick=pick)
    p = KVCrush(base=H2O(sink_tokens=sink, recent_tokens=recent), config=cfg)
    got = p.keep_mask(stats, budget)
    want = reference_kvcrush(stats.scores, hkv, sink, recent, budget, frac, threshold, anchors, combine, 0.3,
                             span, pick)
    np.testing.assert_array_equal(got, want)


def test_kvcrush_by_hand():
    # one layer, 2 query heads, T=10, sink=1, recent=1; H2O base keeps slot 5 (largest total)
    s = np.zeros((1, 2, 10), dtype=np.float32)
    s[0, 0] = [0, 0.9, 0.8, 0.1, 0.2, 3.0, 0.7, 0.05, 0.3, 0]
    s[0, 1] = [0, 0.1, 0.2, 0.9, 0.8, 3.0, 0.05, 0.6, 0.7, 0]
    cfg = KVCrushConfig(representative_fraction=0.75, threshold="median", anchors=("zeros",), pick="medoid")
    p = KVCrush(base=H2O(sink_tokens=1, recent_tokens=1), config=cfg)
    assert p.num_representatives(6) == 3  # 0.75 of the 4 selectable; base keeps 0, 9, 5 (budget 3)
    # head0 candidate scores 1:.9 2:.8 3:.1 4:.2 6:.7 7:.05 8:.3 -> median .3 -> bits on 1,2,6
    # head1 1:.1 2:.2 3:.9 4:.8 6:.05 7:.6 8:.7 -> median .6 -> bits on 3,4,8
    # signatures 1:10 2:10 3:01 4:01 6:10 7:00 8:01; distance to 00: all 1 except t7 (0)
    # sorted: 7 | 1 2 3 4 6 8 -> buckets [7,1,2] [3,4] [6,8]
    # [7,1,2]: centre (2/3, 0): t1 (1/3) beats t7 (2/3) -> 1. [3,4] -> 3. [6,8]: tie -> 6.
    m = p.keep_mask(stats_of(s), budget=6)
    assert np.flatnonzero(m[0, 0]).tolist() == [0, 1, 3, 5, 6, 9]


def test_kvcrush_keeps_the_base_per_kv_head_and_adds_shared_representatives():
    stats = random_stats(1, 3, 3, 3, 300)
    p = make_policy("kvcrush", base="snapkv", sink_tokens=4, recent_tokens=16, window=8)
    m = p.keep_mask(stats, budget=100)
    r = p.num_representatives(100)
    assert r == 8  # 0.1 of the 80 selectable slots, not of the budget
    base = p.base.keep_mask(stats, 100 - r)
    assert (m >= base).all() and (m.sum(-1) == 100).all()
    assert not (base == base[:, :1]).all()  # the base chose per KV head ...
    reps = m & ~base
    assert (reps == reps[:, :1]).all()  # ... the representatives are the same for every head
    assert (reps.sum(-1) == r).all() and not (reps[:, 0] & base.any(axis=1)).any()
    assert p.score_source == "window" and p.window == 8 and p.sink_tokens == 4


@SETTINGS
@given(st.sampled_from(KVCRUSH_BASES), st.integers(1, 4), st.integers(1, 3), st.integers(40, 200),
       st.integers(0, 100), st.integers(0, 2**16))
def test_kvcrush_without_representatives_is_its_base(base, L, hkv, T, extra, seed):
    stats = random_stats(seed, L, hkv, 3, T)
    kw = {"window": 4} if base in ("snapkv", "pyramidkv") else {}
    p = make_policy("kvcrush", base=base, sink_tokens=4, recent_tokens=8, representative_fraction=0.0, **kw)
    np.testing.assert_array_equal(p.keep_mask(stats, 12 + extra), p.base.keep_mask(stats, 12 + extra))
    np.testing.assert_array_equal(p.layer_budgets(L, 12 + extra, T), p.base.layer_budgets(L, 12 + extra, T))


def test_kvcrush_split_never_starves_the_base():
    p = make_policy("kvcrush", base="snapkv", representative_fraction=0.25)  # sinks 32 + recent 64
    assert p.num_representatives(96) == 0 and p.num_representatives(128) == 8
    assert p.num_representatives(256) == 40  # 25% of the 160 selectable slots


def test_kvcrush_dynamic_split_moves_representatives_to_diffuse_layers():
    rng = np.random.default_rng(3)
    s = rng.random((2, 4, 400)).astype(np.float32)
    s[1] **= 40  # layer 1: a few tokens take nearly all the mass (concentrated)
    stats = stats_of(s, 2)
    p = make_policy("kvcrush", base="snapkv", sink_tokens=4, recent_tokens=8, window=4, dynamic_split=True)
    r = p.num_representatives(112)
    d = diffuseness(p.base.score(stats), p.base.keep_mask(stats, 112 - r), 4, 8)
    assert d[0] > d[1]
    reps = split_by_layer(d, 2 * r, np.array([112, 112]))
    assert reps.sum() == 2 * r and reps[0] > r > reps[1]
    m = p.keep_mask(stats, 112)
    assert (m.sum(-1) == 112).all()
    # each layer's base holds budget - R_l per KV head: the diffuse layer's base gave up more slots
    base = topk_keep_mask(p.base.score(stats), 112 - reps, 4, 8)
    assert (m >= base).all()
    assert split_by_layer(np.array([1.0, 0.0, 1.0]), 7, np.array([2, 9, 9])).tolist() == [2, 0, 5]


def test_kvcrush_span_keeps_neighbours():
    stats = random_stats(5, 2, 3, 3, 400)
    p = make_policy("kvcrush", base="snapkv", sink_tokens=4, recent_tokens=16, window=8, span=3)
    m = p.keep_mask(stats, 150)
    assert (m.sum(-1) == 150).all()
    reps = (m & ~p.base.keep_mask(stats, 150 - p.num_representatives(150)))[:, 0]
    runs = np.diff(np.flatnonzero(reps[0])) == 1
    assert runs.mean() > 0.4  # mostly contiguous triples, not isolated points


def test_kvcrush_forwards_state_hooks_to_its_base():
    class Base(H2O):
        def update(self, state, scores):
            return ("updated", state, scores)

        def compact(self, state, keep):
            return ("compacted", state, keep)

    p = KVCrush(base=Base())
    assert p.update(1, 2) == ("updated", 1, 2) and p.compact(3, 4) == ("compacted", 3, 4)


def test_kvcrush_over_streaming_asks_for_scores():
    p = make_policy("kvcrush", base="streaming")
    assert p.score_source == "accumulated"
    assert make_policy("kvcrush", base="h2o").score_source == "accumulated"


# ------------------------------------------------------------------------------------------------
# genai block reading: pinned behaviours
# ------------------------------------------------------------------------------------------------
@SETTINGS
@given(st.integers(0, 200), st.integers(0, 2**16), st.booleans())
def test_block_indicators_exactly_half(n, seed, ties):
    rng = np.random.default_rng(seed)
    s = rng.integers(0, 2, (3, n)).astype(np.float32) if ties else rng.random((3, n))
    bits = block_indicators(s)
    assert (bits.sum(-1) == n // 2).all()
    if not ties and n:
        for row, b in zip(s, bits):
            assert row[b].min(initial=np.inf) >= row[~b].max(initial=-np.inf)


def test_block_mean_anchor_majority():
    sig = np.array([[[1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 0]]], dtype=bool)  # 3 blocks of 4
    assert block_anchor("mean", sig)[0].astype(int).tolist() == [1, 1, 0, 0]
    sig4 = np.concatenate([sig, [[[0, 0, 1, 0]]]], axis=1)  # 4 blocks: exactly 2 at bit 1 -> 0
    assert block_anchor("mean", sig4)[0].astype(int).tolist() == [1, 0, 0, 0]
    assert block_hamming(sig4, block_anchor("mean", sig4))[0].tolist() == [1, 1, 1, 2]
    assert block_anchor("alternate", sig)[0].astype(int).tolist() == [0, 1, 0, 1]


def test_block_stride_pinned():
    d = np.zeros((1, 6), dtype=int)
    eligible = np.array([[True, True, True, True, False, False]])
    assert np.flatnonzero(select_blocks_at_stride(d, eligible, 2)[0]).tolist() == [0, 2]
    assert np.flatnonzero(select_blocks_at_stride(d, eligible, 4)[0]).tolist() == [0, 1, 2, 3]
    assert np.flatnonzero(select_blocks_at_stride(d, eligible, 9)[0]).tolist() == [0, 1, 2, 3]
    # sorted by distance first (ties by index): order 3, 1, 0, 2 -> stride 2 keeps 3 and 0
    d = np.array([[2, 1, 3, 0, 0, 0]])
    assert np.flatnonzero(select_blocks_at_stride(d, eligible, 2)[0]).tolist() == [0, 3]


def test_kvcrush_block_end_to_end():
    stats = random_stats(3, 2, 2, 3, 32 * 20)
    p = KVCrushBlock(sink_tokens=32, recent_tokens=64, block_size=32, budget_blocks=2)
    m = p.keep_mask(stats, 32 * 10)
    assert (m.sum(-1) == 320).all() and (m == m[:, :1]).all()
    mid = m[:, 0, 32:-64]
    blocks = mid[:, : (mid.shape[1] // 32) * 32].reshape(2, -1, 32)
    assert (blocks.all(-1).sum(-1) >= 7).all()  # 224 middle slots = 7 whole blocks
    assert p.score_source == "window"
    assert KVCrushBlock(window=0).score_source == "accumulated"


# ------------------------------------------------------------------------------------------------
# the keep-mask contract, for every policy
# ------------------------------------------------------------------------------------------------
def build(name: str, sink: int, recent: int, seed: int):
    if name == "full":
        return FullCache()
    if name in ("snapkv", "pyramidkv"):
        return make_policy(name, sink_tokens=sink, recent_tokens=recent, window=max(1, min(recent, 3)),
                           kernel=3)
    if name == "kvcrush":
        base = ["snapkv", "h2o", "pyramidkv", "streaming"][seed % 4]
        kw = {"window": max(1, min(recent, 3))} if base in ("snapkv", "pyramidkv") else {}
        return make_policy("kvcrush", base=base, sink_tokens=sink, recent_tokens=recent,
                           anchors=("random", "mean"), seed=seed, **kw)
    if name == "kvcrush-block":
        return KVCrushBlock(sink_tokens=sink, recent_tokens=recent, block_size=1 + seed % 5, window=min(recent, 8),
                            anchor=["mean", "random", "zeros"][seed % 3], seed=seed)
    return make_policy(name, sink_tokens=sink, recent_tokens=recent)


@SETTINGS
@given(st.sampled_from(sorted(POLICIES)), st.integers(1, 4), st.integers(1, 3), st.integers(1, 3),
       st.integers(0, 120), st.integers(0, 6), st.integers(1, 8), st.integers(0, 60),
       st.integers(0, 2**16))
def test_keep_mask_contract(name, L, hkv, g, T, sink, recent, extra, seed):
    p = build(name, sink, recent, seed)
    stats = random_stats(seed, L, hkv, g, T)
    budget = sink + recent + extra
    m = p.keep_mask(stats, budget)
    assert m.dtype == bool and m.shape == (L, hkv, T)
    want = p.layer_budgets(L, budget, T)
    assert (m.sum(-1) == want[:, None]).all()
    if name == "full":
        assert m.all()
        return
    if name == "pyramidkv" and T > budget:
        assert want.sum() == L * budget
    elif name != "kvcrush" or T <= budget or not isinstance(p.base, PyramidKV):
        assert (want == min(budget, T)).all()
    assert m[..., : min(sink, T)].all() and m[..., T - min(recent, T):].all()
    np.testing.assert_array_equal(m, p.keep_mask(stats, budget))  # deterministic for a seed


# ------------------------------------------------------------------------------------------------
# configuration errors: ConfigError, one line, naming the field
# ------------------------------------------------------------------------------------------------
BAD_CONFIGS = [
    ("h2o", {"sink_tokens": -1}, "sink_tokens"),
    ("h2o", {"recent_tokens": 2.5}, "recent_tokens"),
    ("h2o", {"head_reduce": "median"}, "head_reduce"),
    ("snapkv", {"window": 100, "recent_tokens": 64}, "window"),
    ("snapkv", {"kernel": 4}, "kernel"),
    ("snapkv", {"pool": "min"}, "pool"),
    ("pyramidkv", {"beta": 0.5}, "beta"),
    ("kvcrush", {"representative_fraction": 1.5}, "representative_fraction"),
    ("kvcrush", {"threshold": "max"}, "threshold"),
    ("kvcrush", {"anchors": ("mean", "foo")}, "anchors"),
    ("kvcrush", {"anchors": ()}, "anchors"),
    ("kvcrush", {"anchor_combine": "prod"}, "anchor_combine"),
    ("kvcrush", {"top_fraction": 0.0}, "top_fraction"),
    ("kvcrush", {"base": "full"}, "base"),
    ("kvcrush", {"base": "nope"}, "base"),
    ("kvcrush", {"seed": -3}, "seed"),
    ("kvcrush", {"span": 2}, "span"),
    ("kvcrush", {"pick": "max"}, "pick"),
    ("kvcrush", {"dynamic_split": "yes"}, "dynamic_split"),
    ("kvcrush-block", {"block_size": 0}, "block_size"),
    ("kvcrush-block", {"anchor": "median"}, "anchor"),
    ("kvcrush-block", {"budget_blocks": -1}, "budget_blocks"),
    ("streaming", {"window": 3}, "window"),
    ("full", {"sink_tokens": 4}, "sink_tokens"),
    ("nope", {}, "nope"),
]


@pytest.mark.parametrize("name,kwargs,field", BAD_CONFIGS)
def test_bad_config_raises_one_line(name, kwargs, field):
    with pytest.raises(ConfigError) as e:
        make_policy(name, **kwargs)
    msg = str(e.value)
    assert "\n" not in msg and field in msg


@pytest.mark.parametrize("name", [n for n in POLICIES if n != "full"])
@pytest.mark.parametrize("budget", [10, -1, 100.5, "64"])
def test_bad_budget_raises_one_line(name, budget):
    p = make_policy(name, sink_tokens=8, recent_tokens=8)
    with pytest.raises(ConfigError) as e:
        p.keep_mask(random_stats(0, 1, 1, 1, 50), budget)
    assert "\n" not in str(e.value) and "budget" in str(e.value)


@pytest.mark.parametrize("scores,hkv", [
    (np.zeros((2, 3)), 1), (np.zeros((1, 3, 5)), 2), (np.zeros((1, 3, 5), dtype=int), 1),
    (np.full((1, 1, 3), np.nan), 1), (np.zeros((1, 2, 5)), 0),
])
def test_bad_stats_raise_one_line(scores, hkv):
    with pytest.raises(ConfigError) as e:
        AttentionStats(scores, num_kv_heads=hkv)
    assert "\n" not in str(e.value)


def test_make_policy_routing():
    p = make_policy("kvcrush", base="pyramidkv", beta=5.0, window=4, representative_fraction=0.5,
                    anchors="mean,alternate")
    assert isinstance(p.base, PyramidKV) and p.base.beta == 5.0 and p.base.window == 4
    assert p.config.anchors == ("mean", "alternate") and p.config.representative_fraction == 0.5
    with pytest.raises(ConfigError):
        make_policy("kvcrush", base=H2O(), window=4)
    with pytest.raises(ConfigError):
        make_policy("kvcrush", config=KVCrushConfig(), threshold="mean")
    assert set(KVCRUSH_BASES) <= set(POLICIES)
    assert {type(make_policy(n)) for n in POLICIES} == set(POLICIES.values())


def test_snapkv_pool_back_keeps_what_follows_a_cue():
    """A single well-scored cue token: centred pooling keeps its +-r neighbours; pool_back also keeps the
    tokens after it up to r + back (through kvcrush's base too); a negative reach is refused."""
    T, cue = 60, 20
    s = np.full((1, 3, T), 0.01, np.float32)
    s[0, :, cue] = 1.0
    s += np.linspace(0, 0.001, T, dtype=np.float32)  # ties broken towards later tokens, away from the cue
    stats = AttentionStats(s, num_kv_heads=1)
    opts = dict(sink_tokens=0, recent_tokens=8, window=8, kernel=3)
    plain = make_policy("snapkv", **opts).keep_mask(stats, 8 + 9)[0, 0]
    back = make_policy("snapkv", pool_back=6, **opts).keep_mask(stats, 8 + 9)[0, 0]
    crush = make_policy("kvcrush", pool_back=6, representative_fraction=0.0, **opts).keep_mask(stats, 8 + 9)[0, 0]
    assert plain[cue - 1:cue + 2].all() and not plain[cue + 2:cue + 8].all()
    assert back[cue - 1:cue + 8].all() and (crush == back).all()
    with pytest.raises(ConfigError, match="pool_back"):
        make_policy("snapkv", pool_back=-1)


def test_keeping_spans_reaches_back_only_where_scores_are_pooled():
    """Compactions inside a prompt keep what follows a cue: SnapKV-family policies (and KVCrush over
    them) pool back; a policy that pools nothing is unchanged; an explicit larger pool_back stays."""
    assert make_policy("snapkv").keeping_spans(6).pool_back == 6
    assert make_policy("snapkv", pool_back=9).keeping_spans(6).pool_back == 9
    assert make_policy("pyramidkv").keeping_spans(6).pool_back == 6
    assert make_policy("kvcrush").keeping_spans(6).base.pool_back == 6
    h2o = make_policy("h2o")
    assert h2o.keeping_spans(6) is h2o
    assert make_policy("kvcrush", base="h2o").keeping_spans(6).base == h2o
