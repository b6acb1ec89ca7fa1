"""KVCache.compact without a model: the kept rows end up at slots 0..n-1 of the returned block order,
and blocks kept whole are remapped, not copied."""
import numpy as np
import pytest

from kvcrush_ov.core.engine.kv_cache import CacheLayout, KVCache, _row_view

HKV, BS, HD, POOL = 3, 4, 5, 24


def cache() -> KVCache:
    kv = object.__new__(KVCache)
    kv.layout = CacheLayout("f32", (HKV, BS, HD), (HKV, BS, HD), 32, BS)
    rng = np.random.default_rng(0)
    kv.keys = [rng.standard_normal((POOL, HKV, BS, HD)).astype(np.float32)]
    kv.values = [rng.standard_normal((POOL, HKV, BS, HD)).astype(np.float32)]
    kv._rows = [[_row_view(kv.keys[0]), _row_view(kv.values[0])]]
    return kv


def logical(pool: np.ndarray, table: list[int], n: int) -> np.ndarray:
    """[Hkv, n, hd]: the sequence's first n slots through its table."""
    return pool[table].transpose(1, 0, 2, 3).reshape(HKV, -1, HD)[:, :n]


def check(keep: np.ndarray, table: list[int]) -> list[int]:
    kv = cache()
    before = [logical(kv.keys[0], table, len(table) * BS), logical(kv.values[0], table, len(table) * BS)]
    untouched = kv.keys[0].copy()
    order = kv.compact(0, table, keep)
    assert sorted(order) == sorted(table)
    n = keep.shape[1]
    for pool, old in zip((kv.keys[0], kv.values[0]), before):
        assert np.array_equal(logical(pool, order, n), np.take_along_axis(old, keep[:, :, None], axis=1))
    outside = np.setdiff1d(np.arange(POOL), table)
    assert np.array_equal(kv.keys[0][outside], untouched[outside])  # no other sequence's block is written
    return order


@pytest.mark.parametrize("seed", range(5))
def test_random_keep_sets(seed):
    rng = np.random.default_rng(seed)
    table = rng.permutation(POOL)[:6].tolist()
    n = int(rng.integers(1, 6 * BS))
    keep = np.sort(np.stack([rng.choice(6 * BS, n, replace=False) for _ in range(HKV)]), axis=1)
    check(keep, table)


def test_a_recent_window_of_whole_blocks_is_remapped():
    table = [7, 3, 11, 5, 2, 9]  # 24 slots; keep the first block (sinks), scattered middles, the last 2 blocks
    middle = np.array([[5, 9, 10, 14], [4, 6, 13, 15], [6, 7, 8, 12]])
    keep = np.concatenate([np.tile(np.arange(4), (HKV, 1)), middle, np.tile(np.arange(16, 24), (HKV, 1))], axis=1)
    order = check(keep, table)
    assert order[:4] == [7, 3, 2, 9]  # blocks 4 and 5 now stand at positions 2 and 3, not copied
    assert sorted(order[4:]) == [5, 11]


def test_a_block_still_copied_into_is_not_remapped_away():
    table = [7, 3, 11, 5]
    assert check(np.tile(np.r_[0:4, 8:16], (HKV, 1)), table)[:3] == [7, 11, 5]  # 1 <- 2 <- 3: a chain of remaps
    # destination 1 could take block 2 whole, but slot 8 (in block 2's place) is copied into: 1 is copied
    assert check(np.tile(np.r_[0:4, 8:12, 13], (HKV, 1)), table)[:3] == [7, 3, 11]
