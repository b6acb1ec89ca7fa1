"""BlockManager without a model: the array form of the block tables (what the model runner feeds
PagedAttention) follows every mutation, including copy-on-write after forks and per-layer trims."""
import numpy as np
import pytest

from kvcrush_ov.core.engine.block_manager import BlockManager
from kvcrush_ov.core.errors import KVCrushError

L, BS = 3, 4


def concat_lists(b: BlockManager, seq_ids: list[int]) -> tuple[list[list[int]], np.ndarray]:
    """The reference: the lists, concatenated per layer the slow way."""
    ids = [[blk for s in seq_ids for blk in b.tables[s][layer]] for layer in range(L)]
    begins = np.array([np.cumsum([0] + [len(b.tables[s][layer]) for s in seq_ids]) for layer in range(L)])
    return ids, begins


def check_gather(b: BlockManager, seq_ids: list[int]) -> None:
    ids, begins = b.gather_tables(seq_ids)
    want_ids, want_begins = concat_lists(b, seq_ids)
    assert [row.tolist() for row in ids] == want_ids
    assert all(row.dtype == np.int32 and row.flags.c_contiguous for row in ids)
    assert begins.dtype == np.int32 and np.array_equal(begins, want_begins)
    b.check_invariants()


def test_tables_as_arrays_follow_allocation_trim_fork_and_free():
    b = BlockManager(num_blocks=40, num_layers=L, block_size=BS)
    b.allocate(1, 9)          # 3 blocks per layer
    b.commit(1, 9)
    b.allocate(2, 3)
    b.commit(2, 3)
    check_gather(b, [1, 2])
    check_gather(b, [2, 1])
    assert b.allocate(2, 4) == []  # room left in the last block: nothing to do
    b.allocate(1, 4 * BS * 5)  # grows past the array's first capacity
    check_gather(b, [1, 2])
    b.trim(1, [5, 12, 1])     # per-layer lengths after an eviction: layers differ
    check_gather(b, [2, 1])
    assert b.lens_of([1, 2]).tolist() == [[5, 3], [12, 3], [1, 3]]
    b.free(2)
    check_gather(b, [1])


def test_fork_then_copy_on_write_of_the_shared_last_block():
    b = BlockManager(num_blocks=20, num_layers=L, block_size=BS)
    b.allocate(1, 6)
    b.commit(1, 6)
    b.fork(1, 2)
    assert b.can_hold(2, 7) and b.num_new_blocks(2, 7).tolist() == [1] * L  # the private copy of block 2
    copies = b.allocate(2, 7)
    assert [(layer, src) for layer, src, _ in copies] == [(layer, b.tables[1][layer][-1]) for layer in range(L)]
    assert all(b.tables[2][layer][-1] == dst for layer, _, dst in copies)
    check_gather(b, [1, 2])
    assert b.num_new_blocks(1, 7).tolist() == [0] * L  # the parent's last block is its own again
    b.free(1)
    b.check_invariants()
    assert b.make_private(2, 8) == []  # nothing shared any more


def test_exhausted_pool_is_reported_before_any_change():
    b = BlockManager(num_blocks=3, num_layers=L, block_size=BS)
    b.allocate(1, 8)
    before = {k: [list(t) for t in v] for k, v in b.tables.items()}
    assert not b.can_hold(1, 16)
    with pytest.raises(KVCrushError, match="exhausted"):
        b.allocate(1, 16)
    assert b.tables == before
    b.check_invariants()


def test_have_room_agrees_with_allocate_for_a_decode_batch():
    """The scheduler's one-call check: True exactly where allocate() would change nothing."""
    b = BlockManager(num_blocks=40, num_layers=L, block_size=BS)
    b.allocate(1, 5); b.commit(1, 5)   # 2 blocks, 5 slots: the 6th fits
    b.allocate(2, 8); b.commit(2, 8)   # 2 blocks full: the 9th needs a block
    b.allocate(3, 7); b.commit(3, 7)
    b.trim(3, [7, 7, 4])               # layer 2 holds 1 full block: needs one there
    ids = [1, 2, 3, 99]                # 99 holds nothing
    room = b.have_room(ids, b.lens_of(ids) + 1)
    assert room.tolist() == [True, False, False, False]
    before = {s: [list(t) for t in b.tables[s]] for s in (1, 2, 3)}
    for s in (1, 2, 3):
        b.allocate(s, b.layer_lens(s) + 1)
    assert [b.tables[s] == before[s] for s in (1, 2, 3)] == [True, False, False]
    b.fork(1, 4)                       # a shared last block must be copied before writing: no room
    assert b.have_room([1, 4], b.lens_of([1, 4]) + 1).tolist() == [False, False]
    b.check_invariants()
