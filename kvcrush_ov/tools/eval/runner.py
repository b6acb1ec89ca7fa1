"""Run a suite under several eviction policies and budgets, and openvino-genai's native eviction.

Every row runs the path `LLMPipeline.generate` runs with the same CacheEvictionConfig (by default
prefill="auto": evicted after the whole prompt when the KV pool can hold it, memory-bounded when it
cannot). Rows on the after-prompt path share one prefill: our engine prefills each sample ONCE (full
cache, the reference) and forks each such (policy, budget) from the shared prefix blocks
(copy-on-write); the fork evicts at the same point, with the same queries and keys, as the request
would alone. Rows on the memory-bounded path (the prompt is too long for the pool, or a variant forces
`prefill=chunked`) run their own request. A second, teacher-forced run per configuration follows the
full-cache continuation to measure NLL/KL (none when the full cache cannot hold the prompt).
Native policies (`native-snapkv`, `native-kvcrush`) run openvino_genai's ContinuousBatchingPipeline with
its own CacheEvictionConfig at the same total KV tokens (its KVCrush blocks counted inside the budget).
Per-sample results are cached in OUT/samples/ so an interrupted run resumes where it stopped.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ...core.config import GenerationConfig, SchedulerConfig
from ...core.engine.stopping import final_text
from ...core.errors import ConfigError
from ...core.eviction_config import PREFILL_MODES, CacheEvictionConfig

# eval variants may set them
PREFILL_OPTIONS = ("prefill", "prefill_chunk", "prefill_window", "prefill_scores", "prefill_pool_back", "scores",
                   "expected_future", "expected_value_norm", "decode_slack")
from ...core.options import parse_policy_spec as parse_policy
from ...core.policies import POLICIES, defaults, make_policy
from .metrics import exact_match_rate, rouge_l, score
from .report import plot, report_markdown, summarize
from .paired import check_reference
from .teacher import FullCacheReference
from .suite import Sample

NATIVE = {"native-snapkv": "snapkv", "native-kvcrush": "kvcrush-block"}
ALL_POLICIES = tuple(POLICIES) + tuple(NATIVE)


@dataclass
class EvalConfig:
    policies: list[str]
    budgets: list[float]          # < 1: fraction of each prompt's length; >= 1: tokens
    device: str = "CPU"
    cache_size: float = 1.0
    policy_options: dict | None = None  # {policy: {option: value}} for our policies
    seed: int = 0
    kv_precision: str | None = None     # None: the device's default
    budget_bytes: bool = False          # budgets are KV bytes per sequence (equal-bytes comparison)
    properties: dict | None = None      # OpenVINO compile properties (e.g. INFERENCE_PRECISION_HINT)
    reference: str | None = None        # summary rows get paired differences to this policy (paired.py)
    num_kv_blocks: int = 0              # KV pool in blocks (overrides cache_size): prompts beyond it run memory-bounded

    def __post_init__(self) -> None:
        check_reference(self.reference, self.policies)
        unknown = [p for p in self.policies if parse_policy(p)[0] not in ALL_POLICIES]
        if unknown or not self.policies:
            raise ConfigError(f"unknown policy(ies) {unknown}; choose from {', '.join(ALL_POLICIES)}")
        bad = [b for b in self.budgets if not (isinstance(b, (int, float)) and b > 0)]
        if bad or not self.budgets:
            raise ConfigError(f"budgets must be > 0 (fractions of the prompt below 1, tokens from 1), got {bad or self.budgets}")

    def key(self, model_dir: Path) -> str:
        """Identifies cached per-sample results: a change of model or settings recomputes them."""
        fields = [str(model_dir), self.device, self.policy_options, self.seed]
        if self.kv_precision or self.budget_bytes or self.properties:
            fields += [self.kv_precision, self.budget_bytes, self.properties]
        if self.num_kv_blocks:
            fields += [self.num_kv_blocks]
        blob = json.dumps(fields, sort_keys=True, default=str)
        return hashlib.sha1(blob.encode()).hexdigest()[:12]


def budget_tokens(budget: float, prompt_len: int, minimum: int) -> int:
    tokens = int(budget * prompt_len) if budget < 1 else int(budget)
    return max(tokens, minimum)


def sample_ids(tokenizer, sample: Sample) -> list[int]:
    """Prompt ids as a user of openvino_genai would build them, plus the sample's answer prefix."""
    if sample.chat and tokenizer.has_chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": sample.prompt}], True)
        return tokenizer.encode(text + sample.answer_prefix, add_special_tokens=False)
    return tokenizer.encode(sample.prompt + sample.answer_prefix, add_special_tokens=True)


class Runner:
    def __init__(self, model_dir: Path, config: EvalConfig, out_dir: Path) -> None:
        from ...core.engine.llm_engine import LLMEngine
        from ...api.pipeline import Tokenizer

        self.model_dir, self.config, self.out_dir = Path(model_dir), config, Path(out_dir)
        self.tokenizer = Tokenizer(self.model_dir)
        # What a cached row was computed with: a policy whose resolved settings (e.g. tuned defaults)
        # changed is recomputed, the others are reused.
        self.signatures, per_layer = {}, False
        for spec in config.policies:
            name, options, prefill = self._spec(spec)
            if name in NATIVE or name == "full":
                self.signatures[spec] = "native" if name in NATIVE else "full"
                continue
            policy = make_policy(name, **options)
            self.signatures[spec] = repr(policy) + (f" {prefill}" if prefill else "")
            per_layer |= policy.per_layer_budgets
        self.engine = LLMEngine(self.model_dir, config.device,
                                SchedulerConfig(cache_size=config.cache_size, num_kv_blocks=config.num_kv_blocks,
                                                kv_cache_precision=config.kv_precision),
                                config.properties, decode=self.tokenizer.decode, enable_eviction=True,
                                eos_token_ids=frozenset({self.tokenizer.eos_token_id}), per_layer_lengths=per_layer)
        self.bytes_per_token = self.engine.kv_bytes_per_token
        self.cache_dir = self.out_dir / "samples" / config.key(self.model_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.timing = {"prefill_s": 0.0, "fanout_decode_s": 0.0, "runs": 0}
        self.precision = self.engine.kv_precision

    def _spec(self, spec: str) -> tuple[str, dict, dict]:
        """'kvcrush:anchors=alternate;prefill=chunked' -> (name, policy options, eviction options). Without
        prefill options a row runs the default path; a variant naming prefill=... forces that mode."""
        name, variant = parse_policy(spec)
        options = {**(self.config.policy_options or {}).get(name, {}), **variant}
        eviction = {k: options.pop(k) for k in PREFILL_OPTIONS if k in options}
        if eviction.get("prefill", "auto") not in PREFILL_MODES:
            raise ConfigError(f"policy variant {spec!r}: prefill must be one of {', '.join(PREFILL_MODES)}")
        return name, options, eviction

    def _tokens(self, budget: float, prompt_len: int, minimum: int) -> int:
        if self.config.budget_bytes:
            return max(int(budget) // self.bytes_per_token, minimum)
        return budget_tokens(budget, prompt_len, minimum)

    # -- our engine: one prefill, every after-prompt row forked from it ---------------------------------
    def _ours(self, sample: Sample, ids: list[int]) -> list[dict]:
        engine, cfg = self.engine, GenerationConfig(max_new_tokens=sample.max_new_tokens,
                                                    eos_token_id=self.tokenizer.eos_token_id)
        t0 = time.perf_counter()
        plans = {}  # (policy spec, budget) -> (tokens, CacheEvictionConfig, its EvictionPlan for this prompt)
        for policy in self.config.policies:
            name, options, eviction = self._spec(policy)
            if name in NATIVE or name == "full":
                continue
            for budget in self.config.budgets:
                tokens = self._tokens(budget, len(ids), make_policy(name, **options).protected_tokens)
                ev = CacheEvictionConfig(name, budget=tokens, options=options, **eviction)
                plans[(policy, budget)] = (tokens, ev, engine.plan_for(len(ids), cfg, ev))
        # The full cache is the reference (and the parent of the forks) when the pool can hold it. A fork
        # is the request it stands for only if nothing preempts it: fork while the pool holds the
        # reference's peak and every fork (and its teacher-forced twin) once evicted; run the rest alone.
        has_full = engine.fits_pool(len(ids), cfg, None)
        room = engine.blocks.num_blocks - engine.blocks.blocks_for(len(ids) + cfg.max_new_tokens)
        forked = {}
        for key, (tokens, ev, plan) in plans.items():
            need = 2 * engine.blocks_after_eviction(plan, len(ids))
            if has_full and plan.path == "after_prompt" and need <= room:
                forked[key], room = plans[key], room - need
        reference = FullCacheReference() if has_full else None
        parent, t_prefill = None, 0.0
        if has_full:
            parent = engine.add_request(ids, cfg, eviction=None, logits_observer=reference.observe,
                                        query_window=max([ev.window for _, ev, _ in forked.values()], default=0),
                                        query_stats=any(ev.uses_expected for _, ev, _ in forked.values()))
            while parent.num_generated == 0 and not parent.is_finished:
                engine.step()
            t_prefill = time.perf_counter() - t0
        runs = {}  # key -> (tokens, free request, forced run, start, prefill seconds)
        for key, (tokens, ev, _) in forked.items():
            if parent.is_finished:  # one-token answer: nothing to fork, every policy saw the full prompt
                runs[key] = (tokens, parent, None, t0, t_prefill)
                continue
            t_fork = time.perf_counter()
            free = engine.fork(parent, cfg, ev)
            forced_run = reference.forced_run()
            engine.fork(parent, cfg, ev, token_source=forced_run.next_token, logits_observer=forced_run.observe)
            runs[key] = (tokens, free, forced_run, t_fork, t_prefill)
        t1 = time.perf_counter()
        while engine.has_unfinished:
            engine.step()
        t_end = time.perf_counter()
        self.timing["prefill_s"] += t_prefill
        self.timing["fanout_decode_s"] += t_end - t1
        self.timing["runs"] += int(has_full) + 2 * len(forked)
        # Memory-bounded rows (and forks the pool had no room for) run alone, as LLMPipeline would run them,
        # forced against the full cache's finished continuation when there is one.
        for key, (tokens, ev, _) in plans.items():
            if key in forked:
                continue
            free = engine.add_request(ids, cfg, eviction=ev)
            forced_run = None
            if reference is not None:
                forced_run = reference.forced_run()
                engine.add_request(ids, cfg, eviction=ev, token_source=forced_run.next_token,
                                   logits_observer=forced_run.observe)
            runs[key] = (tokens, free, forced_run, free.arrival, None)
        while engine.has_unfinished:
            engine.step()
        full_text = self._text(parent) if parent is not None else None
        full_nll = reference.nll(parent.output_ids) if parent is not None else None
        rows = []
        if "full" in self.config.policies and parent is not None:
            for budget in self.config.budgets:
                rows.append(self._row(sample, ids, "full", budget, len(ids), full_text, full_text,
                                      parent.metrics.peak_decode_kv_slots, t_end - t0,
                                      (full_nll, None if full_nll is None else 0.0))
                            | {"peak_kv_bytes": int(parent.metrics.peak_kv_slots * self.bytes_per_token),
                               "prefill_s": float(t_prefill), "eviction_mode": parent.eviction_mode})
        for (policy, budget), (tokens, free, forced_run, start, shared_prefill) in runs.items():
            end = max(free.token_times[-1] if free.token_times else start, start)
            nll_kl = ((full_nll, 0.0) if free is parent else
                      (None, None) if forced_run is None else (forced_run.nll, forced_run.kl))
            prefill_s = shared_prefill if shared_prefill is not None else (free.first_token_time or end) - start
            rows.append(self._row(sample, ids, policy, budget, tokens, self._text(free), full_text,
                                  free.metrics.peak_decode_kv_slots, (shared_prefill or 0.0) + end - start, nll_kl)
                        | {"peak_kv_bytes": int(free.metrics.peak_kv_slots * self.bytes_per_token),
                           "prefill_s": float(prefill_s), "eviction_mode": plans[(policy, budget)][2].path})
        return rows

    def _text(self, seq) -> str:
        return final_text(seq, self.tokenizer.decode)  # the text LLMPipeline would give

    def _row(self, sample: Sample, ids, policy, budget, tokens, text, full_text, kv_slots, latency, nll_kl) -> dict:
        return {"id": sample.id, "task": sample.task, "length": sample.length, "prompt_tokens": len(ids),
                "kv_precision": self.precision, "signature": self.signatures[policy],
                "policy": policy, "budget": budget, "budget_tokens": int(min(tokens, len(ids))),
                "prediction": text, "score": score(text, sample.answers, sample.metric),
                "exact_match_full": None if full_text is None else exact_match_rate([text], [full_text]),
                "rouge_l_full": None if full_text is None else 100 * rouge_l(text, full_text),
                "nll": nll_kl[0], "kl": nll_kl[1], "kv_bytes": int(round(kv_slots * self.bytes_per_token)),
                "latency_s": float(latency)}

    # -- openvino-genai's native eviction ---------------------------------------------------------
    def _native(self, sample: Sample, ids: list[int], full_text: str | None) -> list[dict]:
        import openvino as ov
        import openvino_genai as ov_genai

        from ...api.native import to_native_eviction

        rows = []
        for policy in self.config.policies:
            name, variant = parse_policy(policy)
            if name not in NATIVE:
                continue
            for budget in self.config.budgets:
                ours = CacheEvictionConfig(NATIVE[name], budget=self._tokens(budget, len(ids), 128),
                                           options={"window": defaults.SNAPKV_WINDOW, "sink_tokens": defaults.SINK_TOKENS,
                                                    "recent_tokens": defaults.RECENT_TOKENS, **variant})
                sc = ov_genai.SchedulerConfig()
                sc.cache_size = max(1, int(round(self.config.cache_size)))
                if len(ids) > ours.budget:
                    sc.use_cache_eviction = True
                    sc.cache_eviction_config = to_native_eviction(ours, self.engine.block_size)
                props = {**(self.config.properties or {}), "KV_CACHE_PRECISION": self.precision}  # equal bytes/token
                t0 = time.perf_counter()
                cb = ov_genai.ContinuousBatchingPipeline(str(self.model_dir), sc, self.config.device, props)
                gc = ov_genai.GenerationConfig()
                gc.max_new_tokens = sample.max_new_tokens
                gc.apply_chat_template = False
                out = cb.generate([ov.Tensor(np.array([ids], dtype=np.int64))], [gc])[0].m_generation_ids[0]
                latency = time.perf_counter() - t0
                out = [t for t in out if t != self.tokenizer.eos_token_id]
                text = self.tokenizer.decode(out)
                rows.append(self._row(sample, ids, policy, budget, ours.budget, text, full_text,
                                      min(len(ids), ours.budget) + len(out), latency, (None, None)))
        return rows

    def run_sample(self, sample: Sample) -> list[dict]:
        cached = self.cache_dir / f"{hashlib.sha1(sample.id.encode()).hexdigest()[:16]}.json"
        want = {(p, b) for p in self.config.policies for b in self.config.budgets}
        is_native = lambda policy: parse_policy(policy)[0] in NATIVE  # noqa: E731
        rows = json.loads(cached.read_text()) if cached.is_file() else []
        for r in rows:  # rows cached before these fields existed
            r.setdefault("kv_precision", self.precision)
        valid = [r for r in rows if (r["policy"], r["budget"]) in want
                 and r.get("signature", "native" if is_native(r["policy"]) else None) == self.signatures[r["policy"]]]
        have = {(r["policy"], r["budget"]) for r in valid}
        ours_missing = any(k not in have for k in want if not is_native(k[0]))
        native_missing = any(k not in have for k in want if is_native(k[0]))
        if ours_missing or native_missing:
            ids = sample_ids(self.tokenizer, sample)
            if ours_missing:
                valid = [r for r in valid if is_native(r["policy"])] + self._ours(sample, ids)
            if native_missing:
                full_text = next((r["prediction"] for r in valid if r["policy"] == "full"), None)
                if full_text is None:
                    full_text = self._full_text(sample, ids)
                valid = [r for r in valid if not is_native(r["policy"])] + self._native(sample, ids, full_text)
            cached.write_text(json.dumps(valid))
        return valid

    def _full_text(self, sample: Sample, ids: list[int]) -> str | None:
        cfg = GenerationConfig(max_new_tokens=sample.max_new_tokens, eos_token_id=self.tokenizer.eos_token_id)
        if not self.engine.fits_pool(len(ids), cfg, None):
            return None  # the pool cannot hold the full cache: no reference text
        seq = self.engine.add_request(ids, cfg, eviction=None)
        while self.engine.has_unfinished:
            self.engine.step()
        return self._text(seq)


def run_eval(model_dir: Path, samples: list[Sample], config: EvalConfig, out_dir: Path, meta: dict,
             progress: bool = True, kv_precisions: list[str | None] | None = None) -> dict:
    """kv_precisions: run the whole grid once per KV cache precision (equal-bytes comparisons)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    t = {"prefill_s": 0.0, "fanout_decode_s": 0.0, "runs": 0}
    for precision in kv_precisions or [config.kv_precision]:
        runner = Runner(model_dir, replace(config, kv_precision=precision), out_dir)
        for sample in tqdm(samples, desc=f"eval ({runner.precision} KV)", disable=not progress, unit="sample"):
            rows += runner.run_sample(sample)
        t = {k: t[k] + v for k, v in runner.timing.items()}
    summary = summarize(rows, config.policies, config.budgets, config.reference)
    n_prefills = max(1, len({(r["id"], r["kv_precision"]) for r in rows}))
    fanout = None
    if t["runs"]:
        per_prefill = t["prefill_s"] / n_prefills
        separate = t["runs"] / n_prefills * t["prefill_s"] + t["fanout_decode_s"]
        fanout = {**t, "saving_s": separate - (t["prefill_s"] + t["fanout_decode_s"]),
                  "saving_fraction": 1 - (t["prefill_s"] + t["fanout_decode_s"]) / separate, "prefill_s_per_sample": per_prefill}
    meta = {**meta, "model": str(model_dir), "n_samples": len(samples), "config": asdict(config), "fanout": fanout,
            "kv_precisions": sorted({r["kv_precision"] for r in rows})}
    result = {"summary": summary, "meta": meta, "samples": rows}
    (out_dir / "results.json").write_text(json.dumps(result, indent=1))
    (out_dir / "report.md").write_text(report_markdown(summary, meta))
    plot(summary, out_dir / "plot.png")
    return result
