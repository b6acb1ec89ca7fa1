"""`make demo`: prepare SmolLM2-135M-Instruct and answer one long prompt, showing the KV memory used."""
from __future__ import annotations

import argparse
import time

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


def run_demo(args: argparse.Namespace) -> None:
    from .cli import _model_dir, _scheduler_config
    from .pipeline import LLMPipeline

    model_dir = _model_dir(args.model)
    pipe = LLMPipeline(model_dir, args.device, scheduler_config=_scheduler_config(args))
    prompt = demo_prompt()
    t0 = time.perf_counter()
    res = pipe.generate(prompt, max_new_tokens=24)
    dt = time.perf_counter() - t0
    n_prompt, n_new = res.prompt_lengths[0], len(res.token_ids[0])
    kv = pipe.kv_bytes_per_token * (n_prompt + n_new)
    print(f"model: {model_dir}")
    print(f"prompt: {n_prompt} tokens (a fact buried in the middle: {DEMO_FACT!r})")
    print(f"full cache  | KV {kv / 2**20:6.2f} MiB ({pipe.engine.runner.layout.precision}) | {dt:5.1f} s | "
          f"answer: {res.texts[0].strip()!r}")
