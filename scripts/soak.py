#!/usr/bin/env python3
"""Soak run (a benchmark, not a CI test): many mixed requests through a small KV pool with eviction on.

200 requests by default (prompts of 50-1500 tokens, 8-128 new tokens, a mix of full cache, SnapKV and
KVCrush at two budgets) arrive a few per engine step into one LLMEngine with a small pool, so requests
queue, get preempted and are recomputed. The same workload runs twice on the same engine: RSS after the
second round should equal RSS after the first (no growth). Prints completed / preempted / tokens per
second / max RSS / RSS at start and after each round, and checks block accounting along the way.

    .venv/bin/python scripts/soak.py                          # SmolLM2-135M (prepared on first use)
    .venv/bin/python scripts/soak.py --model tiny-llama       # the random-weight test model, fast
    .venv/bin/python scripts/soak.py --requests 60 --rounds 2 # fewer requests on a slow machine
"""
from __future__ import annotations

import argparse
import gc
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvcrush_ov import CacheEvictionConfig, GenerationConfig, SchedulerConfig  # noqa: E402
from kvcrush_ov.core.engine.llm_engine import LLMEngine  # noqa: E402
from kvcrush_ov.core.engine.sequence import FinishReason  # noqa: E402
from kvcrush_ov.api.pipeline import Tokenizer  # noqa: E402

WORDS = ("river stone light garden paper window morning signal number market music forest silver engine "
         "planet letter winter harbor teacher bridge summer candle mountain question the of and to in is "
         "was for on that with as by at from this it be are were which an or").split()


def rss_mib(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def policies(budgets: list[int]) -> list[tuple[str, CacheEvictionConfig | None]]:
    mix: list[tuple[str, CacheEvictionConfig | None]] = [("full", None)]
    for b in budgets:
        mix += [(f"snapkv@{b}", CacheEvictionConfig("snapkv", budget=b)),
                (f"kvcrush@{b}", CacheEvictionConfig("kvcrush", budget=b))]
    return mix


def make_requests(tok: Tokenizer, args, mix) -> list[tuple[list[int], int, str, CacheEvictionConfig | None]]:
    rng = np.random.default_rng(args.seed)
    out = []
    for i in range(args.requests):
        n = int(rng.integers(args.prompt_min, args.prompt_max + 1))
        text = " ".join(rng.choice(WORDS, size=n + 32))
        ids = tok.encode(text, add_special_tokens=False)[:n]
        name, ev = mix[i % len(mix)]
        out.append((ids, int(rng.integers(args.new_min, args.new_max + 1)), name, ev))
    return out


def run_round(engine: LLMEngine, requests, per_step: int, check_every: int) -> dict:
    pending, seqs, steps = list(requests), [], 0
    peak_blocks = 0
    t0 = time.perf_counter()
    evictions0 = engine.metrics().evictions
    while pending or engine.has_unfinished:
        for _ in range(per_step):
            if pending:
                ids, new, _, ev = pending.pop(0)
                seqs.append(engine.add_request(ids, GenerationConfig(max_new_tokens=new, ignore_eos=True), eviction=ev))
        engine.step()
        steps += 1
        peak_blocks = max(peak_blocks, engine.metrics().kv_blocks_used)
        if steps % check_every == 0:
            engine.blocks.check_invariants()
    seconds = time.perf_counter() - t0
    engine.blocks.check_invariants()
    assert engine.blocks.num_used_blocks == 0 and not engine.blocks.tables, "blocks leaked"
    generated = sum(s.num_generated for s in seqs)
    prompt = sum(s.num_prompt_tokens for s in seqs)
    retained = len(engine.sequences)
    return {
        "requests": len(seqs),
        "completed": sum(s.finish_reason is FinishReason.LENGTH and s.num_generated == s.config.max_new_tokens
                         for s in seqs),
        "failed": sum(s.finish_reason is not FinishReason.LENGTH for s in seqs),
        "preemptions": sum(s.num_preemptions for s in seqs),
        "preempted_requests": sum(s.num_preemptions > 0 for s in seqs),
        "steps": steps, "seconds": seconds, "prompt_tokens": prompt, "generated_tokens": generated,
        "gen_tok_s": generated / seconds, "total_tok_s": (prompt + generated) / seconds,
        "evictions": engine.metrics().evictions - evictions0, "peak_blocks": peak_blocks,
        "retained": retained,  # sequences the engine still references once the round is over (should be 0)
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m | tiny-llama | an IR directory")
    p.add_argument("--device", default="CPU")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--rounds", type=int, default=2, help="identical rounds on one engine (RSS must not grow)")
    p.add_argument("--per-step", type=int, default=2, help="requests arriving before each engine step")
    p.add_argument("--num-kv-blocks", type=int, default=96, help="KV pool size in blocks of 32 tokens (small)")
    p.add_argument("--max-num-batched-tokens", type=int, default=256)
    p.add_argument("--prompt-min", type=int, default=50)
    p.add_argument("--prompt-max", type=int, default=1500)
    p.add_argument("--new-min", type=int, default=8)
    p.add_argument("--new-max", type=int, default=128)
    p.add_argument("--budgets", default="256,512", help="eviction budgets (tokens) for snapkv and kvcrush")
    p.add_argument("--check-every", type=int, default=25, help="block accounting check every N steps")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from kvcrush_ov.tools.models import MODELS, prepare
    model_dir = prepare(args.model) if args.model in MODELS else Path(args.model)
    tok = Tokenizer(model_dir)
    engine = LLMEngine(model_dir, args.device, SchedulerConfig(
        num_kv_blocks=args.num_kv_blocks, cache_size=0, max_num_batched_tokens=args.max_num_batched_tokens),
        enable_eviction=True, per_layer_lengths=True)
    mix = policies([int(b) for b in args.budgets.split(",") if b])
    requests = make_requests(tok, args, mix)
    bs = engine.blocks.block_size
    pool_mib = engine.runner.bytes_per_block_all_layers * engine.blocks.num_blocks / 2**20
    lens = [len(r[0]) for r in requests]
    print(f"model {model_dir.name}, KV {engine.runner.layout.precision}, pool {engine.blocks.num_blocks} blocks x {bs} "
          f"tokens ({pool_mib:.1f} MiB), max_num_batched_tokens {args.max_num_batched_tokens}")
    print(f"{len(requests)} requests, prompts {min(lens)}-{max(lens)} tokens (mean {np.mean(lens):.0f}), new tokens "
          f"{args.new_min}-{args.new_max}, policies {', '.join(n for n, _ in mix)}, {args.per_step} arriving per step")
    gc.collect()
    rss = [rss_mib()]
    print(f"RSS at start {rss[0]:.1f} MiB")
    print("round | completed | failed | preemptions (requests) | evictions | peak blocks | steps | seconds | "
          "gen tok/s | total tok/s | RSS after MiB | seqs retained")
    for r in range(1, args.rounds + 1):
        res = run_round(engine, requests, args.per_step, args.check_every)
        gc.collect()
        rss.append(rss_mib())
        print(f"{r} | {res['completed']}/{res['requests']} | {res['failed']} | {res['preemptions']} "
              f"({res['preempted_requests']}) | {res['evictions']} | {res['peak_blocks']}/{engine.blocks.num_blocks} | "
              f"{res['steps']} | {res['seconds']:.1f} | {res['gen_tok_s']:.1f} | {res['total_tok_s']:.1f} | "
              f"{rss[-1]:.1f} | {res['retained']}", flush=True)
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    growth = rss[-1] - rss[1] if len(rss) > 2 else float("nan")
    print(f"max RSS {max_rss:.1f} MiB; RSS start {rss[0]:.1f} -> after round 1 {rss[1]:.1f} -> end {rss[-1]:.1f} MiB "
          f"(growth after round 1: {growth:+.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
