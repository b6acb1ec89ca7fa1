"""The compiled OpenVINO scorers against the numpy reference (<= 1e-5, f32 KV, tiny real models): window
scores on fresh and compacted (block tables reordered by eviction) caches, causal and probe windows,
sliding layers, layer subsets; expected attention with and without covariance; and an engine evicting
with either backend generates the same tokens."""
from __future__ import annotations

import numpy as np
import openvino as ov
import pytest

from kvcrush_ov import CacheEvictionConfig, SchedulerConfig
from kvcrush_ov.core.config import GenerationConfig
from kvcrush_ov.core.engine.llm_engine import LLMEngine
from kvcrush_ov.core.engine.compiled_scorer import CompiledScorer
from kvcrush_ov.core.engine.expected_attention import ExpectedOptions
from kvcrush_ov.core.engine.scorer import BACKEND_ENV, Scorer
from kvcrush_ov.core.errors import ConfigError
from kvcrush_ov.tools.models import prepare

F32 = {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": ov.Type.f32}
TOL = 1e-5


def _engine(model_dir, budget: int, policy: str = "snapkv", **config) -> LLMEngine:
    eviction = CacheEvictionConfig(policy, budget=budget, options={"window": 8} if policy == "snapkv" else {}, **config)
    return LLMEngine(model_dir, "CPU", SchedulerConfig(cache_size=0.05, max_num_batched_tokens=4096,
                                                       cache_eviction_config=eviction), F32)


def _prompt(n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(3, 250, n).tolist()


def _poison_unused_rows(engine: LLMEngine, seq, num_slots: int) -> None:
    """The unused rows of a sequence's last block hold whatever the pool held: NaN here, which must not
    leak into any score."""
    used = num_slots % engine.runner.block_size
    assert used, "the last block must have unused rows"
    for layer in range(engine.runner.num_layers):
        engine.runner.kv.keys[layer][engine.blocks.tables[seq.seq_id][layer][-1], :, used:] = np.nan


def _compare(engine: LLMEngine, seq, queries: np.ndarray, num_slots: int, layers: np.ndarray) -> float:
    """Worst |openvino - numpy| over causal and probe windows (asserts the compiled path was taken)."""
    ref, comp = Scorer(engine.runner, "numpy"), Scorer(engine.runner, "openvino")
    assert comp._compiled is not None
    tables = engine.blocks.tables[seq.seq_id]
    worst = 0.0
    for causal in (True, False):
        a = ref.window(tables, queries, num_slots, layers, causal)
        b = comp.window(tables, queries, num_slots, layers, causal)
        assert b.shape == a.shape == (len(layers), engine.runner.num_q_heads, num_slots)
        assert np.isfinite(b).all()
        worst = max(worst, float(np.abs(a - b).max()))
    return worst


@pytest.mark.parametrize("n", [301, 1101])  # 1101: 35 blocks, read as 36 (one padding block, masked)
def test_fresh_cache_real_and_random_queries(tiny_llama_dir, n):
    engine = _engine(tiny_llama_dir, budget=2000)
    seq = engine.add_request(_prompt(n), GenerationConfig(max_new_tokens=2, ignore_eos=True))
    engine.step()  # whole prompt, no eviction (under budget): n slots, not a multiple of the block
    assert engine.evictor.stats.evictions == 0
    real = engine.evictor.state(seq).queries
    L = engine.runner.num_layers
    assert _compare(engine, seq, real, n, np.arange(L)) <= TOL
    _poison_unused_rows(engine, seq, n)
    rnd = np.random.default_rng(1).standard_normal(real.shape).astype(np.float32) * 3
    assert _compare(engine, seq, rnd, n, np.arange(L)) <= TOL
    assert _compare(engine, seq, rnd[:, -3:], 200, np.array([L - 1])) <= TOL  # a subset, fewer slots


def test_compacted_cache_after_evictions(tiny_llama_dir):
    engine = _engine(tiny_llama_dir, budget=128)
    seq = engine.add_request(_prompt(250, seed=2), GenerationConfig(max_new_tokens=40, ignore_eos=True))
    while engine.evictor.stats.evictions < 2:  # prompt end, then one in decoding: tables reordered
        engine.step()
    n = int(engine.blocks.layer_lens(seq.seq_id).max())
    q = engine.evictor.state(seq).queries
    assert _compare(engine, seq, q, n, np.arange(engine.runner.num_layers)) <= TOL


def test_sliding_window_layers():
    model_dir = prepare("tiny-gemma3", "fp32")
    engine = _engine(model_dir, budget=2000)
    assert 0 in engine.runner.sliding_windows and max(engine.runner.sliding_windows) > 0
    seq = engine.add_request(_prompt(150, seed=3), GenerationConfig(max_new_tokens=2, ignore_eos=True))
    engine.step()
    q = engine.evictor.state(seq).queries
    assert _compare(engine, seq, q, 150, np.arange(engine.runner.num_layers)) <= TOL


@pytest.mark.parametrize("budget", [2000, 128])  # fresh; compacted (and statistics past the prompt)
def test_expected_attention(tiny_llama_dir, budget):
    engine = _engine(tiny_llama_dir, budget=budget, scores="expected")
    seq = engine.add_request(_prompt(250, seed=4), GenerationConfig(max_new_tokens=40, ignore_eos=True))
    for _ in range(36):
        engine.step()
    assert (engine.evictor.stats.evictions > 0) == (budget < 250)
    stats, tables = engine.evictor.state(seq).query_stats, engine.blocks.tables[seq.seq_id]
    n, L = int(engine.blocks.layer_lens(seq.seq_id).max()), engine.runner.num_layers
    _poison_unused_rows(engine, seq, n)
    ref, comp = Scorer(engine.runner, "numpy"), Scorer(engine.runner, "openvino")
    for options in (ExpectedOptions(), ExpectedOptions(future=64, covariance=False)):
        for layers in (np.arange(L), np.array([L - 1])):
            a = ref.expected(tables, stats, options, len(seq.token_ids), n, layers)
            b = comp.expected(tables, stats, options, len(seq.token_ids), n, layers)
            assert b.shape == a.shape == (len(layers), engine.runner.num_q_heads, n)
            np.testing.assert_allclose(b.sum(axis=-1), 1.0, rtol=1e-5)
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=TOL)  # shares of ~1/n: relative matters


def test_f16_pool_is_not_converted_whole(tiny_llama_dir):
    """Where the device would convert the whole f16 pool before the gather (this CPU: no f16 arithmetic),
    the scorer keeps the numpy path, which reads only the sequence's blocks; scores agree either way."""
    eviction = CacheEvictionConfig("snapkv", budget=2000, options={"window": 8})
    engine = LLMEngine(tiny_llama_dir, "CPU", SchedulerConfig(cache_size=0.05, kv_cache_precision="f16",
                                                              cache_eviction_config=eviction),
                       {"INFERENCE_PRECISION_HINT": "f32"})
    compiled = CompiledScorer(engine.runner)
    assert (engine.evictor.scorer._compiled is None) == (not compiled.reads_pool_in_place)
    seq = engine.add_request(_prompt(100, seed=5), GenerationConfig(max_new_tokens=2, ignore_eos=True))
    engine.step()
    q, tables = engine.evictor.state(seq).queries, engine.blocks.tables[seq.seq_id]
    layers = np.arange(engine.runner.num_layers)
    a = Scorer(engine.runner, "numpy").window(tables, q, 100, layers)
    assert np.abs(compiled.window(tables, q, 100, layers) - a).max() <= TOL
    assert np.abs(engine.evictor.scorer.window(tables, q, 100, layers) - a).max() <= TOL


def test_unknown_backend_is_refused(tiny_llama_dir, monkeypatch):
    engine = _engine(tiny_llama_dir, budget=2000)
    monkeypatch.setenv(BACKEND_ENV, "cuda")
    with pytest.raises(ConfigError, match="scorer backend"):
        Scorer(engine.runner)


@pytest.mark.parametrize("policy", ["snapkv", "kvcrush"])
def test_engine_tokens_equal_with_either_backend(tiny_llama_dir, monkeypatch, policy):
    outputs = {}
    for backend in ("numpy", "openvino"):
        monkeypatch.setenv(BACKEND_ENV, backend)
        engine = _engine(tiny_llama_dir, budget=128, policy=policy)
        assert (engine.evictor.scorer._compiled is None) == (backend == "numpy")
        seqs = [engine.add_request(_prompt(n, seed=n), GenerationConfig(max_new_tokens=48, ignore_eos=True))
                for n in (260, 380)]
        while engine.has_unfinished:
            engine.step()
        assert engine.evictor.stats.evictions >= 4  # prompt ends and decoding
        outputs[backend] = [s.token_ids[s.num_prompt_tokens:] for s in seqs]
    assert outputs["openvino"] == outputs["numpy"]
