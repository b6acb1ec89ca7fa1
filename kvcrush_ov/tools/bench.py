"""`kvcrush-ov bench`: throughput and latency of our engine, openvino-genai's, or both interleaved.

Both backends get the same token ids (no chat template), ignore EOS, and run in one process, one
after the other per configuration and repeat, so machine noise hits both alike; `compare` reports
ours/native ratios measured side by side.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..core.config import SchedulerConfig

_WORDS = ("river stone light garden paper window morning signal number market music forest silver "
          "engine planet letter winter harbor teacher bridge summer candle mountain question").split()


@dataclass
class BenchResult:
    backend: str
    prompt_tokens: int
    concurrency: int
    new_tokens: int
    seconds: float
    e2e_tok_s: float        # (prompt + generated tokens) / wall time
    prefill_tok_s: float    # prompt tokens / time until the last request's first token
    decode_tok_s: float     # tokens generated after that / the remaining time
    ttft_s_mean: float
    tpot_ms_p50: float      # inter-token latency per request, pooled
    tpot_ms_p95: float
    peak_rss_mib: float
    kv_bytes: int           # peak KV bytes in use (blocks held x bytes per block, all layers)
    eviction_s: float = 0.0 # time spent scoring + choosing + compacting (ours)
    eviction_share: float = 0.0  # eviction_s / seconds


@dataclass
class BenchConfig:
    """What to measure: a grid of prompt lengths x concurrent requests x new tokens, per backend."""

    model_dir: Path
    scheduler: SchedulerConfig
    device: str = "CPU"
    backend: str = "ours"               # ours | native | compare (both, interleaved)
    prompt_tokens: list[int] = field(default_factory=lambda: [1024])
    concurrency: list[int] = field(default_factory=lambda: [8])
    new_tokens: list[int] = field(default_factory=lambda: [128])
    repeats: int = 1
    out: Path = Path("bench.json")


def synthetic_prompts(tokenizer, n_tokens: int, count: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    prompts = []
    for _ in range(count):
        text = " ".join(rng.choice(_WORDS, size=n_tokens + 16))
        ids = tokenizer.encode(text, add_special_tokens=False)
        prompts.append(ids[:n_tokens])
    return prompts


def _rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak_rss() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _summarize(backend, prompts, new_tokens, t0, t_end, token_times: list[list[float]], kv_bytes) -> BenchResult:
    firsts = [t[0] for t in token_times]
    gaps = np.concatenate([np.diff(t) for t in token_times if len(t) > 1] or [np.zeros(1)]) * 1e3
    n_prompt = sum(map(len, prompts))
    n_gen = sum(map(len, token_times))
    t_prefill = max(firsts) - t0
    return BenchResult(
        backend=backend, prompt_tokens=len(prompts[0]), concurrency=len(prompts), new_tokens=new_tokens,
        seconds=t_end - t0, e2e_tok_s=(n_prompt + n_gen) / (t_end - t0), prefill_tok_s=n_prompt / t_prefill,
        decode_tok_s=sum(len([x for x in t if x > max(firsts)]) for t in token_times) / max(t_end - max(firsts), 1e-9),
        ttft_s_mean=float(np.mean(firsts) - t0), tpot_ms_p50=float(np.percentile(gaps, 50)),
        tpot_ms_p95=float(np.percentile(gaps, 95)), peak_rss_mib=_rss_mib("VmHWM"), kv_bytes=int(kv_bytes))


def run_ours(pipe, prompts: list[list[int]], new_tokens: int) -> BenchResult:
    from ..core.config import GenerationConfig
    engine = pipe.engine
    cfg = GenerationConfig(max_new_tokens=new_tokens, ignore_eos=True)
    evict0 = engine.metrics().eviction_seconds
    _reset_peak_rss()
    t0 = time.perf_counter()
    seqs = [engine.add_request(p, cfg) for p in prompts]
    peak_bytes = 0
    while engine.has_unfinished:
        engine.step()
        peak_bytes = max(peak_bytes, engine.metrics().kv_bytes_used)
    t_end = time.perf_counter()
    result = _summarize("ours", prompts, new_tokens, t0, t_end, [s.token_times for s in seqs], peak_bytes)
    result.eviction_s = engine.metrics().eviction_seconds - evict0
    result.eviction_share = result.eviction_s / result.seconds
    return result


def run_native(cb, prompts: list[list[int]], new_tokens: int) -> BenchResult:
    import openvino as ov
    import openvino_genai as ov_genai
    gc = ov_genai.GenerationConfig()
    gc.max_new_tokens = new_tokens
    gc.ignore_eos = True
    gc.apply_chat_template = False
    _reset_peak_rss()
    t0 = time.perf_counter()
    handles = [cb.add_request(i, ov.Tensor(np.array([p], dtype=np.int64)), gc) for i, p in enumerate(prompts)]
    times: list[list[float]] = [[] for _ in prompts]
    max_usage = 0.0
    while cb.has_non_finished_requests():
        cb.step()
        now = time.perf_counter()
        max_usage = max(max_usage, cb.get_metrics().cache_usage)
        for i, h in enumerate(handles):
            if h.can_read():
                for out in h.read().values():
                    times[i] += [now] * len(out.generated_ids)
    t_end = time.perf_counter()
    total = cb.get_metrics().kv_cache_size_in_bytes
    return _summarize("native", prompts, new_tokens, t0, t_end, times, max_usage / 100 * total)


def run_bench(config: BenchConfig) -> list[BenchResult]:
    from tqdm import tqdm

    from ..api.native import to_native_scheduler
    from ..api.pipeline import LLMPipeline, Tokenizer

    sched = config.scheduler
    ours = native = None
    if config.backend in ("ours", "compare"):
        ours = LLMPipeline(config.model_dir, config.device, scheduler_config=sched)
    if config.backend in ("native", "compare"):
        import openvino_genai as ov_genai
        sc = to_native_scheduler(sched)
        props = {"KV_CACHE_PRECISION": sched.kv_cache_precision} if sched.kv_cache_precision else {}
        native = ov_genai.ContinuousBatchingPipeline(str(config.model_dir), sc, config.device, props)
    tokenizer = ours.tokenizer if ours else Tokenizer(config.model_dir)
    grid = [(p, c, n) for p in config.prompt_tokens for c in config.concurrency for n in config.new_tokens]
    results: list[BenchResult] = []
    # Warm-up (first inference compiles kernels) on both backends.
    warm = synthetic_prompts(tokenizer, 64, 1, seed=99)
    if ours:
        run_ours(ours, warm, 4)
    if native:
        run_native(native, warm, 4)
    for rep in tqdm(range(config.repeats), desc="bench", disable=config.repeats == 1):
        for p, c, n in grid:
            prompts = synthetic_prompts(tokenizer, p, c, seed=rep)
            if ours:
                results.append(run_ours(ours, prompts, n))
            if native:
                results.append(run_native(native, prompts, n))
    _print_table(results)
    eviction = sched.cache_eviction_config
    report = {"model": str(config.model_dir), "device": config.device, "scheduler": {
        "cache_size": sched.cache_size, "max_num_batched_tokens": sched.max_num_batched_tokens,
        "kv_cache_precision": ours.kv_precision if ours else sched.kv_cache_precision,
        "policy": getattr(eviction, "policy", "full") if eviction is not None else "full",
        "budget": getattr(eviction, "budget", None)},
        "results": [asdict(r) for r in results], "ratios": _ratios(results)}
    Path(config.out).write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {config.out}")
    return results


def _ratios(results: list[BenchResult]) -> list[dict]:
    out = []
    keys = sorted({(r.prompt_tokens, r.concurrency, r.new_tokens) for r in results})
    for k in keys:
        o = [r for r in results if (r.prompt_tokens, r.concurrency, r.new_tokens) == k and r.backend == "ours"]
        n = [r for r in results if (r.prompt_tokens, r.concurrency, r.new_tokens) == k and r.backend == "native"]
        if o and n:
            out.append({"prompt_tokens": k[0], "concurrency": k[1], "new_tokens": k[2],
                        "e2e_throughput_ours_over_native": float(np.median([r.e2e_tok_s for r in o]) /
                                                                 np.median([r.e2e_tok_s for r in n]))})
    return out


def _print_table(results: list[BenchResult]) -> None:
    head = ("backend", "prompt", "conc", "new", "s", "e2e tok/s", "prefill tok/s", "decode tok/s", "TTFT s",
            "TPOT p50 ms", "TPOT p95 ms", "peak RSS MiB", "KV MiB", "eviction s (share)")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in results:
        print(f"| {r.backend} | {r.prompt_tokens} | {r.concurrency} | {r.new_tokens} | {r.seconds:.1f} | "
              f"{r.e2e_tok_s:.0f} | {r.prefill_tok_s:.0f} | {r.decode_tok_s:.1f} | {r.ttft_s_mean:.2f} | "
              f"{r.tpot_ms_p50:.1f} | {r.tpot_ms_p95:.1f} | {r.peak_rss_mib:.0f} | {r.kv_bytes / 2**20:.1f} | "
              f"{r.eviction_s:.3f} ({100 * r.eviction_share:.2f}%) |")
    for r in _ratios(results):
        print(f"ours/native e2e throughput ({r['prompt_tokens']} x {r['concurrency']} + {r['new_tokens']}): "
              f"{r['e2e_throughput_ours_over_native']:.3f}")
