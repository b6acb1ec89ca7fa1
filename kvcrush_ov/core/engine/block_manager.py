"""Owns WHERE KV lives: a pool of physical blocks per layer, each sequence's per-layer block table and
how many slots of it each layer holds (its per-layer length). Nothing else writes these.

Each layer has its own pool (its own key_cache.N/value_cache.N tensors), so after eviction layers may
hold different numbers of slots (PyramidKV). Blocks are reference-counted so a forked sequence shares
its parent's blocks copy-on-write (fan-out of one prefill to several policies).
"""
from __future__ import annotations

import numpy as np

from ..errors import KVCrushError


class BlockManager:
    def __init__(self, num_blocks: int, num_layers: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.num_layers = num_layers
        self.block_size = block_size
        # LIFO free lists (reversed so block 0 is handed out first, like a fresh pool).
        self._free: list[list[int]] = [list(range(num_blocks - 1, -1, -1)) for _ in range(num_layers)]
        self._ref = np.zeros((num_layers, num_blocks), dtype=np.int32)
        self.tables: dict[int, list[list[int]]] = {}
        self._lens: dict[int, np.ndarray] = {}  # [L] KV slots each layer of a sequence holds

    # -- queries -------------------------------------------------------------------------------
    def blocks_for(self, num_slots: int) -> int:
        return -(-num_slots // self.block_size)

    @property
    def num_free_blocks(self) -> int:
        """Free blocks in the tightest layer (all layers must fit a request)."""
        return min(len(f) for f in self._free)

    @property
    def num_used_blocks(self) -> int:
        """(layer, block) pairs in use, summed over layers: times a per-layer block size gives bytes."""
        return int((self._ref > 0).sum())

    def layer_lens(self, seq_id: int) -> np.ndarray:
        """int [L]: KV slots each layer of the sequence holds (zeros for a sequence holding no blocks)."""
        lens = self._lens.get(seq_id)
        return np.zeros(self.num_layers, dtype=np.int64) if lens is None else lens.copy()

    def cache_len(self, seq_id: int) -> int:
        """KV slots the sequence holds in its longest layer."""
        lens = self._lens.get(seq_id)
        return 0 if lens is None else int(lens.max())

    def is_uneven(self, seq_id: int) -> bool:
        """Whether the sequence's layers hold different lengths (after a per-layer eviction)."""
        lens = self._lens.get(seq_id)
        return lens is not None and bool((lens != lens[0]).any())

    def num_new_blocks(self, seq_id: int, num_slots: int | np.ndarray) -> np.ndarray:
        """int [L]: blocks each layer must still allocate so that the sequence holds num_slots slots
        there (int, or per layer), counting the private copy allocate() makes of a last block shared
        with a fork."""
        slots = np.broadcast_to(np.asarray(num_slots, dtype=np.int64), (self.num_layers,))
        tables = self.tables.get(seq_id) or [[] for _ in range(self.num_layers)]
        return np.array([max(0, self.blocks_for(int(n)) - len(t)) + self._copies_last(layer, t, int(n))
                         for layer, (t, n) in enumerate(zip(tables, slots))])

    def _copies_last(self, layer: int, table: list[int], num_slots: int) -> int:
        """1 if allocate() must copy the table's last block first (shared copy-on-write), else 0."""
        return int(bool(table) and num_slots > 0 and self._ref[layer, table[-1]] > 1)

    def can_hold(self, seq_id: int, num_slots: int | np.ndarray) -> bool:
        """Whether every layer has the free blocks to hold num_slots slots (int, or per layer)."""
        free = np.array([len(f) for f in self._free])
        return bool((self.num_new_blocks(seq_id, num_slots) <= free).all())

    # -- mutations ------------------------------------------------------------------------------
    def allocate(self, seq_id: int, num_slots: int | np.ndarray) -> list[tuple[int, int, int]]:
        """Grow the sequence's tables to hold num_slots slots in every layer (or num_slots[layer]).

        Returns copy-on-write work (layer, src_block, dst_block): when the last, partly filled block is
        shared with a fork, it is replaced by a private copy before new tokens are written into it.
        The caller (model runner) copies the block contents.
        """
        tables = self.tables.setdefault(seq_id, [[] for _ in range(self.num_layers)])
        self._lens.setdefault(seq_id, np.zeros(self.num_layers, dtype=np.int64))
        slots = np.broadcast_to(np.asarray(num_slots), (self.num_layers,))
        copies: list[tuple[int, int, int]] = []
        for layer, table in enumerate(tables):
            need = self.blocks_for(int(slots[layer]))
            free = self._free[layer]
            if max(0, need - len(table)) + self._copies_last(layer, table, int(slots[layer])) > len(free):
                raise KVCrushError(f"KV pool exhausted in layer {layer}: scheduler admitted more than fits")
            if table and self._ref[layer, table[-1]] > 1 and slots[layer] > 0:
                # Writing into a shared block: give this sequence its own copy first.
                src, dst = table[-1], free.pop()
                self._ref[layer, src] -= 1
                self._ref[layer, dst] = 1
                table[-1] = dst
                copies.append((layer, src, dst))
            while len(table) < need:
                block = free.pop()
                self._ref[layer, block] = 1
                table.append(block)
        return copies

    def commit(self, seq_id: int, num_tokens: int) -> None:
        """The model wrote num_tokens new slots into every layer of the sequence (after allocate)."""
        lens = self._lens[seq_id]
        lens += num_tokens
        held = np.array([len(t) for t in self.tables[seq_id]]) * self.block_size
        if (lens > held).any():
            raise KVCrushError(f"sequence {seq_id} wrote past its allocated blocks")

    def can_make_private(self, seq_id: int, num_slots: int) -> bool:
        """Whether make_private(seq_id, num_slots) finds a free block for every block it must copy."""
        n = self.blocks_for(num_slots)
        return all(int((self._ref[layer, table[:n]] > 1).sum()) <= len(self._free[layer])
                   for layer, table in enumerate(self.tables[seq_id]))

    def make_private(self, seq_id: int, num_slots: int) -> list[tuple[int, int, int]]:
        """Give the sequence its own copy of every shared block among those holding slots
        0..num_slots-1 (before compaction writes there). Returns the (layer, src, dst) copies to do."""
        copies = []
        for layer, table in enumerate(self.tables[seq_id]):
            for i in range(min(len(table), self.blocks_for(num_slots))):
                src = table[i]
                if self._ref[layer, src] > 1:
                    if not self._free[layer]:
                        raise KVCrushError(f"KV pool exhausted in layer {layer} while un-sharing a forked block")
                    dst = self._free[layer].pop()
                    self._ref[layer, src] -= 1
                    self._ref[layer, dst] = 1
                    table[i] = dst
                    copies.append((layer, src, dst))
        return copies

    def trim(self, seq_id: int, num_slots_per_layer: np.ndarray | list[int]) -> None:
        """After compaction: each layer now holds num_slots_per_layer[layer] slots; release the tail
        blocks a layer no longer needs."""
        self._lens[seq_id] = np.asarray(num_slots_per_layer, dtype=np.int64).copy()
        for layer, (table, n) in enumerate(zip(self.tables[seq_id], num_slots_per_layer)):
            keep = self.blocks_for(int(n))
            for block in table[keep:]:
                self._release(layer, block)
            del table[keep:]

    def fork(self, parent_id: int, child_id: int) -> None:
        """The child shares every block of the parent (copy-on-write)."""
        if child_id in self.tables:
            raise KVCrushError(f"sequence {child_id} already has blocks")
        parent = self.tables[parent_id]
        self.tables[child_id] = [list(t) for t in parent]
        self._lens[child_id] = self._lens[parent_id].copy()
        for layer, table in enumerate(parent):
            self._ref[layer, table] += 1

    def free(self, seq_id: int) -> None:
        """Return every block of the sequence (no-op if it holds none)."""
        self._lens.pop(seq_id, None)
        for layer, table in enumerate(self.tables.pop(seq_id, [])):
            for block in table:
                self._release(layer, block)

    def _release(self, layer: int, block: int) -> None:
        ref = self._ref[layer, block]
        if ref <= 0:
            raise KVCrushError(f"double free of block {block} in layer {layer}")
        self._ref[layer, block] = ref - 1
        if ref == 1:
            self._free[layer].append(block)

    def check_invariants(self) -> None:
        """Ref counts equal the number of tables holding each block; free lists hold exactly the rest;
        every sequence's blocks hold its per-layer lengths."""
        if set(self._lens) != set(self.tables):
            raise AssertionError("per-layer lengths and block tables name different sequences")
        for seq_id, tables in self.tables.items():
            if any(len(t) < self.blocks_for(int(n)) for t, n in zip(tables, self._lens[seq_id])):
                raise AssertionError(f"sequence {seq_id} holds more slots than its blocks")
        expected = np.zeros_like(self._ref)
        for tables in self.tables.values():
            for layer, table in enumerate(tables):
                np.add.at(expected[layer], table, 1)
        if not np.array_equal(expected, self._ref):
            raise AssertionError("block ref counts disagree with the block tables")
        for layer, free in enumerate(self._free):
            if len(set(free)) != len(free) or set(free) != set(np.flatnonzero(self._ref[layer] == 0).tolist()):
                raise AssertionError(f"free list of layer {layer} disagrees with ref counts")
