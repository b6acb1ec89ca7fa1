"""Write the README's headline table from an eval's results.json (between `<!-- headline:begin/end -->`).

    .venv/bin/python scripts/readme_headline.py docs/eval/qwen0.5b-ruler-mini-4k [--readme README.md]

One row per policy: score (mean ± 95% CI) and KV MiB per sequence at each budget, and the paired
difference to the eval's reference policy; every figure is read from results.json.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from kvcrush_ov.tools.demo import write_between_markers


def _paired(row: dict) -> str:
    p = (row.get("paired") or {}).get("score")
    if not p or p.get("mean") is None:
        return "–"
    return f"{p['mean']:+.1f} [{p['ci_low']:+.1f}, {p['ci_high']:+.1f}]"


def table(out: Path) -> str:
    data = json.loads((out / "results.json").read_text())
    summary, meta = data["summary"], data["meta"]
    budgets = list(dict.fromkeys(s["budget"] for s in summary))
    policies = list(dict.fromkeys(s["policy"] for s in summary))
    ref = next((s.get("reference") for s in summary if s.get("reference")), None)
    cell = {(s["policy"], s["budget"]): s for s in summary}
    head = ["policy"] + [f"score at {b:g}" for b in budgets] + [f"KV MiB at {b:g}" for b in budgets]
    head += [f"vs {ref} at {b:g}" for b in budgets] if ref else []
    lines = [f"{Path(meta['model']).name}, {meta['suite']}, n={summary[0]['n']} per row "
             f"([report]({out}/report.md); `{meta['command']}`):", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for policy in policies:
        rows = [cell.get((policy, b)) for b in budgets]
        cells = [f"{r['score']:.1f} ± {r['score_ci95'] or 0:.1f}" if r else "–" for r in rows]
        cells += [f"{r['kv_bytes_per_seq'] / 2**20:.2f}" if r else "–" for r in rows]
        cells += [_paired(r) if r else "–" for r in rows] if ref else []
        lines.append(f"| {policy} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="an eval output directory (results.json)")
    p.add_argument("--readme", default="README.md")
    args = p.parse_args()
    text = table(Path(args.out))
    write_between_markers(Path(args.readme), "headline",
                          f"python scripts/readme_headline.py {args.out} --readme {args.readme}", text)
    print(text)


if __name__ == "__main__":
    main()
