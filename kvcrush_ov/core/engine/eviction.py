"""Decides WHAT STAYS: when a sequence outgrows its budget, ask the policy for keep-sets and compact.

Flow per step (called by the engine after the model ran):
  observe(chunks)   keep the newest W post-RoPE queries per layer of each sequence that may be scored
                    (its own plan's window, or the window its forks will need)
  maybe_evict(seq)  when the prompt is done and the cache holds more than the budget (and later, during
                    decoding, each time it has grown a block past it): score the W queries against the
                    cached keys per head, ask the policy, move kept slots to the front, free the tail.
Expected attention (prefill_scores / scores = "expected") instead scores with the running statistics of
every query seen (EvictionState.query_stats, folded in by observe), so no question is needed.
A sliding-window layer keeps its newest min(budget, window) slots whatever the policy: it cannot see
older tokens, so no budget goes there.
Policies see only numpy arrays (AttentionStats) and own whatever state they carry between evictions;
this file is the only bridge to the KV tensors and the only writer of eviction state.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from threadpoolctl import ThreadpoolController

from ..errors import ConfigError, KVCrushError
from ..eviction_config import PROBE_TOKENS, CacheEvictionConfig
from ..policies import AttentionStats, Policy
from .expected_attention import ExpectedOptions, QueryStats
from .block_manager import BlockManager
from .model_runner import ModelRunner
from .scheduler import ScheduledChunk
from .scorer import Scorer
from .sequence import Sequence


_BLAS = ThreadpoolController()


@dataclass(frozen=True)
class EvictionPlan:
    """A sequence's resolved eviction settings (immutable; forks may carry different plans)."""

    policy: Policy
    budget: int
    window: int               # newest queries scored per head at each eviction (0: no scores needed)
    during_decode: bool
    during_prefill: bool      # compact between prompt chunks (memory-bounded prefill); resolved per request
    prefill_chunk: int = 0    # prompt tokens added between two such compactions (0: no chunk fits the pool)
    prefill_window: int = 0   # queries scored at those compactions (resolved by Evictor.plan)
    probe: bool = False       # score those compactions with a probe of the prompt's tail instead
    reread: bool = False      # that probe is the tail of a first, memory-bounded read of the whole prompt
    prefill: str = "after"    # the configured mode: "auto" is resolved per request by LLMEngine
    prefill_expected: bool = False  # score those compactions with expected attention instead
    expected: bool = False    # score the prompt-end and decoding evictions with expected attention
    expected_options: ExpectedOptions = ExpectedOptions()
    prefill_policy: Policy | None = None  # the policy of compactions inside the prompt (None: `policy`)
    decode_slack: int = 0     # tokens (whole blocks) decoding may grow past one block over the target

    def decode_growth(self, block_size: int) -> int:
        """Slots a sequence that evicts while decoding may hold past its target before it evicts again."""
        return block_size + self.decode_slack

    @property
    def query_window(self) -> int:
        """Newest queries a sequence with this plan keeps for scoring."""
        return max(self.window, self.prefill_window if self.during_prefill else 0)

    @property
    def path(self) -> str:
        """Which path a request with this plan takes: evicted after its whole prompt, or memory-bounded."""
        return "memory_bounded" if self.during_prefill else "after_prompt"

    def bounded(self, during_prefill: bool) -> "EvictionPlan":
        """This plan with its prefill mode decided (a probe, or expected attention inside the prompt, only
        serves memory-bounded prefill)."""
        return replace(self, during_prefill=during_prefill, probe=self.probe and during_prefill,
                       reread=self.reread and during_prefill,
                       prefill_expected=self.prefill_expected and during_prefill)

    @property
    def query_stats(self) -> bool:
        """Whether a sequence with this plan keeps running query statistics (expected attention)."""
        return self.expected or (self.prefill_expected and self.during_prefill)


@dataclass
class EvictionState:
    """Per sequence; dropped when the sequence is preempted (it will be prefilled again)."""

    queries: np.ndarray | None = None       # [L, <=W, Hq, hd], newest last
    policy_state: Any = None                # what the policy carries between evictions (H2O: its sums)
    targets: np.ndarray | None = None       # [L] slots each layer keeps, set by the first eviction
    scored_prompt_end: bool = False         # an eviction has used the window at the prompt's end
    query_stats: QueryStats | None = None   # pre-RoPE query statistics (immutable: a fork may share them)

    def copy(self) -> "EvictionState":
        return replace(self, queries=None if self.queries is None else self.queries.copy())


def _newest(num_kv_heads: int, num_slots: int, n: int) -> np.ndarray:
    """Keep-mask [Hkv, num_slots] of the newest n slots: what a sliding-window layer keeps. It never
    sees a token older than its window, so no budget goes there, and its slots stay contiguous, so the
    kernel's window (counted in slots) stays the window in positions."""
    mask = np.zeros((num_kv_heads, num_slots), dtype=bool)
    mask[:, max(0, num_slots - n):] = True
    return mask


@dataclass
class EvictionStats:
    evictions: int = 0
    tokens_evicted: int = 0
    seconds: float = 0.0


class Evictor:
    def __init__(self, runner: ModelRunner, blocks: BlockManager) -> None:
        self.runner = runner
        self.blocks = blocks
        self.stats = EvictionStats()
        self._states: dict[int, EvictionState] = {}
        self._probes: dict[int, np.ndarray] = {}  # seq_id -> [L, W, Hq, hd] queries of its prompt's tail
        self.scorer = Scorer(runner)  # per-head scores: the window's queries, or expected attention

    def plan(self, config: CacheEvictionConfig) -> EvictionPlan:
        """Validate a config against this engine (pool, context, cache precision) and resolve it."""
        policy, budget, window = config.resolved_policy, config.budget, config.window
        bs, pool = self.runner.block_size, self.blocks.num_blocks * self.runner.block_size
        slack = -(-config.decode_slack // bs) * bs
        if budget + bs + slack > pool:
            raise ConfigError(f"eviction budget {budget} (+ one block of growth{f' + decode_slack {slack}' * bool(slack)}) "
                              f"does not fit the KV pool of {self.blocks.num_blocks} blocks ({pool} tokens); lower the "
                              f"budget or raise cache_size")
        # Memory-bounded prefill adds this many prompt tokens between compactions (the budget unless set;
        # fewer, larger compactions cost less and decide on more context): budget + chunk + one block
        # must fit the pool, so the chunk shrinks to fit.
        if config.prefill != "after" and 0 < config.prefill_chunk < bs:
            raise ConfigError(f"CacheEvictionConfig.prefill_chunk={config.prefill_chunk} is below one KV block "
                              f"({bs} tokens); use at least {bs} (or 0 for the budget)")
        chunk = max(0, min(config.prefill_chunk or budget, pool - budget - bs))
        bounded = policy.name != "full" and config.prefill != "after" and chunk >= bs
        probing = config.prefill_scores in ("probe", "reread")
        # "full" keeps every token: a prompt cannot be bounded while it fills
        plan = EvictionPlan(policy, budget, window, config.evict_during_decode,
                            during_prefill=config.prefill == "chunked" and policy.name != "full",
                            prefill_chunk=chunk if bounded else 0,
                            prefill_window=(config.prefill_window or (PROBE_TOKENS if probing else window))
                            if window else 0,
                            probe=bounded and probing and window > 0,
                            reread=bounded and config.prefill_scores == "reread" and window > 0, prefill=config.prefill,
                            prefill_expected=bounded and config.prefill_scores == "expected" and window > 0,
                            expected=config.scores == "expected" and window > 0,
                            expected_options=ExpectedOptions(config.expected_future,
                                                             value_norm=config.expected_value_norm),
                            decode_slack=-(-config.decode_slack // bs) * bs)
        if bounded:
            plan = replace(plan, prefill_policy=policy.keeping_spans(config.prefill_pool_back))
        if plan.during_prefill and not plan.prefill_chunk:
            raise self.no_chunk_error(plan)
        if plan.expected or plan.prefill_expected:
            self.scorer.prepare_expected()  # a model without a usable RoPE fails here, with the config, not mid-run
        if self.runner.max_position and plan.budget > self.runner.max_position:
            raise ConfigError(f"eviction budget {plan.budget} exceeds the model's context ({self.runner.max_position} "
                              f"tokens); use a budget below it")
        if plan.window:
            if not self.runner.softmax_scales:
                raise ConfigError("this engine was built without eviction support; pass a cache_eviction_config "
                                  "in SchedulerConfig (or enable_eviction=True) when creating it")
            self.runner.kv.require_token_rows("eviction with attention scores")
            if self.runner.uses_alibi:
                raise ConfigError(f"policy {plan.policy.name!r} scores attention per head, which does not model this "
                                  f"model's ALiBi position biases; use 'streaming' or the full cache")
        if policy.name != "full" and not self.runner.info.has_per_layer_block_indices:
            # compiled with one block table for all layers: a compaction could leave layers holding
            # different blocks (sliding layers, per-layer keep-sets), which that table cannot express
            raise ConfigError("this engine was built without eviction support (one block table for all layers); "
                              "pass a cache_eviction_config in SchedulerConfig (or enable_eviction=True) when "
                              "creating it")
        if plan.policy.per_layer_budgets and not self.runner.per_layer_lengths:
            raise ConfigError(f"policy {plan.policy.name!r} keeps different lengths per layer; build the engine "
                              f"with it as the default policy (or per_layer_lengths=True) to use it per request")
        return plan

    def no_chunk_error(self, plan: EvictionPlan) -> ConfigError:
        bs, pool = self.runner.block_size, self.blocks.num_blocks * self.runner.block_size
        return ConfigError(f"eviction budget {plan.budget} leaves no room for a prompt chunk in a KV pool of "
                           f"{pool} tokens: budget + one chunk + one block ({bs}) must fit; use a budget of at "
                           f"most {pool - 2 * bs} or a larger pool")

    # -- the state it owns ---------------------------------------------------------------------------
    def state(self, seq: Sequence) -> EvictionState:
        return self._states.setdefault(seq.seq_id, EvictionState())

    def has_evicted(self, seq: Sequence) -> bool:
        """Whether the sequence has evicted since it was last (pre)filled (its targets are set)."""
        st = self._states.get(seq.seq_id)
        return st is not None and st.targets is not None

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """The child starts from the parent's observed queries and targets."""
        if parent.seq_id in self._states:
            self._states[child.seq_id] = self._states[parent.seq_id].copy()

    def drop(self, seq: Sequence) -> None:
        """Forget a sequence's state (preempted: it will be prefilled again; or finished)."""
        self._states.pop(seq.seq_id, None)
        if seq.is_finished:
            self._probes.pop(seq.seq_id, None)

    def take_probe(self, probe: Sequence, target: Sequence) -> None:
        """A probe of target's prompt tail finished: its queries score target's compactions inside the
        prompt (kept across preemptions: the prompt is the same)."""
        st = self._states.get(probe.seq_id)
        if st is not None and st.queries is not None and not target.is_finished:
            self._probes[target.seq_id] = st.queries

    # -- every step --------------------------------------------------------------------------------
    def observe(self, chunks: list[ScheduledChunk]) -> None:
        """Keep the newest W queries of each scheduled sequence that may be scored."""
        if not self.runner.softmax_scales:
            return  # built without query outputs: no sequence can evict with scores
        per_layer = None
        begin = 0
        for c in chunks:
            end = begin + c.num_tokens
            window = c.seq.query_window
            if window or c.seq.query_stats:
                if per_layer is None:
                    per_layer = [self.runner.queries(layer) for layer in range(self.runner.num_layers)]
                st = self.state(c.seq)
            if window:
                rows = np.stack([q[max(begin, end - window):end] for q in per_layer])  # [L, r, Hq, hd]
                st.queries = rows if st.queries is None else np.concatenate([st.queries, rows], axis=1)[:, -window:]
            if c.seq.query_stats:  # every query of the chunk, RoPE taken out, into the running sums
                self._observe_stats(c, st, np.stack([q[begin:end] for q in per_layer]))
            begin = end

    def is_due(self, seq: Sequence) -> bool:
        """Whether the sequence has outgrown its budget at this point (see maybe_evict)."""
        plan = seq.eviction
        prompt_done = seq.num_computed >= seq.num_prompt_tokens
        if plan is None or seq.is_finished or not (prompt_done or plan.during_prefill):
            return False
        st = self._states.get(seq.seq_id)
        lens = self.blocks.layer_lens(seq.seq_id)
        if not prompt_done:  # every prefill_chunk tokens past the budget: at fixed prompt positions, so the
            return int(lens.max()) >= plan.budget + plan.prefill_chunk  # result does not depend on batching
        if st is None or st.targets is None:
            return int(lens.max()) > plan.budget
        if not st.scored_prompt_end:
            return bool((lens > st.targets).any())
        # a block (+ the decode slack) past its target in any layer
        return plan.during_decode and bool((lens >= st.targets + plan.decode_growth(self.runner.block_size)).any())

    def _observe_stats(self, chunk: ScheduledChunk, st: EvictionState, queries: np.ndarray) -> None:
        seq = chunk.seq
        opts = seq.eviction.expected_options if seq.eviction is not None else ExpectedOptions()
        first = seq.num_computed + seq.position_offset  # observe runs before the scheduler advances num_computed
        with _BLAS.limit(limits=1, user_api="blas"):
            st.query_stats = self.scorer.add_queries(st.query_stats, queries, first, opts)

    def maybe_evict(self, seq: Sequence) -> bool:
        """Evict if the sequence has outgrown its budget: during a chunked prefill each time it holds
        budget + prefill_chunk slots, at the prompt's end (always, so the final keep-set is scored by the
        prompt's own last queries, where the question usually is), then each time decoding has grown a
        layer a block past its target."""
        if not self.is_due(seq):
            return False
        plan, st, lens = seq.eviction, self.state(seq), self.blocks.layer_lens(seq.seq_id)
        # Compaction first gives the sequence private copies of blocks it shares with a fork; when the
        # pool has no room for them, wait (retried every step; the scheduler preempts to free blocks).
        uneven = self.blocks.is_uneven(seq.seq_id)
        keep = st.targets if uneven else plan.policy.layer_budgets(self.runner.num_layers, plan.budget, int(lens.max()))
        if not self.blocks.can_make_private(seq.seq_id, int(np.max(keep))):
            return False
        t0 = time.perf_counter()
        # Many small matmuls: multi-threaded OpenBLAS contends with OpenVINO's threads (measured 70 ms
        # vs 2.5 ms single-threaded for one layer's scores at 4k tokens).
        with _BLAS.limit(limits=1, user_api="blas"):
            evicted = self._evict(seq, plan, st, lens)
        dt = time.perf_counter() - t0
        seq.metrics.evictions += 1
        seq.metrics.tokens_evicted += evicted
        seq.metrics.eviction_seconds += dt
        self.stats.evictions += 1
        self.stats.tokens_evicted += evicted
        self.stats.seconds += dt
        return True

    # -- one eviction ------------------------------------------------------------------------------
    def _scores(self, seq: Sequence, window: int, queries: np.ndarray, num_slots: int,
                layers: np.ndarray, causal: bool = True, stats: QueryStats | None = None) -> np.ndarray:
        """[len(layers), Hq, num_slots] for layers that all hold num_slots slots: expected attention from
        the next position on with stats, else the attention of the newest `window` queries."""
        tables = self.blocks.tables[seq.seq_id]
        if stats is not None:
            return self.scorer.expected(tables, stats, seq.eviction.expected_options,
                                        seq.num_computed + seq.position_offset, num_slots, layers)
        if not window:
            return np.zeros((len(layers), self.runner.num_q_heads, num_slots), np.float32)
        return self.scorer.window(tables, queries[:, -window:], num_slots, layers, causal)

    @staticmethod
    def _alike(kept: np.ndarray, tables: list) -> list[list[int]]:
        """Layers grouped by (slots kept, blocks held): each group compacts in one call."""
        groups: dict[tuple[int, int], list[int]] = {}
        for layer, (n, table) in enumerate(zip(kept.tolist(), tables)):
            groups.setdefault((n, len(table)), []).append(layer)
        return list(groups.values())

    def _evict(self, seq: Sequence, plan: EvictionPlan, st: EvictionState, lens: np.ndarray) -> int:
        """Compact the sequence to the policy's keep-sets; return the tokens evicted per layer (mean)."""
        L, hkv = self.runner.num_layers, self.runner.num_kv_heads
        in_prompt = seq.num_computed < seq.num_prompt_tokens
        policy = plan.prefill_policy if in_prompt and plan.prefill_policy is not None else plan.policy
        window = plan.prefill_window if in_prompt else plan.window
        queries, causal = st.queries, True
        if in_prompt and plan.probe and seq.seq_id in self._probes:  # the question's view, from the future
            queries, causal = self._probes[seq.seq_id], False
            window = queries.shape[1]
        # expected attention: the queries to come, from every query seen (None: the window's queries score)
        expected = plan.prefill_expected if in_prompt else plan.expected
        stats = st.query_stats if expected and st.query_stats is not None and st.query_stats.num_queries else None
        windows = np.asarray(self.runner.sliding_windows, dtype=np.int64)
        glob = np.flatnonzero(windows == 0)  # the layers the policy decides for
        masks: list = [None] * L
        # A sliding layer keeps the newest slots it can see, up to its budget (not scored: it has no
        # choice to make); once evicted it is shorter than the global layers, so "alike" asks only those.
        budgets = policy.layer_budgets(L, plan.budget, int(lens.max()))
        for layer in np.flatnonzero(windows > 0):
            masks[layer] = _newest(hkv, int(lens[layer]), int(min(budgets[layer], windows[layer], lens[layer])))
        uneven = bool(glob.size) and bool(np.ptp(lens[glob]))  # global layers only: sliding layers do not count
        if glob.size and not uneven:  # all global layers alike: one policy call over them
            scores = self._scores(seq, window, queries, int(lens[glob[0]]), glob, causal, stats)
            st.policy_state, ranked = policy.update(st.policy_state, scores)
            for layer, mask in zip(glob, policy.keep_mask(AttentionStats(ranked, hkv), plan.budget)):
                masks[layer] = mask
        elif uneven:  # global layers hold different lengths (after PyramidKV): each on its own, to its target
            if policy.stateful:
                raise ConfigError(f"policy {policy.name!r} carries state per slot and cannot follow "
                                  f"per-layer budgets")
            for layer in glob:
                masks[layer] = policy.keep_mask(AttentionStats(
                    self._scores(seq, window, queries, int(lens[layer]), np.array([layer]), causal, stats), hkv),
                    int(st.targets[layer]))[0]
        counts = [m.sum(axis=-1) for m in masks]  # [Hkv] per layer
        for layer, c in enumerate(counts):
            if (c != c[0]).any():  # compaction moves every KV head to the same length
                raise KVCrushError(f"policy {policy.name!r} kept {c.tolist()} slots in the KV heads of layer "
                                   f"{layer}; a policy must keep the same count in every KV head")
        kept = np.array([int(c[0]) for c in counts])
        # A forked sequence shares blocks with its parent: compaction writes only into private ones.
        self.runner.kv.copy_blocks(self.blocks.make_private(seq.seq_id, int(kept.max())))
        tables = self.blocks.tables[seq.seq_id]
        # sorted per head: time order kept
        keeps = [np.nonzero(masks[layer])[1].reshape(hkv, kept[layer]) for layer in range(L)]
        for group in self._alike(kept, tables):  # layers keeping as many slots in as many blocks: one call
            orders = self.runner.kv.compact_layers(group, [tables[i] for i in group], np.stack([keeps[i] for i in group]))
            for layer, order in zip(group, orders):
                self.blocks.reorder(seq.seq_id, layer, order)
        if glob.size and not uneven and (kept[glob] == kept[glob[0]]).all():  # its state covers the global layers
            st.policy_state = policy.compact(st.policy_state, np.stack([keeps[layer] for layer in glob]))
        self.blocks.trim(seq.seq_id, kept)
        if st.targets is None:
            st.targets = kept
        st.scored_prompt_end |= seq.num_computed >= seq.num_prompt_tokens
        return int((lens - kept).sum()) // L
