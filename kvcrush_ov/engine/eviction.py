"""Decides WHAT STAYS: when a sequence outgrows its budget, ask the policy for keep-sets and compact.

Flow per step (called by the engine after the model ran):
  observe(chunks)   keep each sequence's newest W post-RoPE queries per layer (a small ring buffer)
  maybe_evict(seq)  when the prompt is done and the cache holds more than the budget (and later, during
                    decoding, each time it has grown a block past it): score the W queries against the
                    cached keys per head, ask the policy, move kept slots to the front, free the tail.
Policies see only numpy arrays (AttentionStats); this file is the only bridge to the KV tensors.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np
from threadpoolctl import ThreadpoolController

from ..errors import ConfigError
from ..eviction_config import DEFAULT_ACCUMULATION_WINDOW, CacheEvictionConfig
from ..policies import AttentionStats, Policy
from .attention_scores import window_scores
from .block_manager import BlockManager
from .model_runner import ModelRunner
from .scheduler import ScheduledChunk
from .sequence import Sequence


_BLAS = ThreadpoolController()


@dataclass(frozen=True)
class EvictionPlan:
    """A sequence's resolved eviction settings (immutable; forks may carry different plans)."""

    policy: Policy
    budget: int
    window: int               # newest queries scored per head at each eviction (0: no scores needed)
    during_decode: bool

    @classmethod
    def from_config(cls, config: CacheEvictionConfig) -> "EvictionPlan":
        return cls(config.make_policy(), config.budget, config.window, config.evict_during_decode)


@dataclass
class EvictionState:
    """Per sequence; dropped when the sequence is preempted (it will be prefilled again)."""

    queries: np.ndarray | None = None       # [L, <=W, Hq, hd], newest last
    accumulated: np.ndarray | None = None   # [L, Hq, slots] for accumulating policies (H2O)
    targets: np.ndarray | None = None       # [L] slots each layer keeps, set by the first eviction
    num_evictions: int = 0
    tokens_evicted: int = 0
    seconds: float = 0.0

    def copy(self) -> "EvictionState":
        return replace(self, queries=None if self.queries is None else self.queries.copy(),
                       accumulated=None if self.accumulated is None else self.accumulated.copy())


@dataclass
class EvictionStats:
    evictions: int = 0
    seconds: float = 0.0
    tokens_evicted: int = 0  # KV slots freed, per layer on average (summed over sequences)


class Evictor:
    def __init__(self, runner: ModelRunner, blocks: BlockManager) -> None:
        self.runner = runner
        self.blocks = blocks
        self.stats = EvictionStats()

    def plan(self, config: CacheEvictionConfig) -> EvictionPlan:
        """Validate a config against this engine (pool, context, cache precision) and resolve it."""
        plan = EvictionPlan.from_config(config)
        bs = self.runner.block_size
        if plan.budget + bs > self.blocks.num_blocks * bs:
            raise ConfigError(f"eviction budget {plan.budget} (+ one block of growth) does not fit the KV pool of "
                              f"{self.blocks.num_blocks} blocks; lower the budget or raise cache_size")
        if self.runner.max_position and plan.budget > self.runner.max_position:
            raise ConfigError(f"eviction budget {plan.budget} exceeds the model's context ({self.runner.max_position} "
                              f"tokens); use a budget below it")
        if plan.window:
            if not self.runner.softmax_scales:
                raise ConfigError("this engine was built without eviction support; pass a cache_eviction_config "
                                  "in SchedulerConfig (or enable_eviction=True) when creating it")
            self.runner.kv.require_token_rows("eviction with attention scores")
        return plan

    @staticmethod
    def state(seq: Sequence) -> EvictionState:
        if seq.kv_state is None:
            seq.kv_state = EvictionState()
        return seq.kv_state

    # -- every step --------------------------------------------------------------------------------
    def observe(self, chunks: list[ScheduledChunk]) -> None:
        """Keep the newest W queries of each scheduled sequence that may evict."""
        if not self.runner.softmax_scales:
            return  # built without query outputs: no sequence can evict with scores
        per_layer = None
        begin = 0
        for c in chunks:
            end = begin + c.num_tokens
            # Full-cache and score-free (streaming) sequences keep queries too: a fork of them may evict
            # with a policy that scores (fan-out evaluation).
            window = (c.seq.eviction.window if c.seq.eviction is not None else 0) or DEFAULT_ACCUMULATION_WINDOW
            if window:
                if per_layer is None:
                    per_layer = [self.runner.queries(layer) for layer in range(self.runner.num_layers)]
                rows = np.stack([q[max(begin, end - window):end] for q in per_layer])  # [L, r, Hq, hd]
                st = self.state(c.seq)
                st.queries = rows if st.queries is None else np.concatenate([st.queries, rows], axis=1)[:, -window:]
            begin = end

    def maybe_evict(self, seq: Sequence) -> bool:
        plan = seq.eviction
        if plan is None or seq.is_finished or seq.num_computed < seq.num_prompt_tokens:
            return False  # never during prefill: the prompt's own window decides
        st = self.state(seq)
        if st.targets is None:
            over = seq.cache_len > plan.budget
        else:  # during decoding, a block's worth past its target in any layer
            over = plan.during_decode and bool(
                (seq.layer_lens(self.runner.num_layers) >= st.targets + self.runner.block_size).any())
        if not over:
            return False
        # Compaction first gives the sequence private copies of blocks it shares with a fork; when the
        # pool has no room for them, wait (retried every step; the scheduler preempts to free blocks).
        keep = st.targets if seq.layer_offsets is not None else plan.policy.layer_budgets(
            self.runner.num_layers, plan.budget, seq.cache_len)
        if not self.blocks.can_make_private(seq.seq_id, int(np.max(keep))):
            return False
        t0 = time.perf_counter()
        # Many small matmuls: multi-threaded OpenBLAS contends with OpenVINO's threads (measured 70 ms
        # vs 2.5 ms single-threaded for one layer's scores at 4k tokens).
        with _BLAS.limit(limits=1, user_api="blas"):
            self._evict(seq, plan, st)
        dt = time.perf_counter() - t0
        st.seconds += dt
        self.stats.seconds += dt
        self.stats.evictions += 1
        return True

    # -- one eviction ------------------------------------------------------------------------------
    def _scores(self, seq: Sequence, plan: EvictionPlan, st: EvictionState) -> np.ndarray:
        L, T = self.runner.num_layers, seq.cache_len
        hq = self.runner.num_q_heads
        if not plan.window:
            return np.zeros((L, hq, T), np.float32)
        tables = self.blocks.tables[seq.seq_id]
        scores = np.stack([
            window_scores(st.queries[layer, -plan.window:], self.runner.kv.read_keys(layer, tables[layer], T),
                          self.runner.softmax_scales[layer]) for layer in range(L)])
        if plan.policy.score_source != "accumulated":
            return scores
        if st.accumulated is None:
            st.accumulated = np.zeros((L, hq, T), np.float32)
        elif st.accumulated.shape[2] < T:  # slots added since the last eviction start from zero
            st.accumulated = np.pad(st.accumulated, ((0, 0), (0, 0), (0, T - st.accumulated.shape[2])))
        st.accumulated[:, :, :T] += scores
        return st.accumulated[:, :, :T]

    def _layer_mask(self, seq: Sequence, plan: EvictionPlan, st: EvictionState, layer: int,
                    num_slots: int, target: int) -> np.ndarray:
        """One layer on its own (layers hold different lengths after PyramidKV): [Hkv, num_slots]."""
        if plan.policy.score_source == "accumulated":
            raise ConfigError(f"policy {plan.policy.name!r} accumulates scores and cannot follow per-layer budgets")
        hq = self.runner.num_q_heads
        scores = np.zeros((hq, num_slots), np.float32)
        if plan.window:
            keys = self.runner.kv.read_keys(layer, self.blocks.tables[seq.seq_id][layer], num_slots)
            scores = window_scores(st.queries[layer, -plan.window:], keys, self.runner.softmax_scales[layer])
        return plan.policy.keep_mask(AttentionStats(scores[None], self.runner.num_kv_heads), int(target))[0]

    def _evict(self, seq: Sequence, plan: EvictionPlan, st: EvictionState) -> None:
        L, hkv = self.runner.num_layers, self.runner.num_kv_heads
        lens = seq.layer_lens(L)
        if seq.layer_offsets is None:  # all layers alike: one policy call over every layer
            masks = plan.policy.keep_mask(AttentionStats(self._scores(seq, plan, st), hkv), plan.budget)
        else:
            masks = [self._layer_mask(seq, plan, st, layer, lens[layer], st.targets[layer]) for layer in range(L)]
        kept = np.array([int(m[0].sum()) for m in masks])
        # A forked sequence shares blocks with its parent: compaction writes only into private ones.
        self.runner.kv.copy_blocks(self.blocks.make_private(seq.seq_id, int(kept.max())))
        tables = self.blocks.tables[seq.seq_id]
        T = seq.cache_len
        for layer in range(L):
            n = kept[layer]
            keep = np.nonzero(masks[layer])[1].reshape(hkv, n)  # sorted per head: time order kept
            self.runner.kv.compact(layer, tables[layer], keep)
            if st.accumulated is not None:
                g = st.accumulated.shape[1] // hkv
                acc = st.accumulated[layer, :, :T].reshape(hkv, g, T)
                st.accumulated[layer, :, :n] = np.take_along_axis(acc, keep[:, None, :], axis=2).reshape(-1, n)
        if st.accumulated is not None:
            st.accumulated = st.accumulated[:, :, :kept.max()].copy()
        self.blocks.trim(seq.seq_id, kept)
        st.tokens_evicted += int((lens - kept).sum()) // L
        self.stats.tokens_evicted += int((lens - kept).sum()) // L
        st.num_evictions += 1
        if st.targets is None:
            st.targets = kept
        seq.cache_len = int(kept.max())
        seq.layer_offsets = None if (kept == kept[0]).all() else seq.cache_len - kept
