"""Runs score_graphs.py's compiled scorers: Scorer.window's and Scorer.expected's scores, by OpenVINO.

One compiled model per kind (window, expected) and set of layers scored together (usually every global
layer; one layer at a time once layers hold different lengths), with the main model's core, device and
thread settings, f32 inference: the global layers' window graph when the engine is built, the others
on first use. The pool's key tensors are bound once per compiled model: the graph
reads the live pool, so nothing is copied before an infer.
"""
from __future__ import annotations

import numpy as np
import openvino as ov

from ..config import FLOAT_KV_PRECISIONS
from .score_graphs import build_expected_graph, build_window_graph

# Settings of the main model that describe the KV cache, not how to run: not passed to the scorer.
_CACHE_KEYS = ("KV_CACHE_PRECISION", "KEY_CACHE_PRECISION", "VALUE_CACHE_PRECISION", "KEY_CACHE_GROUP_SIZE",
               "VALUE_CACHE_GROUP_SIZE", "KEY_CACHE_QUANT_MODE", "INFERENCE_PRECISION_HINT")


def _converts_inputs(compiled: ov.CompiledModel, prefix: str) -> bool:
    """Whether the device converts whole inputs named prefix* before using them: the CPU plugin does so for
    an element type it does not execute (f16 where the CPU has no f16 arithmetic), i.e. it would convert
    the whole pool at every infer instead of gathering a sequence's blocks first."""
    for op in compiled.get_runtime_model().get_ordered_ops():
        if op.get_friendly_name().startswith(prefix):
            for target in op.output(0).get_target_inputs():
                info = target.get_node().get_rt_info()
                if "layerType" in info and info["layerType"].astype(str) in ("Convert", "Reorder"):
                    return True
    return False


class CompiledScorer:
    def __init__(self, runner) -> None:
        """Compiles the graph of the global layers (what every eviction of equal-length layers scores) now:
        compiling takes ~0.5 s on a 30-layer model, which the first eviction should not pay."""
        self.runner = runner
        self._requests: dict[tuple[str, tuple[int, ...]], ov.InferRequest] = {}
        self.reads_pool_in_place = True
        self.prepare("window")

    def prepare(self, kind: str) -> None:
        """Compile the graph of the global layers for kind ("window" or "expected") if not yet done."""
        glob = tuple(int(i) for i in np.flatnonzero(np.asarray(self.runner.sliding_windows) == 0))
        if glob:  # (a model of sliding layers only is never scored: each keeps its newest slots)
            self._request(glob, kind)

    @staticmethod
    def supports(runner) -> bool:  # (and, once compiled, reads_pool_in_place)
        """Float pools only: a quantized row keeps its scale and zero-point as raw f32 bytes in the row,
        which a graph cannot reinterpret (those caches are scored by the numpy reference)."""
        return runner.layout.precision in FLOAT_KV_PRECISIONS and bool(runner.softmax_scales)

    def _request(self, layers: tuple[int, ...], kind: str = "window") -> ov.InferRequest:
        request = self._requests.get((kind, layers))
        if request is None:
            r = self.runner
            pool_type = r.kv.key_tensors[0].get_element_type()
            dims = (pool_type, r.num_q_heads, r.num_kv_heads, r.block_size, r.head_size)
            model = (build_window_graph(*dims, [r.sliding_windows[i] for i in layers]) if kind == "window"
                     else build_expected_graph(*dims, len(layers)))
            props = {k: v for k, v in r.compile_properties.items() if k not in _CACHE_KEYS}
            props["INFERENCE_PRECISION_HINT"] = ov.Type.f32  # scores must match the f32 reference
            compiled = r.core.compile_model(model, r.device, props)
            self.reads_pool_in_place &= not _converts_inputs(compiled, "key_cache.")
            request = compiled.create_infer_request()
            for i, layer in enumerate(layers):
                request.set_tensor(f"key_cache.{i}", r.kv.key_tensors[layer])
            self._requests[(kind, layers)] = request
        return request

    def _blocks_read(self, num_slots: int) -> int:
        """Blocks a call reads: the slots' blocks rounded up to one of 8 sizes per doubling (<= 1/8 more).
        A dynamic-shape graph prepares its kernels again for every new shape (~10+ ms at 4k slots): the
        prompt-end eviction of every request would pay it, as prompt lengths differ."""
        nb = -(-num_slots // self.runner.block_size)
        step = 1 << max(0, nb.bit_length() - 4)
        return -(-nb // step) * step

    def _rows(self, tables: list, layers: tuple[int, ...], num_slots: int, num_blocks: int) -> np.ndarray:
        """i32 [n, Hkv, num_blocks]: the pool row (block * Hkv + head) of each layer's blocks, per KV head;
        past the slots' own blocks, the last one again (read, then masked)."""
        hkv = self.runner.num_kv_heads
        blocks = np.array([tables[i][:-(-num_slots // self.runner.block_size)] for i in layers], dtype=np.int32)
        blocks = np.pad(blocks, ((0, 0), (0, num_blocks - blocks.shape[1])), mode="edge")
        return blocks[:, None, :] * hkv + np.arange(hkv, dtype=np.int32)[None, :, None]

    def _infer(self, request: ov.InferRequest, inputs: dict, num_slots: int) -> np.ndarray:
        request.set_tensors({name: ov.Tensor(value) for name, value in inputs.items()})
        request.infer()
        return request.get_tensor("scores").data[..., :num_slots].copy()  # the next infer reuses the buffer

    def window(self, tables: list, queries: np.ndarray, num_slots: int, layers: np.ndarray,
               causal: bool = True) -> np.ndarray:
        """Scorer.window's contract: [len(layers), Hq, num_slots] f32, queries [L, W, Hq, hd]."""
        sel = tuple(int(x) for x in layers)
        w, bs = queries.shape[1], self.runner.block_size
        nb = self._blocks_read(num_slots)
        scales = np.asarray(self.runner.softmax_scales, dtype=np.float32)[list(sel)]
        mask = np.zeros((w, nb * bs), bool)
        mask[:, :num_slots] = True
        if causal:  # query i is slot S - W + i: it may not look at the slots after it
            mask[:, num_slots - w:num_slots][np.triu_indices(w, 1)] = False
        return self._infer(self._request(sel), {
            "queries": queries[list(sel)] * scales[:, None, None, None],
            "block_rows": self._rows(tables, sel, num_slots, nb),
            "mask": mask,
            "window_slots": np.arange(num_slots - w, num_slots, dtype=np.int64),
        }, num_slots)

    def expected(self, tables: list, mean: np.ndarray, cov: np.ndarray | None, scales: np.ndarray, num_slots: int,
                 layers: np.ndarray) -> np.ndarray:
        """expected_attention.expected_scores without value norms: [len(layers), Hq, num_slots] f32 from the
        future queries' mean [n, Hq, hd] and covariance [n, Hq, hd, hd] (or None) of those layers."""
        sel = tuple(int(x) for x in layers)
        s = np.asarray(scales, dtype=np.float32).reshape(-1, 1, 1)
        nb = self._blocks_read(num_slots)
        mask = np.zeros((1, nb * self.runner.block_size), bool)
        mask[:, :num_slots] = True
        return self._infer(self._request(sel, "expected"), {
            "mean": mean.astype(np.float32) * s,
            "covariance": (np.zeros(mean.shape + mean.shape[-1:], np.float32) if cov is None
                           else cov.astype(np.float32) * (0.5 * s[..., None] ** 2)),
            "block_rows": self._rows(tables, sel, num_slots, nb),
            "mask": mask,
        }, num_slots)
