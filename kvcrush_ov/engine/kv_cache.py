"""The KV block pool tensors (one key and one value tensor per layer) and the three things done to
them outside the kernel: copy a block (copy-on-write), read a sequence's keys (scoring), and compact
kept slots to the front of a sequence's blocks (eviction)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import openvino as ov

from ..errors import ConfigError

PRECISION_NAMES = {ov.Type.f32: "f32", ov.Type.f16: "f16", ov.Type.bf16: "bf16", ov.Type.u8: "u8",
                   ov.Type.i8: "i8", ov.Type.u4: "u4"}
FLOAT_PRECISIONS = ("f32", "f16", "bf16")
QUANT_HEADER_BYTES = 8  # u8 rows/blocks carry an f32 scale and an f32 zero-point


@dataclass(frozen=True)
class CacheLayout:
    """How one layer's KV block is stored, as compiled (dims exclude the block axis)."""

    precision: str                # "f32", "f16", "bf16", "u8", "u4"
    key_shape: tuple[int, ...]    # (Hkv, 32, hd) for floats; (Hkv, 32+8, hd) for u8 by-channel keys
    value_shape: tuple[int, ...]  # (Hkv, 32, hd) for floats; (Hkv, 32, hd+8) for u8
    bits: int                     # bits per stored element
    block_size: int

    @property
    def bytes_per_block(self) -> int:
        """Key + value bytes of one block of one layer, scales and zero-points included."""
        return int(np.prod(self.key_shape) + np.prod(self.value_shape)) * self.bits // 8

    @property
    def num_kv_heads(self) -> int:
        return self.key_shape[0]

    @property
    def keys_by_channel(self) -> bool:
        """u8/u4 keys quantized per block and channel: scale/zp rows on top of the block's token rows."""
        return self.precision in ("u8", "u4") and self.key_shape[1] != self.block_size

    @property
    def token_rows(self) -> bool:
        """Every token is one self-contained row of keys and of values (float, or u8 by token), so
        moving a token is a row copy."""
        return self.precision in FLOAT_PRECISIONS or (self.precision in ("u8", "u4") and not self.keys_by_channel)


def _to_f32(x: np.ndarray, precision: str) -> np.ndarray:
    if precision == "bf16":  # OpenVINO hands bf16 storage out as a 2-byte dtype: reinterpret the bits
        return (x.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    if precision in ("u8", "u4"):  # rows of [f32 scale, f32 zero-point, hd values]: (q - zp) * scale
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
        # u4 storage comes out as flat packed bytes: view it as [blocks, Hkv, rows, row bytes]
        view = lambda t: t.data.reshape(num_blocks, *t.get_shape()[1:-1], -1)  # noqa: E731
        self.keys = [view(t) for t in self._tensors[0::2]]
        self.values = [view(t) for t in self._tensors[1::2]]

    @property
    def bytes_per_block(self) -> int:
        """All layers."""
        return self.layout.bytes_per_block * self.num_layers

    def copy_blocks(self, copies: list[tuple[int, int, int]]) -> None:
        for layer, src, dst in copies:
            self.keys[layer][dst] = self.keys[layer][src]
            self.values[layer][dst] = self.values[layer][src]

    def _slots(self, table: list[int], slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        bs = self.layout.block_size
        return np.asarray(table, dtype=np.int64)[slots // bs], slots % bs

    def read_keys(self, layer: int, table: list[int], num_slots: int) -> np.ndarray:
        """Keys of slots 0..num_slots-1 of one sequence, f32 [Hkv, num_slots, hd]."""
        return self._read(self.keys[layer], table, num_slots, self.layout.keys_by_channel)

    def read_values(self, layer: int, table: list[int], num_slots: int) -> np.ndarray:
        """Values of slots 0..num_slots-1 of one sequence, f32 [Hkv, num_slots, hd] (quantized by token)."""
        return self._read(self.values[layer], table, num_slots, False)

    def _read(self, pool: np.ndarray, table: list[int], num_slots: int, by_channel: bool) -> np.ndarray:
        if self.layout.precision not in FLOAT_PRECISIONS + ("u8", "u4") or (
                self.layout.precision == "u4" and self.layout.keys_by_channel):
            raise ConfigError(f"per-head scoring reads f32/f16/bf16/u8 caches and u4 by token, not "
                              f"{self.layout.precision}; set SchedulerConfig(kv_cache_precision='u8' or 'f16')")
        blocks = np.asarray(table[: -(-num_slots // self.layout.block_size)], dtype=np.int64)
        k = pool[blocks]                                   # [nb, Hkv, bs(+8), hd(+8)]
        if self.layout.precision in FLOAT_PRECISIONS:  # convert while transposing: one pass, no temporaries
            nb, hkv, bs, hd = k.shape
            out = np.empty((hkv, nb, bs, hd), np.float32)
            if self.layout.precision == "bf16":
                np.left_shift(k.view(np.uint16).transpose(1, 0, 2, 3), 16, out=out.view(np.uint32), dtype=np.uint32)
            else:
                out[...] = k.transpose(1, 0, 2, 3)
            return out.reshape(hkv, nb * bs, hd)[:, :num_slots]
        k = _dequantize_by_channel(k) if by_channel else _to_f32(k, self.layout.precision)
        return k.transpose(1, 0, 2, 3).reshape(k.shape[1], -1, k.shape[3])[:, :num_slots]

    def compact(self, layer: int, table: list[int], keep: np.ndarray) -> None:
        """Move kept slots keep[h] (sorted, [Hkv, n]) of each KV head to slots 0..n-1, in order.

        Kept keys keep their RoPE rotation (their original positions), so nothing is recomputed."""
        self.require_token_rows("eviction")
        hkv, n = keep.shape
        moved = keep != np.arange(n)  # kept slots before the first evicted one are already in place
        if not moved.any():
            return
        head, dst = np.nonzero(moved)
        src_block, src_off = self._slots(table, keep[head, dst])
        dst_block, dst_off = self._slots(table, dst)
        for cache in (self.keys[layer], self.values[layer]):
            rows = cache[src_block, head, src_off]        # gather first (a copy): safe to overwrite
            cache[dst_block, head, dst_off] = rows

    def require_token_rows(self, what: str) -> None:
        if not self.layout.token_rows:
            raise ConfigError(f"{what} needs one row per token (f32/f16/bf16, or u8 with keys by token); the "
                              f"compiled cache is {self.layout.precision}{' by channel' * self.layout.keys_by_channel}; "
                              f"set SchedulerConfig(kv_cache_precision='f16' or 'u8')")
