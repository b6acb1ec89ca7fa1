"""`ruler-mini`: a seeded, RULER-style long-context suite sized in tokens, for small models.

Every prompt is built from filler units (noise sentences, natural-text sentences, list entries) and
sized by binary search on the number of units so that `count_tokens(prompt)` lands on the target
length (within a few %). The question always comes AFTER the haystack, so what the model needs must
survive KV-cache eviction. Each (task, length, index) has its own RNG derived from the seed, so a
sample does not change when other tasks or lengths are added.

Natural text comes from the docstrings of Python standard-library modules (read from their source
with `ast`, so it works under `python -OO` too): it exists on any machine with Python. Its exact
wording depends on the Python version, so natural-text samples are deterministic per Python version.

Prompts were shaped for SmolLM2-135M-Instruct: one fact to find, short and distinct keys, an answer
prefix for the assistant turn. See README_TASKS.md for what the full cache scores on each task.
"""

from __future__ import annotations

import ast
import collections
import functools
import hashlib
import importlib.util
import random
import re
from typing import Callable

from kvcrush_ov.core.errors import ConfigError
from kvcrush_ov.tools.eval.sample import Sample, check_suite_args

CountTokens = Callable[[str], int]

# ----------------------------------------------------------------------------- randomness


def _rng(seed: int, *parts) -> random.Random:
    key = ":".join(str(p) for p in (seed, *parts)).encode()
    return random.Random(int.from_bytes(hashlib.sha256(key).digest()[:8], "little"))


def _numbers(rng: random.Random, k: int, digits: int = 5) -> list[str]:
    lo, hi = 10 ** (digits - 1), 10**digits - 1
    return [str(v) for v in rng.sample(range(lo, hi + 1), k)]


# ----------------------------------------------------------------------------- filler sources

NOISE = ("The river runs slowly past the old mill.", "The hills are quiet in the evening.",
         "The road goes on and on.", "Birds sing in the morning light.", "Nothing much happens here.")

# Simple, distinct, mostly single-token nouns (list tasks, keys).
WORDS = """apple anchor arrow badge basket beach bell berry blanket boat bottle bread brick bridge
broom bucket butter button cabin cable camera candle canvas carpet carrot castle cereal chain chair
cheese cherry chest circle clock cloud coat coffee coin comet copper cotton crayon crown cup curtain
desert diamond dinner dragon drum eagle engine feather fence finger flag flower forest fountain frog
garden ginger glass glove goat grape guitar hammer harbor helmet honey horse island jacket jelly
kettle kitten ladder lamp lemon letter lizard magnet mango marble meadow mirror monkey moon needle
nest ocean olive onion orange owl paddle panda paper parrot peach pencil pepper piano pillow pirate
planet pocket potato pumpkin puzzle rabbit radio rainbow ribbon river robot rocket saddle salad
shadow sheep shell shoe silver snail spoon squirrel stamp star statue stone sugar summer sword table
teapot tiger tomato towel tractor tunnel turtle umbrella valley violin wagon walnut whale whistle
window winter wizard wolf zebra""".split()

COLORS = ("red", "blue", "green", "yellow", "black", "white", "purple", "orange", "silver", "golden")
OBJECTS = ("door", "box", "gate", "lamp", "tower", "garden", "bridge", "boat", "clock", "chest",
           "window", "wagon", "cabin", "drum", "kettle", "ladder")

# Standard-library modules whose docstrings hold plenty of prose, in a fixed order.
STDLIB_MODULES = (
    "argparse", "base64", "bisect", "calendar", "cmd", "configparser", "contextlib", "copy",
    "dataclasses", "datetime", "difflib", "doctest", "enum", "fractions", "ftplib", "functools",
    "gettext", "gzip", "heapq", "imaplib", "inspect", "ipaddress", "json", "locale", "logging",
    "mailbox", "mimetypes", "numbers", "optparse", "pathlib", "pdb", "pickle", "platform", "pydoc",
    "queue", "random", "re", "sched", "selectors", "shutil", "smtplib", "socket", "socketserver",
    "ssl", "statistics", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit",
    "tokenize", "traceback", "turtle", "typing", "unittest", "uuid", "weakref", "zipfile",
)

_SENT_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")


def _docstrings(tree: ast.AST) -> list[str]:
    """Docstrings of a module and its classes/functions, in source order."""
    out: list[str] = []

    def visit(node):
        doc = ast.get_docstring(node, clean=True)
        if doc:
            out.append(doc)
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child)

    visit(tree)
    return out


def _is_prose(lines: list[str]) -> str | None:
    if any(line[:1].isspace() for line in lines):  # indented: code or a literal block
        return None
    text = " ".join(line.strip() for line in lines)
    words = text.split()
    if len(words) < 12 or ">>>" in text or "::" in text or not text.endswith((".", "!", "?")):
        return None
    if not text[0].isupper():  # starts mid-sentence (after a code block)
        return None
    if sum(c.isalpha() or c == " " for c in text) / len(text) < 0.9 or text.count(",") > len(words) / 4:
        return None
    return text


@functools.lru_cache(maxsize=1)
def natural_corpus() -> tuple[tuple[str, str, tuple[str, ...]], ...]:
    """((module, one-line summary, (prose paragraph, ...)), ...) from stdlib docstrings."""
    out, seen = [], set()
    for name in STDLIB_MODULES:
        try:
            spec = importlib.util.find_spec(name)
            if spec is None or not spec.origin or not spec.origin.endswith(".py"):
                continue
            with open(spec.origin, encoding="utf-8") as f:
                tree = ast.parse(f.read())
        except (ImportError, OSError, SyntaxError, UnicodeDecodeError, ValueError):
            continue
        docs = _docstrings(tree)
        module_doc = ast.get_docstring(tree, clean=True) or ""
        first = re.split(r"\n\s*\n", module_doc.strip())[0] if module_doc else ""
        first = " ".join(re.sub(r"[=~^-]{3,}", " ", first).split())  # drop reST underlines
        summary = _SENT_SPLIT.split(first)[0].rstrip(".")
        paras = []
        for doc in docs:
            for block in re.split(r"\n\s*\n", doc):
                text = _is_prose(block.split("\n"))
                if text and text not in seen:  # docstrings repeat across overloads/subclasses
                    seen.add(text)
                    paras.append(text)
        if paras:
            out.append((name, summary or f"The {name} module", tuple(paras)))
    if not out:
        raise ConfigError("found no standard-library docstrings for natural text; is the Python "
                          "stdlib source (.py files) installed?")
    return tuple(out)


@functools.lru_cache(maxsize=1)
def _sentence_stream() -> tuple[tuple[str, str, bool], ...]:
    """Natural text as ((module, sentence, ends_paragraph), ...); sentences of 3-40 words."""
    out = []
    for module, _, paras in natural_corpus():
        for para in paras:
            sents = [s for s in _SENT_SPLIT.split(para) if 3 <= len(s.split()) <= 40]
            for k, s in enumerate(sents):
                out.append((module, s, k == len(sents) - 1))
    return tuple(out)


def _module_starts() -> list[int]:
    stream = _sentence_stream()
    return [i for i in range(len(stream)) if i == 0 or stream[i][0] != stream[i - 1][0]]


def _join_natural(items) -> str:
    parts = []
    for _, sent, end in items:
        parts.append(sent)
        parts.append("\n\n" if end else " ")
    return "".join(parts).strip()


def _natural_units(start: int, n: int):
    stream = _sentence_stream()
    return [stream[(start + k) % len(stream)] for k in range(n)]


# ----------------------------------------------------------------------------- sizing


def _fit(render: Callable[[int], str], target: int, count_tokens: CountTokens, task: str,
         hint: int = 16) -> tuple[int, str, int]:
    """Pick the number of filler units n whose prompt length is closest to `target` tokens."""
    cache: dict[int, tuple[str, int]] = {}

    def measure(n: int) -> int:
        if n not in cache:
            text = render(n)
            cache[n] = (text, int(count_tokens(text)))
        return cache[n][1]

    if measure(0) > target:
        raise ConfigError(f"length {target} is too short for task {task!r}: its prompt without filler "
                          f"already has {measure(0)} tokens; use a longer length")
    limit = max(64, 8 * target)
    lo, hi = 0, max(1, hint)
    while measure(hi) <= target:
        lo = hi
        if hi >= limit:
            raise ConfigError(f"count_tokens never reached {target} tokens for task {task!r}; "
                              "pass a function that counts the tokens of a text")
        hi = min(hi * 2, limit)
    while hi - lo > 1:  # measure(lo) <= target < measure(hi)
        mid = (lo + hi) // 2
        if measure(mid) <= target:
            lo = mid
        else:
            hi = mid
    best = lo if target - measure(lo) <= measure(hi) - target else hi
    return best, cache[best][0], cache[best][1]


def _insert(units: list[str], needles: list[tuple[float, str]]) -> list[str]:
    """Put each needle sentence at its relative depth (0..1) among the filler units."""
    out = list(units)
    for depth, text in sorted(needles, key=lambda x: x[0], reverse=True):
        out.insert(round(depth * len(units)), text)
    return out


def _depths(rng: random.Random, k: int, lo: float = 0.1, hi: float = 0.9) -> list[float]:
    """k depths spread over [lo, hi]: one uniformly drawn point in each of k equal slices."""
    w = (hi - lo) / k
    return [lo + w * (i + rng.random()) for i in range(k)]


def _natural_haystack(rng: random.Random, needles_fn):
    """render(n) for natural text: n sentences from a random start, needles spliced in between."""
    start = rng.randrange(len(_sentence_stream()))

    def hay(n: int) -> str:
        items = _insert(_natural_units(start, n), [(d, ("", t, False)) for d, t in needles_fn()])
        return _join_natural(items)

    return hay, start


def _noise_haystack(rng: random.Random, needles_fn):
    offset = rng.randrange(len(NOISE))

    def hay(n: int) -> str:
        units = [NOISE[(offset + k) % len(NOISE)] for k in range(n)]
        return " ".join(_insert(units, needles_fn()))

    return hay, offset


# ----------------------------------------------------------------------------- tasks
# Each task: (rng, length, count_tokens) -> dict of Sample fields (without id/task/length).

_INTRO_NOISE = ("A pass key is hidden inside a lot of irrelevant text. Find it and memorize it. "
                "I will quiz you about the pass key.")
_INTRO_TEXT = ("Below is some documentation text. A pass key is hidden somewhere inside it. Find it and "
               "memorize it. I will quiz you about the pass key.")


def _pass_key_needle(v: str) -> str:
    return f"The pass key is {v}. Remember it. {v} is the pass key."


def _niah_single(rng, length, count_tokens, natural: bool):
    (v,) = _numbers(rng, 1)
    depth = rng.uniform(0.1, 0.9)
    needles = lambda: [(depth, _pass_key_needle(v))]  # noqa: E731
    hay, start = (_natural_haystack if natural else _noise_haystack)(rng, needles)
    intro = _INTRO_TEXT if natural else _INTRO_NOISE
    q = "What is the pass key? Answer with the number only."
    n, prompt, toks = _fit(lambda n: f"{intro}\n\n{hay(n)}\n\n{q}", length, count_tokens,
                           "niah_single_text" if natural else "niah_single")
    return dict(prompt=prompt, answers=[v], metric="contains", max_new_tokens=12,
                answer_prefix="The pass key is", meta=dict(depths=[depth], units=n, tokens=toks))


def niah_single(rng, length, count_tokens):
    return _niah_single(rng, length, count_tokens, natural=False)


def niah_single_text(rng, length, count_tokens):
    return _niah_single(rng, length, count_tokens, natural=True)


def _keys(rng: random.Random, k: int) -> list[str]:
    objs = rng.sample(OBJECTS, k)
    cols = rng.sample(COLORS, k)
    return [f"{c} {o}" for c, o in zip(cols, objs)]


_INTRO_KEYS = ("Below is some documentation text. Pass keys for a few objects are hidden inside it. Find "
               "them and memorize them. I will quiz you about them.")


def _keyed_needles(rng, n_keys: int):
    """n_keys "pass key for the <key>" needles at random depths, shuffled, in a natural-text haystack."""
    keys, vals = _keys(rng, n_keys), _numbers(rng, n_keys)
    depths = _depths(rng, n_keys)
    order = rng.sample(range(n_keys), n_keys)
    needles = lambda: [(depths[j], f"The pass key for the {keys[i]} is {vals[i]}.")  # noqa: E731
                       for j, i in enumerate(order)]
    hay, _ = _natural_haystack(rng, needles)
    return keys, vals, depths, hay


def niah_multikey(rng, length, count_tokens, n_keys: int = 4):
    keys, vals, depths, hay = _keyed_needles(rng, n_keys)
    t = rng.randrange(n_keys)
    q = f"What is the pass key for the {keys[t]}? Answer with the number only."
    n, prompt, toks = _fit(lambda n: f"{_INTRO_KEYS}\n\n{hay(n)}\n\n{q}", length, count_tokens, "niah_multikey")
    return dict(prompt=prompt, answers=[vals[t]], metric="contains", max_new_tokens=12,
                answer_prefix=f"The pass key for the {keys[t]} is",
                meta=dict(depths=depths, keys=keys, values=vals, target=keys[t], units=n, tokens=toks))


def niah_multivalue(rng, length, count_tokens, n_values: int = 3, natural: bool = False):
    """One key, several values to list. In noise by default: in natural text SmolLM2-135M (full
    cache, 1024 tokens, n=4) scored 25 with 3 values and 50 with 2 (all-or-nothing); in noise, 42
    with 3 values (graded partial credit)."""
    (key,) = _keys(rng, 1)
    vals = _numbers(rng, n_values)
    depths = _depths(rng, n_values)
    needles = lambda: [(d, f"One of the pass keys for the {key} is {v}.") for d, v in zip(depths, vals)]  # noqa: E731
    hay, start = (_natural_haystack if natural else _noise_haystack)(rng, needles)
    intro = _INTRO_KEYS if natural else _INTRO_KEYS.replace("some documentation text", "some text")
    q = f"What are all the pass keys for the {key}? List the numbers only."
    n, prompt, toks = _fit(lambda n: f"{intro}\n\n{hay(n)}\n\n{q}", length, count_tokens,
                           "niah_multivalue")
    return dict(prompt=prompt, answers=vals, metric="contains", max_new_tokens=32,
                answer_prefix=f"The pass keys for the {key} are",
                meta=dict(depths=depths, key=key, units=n, tokens=toks))


def niah_multiquery(rng, length, count_tokens, n_keys: int = 4, n_queries: int = 2):
    keys, vals, depths, hay = _keyed_needles(rng, n_keys)
    ts = sorted(rng.sample(range(n_keys), n_queries))
    asked = " and ".join(f"the {keys[t]}" for t in ts)
    q = f"What are the pass keys for {asked}? Answer with the numbers only."
    n, prompt, toks = _fit(lambda n: f"{_INTRO_KEYS}\n\n{hay(n)}\n\n{q}", length, count_tokens,
                           "niah_multiquery")
    return dict(prompt=prompt, answers=[vals[t] for t in ts], metric="contains", max_new_tokens=32,
                answer_prefix=f"The pass key for the {keys[ts[0]]} is",
                meta=dict(depths=depths, keys=keys, values=vals, asked=[keys[t] for t in ts], units=n,
                          tokens=toks))


def _var_names(rng: random.Random, k: int) -> list[str]:
    letters = "ABCDEFGHJKLMNPQRSTUVWXYZ"
    names: set[str] = set()
    while len(names) < k:
        names.add("".join(rng.choice(letters) for _ in range(5)))
    return rng.sample(sorted(names), k)


def vt(rng, length, count_tokens, hops: int = 2):
    names = _var_names(rng, hops + 1)
    (v,) = _numbers(rng, 1)
    depths = _depths(rng, hops + 1)
    stmts = [f"VAR {names[0]} = {v}."] + [f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, hops + 1)]
    needles = lambda: list(zip(depths, stmts))  # noqa: E731
    hay, _ = _noise_haystack(rng, needles)
    intro = ("Memorize and track the chain of variable assignments hidden in the following text. "
             "A variable that is set to another variable gets that variable's value.")
    q = f"Question: which variables are assigned the value {v}? List their names."
    n, prompt, toks = _fit(lambda n: f"{intro}\n\n{hay(n)}\n\n{q}", length, count_tokens, "vt")
    return dict(prompt=prompt, answers=names, metric="contains", max_new_tokens=32,
                answer_prefix=f"The variables assigned the value {v} are:",
                meta=dict(depths=depths, units=n, tokens=toks))


def _top_k_strict(seq: list[str], k: int) -> list[str] | None:
    counts = collections.Counter(seq).most_common()
    if len(counts) <= k or counts[k - 1][1] <= counts[k][1]:
        return None
    return [w for w, _ in counts[:k]]


def _top_words_text(k: int, what: str) -> tuple[str, str]:
    """(question, answer prefix) asking for the k most frequent `what`s."""
    if k == 1:
        return (f"Question: what is the most common {what} in the list above? Answer with one word.",
                f"The most common {what} in the list is")
    return (f"Question: what are the {k} most common {what}s in the list above?",
            f"The {k} most common {what}s in the list are:")


def cwe(rng, length, count_tokens, n_common: int = 1, share: float = 0.3):
    """Common-word extraction: a numbered word list in which each of `n_common` words makes up
    `share` of the entries and every other word appears rarely (cycled through the vocabulary).

    Resized for SmolLM2-135M (full cache, 1024 tokens, n=4): RULER's shape (several common words,
    asked for the top 3) scored 17 with share 0.08-0.15; one common word at share 0.15 scored 25,
    at 0.3 scored 50 (an un-numbered comma list: 17)."""
    words = rng.sample(WORDS, len(WORDS))
    common, rare = words[:n_common], words[n_common:]
    cap = max(64, 8 * length)
    seq, r = [], 0
    for _ in range(cap):
        if rng.random() < share * n_common:
            seq.append(rng.choice(common))
        else:
            seq.append(rare[r % len(rare)])
            r += 1
            if r % len(rare) == 0:
                rng.shuffle(rare)
    intro = ("Below is a numbered list of words. Some words appear many more times than the others. "
             "Memorize the ones that appear most often.")
    q, prefix = _top_words_text(n_common, "word")
    body = lambda n: "\n".join(f"{i + 1}. {w}" for i, w in enumerate(seq[:n]))  # noqa: E731
    n, prompt, toks = _fit(lambda n: f"{intro}\n\n{body(n)}\n\n{q}", length, count_tokens, "cwe", hint=64)
    top = _top_k_strict(seq[:n], n_common)
    if top is None or set(top) != set(common):
        raise ConfigError(f"length {length} is too short for task 'cwe' (its common words do not stand out)")
    return dict(prompt=prompt, answers=common, metric="contains", max_new_tokens=4 + 5 * n_common,
                answer_prefix=prefix, meta=dict(entries=n, tokens=toks))


def _pseudo_words(rng: random.Random, k: int) -> list[str]:
    cons, vows = "bdfgklmnprstvz", "aeiou"
    out: set[str] = set()
    while len(out) < k:
        out.add("".join(rng.choice(cons) + rng.choice(vows) for _ in range(3)))
    return rng.sample(sorted(out), k)


def fwe(rng, length, count_tokens, n_top: int = 3, vocab: int = 60, alpha: float = 2.0):
    """Frequent-word extraction: made-up words drawn from a Zipf(alpha) distribution."""
    for attempt in range(20):
        words = _pseudo_words(rng, vocab)
        weights = [1.0 / (r + 1) ** alpha for r in range(vocab)]
        seq = rng.choices(words, weights=weights, k=max(64, 8 * length))
        intro = ("Read the following coded text and keep track of how often each coded word appears.")
        q = f"Question: what are the {n_top} most frequent coded words in the text above?"

        def body(n, seq=seq):
            return "\n".join(" ".join(seq[i:i + 10]) for i in range(0, n, 10))

        n, prompt, toks = _fit(lambda n: f"{intro}\n\n{body(n)}\n\n{q}", length, count_tokens, "fwe", hint=64)
        top = _top_k_strict(seq[:n], n_top)
        if top is not None:
            return dict(prompt=prompt, answers=top, metric="contains", max_new_tokens=24,
                        answer_prefix=f"The {n_top} most frequent coded words are:",
                        meta=dict(entries=n, tokens=toks, attempt=attempt))
    raise ConfigError(f"length {length} is too short for task 'fwe' (no clear top {n_top} words)")


def _doc_start(rng) -> int:
    """A random module's first sentence: documents start at a module boundary."""
    return rng.choice(_module_starts())


def faith_summarize(rng, length, count_tokens):
    """Faithfulness: summarize natural documentation; compare against the full-cache output
    (the reference answer, the covered modules' one-line summaries, is only a weak anchor)."""
    start = _doc_start(rng)
    q = "Summarize the documentation above in two or three sentences."
    intro = "Read the following documentation."
    n, prompt, toks = _fit(lambda n: f"{intro}\n\n{_join_natural(_natural_units(start, n))}\n\n{q}",
                           length, count_tokens, "faith_summarize", hint=32)
    mods = list(dict.fromkeys(m for m, _, _ in _natural_units(start, n)))
    summaries = {m: s for m, s, _ in natural_corpus()}
    return dict(prompt=prompt, answers=[". ".join(summaries[m] for m in mods) + "."], metric="rouge_l",
                max_new_tokens=64, meta=dict(modules=mods, units=n, tokens=toks))


def faith_continue(rng, length, count_tokens, ref_words: int = 40):
    """Faithfulness: raw (no chat) continuation of natural documentation; the reference is the
    true next ~40 words; compare mainly against the full-cache output."""
    start = _doc_start(rng)
    n, prompt, toks = _fit(lambda n: _join_natural(_natural_units(start, n)), length, count_tokens,
                           "faith_continue", hint=32)
    nxt, k = [], n
    while len(" ".join(nxt).split()) < ref_words:
        nxt.append(_natural_units(start + k, 1)[0][1])
        k += 1
    ref = " ".join(" ".join(nxt).split()[:ref_words])
    return dict(prompt=prompt, answers=[ref], metric="rouge_l", max_new_tokens=48, chat=False,
                meta=dict(units=n, tokens=toks))


TASKS: dict[str, Callable] = {
    "niah_single": niah_single,
    "niah_single_text": niah_single_text,
    "niah_multikey": niah_multikey,
    "niah_multivalue": niah_multivalue,
    "niah_multiquery": niah_multiquery,
    "vt": vt,
    "cwe": cwe,
    "fwe": fwe,
    "faith_summarize": faith_summarize,
    "faith_continue": faith_continue,
}
RETRIEVAL_TASKS = ("niah_single", "niah_single_text", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt")
AGGREGATION_TASKS = ("cwe", "fwe")
FAITHFULNESS_TASKS = ("faith_summarize", "faith_continue")
DEFAULT_TASKS = tuple(TASKS)


def ruler_mini(count_tokens: CountTokens, lengths=(1024, 2048, 4096), samples_per_task: int = 4,
               seed: int = 0, tasks=None) -> list[Sample]:
    """Generate the suite: for each task, each length, `samples_per_task` samples.

    count_tokens: text -> number of tokens (pass the model tokenizer's counter); prompts are sized so
    that count_tokens(prompt) is within a few % of the length (the chat template is not counted).
    tasks: names from TASKS (default DEFAULT_TASKS). Same arguments -> same samples.
    Ids are "<task>-<length>-<index>".
    """
    if not callable(count_tokens):
        raise ConfigError("count_tokens must be a function text -> number of tokens")
    tasks, lengths = check_suite_args(tasks, TASKS, DEFAULT_TASKS, lengths, 64, samples_per_task)
    out = []
    for task in dict.fromkeys(tasks):
        for length in dict.fromkeys(lengths):
            for i in range(samples_per_task):
                fields = TASKS[task](_rng(seed, task, length, i), length, count_tokens)
                out.append(Sample(id=f"{task}-{length}-{i}", task=task, length=length, **fields))
    return out
