"""KVCrush on REAL attention scores of SmolLM2-135M (marker `model`): with representative_fraction=0
it is its base bit for bit (keep-masks on the scores the engine hands policies, and the generated
tokens), and with representatives it matches the slow reading of the paper (tests/test_policies.py)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest

import kvcrush_ov
from kvcrush_ov import CacheEvictionConfig, SchedulerConfig
from kvcrush_ov.core.config import GenerationConfig
from kvcrush_ov.core.engine.llm_engine import LLMEngine
from kvcrush_ov.core.policies import H2O, AttentionStats, KVCrush, KVCrushConfig, SnapKV, make_policy
from test_policies import reference_kvcrush

pytestmark = pytest.mark.model

SEEN: list[AttentionStats] = []


@dataclass(frozen=True)
class RecordingSnapKV(SnapKV):
    """SnapKV that keeps a copy of every AttentionStats the engine hands it."""

    name: ClassVar[str] = "snapkv"

    def keep_mask(self, stats: AttentionStats, budget: int) -> np.ndarray:
        SEEN.append(AttentionStats(stats.scores.copy(), stats.num_kv_heads))
        return super().keep_mask(stats, budget)


def _prompt() -> str:
    import inspect
    import json
    doc = inspect.getdoc(json) + "\n\n" + inspect.getdoc(json.dumps) + "\n\n" + inspect.getdoc(json.loads)
    return doc + "\n\nThe pass key is 48213.\n\n" + inspect.getdoc(json.JSONEncoder) + "\n\nWhat is the pass key?"


def _run(model_dir, policy, ids, n=24):
    engine = LLMEngine(model_dir, "CPU", SchedulerConfig(cache_size=0.2, cache_eviction_config=CacheEvictionConfig(
        policy, budget=256)), enable_eviction=True)
    seq = engine.add_request(ids, GenerationConfig(max_new_tokens=n, ignore_eos=True))
    while engine.has_unfinished:
        engine.step()
    return list(seq.output_ids)


@pytest.fixture(scope="module")
def real(smollm2_dir):
    tok = kvcrush_ov.Tokenizer(smollm2_dir)
    ids = tok.prepare(_prompt(), True)
    assert len(ids) > 600
    SEEN.clear()
    tokens = _run(smollm2_dir, RecordingSnapKV(), ids)
    assert SEEN, "the engine never evicted"
    return smollm2_dir, ids, tokens, list(SEEN)


def test_zero_representatives_is_the_base_on_real_scores(real):
    _, _, _, seen = real
    base = SnapKV()
    crush = KVCrush(base=base, config=KVCrushConfig(representative_fraction=0.0))
    for stats in seen:
        T = stats.num_tokens
        for budget in (96, 128, 200, 256, T - 1):
            if budget < T:
                np.testing.assert_array_equal(crush.keep_mask(stats, budget), base.keep_mask(stats, budget))
        # the default keeps the base's own choice at budget - R on every KV head, plus shared representatives
        p = make_policy("kvcrush")
        r = p.num_representatives(256)
        m, b = p.keep_mask(stats, 256), base.keep_mask(stats, 256 - r)
        assert (m >= b).all() and (m.sum(-1) == min(256, T)).all()


def test_zero_representatives_generates_the_base_tokens(real):
    model_dir, ids, tokens, _ = real
    crush = KVCrush(base=SnapKV(), config=KVCrushConfig(representative_fraction=0.0))
    assert _run(model_dir, crush, ids) == tokens


def test_representatives_match_the_paper_reading_on_real_scores(real):
    _, _, _, seen = real
    stats = seen[0]
    scores = stats.scores[[0, 15, 29]]  # three layers: the loop reference is slow
    sub = AttentionStats(scores, stats.num_kv_heads)
    for frac, span, pick in ((0.25, 1, "medoid"), (0.5, 3, "medoid"), (0.1, 1, "best")):
        cfg = KVCrushConfig(representative_fraction=frac, span=span, pick=pick)
        got = KVCrush(base=H2O(), config=cfg).keep_mask(sub, 256)
        want = reference_kvcrush(scores, stats.num_kv_heads, 32, 64, 256, frac, "median", ("mean",), "sum", 0.5,
                                 span, pick)
        np.testing.assert_array_equal(got, want)
