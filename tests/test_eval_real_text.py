"""The real-text suite: deterministic, sized in tokens, tuning and reporting splits share no text,
and its two new metrics by hand."""
from __future__ import annotations

import hashlib

import pytest

from kvcrush_ov.core.errors import ConfigError
from kvcrush_ov.tools.eval.metrics import score
from kvcrush_ov.tools.eval.real_text import TASKS, real_text
from kvcrush_ov.tools.eval.suite import load_suite


def count(text: str) -> int:  # a stand-in tokenizer: ~4 characters a token
    return len(text) // 4


def digest(samples) -> str:
    return hashlib.sha256("".join(s.id + s.prompt + "|".join(s.answers) for s in samples).encode()).hexdigest()


def test_deterministic_and_sized():
    a = real_text(count, lengths=(1024, 2048), samples_per_task=2, seed=3)
    b = load_suite("real-text", count, lengths=(1024, 2048), samples_per_task=2, seed=3)
    assert digest(a) == digest(b) and len(a) == len(TASKS) * 4
    assert digest(a) != digest(real_text(count, lengths=(1024, 2048), samples_per_task=2, seed=4))
    for s in a:
        assert abs(count(s.prompt) - s.length) <= 0.06 * s.length, (s.id, count(s.prompt))
        assert s.answers[0].strip()


def test_splits_share_no_source_text():
    def sources(split):
        out = set()
        for s in real_text(count, lengths=(1024,), samples_per_task=6, split=split):
            out |= {s.meta.get("file"), s.meta.get("target"), s.meta.get("query"), *s.meta.get("modules", [])}
        return out - {None}
    tuning, reporting = sources("tuning"), sources("reporting")
    assert tuning and reporting and not tuning & reporting


def test_tasks_read_as_intended():
    s = {x.task: x for x in real_text(count, lengths=(1024,), samples_per_task=1)}
    cc = s["code_continue"]
    assert not cc.chat and cc.metric == "edit_sim" and cc.prompt.endswith("\n")
    assert cc.answers[0] not in cc.prompt.splitlines()[-3:]
    qa = s["doc_qa"]
    assert qa.meta["target"] in qa.prompt and qa.answers[0].split()[0] in qa.prompt
    fc = s["fewshot_classify"]
    assert fc.prompt.endswith("Category:") and f"Category: {fc.answers[0]}\n" in fc.prompt


def test_new_metrics_by_hand():
    assert score("x = foo(1)\nmore", ["x = foo(1)"], "edit_sim") == 100.0
    assert score("\n  abcd  ", ["abce"], "edit_sim") == pytest.approx(75.0)
    assert score("", ["abc"], "edit_sim") == 0.0
    assert score(" digit\n\nName: X\nCategory: math symbol", ["digit"], "first_line_exact") == 100.0
    assert score("math symbol\ndigit", ["digit"], "first_line_exact") == 0.0


def test_bad_arguments_one_line():
    with pytest.raises(ConfigError, match="split"):
        real_text(count, split="test")
    with pytest.raises(ConfigError, match="task"):
        real_text(count, tasks=["nope"])
    with pytest.raises(ConfigError, match="lengths"):
        real_text(count, lengths=(100,))


def test_long_prompts_or_a_clear_error():
    """16k code prompts come from files long enough for them; a task whose text runs out says so."""
    long = real_text(count, lengths=(16384,), samples_per_task=2, tasks=["code_continue", "fewshot_classify"])
    for s in long:
        assert abs(count(s.prompt) - 16384) <= 0.06 * 16384, (s.id, count(s.prompt))
    with pytest.raises(ConfigError, match="never reached"):
        real_text(count, lengths=(65536,), samples_per_task=1, tasks=["doc_qa"])
