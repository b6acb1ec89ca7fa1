"""An eval's summary: one row per (KV precision, policy, budget) with means, CIs and paired
differences to a reference policy, the markdown report and the score-vs-memory plot."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .metrics import mean_and_ci
from .paired import excludes_zero, paired_differences


def summarize(rows: list[dict], policies: list[str], budgets: list[float], reference: str | None = None) -> list[dict]:
    """One row per (KV precision, policy, budget); with a reference, each row also gets
    paired: {score, rouge_l_full, kl: {mean, ci_low, ci_high, n}} = this policy minus the reference
    on the same samples (None for the reference itself)."""
    summary = []
    for precision, policy, budget in [(k, p, b) for k in dict.fromkeys(r["kv_precision"] for r in rows)
                                      for p in policies for b in budgets]:
        sel = [r for r in rows if r["policy"] == policy and r["budget"] == budget and r["kv_precision"] == precision]
        if sel:
            mean, ci = mean_and_ci([r["score"] for r in sel])
            finite = lambda key: [r[key] for r in sel if r.get(key) is not None]  # noqa: E731
            summary.append({
                "policy": policy, "budget": budget, "kv_precision": precision, "n": len(sel), "score": mean,
                "score_ci95": None if np.isnan(ci) else ci,
                "faithfulness": float(np.mean(finite("exact_match_full"))) if finite("exact_match_full") else None,
                "rouge_l_full": float(np.mean(finite("rouge_l_full"))) if finite("rouge_l_full") else None,
                "nll": float(np.mean(finite("nll"))) if finite("nll") else None,
                "kl": float(np.mean(finite("kl"))) if finite("kl") else None,
                "kv_bytes_per_seq": float(np.mean([r["kv_bytes"] for r in sel])),
                "budget_tokens_mean": float(np.mean([r["budget_tokens"] for r in sel])),
                "latency_s": float(np.mean([r["latency_s"] for r in sel])),
                "peak_kv_bytes_per_seq": float(np.mean(finite("peak_kv_bytes"))) if finite("peak_kv_bytes") else None,
                "prefill_s": float(np.mean(finite("prefill_s"))) if finite("prefill_s") else None,
            })
            if reference is not None:
                summary[-1]["reference"] = reference
                summary[-1]["paired"] = (None if policy == reference else
                                         paired_differences(rows, policy, budget, precision, reference))
    return summary


def _paired_cell(stat: dict | None, fmt: str) -> str:
    """'+3.1 [+0.4, +5.9]', bold when the CI excludes 0."""
    if not stat or stat.get("mean") is None:
        return "–"
    text = f"{stat['mean']:+{fmt}} [{stat['ci_low']:+{fmt}}, {stat['ci_high']:+{fmt}}]"
    return f"**{text}**" if excludes_zero(stat) else text


def paired_markdown(summary: list[dict]) -> list[str]:
    """The paired-difference table (empty without a reference)."""
    rows = [s for s in summary if s.get("reference")]
    if not rows:
        return []
    ref = rows[0]["reference"]
    lines = ["", f"Paired differences to `{ref}` on the same samples (mean and 95% paired-bootstrap CI; "
                 "**bold**: the CI excludes 0). Score and ROUGE-L: higher is better; KL: lower is better.", "",
             "| policy | budget | KV | Δ score | Δ ROUGE-L vs full | Δ KL |", "|---|---|---|---|---|---|"]
    for s in rows:
        p = s["paired"]
        if p is None:
            continue
        lines.append(f"| {s['policy']} | {s['budget']:g} | {s['kv_precision']} | {_paired_cell(p['score'], '.1f')} | "
                     f"{_paired_cell(p['rouge_l_full'], '.1f')} | {_paired_cell(p['kl'], '.4f')} |")
    return lines


def report_markdown(summary: list[dict], meta: dict) -> str:
    lines = [f"# Evaluation: {meta['suite']} on {Path(meta['model']).name}", "",
             f"Command: `{meta['command']}`", "",
             "| policy | budget | KV | n | score | ±95% | faithfulness | ROUGE-L vs full | NLL | KL | KV MiB/seq | latency s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda v, f: "–" if v is None else format(v, f)  # noqa: E731
    for s in summary:
        lines.append(f"| {s['policy']} | {s['budget']:g} | {s['kv_precision']} | {s['n']} | {s['score']:.1f} | {fmt(s['score_ci95'], '.1f')} | "
                     f"{fmt(s['faithfulness'], '.1f')} | {fmt(s['rouge_l_full'], '.1f')} | {fmt(s['nll'], '.3f')} | {fmt(s['kl'], '.4f')} | "
                     f"{s['kv_bytes_per_seq'] / 2**20:.2f} | {s['latency_s']:.2f} |")
    f = meta.get("fanout")
    if f:
        lines += ["", f"Fan-out: {f['runs']} runs from {meta['n_samples']} prefills; prefill {f['prefill_s']:.1f} s, "
                      f"shared decoding {f['fanout_decode_s']:.1f} s; separate runs would have prefilled "
                      f"{f['runs'] / max(meta['n_samples'], 1):.0f}x per sample (estimated saving {f['saving_s']:.0f} s, "
                      f"{100 * f['saving_fraction']:.0f}% of the separate-run time)."]
    lines += paired_markdown(summary)
    return "\n".join(lines) + "\n"


def plot(summary: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    precisions = list(dict.fromkeys(s["kv_precision"] for s in summary))
    for precision, policy in dict.fromkeys((s["kv_precision"], s["policy"]) for s in summary):
        pts = sorted((s["kv_bytes_per_seq"] / 2**20, s["score"], s["score_ci95"] or 0.0) for s in summary
                     if s["policy"] == policy and s["kv_precision"] == precision)
        x, y, e = zip(*pts)
        label = policy if len(precisions) == 1 else f"{policy} ({precision})"
        ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=label, linestyle="-" if precision == precisions[0] else "--")
    ax.set_xlabel("KV memory per sequence (MiB)")
    ax.set_ylabel("score (0-100)")
    ax.set_title("Score vs KV budget")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
