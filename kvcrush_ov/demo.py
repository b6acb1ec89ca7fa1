"""`make demo`: prepare SmolLM2-135M-Instruct and answer one long prompt with the full KV cache, with
KVCrush and with SnapKV at ~25% of the prompt as budget, printing the answers and the KV memory each held."""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from .config import SchedulerConfig

DEMO_FACT = "The secret pass key is 48213."


def demo_prompt(n_paragraphs: int = 24) -> str:
    """A long document (the Python stdlib's own prose, present on every machine) with one fact buried
    in the middle, and the question at the end — where KV eviction has to keep the right tokens."""
    import codecs
    import contextlib
    import io
    with contextlib.redirect_stdout(io.StringIO()):  # `import this` prints the Zen; we only want its text
        import this
    zen = codecs.decode(this.s, "rot13").splitlines()[2:]
    paragraphs = [" ".join(zen[i % len(zen)] for i in range(k, k + 4)) for k in range(n_paragraphs)]
    paragraphs.insert(n_paragraphs // 2, DEMO_FACT)
    return "\n".join(paragraphs) + "\n\nWhat is the secret pass key? Answer with the number only."


def run_demo(model_dir: Path, device: str, scheduler: SchedulerConfig, budget_fraction: float = 0.25) -> None:
    """scheduler: the pool and batching settings; each compressed pipeline adds its eviction config."""
    from .eviction_config import CacheEvictionConfig
    from .pipeline import LLMPipeline

    prompt = demo_prompt()
    full = LLMPipeline(model_dir, device, scheduler_config=scheduler)
    n_prompt = len(full.tokenizer.prepare(prompt, True))
    budget = max(128, int(budget_fraction * n_prompt) // 32 * 32)
    compressed = [(f"{name} {budget}", LLMPipeline(model_dir, device, scheduler_config=replace(
        scheduler, cache_eviction_config=CacheEvictionConfig(name, budget=budget)))) for name in ("kvcrush", "snapkv")]
    print(f"model: {model_dir}")
    print(f"prompt: {n_prompt} tokens, a fact buried in the middle ({DEMO_FACT!r}), the question at the end")
    for name, pipe in [("full cache", full), *compressed]:
        t0 = time.perf_counter()
        res = pipe.generate(prompt, max_new_tokens=24)
        dt = time.perf_counter() - t0
        print(f"{name:>13} | KV held while decoding {res.kv_bytes[0] / 2**20:5.2f} MiB "
              f"({pipe.kv_precision}) | {dt:5.1f} s | answer: {res.texts[0].strip()!r}")
