"""The add_request / step / abort loop that ties scheduler, runner, sampler and block manager together.

Data flows one way each step: scheduler (what runs) -> block copies -> model runner (logits) ->
sampler (tokens) -> stop checks / streaming -> finished sequences leave and free their blocks.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..config import GenerationConfig, SchedulerConfig
from ..errors import CacheCapacityError, KVCrushError, PromptError
from ..eviction_config import CacheEvictionConfig
from .eviction import EvictionPlan, Evictor
from .model_runner import ModelRunner
from .sampler import greedy_batch, sample
from .scheduler import Scheduler
from .sequence import FinishReason, Sequence, Status

Decode = Callable[[list[int]], str]


def log_softmax(row: np.ndarray) -> np.ndarray:
    """float32 log-probabilities of one logits row (evaluation records them for NLL/KL)."""
    z = row.astype(np.float32) - row.max()
    return z - np.log(np.exp(z).sum(dtype=np.float64)).astype(np.float32)


@dataclass
class StepStats:
    num_tokens: int
    num_prefill_tokens: int
    num_decode_seqs: int
    seconds: float


@dataclass(frozen=True)
class EngineMetrics:
    """A snapshot of the engine's load (what a server exports on /metrics)."""

    running: int              # sequences holding KV blocks (prefilling or decoding)
    waiting: int              # queued, or preempted and waiting to be recomputed
    kv_blocks_total: int      # blocks per layer in the pool
    kv_blocks_used: int       # blocks in use in the fullest layer
    kv_blocks_free: int
    evictions: int            # eviction passes so far
    tokens_evicted: int       # KV slots freed by eviction so far (per layer)
    preemptions: int


class LLMEngine:
    def __init__(self, model_dir: str | Path, device: str = "CPU", scheduler_config: SchedulerConfig | None = None,
                 properties: dict | None = None, decode: Decode | None = None,
                 eos_token_ids: frozenset[int] = frozenset(), enable_eviction: bool = False) -> None:
        """enable_eviction: build for per-request eviction even without a default cache_eviction_config."""
        self.config = SchedulerConfig.from_any(scheduler_config)
        evicting = enable_eviction or self.config.cache_eviction_config is not None
        if evicting:  # compaction moves token rows: u8 keys must be quantized per token, not per block
            properties = {"KEY_CACHE_QUANT_MODE": "BY_TOKEN", **(properties or {})}
        self.runner = self._make_runner(model_dir, device, properties, self.config.kv_cache_precision, evicting)
        if evicting and self.config.kv_cache_precision is None and not self.runner.layout.token_rows:
            # a device whose quantized keys stay per block: fall back to f16, which every CPU offers
            self.runner = self._make_runner(model_dir, device, properties, "f16", evicting)
        self.blocks = self.runner.make_block_manager()
        self.evictor = Evictor(self.runner, self.blocks)
        eviction = CacheEvictionConfig.from_any(self.config.cache_eviction_config, self.runner.block_size)
        self.default_eviction = self.evictor.plan(eviction) if eviction is not None else None
        self.scheduler = Scheduler(self.blocks, self.config.max_num_batched_tokens, self.config.max_num_seqs)
        self.decode = decode
        self.eos_token_ids = eos_token_ids
        self._ids = itertools.count()
        self.sequences: dict[int, Sequence] = {}
        self.last_step: StepStats | None = None

    def _make_runner(self, model_dir, device, properties, precision, evicting) -> ModelRunner:
        return ModelRunner(model_dir, device, cache_size_gb=self.config.cache_size,
                           num_kv_blocks=self.config.num_kv_blocks, kv_cache_precision=precision,
                           properties=properties, expose_queries=evicting)

    # -- requests ----------------------------------------------------------------------------------
    def add_request(self, prompt_ids: list[int] | np.ndarray, config: GenerationConfig,
                    streamer: Callable[[str], Any] | None = None, eviction: Any = "default") -> Sequence:
        """eviction: "default" (the scheduler config's), None (full cache) or a CacheEvictionConfig."""
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
        plan = self._plan(eviction)
        self._check_fits(len(ids), config, plan)
        eos = frozenset({config.eos_token_id}) if config.eos_token_id >= 0 else self.eos_token_ids
        seq = Sequence(next(self._ids), ids, len(ids), config, eos_token_ids=eos, streamer=streamer,
                       arrival=time.perf_counter(), eviction=plan)
        self.sequences[seq.seq_id] = seq
        self.scheduler.add(seq)
        return seq

    def _check_fits(self, num_prompt: int, config: GenerationConfig, plan: EvictionPlan | None) -> None:
        """A request must fit the pool alone (else preemption could never make room for it)."""
        most = num_prompt + config.max_new_tokens
        if plan is not None:  # the whole prompt is in cache once, then at most budget + a block
            most = min(most, max(num_prompt + 1, plan.budget + self.blocks.block_size))
        need = self.blocks.blocks_for(most)
        if need > self.blocks.num_blocks:
            raise CacheCapacityError(
                f"one request needs {need} KV blocks ({num_prompt} prompt + {config.max_new_tokens} new tokens) but "
                f"the pool has {self.blocks.num_blocks}; raise cache_size/num_kv_blocks or enable eviction")

    def _plan(self, eviction: Any) -> EvictionPlan | None:
        if isinstance(eviction, str) and eviction == "default":
            return self.default_eviction
        config = CacheEvictionConfig.from_any(eviction, self.runner.block_size)
        return None if config is None else self.evictor.plan(config)

    def fork(self, parent: Sequence, config: GenerationConfig | None = None, eviction: Any = None,
             teacher: Sequence | None = None, record_logprobs: bool = False) -> Sequence:
        """A new request continuing `parent` from where it stands, sharing its KV blocks copy-on-write.

        Used to fan one prefill out to several policies/budgets: fork right after the prompt is done
        (the parent holds the full cache); each child evicts to its own budget before its first decode.
        """
        if parent.is_finished or parent.status is not Status.RUNNING or parent.num_uncomputed != 1:
            raise KVCrushError("fork a running sequence between steps, once its prompt is processed")
        plan, config = self._plan(eviction), config or parent.config
        if plan is not None and plan != parent.eviction and parent.kv_state is not None \
                and parent.kv_state.targets is not None:  # the child would inherit the parent's targets
            raise KVCrushError("fork with a different eviction plan before the parent evicts (e.g. from a "
                               "full-cache parent), or with the parent's own plan")
        self._check_fits(parent.num_prompt_tokens, config, plan)
        child = Sequence(next(self._ids), list(parent.token_ids), parent.num_prompt_tokens, config,
                         eos_token_ids=parent.eos_token_ids, arrival=time.perf_counter(), status=Status.RUNNING,
                         num_computed=parent.num_computed, cache_len=parent.cache_len,
                         eviction=plan, first_token_time=parent.first_token_time,
                         peak_cache_len=parent.cache_len,
                         layer_offsets=None if parent.layer_offsets is None else parent.layer_offsets.copy(),
                         kv_state=parent.kv_state.copy() if parent.kv_state is not None else None,
                         teacher=teacher, logprobs=[] if record_logprobs else None)
        self.blocks.fork(parent.seq_id, child.seq_id)
        self.sequences[child.seq_id] = child
        self.scheduler.add(child)
        self.evictor.maybe_evict(child)
        return child

    def abort(self, seq_id: int) -> None:
        """Stop a request now and free its blocks at once."""
        seq = self.sequences.get(seq_id)
        if seq is not None and not seq.is_finished:
            seq.finish(FinishReason.ABORT)
            self._drop_finished()

    def metrics(self) -> EngineMetrics:
        seqs = self.scheduler.seqs
        running = sum(1 for s in seqs if s.status is Status.RUNNING)
        free = self.blocks.num_free_blocks
        return EngineMetrics(running=running, waiting=len(seqs) - running, kv_blocks_total=self.blocks.num_blocks,
                             kv_blocks_used=self.blocks.num_blocks - free, kv_blocks_free=free,
                             evictions=self.evictor.stats.evictions, tokens_evicted=self.evictor.stats.tokens_evicted,
                             preemptions=self.scheduler.num_preemptions)

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_work

    # -- one step ----------------------------------------------------------------------------------
    def step(self) -> list[Sequence]:
        """Run one batch; return the sequences that finished in it."""
        t0 = time.perf_counter()
        out = self.scheduler.schedule()
        if not out.chunks:
            if self.scheduler.has_work:
                raise KVCrushError("no request could be scheduled (KV pool too small for any waiting request)")
            return []
        self.runner.kv.copy_blocks(out.block_copies)
        logits = self.runner.run(out.chunks, self.blocks)
        self.evictor.observe(out.chunks)
        sampling = [c.seq for c in out.chunks if c.samples]
        for c in out.chunks:
            c.seq.num_computed += c.num_tokens
            c.seq.cache_len += c.num_tokens
            c.seq.peak_cache_len = max(c.seq.peak_cache_len, c.seq.cache_len)
        greedy = greedy_batch(logits) if all(not s.config.do_sample for s in sampling) else None
        now = time.perf_counter()
        for row, seq in enumerate(sampling):
            if seq.teacher is not None and seq.num_generated >= len(seq.teacher.output_ids):
                seq.finish(FinishReason.LENGTH)  # the teacher's continuation is used up
                continue
            if seq.logprobs is not None:
                seq.logprobs.append(log_softmax(logits[row]))
            suppress = seq.eos_token_ids if seq.num_generated < seq.config.min_new_tokens else frozenset()
            if seq.teacher is not None:  # the teacher was sampled earlier in this loop (it arrived first)
                token = seq.teacher.output_ids[seq.num_generated]
            elif greedy is not None and not suppress:
                token = int(greedy[row])
            else:
                token = sample(logits[row], seq.config, seq.rng, suppress)
            seq.token_ids.append(token)
            if seq.first_token_time is None:
                seq.first_token_time = now
            seq.token_times.append(now)
            self._check_stop(seq, token)
            self._stream(seq)
        for c in out.chunks:
            self.evictor.maybe_evict(c.seq)
            if c.seq.num_computed >= c.seq.num_prompt_tokens:
                held = c.seq.cache_len if c.seq.layer_offsets is None else float(
                    c.seq.layer_lens(self.runner.num_layers).mean())  # PyramidKV: layers hold different lengths
                c.seq.peak_decode_cache_len = max(c.seq.peak_decode_cache_len, held)
        n_prefill = sum(c.num_tokens for c in out.chunks if c.num_tokens > 1 or not c.samples)
        self.last_step = StepStats(out.num_tokens, n_prefill, len(out.chunks) - sum(
            1 for c in out.chunks if c.num_tokens > 1 or not c.samples), time.perf_counter() - t0)
        return self._drop_finished()

    def _drop_finished(self) -> list[Sequence]:
        """Free finished sequences' blocks and forget them (the caller keeps its own references)."""
        done = self.scheduler.remove_finished()
        for s in done:
            self.sequences.pop(s.seq_id, None)
        return done

    # -- stopping and streaming ----------------------------------------------------------------------
    def _check_stop(self, seq: Sequence, token: int) -> None:
        cfg = seq.config
        if not cfg.ignore_eos and (token in seq.eos_token_ids or token in cfg.stop_token_ids) \
                and seq.num_generated >= cfg.min_new_tokens:
            seq.finish(FinishReason.STOP)
        elif cfg.stop_strings and self.decode is not None:
            seq.text = self.decode(seq.output_ids)
            tail = seq.text[max(0, seq.streamed_chars - max(map(len, cfg.stop_strings))):]
            hits = [(tail.find(s), s) for s in cfg.stop_strings if s in tail]
            if hits:
                pos, stop = min(hits)
                cut = len(seq.text) - len(tail) + pos
                seq.text = seq.text[:cut + (len(stop) if cfg.include_stop_str_in_output else 0)]
                seq.finish(FinishReason.STOP)
        if not seq.is_finished and seq.num_generated >= cfg.max_new_tokens:
            seq.finish(FinishReason.LENGTH)

    def _stream(self, seq: Sequence) -> None:
        if seq.streamer is None or self.decode is None:
            return
        if not (seq.is_finished and seq.config.stop_strings and seq.finish_reason is FinishReason.STOP):
            seq.text = self.decode(seq.output_ids)
        text = seq.text
        end = len(text)
        if not seq.is_finished:
            if text.endswith("\ufffd"):
                return  # an incomplete UTF-8 character: wait for the next token
            if seq.config.stop_strings:  # hold back what could be the start of a stop string
                end = max(seq.streamed_chars, end - max(map(len, seq.config.stop_strings)) + 1)
        piece = text[seq.streamed_chars:end]
        if not piece:
            return
        seq.streamed_chars = end
        try:
            status = seq.streamer(piece)
        except Exception as e:  # a broken streamer only ends its own request
            seq.finish(FinishReason.ABORT, error=f"streamer raised {type(e).__name__}: {e}")
            return
        if status is True or getattr(status, "name", "") in ("STOP", "CANCEL"):
            seq.finish(FinishReason.ABORT if getattr(status, "name", "") == "CANCEL" else FinishReason.STOP)
