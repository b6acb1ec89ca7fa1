"""Expose what per-head attention scores need: each layer's post-RoPE queries.

OpenVINO's PagedAttention outputs `scores.N` summed over all query heads, so the per-head view that
KVCrush's signatures (one bit per head) and per-KV-head SnapKV need is not there. Input 0 of every
PagedAttention node is the post-RoPE query [T, Hq * head_size]; we add it as an output `queries.N`.
The engine keeps the last W queries of each sequence and scores them against the paged key cache in
numpy (only when it is about to evict), which costs nothing on steps that do not evict and keeps the
OpenVINO kernel untouched (same numerics as without eviction).
"""
from __future__ import annotations

import math

import numpy as np
import openvino as ov
import openvino.opset13 as ops


def paged_attention_nodes(model: ov.Model) -> list[ov.Node]:
    """PagedAttention nodes ordered by layer (the N of the key_cache.N they read)."""
    nodes = [op for op in model.get_ordered_ops() if op.get_type_name() == "PagedAttentionExtension"]
    return sorted(nodes, key=lambda n: int(n.input_value(3).get_node().get_friendly_name().split(".")[1]))


def _constant_scalar(output: ov.Output) -> float | None:
    node = output.get_node()
    while node.get_type_name() == "Convert":
        node = node.input_value(0).get_node()
    if node.get_type_name() == "Constant":
        values = np.asarray(node.get_data(), dtype=np.float64).reshape(-1)
        if values.size == 1:
            return float(values[0])
    return None


def expose_queries(model: ov.Model, head_size: int) -> list[float]:
    """Add `queries.N` outputs; return each layer's softmax scale (the PA node's own constant)."""
    scales = []
    for layer, node in enumerate(paged_attention_nodes(model)):
        result = ops.result(node.input_value(0))
        result.output(0).get_tensor().set_names({f"queries.{layer}"})
        result.set_friendly_name(f"queries.{layer}")
        model.add_results([result])
        scale = _constant_scalar(node.input_value(9))
        if scale is None and not head_size:
            raise ValueError(f"layer {layer}: the softmax scale is not a constant and the head size is unknown")
        scales.append(scale if scale is not None else 1.0 / math.sqrt(head_size))
    model.validate_nodes_and_infer_types()
    return scales


ALIBI_SLOPES_INPUT = 11


def uses_alibi(model: ov.Model) -> bool:
    """True when some layer adds ALiBi position biases (Bloom, MPT), which per-head scoring does not model."""
    for node in paged_attention_nodes(model):
        shape = node.input(ALIBI_SLOPES_INPUT).get_partial_shape()
        if shape.rank.is_dynamic or any(d.is_dynamic or d.get_length() > 0 for d in shape):
            return True
    return False
