"""What eviction costs our engine, variants side by side in ONE process, interleaved per repeat.

Variants (all ours, same prompts, greedy, ignore EOS): the full cache; eviction scored by the numpy
reference; by the compiled OpenVINO scorer (the default); and that with a decode slack. Machine noise
hits all alike, so compare the ratios within one run (this machine is shared: print `uptime` with it).

    PYTHONPATH=. python scripts/eviction_cost.py --model smollm2-135m --policy snapkv --budget 1024 \
        --prompt-tokens 4096 --new-tokens 128 --repeats 3 --slack 96
"""
from __future__ import annotations

import argparse
import os

import numpy as np

from kvcrush_ov.api.pipeline import LLMPipeline
from kvcrush_ov.core.config import SchedulerConfig
from kvcrush_ov.core.engine.scorer import BACKEND_ENV
from kvcrush_ov.core.eviction_config import CacheEvictionConfig
from kvcrush_ov.tools.bench import run_ours, synthetic_prompts
from kvcrush_ov.tools.models import resolve_model_dir


def _pipeline(model_dir, eviction: CacheEvictionConfig | None, scorer: str) -> LLMPipeline:
    os.environ[BACKEND_ENV] = scorer  # read when the engine builds its scorer
    return LLMPipeline(model_dir, "CPU", scheduler_config=SchedulerConfig(cache_eviction_config=eviction))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--policy", default="snapkv")
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--prompt-tokens", type=int, default=4096)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--slack", type=int, default=96, help="decode_slack of the last variant")
    args = ap.parse_args()
    model_dir = resolve_model_dir(args.model)
    ev = lambda slack: CacheEvictionConfig(args.policy, budget=args.budget, decode_slack=slack)  # noqa: E731
    variants = {"full": _pipeline(model_dir, None, "openvino"),
                "numpy scorer": _pipeline(model_dir, ev(0), "numpy"),
                "openvino scorer": _pipeline(model_dir, ev(0), "openvino"),
                f"openvino, slack {args.slack}": _pipeline(model_dir, ev(args.slack), "openvino")}
    tokenizer = next(iter(variants.values())).tokenizer
    for pipe in variants.values():  # warm-up: first inference compiles kernels
        run_ours(pipe, synthetic_prompts(tokenizer, 64, 1, seed=99), 4)
    rows: dict[str, list] = {name: [] for name in variants}
    for rep in range(args.repeats):
        prompts = synthetic_prompts(tokenizer, args.prompt_tokens, 1, seed=rep)
        for name, pipe in variants.items():
            evictions0 = pipe.engine.metrics().evictions
            r = run_ours(pipe, prompts, args.new_tokens)
            rows[name].append((r.ttft_s_mean, r.decode_tok_s, r.seconds, r.eviction_s, r.eviction_share,
                               pipe.engine.metrics().evictions - evictions0))
    print(f"{args.model}, {args.policy} budget {args.budget}, {args.prompt_tokens} + {args.new_tokens}, "
          f"medians of {args.repeats} interleaved repeats")
    print("| variant | TTFT s | TTFT / full | decode tok/s | decode / full | s | evictions | eviction s | share |")
    print("|---|---|---|---|---|---|---|---|---|")
    full = np.median(np.array(rows["full"]), axis=0)
    for name, values in rows.items():
        ttft, decode, secs, ev_s, share, n = np.median(np.array(values), axis=0)
        print(f"| {name} | {ttft:.2f} | {ttft / full[0]:.3f} | {decode:.1f} | {decode / full[1]:.3f} | {secs:.1f} | "
              f"{n:.0f} | {ev_s:.3f} | {100 * share:.2f}% |")


if __name__ == "__main__":
    main()
