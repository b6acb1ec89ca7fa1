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
        # The same tables as arrays, for per-step work without per-layer Python loops (written only
        # together with `tables`, by _set_block/_append/_truncate): [L, capacity] block ids and [L] counts.
        self._arrays: dict[int, np.ndarray] = {}
        self._counts: dict[int, np.ndarray] = {}
        self._shared: bool | None = False  # whether any block is shared (None: recount)

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
        return self.num_layers * self.num_blocks - sum(map(len, self._free))  # the free lists hold the rest

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
        slots = np.asarray(num_slots, dtype=np.int64)
        counts = self._counts.get(seq_id)
        if counts is None:
            return np.broadcast_to(-(-slots // self.block_size), (self.num_layers,)).copy()
        return np.maximum(-(-slots // self.block_size) - counts, 0) + self._copies_last(seq_id, slots)

    def _copies_last(self, seq_id: int, slots: np.ndarray) -> np.ndarray:
        """int [L]: 1 where allocate() must copy the table's last block first (shared copy-on-write)."""
        if not self._any_shared():
            return np.zeros(self.num_layers, dtype=np.int64)
        counts = self._counts[seq_id]
        layers = np.arange(self.num_layers)
        last = self._arrays[seq_id][layers, np.maximum(counts - 1, 0)]
        return ((counts > 0) & (slots > 0) & (self._ref[layers, last] > 1)).astype(np.int64)

    def _has_room(self, seq_id: int, num_slots: int | np.ndarray) -> bool:
        """Whether every layer's blocks already hold num_slots and none is shared (most decode steps)."""
        counts = self._counts.get(seq_id)
        return counts is not None and not self._any_shared() and bool((counts * self.block_size >= num_slots).all())

    def _any_shared(self) -> bool:
        if self._shared is None:
            self._shared = bool((self._ref > 1).any())
        return self._shared

    def have_room(self, seq_ids: list[int], num_slots: np.ndarray) -> np.ndarray:
        """bool [len(seq_ids)]: whether each sequence's blocks already hold num_slots[:, i] slots in every
        layer with no block shared (allocate() would do nothing): one check for a whole decode batch."""
        if not seq_ids or self._any_shared():
            return np.zeros(len(seq_ids), dtype=bool)
        zeros = np.zeros(self.num_layers, dtype=np.int64)
        counts = np.stack([self._counts.get(s, zeros) for s in seq_ids], axis=1)  # [L, S]
        return (counts * self.block_size >= num_slots).all(axis=0)

    def free_counts(self) -> np.ndarray:
        """int [L]: free blocks in each layer."""
        return np.fromiter(map(len, self._free), dtype=np.int64, count=self.num_layers)

    def can_hold(self, seq_id: int, num_slots: int | np.ndarray) -> bool:
        """Whether every layer has the free blocks to hold num_slots slots (int, or per layer)."""
        if self._has_room(seq_id, num_slots):
            return True
        return bool((self.num_new_blocks(seq_id, num_slots) <= self.free_counts()).all())

    def lens_of(self, seq_ids: list[int]) -> np.ndarray:
        """int [L, len(seq_ids)]: KV slots each layer of each sequence holds (one array, no copies each)."""
        zeros = np.zeros(self.num_layers, dtype=np.int64)
        return np.stack([self._lens.get(s, zeros) for s in seq_ids], axis=1)

    def gather_tables(self, seq_ids: list[int], layers: int | None = None) -> tuple[list[np.ndarray], np.ndarray]:
        """The block tables of the sequences, concatenated in order, as PagedAttention reads them:
        per layer the int32 block ids, and int32 [L, len(seq_ids)+1] where each sequence's ids begin.
        layers: only the first this many layers (1 when every layer holds the same blocks)."""
        nl = self.num_layers if layers is None else layers
        empty = np.zeros((nl, 0), dtype=np.int32)
        zeros = np.zeros(nl, dtype=np.int64)
        counts = np.stack([self._counts[s][:nl] if s in self._counts else zeros for s in seq_ids], axis=1)  # [L, B]
        begins = np.zeros((nl, len(seq_ids) + 1), dtype=np.int32)
        np.cumsum(counts, axis=1, out=begins[:, 1:])
        widths = counts.max(axis=0)
        ids = np.concatenate([self._arrays[s][:nl, :w] if s in self._arrays else empty
                              for s, w in zip(seq_ids, widths)], axis=1)
        if (counts == widths).all():  # every layer holds as many blocks (the common case): rows as they are
            return list(ids), begins
        local = np.arange(ids.shape[1]) - np.repeat(np.cumsum(widths) - widths, widths)  # index in its table
        valid = local < np.repeat(counts, widths, axis=1)
        return [row[keep] for row, keep in zip(ids, valid)], begins

    # -- mutations ------------------------------------------------------------------------------
    def allocate(self, seq_id: int, num_slots: int | np.ndarray) -> list[tuple[int, int, int]]:
        """Grow the sequence's tables to hold num_slots slots in every layer (or num_slots[layer]).

        Returns copy-on-write work (layer, src_block, dst_block): when the last, partly filled block is
        shared with a fork, it is replaced by a private copy before new tokens are written into it.
        The caller (model runner) copies the block contents.
        """
        if self._has_room(seq_id, num_slots):
            return []
        if seq_id not in self.tables:
            self.tables[seq_id] = [[] for _ in range(self.num_layers)]
            self._lens[seq_id] = np.zeros(self.num_layers, dtype=np.int64)
            self._arrays[seq_id] = np.zeros((self.num_layers, 4), dtype=np.int32)
            self._counts[seq_id] = np.zeros(self.num_layers, dtype=np.int64)
        slots = np.broadcast_to(np.asarray(num_slots, dtype=np.int64), (self.num_layers,))
        grow = np.maximum(-(-slots // self.block_size) - self._counts[seq_id], 0)
        cow = self._copies_last(seq_id, slots)
        if not (grow.any() or cow.any()):
            return []
        short = np.flatnonzero(grow + cow > self.free_counts())
        if short.size:
            raise KVCrushError(f"KV pool exhausted in layer {int(short[0])}: scheduler admitted more than fits")
        copies: list[tuple[int, int, int]] = []
        for layer in np.flatnonzero(cow).tolist():  # writing into a shared block: a private copy first
            last = len(self.tables[seq_id][layer]) - 1
            src, dst = self.tables[seq_id][layer][last], self._free[layer].pop()
            self._ref[layer, src] -= 1
            self._ref[layer, dst] = 1
            self._shared = None
            self._set_block(seq_id, layer, last, dst)
            copies.append((layer, src, dst))
        for layer in np.flatnonzero(grow).tolist():
            free = self._free[layer]
            new = [free.pop() for _ in range(int(grow[layer]))]
            self._ref[layer, new] = 1
            self._append(seq_id, layer, new)
        return copies

    def commit(self, seq_id: int, num_tokens: int) -> None:
        """The model wrote num_tokens new slots into every layer of the sequence (after allocate)."""
        lens = self._lens[seq_id]
        lens += num_tokens
        if (lens > self._counts[seq_id] * self.block_size).any():
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
        if not self._any_shared():
            return copies
        for layer, table in enumerate(self.tables[seq_id]):
            for i in range(min(len(table), self.blocks_for(num_slots))):
                src = table[i]
                if self._ref[layer, src] > 1:
                    if not self._free[layer]:
                        raise KVCrushError(f"KV pool exhausted in layer {layer} while un-sharing a forked block")
                    dst = self._free[layer].pop()
                    self._ref[layer, src] -= 1
                    self._ref[layer, dst] = 1
                    self._shared = None
                    self._set_block(seq_id, layer, i, dst)
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
            self._truncate(seq_id, layer, keep)

    def reorder(self, seq_id: int, layer: int, order: list[int]) -> None:
        """The sequence's blocks of one layer in a new order (compaction moved whole blocks by remapping)."""
        table = self.tables[seq_id][layer]
        if order == table:
            return
        if sorted(order) != sorted(table):
            raise KVCrushError(f"reorder of sequence {seq_id}, layer {layer}: not a permutation of its blocks")
        for i, block in enumerate(order):
            self._set_block(seq_id, layer, i, block)

    def fork(self, parent_id: int, child_id: int) -> None:
        """The child shares every block of the parent (copy-on-write)."""
        if child_id in self.tables:
            raise KVCrushError(f"sequence {child_id} already has blocks")
        parent = self.tables[parent_id]
        self.tables[child_id] = [list(t) for t in parent]
        self._lens[child_id] = self._lens[parent_id].copy()
        self._arrays[child_id] = self._arrays[parent_id].copy()
        self._counts[child_id] = self._counts[parent_id].copy()
        for layer, table in enumerate(parent):
            self._ref[layer, table] += 1
        self._shared = None

    def free(self, seq_id: int) -> None:
        """Return every block of the sequence (no-op if it holds none)."""
        self._lens.pop(seq_id, None)
        self._arrays.pop(seq_id, None)
        self._counts.pop(seq_id, None)
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
        elif self._shared:
            self._shared = None  # it may have been the last shared block

    # The three writers of a table: the list and its array copy change together.
    def _set_block(self, seq_id: int, layer: int, index: int, block: int) -> None:
        self.tables[seq_id][layer][index] = block
        self._arrays[seq_id][layer, index] = block

    def _append(self, seq_id: int, layer: int, blocks: list[int]) -> None:
        counts, arr = self._counts[seq_id], self._arrays[seq_id]
        end = int(counts[layer]) + len(blocks)
        if end > arr.shape[1]:
            arr = self._arrays[seq_id] = np.pad(arr, ((0, 0), (0, max(end, 2 * arr.shape[1]) - arr.shape[1])))
        arr[layer, counts[layer]:end] = blocks
        counts[layer] = end
        self.tables[seq_id][layer].extend(blocks)

    def _truncate(self, seq_id: int, layer: int, keep: int) -> None:
        del self.tables[seq_id][layer][keep:]
        self._counts[seq_id][layer] = min(keep, int(self._counts[seq_id][layer]))

    def check_invariants(self) -> None:
        """Ref counts equal the number of tables holding each block; free lists hold exactly the rest;
        every sequence's blocks hold its per-layer lengths."""
        if not set(self._lens) == set(self.tables) == set(self._arrays) == set(self._counts):
            raise AssertionError("per-layer lengths and block tables name different sequences")
        for seq_id, tables in self.tables.items():
            if [self._arrays[seq_id][layer, :n].tolist() for layer, n in enumerate(self._counts[seq_id])] != tables:
                raise AssertionError(f"sequence {seq_id}: the block table arrays disagree with the lists")
        if self._shared is not None and self._shared != bool((self._ref > 1).any()):
            raise AssertionError("the shared-block flag is stale")
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
