"""`kvcrush-ov bench --capacity`: what one fixed KV pool serves with the full cache and with a policy.

The same request stream (R synthetic prompts of P tokens, T new tokens each, EOS ignored) is served
twice by one engine and one pool of N blocks: once with the full cache, once with every request
evicting to the policy's budget. Two arrival patterns: everything at once, and Poisson arrivals at
`--arrival-rate` requests/s (same seed, so both sides see the same arrival times). Per side: most
sequences holding KV at once, output tokens/s, TTFT and TPOT p50/p95, preemptions, peak KV blocks,
and a timeline (running sequences and KV blocks per step) that is plotted next to the JSON.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import textwrap
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..core.config import GenerationConfig, SchedulerConfig
from ..core.engine.llm_engine import LLMEngine
from ..core.engine.sequence import Status
from ..core.errors import ConfigError
from ..core.eviction_config import CacheEvictionConfig


@dataclass
class CapacitySide:
    side: str                 # "full" or the policy's name
    arrivals: str             # "all" or "poisson"
    requests: int
    seconds: float
    max_running: int          # most sequences holding KV blocks at once (prefilling or decoding)
    max_decoding: int         # most sequences past their prompt at once
    output_tok_s: float       # generated tokens / (last token - first arrival)
    ttft_s_p50: float
    ttft_s_p95: float
    tpot_ms_p50: float        # per request: (last - first token) / (tokens - 1); percentiles over requests
    tpot_ms_p95: float
    preemptions: int
    peak_kv_blocks: int
    timeline: dict = field(default_factory=dict)  # t (s), running, decoding, waiting, kv_blocks

    def row(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "timeline"}


def arrival_times(n: int, pattern: str, rate: float, seed: int) -> np.ndarray:
    if pattern == "all":
        return np.zeros(n)
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=n)
    return np.concatenate([[0.0], np.cumsum(gaps[1:])])


def serve_stream(engine: LLMEngine, prompts: list[list[int]], new_tokens: int, arrivals: np.ndarray,
                 eviction, side: str, pattern: str) -> CapacitySide:
    """Feed requests at their arrival times (checked before each step) and step until all are done."""
    cfg = GenerationConfig(max_new_tokens=new_tokens, ignore_eos=True)
    preempt0 = engine.num_preemptions
    t0 = time.perf_counter()
    seqs, pending = [], list(range(len(prompts)))
    line = {"t": [], "running": [], "decoding": [], "waiting": [], "kv_blocks": []}
    while pending or engine.has_unfinished:
        now = time.perf_counter() - t0
        while pending and arrivals[pending[0]] <= now:
            seqs.append(engine.add_request(prompts[pending.pop(0)], cfg, eviction=eviction))
        if not engine.has_unfinished:
            time.sleep(max(0.0, arrivals[pending[0]] - now))
            continue
        engine.step()
        m = engine.metrics()
        live = engine.scheduler.seqs
        line["t"].append(round(time.perf_counter() - t0, 4))
        line["running"].append(m.running)
        line["decoding"].append(sum(1 for s in live if s.status is Status.RUNNING
                                    and s.num_computed >= s.num_prompt_tokens))
        line["waiting"].append(m.waiting)
        line["kv_blocks"].append(m.kv_blocks_used)
    t_end = max(s.token_times[-1] for s in seqs) - t0
    ttft = np.array([s.first_token_time - t0 - a for s, a in zip(seqs, arrivals)])
    tpot = np.array([(s.token_times[-1] - s.token_times[0]) / max(1, len(s.token_times) - 1) for s in seqs]) * 1e3
    n_out = sum(len(s.output_ids) for s in seqs)
    return CapacitySide(
        side=side, arrivals=pattern, requests=len(seqs), seconds=round(t_end, 2),
        max_running=max(line["running"]), max_decoding=max(line["decoding"]),
        output_tok_s=n_out / t_end, ttft_s_p50=float(np.percentile(ttft, 50)), ttft_s_p95=float(np.percentile(ttft, 95)),
        tpot_ms_p50=float(np.percentile(tpot, 50)), tpot_ms_p95=float(np.percentile(tpot, 95)),
        preemptions=engine.num_preemptions - preempt0, peak_kv_blocks=max(line["kv_blocks"]), timeline=line)


def ratio(full: CapacitySide, policy: CapacitySide) -> dict:
    return {"max_running": policy.max_running / full.max_running, "max_decoding": policy.max_decoding / full.max_decoding,
            "output_tok_s": policy.output_tok_s / full.output_tok_s}


def plot(results: dict[str, dict[str, CapacitySide]], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(results), 2, figsize=(11, 3.2 * len(results)), squeeze=False)
    for row, (pattern, sides) in enumerate(results.items()):
        for side in sides.values():
            tl = side.timeline
            axes[row, 0].step(tl["t"], tl["running"], where="post", label=f"{side.side}: holding KV")
            axes[row, 0].step(tl["t"], tl["decoding"], where="post", linestyle=":", label=f"{side.side}: decoding")
            axes[row, 1].step(tl["t"], tl["kv_blocks"], where="post", label=side.side)
        axes[row, 0].set_ylabel(f"{pattern} arrivals\nsequences")
        axes[row, 1].set_ylabel("KV blocks used")
        for ax in axes[row]:
            ax.set_xlabel("seconds")
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
    fig.suptitle(textwrap.fill(title, 150), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(results: dict[str, dict[str, CapacitySide]]) -> None:
    head = ("arrivals", "side", "max running", "max decoding", "output tok/s", "TTFT p50 s", "TTFT p95 s",
            "TPOT p50 ms", "TPOT p95 ms", "preemptions", "peak KV blocks", "s")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for pattern, sides in results.items():
        for s in sides.values():
            print(f"| {pattern} | {s.side} | {s.max_running} | {s.max_decoding} | {s.output_tok_s:.2f} | "
                  f"{s.ttft_s_p50:.1f} | {s.ttft_s_p95:.1f} | {s.tpot_ms_p50:.0f} | {s.tpot_ms_p95:.0f} | "
                  f"{s.preemptions} | {s.peak_kv_blocks} | {s.seconds:.0f} |")
    for pattern, sides in results.items():
        r = ratio(*sides.values())
        print(f"{pattern} arrivals, policy/full: max running {r['max_running']:.2f}x, max decoding "
              f"{r['max_decoding']:.2f}x, output tok/s {r['output_tok_s']:.2f}x")


@dataclass
class CapacityConfig:
    """One request stream served by the full cache and by `eviction`, in one pool (scheduler.num_kv_blocks)."""

    model_dir: Path
    scheduler: SchedulerConfig          # its cache_eviction_config is ignored: each side sets its own
    eviction: CacheEvictionConfig
    device: str = "CPU"
    requests: int = 24
    prompt_tokens: int = 2048
    new_tokens: int = 64
    arrivals: tuple[str, ...] = ("all", "poisson")
    arrival_rate: float = 0.5           # Poisson arrivals, requests per second
    seed: int = 0
    out: Path = Path("capacity.json")
    command: str = ""                   # how it was run (written into the report and the plot)

    def __post_init__(self) -> None:
        bad = [p for p in self.arrivals if p not in ("all", "poisson")]
        if bad or not self.arrivals:
            raise ConfigError(f"arrival patterns are 'all' and 'poisson', got {list(self.arrivals)}")
        if self.requests < 1 or self.prompt_tokens < 1 or self.new_tokens < 1 or self.arrival_rate <= 0:
            raise ConfigError("requests, prompt tokens, new tokens and the arrival rate must be positive")


def run_capacity(cfg: CapacityConfig) -> dict:
    from .bench import synthetic_prompts
    from ..api.pipeline import Tokenizer

    policy_name = cfg.eviction.policy if isinstance(cfg.eviction.policy, str) else type(cfg.eviction.policy).__name__
    sched = dataclasses.replace(cfg.scheduler, cache_eviction_config=None)
    tok = Tokenizer(cfg.model_dir)
    engine = LLMEngine(cfg.model_dir, cfg.device, sched, enable_eviction=True)
    n_blocks = engine.blocks.num_blocks
    prompts = synthetic_prompts(tok, cfg.prompt_tokens, cfg.requests, seed=cfg.seed)
    serve_stream(engine, synthetic_prompts(tok, 64, 1, seed=99), 4, np.zeros(1), None, "warmup", "all")
    results: dict[str, dict[str, CapacitySide]] = {}
    for pattern in cfg.arrivals:
        arrivals = arrival_times(len(prompts), pattern, cfg.arrival_rate, cfg.seed)
        results[pattern] = {}
        for side, ev in (("full", None), (policy_name, cfg.eviction)):
            print(f"[capacity] {pattern} arrivals, {side}: {len(prompts)} x ({cfg.prompt_tokens} + {cfg.new_tokens}) "
                  f"tokens in {n_blocks} blocks", file=sys.stderr, flush=True)
            results[pattern][side] = serve_stream(engine, prompts, cfg.new_tokens, arrivals, ev, side, pattern)
            assert engine.blocks.num_used_blocks == 0
    print_table(results)
    report = {
        "command": cfg.command, "model": str(cfg.model_dir), "device": cfg.device,
        "config": {"num_kv_blocks": n_blocks, "block_size": engine.runner.block_size, "requests": cfg.requests,
                   "prompt_tokens": cfg.prompt_tokens, "new_tokens": cfg.new_tokens, "policy": policy_name,
                   "budget": cfg.eviction.budget, "eviction": repr(cfg.eviction), "arrival_rate": cfg.arrival_rate,
                   "max_num_batched_tokens": sched.max_num_batched_tokens,
                   "kv_cache_precision": engine.runner.layout.precision},
    }
    for pattern, sides in results.items():
        key = "capacity" if pattern == cfg.arrivals[0] else f"capacity_{pattern}"
        full, policy = sides["full"], sides[policy_name]
        report[key] = {"arrivals": pattern, "full": full.row(), "policy": policy.row(), "ratio": ratio(full, policy)}
    out = Path(cfg.out)
    timelines = out.with_suffix(".timelines.json")  # per step, compact: the plot's data
    report["timelines_file"] = timelines.name
    out.write_text(json.dumps(report, indent=1))
    timelines.write_text(json.dumps({p: {s: v.timeline for s, v in sides.items()} for p, sides in results.items()}))
    png = out.with_suffix(".png")
    plot(results, png, f"{cfg.command}\n{Path(cfg.model_dir).name}, {n_blocks} blocks x {engine.runner.block_size} tokens")
    print(f"wrote {out} and {png}")
    return report
