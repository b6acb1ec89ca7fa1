"""Evaluation samples and suites: the `Sample` record, custom JSONL suites, and `load_suite`.

A runner turns a Sample into model input like this:
- chat=True:  apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
              + answer_prefix, appended verbatim right after the assistant header; generation
              continues from there;
- chat=False: prompt + answer_prefix, fed raw (no template).
Generate greedily up to `max_new_tokens`, then `metrics.score(output, answers, metric)`.
"""

from __future__ import annotations

import json
import os
from typing import Callable

from kvcrush_ov.core.errors import ConfigError
from kvcrush_ov.tools.eval.metrics import METRICS
from kvcrush_ov.tools.eval.ruler_mini import ruler_mini
from kvcrush_ov.tools.eval.sample import Sample

SUITES = ("ruler-mini", "real-text")


# ----------------------------------------------------------------------------- JSONL

_REQUIRED = {"id": str, "prompt": str, "answers": list, "metric": str}
_OPTIONAL = {"max_new_tokens": int, "chat": bool, "task": str, "length": int, "answer_prefix": str}
_ALLOWED = tuple(_REQUIRED) + tuple(_OPTIONAL)
_TYPE_NAMES = {str: "a string", list: "a list of strings", int: "an integer", bool: "true or false"}


def _short(value, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_text(where: str, key: str, value: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(f"{where}: {key!r} holds an invalid unicode escape (lone surrogate); "
                          "write real characters") from None


def _parse_record(where: str, obj) -> dict:
    if not isinstance(obj, dict):
        raise ConfigError(f"{where}: each line must be a JSON object "
                          f'{{"id", "prompt", "answers", "metric", ...}}, got {type(obj).__name__}')
    unknown = [k for k in obj if k not in _ALLOWED]
    if unknown:
        raise ConfigError(f"{where}: unknown key {_short(unknown[0])}; allowed keys are {', '.join(_ALLOWED)}")
    for key in _REQUIRED:
        if key not in obj:
            raise ConfigError(f"{where}: missing required key {key!r}; every line needs "
                              f"{', '.join(_REQUIRED)}")
    for key, typ in {**_REQUIRED, **_OPTIONAL}.items():
        if key not in obj:
            continue
        val = obj[key]
        ok = isinstance(val, typ) and not (typ is int and isinstance(val, bool))
        if not ok:
            raise ConfigError(f"{where}: {key!r} must be {_TYPE_NAMES[typ]}, got {type(val).__name__} "
                              f"{_short(val)}")
        if typ is str:
            _check_text(where, key, val)
    rec = dict(obj)
    if not rec["id"].strip():
        raise ConfigError(f"{where}: 'id' is empty; give each sample a unique non-empty id")
    if not rec["prompt"].strip():
        raise ConfigError(f"{where}: 'prompt' is empty; give the text the model should read")
    answers = rec["answers"]
    if not answers:
        raise ConfigError(f"{where}: 'answers' is empty; give at least one reference answer")
    for i, a in enumerate(answers):
        if not isinstance(a, str):
            raise ConfigError(f"{where}: answers[{i}] must be a string, got {type(a).__name__} {_short(a)}")
        _check_text(where, f"answers[{i}]", a)
        if not a.strip():
            raise ConfigError(f"{where}: answers[{i}] is empty; an empty answer matches anything, remove it")
    if rec["metric"] not in METRICS:
        raise ConfigError(f"{where}: unknown metric {_short(rec['metric'])}; use one of {', '.join(METRICS)}")
    if "max_new_tokens" in rec and rec["max_new_tokens"] <= 0:
        raise ConfigError(f"{where}: 'max_new_tokens' must be a positive integer, got {rec['max_new_tokens']}")
    if "length" in rec and rec["length"] < 0:
        raise ConfigError(f"{where}: 'length' must be >= 0, got {rec['length']}")
    return rec


def load_jsonl(path: str | os.PathLike) -> list[Sample]:
    """Read a custom suite: one JSON object a line (blank lines are skipped).

    Keys: "id" (str, unique), "prompt" (str), "answers" ([str], non-empty), "metric"
    ("contains"|"exact"|"rouge_l"); optional "max_new_tokens" (int > 0, default 32), "chat" (bool,
    default true), "answer_prefix" (str), "task" (str), "length" (int >= 0). Any other key, or any
    bad line, raises ConfigError "<path>:<line>: <what is wrong>; <what to do>".
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read suite file ({e.strerror or e}); check the path") from None
    samples: list[Sample] = []
    seen: dict[str, int] = {}
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        where = f"{path}:{lineno}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"{where}: not valid UTF-8 (byte {e.start}); save the file as UTF-8") from None
        if line.startswith("\ufeff") and lineno == 1:
            line = line[1:]
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where}: invalid JSON ({e.msg} at column {e.colno}); "
                              "write one complete JSON object per line") from None
        except (ValueError, RecursionError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ConfigError(f"{where}: invalid JSON ({_short(msg, 80)}); "
                              "write one complete JSON object per line") from None
        rec = _parse_record(where, obj)
        if rec["id"] in seen:
            raise ConfigError(f"{where}: duplicate id {_short(rec['id'])} (first on line {seen[rec['id']]}); "
                              "ids must be unique")
        seen[rec["id"]] = lineno
        samples.append(Sample(**rec))
    if not samples:
        raise ConfigError(f"{path}: no samples in the file; write one JSON object per line")
    return samples


def save_jsonl(samples: list[Sample], path: str | os.PathLike) -> None:
    """Write samples in the format `load_jsonl` reads (e.g. to freeze a generated suite)."""
    with open(path, "w", encoding="utf-8") as f:
        for s in samples:
            rec = {"id": s.id, "prompt": s.prompt, "answers": list(s.answers), "metric": s.metric,
                   "max_new_tokens": s.max_new_tokens, "chat": s.chat, "task": s.task,
                   "length": s.length, "answer_prefix": s.answer_prefix}
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def load_suite(name_or_path: str | os.PathLike, count_tokens: Callable[[str], int] | None = None,
               **kwargs) -> list[Sample]:
    """"ruler-mini" -> `ruler_mini(count_tokens, **kwargs)`; a path to a .jsonl file -> `load_jsonl`."""
    name = os.fspath(name_or_path)
    if name == "ruler-mini":
        if count_tokens is None:
            raise ConfigError("suite 'ruler-mini' sizes prompts in tokens; pass count_tokens "
                              "(e.g. the model tokenizer's counter)")
        return ruler_mini(count_tokens, **kwargs)
    if name == "real-text":
        if count_tokens is None:
            raise ConfigError("suite 'real-text' sizes prompts in tokens; pass count_tokens "
                              "(e.g. the model tokenizer's counter)")
        from kvcrush_ov.tools.eval.real_text import real_text

        return real_text(count_tokens, **kwargs)
    if name.endswith(".jsonl") or os.path.isfile(name):
        if kwargs:
            raise ConfigError(f"options {', '.join(sorted(kwargs))} apply to generated suites, "
                              f"not to the file {name}")
        return load_jsonl(name)
    raise ConfigError(f"unknown suite {name!r}; use one of {', '.join(SUITES)} or a path to a .jsonl file")
