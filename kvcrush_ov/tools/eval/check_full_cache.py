"""Measure what the FULL-cache model scores on each ruler-mini task; write README_TASKS.md.

    python -m kvcrush_ov.tools.eval.check_full_cache [--model-dir DIR] [--lengths 1024,2048] [--n 4]
                                               [--tasks niah_single,vt] [--out PATH]
                                               [--preds PATH [--resume]]

Drives openvino_genai.LLMPipeline directly (greedy, no cache eviction), so the numbers are the
ceiling any KV-compression policy is measured against. Formatting a Sample into model input follows
suite.py: chat template applied here, then the answer prefix, with apply_chat_template=False.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import sys
import time

from kvcrush_ov.core.errors import ConfigError, ModelError
from kvcrush_ov.tools.eval.metrics import mean_and_ci, score
from kvcrush_ov.tools.eval.ruler_mini import DEFAULT_TASKS, FAITHFULNESS_TASKS, ruler_mini

DEFAULT_MODEL = os.path.expanduser("~/.cache/kvcrush-ov/models/smollm2-135m-fp16")
NOTES = """
## Design choices measured on SmolLM2-135M-Instruct (full cache, 1024 tokens, 4 samples)

- Every task puts the question after the haystack and gives the assistant turn an answer prefix
  ("The pass key is"); without them the 135M model rambles.
- niah_multikey uses 4 keys (a colour + an object each, distinct objects); earlier lookups among
  60 similar facts failed, 4 works.
- cwe was resized: RULER's shape (several common words, "the top 3") scored 17 (it lists the first
  words of the list or synonyms); one common word at 15% of the entries scored 25, at 30% scored 50
  (an un-numbered comma-separated list: 17). Now: one word at 30%, numbered list, 9 new tokens.
  At 4096 tokens it fails anyway (answers "bowl"): use cwe at 1k-2k.
- niah_multivalue (3 values of one key) moved from natural text (25; 2 values: 50, all-or-nothing)
  to noise filler (42, graded): the model lists numbers it saw, so partial credit is informative.
- vt keeps RULER's single chain (2 hops, 3 variables) in noise; 1 hop scored about the same. With
  one chain, every VAR name in the prompt is an answer, so it is multi-needle retrieval of names.
- fwe keeps Zipf(2) coded words, top 3 asked: the dominant word is usually found (partial credit).
- Scores with `contains` give partial credit per answer (multivalue, multiquery, vt, fwe).
"""

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "README_TASKS.md")


def model_input(tokenizer, sample) -> str:
    """The exact text fed to the model for `sample` (chat template + answer prefix)."""
    if sample.chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": sample.prompt}],
                                             add_generation_prompt=True)
    else:
        text = sample.prompt
    return text + sample.answer_prefix


def load_pipeline(model_dir: str, device: str = "CPU"):
    for f in ("openvino_model.xml", "openvino_tokenizer.xml", "openvino_detokenizer.xml"):
        if not os.path.isfile(os.path.join(model_dir, f)):
            raise ModelError(f"{model_dir} has no {f}; build the IR first or pass --model-dir")
    import openvino_genai

    return openvino_genai.LLMPipeline(model_dir, device)


def input_key(text: str, sample) -> str:
    """Identifies a generation: the exact model input and the token budget."""
    return hashlib.sha256(f"{sample.max_new_tokens}\0{text}".encode()).hexdigest()[:16]


def run(pipe, samples, log=print, done=None, sink=None):
    """Generate and score each sample. `done`: {id: row} from an earlier run, reused when the model
    input is unchanged; `sink(row)` is called for every new row (e.g. to append it to a file)."""
    import openvino_genai

    tok = pipe.get_tokenizer()
    rows = []
    for s in samples:
        text = model_input(tok, s)
        key = input_key(text, s)
        old = (done or {}).get(s.id)
        if old is not None and old.get("input_key") == key:
            rows.append(old)
            continue
        cfg = openvino_genai.GenerationConfig()
        cfg.max_new_tokens = s.max_new_tokens
        cfg.do_sample = False
        cfg.apply_chat_template = False
        n_in = tok.encode(text, add_special_tokens=False).input_ids.shape[1]
        t0 = time.perf_counter()
        out = str(pipe.generate(text, cfg))
        dt = time.perf_counter() - t0
        sc = score(out, s.answers, s.metric)
        rows.append(dict(id=s.id, task=s.task, length=s.length, input_tokens=n_in, seconds=dt,
                         score=sc, output=out, answers=s.answers, input_key=key))
        if sink is not None:
            sink(rows[-1])
        log(f"{s.id:28s} in={n_in:5d} {dt:5.1f}s score={sc:5.1f} out={out.strip()[:70]!r} "
            f"ans={s.answers[:3]}")
    return rows


def table(rows) -> str:
    groups = collections.OrderedDict()
    for r in rows:
        groups.setdefault((r["task"], r["length"]), []).append(r)
    lines = ["| task | length | n | full-cache score (mean ± 95% CI) | mean input tokens | s/sample |",
             "|---|---:|---:|---:|---:|---:|"]
    for (task, length), rs in groups.items():
        m, ci = mean_and_ci([r["score"] for r in rs])
        ci_s = "" if ci != ci else f" ± {ci:.0f}"
        tok = sum(r["input_tokens"] for r in rs) / len(rs)
        sec = sum(r["seconds"] for r in rs) / len(rs)
        lines.append(f"| {task} | {length} | {len(rs)} | {m:.1f}{ci_s} | {tok:.0f} | {sec:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", default=DEFAULT_MODEL)
    ap.add_argument("--device", default="CPU")
    ap.add_argument("--lengths", default="1024,2048")
    ap.add_argument("--n", type=int, default=4, help="samples per task and length")
    ap.add_argument("--tasks", default=",".join(DEFAULT_TASKS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=DEFAULT_OUT, help="markdown file to write ('-' for stdout only)")
    ap.add_argument("--preds", default=None, help="also write per-sample outputs as JSONL here")
    ap.add_argument("--resume", action="store_true",
                    help="reuse rows of --preds whose model input is unchanged; run only the rest")
    args = ap.parse_args(argv)
    try:
        lengths = tuple(int(x) for x in args.lengths.split(","))
        tasks = tuple(t for t in args.tasks.split(",") if t)
        pipe = load_pipeline(args.model_dir, args.device)
        tok = pipe.get_tokenizer()
        count = lambda text: tok.encode(text, add_special_tokens=False).input_ids.shape[1]  # noqa: E731
        samples = ruler_mini(count, lengths=lengths, samples_per_task=args.n, seed=args.seed, tasks=tasks)
    except (ConfigError, ModelError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    done = {}
    if args.resume and args.preds and os.path.isfile(args.preds):
        with open(args.preds, encoding="utf-8") as f:
            done = {r["id"]: r for r in map(json.loads, filter(str.strip, f))}
    sink_file = open(args.preds + ".partial", "w", encoding="utf-8") if args.preds else None

    def sink(row):
        sink_file.write(json.dumps(row, ensure_ascii=False) + "\n")
        sink_file.flush()

    rows = run(pipe, samples, log=lambda m: print(m, flush=True), done=done,
               sink=sink if sink_file else None)
    md = table(rows)
    print(md)
    if args.preds:
        sink_file.close()
        with open(args.preds, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        os.remove(args.preds + ".partial")
    if args.out != "-":
        faith = ", ".join(t for t in FAITHFULNESS_TASKS if t in tasks)
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(f"""# ruler-mini: what the full cache scores

Measured with `python -m kvcrush_ov.tools.eval.check_full_cache --lengths {args.lengths} --n {args.n} --seed {args.seed}`
on `{os.path.basename(os.path.normpath(args.model_dir))}` ({args.device}, greedy, full KV cache,
{sum(r["seconds"] for r in rows):.0f} s of generation in all). Scores are 0-100 per task metric; CI by normal approximation
over the n samples. "input tokens" include the chat template and answer prefix.

{md}
""")
            f.write(NOTES)
            if faith:
                f.write(f"""
The faithfulness tasks ({faith}) are scored here by ROUGE-L against a weak reference (covered
modules' one-line summaries; the true next 40 words). Their real use is to compare a compressed run's
output with the full-cache output (`metrics.exact_match_rate`, `metrics.mean_rouge_l`).
""")
    return 0


if __name__ == "__main__":
    sys.exit(main())
