"""Paired statistics: how a policy differs from a reference policy on the SAME samples.

Two policies scored on the same prompts share most of their variance (a hard sample is hard for
both), so "A beats B" is judged on the per-sample differences A - B, not on two separate means and
their CIs. The CI is a paired bootstrap (resample samples with replacement, take the mean
difference), percentile 95%, seeded so that a report regenerates identically.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ...core.errors import ConfigError

PAIRED_METRICS = ("score", "rouge_l_full", "kl")


def paired_bootstrap(diffs: Sequence[float], n_boot: int = 2000, seed: int = 0,
                     confidence: float = 0.95) -> dict[str, float | None]:
    """{mean, ci_low, ci_high} of the mean of per-sample differences; None fields when there are none.

    One sample gives a zero-width CI (nothing to resample): read n with it."""
    d = np.asarray([x for x in diffs if x is not None], dtype=np.float64)
    if d.size == 0:
        return {"mean": None, "ci_low": None, "ci_high": None}
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, d.size, size=(n_boot, d.size))
    means = d[idx].mean(axis=1)
    alpha = (1.0 - confidence) / 2
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return {"mean": float(d.mean()), "ci_low": float(lo), "ci_high": float(hi)}


def excludes_zero(stat: dict | None) -> bool:
    """True when the CI lies entirely on one side of 0 (a difference the data supports); never from one
    sample, whose CI has zero width because there is nothing to resample."""
    if not stat or stat.get("ci_low") is None or stat.get("n", 2) < 2:
        return False
    return stat["ci_low"] > 0 or stat["ci_high"] < 0


def paired_differences(rows: list[dict], policy: str, budget: float, precision: str, reference: str,
                       n_boot: int = 2000, seed: int = 0) -> dict[str, dict] | None:
    """{metric: {mean, ci_low, ci_high}} for policy - reference over the samples both have at this
    budget and KV precision (matched by sample id); None if the reference has no such rows."""
    def by_id(name: str) -> dict[str, dict]:
        return {r["id"]: r for r in rows if r["policy"] == name and r["budget"] == budget
                and r["kv_precision"] == precision}

    ours, ref = by_id(policy), by_id(reference)
    common = [i for i in ours if i in ref]
    if not common:
        return None
    out: dict[str, dict] = {}
    for metric in PAIRED_METRICS:
        diffs = [ours[i][metric] - ref[i][metric] for i in common
                 if ours[i].get(metric) is not None and ref[i].get(metric) is not None]
        out[metric] = {**paired_bootstrap(diffs, n_boot, seed), "n": len(diffs)}
    return out


def check_reference(reference: str | None, policies: Sequence[str]) -> None:
    """The reference must be one of the evaluated policies (its rows are what we pair with)."""
    if reference is not None and reference not in policies:
        raise ConfigError(f"--reference {reference!r} is not among the evaluated policies "
                          f"({', '.join(policies)}); add it to --policies")
