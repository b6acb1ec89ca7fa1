"""Let every layer hold its own number of KV slots (PyramidKV's layer-dependent budgets).

openvino's paged transformation feeds ONE `past_lens` and ONE `block_indices_begins` Parameter to every
PagedAttention node, so all layers must hold the same number of slots. We give each node its own
`past_lens.N` and `block_indices_begins.N` (N = the layer of its key_cache.N). Measured on a 2-layer
model: after compacting layer 1 only, a decode step with past_lens.0=10, past_lens.1=6 returned scores
of lengths 11 and 7, each summing to the number of query heads.
"""
from __future__ import annotations

import openvino as ov
import openvino.opset13 as ops

from .per_head_scores import paged_attention_nodes

PAST_LENS_INPUT, BLOCK_INDICES_BEGINS_INPUT = 5, 8


def split_lengths_per_layer(model: ov.Model) -> None:
    old = {}
    for layer, node in enumerate(paged_attention_nodes(model)):
        for port, base in ((PAST_LENS_INPUT, "past_lens"), (BLOCK_INDICES_BEGINS_INPUT, "block_indices_begins")):
            source = node.input_value(port).get_node()
            old[source.get_friendly_name()] = source
            param = ops.parameter(ov.PartialShape([-1]), ov.Type.i32, name=f"{base}.{layer}")
            param.output(0).get_tensor().set_names({f"{base}.{layer}"})
            node.input(port).replace_source_output(param.output(0))
            model.add_parameters([param])
    for param in old.values():
        if not param.output(0).get_target_inputs():
            model.remove_parameter(param)
    model.validate_nodes_and_infer_types()
