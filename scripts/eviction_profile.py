"""Where one request's eviction time goes: scoring, the policy's choice, compaction (ms per eviction).

Runs one request (random prompt ids, greedy, ignore EOS) through LLMEngine with eviction and times the
evictor's parts by wrapping them. Run it once per scorer backend (KVCRUSH_OV_SCORER=numpy|openvino) and
print `uptime` with it: the machine may be shared.

    KVCRUSH_OV_SCORER=openvino PYTHONPATH=. python scripts/eviction_profile.py --model smollm2-135m \
        --policy kvcrush --budget 1024 --prompt-tokens 4096 --new-tokens 128
"""
from __future__ import annotations

import argparse
import functools
import time
from collections import defaultdict

import numpy as np

from kvcrush_ov.core.config import GenerationConfig, SchedulerConfig
from kvcrush_ov.core.engine.llm_engine import LLMEngine
from kvcrush_ov.core.eviction_config import CacheEvictionConfig
from kvcrush_ov.tools.models import resolve_model_dir


def _timed(obj, name: str, label: str, acc: dict, per_call: list | None = None) -> None:
    fn = getattr(obj, name)

    @functools.wraps(fn)
    def timed(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            dt = time.perf_counter() - t
            acc[label] += dt
            if per_call is not None:
                per_call.append(dt)
    object.__setattr__(obj, name, timed)  # (policies are frozen dataclasses)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--policy", default="kvcrush")
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--prompt-tokens", type=int, default=4096)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--decode-slack", type=int, default=0)
    args = ap.parse_args()
    eviction = CacheEvictionConfig(args.policy, budget=args.budget, decode_slack=args.decode_slack)
    engine = LLMEngine(resolve_model_dir(args.model), "CPU", SchedulerConfig(cache_eviction_config=eviction))
    ids = np.random.default_rng(0).integers(100, 20000, args.prompt_tokens).tolist()
    engine.add_request(ids[:64], GenerationConfig(max_new_tokens=4))  # warm-up: kernels compile
    while engine.has_unfinished:
        engine.step()
    acc: dict[str, float] = defaultdict(float)
    evictions: list[float] = []
    ev, policy = engine.evictor, engine.default_eviction.policy
    _timed(ev, "_evict", "eviction (all)", acc, evictions)
    _timed(ev.scorer, "window", "scores (Scorer.window)", acc)
    _timed(policy, "update", "policy.update", acc)
    _timed(policy, "keep_mask", "policy.keep_mask", acc)
    _timed(engine.runner.kv, "compact_layers", "compaction (KVCache.compact_layers)", acc)
    _timed(engine.runner, "run", "model steps (inputs + infer)", acc)
    t0 = time.perf_counter()
    engine.add_request(ids, GenerationConfig(max_new_tokens=args.new_tokens, ignore_eos=True))
    while engine.has_unfinished:
        engine.step()
    total = time.perf_counter() - t0
    backend = "openvino" if ev.scorer._compiled is not None else "numpy"
    print(f"{args.model} {engine.runner.layout.precision} KV, {args.policy} budget {args.budget}, "
          f"{args.prompt_tokens} + {args.new_tokens}, decode_slack {args.decode_slack}, scorer {backend}: "
          f"{total:.2f} s, {len(evictions)} evictions, {sum(evictions):.3f} s ({100 * sum(evictions) / total:.2f}%); "
          f"per eviction ms: {', '.join(f'{1e3 * x:.0f}' for x in evictions)}")
    for label, seconds in sorted(acc.items(), key=lambda x: -x[1]):
        print(f"  {label:38s} {1e3 * seconds:9.1f} ms")


if __name__ == "__main__":
    main()
