"""What memory-bounded prefill costs: each `POLICY:prefill=chunked[;...]` row of an eval paired with
`POLICY` (evicted after the whole prompt) on the same samples, plus peak KV per sequence and prefill time.

    .venv/bin/python scripts/prefill_cost.py OUT [OUT ...]   # eval output directories (results.json)

Prints one markdown table per directory; every figure is read from results.json.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from kvcrush_ov.tools.eval.paired import excludes_zero, paired_differences

PREFILL_KEYS = ("prefill", "prefill_chunk", "prefill_window", "prefill_scores", "prefill_pool_back", "scores",
                "expected_future", "expected_value_norm")


def after_twin(spec: str) -> str | None:
    """'snapkv:prefill=chunked;prefill_window=64' -> 'snapkv' (the same policy evicted after prefill)."""
    name, _, rest = spec.partition(":")
    items = [i for i in rest.split(";") if i]
    if "prefill=chunked" not in items:
        return None
    keep = [i for i in items if i.partition("=")[0] not in PREFILL_KEYS]
    return name + (":" + ";".join(keep) if keep else "")


def _fmt(stat: dict, digits: str) -> str:
    if stat["mean"] is None:
        return "–"
    text = f"{stat['mean']:+{digits}} [{stat['ci_low']:+{digits}}, {stat['ci_high']:+{digits}}]"
    return f"**{text}**" if excludes_zero(stat) else text


def table(out: Path) -> str:
    data = json.loads((out / "results.json").read_text())
    rows = data["samples"]
    keys = sorted({(r["policy"], r["budget"], r["kv_precision"]) for r in rows if after_twin(r["policy"])})
    lines = [f"`{data['meta']['command']}`", "",
             "| chunked variant | budget | n | Δ score (chunked − after) | Δ ROUGE-L vs full | Δ KL | peak KV MiB after → chunked "
             "| prefill s after → chunked |", "|---|---|---|---|---|---|---|---|"]
    for chunked, budget, precision in keys:
        base = after_twin(chunked)
        d = paired_differences(rows, chunked, budget, precision, base)
        if d is None:
            continue
        sel = lambda name, key: [r[key] for r in rows if r["policy"] == name and r["budget"] == budget  # noqa: E731
                                 and r["kv_precision"] == precision and r.get(key) is not None]
        peak = [np.mean(sel(p, "peak_kv_bytes")) / 2**20 for p in (base, chunked)]
        pre = [np.mean(sel(p, "prefill_s")) for p in (base, chunked)]
        lines.append(f"| {chunked} | {budget:g} | {d['score']['n']} | {_fmt(d['score'], '.1f')} | "
                     f"{_fmt(d['rouge_l_full'], '.1f')} | {_fmt(d['kl'], '.4f')} | {peak[0]:.2f} → {peak[1]:.2f} | "
                     f"{pre[0]:.1f} → {pre[1]:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    for arg in sys.argv[1:] or ["eval-out"]:
        print(table(Path(arg)))
