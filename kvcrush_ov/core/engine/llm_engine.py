"""The add_request / step / abort loop that ties scheduler, runner, sampler and block manager together.

Data flows one way each step: scheduler (what runs) -> block copies -> model runner (logits) ->
sampler (tokens) -> stop checks / streaming -> finished sequences leave and free their blocks.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..config import GenerationConfig, SchedulerConfig
from ..errors import CacheCapacityError, ConfigError, KVCrushError, PromptError
from ..eviction_config import DEFAULT_EVICTION, CacheEvictionConfig, RequestEviction, is_default
from .eviction import EvictionPlan, Evictor
from .model_runner import ModelRunner
from .sampler import greedy_batch, sample, token_logprobs
from .scheduler import Scheduler
from .sequence import FinishReason, LogitsObserver, Sequence, Status, TokenSource
from .stopping import Decode, after_tokens


def token_logprob(row: np.ndarray, token: int) -> float:
    """log p(token) under one logits row (see sampler.token_logprobs; openvino_genai's scores sum these)."""
    return float(token_logprobs(row[None], np.array([token]))[0])


@dataclass
class StepStats:
    num_tokens: int
    num_prefill_tokens: int
    num_decode_seqs: int
    seconds: float


@dataclass(frozen=True)
class EngineMetrics:
    """A snapshot of what the engine holds (for benchmarks and a server's /metrics)."""

    running: int                 # requests holding KV blocks
    waiting: int                 # requests queued (new, or preempted to be recomputed)
    kv_blocks_total: int         # blocks per layer in the pool
    kv_blocks_used: int          # blocks in use in the fullest layer
    kv_bytes_used: int           # bytes of the blocks in use, all layers
    evictions: int               # since the engine started
    tokens_evicted: int          # per layer, summed over evictions
    eviction_seconds: float
    preemptions: int


class LLMEngine:
    def __init__(self, model_dir: str | Path, device: str = "CPU", scheduler_config: SchedulerConfig | None = None,
                 properties: dict | None = None, decode: Decode | None = None,
                 eos_token_ids: frozenset[int] = frozenset(), enable_eviction: bool = False,
                 per_layer_lengths: bool | None = None) -> None:
        """enable_eviction: build for per-request eviction even without a default cache_eviction_config.
        per_layer_lengths: let layers hold different lengths (PyramidKV); default: only when the default
        policy needs it."""
        self.config = SchedulerConfig.from_any(scheduler_config)
        requested = self.config.cache_eviction_config  # ours, or openvino_genai's (translated below)
        evicting = enable_eviction or requested is not None
        if per_layer_lengths is None:  # (openvino_genai's translate to policies with equal layer lengths)
            per_layer_lengths = (isinstance(requested, CacheEvictionConfig)
                                 and requested.resolved_policy.per_layer_budgets)
        if evicting:  # compaction moves token rows: u8 keys must be quantized per token, not per block
            properties = {"KEY_CACHE_QUANT_MODE": "BY_TOKEN", **(properties or {})}
        options = dict(model_dir=model_dir, device=device, properties=properties, evicting=evicting,
                       per_layer_lengths=bool(per_layer_lengths))
        self.runner = self._make_runner(precision=self.config.kv_cache_precision, **options)
        if evicting and self.config.kv_cache_precision is None and not self.runner.layout.token_rows:
            # a device whose quantized keys stay per block: fall back to f16, which every CPU offers
            self.runner = self._make_runner(precision="f16", **options)
        self.blocks = self.runner.make_block_manager()
        self.evictor = Evictor(self.runner, self.blocks)
        # openvino_genai's configs count in blocks: translated with this device's block size
        eviction = CacheEvictionConfig.from_any(requested, self.runner.block_size)
        self.scheduler = Scheduler(self.blocks, self.config.max_num_batched_tokens, self.config.max_num_seqs)
        self.default_eviction = None if eviction is None else self.evictor.plan(eviction)
        self.decode = decode
        self.eos_token_ids = eos_token_ids
        self._ids = itertools.count()
        self.sequences: dict[int, Sequence] = {}
        self.last_step: StepStats | None = None
        self.num_preemptions = 0
        self._probes: dict[int, Sequence] = {}  # probe seq_id -> the request it scores for (internal)
        self._held: dict[int, Sequence] = {}  # requests waiting for their first read (reread) to finish

    def _make_runner(self, *, model_dir, device, properties, precision, evicting, per_layer_lengths) -> ModelRunner:
        return ModelRunner(model_dir, device, cache_size_gb=self.config.cache_size,
                           num_kv_blocks=self.config.num_kv_blocks, kv_cache_precision=precision,
                           properties=properties, expose_queries=evicting, per_layer_lengths=per_layer_lengths)

    # -- requests ----------------------------------------------------------------------------------
    def add_request(self, prompt_ids: list[int] | np.ndarray, config: GenerationConfig,
                    streamer: Callable[[str], Any] | None = None, eviction: RequestEviction = DEFAULT_EVICTION, *,
                    query_window: int = 0, token_source: TokenSource | None = None,
                    logits_observer: LogitsObserver | None = None, query_stats: bool = False) -> Sequence:
        """eviction: DEFAULT_EVICTION ("default": the scheduler config's), None (full cache) or a CacheEvictionConfig.

        query_window: keep this many newest queries even if this request never evicts, because forks
        of it will (fan-out of one prefill to several policies); query_stats: likewise keep the running query
        statistics forks scored by expected attention need. token_source / logits_observer: see
        sequence.py (a caller's hooks, e.g. to replay a known continuation and measure it)."""
        try:
            arr = np.asarray(prompt_ids)
        except ValueError:  # ragged nesting
            arr = np.asarray([None])
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise PromptError(f"prompt token ids must be a flat list of integers, got {str(arr.dtype)} values; "
                              f"tokenize text first")
        ids = arr.reshape(-1).tolist()
        if not ids:
            raise PromptError("the prompt is empty: give at least one token")
        vocab = self.runner.vocab_size
        if vocab and not 0 <= min(ids) <= max(ids) < vocab:
            bad = next(t for t in ids if not 0 <= t < vocab)
            raise PromptError(f"token id {bad} is outside the model's vocabulary [0, {vocab})")
        config.validate()
        max_pos = self.runner.max_position
        if max_pos and len(ids) + config.max_new_tokens > max_pos:
            raise PromptError(f"prompt ({len(ids)} tokens) + max_new_tokens ({config.max_new_tokens}) exceeds the "
                              f"model's maximum position {max_pos}; shorten the prompt or lower max_new_tokens")
        plan = self._for_prompt(self._plan(eviction), len(ids), config)
        self._check_fits(len(ids), config, plan)
        eos = frozenset({config.eos_token_id}) if config.eos_token_id >= 0 else self.eos_token_ids
        seq = Sequence(next(self._ids), ids, len(ids), config, eos_token_ids=eos, streamer=streamer,
                       arrival=time.perf_counter(), eviction=plan, query_window=self._query_window(plan, query_window),
                       token_source=token_source, logits_observer=logits_observer,
                       query_stats=query_stats or (plan is not None and plan.query_stats))
        self.sequences[seq.seq_id] = seq
        if plan is not None and plan.probe and len(ids) > plan.budget + plan.prefill_chunk:
            if plan.reread:  # read the prompt once, bounded, for its tail's queries; then for real
                self._held[seq.seq_id] = seq
                self._add_probe(seq, whole=True)
                return seq
            self._add_probe(seq)
        self.scheduler.add(seq)
        return seq

    def _add_probe(self, seq: Sequence, whole: bool = False) -> None:
        """Run the prompt's last `window` tokens alone first, at their true positions: their queries
        judge the compactions inside the prompt, before the prompt's real end is reached.

        whole: run the whole prompt first instead, memory-bounded and scored by such a probe of its
        own, and keep its last `window` queries: they have read the (compacted) document, as the
        question's queries will, where a tail run alone has read nothing (about twice the prefill)."""
        w = min(seq.eviction.prefill_window, len(seq.token_ids))
        once = GenerationConfig(max_new_tokens=1, ignore_eos=True)
        if whole:
            probe = Sequence(next(self._ids), list(seq.token_ids), seq.num_prompt_tokens, once,
                             eviction=replace(seq.eviction, reread=False), query_window=w, arrival=seq.arrival)
        else:
            probe = Sequence(next(self._ids), seq.token_ids[-w:], w, once,
                             position_offset=len(seq.token_ids) - w, query_window=w, arrival=seq.arrival)
        self._probes[probe.seq_id] = seq
        self.sequences[probe.seq_id] = probe
        if whole:  # its own probe goes first, so it is done before the first compaction it scores
            self._add_probe(probe)
        self.scheduler.add(probe)

    def _for_prompt(self, plan: EvictionPlan | None, num_prompt: int, config: GenerationConfig) -> EvictionPlan | None:
        """Decide an "auto" plan's prefill mode from the request and the pool's size (never the momentary
        load): after the whole prompt when the pool can ever hold it, memory-bounded only when it cannot."""
        if plan is None or plan.prefill != "auto":
            return plan
        after = plan.bounded(False)
        if self.fits_pool(num_prompt, config, after):
            return after
        if not plan.prefill_chunk:
            raise self.evictor.no_chunk_error(plan)
        return plan.bounded(True)

    def _query_window(self, plan: EvictionPlan | None, asked: int) -> int:
        if asked and not self.runner.softmax_scales:
            raise ConfigError("query_window needs an engine built for eviction (enable_eviction=True)")
        return max(plan.query_window if plan is not None else 0, asked)

    def plan_for(self, num_prompt: int, config: GenerationConfig,
                 eviction: RequestEviction = DEFAULT_EVICTION) -> EvictionPlan | None:
        """The plan a request of this length would run with (its eviction_mode decided), without adding it."""
        return self._for_prompt(self._plan(eviction), num_prompt, config)

    def fits_pool(self, num_prompt: int, config: GenerationConfig, plan: EvictionPlan | None) -> bool:
        """Whether the pool can ever hold such a request alone (else preemption could never make room)."""
        return self._blocks_needed(num_prompt, config, plan) <= self.blocks.num_blocks

    def _blocks_needed(self, num_prompt: int, config: GenerationConfig, plan: EvictionPlan | None) -> int:
        return self.blocks.blocks_for(self.scheduler.footprint(num_prompt, config.max_new_tokens, plan))

    def blocks_after_eviction(self, plan: EvictionPlan, num_tokens: int) -> int:
        """Blocks a sequence of num_tokens holds in its fullest layer once evicted (a block of growth included)."""
        keep = int(np.max(plan.policy.layer_budgets(self.runner.num_layers, plan.budget, num_tokens)))
        return self.blocks.blocks_for(min(num_tokens, keep) + self.blocks.block_size)

    def _check_fits(self, num_prompt: int, config: GenerationConfig, plan: EvictionPlan | None) -> None:
        need = self._blocks_needed(num_prompt, config, plan)
        if need > self.blocks.num_blocks:
            bs = self.blocks.block_size
            hint = "raise cache_size/num_kv_blocks"
            fits = (self.blocks.num_blocks * bs - bs - min(self.config.max_num_batched_tokens, 4 * bs)) // bs * bs
            if plan is None and fits >= 128:
                hint += (f", or enable eviction with a budget of at most ~{fits} tokens (e.g. "
                         f"CacheEvictionConfig('kvcrush', budget={fits}), `--policy kvcrush --budget {fits}`)")
            elif plan is not None and not plan.during_prefill:
                hint += " or let eviction bound the prompt (CacheEvictionConfig(prefill='auto'))"
            raise CacheCapacityError(
                f"one request needs {need} KV blocks ({num_prompt} prompt + {config.max_new_tokens} new tokens) but "
                f"the pool has {self.blocks.num_blocks}; {hint}")

    def _plan(self, eviction: RequestEviction) -> EvictionPlan | None:
        if is_default(eviction):
            return self.default_eviction
        config = CacheEvictionConfig.from_any(eviction, self.runner.block_size)
        return None if config is None else self.evictor.plan(config)

    def fork(self, parent: Sequence, config: GenerationConfig | None = None, eviction: RequestEviction = None, *,
             token_source: TokenSource | None = None, logits_observer: LogitsObserver | None = None) -> Sequence:
        """A new request continuing `parent` from where it stands, sharing its KV blocks copy-on-write.

        Used to fan one prefill out to several policies/budgets: fork right after the prompt is done
        (the parent holds the full cache); each child evicts to its own budget before its first decode.
        """
        if parent.is_finished or parent.status is not Status.RUNNING or parent.num_uncomputed != 1:
            raise KVCrushError("fork a running sequence between steps, once its prompt is processed")
        config = config or parent.config
        plan = self._for_prompt(self._plan(eviction), parent.num_prompt_tokens, config)
        if plan is not None and plan != parent.eviction and self.evictor.has_evicted(parent):
            raise KVCrushError("fork with a different eviction plan before the parent evicts (e.g. from a "
                               "full-cache parent), or with the parent's own plan")
        if plan is not None and plan.window > parent.query_window:
            raise KVCrushError(f"the fork scores {plan.window} queries but the parent kept {parent.query_window}; "
                               f"add the parent with query_window >= {plan.window}")
        if plan is not None and plan.query_stats and not parent.query_stats:
            raise KVCrushError("the fork scores with expected attention but the parent kept no query statistics; "
                               "add the parent with query_stats=True")
        self._check_fits(parent.num_prompt_tokens, config, plan)
        child = Sequence(next(self._ids), list(parent.token_ids), parent.num_prompt_tokens, config,
                         eos_token_ids=parent.eos_token_ids, arrival=time.perf_counter(), status=Status.RUNNING,
                         num_computed=parent.num_computed, eviction=plan,
                         query_window=max(plan.query_window if plan is not None else 0, parent.query_window),
                         query_stats=parent.query_stats,
                         token_source=token_source, logits_observer=logits_observer,
                         first_token_time=parent.first_token_time,
                         cumulative_logprob=parent.cumulative_logprob)
        child.metrics.peak_kv_slots = self.blocks.cache_len(parent.seq_id)
        self.blocks.fork(parent.seq_id, child.seq_id)
        self.evictor.fork(parent, child)
        # The child evicts now, where a request of its own would have (after its whole prompt); if the pool
        # has no room for the private copies that needs, it would decode over budget first: refuse instead.
        if not self.evictor.maybe_evict(child) and self.evictor.is_due(child):
            self.blocks.free(child.seq_id)
            self.evictor.drop(child)
            raise CacheCapacityError(f"no free KV blocks to fork now: the fork must copy the blocks it keeps "
                                     f"({self.blocks.blocks_for(plan.budget)} per layer, "
                                     f"{self.blocks.num_free_blocks} free); fork when the pool has room, or add "
                                     f"the request on its own")
        self.sequences[child.seq_id] = child
        self.scheduler.add(child)
        return child

    def abort(self, seq_id: int, error: str | None = None) -> None:
        """Stop a request now and free its blocks at once (error: why, when a failure ends it)."""
        seq = self.sequences.get(seq_id)
        if seq is not None and not seq.is_finished:
            seq.finish(FinishReason.ABORT, error)
            self._drop_finished()

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_work

    def metrics(self) -> EngineMetrics:
        seqs = self.scheduler.seqs
        running = sum(1 for s in seqs if s.status is Status.RUNNING)
        used = self.blocks.num_blocks - self.blocks.num_free_blocks
        st = self.evictor.stats
        return EngineMetrics(running=running, waiting=len(seqs) - running, kv_blocks_total=self.blocks.num_blocks,
                             kv_blocks_used=used, kv_bytes_used=self.blocks.num_used_blocks * self.runner.layout.bytes_per_layer_block,
                             evictions=st.evictions, tokens_evicted=st.tokens_evicted, eviction_seconds=st.seconds,
                             preemptions=self.num_preemptions)

    @property
    def kv_bytes_per_token(self) -> int:
        """KV bytes one token slot costs, all layers, scales included."""
        return self.runner.bytes_per_block_all_layers // self.runner.block_size

    @property
    def kv_precision(self) -> str:
        """The KV cache precision the device compiled (one of KV_PRECISIONS)."""
        return self.runner.layout.precision

    @property
    def block_size(self) -> int:
        return self.runner.block_size

    # -- one step ----------------------------------------------------------------------------------
    def step(self) -> list[Sequence]:
        """Run one batch; return the sequences that finished in it."""
        t0 = time.perf_counter()
        out = self.scheduler.schedule()
        for seq in out.preempted:
            self.evictor.drop(seq)
        self.num_preemptions += len(out.preempted)
        if not out.chunks:
            if self.scheduler.has_work:
                raise KVCrushError("no request could be scheduled (KV pool too small for any waiting request)")
            return []
        self.runner.kv.copy_blocks(out.block_copies)
        logits = self.runner.run(out.chunks, self.blocks)
        sampling = [c.seq for c in out.chunks if c.samples]  # logits rows, in chunk order
        n_prefill = sum(c.num_tokens for c in out.chunks if c.num_tokens > 1 or not c.samples)
        n_decode = sum(1 for c in out.chunks if c.num_tokens == 1 and c.samples)
        self.evictor.observe(out.chunks)
        self.scheduler.postprocess(out)
        after_tokens(self._sample(sampling, logits, time.perf_counter()), self.decode)
        # KV peaks of every scheduled sequence from one [L, S] array; an eviction changes only its own.
        lens = self.blocks.lens_of([c.seq.seq_id for c in out.chunks])
        for c, peak, mean in zip(out.chunks, lens.max(axis=0).tolist(), lens.mean(axis=0).tolist()):
            seq, m = c.seq, c.seq.metrics
            m.peak_kv_slots = max(m.peak_kv_slots, peak)  # what the sequence held before it evicts
            if seq.eviction is not None and self.evictor.maybe_evict(seq):
                mean = float(self.blocks.layer_lens(seq.seq_id).mean())
            if seq.num_computed >= seq.num_prompt_tokens:
                m.peak_decode_kv_slots = max(m.peak_decode_kv_slots, mean)  # layers may differ
        self.last_step = StepStats(out.num_tokens, n_prefill, n_decode, time.perf_counter() - t0)
        return self._drop_finished()

    def _sample(self, sampling: list[Sequence], logits: np.ndarray, now: float) -> list[Sequence]:
        """Give each sampling sequence its next token (logits row i is sampling[i]'s); return those that
        got one, in the order stop checks and streaming see them.

        The common request (greedy, no hook, no EOS held back) costs one argmax and one log-prob call for
        the whole batch, then an append; the others go through _emit one by one."""
        greedy = greedy_batch(logits)
        plain = np.fromiter((s.token_source is None and s.logits_observer is None and not s.config.do_sample
                             and (not s.eos_token_ids or s.num_generated >= s.config.min_new_tokens)
                             for s in sampling), dtype=bool, count=len(sampling))
        logprobs = np.zeros(len(sampling))
        if plain.any():
            rows = np.flatnonzero(plain)
            logprobs[rows] = token_logprobs(logits, greedy[rows], rows)
        tokens, logprobs, plain = greedy.tolist(), logprobs.tolist(), plain.tolist()
        order = range(len(sampling))
        if any(s.token_source is not None for s in sampling):  # a source may follow what others produced now
            order = sorted(order, key=lambda i: sampling[i].token_source is not None)
        emitted = []
        for i in order:
            seq = sampling[i]
            if plain[i] and not seq.is_finished:
                seq.append_token(tokens[i], logprobs[i], now)
            elif plain[i] or not self._emit(seq, logits[i], tokens[i], now):
                continue
            emitted.append(seq)
        return emitted

    def _emit(self, seq: Sequence, row: np.ndarray, greedy: int, now: float) -> bool:
        """Choose the sequence's next token from its logits row (or its token source; greedy: the row's
        argmax); False if it got none (stop checks and streaming follow for all at once: stopping.after_tokens)."""
        if seq.is_finished:
            return False
        if seq.logits_observer is not None:
            seq.logits_observer(seq, row)
        if seq.token_source is not None:
            token = seq.token_source(seq)
            if token is None:  # the source has nothing more: the request is done
                seq.finish(FinishReason.LENGTH)
                return False
        else:
            suppress = seq.eos_token_ids if seq.num_generated < seq.config.min_new_tokens else frozenset()
            token = greedy if not seq.config.do_sample and not suppress else sample(row, seq.config, seq.rng, suppress)
        seq.append_token(token, token_logprob(row, token), now)
        return True

    def _drop_finished(self) -> list[Sequence]:
        """Free finished sequences' blocks and forget them (the caller keeps its own references)."""
        for probe_id, target in list(self._probes.items()):  # a probe lives only as long as its request
            if target.is_finished and not self.sequences[probe_id].is_finished:
                self.sequences[probe_id].finish(FinishReason.ABORT)
        visible = []
        for s in self.scheduler.remove_finished():
            self.sequences.pop(s.seq_id, None)
            target = self._probes.pop(s.seq_id, None)
            if target is not None:
                self.evictor.take_probe(s, target)
                if self._held.pop(target.seq_id, None) is not None:  # its first read is done
                    if target.is_finished:  # aborted meanwhile
                        self.sequences.pop(target.seq_id, None)
                        visible.append(target)
                    else:
                        self.scheduler.add(target)
            else:
                visible.append(s)
            self.evictor.drop(s)
        return visible
