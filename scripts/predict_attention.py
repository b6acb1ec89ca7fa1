"""Does a score predict the attention the NEXT queries pay? Prefill N+F tokens; score the first N keys with
what is known at N; print the share of the F next queries' attention mass (over those N keys) that the top
25% keys by each score hold (+32 sinks, 64 recent; per layer and KV head, mean). Higher = better eviction.

    .venv/bin/python scripts/predict_attention.py prose|haystack
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from kvcrush_ov import SchedulerConfig, Tokenizer
from kvcrush_ov.core.config import GenerationConfig
from kvcrush_ov.tools.demo import demo_prompt
from kvcrush_ov.core.engine import expected_attention as ea
from kvcrush_ov.core.engine.attention_scores import window_probabilities, window_scores
from kvcrush_ov.core.engine.llm_engine import LLMEngine
from kvcrush_ov.tools.models import resolve_model_dir

N, F = 1536, 256


def main(kind: str) -> None:
    model_dir = resolve_model_dir("smollm2-135m")
    tok = Tokenizer(model_dir)
    if kind == "haystack":
        ids = tok.prepare(demo_prompt("48213", 0.2, 100), True)
    else:  # natural prose: this repo's README
        ids = tok.prepare((Path(__file__).resolve().parents[1] / "README.md").read_text()[:20000], False)
    ids = ids[:N + F]
    e = LLMEngine(model_dir, "CPU", SchedulerConfig(num_kv_blocks=128, cache_size=0), enable_eviction=True)
    s = e.add_request(ids, GenerationConfig(max_new_tokens=2, ignore_eos=True), eviction=None, query_window=N + F)
    while s.num_computed < len(ids):
        e.step()
    r = e.runner
    L, hkv, table = r.num_layers, r.num_kv_heads, e.blocks.tables[s.seq_id]
    Q = e.evictor.state(s).queries                                                  # [L, N+F, Hq, hd] post-RoPE
    K = np.stack([r.kv.read_keys(l, table[l], N + F) for l in range(L)])
    V = np.stack([r.kv.read_values(l, table[l], N + F) for l in range(L)])
    scales = np.array(r.softmax_scales, np.float32)
    rope = e.evictor.scorer.rope()

    def kv(x: np.ndarray) -> np.ndarray:  # per KV head: mean over its query heads
        return x.reshape(L, hkv, -1, x.shape[-1]).mean(axis=2)

    probs = np.stack([window_probabilities(Q[l, N:], K[l], scales[l]) for l in range(L)])  # [L, Hq, F, N+F]
    truth = kv(probs[..., :N].sum(axis=2))
    stats = ea.QueryStats.empty(L, r.num_q_heads, r.head_size).add(ea.pre_rope_rows(rope, Q[:, :N], 0, 4))
    Kn = K[:, :, :N]
    norms = np.linalg.norm(V[:, :, :N], axis=-1)
    preds = {
        "expected (cov, future 512)": ea.score(stats, rope, Kn, scales, N),
        "expected, no covariance": ea.score(stats, rope, Kn, scales, N, ea.ExpectedOptions(covariance=False)),
        "expected, future 2048": ea.score(stats, rope, Kn, scales, N, ea.ExpectedOptions(future=2048)),
        "expected, future 64": ea.score(stats, rope, Kn, scales, N, ea.ExpectedOptions(future=64)),
        "expected, value-norm": ea.score(stats, rope, Kn, scales, N, ea.ExpectedOptions(value_norm=True),
                                         value_norms=norms),
        "window 8": np.stack([window_scores(Q[l, N - 8:N], Kn[l], scales[l]) for l in range(L)]),
        "window 64": np.stack([window_scores(Q[l, N - 64:N], Kn[l], scales[l]) for l in range(L)]),
        "every past query (H2O-like)": np.stack([window_scores(Q[l, :N], Kn[l], scales[l]) for l in range(L)]),
    }
    k = N // 4

    def held(score: np.ndarray) -> float:
        sc = score.copy()
        sc[..., :32] = np.inf   # sinks and the recent window are always kept
        sc[..., -64:] = np.inf
        idx = np.argpartition(-sc, k, axis=-1)[..., :k]
        return float((np.take_along_axis(truth, idx, -1).sum(-1) / truth.sum(-1)).mean())

    print(f"{kind}: N={N}, F={F}, keep {k}: share of the next {F} queries' attention mass held")
    print(f"  {'random':30s} {held(np.random.default_rng(0).random(truth.shape)):.3f}")
    print(f"  {'oracle':30s} {held(truth):.3f}")
    for name, p in preds.items():
        print(f"  {name:30s} {held(kv(p)):.3f}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "prose")
