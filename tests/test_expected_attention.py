"""Expected attention: the vectorised scorer against the slow loop reference of the paper's formula, the
RoPE convention against HF's own pre-RoPE queries, and the engine's running statistics against the
model's true queries."""
from __future__ import annotations

import numpy as np
import pytest

from kvcrush_ov.core.engine.expected_attention import (ExpectedOptions, QueryStats, Rope, expected_scores,
                                                  future_moments, pre_rope_rows, reference_scores, score)


def _rotate(q: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
    """HF's apply_rotary_pos_emb (rotate_half) on [L, T, H, hd] — written independently of Rope."""
    ang = positions[None, :, None] * inv_freq[:, None, :]
    cos = np.concatenate([np.cos(ang)] * 2, axis=-1)[:, :, None]
    sin = np.concatenate([np.sin(ang)] * 2, axis=-1)[:, :, None]
    h = q.shape[-1] // 2
    rot = np.concatenate([-q[..., h:], q[..., :h]], axis=-1)
    return (q * cos + rot * sin).astype(np.float32)


def _case(seed: int = 0, L: int = 2, T: int = 40, hq: int = 4, hkv: int = 2, hd: int = 8, S: int = 30):
    rng = np.random.default_rng(seed)
    inv = 1.0 / 100.0 ** (np.arange(0, hd, 2) / hd)
    rope = Rope(np.stack([inv, inv * 0.5][:L]), hd)
    pre = (rng.standard_normal((L, T, hq, hd)) + rng.standard_normal((L, 1, hq, hd))).astype(np.float32)
    positions = np.arange(T, dtype=np.int64)
    queries = _rotate(pre, positions.astype(np.float64), rope.inv_freq)
    keys = rng.standard_normal((L, hkv, S, hd)).astype(np.float32)
    values = rng.standard_normal((L, hkv, S, hd)).astype(np.float32)
    return rope, pre, queries, positions, keys, values


def test_unrotate_inverts_hf_rotate_half():
    rope, pre, queries, positions, *_ = _case()
    np.testing.assert_allclose(rope.unrotate(queries, positions), pre, atol=1e-5)


@pytest.mark.parametrize("covariance,value_norm", [(True, False), (False, False), (True, True)])
def test_scores_match_the_loop_reference(covariance, value_norm):
    rope, _, queries, positions, keys, values = _case()
    skip, position, future = 4, 40, 16
    # statistics folded in over three uneven chunks, as the engine sees a chunked prefill
    stats = QueryStats.empty(2, 4, 8)
    for lo, hi in ((0, 3), (3, 21), (21, 40)):
        stats = stats.add(pre_rope_rows(rope, queries[:, lo:hi], lo, skip))
    assert stats.num_queries == 40 - skip
    scale = np.array([0.35, 0.5])
    norms = np.linalg.norm(values, axis=-1)
    ours = score(stats, rope, keys, scale, position, ExpectedOptions(future, covariance, value_norm, skip),
                 value_norms=norms)
    ref = reference_scores(queries, positions, keys, scale, rope.inv_freq, position, future, skip_first=skip,
                           covariance=covariance, values=values if value_norm else None)
    assert ours.shape == (2, 4, 30)
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)
    if not value_norm:
        np.testing.assert_allclose(ours.sum(-1), 1.0, atol=1e-5)


def test_statistics_do_not_depend_on_how_queries_arrive():
    """One query at a time (decoding: rows wait, then fold 64 at a time) = one chunk of all of them."""
    rope, _, queries, positions, *_ = _case(T=150)
    one = QueryStats.empty(2, 4, 8).add(pre_rope_rows(rope, queries, 0, 4))
    step = QueryStats.empty(2, 4, 8)
    for t in range(150):
        step = step.add(pre_rope_rows(rope, queries[:, t:t + 1], t, 4))
    assert step.count == 128 and step.num_queries == one.num_queries == 146  # two folds, 18 rows pending
    for a, b in zip(step.moments(), one.moments()):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_layer_subset_and_covariance_changes_the_ranking():
    rope, _, queries, positions, keys, _ = _case(seed=3)
    stats = QueryStats.empty(2, 4, 8).add(rope.unrotate(queries, positions))
    both = score(stats, rope, keys, 0.35, 40)
    one = score(stats, rope, keys[1:], 0.35, 40, layers=np.array([1]))
    np.testing.assert_allclose(one[0], both[1], atol=1e-6)
    mean_only = score(stats, rope, keys, 0.35, 40, ExpectedOptions(covariance=False))
    # the variance term moves keys in the ranking (it is what tells a spread-out head from a focused one)
    assert (np.argsort(mean_only, axis=-1) != np.argsort(both, axis=-1)).any()


def test_a_key_aligned_with_the_future_mean_ranks_first():
    """The point of the method: with no question yet, the key the average future query points at wins."""
    hd, inv = 8, np.array([[1.0, 0.1, 0.01, 0.001]])
    rope = Rope(inv, hd)
    rng = np.random.default_rng(1)
    mu = np.array([3.0, 0, 0, 0, 0, 0, 0, 2.0], np.float32)
    pre = (mu + 0.1 * rng.standard_normal((1, 200, 1, hd))).astype(np.float32)
    stats = QueryStats.empty(1, 1, hd).add(pre)
    m, _ = future_moments(stats, rope, 1000, 64)
    keys = rng.standard_normal((1, 1, 50, hd)).astype(np.float32)
    keys[0, 0, 17] = 3 * m[0, 0] / np.linalg.norm(m[0, 0])
    s = expected_scores(*future_moments(stats, rope, 1000, 64), keys, 0.35)
    assert int(s[0, 0].argmax()) == 17


def test_rope_from_configs():
    r = Rope.from_config({"rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}}, 3, 64)
    assert r.inv_freq.shape == (3, 32) and r.inv_freq[0, 1] == pytest.approx(100000.0 ** (-2 / 64))
    g = Rope.from_config({"layer_types": ["sliding_attention", "full_attention"],
                          "rope_parameters": {"full_attention": {"rope_theta": 1e6, "rope_type": "default"},
                                              "sliding_attention": {"rope_theta": 1e4, "rope_type": "default"}}},
                         2, 256)
    assert g.inv_freq[0, 1] == pytest.approx(1e4 ** (-2 / 256)) and g.inv_freq[1, 1] == pytest.approx(1e6 ** (-2 / 256))
    lin = Rope.from_config({"rope_theta": 1e4, "rope_scaling": {"type": "linear", "factor": 4.0}}, 1, 16)
    assert lin.inv_freq[0, 1] == pytest.approx(1e4 ** (-2 / 16) / 4)
    with pytest.raises(ValueError, match="yarn"):
        Rope.from_config({"rope_theta": 1e4, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, 1, 16)


# -- on the real model --------------------------------------------------------------------------
@pytest.mark.model
def test_engine_statistics_match_hf_pre_rope_queries(smollm2_dir):
    """The engine's running statistics (post-RoPE queries un-rotated, chunk by chunk) equal the mean and
    covariance of HF's own pre-RoPE queries (q_proj outputs) of the same prompt."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import kvcrush_ov
    from kvcrush_ov import CacheEvictionConfig, SchedulerConfig
    from kvcrush_ov.core.config import GenerationConfig
    from kvcrush_ov.core.engine.llm_engine import LLMEngine
    from kvcrush_ov.tools.models import hf_dir

    ids = kvcrush_ov.Tokenizer(smollm2_dir).prepare("Describe the water cycle step by step. " * 40, True)
    engine = LLMEngine(smollm2_dir, "CPU", SchedulerConfig(cache_size=0.1, max_num_batched_tokens=128),
                       {"INFERENCE_PRECISION_HINT": "f32"}, enable_eviction=True)
    ev = CacheEvictionConfig("snapkv", budget=len(ids) + 64, prefill="after", scores="expected")
    seq = engine.add_request(ids, GenerationConfig(max_new_tokens=4, ignore_eos=True), eviction=ev)
    while seq.num_computed < len(ids):
        engine.step()  # several prefill chunks of <= 128 tokens
    stats = engine.evictor.state(seq).query_stats
    skip = ExpectedOptions().skip_first
    assert stats.num_queries == len(ids) - skip
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir("smollm2-135m"), dtype=torch.float32).eval()
    pre = {}
    hooks = [layer.self_attn.q_proj.register_forward_hook(
        lambda m, i, o, n=n: pre.__setitem__(n, o[0].double().numpy())) for n, layer in enumerate(hf.model.layers)]
    with torch.no_grad():
        hf(torch.tensor([ids]))
    for h in hooks:
        h.remove()
    hq, hd = engine.runner.num_q_heads, engine.runner.head_size
    worst_mean = worst_cov = 0.0
    for layer in range(engine.runner.num_layers):
        q = pre[layer][skip:].reshape(-1, hq, hd)
        mean = q.mean(axis=0)
        cov = np.einsum("thi,thj->hij", q - mean, q - mean) / len(q)
        worst_mean = max(worst_mean, np.linalg.norm(stats.mean[layer] - mean) / np.linalg.norm(mean))
        worst_cov = max(worst_cov, np.linalg.norm(stats.covariance[layer] - cov) / np.linalg.norm(cov))
    # fp16 weights: the IR's q differs from HF's f32 q by ~1e-3 relative (measured: 4e-3 / 9e-3 worst layer,
    # Frobenius); a wrong RoPE convention or position would be off by O(1)
    assert worst_mean < 3e-2 and worst_cov < 3e-2, (worst_mean, worst_cov)
    engine.abort(seq.seq_id)


# -- in the engine ------------------------------------------------------------------------------
def test_engine_evicts_to_the_expected_attention_keep_set(tiny_llama_dir):
    """A fork scored by expected attention keeps exactly the slots the policy picks from
    expected_attention.score over the parent's keys and statistics; a parent without statistics cannot
    be forked so; statistics fold in chunk by chunk."""
    import openvino as ov

    import kvcrush_ov
    from kvcrush_ov import CacheEvictionConfig, KVCrushError, SchedulerConfig
    from kvcrush_ov.core.config import GenerationConfig
    from kvcrush_ov.core.engine.llm_engine import LLMEngine
    from kvcrush_ov.core.policies import AttentionStats

    ids = kvcrush_ov.Tokenizer(tiny_llama_dir).prepare("Paged attention stores keys in blocks. " * 12, True)
    e = LLMEngine(tiny_llama_dir, "CPU", SchedulerConfig(cache_size=0.05, max_num_batched_tokens=48),
                  {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": ov.Type.f32}, enable_eviction=True)
    cfg = GenerationConfig(max_new_tokens=3, ignore_eos=True)
    ev = CacheEvictionConfig("snapkv", budget=48, options={"sink_tokens": 4, "recent_tokens": 16, "window": 8},
                             prefill="after", scores="expected")
    bare = e.add_request(ids, GenerationConfig(max_new_tokens=64, ignore_eos=True), eviction=None, query_window=8)
    parent = e.add_request(ids, cfg, eviction=None, query_window=8, query_stats=True)
    while parent.num_generated == 0 or bare.num_generated == 0:
        e.step()
    with pytest.raises(KVCrushError, match="query_stats=True"):
        e.fork(bare, cfg, ev)
    e.abort(bare.seq_id)
    st = e.evictor.state(parent).query_stats
    assert st.num_queries == len(ids) - ExpectedOptions().skip_first
    r, T = e.runner, len(ids)
    keys = np.stack([r.kv.read_keys(l, e.blocks.tables[parent.seq_id][l], T) for l in range(r.num_layers)])
    scores = score(st, e.evictor.scorer.rope(), keys, np.array(r.softmax_scales), parent.num_computed)
    policy = ev.resolved_policy
    want = policy.keep_mask(AttentionStats(scores, r.num_kv_heads), 48)             # [L, Hkv, T]
    child = e.fork(parent, cfg, ev)
    assert child.metrics.evictions == 1 and e.evictor.state(child).query_stats is st
    for layer in range(r.num_layers):
        got = r.kv.read_keys(layer, e.blocks.tables[child.seq_id][layer], 48)
        expect = np.stack([keys[layer, h][want[layer, h]] for h in range(r.num_kv_heads)])
        np.testing.assert_array_equal(got, expect)
    window = CacheEvictionConfig("snapkv", budget=48, options={"sink_tokens": 4, "recent_tokens": 16, "window": 8},
                                 prefill="after")
    other = e.fork(parent, cfg, window)  # the window's keep-set is another one (the path is really switched)
    assert any(not np.array_equal(r.kv.read_keys(l, e.blocks.tables[other.seq_id][l], 48),
                                  r.kv.read_keys(l, e.blocks.tables[child.seq_id][l], 48)) for l in range(r.num_layers))
    while e.has_unfinished:
        e.step()
        e.blocks.check_invariants()
