"""Read each layer's sliding attention window from the paged graph (0 = the layer sees every token).

openvino's paged transformation recognises the sliding-window masks of Mistral, Phi-3 and Gemma 2/3
exports and feeds the window to input 10 of the layer's PagedAttention node, often as a small constant
subgraph (e.g. Squeeze(Constant(-48)) * -1) rather than one Constant. We fold that subgraph by
compiling it on its own; the kernel applies the window to cache slots, the engine needs it to score and
evict (a sliding layer never sees tokens older than its window).
"""
from __future__ import annotations

import numpy as np
import openvino as ov
import openvino.opset13 as ops

from .per_head_scores import paged_attention_nodes

SLIDING_WINDOW_INPUT = 10


def _fold(output: ov.Output, core: ov.Core) -> int:
    node = output.get_node()
    if node.get_type_name() == "Constant":
        values = np.asarray(node.get_data()).reshape(-1)
    else:
        sub = ov.Model([ops.result(output)], [], "sliding_window")
        if sub.get_parameters():
            raise ValueError(f"the sliding window of {node.get_friendly_name()} depends on the inputs")
        values = np.asarray(core.compile_model(sub, "CPU").create_infer_request().infer()[0]).reshape(-1)
    if values.size != 1:
        raise ValueError(f"sliding window of shape {values.shape} (expected a scalar)")
    return max(0, int(values[0]))


def sliding_windows(model: ov.Model, core: ov.Core | None = None) -> list[int]:
    """Per layer (the N of key_cache.N): its sliding window in tokens, 0 for global attention."""
    core = core or ov.Core()
    return [_fold(node.input_value(SLIDING_WINDOW_INPUT), core) for node in paged_attention_nodes(model)]
