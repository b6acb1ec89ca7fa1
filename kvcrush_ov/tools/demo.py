"""`make demo`: prepare SmolLM2-135M-Instruct and answer several long prompts with the full KV cache,
SnapKV and KVCrush at the same budget (~25% of each prompt), printing a table of the answers, how
many were right, and the KV memory each held while decoding. Every figure is from this run."""
from __future__ import annotations

import random
import re
import time
from dataclasses import replace
from pathlib import Path

from ..core.config import SchedulerConfig
from ..core.errors import ConfigError

DEPTHS = (0.15, 0.35, 0.55, 0.75, 0.9)


def _zen() -> list[str]:
    import codecs
    import contextlib
    import io
    with contextlib.redirect_stdout(io.StringIO()):  # `import this` prints the Zen; we only want its text
        import this
    return codecs.decode(this.s, "rot13").splitlines()[2:]


def demo_prompt(key: str, depth: float, n_paragraphs: int = 24) -> str:
    """A long document (the Python stdlib's own prose, present on every machine) with one fact at
    `depth`, and the question at the end, where KV eviction has to keep the right tokens."""
    zen = _zen()
    paragraphs = [" ".join(zen[i % len(zen)] for i in range(k, k + 4)) for k in range(n_paragraphs)]
    paragraphs.insert(int(depth * n_paragraphs), f"The secret pass key is {key}.")
    return "\n".join(paragraphs) + "\n\nWhat is the secret pass key? Answer with the number only."


def demo_cases(n: int = len(DEPTHS), seed: int = 0) -> list[tuple[str, str]]:
    """(prompt, expected answer): pass keys of 5-6 digits at different depths (multi-token answers)."""
    rng = random.Random(seed)
    keys = [str(rng.randrange(10 ** (4 + i % 2), 10 ** (5 + i % 2))) for i in range(n)]
    return [(demo_prompt(k, DEPTHS[i % len(DEPTHS)]), k) for i, k in enumerate(keys)]


def _shown(answer: str) -> str:
    """The number the model answered (its first digit run), else the start of its text."""
    digits = re.search(r"\d+", answer)
    return digits.group(0) if digits else repr(answer[:16])


def run_demo(model_dir: Path, device: str, scheduler: SchedulerConfig, budget_fraction: float = 0.25,
             policies: tuple[str, ...] = ("snapkv", "kvcrush"), num_prompts: int = len(DEPTHS),
             readme: Path | None = None) -> list[dict]:
    """Print (and return) one row per policy: answers per prompt, correct count, mean KV MiB, seconds.

    scheduler: the pool and batching settings; each compressed pipeline adds its eviction config.
    The budget of each prompt is budget_fraction x its length (rounded down to 32, at least 128).
    readme: also write the table between the file's `<!-- demo:begin/end -->` markers."""
    from ..core.eviction_config import CacheEvictionConfig
    from ..api.pipeline import LLMPipeline

    cases = demo_cases(num_prompts)
    prompts = [p for p, _ in cases]
    full = LLMPipeline(model_dir, device, scheduler_config=scheduler)
    lengths = [len(full.tokenizer.prepare(p, True)) for p in prompts]
    budgets = [max(128, int(budget_fraction * n) // 32 * 32) for n in lengths]
    rows, paths = [], []
    for name in ("full", *policies):
        answers, kv, seconds = [], [], 0.0
        for prompt, budget in zip(prompts, budgets):  # one pipeline per budget: budgets differ per prompt
            eviction = None if name == "full" else CacheEvictionConfig(name, budget=budget)
            pipe = full if name == "full" else LLMPipeline(model_dir, device, scheduler_config=replace(
                scheduler, cache_eviction_config=eviction))
            t0 = time.perf_counter()
            res = pipe.generate(prompt, max_new_tokens=16)
            seconds += time.perf_counter() - t0
            answers.append(res.texts[0].strip())
            paths += res.eviction_modes
            kv += [b / 2**20 for b in res.kv_bytes]
        correct = sum(want in got for (_, want), got in zip(cases, answers))
        rows.append({"policy": name, "answers": answers, "correct": correct, "kv_mib": sum(kv) / len(kv),
                     "seconds": seconds})
    lines = [f"model: {Path(model_dir).name}; {len(prompts)} prompts of {min(lengths)}-{max(lengths)} tokens, a pass "
             f"key buried at depths {', '.join(f'{d:.0%}' for d in DEPTHS[:len(prompts)])}, the question at the end; "
             f"compressed policies keep {budget_fraction:.0%} of each prompt ({min(budgets)}-{max(budgets)} tokens "
             f"per layer), paths: {', '.join(sorted(set(paths)))}", "",
             "| policy | " + " | ".join(f"key {want}" for _, want in cases) + " | correct | KV MiB | s |",
             "|" + "---|" * (len(cases) + 4)]
    for r in rows:
        cells = " | ".join(("ok " if want in got else "") + _shown(got) for (_, want), got in zip(cases, r["answers"]))
        lines.append(f"| {r['policy']} | {cells} | {r['correct']}/{len(cases)} | {r['kv_mib']:.2f} | {r['seconds']:.1f} |")
    print("\n".join(lines))
    if readme is not None:
        write_between_markers(Path(readme), "demo", "kvcrush-ov demo --readme " + str(readme), "\n".join(lines))
    return rows


def write_between_markers(path: Path, name: str, command: str, text: str) -> None:
    """Replace what lies between `<!-- NAME:begin -->` and `<!-- NAME:end -->` in a markdown file."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    body = path.read_text()
    if begin not in body or end not in body:
        raise ConfigError(f"{path} has no {begin} ... {end} markers to write the table between")
    head, rest = body.split(begin, 1)
    path.write_text(f"{head}{begin}\n<!-- generated by `{command}`; do not edit by hand -->\n{text}\n{end}"
                    f"{rest.split(end, 1)[1]}")
