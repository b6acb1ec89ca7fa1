"""Paired statistics of the eval: bootstrap CIs of per-sample differences, matching by sample id,
summary rows and the report's marks."""
from __future__ import annotations

import numpy as np
import pytest

from kvcrush_ov.core.errors import ConfigError
from kvcrush_ov.tools.eval.paired import excludes_zero, paired_bootstrap, paired_differences
from kvcrush_ov.tools.eval.report import report_markdown, summarize
from kvcrush_ov.tools.eval.runner import EvalConfig


def row(policy, sid, score, rouge=50.0, kl=0.1, budget=0.25, precision="bf16"):
    return {"id": sid, "task": "t", "length": 1024, "prompt_tokens": 1000, "kv_precision": precision,
            "policy": policy, "budget": budget, "budget_tokens": 250, "prediction": "", "score": score,
            "exact_match_full": 0.0, "rouge_l_full": rouge, "nll": 1.0, "kl": kl, "kv_bytes": 100,
            "latency_s": 1.0}


def test_bootstrap_constant_and_seeded():
    s = paired_bootstrap([2.0] * 7)
    assert s == {"mean": 2.0, "ci_low": 2.0, "ci_high": 2.0}
    d = np.random.default_rng(0).normal(1.0, 3.0, 40)
    a, b = paired_bootstrap(d, seed=1), paired_bootstrap(d, seed=1)
    assert a == b and a["ci_low"] < a["mean"] < a["ci_high"]
    # the bootstrap CI is close to the normal-theory one for the mean of 40 values
    half = 1.96 * d.std(ddof=1) / np.sqrt(len(d))
    assert abs((a["ci_high"] - a["ci_low"]) / 2 - half) < 0.25 * half
    assert paired_bootstrap([]) == {"mean": None, "ci_low": None, "ci_high": None}
    assert paired_bootstrap([None, 1.0])["mean"] == 1.0


def test_excludes_zero():
    assert excludes_zero({"mean": 1, "ci_low": 0.1, "ci_high": 2})
    assert excludes_zero({"mean": -1, "ci_low": -2, "ci_high": -0.1})
    assert not excludes_zero({"mean": 1, "ci_low": -0.1, "ci_high": 2})
    assert not excludes_zero(None) and not excludes_zero({"mean": None, "ci_low": None, "ci_high": None})


def test_differences_are_paired_by_sample_id():
    rows = [row("ref", f"s{i}", 10.0 * i) for i in range(6)] + [row("a", f"s{i}", 10.0 * i + 5) for i in range(6)]
    rows += [row("a", "only-a", 1000.0), row("ref", "s0", 0.0, budget=0.5), row("a", "s0", 99.0, budget=0.5)]
    p = paired_differences(rows, "a", 0.25, "bf16", "ref")
    # separate means would differ by more (only-a is unpaired and ignored); per sample it is +5 each
    assert p["score"]["mean"] == 5.0 and p["score"]["ci_low"] == p["score"]["ci_high"] == 5.0
    assert p["score"]["n"] == 6 and p["rouge_l_full"]["mean"] == 0.0
    assert paired_differences(rows, "a", 0.25, "u8", "ref") is None


def test_summary_rows_and_report_marks():
    rng = np.random.default_rng(0)
    base = rng.uniform(0, 100, 30)
    rows = [row("full", f"s{i}", base[i]) for i in range(30)]
    rows += [row("better", f"s{i}", base[i] + 4 + rng.normal(0, 1)) for i in range(30)]
    rows += [row("same", f"s{i}", base[i] + rng.normal(0, 5), kl=None) for i in range(30)]
    summary = summarize(rows, ["full", "better", "same"], [0.25], reference="full")
    by = {s["policy"]: s for s in summary}
    assert by["full"]["paired"] is None
    better = by["better"]["paired"]["score"]
    assert set(better) == {"mean", "ci_low", "ci_high", "n"} and better["ci_low"] > 0
    assert by["same"]["paired"]["kl"]["mean"] is None  # no KL rows: nothing to pair
    md = report_markdown(summary, {"suite": "x", "model": "/m", "command": "c"})
    line = next(ln for ln in md.splitlines() if ln.startswith("| better") and "[" in ln)
    assert line.count("**") >= 2  # Δ score's CI excludes 0: marked
    same = next(ln for ln in md.splitlines() if ln.startswith("| same") and "[" in ln)
    assert not same.split("|")[4].strip().startswith("**")
    assert "Paired differences to `full`" in md


def test_reference_must_be_evaluated():
    with pytest.raises(ConfigError, match="--reference 'snapkv' is not among"):
        EvalConfig(policies=["full", "kvcrush"], budgets=[0.25], reference="snapkv")


def test_one_sample_never_excludes_zero():
    """A single paired sample has a zero-width bootstrap CI: it is not evidence of a difference."""
    rows = [{"id": "a", "policy": p, "budget": 0.25, "kv_precision": "bf16", "score": s, "rouge_l_full": s, "kl": 0.0}
            for p, s in (("x", 100.0), ("ref", 0.0))]
    d = paired_differences(rows, "x", 0.25, "bf16", "ref")
    assert d["score"]["n"] == 1 and d["score"]["ci_low"] == d["score"]["ci_high"] == 100.0
    assert not excludes_zero(d["score"])
    rows += [{**r, "id": "b"} for r in rows]
    assert excludes_zero(paired_differences(rows, "x", 0.25, "bf16", "ref")["score"])
