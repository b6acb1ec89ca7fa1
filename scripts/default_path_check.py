"""What a user gets on the default path, next to what the eval reports, on the same prompts.

For each policy: the eval's rows (`kvcrush-ov eval`, every row on the path LLMPipeline runs) and
`LLMPipeline.generate` with a plain `CacheEvictionConfig(policy, budget)`, prompt by prompt, on the
same KV pool. Prints one markdown table (and writes it to OUT/default_path.md): n, the eval's score,
the pipeline's score, paired difference with its 95% CI, identical predictions, the paths taken.

    .venv/bin/python scripts/default_path_check.py --out docs/eval/default-path-ruler-mini-2k \
        --lengths 2048 --samples-per-task 2 --seed 0 --policies snapkv,kvcrush --budget 0.25
"""
from __future__ import annotations

import argparse
import shlex
import sys
from collections import Counter
from pathlib import Path

import kvcrush_ov
from kvcrush_ov import CacheEvictionConfig, SchedulerConfig
from kvcrush_ov.tools.eval.metrics import score
from kvcrush_ov.tools.eval.paired import paired_bootstrap
from kvcrush_ov.tools.eval.runner import EvalConfig, budget_tokens, run_eval, sample_ids
from kvcrush_ov.tools.eval.suite import load_suite
from kvcrush_ov.core.policies import make_policy
from kvcrush_ov.tools.models import resolve_model_dir

RETRIEVAL = "niah_single,niah_single_text,niah_multikey,niah_multivalue,niah_multiquery,vt"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--out", required=True)
    p.add_argument("--lengths", default="2048")
    p.add_argument("--samples-per-task", type=int, default=2)
    p.add_argument("--tasks", default=RETRIEVAL)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--policies", default="snapkv,kvcrush")
    p.add_argument("--budget", type=float, default=0.25)
    p.add_argument("--num-kv-blocks", type=int, default=0, help="KV pool in blocks (0: --cache-size 1 GB)")
    args = p.parse_args()
    model_dir = resolve_model_dir(args.model)
    policies = [x for x in args.policies.split(",") if x]
    tok = kvcrush_ov.Tokenizer(model_dir)
    samples = load_suite("ruler-mini", lambda t: len(tok.encode(t)), lengths=tuple(map(int, args.lengths.split(","))),
                         samples_per_task=args.samples_per_task, seed=args.seed,
                         tasks=tuple(x for x in args.tasks.split(",") if x) or None)
    command = "python scripts/default_path_check.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    res = run_eval(model_dir, samples, EvalConfig(policies=policies, budgets=[args.budget],
                                                  num_kv_blocks=args.num_kv_blocks),
                   Path(args.out), {"suite": "ruler-mini", "command": command}, progress=True)
    rows = {(r["policy"], r["id"]): r for r in res["samples"]}
    lines = [f"`{command}`", "", f"{len(samples)} held-out ruler-mini retrieval prompts ({args.lengths} tokens), "
             f"budget {args.budget:g} of each prompt. Pipeline: `LLMPipeline.generate` with "
             f"`CacheEvictionConfig(policy, budget)` and nothing else.", "",
             "| policy | n | eval score | pipeline score | Δ (pipeline − eval) [95% CI] | identical predictions | paths |",
             "|---|---|---|---|---|---|---|"]
    sched = SchedulerConfig(num_kv_blocks=args.num_kv_blocks) if args.num_kv_blocks else SchedulerConfig()
    for policy in policies:
        pipe = kvcrush_ov.LLMPipeline(model_dir, scheduler_config=sched, enable_eviction=True)
        got, same, paths = [], 0, Counter()
        for s in samples:
            ids = sample_ids(pipe.tokenizer, s)
            budget = budget_tokens(args.budget, len(ids), make_policy(policy).protected_tokens)
            config = pipe.get_generation_config().updated(max_new_tokens=s.max_new_tokens)
            out = pipe.results(pipe.generate_ids([ids], config, eviction=CacheEvictionConfig(policy, budget=budget)))
            text, row = out.texts[0], rows[(policy, s.id)]
            got.append((score(text, s.answers, s.metric), row["score"]))
            same += text == row["prediction"]
            paths[out.eviction_modes[0]] += 1
        diff = paired_bootstrap([a - b for a, b in got])
        mean = lambda i: sum(g[i] for g in got) / len(got)  # noqa: E731
        lines.append(f"| {policy} | {len(got)} | {mean(1):.1f} | {mean(0):.1f} | {diff['mean']:+.1f} "
                     f"[{diff['ci_low']:+.1f}, {diff['ci_high']:+.1f}] | {same}/{len(got)} | "
                     f"{', '.join(f'{k} {v}' for k, v in sorted(paths.items()))} |")
    text = "\n".join(lines) + "\n"
    (Path(args.out) / "default_path.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
