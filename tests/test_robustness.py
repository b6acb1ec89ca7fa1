"""Robustness on the tiny random Llama: KV pool exhaustion (preemption / queueing / rejection by the
documented rule), block accounting under random add/step/abort/evict/fork workloads (a hypothesis
state machine), abort and misbehaving streamers, concurrent generate() calls, and the bad-input
catalogue of docs/robustness.md (one-line errors naming the field; config fuzzing; the JSONL loader is
fuzzed in test_eval_suite.py)."""
from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
import threading
from functools import lru_cache

import numpy as np
import openvino as ov
import openvino_genai as ov_genai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import kvcrush_ov
from kvcrush_ov import CacheEvictionConfig, GenerationConfig, SchedulerConfig
from kvcrush_ov.core.engine.llm_engine import LLMEngine
from kvcrush_ov.core.engine.sequence import FinishReason, Status
from kvcrush_ov.core.eviction_config import PREFILL_MODES
from kvcrush_ov.core.errors import CacheCapacityError, ConfigError, KVCrushError, ModelError, PromptError
from kvcrush_ov.tools.models import prepare
from kvcrush_ov.core.policies import POLICIES, make_policy

F32 = {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": ov.Type.f32}
SMALL = {"sink_tokens": 4, "recent_tokens": 16}
EVICTING = ("streaming", "snapkv", "kvcrush", "pyramidkv")


@lru_cache(maxsize=None)
def tiny() -> str:
    return str(prepare("tiny-llama"))


def eviction(policy: str | None, budget: int = 48, prefill: str = "chunked") -> CacheEvictionConfig | None:
    if policy is None:
        return None
    options = dict(SMALL, **({} if policy == "streaming" else {"window": 8}))
    return CacheEvictionConfig(policy, budget=budget, options=options, prefill=prefill)


def engine(**sched) -> LLMEngine:
    """f32 compute and KV: outputs do not depend on how requests are batched or chunked."""
    return LLMEngine(tiny(), "CPU", SchedulerConfig(**{"cache_size": 0.05, **sched}), F32, enable_eviction=True,
                     per_layer_lengths=True)  # requests may ask for PyramidKV


def random_requests(n: int, lengths: tuple[int, int], new: tuple[int, int], seed: int) -> list[tuple[list[int], int]]:
    rng = np.random.default_rng(seed)
    return [(rng.integers(3, 40000, size=int(k)).tolist(), int(m))
            for k, m in zip(rng.integers(*lengths, size=n), rng.integers(*new, size=n))]


def assert_one_line(err: BaseException, *names: str) -> None:
    msg = str(err)
    assert msg and "\n" not in msg, repr(msg)
    for name in names:
        assert name in msg, (name, msg)


# ------------------------------------------------------------------------------------------------
# 1. KV pool exhaustion
# ------------------------------------------------------------------------------------------------
def watch_preemptions(e: LLMEngine) -> list[dict]:
    """Record every preemption and check the rule on the spot: the victim is the most recently
    arrived running sequence not already scheduled in this step (decodes are scheduled oldest first,
    so every sequence scheduled before the victim arrived earlier)."""
    log: list[dict] = []
    real = e.scheduler._preempt

    def preempt(seq, out):
        scheduled = [c.seq for c in out.chunks]
        candidates = [s for s in e.scheduler.seqs if s.status is Status.RUNNING
                      and s not in scheduled and s not in out.preempted]
        assert seq is max(candidates, key=lambda s: s.arrival)
        assert all(s.arrival < seq.arrival for s in scheduled)
        log.append({"seq": seq, "evicted": seq.metrics.evictions > 0,
                    "generated": seq.num_generated})
        real(seq, out)

    e.scheduler._preempt = preempt
    return log


def serve(e: LLMEngine, requests: list[tuple], per_step: int, max_steps: int = 3000) -> list:
    """Requests arrive over time (`per_step` before each step); step until everything finished."""
    pending, seqs, steps = list(requests), [], 0
    while pending or e.has_unfinished:
        for _ in range(per_step):
            if pending:
                ids, new, ev = pending.pop(0)
                seqs.append(e.add_request(ids, GenerationConfig(max_new_tokens=new), eviction=ev))
        e.step()
        e.blocks.check_invariants()
        running = sum(s.status is Status.RUNNING for s in e.scheduler.seqs)
        assert running <= e.scheduler.max_num_seqs
        steps += 1
        assert steps < max_steps, "no progress"
    return seqs


def test_small_pool_full_cache_preempts_and_matches_unconstrained():
    reqs = [(ids, new, None) for ids, new in random_requests(12, (20, 150), (8, 48), seed=1)]
    ref = serve(engine(), reqs, per_step=len(reqs))
    small = engine(num_kv_blocks=8, cache_size=0, max_num_batched_tokens=64, max_num_seqs=6)  # 256 slots
    log = watch_preemptions(small)
    got = serve(small, reqs, per_step=2)
    assert len(log) > 0 and sum(s.num_preemptions for s in got) == len(log)
    assert all(s.finish_reason is FinishReason.LENGTH and s.num_generated == n for s, (_, n, _) in zip(got, reqs))
    assert [s.output_ids for s in got] == [s.output_ids for s in ref]
    assert small.blocks.num_used_blocks == 0 and not small.blocks.tables
    assert not small.sequences  # finished requests are forgotten by the engine (no growth over time)


def test_small_pool_with_eviction_counts_budgets_and_matches_unconstrained():
    """Prompts of 60-230 tokens and up to 60 new tokens with budget 48 on a 256-slot pool: some
    requests could not even be admitted with a full cache, but with eviction each needs at most its
    prompt once, then budget + one block. Admission reserves what running evicting requests will still
    claim (the rest of a whole prompt, a block of decode growth), so none is preempted (no thrash), every
    request completes, and outputs equal the unconstrained run."""
    reqs = [(ids, new, eviction(EVICTING[i % 4], prefill="after")) for i, (ids, new) in  # whole prompts: preemptions
            enumerate(random_requests(11, (60, 200), (8, 60), seed=2) + random_requests(1, (230, 231), (60, 61), 3))]
    small = engine(num_kv_blocks=8, cache_size=0, max_num_batched_tokens=64)
    too_big = [r for r in reqs if small.blocks.blocks_for(len(r[0]) + r[1]) > small.blocks.num_blocks]
    assert too_big
    with pytest.raises(CacheCapacityError):
        small.add_request(too_big[0][0], GenerationConfig(max_new_tokens=too_big[0][1]), eviction=None)
    ref = serve(engine(max_num_batched_tokens=64), reqs, per_step=len(reqs))  # the same prefill chunk
    log = watch_preemptions(small)
    got = serve(small, reqs, per_step=2)
    assert log == []
    assert all(s.finish_reason is FinishReason.LENGTH and s.num_generated == n for s, (_, n, _) in zip(got, reqs))
    assert [s.output_ids for s in got] == [s.output_ids for s in ref]
    bs = small.blocks.block_size
    for s in got:  # while decoding, a sequence held at most its budget + one block (per layer on average)
        if s.eviction.policy.name != "pyramidkv":
            assert s.metrics.peak_decode_kv_slots < s.eviction.budget + bs
    assert small.blocks.num_used_blocks == 0 and not small.blocks.tables


def test_long_prompt_waits_for_room_and_is_not_starved():
    """Default eviction ("auto") in a tight pool (8 blocks = 256 slots, budget 40): a 220-token prompt is
    evicted after it is whole (its peak is 7 blocks), so it waits until the requests ahead of it have
    shrunk to their budgets, while a stream of short requests keeps arriving behind it. It is admitted
    before any of them (arrival order), it is never preempted, nobody is, and everything completes."""
    e = engine(num_kv_blocks=8, cache_size=0, max_num_batched_tokens=64)
    ev = eviction("snapkv", 40, prefill="auto")
    rng = np.random.default_rng(7)
    short = lambda: e.add_request(rng.integers(3, 40000, 90).tolist(), GenerationConfig(max_new_tokens=30),  # noqa: E731
                                  eviction=ev)
    ahead = [short(), short()]
    long = e.add_request(rng.integers(3, 40000, 220).tolist(), GenerationConfig(max_new_tokens=20), eviction=ev)
    assert long.eviction_mode == "after_prompt" and all(s.eviction_mode == "after_prompt" for s in ahead)
    log = watch_preemptions(e)
    behind, started, steps = [], {}, 0
    while e.has_unfinished:
        if steps < 40:
            behind.append(short())
        e.step()
        e.blocks.check_invariants()
        for s in ahead + [long] + behind:
            if s.status is not Status.WAITING:
                started.setdefault(id(s), steps)
        steps += 1
        assert steps < 2000, "no progress"
    assert log == [] and long.finish_reason is FinishReason.LENGTH and long.num_generated == 20
    assert long.metrics.peak_kv_slots == 220  # the whole prompt, before it was evicted
    assert started[id(long)] > 0 and all(started[id(s)] >= started[id(long)] for s in behind)  # it waited, in order
    assert all(s.finish_reason is FinishReason.LENGTH for s in ahead + behind)
    assert e.blocks.num_used_blocks == 0


@pytest.mark.parametrize("policy", [None, "streaming"])
def test_capacity_boundary_at_add_request(policy):
    """4 blocks = 128 slots. Full cache: prompt + max_new_tokens must fit. Eviction after prefill: the
    prompt (+1) must fit once and budget + one block after that. One past the boundary raises
    CacheCapacityError and leaves the engine untouched; the boundary request runs alone to the end."""
    e = engine(num_kv_blocks=4, cache_size=0, max_num_batched_tokens=64)
    ev = eviction(policy, prefill="after")
    fits, over = ((100, 28), (100, 29)) if policy is None else ((127, 300), (128, 300))
    ids = list(range(5, 5 + over[0]))
    with pytest.raises(CacheCapacityError, match="KV blocks") as err:
        e.add_request(ids, GenerationConfig(max_new_tokens=over[1]), eviction=ev)
    assert_one_line(err.value, "cache_size")
    assert not e.sequences and not e.has_unfinished
    s = e.add_request(ids[:fits[0]], GenerationConfig(max_new_tokens=fits[1]), eviction=ev)
    steps = 0
    while e.has_unfinished:
        e.step()
        steps += 1
        assert steps < 1000
    assert s.num_generated == fits[1] and s.num_preemptions == 0 and e.blocks.num_used_blocks == 0


@pytest.mark.parametrize("policy", EVICTING)
def test_chunked_prefill_runs_a_prompt_longer_than_the_pool(policy):
    """4 blocks = 128 slots, budget 48: a 700-token prompt never holds more than budget + one chunk +
    one block, and its outputs do not depend on how the scheduler batched it (40-token steps, alone or
    three at once)."""
    ids = np.random.default_rng(5).integers(3, 40000, size=700).tolist()
    runs = []
    for sched, per_step in (({"num_kv_blocks": 4, "cache_size": 0, "max_num_batched_tokens": 40}, 1),
                            ({"max_num_batched_tokens": 40}, 3)):
        e = engine(**sched)
        seqs = [e.add_request(ids, GenerationConfig(max_new_tokens=20), eviction=eviction(policy))
                for _ in range(per_step)]
        peak = 0
        while e.has_unfinished:
            e.step()
            e.blocks.check_invariants()
            peak = max([peak] + [e.blocks.cache_len(s.seq_id) for s in seqs if not s.is_finished])
        assert peak <= 48 + 48 + e.blocks.block_size and e.blocks.num_used_blocks == 0  # prefill_chunk = budget
        assert all(s.num_generated == 20 and s.metrics.evictions >= 700 // 48 for s in seqs)
        runs.append([s.output_ids for s in seqs])
    assert runs[0][0] == runs[1][0] == runs[1][2]


def test_budget_that_leaves_no_room_for_a_chunk_is_refused():
    e = engine(num_kv_blocks=4, cache_size=0, max_num_batched_tokens=64)
    with pytest.raises(ConfigError) as err:
        e.add_request([5, 6, 7], GenerationConfig(max_new_tokens=2), eviction=eviction("snapkv", 90))
    assert_one_line(err.value, "budget 90")
    assert "128" in str(err.value) and not e.sequences


def test_full_cache_request_longer_than_the_pool_suggests_a_budget():
    e = engine(num_kv_blocks=16, cache_size=0)
    with pytest.raises(CacheCapacityError) as err:
        e.add_request(list(range(5, 905)), GenerationConfig(max_new_tokens=8), eviction=None)
    assert_one_line(err.value, "budget")
    assert "--policy kvcrush --budget" in str(err.value)


# ------------------------------------------------------------------------------------------------
# 2. Block accounting under random workloads
# ------------------------------------------------------------------------------------------------
POOL_BLOCKS = 8


class BlockAccounting(RuleBasedStateMachine):
    """add / step / abort / evict / fork on the real engine with an 8-block pool; after every rule the
    block manager's ref counts equal the tables, free lists hold exactly the rest, a block is held by
    two sequences only when they are fork relatives (copy-on-write), finished and waiting sequences
    hold nothing; at the end everything completes and every block is free."""

    def __init__(self):
        super().__init__()
        self.e = engine(num_kv_blocks=POOL_BLOCKS, cache_size=0, max_num_batched_tokens=48)
        self.seqs: list = []
        self.root: dict[int, int] = {}

    # -- helpers ----------------------------------------------------------------------------------
    def _fits(self, prompt: int, new: int, ev) -> bool:
        return self._mode(prompt, new, ev) is not None

    def _mode(self, prompt: int, new: int, ev) -> str | None:
        """The path a request takes (None: refused), by hand: the whole prompt once then budget + one
        block ("after_prompt"), or budget + one chunk (= the budget here) + one block ("memory_bounded")."""
        bs = self.e.blocks.block_size
        if ev is None:
            return "none" if self.e.blocks.blocks_for(prompt + new) <= POOL_BLOCKS else None
        after = min(prompt + new, max(prompt + 1, ev.budget + bs))
        if ev.prefill != "chunked" and self.e.blocks.blocks_for(after) <= POOL_BLOCKS:
            return "after_prompt"
        if ev.prefill == "after":
            return None
        return "memory_bounded" if self.e.blocks.blocks_for(min(prompt + new, 2 * ev.budget + bs)) <= POOL_BLOCKS else None

    def _unfinished(self):
        return [s for s in self.seqs if not s.is_finished]

    def _forkable(self):
        return [s for s in self.seqs if s.status is Status.RUNNING and s.num_uncomputed == 1]

    def _evictable(self):
        return [s for s in self._forkable() if s.eviction is not None]

    # -- rules ------------------------------------------------------------------------------------
    @rule(n=st.integers(1, 300), new=st.integers(1, 40), policy=st.sampled_from((None,) + EVICTING),
          budget=st.sampled_from([40, 64]), prefill=st.sampled_from(PREFILL_MODES), seed=st.integers(0, 2**16))
    def add(self, n, new, policy, budget, prefill, seed):
        ids = np.random.default_rng(seed).integers(3, 40000, size=n).tolist()
        ev = eviction(policy, budget, prefill)
        if not self._fits(n, new, ev):
            before = dict(self.e.blocks.tables)
            with pytest.raises(CacheCapacityError):
                self.e.add_request(ids, GenerationConfig(max_new_tokens=new), eviction=ev)
            assert self.e.blocks.tables == before
            return
        s = self.e.add_request(ids, GenerationConfig(max_new_tokens=new), eviction=ev, query_window=32)
        assert s.eviction_mode == self._mode(n, new, ev)  # from the request and the pool, not the load
        self.seqs.append(s)
        self.root[s.seq_id] = s.seq_id

    @rule(k=st.integers(1, 4))
    def step(self, k):
        for _ in range(k):
            if self.e.has_unfinished:
                for s in self.e.step():
                    assert s.seq_id not in self.e.blocks.tables
                self.e.blocks.check_invariants()

    @precondition(lambda self: self._unfinished())
    @rule(data=st.data())
    def abort(self, data):
        s = data.draw(st.sampled_from(self._unfinished()))
        self.e.abort(s.seq_id)
        assert s.finish_reason is FinishReason.ABORT and s.seq_id not in self.e.blocks.tables

    @precondition(lambda self: self._evictable())
    @rule(data=st.data())
    def evict(self, data):
        """Ask a decoding sequence to evict between steps (as fork() does for a new child)."""
        s = data.draw(st.sampled_from(self._evictable()))
        self.e.evictor.maybe_evict(s)

    @precondition(lambda self: self._forkable())
    @rule(data=st.data(), policy=st.sampled_from((None,) + EVICTING), budget=st.sampled_from([40, 64]),
          new=st.integers(1, 30))
    def fork(self, data, policy, budget, new):
        parent = data.draw(st.sampled_from(self._forkable()))
        ev = eviction(policy, budget)
        cfg = GenerationConfig(max_new_tokens=parent.num_generated + new)
        refused = None
        if ev is not None and self.e.evictor.state(parent).targets is not None \
                and self.e.evictor.plan(ev) != parent.eviction:  # would inherit the parent's eviction targets
            refused = KVCrushError
        elif not self._fits(parent.num_prompt_tokens, cfg.max_new_tokens, ev):
            refused = CacheCapacityError
        if refused is not None:
            before, known = {k: [list(t) for t in v] for k, v in self.e.blocks.tables.items()}, set(self.e.sequences)
            with pytest.raises(refused):
                self.e.fork(parent, cfg, ev)
            assert self.e.blocks.tables == before and set(self.e.sequences) == known
            return
        before, known = {k: [list(t) for t in v] for k, v in self.e.blocks.tables.items()}, set(self.e.sequences)
        try:
            child = self.e.fork(parent, cfg, ev)
        except CacheCapacityError as err:  # no room for the blocks it must copy to evict at once
            assert "no free KV blocks to fork" in str(err) and ev is not None
            assert self.e.blocks.tables == before and set(self.e.sequences) == known
            return
        assert not self.e.evictor.is_due(child)  # it evicted where a request of its own would have
        self.seqs.append(child)
        self.root[child.seq_id] = self.root[parent.seq_id]

    # -- invariants -------------------------------------------------------------------------------
    @invariant()
    def accounting(self):
        b = self.e.blocks
        b.check_invariants()
        holders: dict[tuple[int, int], set[int]] = {}
        for seq_id, tables in b.tables.items():
            for layer, table in enumerate(tables):
                assert len(set(table)) == len(table), "a block twice in one table"
                for block in table:
                    # the engine's own sequences (a probe, a first read of a long prompt) are roots of their own
                    holders.setdefault((layer, block), set()).add(self.root.get(seq_id, ("internal", seq_id)))
        assert all(len(roots) == 1 for roots in holders.values()), "a block shared by unrelated sequences"
        for s in self.seqs:
            if s.is_finished or s.status is Status.WAITING:
                assert s.seq_id not in b.tables
            else:
                lens = b.layer_lens(s.seq_id)
                assert all(len(t) >= b.blocks_for(int(n)) for t, n in zip(b.tables[s.seq_id], lens))

    def teardown(self):
        steps = 0
        while self.e.has_unfinished:
            self.e.step()
            self.e.blocks.check_invariants()
            steps += 1
            assert steps < 2000, "the engine made no progress"
        b = self.e.blocks
        assert not b.tables and b.num_used_blocks == 0 and b.num_free_blocks == POOL_BLOCKS
        for s in self.seqs:
            assert s.is_finished
            if s.finish_reason is not FinishReason.ABORT:
                assert s.finish_reason is FinishReason.LENGTH and s.num_generated == s.config.max_new_tokens


TestBlockAccounting = BlockAccounting.TestCase
TestBlockAccounting.settings = settings(max_examples=20, stateful_step_count=15, deadline=None,
                                        suppress_health_check=list(HealthCheck))


def test_preempted_prefill_is_not_overtaken():
    """Regression (found by the state machine): a prefill preempted in a step used to be overtaken by
    a newer waiting sequence in the same step; both then held part of their prompt, filled the pool
    with nobody decoding, and every step raised 'no request could be scheduled'."""
    e = engine(num_kv_blocks=8, cache_size=0, max_num_batched_tokens=48)
    rng = np.random.default_rng(0)
    a = e.add_request(rng.integers(3, 40000, size=103).tolist(), GenerationConfig(max_new_tokens=40))
    e.step(), e.step()
    b = e.add_request(rng.integers(3, 40000, size=196).tolist(), GenerationConfig(max_new_tokens=1))
    for _ in range(8):
        e.step()
    assert b.status is Status.RUNNING and b.num_uncomputed > 1 and e.blocks.num_free_blocks == 0
    c = e.fork(a, GenerationConfig(max_new_tokens=a.num_generated + 1))  # needs a copy-on-write block: none free
    steps = 0
    while e.has_unfinished:
        e.step()
        e.blocks.check_invariants()
        partial = [s for s in e.scheduler.seqs if s.status is Status.RUNNING and s.num_uncomputed > 1]
        assert len(partial) <= 1
        steps += 1
        assert steps < 200
    assert (a.num_generated, b.num_generated) == (40, 1) and c.num_preemptions >= 1
    assert e.blocks.num_used_blocks == 0


def test_scoring_fork_of_a_streaming_parent():
    """Regression (state machine): a SnapKV child of a streaming parent that had not evicted yet had no
    queries to score with and crashed on its first eviction."""
    e = engine(num_kv_blocks=8, cache_size=0, max_num_batched_tokens=48)
    parent = e.add_request(list(range(5, 63)), GenerationConfig(max_new_tokens=5), eviction=eviction("streaming", 64),
                           query_window=8)  # its SnapKV fork scores 8 queries
    while parent.num_generated == 0:
        e.step()
    child = e.fork(parent, GenerationConfig(max_new_tokens=5), eviction("snapkv", 40))
    assert child.metrics.evictions == 1 and e.blocks.cache_len(child.seq_id) == 40
    while e.has_unfinished:
        e.step()
    assert child.num_generated == 5 and e.blocks.num_used_blocks == 0


# ------------------------------------------------------------------------------------------------
# 3. Abort and streamers
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok(tiny_llama_dir):
    return kvcrush_ov.Tokenizer(tiny_llama_dir)


PROMPTS = ["What is the capital of France?", "Write a haiku about autumn leaves on a river.",
           "List three prime numbers.", "Explain paged attention in two sentences. " * 6]


def streaming_engine(tok) -> LLMEngine:
    return LLMEngine(tiny(), "CPU", SchedulerConfig(cache_size=0.05), F32, decode=tok.decode)


def alone(tok, ids: list[int], new: int) -> list[int]:
    e = streaming_engine(tok)
    s = e.add_request(ids, GenerationConfig(max_new_tokens=new))
    while e.has_unfinished:
        e.step()
    return s.output_ids


def test_abort_mid_generation_frees_blocks_at_once(tok):
    ids = [tok.prepare(p, True) for p in PROMPTS]
    e = streaming_engine(tok)
    cfg = GenerationConfig(max_new_tokens=30)
    seqs = [e.add_request(i, cfg) for i in ids[:3]]
    while seqs[1].num_generated < 5:
        e.step()
    late = e.add_request(ids[3], cfg)  # aborted while waiting: never scheduled
    held = sum(len(t) for t in e.blocks.tables[seqs[1].seq_id])
    used = e.blocks.num_used_blocks
    e.abort(seqs[1].seq_id)
    e.abort(late.seq_id)
    assert seqs[1].seq_id not in e.blocks.tables and e.blocks.num_used_blocks == used - held
    assert seqs[1].finish_reason is FinishReason.ABORT and late.finish_reason is FinishReason.ABORT
    e.blocks.check_invariants()
    n = seqs[1].num_generated
    e.abort(seqs[1].seq_id), e.abort(10_000)  # aborting twice or an unknown id: no-ops
    while e.has_unfinished:
        e.step()
    assert seqs[1].num_generated == n and late.num_generated == 0
    assert [s.output_ids for s in (seqs[0], seqs[2])] == [alone(tok, ids[0], 30), alone(tok, ids[2], 30)]
    assert e.blocks.num_used_blocks == 0


def test_bad_streamers_only_end_their_own_request(tok):
    ids = [tok.prepare(p, True) for p in PROMPTS]
    e = streaming_engine(tok)
    cfg = GenerationConfig(max_new_tokens=20)
    pieces: dict[str, list[str]] = {k: [] for k in ("good", "raises", "stops", "cancels")}

    def streamer(kind):
        def f(piece):
            pieces[kind].append(piece)
            if kind == "raises" and len(pieces[kind]) == 3:
                raise ValueError("boom")
            if kind == "stops" and len(pieces[kind]) == 2:
                return True
            if kind == "cancels" and len(pieces[kind]) == 4:
                return ov_genai.StreamingStatus.CANCEL
            return ov_genai.StreamingStatus.RUNNING if kind == "cancels" else None
        return f

    seqs = {k: e.add_request(i, cfg, streamer=streamer(k)) for k, i in zip(pieces, ids)}
    while e.has_unfinished:
        for s in e.step():  # a request that ended holds no block once its step is over
            assert s.seq_id not in e.blocks.tables
        e.blocks.check_invariants()
    good, raises, stops, cancels = seqs.values()
    assert good.finish_reason is FinishReason.LENGTH and good.output_ids == alone(tok, ids[0], 20)
    assert "".join(pieces["good"]) == tok.decode(good.output_ids)
    assert raises.finish_reason is FinishReason.ABORT and raises.error == "streamer raised ValueError: boom"
    assert stops.finish_reason is FinishReason.STOP and cancels.finish_reason is FinishReason.ABORT
    for s, i in zip((raises, stops, cancels), ids[1:]):
        assert 0 < s.num_generated < 20 and s.output_ids == alone(tok, i, 20)[:s.num_generated]
    assert len(pieces["raises"]) == 3 and len(pieces["stops"]) == 2 and len(pieces["cancels"]) == 4
    assert e.blocks.num_used_blocks == 0


@pytest.fixture(scope="module")
def f32_pipe(tiny_llama_dir):
    return kvcrush_ov.LLMPipeline(tiny_llama_dir, scheduler_config=SchedulerConfig(cache_size=0.05), **F32)


def test_pipeline_streamer_errors_leave_the_engine_clean(f32_pipe):
    pipe = f32_pipe

    def raises(piece):
        raise RuntimeError("client went away")

    with pytest.raises(KVCrushError, match="streamer raised RuntimeError: client went away") as err:
        pipe.generate("Tell me a story.", max_new_tokens=10, streamer=raises)
    assert_one_line(err.value)

    def interrupts(piece):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # not swallowed; the request is aborted on the way out
        pipe.generate("Tell me a story.", max_new_tokens=10, streamer=interrupts)
    assert not pipe.engine.has_unfinished and pipe.engine.blocks.num_used_blocks == 0
    assert len(pipe.generate("Tell me a story.", max_new_tokens=5).token_ids[0]) == 5


# ------------------------------------------------------------------------------------------------
# 4. Concurrent generate() on one pipeline
# ------------------------------------------------------------------------------------------------
def test_threads_share_one_pipeline_engine_loop(f32_pipe):
    """4 threads x 2 prompts on one pipeline: one engine-loop thread steps for all of them (never two engine
    steps at once) and every thread gets what a sequential call returns."""
    pipe = f32_pipe
    prompts = [f"Question {i}: " + PROMPTS[i % 4] for i in range(8)]
    expected = [pipe.generate(p, max_new_tokens=12).token_ids[0] for p in prompts]
    active, most, guard = [0], [0], threading.Lock()
    step = pipe.engine.step

    def counted_step():
        with guard:
            active[0] += 1
            most[0] = max(most[0], active[0])
        try:
            return step()
        finally:
            with guard:
                active[0] -= 1

    pipe.engine.step = counted_step
    results: dict[int, list[int]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def worker(t):
        try:
            start.wait()
            for i in (2 * t, 2 * t + 1):
                results[i] = pipe.generate(prompts[i], max_new_tokens=12).token_ids[0]
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    try:
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=120)
    finally:
        del pipe.engine.step
    assert not errors and not any(th.is_alive() for th in threads)
    assert [results[i] for i in range(8)] == expected
    assert most[0] == 1 and pipe.engine.blocks.num_used_blocks == 0


# ------------------------------------------------------------------------------------------------
# 5. Bad input catalogue (docs/robustness.md lists every case and where it is tested)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fields, name", [
    ({"cache_size": -1}, "cache_size"),
    ({"cache_size": float("nan")}, "cache_size"),
    ({"cache_size": float("inf")}, "cache_size"),
    ({"cache_size": "1GB"}, "cache_size"),
    ({"num_kv_blocks": -3}, "num_kv_blocks"),
    ({"num_kv_blocks": 2.5}, "num_kv_blocks"),
    ({"cache_size": 0, "num_kv_blocks": 0}, "cache_size"),
    ({"max_num_batched_tokens": 0}, "max_num_batched_tokens"),
    ({"max_num_batched_tokens": -8}, "max_num_batched_tokens"),
    ({"max_num_seqs": 0}, "max_num_seqs"),
    ({"kv_cache_precision": "f8"}, "kv_cache_precision"),
    ({"block_size": 16}, "block_size"),  # not a field: unknown keys are named
])
def test_bad_scheduler_config(fields, name):
    with pytest.raises(ConfigError) as err:
        SchedulerConfig.from_any(fields)
    assert_one_line(err.value, name)


@pytest.mark.parametrize("fields, name", [  # max_new_tokens=0, temperature=0, top_p>1, top_k<0: test_engine
    ({"max_new_tokens": -1}, "max_new_tokens"),
    ({"max_new_tokens": 2.5}, "max_new_tokens"),
    ({"min_new_tokens": 5, "max_new_tokens": 3}, "min_new_tokens"),
    ({"min_new_tokens": -1}, "min_new_tokens"),
    ({"temperature": -0.5}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_k": 1.5}, "top_k"),
    ({"rng_seed": -1}, "rng_seed"),
    ({"stop_strings": {""}}, "stop_strings"),
    ({"stop_strings": None}, "stop_strings"),
    ({"stop_token_ids": {-1}}, "stop_token_ids"),
    ({"stop_token_ids": {1, "a"}}, "stop_token_ids"),
    ({"stop_token_ids": 5}, "stop_token_ids"),
    ({"stop_token_ids": [[1]]}, "stop_token_ids"),
    ({"eos_token_id": "</s>"}, "eos_token_id"),
    ({"do_sample": "false"}, "do_sample"),
    ({"ignore_eos": None}, "ignore_eos"),
    ({"beams": 4}, "beams"),
])
def test_bad_generation_config(fields, name):
    with pytest.raises(ConfigError) as err:
        GenerationConfig.from_any(fields)
    assert_one_line(err.value, name)


def test_bad_config_objects():
    for call, name in [(lambda: SchedulerConfig.from_any("big"), "scheduler_config"),
                       (lambda: GenerationConfig.from_any(42), "generation_config"),
                       (lambda: CacheEvictionConfig.from_any(["snapkv"]), "cache_eviction_config")]:
        with pytest.raises(ConfigError) as err:
            call()
        assert_one_line(err.value, name)
    beams = ov_genai.GenerationConfig()
    beams.num_beams = 2
    with pytest.raises(ConfigError, match="beam search") as err:
        GenerationConfig.from_any(beams)
    assert_one_line(err.value)


@pytest.mark.parametrize("fields, name", [  # unknown policy, budget -5, budget < sinks+recent, bad options: test_eviction
    ({"budget": 0}, "budget"),
    ({"budget": True}, "budget"),
    ({"budget": 2.5}, "budget"),
    ({"score_window": -1}, "score_window"),
    ({"policy": 5}, "policy"),
    ({"policy": ["snapkv"]}, "policy"),
    ({"policy": "snapkv", "options": {"nope": 1}}, "nope"),
    ({"policy": "snapkv", "options": "window=8"}, "options"),
    ({"policy": "snapkv", "options": {"window": -1}}, "window"),
    ({"policy": "kvcrush", "options": {"base": "kvcrush"}}, "base"),
    ({"policy": "streaming", "evict_during_decode": "no"}, "evict_during_decode"),
    ({"policy": "snapkv", "windows": 8}, "windows"),
])
def test_bad_eviction_config(fields, name):
    with pytest.raises(ConfigError) as err:
        CacheEvictionConfig.from_any({"budget": 256, **fields})
    assert_one_line(err.value, name)


def test_eviction_config_inconsistent_with_the_engine():
    """Budget beyond the context / the default config's pool: test_eviction. Here: a per-request
    budget beyond the pool, a policy instance with options, and a config of the wrong type."""
    e = engine(num_kv_blocks=4, cache_size=0)
    with pytest.raises(ConfigError, match="pool") as err:
        e.add_request([5, 6, 7], GenerationConfig(max_new_tokens=4), eviction=CacheEvictionConfig("streaming", budget=512))
    assert_one_line(err.value, "budget")
    with pytest.raises(ConfigError, match="options") as err:
        CacheEvictionConfig(make_policy("snapkv"), budget=256, options={"window": 8})
    assert_one_line(err.value)
    with pytest.raises(ConfigError) as err:
        LLMEngine(tiny(), "CPU", SchedulerConfig(cache_size=0.01, cache_eviction_config="snapkv"))
    assert_one_line(err.value, "cache_eviction_config")
    assert not e.sequences


@pytest.mark.parametrize("sched, match", [
    ({"cache_size": 1e-9}, "holds no KV block"),
    ({"cache_size": 1e5}, "cache_size"),       # 100 TB: the allocation fails
    ({"cache_size": 1e300}, "cache_size"),
    ({"num_kv_blocks": 10**13, "cache_size": 0}, "num_kv_blocks"),
])
def test_pool_that_cannot_exist(sched, match):
    with pytest.raises(CacheCapacityError, match=match) as err:
        LLMEngine(tiny(), "CPU", SchedulerConfig(**sched))
    assert_one_line(err.value)


def test_bad_token_ids_at_the_engine():
    e = engine(num_kv_blocks=8, cache_size=0)
    for ids, match in [([5, 49152, 7], "vocabulary"), ([5, -1], "vocabulary"), ([], "empty"),
                       (["a", "b"], "integers"), ([[1, 2], [3]], "integers"), ([1.5], "integers")]:
        with pytest.raises(PromptError, match=match) as err:
            e.add_request(ids, GenerationConfig(max_new_tokens=2))
        assert_one_line(err.value)
    assert not e.sequences


def test_bad_prompts_and_arguments(f32_pipe):
    """Empty, over the maximum position, [bytes]: test_engine. Here: lone surrogates (what a
    non-UTF-8 argv or file read with surrogateescape gives), bytes, None, mixed lists, a streamer with
    a batch, an unknown backend."""
    pipe = f32_pipe
    for prompt in ["caf\udce9", "ok \ud800 ok", ["fine", "bad \udfff"]]:
        with pytest.raises(PromptError, match="UTF-8") as err:
            pipe.generate(prompt, max_new_tokens=2)
        assert_one_line(err.value, "prompt")
    for inputs in [b"caf\xc3\xa9", None, [], ["ok", 3]]:
        with pytest.raises(PromptError) as err:
            pipe.generate(inputs, max_new_tokens=2)
        assert_one_line(err.value)
    with pytest.raises(ConfigError, match="streamer") as err:
        pipe.generate(["a", "b"], max_new_tokens=2, streamer=print)
    assert_one_line(err.value)
    with pytest.raises(ConfigError, match="backend") as err:
        kvcrush_ov.LLMPipeline(tiny(), backend="gpu")
    assert_one_line(err.value)
    assert pipe.engine.blocks.num_used_blocks == 0 and not pipe.engine.has_unfinished


def copy_model(src, dst):
    for f in src.iterdir():
        shutil.copy(f, dst / f.name)
    return dst


@pytest.mark.parametrize("damage, match", [  # missing dir, empty dir, not an SDPA model, bad device: test_engine/test_cli
    (lambda d: (d / "openvino_detokenizer.xml").unlink(), "openvino_detokenizer.xml"),
    (lambda d: (d / "config.json").write_text("{not json"), "config.json"),
    (lambda d: (d / "generation_config.json").write_text("{not json"), "generation_config.json"),
    (lambda d: (d / "openvino_tokenizer.xml").write_text("<garbage"), "openvino_tokenizer.xml"),
    (lambda d: (d / "openvino_model.xml").write_text("<garbage"), "openvino_model.xml"),
    (lambda d: (d / "openvino_model.bin").write_bytes(b"\0" * 64), "openvino_model"),
])
def test_damaged_model_directory(tmp_path, tiny_llama_dir, damage, match):
    d = copy_model(tiny_llama_dir, tmp_path)
    damage(d)
    with pytest.raises(ModelError, match=match) as err:
        kvcrush_ov.LLMPipeline(d)
    assert_one_line(err.value)


def test_model_path_is_a_file(tmp_path, tiny_llama_dir):
    with pytest.raises(ModelError) as err:
        kvcrush_ov.LLMPipeline(tiny_llama_dir / "openvino_model.xml")
    assert_one_line(err.value, "openvino_model.xml")


def cli(*args: str | bytes) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvcrush_ov", *args], capture_output=True, timeout=300)


@pytest.mark.parametrize("args, match", [  # more in test_cli.py
    (["--cache-size", "-1"], "cache_size"),
    (["--num-kv-blocks", "-3", "--cache-size", "0"], "num_kv_blocks"),
    (["--max-num-seqs", "0"], "max_num_seqs"),
    (["--policy", "snapkv", "--policy-option", "window"], "KEY=VALUE"),
    (["--policy", "streaming", "--budget", "100000"], "context"),
    (["--prompt-file", "/no/such/prompt.txt"], "/no/such/prompt.txt"),
    (["--prompt", b"caf\xe9"], "UTF-8"),   # a non-UTF-8 argv arrives as lone surrogates
])
def test_cli_bad_input_is_one_line(tiny_llama_dir, args, match):
    argv = ["generate", "--model", "tiny-llama", "--max-new-tokens", "2"] + args
    if "--prompt" not in args and "--prompt-file" not in args:
        argv += ["--prompt", "hi"]
    proc = cli(*argv)
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == 2 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and match in lines[0], err


def test_cli_damaged_model(tmp_path, tiny_llama_dir):
    d = copy_model(tiny_llama_dir, tmp_path)
    (d / "config.json").write_text("{not json")
    proc = cli("generate", "--model", str(d), "--prompt", "hi")
    err = proc.stderr.decode()
    assert proc.returncode == 2 and "Traceback" not in err and err.startswith("error:") and "config.json" in err, err


# ------------------------------------------------------------------------------------------------
# Fuzz: only kvcrush_ov errors (one line) may escape config parsing; accepted configs are usable
# (load_jsonl is fuzzed in tests/test_eval_suite.py)
# ------------------------------------------------------------------------------------------------
ANY = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(), st.text(max_size=6), st.binary(max_size=4),
    st.lists(st.one_of(st.integers(-3, 5), st.text(max_size=2), st.none()), max_size=3),
    st.sets(st.one_of(st.integers(-3, 5), st.text(max_size=2)), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(-3, 40), max_size=2),
)
POLICY_OPTIONS = sorted({f.name for cls in POLICIES.values() for f in dataclasses.fields(cls) if f.init}
                        | {"base", "config", "representative_fraction", "anchors", "threshold", "top_fraction",
                           "anchor_combine", "seed", "shared_across_kv_heads"})


def fuzz_dicts(names, values=ANY):
    keys = st.one_of(st.sampled_from(sorted(names)), st.text(max_size=5), st.integers(-2, 2))
    return st.dictionaries(keys, values, max_size=5)


def only_our_errors(parse, value):
    try:
        return parse(value)
    except KVCrushError as e:
        assert_one_line(e)
        return None


@pytest.fixture(scope="module")
def fuzz_engine():
    return engine(num_kv_blocks=8, cache_size=0)


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(fields=fuzz_dicts([f.name for f in dataclasses.fields(SchedulerConfig)]))
def test_fuzz_scheduler_config(fields):
    cfg = only_our_errors(SchedulerConfig.from_any, fields)
    if cfg is not None:
        cfg.validate()
        assert 0 <= cfg.cache_size < float("inf") and cfg.num_kv_blocks >= 0


@FUZZ
@given(fields=fuzz_dicts([f.name for f in dataclasses.fields(GenerationConfig)]))
def test_fuzz_generation_config(fuzz_engine, fields):
    cfg = only_our_errors(GenerationConfig.from_any, fields)
    if cfg is not None:  # accepted: the engine takes it without surprises
        s = only_our_errors(lambda c: fuzz_engine.add_request([5, 6, 7], c, eviction=None), cfg)
        if s is not None:
            fuzz_engine.abort(s.seq_id)
        assert not fuzz_engine.has_unfinished


OPTION_VALUES = st.one_of(ANY, st.integers(0, 64), st.sampled_from(["snapkv", "h2o", "mean", "max", "median", "sum"]))


@FUZZ
@given(fields=fuzz_dicts([f.name for f in dataclasses.fields(CacheEvictionConfig)]),
       policy=st.sampled_from(sorted(POLICIES)), budget=st.integers(1, 300),
       options=fuzz_dicts(POLICY_OPTIONS, OPTION_VALUES))
def test_fuzz_eviction_config(fuzz_engine, fields, policy, budget, options):
    for value in (fields, {"policy": policy, "budget": budget, "options": options, **fields},
                  {"policy": policy, "budget": budget, "options": options}):
        cfg = only_our_errors(CacheEvictionConfig.from_any, value)
        if cfg is not None:  # accepted: the engine plans with it (or says why not, in one line)
            s = only_our_errors(lambda c: fuzz_engine.add_request([5, 6, 7], GenerationConfig(max_new_tokens=2), eviction=c), cfg)
            if s is not None:
                fuzz_engine.abort(s.seq_id)
