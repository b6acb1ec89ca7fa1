"""Decides WHAT runs each step: decodes first, then prompt chunks, within the step's tokens
(`step_tokens`, max_num_batched_tokens; not a plan's KV budget).

The rule follows openvino-genai's dynamic split-fuse scheduler so that, with the same kernels, both
engines feed the model the same batches: every decoding sequence gets its token first (in arrival
order), then prompts (in arrival order) are cut into chunks that fill the remaining
`max_num_batched_tokens`. When a decoding sequence needs a block and none is free, the most recently
arrived running sequence is preempted by recompute: its blocks are freed and it is prefilled again
later (its generated tokens are kept, so greedy output is unchanged). The scheduler alone moves a
sequence's progress (status, num_computed); the block manager holds where its KV lives.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .block_manager import BlockManager
from .sequence import Sequence, Status


@dataclass
class ScheduledChunk:
    seq: Sequence
    num_tokens: int  # tokens fed to the model this step, starting at seq.num_computed

    @property
    def samples(self) -> bool:
        """After this chunk every known token is computed, so the next one is sampled."""
        return self.seq.num_computed + self.num_tokens == len(self.seq.token_ids)


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    block_copies: list[tuple[int, int, int]] = field(default_factory=list)  # (layer, src, dst)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_batched_tokens: int, max_num_seqs: int) -> None:
        self.blocks = blocks
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.seqs: list[Sequence] = []  # unfinished, in arrival order

    def add(self, seq: Sequence) -> None:
        self.seqs.append(seq)

    def remove_finished(self) -> list[Sequence]:
        done = [s for s in self.seqs if s.is_finished]
        for s in done:
            self.blocks.free(s.seq_id)
        self.seqs = [s for s in self.seqs if not s.is_finished]
        return done

    @property
    def has_work(self) -> bool:
        return bool(self.seqs)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        step_tokens = self.max_num_batched_tokens  # tokens this step may still feed the model
        # 1. decodes: running sequences whose every token but the last sampled one is in the cache.
        decoding = [s for s in self.seqs if s.status is Status.RUNNING and s.num_uncomputed == 1]
        ids = [s.seq_id for s in decoding]
        # Most decodes write into a block they already hold: checked for all at once (preempting others
        # only frees blocks, so a sequence that has room keeps it through this loop).
        room = self.blocks.have_room(ids, self.blocks.lens_of(ids) + 1).tolist() if ids else []
        for seq, fits in zip(decoding, room):
            if step_tokens == 0:
                break
            if seq.status is not Status.RUNNING:  # preempted above, to make room for an older one
                continue
            if fits:
                out.chunks.append(ScheduledChunk(seq, 1))
                step_tokens -= 1
                continue
            grown = self.blocks.layer_lens(seq.seq_id) + 1
            while not self.blocks.can_hold(seq.seq_id, grown):
                victim = self._preemption_victim(exclude=out)
                if victim is None:
                    break
                self._preempt(victim, out)
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING or not self.blocks.can_hold(seq.seq_id, grown):
                continue
            out.block_copies += self.blocks.allocate(seq.seq_id, grown)
            out.chunks.append(ScheduledChunk(seq, 1))
            step_tokens -= 1
        # 2. prompt chunks (also recomputation after preemption), greedily in arrival order.
        holding = sum(1 for s in self.seqs if s.status is Status.RUNNING)
        for seq in self.seqs:
            if step_tokens == 0:
                break
            if seq in out.preempted:
                break  # keep arrival order: nothing newer overtakes a sequence preempted in this step
            if seq.is_finished or (seq.status is Status.RUNNING and seq.num_uncomputed <= 1):
                continue
            if seq.status is Status.WAITING and holding >= self.max_num_seqs:
                break
            n = self._chunk_size(seq, step_tokens)
            if seq.status is Status.WAITING and seq.eviction is not None and not self._admits(seq):
                break  # admitted in arrival order once its peak fits beside what running ones will claim
            if n <= 0 and seq.status is Status.RUNNING and not out.chunks:
                n = self._make_room(seq, out, step_tokens)  # a prompt stuck mid-prefill: nothing else would run
            if n <= 0:
                break  # keep arrival order: a later prompt does not overtake one that does not fit
            if seq.status is Status.WAITING:
                seq.status = Status.RUNNING
                holding += 1
            out.block_copies += self.blocks.allocate(seq.seq_id, self.blocks.layer_lens(seq.seq_id) + n)
            out.chunks.append(ScheduledChunk(seq, n))
            step_tokens -= n
        return out

    def footprint(self, num_tokens: int, num_new: int, plan) -> int:
        """Most KV slots a request (num_tokens to prefill, then num_new to generate) holds in a layer."""
        most = num_tokens + num_new
        if plan is None:
            return most
        bs = self.blocks.block_size
        grow = plan.decode_growth(bs) if plan.during_decode else num_new
        if plan.during_prefill:
            return min(most, max(plan.budget + plan.prefill_chunk + bs, plan.budget + grow))
        return min(most, max(num_tokens + 1, plan.budget + grow))  # the whole prompt once, then the budget

    def _peak_blocks(self, seq: Sequence) -> int:
        """Blocks per layer an evicting sequence holds at its peak from where it stands: its whole prompt
        (or one chunk past its budget) while prefilling, one block past its budget while decoding."""
        plan, num_new = seq.eviction, seq.config.max_new_tokens - seq.num_generated
        if seq.status is Status.WAITING or seq.num_uncomputed > 1:  # (re)filling its prompt
            return self.blocks.blocks_for(self.footprint(len(seq), num_new, plan))
        grow = plan.decode_growth(self.blocks.block_size) if plan.during_decode else num_new
        return self.blocks.blocks_for(min(self.blocks.cache_len(seq.seq_id) + num_new, plan.budget + grow))

    def _admits(self, seq: Sequence) -> bool:
        """Whether an evicting request may start: its peak must fit in the free blocks that running
        evicting sequences will not still claim (the rest of a prompt being prefilled whole, a decoder's
        growth to a block past its budget). So an admitted prompt completes without preempting, long
        prompts prefill one at a time when the pool is tight, and a waiting one blocks newer ones (no
        starvation). Full-cache sequences claim nothing ahead, as in openvino-genai (preemption covers them)."""
        claimed = 0
        for s in self.seqs:
            if s.status is Status.RUNNING and s.eviction is not None:
                held = max((len(t) for t in self.blocks.tables.get(s.seq_id, ())), default=0)
                claimed += max(0, self._peak_blocks(s) - held)
        return self.blocks.num_free_blocks - claimed >= self._peak_blocks(seq)

    def _chunk_size(self, seq: Sequence, step_tokens: int) -> int:
        """Tokens of `seq` this step can take: the step's tokens left, free slots, and for memory-bounded
        prefill what keeps the sequence within its budget + one chunk."""
        free_slots = self.blocks.num_free_blocks * self.blocks.block_size + self._slack(seq)
        n = min(step_tokens, seq.num_uncomputed, free_slots)
        plan = seq.eviction
        if plan is not None and plan.during_prefill:
            n = min(n, plan.budget + plan.prefill_chunk - self.blocks.cache_len(seq.seq_id))
        return n

    def _make_room(self, seq: Sequence, out: SchedulerOutput, step_tokens: int) -> int:
        """Preempt newer running sequences until `seq` can take a chunk; return its chunk size."""
        n = 0
        while n <= 0:
            victim = self._preemption_victim(exclude=out)
            if victim is None or victim is seq:
                return 0
            self._preempt(victim, out)
            n = self._chunk_size(seq, step_tokens)
        return n

    def postprocess(self, out: SchedulerOutput) -> None:
        """The model ran the scheduled chunks: their tokens are now in the cache."""
        for c in out.chunks:
            c.seq.num_computed += c.num_tokens
            self.blocks.commit(c.seq.seq_id, c.num_tokens)

    def _slack(self, seq: Sequence) -> int:
        """Free slots left in the sequence's last allocated block."""
        tables = self.blocks.tables.get(seq.seq_id)
        if not tables:
            return 0
        held = np.array([len(t) for t in tables]) * self.blocks.block_size
        return int((held - self.blocks.layer_lens(seq.seq_id)).min())

    def _preemption_victim(self, exclude: SchedulerOutput) -> Sequence | None:
        scheduled = {id(c.seq) for c in exclude.chunks}
        for seq in reversed(self.seqs):
            if seq.status is Status.RUNNING and id(seq) not in scheduled and seq not in exclude.preempted:
                return seq
        return None

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.blocks.free(seq.seq_id)
        seq.status = Status.WAITING
        seq.num_computed = 0
        seq.num_preemptions += 1
        out.preempted.append(seq)
