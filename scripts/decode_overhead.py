"""Per-step cost of a batched decode step: Python overhead (everything outside `infer`) vs model time.

Runs N requests (random prompt ids, full cache, greedy, ignore EOS) through LLMEngine, waits until every
prompt is prefilled, then times the pure decode steps: the whole `step()`, the model's `infer()`, and the
engine's parts (scheduling, input building, sampling/stop/stream, eviction hooks, bookkeeping). Prints
medians in ms per step. Run it against two checkouts (PYTHONPATH) to compare code versions on one load.

--native also times openvino-genai's ContinuousBatchingPipeline.step() on the same prompts, in the same
process. Besides wall time it prints the process CPU time per step (all threads): on a shared 2-core
machine the wall time of a two-thread infer depends on how often the other load preempts one thread,
which differs run to run; the CPU time is the work done, and is what a quiet machine turns into time.

    PYTHONPATH=. python scripts/decode_overhead.py --model smollm2-135m --concurrency 8,32 [--native] [--profile]
"""
from __future__ import annotations

import argparse
import cProfile
import functools
import io
import json
import os
import pstats
import time
from collections import defaultdict

import numpy as np

from kvcrush_ov.core.config import GenerationConfig, SchedulerConfig
from kvcrush_ov.core.engine.llm_engine import LLMEngine

# (owner attribute path, method name, label); whichever exist in this code version are timed
_PARTS = [
    ("scheduler", "schedule", "schedule"),
    ("scheduler", "postprocess", "postprocess"),
    ("runner.kv", "copy_blocks", "copy_blocks"),
    ("runner", "run", "inputs+infer"),
    ("evictor", "observe", "evict.observe"),
    ("evictor", "maybe_evict", "evict.maybe"),
    ("", "_sample", "emit"),  # (newer code: the whole step's sampling; older code: _emit per sequence)
    ("", "_emit", "emit"),
    ("", "_emit_batch", "emit"),
    ("", "_drop_finished", "drop_finished"),
]


class _Timer:
    def __init__(self) -> None:
        self.acc: dict[str, float] = defaultdict(float)

    def wrap(self, fn, label):
        @functools.wraps(fn)
        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.acc[label] += time.perf_counter() - t
        return timed


class _TimedRequest:
    """Forwards to the InferRequest, timing infer()."""

    def __init__(self, request, timer: _Timer) -> None:
        self._request, self._timer = request, timer

    def infer(self, *a, **k):
        t = time.perf_counter()
        try:
            return self._request.infer(*a, **k)
        finally:
            self._timer.acc["infer"] += time.perf_counter() - t

    def __getattr__(self, name):
        return getattr(self._request, name)


def _resolve(obj, path: str):
    for name in filter(None, path.split(".")):
        obj = getattr(obj, name, None)
    return obj


def measure(engine: LLMEngine, concurrency: int, prompt_tokens: int, new_tokens: int, seed: int,
            profile: bool, stream: bool = False) -> dict:
    timer = _Timer()
    rng = np.random.default_rng(seed)
    vocab = engine.runner.vocab_size or 32000
    cfg = GenerationConfig(max_new_tokens=new_tokens, ignore_eos=True)
    seqs = [engine.add_request(rng.integers(100, vocab, prompt_tokens).tolist(), cfg,
                               streamer=[].append if stream else None) for _ in range(concurrency)]
    while any(s.num_computed < s.num_prompt_tokens for s in seqs):
        engine.step()
    saved = []
    labels = set()
    for owner_path, name, label in _PARTS:
        owner = _resolve(engine, owner_path)
        if owner is not None and hasattr(owner, name) and label not in labels:
            labels.add(label)
            saved.append((owner, name, owner.__dict__.get(name)))
            setattr(owner, name, timer.wrap(getattr(owner, name), label))
    import kvcrush_ov.core.engine.llm_engine as module
    if hasattr(module, "after_tokens"):  # stop checks + streaming, once per step (older code: inside _emit)
        saved.append((module, "after_tokens", module.after_tokens))
        module.after_tokens = timer.wrap(module.after_tokens, "stop+stream")
    request = engine.runner.request
    engine.runner.request = _TimedRequest(request, timer)
    rows = []
    prof = cProfile.Profile() if profile else None
    try:
        while engine.has_unfinished:
            timer.acc.clear()
            if prof:
                prof.enable()
            t, cpu = time.perf_counter(), time.process_time()
            engine.step()
            total, cpu = time.perf_counter() - t, time.process_time() - cpu
            tm = time.perf_counter()
            engine.metrics()  # what `bench` calls after every step (peak KV bytes)
            metrics = time.perf_counter() - tm
            if prof:
                prof.disable()
            st = engine.last_step
            if st is not None and st.num_prefill_tokens == 0 and st.num_decode_seqs == concurrency:
                row = dict(timer.acc)
                row["step"] = total
                row["step cpu (all threads)"] = cpu
                row["bench.metrics"] = metrics
                rows.append(row)
    finally:
        engine.runner.request = request
        for owner, name, own in saved:
            if own is None:
                delattr(owner, name)
            else:
                setattr(owner, name, own)
    keys = sorted({k for r in rows for k in r})
    med = {k: 1e3 * float(np.median([r.get(k, 0.0) for r in rows])) for k in keys}
    if "inputs+infer" in med:
        med["inputs (run - infer)"] = 1e3 * float(np.median([r.get("inputs+infer", 0) - r.get("infer", 0) for r in rows]))
    med["python (step - infer)"] = 1e3 * float(np.median([r["step"] - r.get("infer", 0.0) for r in rows]))
    parts = ("schedule", "postprocess", "copy_blocks", "inputs+infer", "evict.observe", "evict.maybe", "emit",
             "stop+stream", "drop_finished")
    med["other in step"] = 1e3 * float(np.median([r["step"] - sum(r.get(p, 0.0) for p in parts) for r in rows]))
    out = {"concurrency": concurrency, "steps": len(rows), "ms": med}
    if prof:
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(25)
        out["profile"] = s.getvalue()
    return out


def measure_native(cb, concurrency: int, prompt_tokens: int, new_tokens: int, seed: int, vocab: int) -> dict:
    """openvino-genai's ContinuousBatchingPipeline on the same prompts: median ms of its whole step() over
    the pure decode steps (every request already has its first token and gets one more in the step)."""
    import openvino as ov
    import openvino_genai as ov_genai
    rng = np.random.default_rng(seed)
    gc = ov_genai.GenerationConfig()
    gc.max_new_tokens, gc.ignore_eos, gc.apply_chat_template = new_tokens, True, False
    handles = [cb.add_request(i, ov.Tensor(rng.integers(100, vocab, (1, prompt_tokens)).astype(np.int64)), gc)
               for i in range(concurrency)]
    got = [0] * concurrency
    steps = []
    while cb.has_non_finished_requests():
        started = all(got)
        t, cpu = time.perf_counter(), time.process_time()
        cb.step()
        total, cpu = time.perf_counter() - t, time.process_time() - cpu
        new = [0] * concurrency
        for i, h in enumerate(handles):
            if h.can_read():
                for out in h.read().values():
                    new[i] += len(out.generated_ids)
        got = [g + n for g, n in zip(got, new)]
        if started and all(n == 1 for n in new):
            steps.append((total, cpu))
    wall, cpu = np.median(steps, axis=0) if steps else (np.nan, np.nan)
    return {"concurrency": concurrency, "steps": len(steps),
            "ms": {"native step": 1e3 * float(wall), "native step cpu (all threads)": 1e3 * float(cpu)}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--concurrency", default="8,32")
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--cache-size", type=float, default=1.0)
    ap.add_argument("--stream", action="store_true", help="every request streams text (detokenized each step)")
    ap.add_argument("--profile", action="store_true", help="also print the cProfile top of the decode steps")
    ap.add_argument("--native", action="store_true",
                    help="also time openvino-genai's step() on the same prompts, in this process, after ours")
    ap.add_argument("--label", default="", help="printed with the results (e.g. before / after)")
    ap.add_argument("--json", default="", help="append the results as one JSON line to this file")
    args = ap.parse_args()
    from kvcrush_ov.cli import _model_dir
    from kvcrush_ov.api.pipeline import Tokenizer
    model_dir = _model_dir(args.model)
    engine = LLMEngine(model_dir, scheduler_config=SchedulerConfig(cache_size=args.cache_size),
                       decode=Tokenizer(model_dir).decode)
    engine.add_request([1, 2, 3, 4], GenerationConfig(max_new_tokens=4, ignore_eos=True))  # warm-up
    while engine.has_unfinished:
        engine.step()
    cb = None
    if args.native:
        import openvino_genai as ov_genai
        from kvcrush_ov.api.native import to_native_scheduler
        cb = ov_genai.ContinuousBatchingPipeline(str(model_dir), to_native_scheduler(SchedulerConfig(
            cache_size=args.cache_size)), "CPU", {})
        measure_native(cb, 1, 4, 4, seed=99, vocab=engine.runner.vocab_size or 32000)  # warm-up
    results = []
    for i, c in enumerate(int(x) for x in args.concurrency.split(",")):
        r = measure(engine, c, args.prompt_tokens, args.new_tokens, seed=i, profile=args.profile, stream=args.stream)
        if cb is not None:
            nat = measure_native(cb, c, args.prompt_tokens, args.new_tokens, seed=i, vocab=engine.runner.vocab_size or 32000)
            r["ms"].update(nat["ms"])
            r["ms"]["step / native step"] = r["ms"]["step"] / nat["ms"]["native step"]
            r["ms"]["step cpu / native step cpu"] = (r["ms"]["step cpu (all threads)"]
                                                     / nat["ms"]["native step cpu (all threads)"])
            r["native_steps"] = nat["steps"]
        results.append(r)
        print(f"\n[{args.label}] {c} requests{' streaming' * args.stream}, {r['steps']} decode steps, median ms/step "
              f"(load {os.getloadavg()[0]:.2f}):")
        for k, v in sorted(r["ms"].items(), key=lambda kv: -kv[1]):
            print(f"  {k:24s} {v:8.3f}")
        if args.profile:
            print(r["profile"])
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps({"label": args.label, "stream": args.stream, "results": [{k: v for k, v in r.items() if k != "profile"}
                                                                 for r in results]}) + "\n")


if __name__ == "__main__":
    main()
