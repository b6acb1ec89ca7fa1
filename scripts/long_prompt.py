"""A prompt longer than the KV pool: full cache vs eviction after prefill vs memory-bounded prefill.

    .venv/bin/python scripts/long_prompt.py [--tokens 6000 --num-kv-blocks 64 --budget 1536]

The prompt is the Python stdlib's own prose with pass keys buried at several depths and the question at
the end (kvcrush_ov.tools.demo's builder, made longer). Each row runs every case and prints the answers, how
many are right, the peak KV a sequence held, prefill (time to first token) and total seconds; a
configuration that cannot run prints its one-line error instead. Every figure comes from the run.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import replace

from kvcrush_ov import CacheEvictionConfig, KVCrushError, LLMPipeline, SchedulerConfig
from kvcrush_ov.tools.demo import demo_prompt
from kvcrush_ov.tools.models import resolve_model_dir
from kvcrush_ov.core.options import parse_options


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tokens", type=int, default=6000, help="prompt length to aim for")
    p.add_argument("--num-kv-blocks", type=int, default=64)
    p.add_argument("--budget", type=int, default=1536)
    p.add_argument("--keys", default="48213,71946,30587", help="pass keys, one prompt each")
    p.add_argument("--depths", default="0.2,0.4,0.6")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a policy option for every evicting row, e.g. pool_back=6 (repeatable)")
    p.add_argument("--policies", default="kvcrush,snapkv", help="policies of the memory-bounded rows")
    p.add_argument("--rows", default="", help="run only the rows whose label contains one of these "
                   "comma-separated words (e.g. 'default,after,full cache')")
    args = p.parse_args(argv)
    model_dir = resolve_model_dir(args.model)
    keys, depths = args.keys.split(","), [float(d) for d in args.depths.split(",")]
    probe = LLMPipeline(model_dir, scheduler_config=SchedulerConfig(num_kv_blocks=8, cache_size=0))
    paragraphs = 24
    while len(probe.tokenizer.prepare(demo_prompt(keys[0], 0.5, paragraphs), True)) < args.tokens:
        paragraphs += 24
    cases = [(demo_prompt(k, d, paragraphs), k) for k, d in zip(keys, depths)]
    n_tokens = [len(probe.tokenizer.prepare(c, True)) for c, _ in cases]
    small = dict(num_kv_blocks=args.num_kv_blocks, cache_size=0)
    n, b = args.num_kv_blocks, args.budget
    rows = [("full cache, unlimited pool", dict(cache_size=1), None),
            (f"full cache, {n} blocks", small, None),
            (f"kvcrush {b}, evict after prefill, {n} blocks", small,
             CacheEvictionConfig("kvcrush", budget=b, prefill="after"))]
    scored = [("reread", "memory-bounded prefill (default: read twice, the first read's tail scores the second)"),
              ("window", "memory-bounded prefill scored by the newest queries"),
              ("probe", "memory-bounded prefill scored by a probe of the prompt's tail"),
              ("expected", "memory-bounded prefill scored by expected attention"),
              ("hybrid", "memory-bounded prefill, hybrid: expected attention inside the prompt, the window at its end")]
    for policy in args.policies.split(","):
        for name, text in scored:
            fields = (dict(prefill_scores="expected", scores="expected") if name == "expected" else
                      dict(prefill_scores="expected") if name == "hybrid" else dict(prefill_scores=name))
            rows.append((f"{policy} {b}, {text}, {n} blocks", small,
                         CacheEvictionConfig(policy, budget=b, **fields)))
    if args.rows:
        rows = [r for r in rows if any(w.strip() in r[0] for w in args.rows.split(","))]
    if args.option:
        extra = parse_options(args.option)
        rows = [(f"{label} [{', '.join(args.option)}]", pool, replace(ev, options={**ev.options, **extra}))
                if ev is not None else (label, pool, ev) for label, pool, ev in rows]
    pool_tokens = args.num_kv_blocks * 32
    print(f"model {model_dir.name}; prompts of {min(n_tokens)}-{max(n_tokens)} tokens, keys at depths "
          f"{', '.join(f'{d:.0%}' for d in depths)}; a {args.num_kv_blocks}-block pool holds {pool_tokens} tokens\n")
    print("| configuration | " + " | ".join(f"key {k}" for k in keys) + " | correct | peak KV MiB | prefill s | s |")
    print("|" + "---|" * (len(keys) + 5))
    for label, pool, eviction in rows:
        try:
            pipe = LLMPipeline(model_dir, scheduler_config=SchedulerConfig(**pool, cache_eviction_config=eviction))
            answers, peaks, ttft, t0 = [], [], [], time.perf_counter()
            for prompt, _ in cases:
                res = pipe.generate(prompt, max_new_tokens=20)
                answers.append(res.texts[0].strip())
                peaks.append(res.peak_kv_bytes[0])
                ttft.append(res.ttft_s[0])
            seconds = time.perf_counter() - t0
        except KVCrushError as e:
            print(f"| {label} | " + " | ".join("–" for _ in keys) + f" | error: {e} | | | |")
            continue
        right = sum(k in a for (_, k), a in zip(cases, answers))
        cells = " | ".join(("ok " if k in a else "") + repr(a[-24:]) for (_, k), a in zip(cases, answers))
        print(f"| {label} | {cells} | {right}/{len(cases)} | {max(peaks) / 2**20:.1f} | "
              f"{sum(ttft) / len(ttft):.1f} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
