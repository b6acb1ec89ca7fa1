"""OpenVINO graph passes that turn an exported stateful LLM into the model the engine drives.

Imported as ``kvcrush_ov.core.transforms`` (this folder is mapped there in pyproject.toml). These passes know
OpenVINO graphs and nothing of scheduling.
"""
from .paged import PagedModelInfo, make_paged_model
from .gather_logits import gather_logits_before_lm_head
from .per_head_scores import expose_queries, paged_attention_nodes, uses_alibi
from .per_layer_lengths import split_lengths_per_layer
from .sliding_window import sliding_windows

__all__ = ["PagedModelInfo", "make_paged_model", "gather_logits_before_lm_head", "expose_queries",
           "paged_attention_nodes", "split_lengths_per_layer", "sliding_windows", "uses_alibi"]
