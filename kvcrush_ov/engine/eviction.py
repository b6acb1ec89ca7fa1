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
from dataclasses import dataclass, field

import numpy as np

from ..errors import ConfigError
from ..eviction_config import CacheEvictionConfig
from ..policies import AttentionStats
from .attention_scores import window_scores
from .block_manager import BlockManager
from .model_runner import ModelRunner
from .scheduler import ScheduledChunk
from .sequence import Sequence


@dataclass
class EvictionState:
    """Per sequence; dropped when the sequence is preempted (it will be prefilled again)."""

    queries: np.ndarray | None = None       # [L, <=W, Hq, hd], newest last
    accumulated: np.ndarray | None = None   # [L, Hq, slots] for accumulating policies (H2O)
    compressed: bool = False
    num_evictions: int = 0
    tokens_evicted: int = 0
    seconds: float = 0.0


@dataclass
class EvictionStats:
    evictions: int = 0
    seconds: float = 0.0
    per_sequence: dict[int, EvictionState] = field(default_factory=dict)


class Evictor:
    def __init__(self, config: CacheEvictionConfig, runner: ModelRunner, blocks: BlockManager) -> None:
        self.config = config
        self.policy = config.make_policy()
        self.budget = config.budget
        self.window = config.window
        self.runner = runner
        self.blocks = blocks
        self.stats = EvictionStats()
        if self.budget + runner.block_size > blocks.num_blocks * runner.block_size:
            raise ConfigError(f"eviction budget {self.budget} (+ one block of growth) does not fit the KV pool of "
                              f"{blocks.num_blocks} blocks; lower the budget or raise cache_size")
        if runner.max_position and self.budget > runner.max_position:
            raise ConfigError(f"eviction budget {self.budget} exceeds the model's context ({runner.max_position} "
                              f"tokens); use a budget below it")
        if self.window:
            runner.kv.require_token_rows("eviction with attention scores")

    def state(self, seq: Sequence) -> EvictionState:
        if seq.kv_state is None:
            seq.kv_state = EvictionState()
            self.stats.per_sequence[seq.seq_id] = seq.kv_state
        return seq.kv_state

    # -- every step --------------------------------------------------------------------------------
    def observe(self, chunks: list[ScheduledChunk]) -> None:
        """Keep the newest W queries of each scheduled sequence (before their counters advance)."""
        if not self.window:
            return
        begin = 0
        per_layer = [self.runner.queries(layer) for layer in range(self.runner.num_layers)]
        for c in chunks:
            end = begin + c.num_tokens
            rows = np.stack([q[max(begin, end - self.window):end] for q in per_layer])  # [L, r, Hq, hd]
            st = self.state(c.seq)
            st.queries = rows if st.queries is None else np.concatenate([st.queries, rows], axis=1)[:, -self.window:]
            begin = end

    def maybe_evict(self, seq: Sequence) -> bool:
        if seq.is_finished or seq.num_computed < seq.num_prompt_tokens:
            return False  # never during prefill: the prompt's own window decides
        st = self.state(seq)
        over = seq.cache_len > self.budget if not st.compressed else (
            self.config.evict_during_decode and seq.cache_len >= self.budget + self.runner.block_size)
        if not over:
            return False
        t0 = time.perf_counter()
        self._evict(seq, st)
        dt = time.perf_counter() - t0
        st.seconds += dt
        self.stats.seconds += dt
        self.stats.evictions += 1
        return True

    # -- one eviction ------------------------------------------------------------------------------
    def _scores(self, seq: Sequence, st: EvictionState) -> np.ndarray:
        L, T = self.runner.num_layers, seq.cache_len
        hq = self.runner.num_q_heads
        if not self.window:
            return np.zeros((L, hq, T), np.float32)
        tables = self.blocks.tables[seq.seq_id]
        scores = np.stack([
            window_scores(st.queries[layer], self.runner.kv.read_keys(layer, tables[layer], T),
                          self.runner.softmax_scales[layer]) for layer in range(L)])
        if self.policy.score_source != "accumulated":
            return scores
        if st.accumulated is None:
            st.accumulated = np.zeros((L, hq, T), np.float32)
        elif st.accumulated.shape[2] < T:  # slots added since the last eviction start from zero
            st.accumulated = np.pad(st.accumulated, ((0, 0), (0, 0), (0, T - st.accumulated.shape[2])))
        st.accumulated[:, :, :T] += scores
        return st.accumulated[:, :, :T]

    def _evict(self, seq: Sequence, st: EvictionState) -> None:
        T = seq.cache_len
        hkv = self.runner.num_kv_heads
        mask = self.policy.keep_mask(AttentionStats(self._scores(seq, st), hkv), self.budget)  # [L, Hkv, T]
        kept = mask[0].sum(axis=-1)
        if not (mask.sum(axis=-1) == kept[0]).all():
            raise ConfigError(f"policy {self.policy.name!r} keeps different counts per layer; per-layer "
                              f"KV lengths are not supported by this engine build")
        n = int(kept[0])
        tables = self.blocks.tables[seq.seq_id]
        for layer in range(self.runner.num_layers):
            keep = np.nonzero(mask[layer])[1].reshape(hkv, n)  # sorted per head: time order kept
            self.runner.kv.compact(layer, tables[layer], keep)
            if st.accumulated is not None:
                g = st.accumulated.shape[1] // hkv
                acc = st.accumulated[layer, :, :T].reshape(hkv, g, T)
                st.accumulated[layer, :, :n] = np.take_along_axis(acc, keep[:, None, :], axis=2).reshape(-1, n)
        if st.accumulated is not None:
            st.accumulated = st.accumulated[:, :, :n].copy()
        self.blocks.trim(seq.seq_id, [n] * self.runner.num_layers)
        st.tokens_evicted += T - n
        st.num_evictions += 1
        st.compressed = True
        seq.cache_len = n
