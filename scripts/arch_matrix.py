"""Generate the architecture matrix: run kvcrush_ov.tools.matrix's checks on every tiny architecture
(and, with --gemma3, on Gemma 3 270M) and write the table between the markers of docs/architectures.md.

    python scripts/arch_matrix.py [--gemma3] [--doc docs/architectures.md]

Every figure in the table comes from this run (~1-2 min for the tiny models; --gemma3 adds ~3 min).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import openvino as ov

from kvcrush_ov.core import transforms
from kvcrush_ov.tools import matrix
from kvcrush_ov.tools.models import TINY_ARCHS, hf_dir, prepare

BEGIN, END = "<!-- arch-matrix:begin -->", "<!-- arch-matrix:end -->"
F32_HINT = {"INFERENCE_PRECISION_HINT": "f32"}


def features(config: dict, windows: list[int]) -> str:
    """What a row exercises, read from its config.json and graph."""
    hq, hkv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    hd = config.get("head_dim") or config["hidden_size"] // hq
    out = [f"{hq}q/{hkv}kv heads", f"head_dim {hd}" + (f" (hidden/heads = {config['hidden_size'] // hq})"
                                                        if hd != config["hidden_size"] // hq else "")]
    kind = config["model_type"]
    if kind in ("qwen3", "gemma3_text"):
        out.append("QK-norm")
    if kind == "qwen2":
        out.append("q/k/v biases")
    if kind == "phi3":
        out.append("fused qkv")
    if any(windows):
        sizes = sorted({w for w in windows if w})
        out.append(f"window {'/'.join(map(str, sizes))} on {sum(1 for w in windows if w)} of {len(windows)} layers")
    if config.get("attn_logit_softcapping"):
        out.append(f"attention soft-cap {config['attn_logit_softcapping']:g}")
    if config.get("final_logit_softcapping"):
        out.append(f"final soft-cap {config['final_logit_softcapping']:g}")
    if config.get("query_pre_attn_scalar") and config["query_pre_attn_scalar"] != hd:
        out.append(f"scale 1/sqrt({config['query_pre_attn_scalar']})")
    if config.get("num_local_experts"):
        out.append(f"MoE {config['num_local_experts']} experts top-{config['num_experts_per_tok']}")
    return ", ".join(out)


def windows_of(model_dir: Path) -> list[int]:
    model = ov.Core().read_model(model_dir / "openvino_model.xml")
    transforms.make_paged_model(model)
    return transforms.sliding_windows(model)


def row(name: str, model_dir: Path, hf: Path, prompts_parity, prompts_scores, new_tokens: int) -> dict:
    config = json.loads((model_dir / "config.json").read_text())
    windows = windows_of(model_dir)
    t0 = time.perf_counter()
    same = matrix.parity(model_dir, prompts_parity, new_tokens, F32_HINT)
    err = matrix.score_error(model_dir, hf, prompts_scores)
    note = ""
    if config.get("attn_logit_softcapping"):
        raw = matrix.score_error(model_dir, hf, prompts_scores, as_exported=False)
        note = f"export drops attention soft-capping (vs HF with it: {raw:.1e})"
    runs, used = matrix.every_policy(model_dir)
    evicting = [r for r in runs if r.policy == "full" or r.evictions >= 2]
    sliding_ok = all((np.asarray(r.targets)[np.asarray(windows) > 0] <= np.asarray(windows)[np.asarray(windows) > 0]).all()
                     for r in runs)
    return dict(name=name, arch=config.get("architectures", ["?"])[0], layers=config["num_hidden_layers"],
                features=features(config, windows), parity=f"{sum(same)}/{len(same)}", score_error=err,
                policies=f"{len(evicting)}/{len(runs)}", blocks_left=used,
                sliding=("yes" if sliding_ok else "NO") if any(windows) else "–", note=note,
                seconds=round(time.perf_counter() - t0, 1))


def table(rows: list[dict]) -> str:
    head = ("| model | architecture | layers | what it exercises | greedy = genai CB | max per-head score error vs HF "
            "| policies evicting | blocks left | sliding layers keep <= window | notes |\n"
            "|---|---|---|---|---|---|---|---|---|---|\n")
    return head + "".join(
        f"| {r['name']} | {r['arch']} | {r['layers']} | {r['features']} | {r['parity']} | {r['score_error']:.1e} "
        f"| {r['policies']} | {r['blocks_left']} | {r['sliding']} | {r['note']} |\n" for r in rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--doc", default="docs/architectures.md")
    ap.add_argument("--gemma3", action="store_true", help="add Gemma 3 270M (fp32 IR, 10 prompts of 20-1200 tokens)")
    args = ap.parse_args()
    rows = []
    for name in TINY_ARCHS:
        parity_prompts = [matrix.prompt_ids(n, seed=i) for i, n in enumerate(matrix.PARITY_LENGTHS)]
        score_prompts = [matrix.prompt_ids(n, seed=i) for i, n in enumerate(matrix.SCORE_LENGTHS)]
        rows.append(row(name, prepare(name, "fp32"), hf_dir(name), parity_prompts, score_prompts, 24))
        print(rows[-1], file=sys.stderr, flush=True)
    if args.gemma3:
        lengths = np.geomspace(20, 1200, 10).astype(int)
        parity_prompts = [matrix.prompt_ids(int(n), seed=i, vocab=200000) for i, n in enumerate(lengths)]
        score_prompts = [matrix.prompt_ids(n, seed=i, vocab=200000) for i, n in enumerate((12, 300, 700))]
        rows.append(row("gemma3-270m", prepare("gemma3-270m", "fp32"), hf_dir("gemma3-270m"),
                        parity_prompts, score_prompts, 24))
        print(rows[-1], file=sys.stderr, flush=True)
    text = table(rows)
    readme = Path(args.doc)
    body = readme.read_text()
    if BEGIN not in body or END not in body:
        raise SystemExit(f"{readme} has no {BEGIN} ... {END} markers")
    command = "python scripts/arch_matrix.py" + " --gemma3" * args.gemma3
    body = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END),
                  lambda _: f"{BEGIN}\n<!-- generated by `{command}`; do not edit by hand -->\n{text}{END}",
                  body, flags=re.S)
    readme.write_text(body)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
