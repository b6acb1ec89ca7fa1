"""Runs window_graph.py's compiled scorer: the window scores of Scorer.window, by OpenVINO.

One compiled model per set of layers scored together (usually every global layer; one layer at a time
once layers hold different lengths), compiled on first use with the main model's core, device and
thread settings, f32 inference. The pool's key tensors are bound once per compiled model: the graph
reads the live pool, so nothing is copied before an infer.
"""
from __future__ import annotations

import numpy as np
import openvino as ov

from ..config import FLOAT_KV_PRECISIONS
from .window_graph import build_window_graph

# Settings of the main model that describe the KV cache, not how to run: not passed to the scorer.
_CACHE_KEYS = ("KV_CACHE_PRECISION", "KEY_CACHE_PRECISION", "VALUE_CACHE_PRECISION", "KEY_CACHE_GROUP_SIZE",
               "VALUE_CACHE_GROUP_SIZE", "KEY_CACHE_QUANT_MODE", "INFERENCE_PRECISION_HINT")


class CompiledWindowScorer:
    def __init__(self, runner) -> None:
        """Compiles the graph of the global layers (what every eviction of equal-length layers scores) now:
        compiling takes ~0.5 s on a 30-layer model, which the first eviction should not pay."""
        self.runner = runner
        self._requests: dict[tuple[int, ...], ov.InferRequest] = {}
        glob = tuple(int(i) for i in np.flatnonzero(np.asarray(runner.sliding_windows) == 0))
        if glob:  # (a model of sliding layers only is never scored: each keeps its newest slots)
            self._request(glob)

    @staticmethod
    def supports(runner) -> bool:
        """Float pools only: a quantized row keeps its scale and zero-point as raw f32 bytes in the row,
        which a graph cannot reinterpret (those caches are scored by the numpy reference)."""
        return runner.layout.precision in FLOAT_KV_PRECISIONS and bool(runner.softmax_scales)

    def _request(self, layers: tuple[int, ...]) -> ov.InferRequest:
        request = self._requests.get(layers)
        if request is None:
            r = self.runner
            pool_type = r.kv.key_tensors[0].get_element_type()
            model = build_window_graph(pool_type, r.num_q_heads, r.num_kv_heads, r.block_size, r.head_size,
                                       [r.sliding_windows[i] for i in layers])
            props = {k: v for k, v in r.compile_properties.items() if k not in _CACHE_KEYS}
            props["INFERENCE_PRECISION_HINT"] = ov.Type.f32  # scores must match the f32 reference
            request = r.core.compile_model(model, r.device, props).create_infer_request()
            for i, layer in enumerate(layers):
                request.set_tensor(f"key_cache.{i}", r.kv.key_tensors[layer])
            self._requests[layers] = request
        return request

    def window(self, tables: list, queries: np.ndarray, num_slots: int, layers: np.ndarray,
               causal: bool = True) -> np.ndarray:
        """Scorer.window's contract: [len(layers), Hq, num_slots] f32, queries [L, W, Hq, hd]."""
        sel = tuple(int(x) for x in layers)
        request = self._request(sel)
        w, bs, hkv = queries.shape[1], self.runner.block_size, self.runner.num_kv_heads
        nb = -(-num_slots // bs)
        blocks = np.array([tables[i][:nb] for i in sel], dtype=np.int32)                  # [n, nb]
        rows = blocks[:, None, :] * hkv + np.arange(hkv, dtype=np.int32)[None, :, None]   # [n, Hkv, nb]
        scales = np.asarray(self.runner.softmax_scales, dtype=np.float32)[list(sel)]
        window_slots = np.arange(num_slots - w, num_slots, dtype=np.int64)
        bias = np.zeros((w, nb * bs), np.float32)
        bias[:, num_slots:] = -np.inf
        if causal:  # query i is slot S - W + i: it may not look at the slots after it
            bias[:, num_slots - w:num_slots][np.triu_indices(w, 1)] = -np.inf
        request.set_tensors({
            "queries": ov.Tensor(queries[list(sel)] * scales[:, None, None, None]),
            "block_rows": ov.Tensor(rows),
            "bias": ov.Tensor(bias),
            "window_slots": ov.Tensor(window_slots),
        })
        request.infer()
        return request.get_tensor("scores").data[..., :num_slots].copy()  # the next infer reuses the buffer
