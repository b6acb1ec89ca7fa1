"""`real-text`: a LongBench-like suite of real text that ships with every machine (Python itself).

No download: the texts are the Python standard library's own sources and documentation (read with
`ast`, so `python -OO` does not matter) and the Unicode database in `unicodedata`. Tasks:
- code_continue (LCC-like): raw continuation of a stdlib .py file; the answer is the next line of
  real code, scored by edit similarity (difflib ratio x 100) of the first line generated;
- doc_qa (qasper-like): pydoc-style documentation of several modules' functions, then "what does
  `name` do?"; ROUGE-L against that function's first docstring sentence;
- doc_summary (gov_report-like): summarize the documentation of a few modules; ROUGE-L against the
  modules' own one-line summaries (a weak anchor: read it with ROUGE-L vs the full-cache output);
- fewshot_classify (TREC-like): many "Name: <unicode character name> / Category: <label>" examples of
  real labelled data (the Unicode general category), then one more name to label; exact first line.

Splits: every source item (file, module, code point) belongs to one split by a hash of its name, so
"tuning" and "reporting" samples never share a text; `seed` draws different samples within a split.
Same Python version + same arguments -> same samples (checked by a test).
"""
from __future__ import annotations

import ast
import functools
import hashlib
import os
import random
import unicodedata
from typing import Callable

from kvcrush_ov.core.errors import ConfigError
from kvcrush_ov.tools.eval.ruler_mini import CountTokens, _fit
from kvcrush_ov.tools.eval.sample import Sample, check_suite_args

SPLITS = ("tuning", "reporting")
STDLIB_DIR = os.path.dirname(ast.__file__)


def _split_of(name: str) -> str:
    """Every source item's split, by hash (about 1/3 tuning, 2/3 reporting)."""
    return "tuning" if hashlib.sha256(name.encode()).digest()[0] % 3 == 0 else "reporting"


def _rng(split: str, seed: int, *parts) -> random.Random:
    key = ":".join(str(p) for p in (split, seed, *parts)).encode()
    return random.Random(int.from_bytes(hashlib.sha256(key).digest()[:8], "little"))


# ----------------------------------------------------------------------------- sources


@functools.lru_cache(maxsize=1)
def _stdlib_files() -> tuple[tuple[str, tuple[str, ...]], ...]:
    """(file name, lines) of the top-level stdlib .py files long enough for 4k-token prompts."""
    out = []
    for name in sorted(os.listdir(STDLIB_DIR)):
        if not name.endswith(".py") or name.startswith("_"):
            continue
        try:
            with open(os.path.join(STDLIB_DIR, name), encoding="utf-8") as f:
                lines = tuple(f.read().splitlines())
        except (OSError, UnicodeDecodeError):
            continue
        if len(lines) >= 800:
            out.append((name, lines))
    return tuple(out)


def _first_sentence(doc: str) -> str:
    para = " ".join(doc.strip().split("\n\n")[0].split())
    end = para.find(". ")
    return para if end < 0 else para[: end + 1]


@functools.lru_cache(maxsize=1)
def _module_docs() -> tuple[tuple[str, str, tuple[tuple[str, str, str], ...]], ...]:
    """(module, its one-line summary, ((name, signature, first docstring paragraph), ...)) for the
    stdlib modules with at least 8 documented public functions/classes."""
    out = []
    for name, lines in _stdlib_files():
        try:
            tree = ast.parse("\n".join(lines))
        except SyntaxError:
            continue
        mod_doc = ast.get_docstring(tree) or ""
        entries = []
        for node in tree.body:
            if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node)
            if not doc or len(doc.split()) < 6:
                continue
            sig = f"({ast.unparse(node.args)})" if isinstance(node, ast.FunctionDef) else ""
            para = " ".join(doc.strip().split("\n\n")[0].split())
            entries.append((node.name, sig, para))
        if len(entries) >= 8 and mod_doc:
            out.append((name[:-3], _first_sentence(mod_doc), tuple(entries)))
    return tuple(out)


LABELS = {"Lu": "uppercase letter", "Ll": "lowercase letter", "Nd": "digit", "Sm": "math symbol",
          "Sc": "currency symbol", "Po": "punctuation", "So": "other symbol"}


@functools.lru_cache(maxsize=1)
def _labelled_chars() -> dict[str, tuple[tuple[str, str], ...]]:
    """{split: ((unicode name, label), ...)} from the Unicode database shipped with Python (BMP)."""
    out: dict[str, list] = {s: [] for s in SPLITS}
    for cp in range(0x20, 0x10000):
        ch = chr(cp)
        cat = unicodedata.category(ch)
        name = unicodedata.name(ch, "")
        if cat in LABELS and name and "CJK" not in name and "HANGUL" not in name:
            out[_split_of(name)].append((name, LABELS[cat]))
    return {s: tuple(v) for s, v in out.items()}


def _in_split(items, split: str, key=lambda x: x[0]):
    chosen = [x for x in items if _split_of(key(x)) == split]
    if not chosen:
        raise ConfigError(f"real-text: no source texts in split {split!r} on this Python; use the other split")
    return chosen


# ----------------------------------------------------------------------------- tasks


def code_continue(rng: random.Random, length: int, count_tokens: CountTokens, split: str) -> dict:
    # Only files with room for the prompt (about 4 characters a token): at 16k a short file cannot reach it.
    files = [f for f in _in_split(_stdlib_files(), split) if sum(map(len, f[1])) + len(f[1]) >= 4 * length]
    if not files:
        raise ConfigError(f"real-text code_continue: no standard-library file is long enough for {length} tokens")
    name, lines = rng.choice(files)
    head = f"# {name}\n"

    def informative(i: int) -> bool:
        s = lines[i].strip()
        return len(s) >= 12 and not s.startswith(("#", '"', "'")) and any(c.isalpha() for c in s)

    n, prompt, toks = _fit(lambda n: head + "\n".join(lines[:n]) + "\n", length, count_tokens, "code_continue",
                           hint=64)
    while n < len(lines) - 1 and not informative(n):  # end the prompt right before a real line of code
        n += 1
    prompt = head + "\n".join(lines[:n]) + "\n"
    return dict(prompt=prompt, answers=[lines[n].strip()], metric="edit_sim", max_new_tokens=24, chat=False,
                meta=dict(file=name, line=n + 1))


def _doc_entry(module: str, entry: tuple[str, str, str]) -> str:
    name, sig, para = entry
    return f"{module}.{name}{sig}\n    {para}"


def _doc_stream(split: str, rng: random.Random) -> list[tuple[str, tuple[str, str, str]]]:
    mods = _in_split(_module_docs(), split)
    start = rng.randrange(len(mods))
    order = mods[start:] + mods[:start]
    return [(m, e) for m, _, entries in order for e in entries]


def doc_qa(rng: random.Random, length: int, count_tokens: CountTokens, split: str) -> dict:
    stream = _doc_stream(split, rng)
    intro = "Below is the documentation of some Python standard library functions and classes."
    depth = rng.uniform(0.1, 0.9)

    def render(n: int, target: int | None = None) -> str:
        body = "\n\n".join(_doc_entry(m, e) for m, e in stream[:n])
        t = stream[target if target is not None else min(int(depth * max(n - 1, 0)), len(stream) - 1)]
        q = f"According to the documentation above, what does `{t[0]}.{t[1][0]}` do? Answer in one sentence."
        return f"{intro}\n\n{body}\n\n{q}"

    n, _, toks = _fit(render, length, count_tokens, "doc_qa", hint=16)
    candidates = [i for i in range(n) if len(_first_sentence(stream[i][1][2]).split()) >= 6] or [0]
    target = min(candidates, key=lambda i: abs(i - depth * max(n - 1, 0)))
    module, (name, _, para) = stream[target]
    return dict(prompt=render(n, target), answers=[_first_sentence(para)], metric="rouge_l", max_new_tokens=40,
                answer_prefix=f"`{module}.{name}`", meta=dict(target=f"{module}.{name}", entries=n, tokens=toks))


def doc_summary(rng: random.Random, length: int, count_tokens: CountTokens, split: str) -> dict:
    stream = _doc_stream(split, rng)
    intro = "Read the following documentation of Python standard library modules."
    q = "Summarize what these modules provide in two or three sentences."
    n, prompt, toks = _fit(lambda n: f"{intro}\n\n" + "\n\n".join(_doc_entry(m, e) for m, e in stream[:n])
                           + f"\n\n{q}", length, count_tokens, "doc_summary", hint=16)
    summaries = {m: s for m, s, _ in _module_docs()}
    mods = list(dict.fromkeys(m for m, _ in stream[:n]))
    return dict(prompt=prompt, answers=[" ".join(summaries[m] for m in mods)], metric="rouge_l",
                max_new_tokens=64, meta=dict(modules=mods, tokens=toks))


def fewshot_classify(rng: random.Random, length: int, count_tokens: CountTokens, split: str) -> dict:
    items = list(_labelled_chars()[split])
    by_label: dict[str, list] = {}
    for name, label in items:
        by_label.setdefault(label, []).append(name)
    labels = sorted(by_label)
    query_label = rng.choice(labels)
    query = rng.choice(by_label[query_label])
    pool = [(rng.choice(by_label[labels[i % len(labels)]]), labels[i % len(labels)]) for i in range(4096)]
    rng.shuffle(pool)
    pool = [p for p in pool if p[0] != query]
    head = "Each Unicode character name is labelled with its category.\n\n"
    tail = f"Name: {query}\nCategory:"
    n, prompt, toks = _fit(lambda n: head + "".join(f"Name: {a}\nCategory: {b}\n\n" for a, b in pool[:n]) + tail,
                           length, count_tokens, "fewshot_classify", hint=32)
    return dict(prompt=prompt, answers=[query_label], metric="first_line_exact", max_new_tokens=6, chat=False,
                meta=dict(query=query, examples=n, tokens=toks))


TASKS: dict[str, Callable] = {"code_continue": code_continue, "doc_qa": doc_qa, "doc_summary": doc_summary,
                              "fewshot_classify": fewshot_classify}


def real_text(count_tokens: CountTokens, lengths=(1024, 2048, 4096), samples_per_task: int = 4, seed: int = 0,
              split: str = "reporting", tasks=None) -> list[Sample]:
    """Build the suite; ids are "<split>-<task>-<length>-<seed>-<index>". Same arguments, same samples."""
    if not callable(count_tokens):
        raise ConfigError("count_tokens must be a function text -> number of tokens")
    if split not in SPLITS:
        raise ConfigError(f"real-text split must be one of {', '.join(SPLITS)}, got {split!r}")
    tasks, lengths = check_suite_args(tasks, TASKS, tuple(TASKS), lengths, 256, samples_per_task, "real-text ")
    out = []
    for task in dict.fromkeys(tasks):
        for length in dict.fromkeys(lengths):
            for i in range(samples_per_task):
                fields = TASKS[task](_rng(split, seed, task, length, i), length, count_tokens, split)
                out.append(Sample(id=f"{split}-{task}-{length}-{seed}-{i}", task=task, length=length, **fields))
    return out
