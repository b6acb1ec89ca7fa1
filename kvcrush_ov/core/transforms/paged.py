"""Stateful SDPA model -> PagedAttention model with per-layer block tables and score outputs."""
from __future__ import annotations

import re
from dataclasses import dataclass

import openvino as ov
from openvino._offline_transformations import paged_attention_transformation

from .gather_logits import gather_logits_before_lm_head


@dataclass(frozen=True)
class PagedModelInfo:
    """What the engine needs to know about the transformed graph."""

    num_layers: int
    q_width: int   # num_q_heads * head_size
    kv_width: int  # num_kv_heads * head_size (the cache tensors' head axis is only known after compile)
    has_score_outputs: bool
    has_per_layer_block_indices: bool
    gathers_logits: bool


def is_stateful_sdpa(model: ov.Model) -> bool:
    return any(op.get_type_name() == "ScaledDotProductAttention" for op in model.get_ops()) and bool(
        model.get_sinks())


def make_paged_model(model: ov.Model, *, score_outputs: bool = True, gather_logits: bool = True,
                     per_layer_block_indices: bool = True) -> PagedModelInfo:
    """Apply openvino's paged_attention_transformation in place (as openvino-genai does with eviction on:
    per-layer block indices and score outputs), then our logits gather. The caller checked the model is
    a stateful SDPA export.

    per_layer_block_indices=False: one `block_indices` input read by every layer, as openvino-genai
    compiles a full-cache pipeline (layers can only hold different blocks once they evict); a step
    then builds and binds one table instead of one per layer."""
    paged_attention_transformation(
        model,
        use_block_indices_inputs=per_layer_block_indices,
        use_score_outputs=score_outputs,
        allow_score_aggregation=True,  # as openvino-genai compiles it (same kernels, same numerics)
    )
    model.validate_nodes_and_infer_types()
    gathered = gather_logits and gather_logits_before_lm_head(model)
    key_caches = sorted(
        (p for p in model.get_parameters() if re.fullmatch(r"key_cache\.\d+", p.get_friendly_name())),
        key=lambda p: int(p.get_friendly_name().split(".")[1]),
    )
    pa_nodes = [op for op in model.get_ordered_ops() if op.get_type_name() == "PagedAttentionExtension"]
    k_shape = pa_nodes[0].input(1).get_partial_shape()  # new keys [T, num_kv_heads * head_size]
    return PagedModelInfo(
        num_layers=len(key_caches),
        q_width=pa_nodes[0].input(0).get_partial_shape()[1].get_length(),
        kv_width=k_shape[1].get_length(),
        has_score_outputs=score_outputs,
        has_per_layer_block_indices=per_layer_block_indices,
        gathers_logits=gathered,
    )
