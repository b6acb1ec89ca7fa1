"""How the observation window (the newest queries that score the cache) changes the demo's answers,
on demo prompts of tuning seeds (the demo itself uses seed 0).

    .venv/bin/python scripts/window_sweep.py --seeds 1,2 --windows 8,12,16,32 --policies snapkv,kvcrush

Each prompt ends with the question, an instruction ("Answer with the number only.") and the chat
template's tail, so a short window may see no word of the question. Prints one markdown table.
"""
from __future__ import annotations

import argparse

from kvcrush_ov import CacheEvictionConfig, LLMPipeline, SchedulerConfig
from kvcrush_ov.core.options import parse_options
from kvcrush_ov.tools.demo import demo_cases
from kvcrush_ov.tools.models import resolve_model_dir


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--seeds", default="1,2")
    p.add_argument("--windows", default="8,12,16,32")
    p.add_argument("--policies", default="snapkv,kvcrush")
    p.add_argument("--budget-fraction", type=float, default=0.25)
    p.add_argument("--policy-option", action="append", default=[], metavar="KEY=VALUE",
                   help="another option for every row, e.g. pool_back=6")
    args = p.parse_args()
    pipe = LLMPipeline(resolve_model_dir(args.model), scheduler_config=SchedulerConfig(), enable_eviction=True)
    cases = [c for seed in args.seeds.split(",") for c in demo_cases(seed=int(seed))]
    budgets = [max(128, int(args.budget_fraction * len(pipe.tokenizer.prepare(q, True))) // 32 * 32) for q, _ in cases]
    windows = [int(w) for w in args.windows.split(",")]
    extra = parse_options(args.policy_option)
    print(f"{len(cases)} demo prompts (seeds {args.seeds}), {args.budget_fraction:.0%} of each prompt kept"
          + (f", options {extra}" if extra else "") + "\n")
    print("| policy | " + " | ".join(f"window {w}" for w in windows) + " |")
    print("|---|" + "---|" * len(windows))
    for policy in args.policies.split(","):
        cells = []
        for w in windows:
            right = sum(want in pipe.generate(q, max_new_tokens=16, eviction=CacheEvictionConfig(
                policy, budget=b, options={"window": w, **extra})).texts[0] for (q, want), b in zip(cases, budgets))
            cells.append(f"{right}/{len(cases)}")
        print(f"| {policy} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
