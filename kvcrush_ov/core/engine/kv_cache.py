"""The KV block pool tensors (one key and one value tensor per layer) and the three things done to
them outside the kernel: copy a block (copy-on-write), read a sequence's keys (scoring), and compact
kept slots to the front of a sequence's blocks (eviction)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import openvino as ov

from ..config import FLOAT_KV_PRECISIONS, KV_PRECISIONS, QUANTIZED_KV_PRECISIONS
from ..errors import ConfigError

PRECISION_NAMES = {getattr(ov.Type, name): name for name in (*KV_PRECISIONS, "i8")}  # compiled type -> name
QUANT_HEADER_BYTES = 8  # u8 rows/blocks carry an f32 scale and an f32 zero-point


@dataclass(frozen=True)
class CacheLayout:
    """How one layer's KV block is stored, as compiled (dims exclude the block axis)."""

    precision: str                # one of KV_PRECISIONS
    key_shape: tuple[int, ...]    # (Hkv, 32, hd) for floats; (Hkv, 32+8, hd) for u8 by-channel keys
    value_shape: tuple[int, ...]  # (Hkv, 32, hd) for floats; (Hkv, 32, hd+8) for u8
    bits: int                     # bits per stored element
    block_size: int

    @property
    def bytes_per_layer_block(self) -> int:
        """Key + value bytes of one block of one layer, scales and zero-points included."""
        return int(np.prod(self.key_shape) + np.prod(self.value_shape)) * self.bits // 8

    @property
    def num_kv_heads(self) -> int:
        return self.key_shape[0]

    @property
    def keys_by_channel(self) -> bool:
        """u8/u4 keys quantized per block and channel: scale/zp rows on top of the block's token rows."""
        return self.precision in QUANTIZED_KV_PRECISIONS and self.key_shape[1] != self.block_size

    @property
    def token_rows(self) -> bool:
        """Every token is one self-contained row of keys and of values (float, or u8 by token), so
        moving a token is a row copy."""
        return self.precision in FLOAT_KV_PRECISIONS or (self.precision in QUANTIZED_KV_PRECISIONS
                                                        and not self.keys_by_channel)


def _to_f32(x: np.ndarray, precision: str) -> np.ndarray:
    if precision == "bf16":  # OpenVINO hands bf16 storage out as a 2-byte dtype: reinterpret the bits
        return (x.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    if precision in QUANTIZED_KV_PRECISIONS:  # rows of [f32 scale, f32 zero-point, hd values]: (q - zp) * scale
        head = np.ascontiguousarray(x[..., :QUANT_HEADER_BYTES]).view(np.float32)
        q = x[..., QUANT_HEADER_BYTES:]
        if precision == "u4":  # two values a byte, high nibble first (measured against an f32 cache)
            q = np.stack([q >> 4, q & 0x0F], axis=-1).reshape(*q.shape[:-1], -1)
        return (q.astype(np.float32) - head[..., 1:2]) * head[..., 0:1]
    return x.astype(np.float32, copy=False)


def _dequantize_by_channel(k: np.ndarray) -> np.ndarray:
    """u8 key blocks [..., 8 + bs, hd]: rows 0-3 hold f32 scale[hd], rows 4-7 f32 zero-point[hd]."""
    head = np.ascontiguousarray(k[..., :QUANT_HEADER_BYTES, :])
    shape = head.shape[:-2]
    scale = head[..., :4, :].reshape(*shape, -1).view(np.float32)[..., None, :]
    zp = head[..., 4:, :].reshape(*shape, -1).view(np.float32)[..., None, :]
    return (k[..., QUANT_HEADER_BYTES:, :].astype(np.float32) - zp) * scale


def _row_view(blocks: np.ndarray) -> np.ndarray:
    """[N * Hkv * rows, row bytes] view of a pool tensor (raises rather than copy): one flat index per row."""
    rows = blocks.view()
    rows.shape = (-1, blocks.shape[-1])
    return rows


class KVCache:
    def __init__(self, compiled: ov.CompiledModel, request: ov.InferRequest, num_layers: int, num_blocks: int) -> None:
        key, value = compiled.input("key_cache.0"), compiled.input("value_cache.0")
        dims = lambda port: tuple(port.get_partial_shape()[i].get_length() for i in range(1, 4))  # noqa: E731
        et = key.get_element_type()
        self.layout = CacheLayout(PRECISION_NAMES.get(et, str(et)), dims(key), dims(value), et.bitwidth, dims(value)[1])
        self.num_layers = num_layers
        self.num_blocks = num_blocks
        # OpenVINO allocates the pool (untouched pages stay unmapped, so RSS grows with use); we keep
        # numpy views of the raw storage.
        self._tensors = []
        for layer in range(num_layers):
            for name, shape in ((f"key_cache.{layer}", self.layout.key_shape), (f"value_cache.{layer}", self.layout.value_shape)):
                tensor = ov.Tensor(compiled.input(name).get_element_type(), [num_blocks, *shape])
                request.set_tensor(name, tensor)
                self._tensors.append(tensor)
        self.key_tensors = self._tensors[0::2]  # the pool's own tensors (a compiled scorer reads them in place)
        # u4 storage comes out as flat packed bytes: view it as [blocks, Hkv, rows, row bytes]
        view = lambda t: t.data.reshape(num_blocks, *t.get_shape()[1:-1], -1)  # noqa: E731
        self.keys = [view(t) for t in self._tensors[0::2]]
        self.values = [view(t) for t in self._tensors[1::2]]
        self._rows = [[_row_view(k), _row_view(v)] for k, v in zip(self.keys, self.values)]

    @property
    def bytes_per_block_all_layers(self) -> int:
        """Key + value bytes of one block index across all layers (one block in every layer)."""
        return self.layout.bytes_per_layer_block * self.num_layers

    def copy_blocks(self, copies: list[tuple[int, int, int]]) -> None:
        for layer, src, dst in copies:
            self.keys[layer][dst] = self.keys[layer][src]
            self.values[layer][dst] = self.values[layer][src]

    def read_keys(self, layer: int, table: list[int], num_slots: int) -> np.ndarray:
        """Keys of slots 0..num_slots-1 of one sequence, f32 [Hkv, num_slots, hd]."""
        return self._read(self.keys[layer], table, num_slots, self.layout.keys_by_channel)

    def read_values(self, layer: int, table: list[int], num_slots: int) -> np.ndarray:
        """Values of slots 0..num_slots-1 of one sequence, f32 [Hkv, num_slots, hd] (quantized by token)."""
        return self._read(self.values[layer], table, num_slots, False)

    def _read(self, pool: np.ndarray, table: list[int], num_slots: int, by_channel: bool) -> np.ndarray:
        if self.layout.precision not in KV_PRECISIONS or (
                self.layout.precision == "u4" and self.layout.keys_by_channel):
            raise ConfigError(f"per-head scoring reads f32/f16/bf16/u8 caches and u4 by token, not "
                              f"{self.layout.precision}; set SchedulerConfig(kv_cache_precision='u8' or 'f16')")
        blocks = np.asarray(table[: -(-num_slots // self.layout.block_size)], dtype=np.int64)
        k = pool[blocks]                                   # [nb, Hkv, bs(+8), hd(+8)]
        if self.layout.precision in FLOAT_KV_PRECISIONS:  # convert while transposing: one pass, no temporaries
            nb, hkv, bs, hd = k.shape
            out = np.empty((hkv, nb, bs, hd), np.float32)
            if self.layout.precision == "bf16":
                np.left_shift(k.view(np.uint16).transpose(1, 0, 2, 3), 16, out=out.view(np.uint32), dtype=np.uint32)
            else:
                out[...] = k.transpose(1, 0, 2, 3)
            return out.reshape(hkv, nb * bs, hd)[:, :num_slots]
        k = _dequantize_by_channel(k) if by_channel else _to_f32(k, self.layout.precision)
        return k.transpose(1, 0, 2, 3).reshape(k.shape[1], -1, k.shape[3])[:, :num_slots]

    def compact(self, layer: int, table: list[int], keep: np.ndarray) -> list[int]:
        """Move kept slots keep[h] (sorted, [Hkv, n]) of each KV head to slots 0..n-1, in order; return
        the table's blocks in their new order (the caller's block manager applies it).

        Kept keys keep their RoPE rotation (their original positions), so nothing is recomputed. A
        destination block whose slots all come, in order, from one later block in every head (e.g. the
        recent window, when the evicted count is a multiple of the block size) takes that block in the
        table instead of being copied; the other rows move with one gather and one scatter per tensor."""
        return self.compact_layers([layer], [table], keep[None])[0]

    def compact_layers(self, layers: list[int], tables: list[list[int]], keeps: np.ndarray) -> list[list[int]]:
        """compact() for several layers that keep the same count (keeps [len(layers), Hkv, n]) and hold
        the same number of blocks: the row arithmetic is done once for all of them, then one gather and
        one scatter per pool tensor."""
        self.require_token_rows("eviction")
        nl, hkv, n = keeps.shape
        bs = self.layout.block_size
        blocks = np.asarray(tables, dtype=np.int64)                                  # [nl, nb]
        orders = np.stack([self._remap_whole_blocks(keep, blocks.shape[1], bs) for keep in keeps])
        dst = np.arange(n)
        arriving = orders[:, dst // bs] == dst // bs                                # in place or arriving whole
        li, head, slot = np.nonzero((keeps != dst) & arriving[:, None, :])            # rows to copy
        if li.size:
            src = keeps[li, head, slot]
            src_rows = (blocks[li, src // bs] * hkv + head) * bs + src % bs
            dst_rows = (blocks[li, slot // bs] * hkv + head) * bs + slot % bs
            bounds = np.searchsorted(li, np.arange(nl + 1))                          # li is sorted
            for i, layer in enumerate(layers):
                part = slice(bounds[i], bounds[i + 1])
                for rows in self._rows[layer]:  # the right side is gathered first (a copy): safe to overwrite
                    rows[dst_rows[part]] = rows[src_rows[part]]
        return [[table[j] for j in order] for table, order in zip(tables, orders.tolist())]

    @staticmethod
    def _remap_whole_blocks(keep: np.ndarray, num_blocks: int, bs: int) -> np.ndarray:
        """int [num_blocks]: order[j] = the old table position whose block becomes position j.

        Destination j takes block i (> j) when every head keeps exactly i's slots, in order, at j's slots,
        and block i is not needed in place as a destination that is copied into; blocks left over go last
        (the caller's trim releases them)."""
        hkv, n = keep.shape
        order = np.arange(num_blocks)
        full = n // bs
        if full == 0:
            return order
        first = keep[:, :full * bs:bs]                                    # [Hkv, full]: first source slot
        whole = (first % bs == 0) & (keep[:, bs - 1:full * bs:bs] - first == bs - 1) & (first == first[:1])
        source = first[0] // bs
        candidates = np.flatnonzero(whole.all(axis=0) & (source != np.arange(full)))
        if candidates.size == 0:
            return order
        kept_dst = -(-n // bs)
        remapped = np.zeros(num_blocks, dtype=bool)
        for j in candidates[::-1].tolist():  # sources lie after their destination: decide from the end
            i = int(source[j])
            if i >= kept_dst or remapped[i]:  # its own place is not copied into (it is gone or remapped too)
                remapped[j] = True
                order[j] = i
        if not remapped.any():
            return order
        used = np.zeros(num_blocks, dtype=bool)
        used[order[:kept_dst]] = True
        order[kept_dst:] = np.flatnonzero(~used)
        return order

    def require_token_rows(self, what: str) -> None:
        if not self.layout.token_rows:
            raise ConfigError(f"{what} needs one row per token (f32/f16/bf16, or u8 with keys by token); the "
                              f"compiled cache is {self.layout.precision}{' by channel' * self.layout.keys_by_channel}; "
                              f"set SchedulerConfig(kv_cache_precision='f16' or 'u8')")
