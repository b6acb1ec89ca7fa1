"""Token-level mixed precision in one sequence (prototype): float pivotal tokens + INT8 representatives.

OpenVINO's CPU PagedAttention holds ONE precision for every layer and block of a compiled model, so the
KVCrush representatives cannot sit in its pool as u8 while the pivotal tokens stay f16/f32. This pass
gives every PagedAttention node a second, small "representative" cache of its own and attends to it in
ordinary OpenVINO ops, merged with a correct softmax over both parts (log-sum-exp):

    float part F (the paged pool, PagedAttention writes and reads it as usual)
    representative part R (u8 keys/values by token, f32 scale and zero-point per row and head)

    per query head h, query t:   m_F, Z_F = max and sum of exp of the scaled logits over F (causal)
                                 m_R, Z_R, U_R = the same over R (all R precede every query: no mask),
                                                 U_R = sum_r exp(l_r - m_R) v_r (unnormalized)
                                 m = max(m_F, m_R)
                                 out = (e^(m_F-m) Z_F O_F + e^(m_R-m) U_R) / (e^(m_F-m) Z_F + e^(m_R-m) Z_R)

PagedAttention returns only O_F (normalized), not Z_F or m_F, per head (its `scores.N` are summed over
heads, and its `sinks` input only adds a term to the denominator without telling its size). So the
float part's per-head log-sum-exp is computed here too: the sequence's blocks are gathered from
`key_cache.N` by `block_indices.N` and used in place (logits [nb, Hkv, G*T, bs], slots >= past_len
masked, so PagedAttention's own write of the new token is never read), and the step's new keys
(PagedAttention input 1) add a causal [Hkv, G, T, T] block. Pass `cache_type` (the pool type the device
compiles) so the query is cast to it instead of converting the blocks to f32.
Two variants of the float part:
  float_part="pa"    O_F from PagedAttention, only the float LSE in our ops (q.K over F duplicated)
  float_part="ours"  the float part entirely in our ops (values gathered too), one softmax over F and R;
                     PagedAttention then only writes the new token into the pool (its output is unused).

Scope (prototype): ONE sequence per step (past_lens[0], all of block_indices.N), any number of its new
tokens (decode, or a prompt chunk after an eviction), float KV pool (f32/f16/bf16; the u8 pool's
per-block headers are not dequantized here), no alibi/sliding window/sinks (Llama-like models).

Inputs added per layer N (R = capacity of the representative buffer, at least 1):
    rep_keys.N, rep_values.N            u8  [R, Hkv, hd]   token r of KV head h in row [r, h]
    rep_key_scales.N, rep_value_scales.N f32 [R, Hkv, 2]   (scale, zero-point): x = (q - zp) * scale
    rep_len.N                            i32 [1]           rows in use (0..R); rows >= rep_len are masked
Token-major rows let an engine keep a preallocated [R_max, Hkv, hd] buffer and pass a contiguous prefix.
Output added per layer (for checks): `mp_attention.N` [T, Hq*hd], the merged attention output that now
feeds the layer's output projection.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import openvino as ov
import openvino.opset13 as ops

from kvcrush_ov.core.transforms.per_head_scores import _constant_scalar, paged_attention_nodes

Q_IN, K_IN, V_IN, KEY_CACHE_IN, VALUE_CACHE_IN, PAST_LENS_IN, BLOCK_INDICES_IN, SCALE_IN = 0, 1, 2, 3, 4, 5, 7, 9
MASKED = -1e30  # finite: an all-masked representative part gives weight exp(MASKED - m) = 0, never NaN
REP_INPUTS = ("rep_keys", "rep_key_scales", "rep_values", "rep_value_scales", "rep_len")


@dataclass(frozen=True)
class MixedPrecisionInfo:
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_size: int
    scales: tuple[float, ...]   # each layer's softmax scale (PagedAttention's constant)
    float_part: str


def _c(values, dtype=ov.Type.i64) -> ov.Output:
    return ops.constant(np.asarray(values), dtype).output(0)


def _param(name: str, shape: list[int], et: ov.Type) -> ov.Node:
    p = ops.parameter(ov.PartialShape(shape), et, name=name)
    p.output(0).get_tensor().set_names({name})
    return p


def _dequantize(q: ov.Output, sz: ov.Output) -> ov.Output:
    """u8 [R, Hkv, hd] with f32 [R, Hkv, 2] -> f32 [Hkv, 1, R, hd]."""
    scale = ops.gather(sz, _c([0]), _c(-1), 0)
    zp = ops.gather(sz, _c([1]), _c(-1), 0)
    x = ops.multiply(ops.subtract(ops.convert(q, ov.Type.f32), zp), scale)
    return ops.unsqueeze(ops.transpose(x, _c([1, 0, 2])), _c([1])).output(0)


def _range(n: ov.Output) -> ov.Output:
    """0..n-1 (i32) for a [1]- or []-shaped i32 count."""
    return ops.range(_c(0, ov.Type.i32), ops.squeeze(n, _c([0])) if n.get_partial_shape().rank.get_length() else n,
                     _c(1, ov.Type.i32), ov.Type.i32).output(0)


def _dim(x, axis: int) -> ov.Output:
    return ops.gather(ops.shape_of(x, ov.Type.i32), _c([axis]), _c(0)).output(0)


def add_representative_attention(model: ov.Model, head_size: int, *, float_part: str = "pa",
                                 cache_type: ov.Type | None = None) -> MixedPrecisionInfo:
    """Add the representative cache and merged attention to every PagedAttention node (in place).

    `cache_type`: the element type the device will give the float pool (the pool Parameters are still
    dynamic here; the plugin decides, e.g. an f16 request becomes bf16 under bf16 inference precision).
    Given, the query is cast to it and the pool's blocks are used as stored; None converts the gathered
    blocks to f32 (correct for any float pool, slower). The caller checks the compiled type matches."""
    if float_part not in ("pa", "ours"):
        raise ValueError(f"float_part must be 'pa' or 'ours', not {float_part!r}")
    nodes = paged_attention_nodes(model)
    hd = head_size
    hq = nodes[0].input(Q_IN).get_partial_shape()[1].get_length() // hd
    hkv = nodes[0].input(K_IN).get_partial_shape()[1].get_length() // hd
    g = hq // hkv
    scales = []
    for layer, pa in enumerate(nodes):
        scale_value = _constant_scalar(pa.input_value(SCALE_IN))
        scale_value = scale_value if scale_value is not None else 1.0 / math.sqrt(hd)
        scales.append(scale_value)
        scale = _c(scale_value, ov.Type.f32)
        consumers = list(pa.output(0).get_target_inputs())

        rk = _param(f"rep_keys.{layer}", [-1, hkv, hd], ov.Type.u8)
        rks = _param(f"rep_key_scales.{layer}", [-1, hkv, 2], ov.Type.f32)
        rv = _param(f"rep_values.{layer}", [-1, hkv, hd], ov.Type.u8)
        rvs = _param(f"rep_value_scales.{layer}", [-1, hkv, 2], ov.Type.f32)
        rlen = _param(f"rep_len.{layer}", [1], ov.Type.i32)
        model.add_parameters([rk, rks, rv, rvs, rlen])

        # queries [T, Hq*hd] -> [Hkv, G, T, hd] (query head h reads KV head h // G)
        q = ops.transpose(ops.reshape(pa.input_value(Q_IN), _c([-1, hkv, g, hd]), False), _c([1, 2, 0, 3]))
        q = ops.multiply(q, scale)

        # representative part: every representative precedes every query; rows >= rep_len masked
        k_r, v_r = _dequantize(rk.output(0), rks.output(0)), _dequantize(rv.output(0), rvs.output(0))
        l_r = ops.matmul(q, k_r, False, True)                                        # [Hkv, G, T, R]
        r_idx = ops.range(_c(0, ov.Type.i32), ops.gather(ops.shape_of(rk, ov.Type.i32), _c(0), _c(0)),
                          _c(1, ov.Type.i32), ov.Type.i32)
        l_r = ops.select(ops.less(r_idx, rlen), l_r, _c(MASKED, ov.Type.f32))
        m_r = ops.reduce_max(l_r, _c([-1]), True)
        p_r = ops.exp(ops.subtract(l_r, m_r))
        z_r = ops.reduce_sum(p_r, _c([-1]), True)
        u_r = ops.matmul(p_r, v_r, False, False)                                                   # [Hkv, G, T, hd]

        # float part 1, the pool: logits on the gathered blocks in place, [nb, Hkv, G*T, bs] (no transpose
        # or convert of the keys; the small query is cast to the pool's element type), slots >= past masked
        past = ops.gather(pa.input_value(PAST_LENS_IN), _c([0]), _c(0))             # [1] i32
        bidx = pa.input_value(BLOCK_INDICES_IN)
        k_blocks = ops.gather(pa.input_value(KEY_CACHE_IN), bidx, _c(0), 0)          # [nb, Hkv, bs, hd]
        q_flat = ops.reshape(q, _c([1, hkv, -1, hd]), False)                          # [1, Hkv, G*T, hd]
        if cache_type is None or cache_type == ov.Type.f32:
            k_blocks = ops.convert(k_blocks, ov.Type.f32)
        l_p = ops.convert(ops.matmul(ops.convert(q_flat, k_blocks.get_output_element_type(0) if cache_type is None
                                                 else cache_type), k_blocks, False, True), ov.Type.f32)
        bs = _dim(k_blocks, 2)
        slot = ops.add(ops.multiply(ops.unsqueeze(_range(_dim(k_blocks, 0)), _c([1, 2, 3])), bs),
                       ops.unsqueeze(_range(bs), _c([0, 1, 2])))                      # [nb, 1, 1, bs]
        l_p = ops.select(ops.less(slot, past), l_p, _c(MASKED, ov.Type.f32))
        to_heads = lambda x: ops.reshape(x, _c([hkv, g, -1, 0]), True)  # noqa: E731  [1,Hkv,G*T,d]->[Hkv,G,T,d]
        m_p = to_heads(ops.reduce_max(l_p, _c([0, 3]), True))
        # float part 2, this step's own tokens (causal among them): [Hkv, G, T, T]
        k_new = ops.unsqueeze(ops.transpose(ops.reshape(pa.input_value(K_IN), _c([-1, hkv, hd]), False),
                                            _c([1, 0, 2])), _c([1]))                 # [Hkv, 1, T, hd]
        l_n = ops.matmul(q, ops.convert_like(k_new, q), False, True)
        t_idx = _range(_dim(q, 2))
        l_n = ops.select(ops.less_equal(t_idx, ops.unsqueeze(t_idx, _c([1]))), l_n, _c(MASKED, ov.Type.f32))
        m_f = ops.maximum(m_p, ops.reduce_max(l_n, _c([-1]), True))                  # [Hkv, G, T, 1]
        m_f_flat = ops.reshape(m_f, _c([1, hkv, -1, 1]), False)
        p_p = ops.exp(ops.subtract(l_p, m_f_flat))                                   # [nb, Hkv, G*T, bs]
        p_n = ops.exp(ops.subtract(l_n, m_f))
        z_f = ops.add(to_heads(ops.reduce_sum(p_p, _c([0, 3]), True)), ops.reduce_sum(p_n, _c([-1]), True))
        if float_part == "pa":
            o_pa = ops.transpose(ops.reshape(pa.output(0), _c([-1, hkv, g, hd]), False), _c([1, 2, 0, 3]))
            u_f = ops.multiply(o_pa, z_f)                                            # unnormalized, as u_r
        else:
            v_blocks = ops.gather(pa.input_value(VALUE_CACHE_IN), bidx, _c(0), 0)    # [nb, Hkv, bs, hd]
            if cache_type is None or cache_type == ov.Type.f32:
                v_blocks = ops.convert(v_blocks, ov.Type.f32)
            u_p = ops.reduce_sum(ops.convert(ops.matmul(ops.convert(p_p, cache_type or ov.Type.f32),
                                                        v_blocks, False, False),
                                             ov.Type.f32), _c([0]), True)           # [1, Hkv, G*T, hd]
            v_new = ops.unsqueeze(ops.transpose(ops.reshape(pa.input_value(V_IN), _c([-1, hkv, hd]), False),
                                                _c([1, 0, 2])), _c([1]))             # [Hkv, 1, T, hd]
            u_f = ops.add(to_heads(u_p), ops.matmul(p_n, ops.convert_like(v_new, q), False, False))

        # merge by log-sum-exp (weights relative to the larger of the two parts' maxima)
        m = ops.maximum(m_f, m_r)
        w_f, w_r = ops.exp(ops.subtract(m_f, m)), ops.exp(ops.subtract(m_r, m))
        num = ops.add(ops.multiply(u_f, w_f), ops.multiply(u_r, w_r))
        den = ops.add(ops.multiply(z_f, w_f), ops.multiply(z_r, w_r))
        out = ops.reshape(ops.transpose(ops.divide(num, den), _c([2, 0, 1, 3])), _c([-1, hq * hd]), False)
        out = ops.convert_like(out, pa.output(0))
        for target in consumers:
            target.replace_source_output(out.output(0))
        result = ops.result(out)
        result.output(0).get_tensor().set_names({f"mp_attention.{layer}"})
        result.set_friendly_name(f"mp_attention.{layer}")
        model.add_results([result])
    model.validate_nodes_and_infer_types()
    return MixedPrecisionInfo(len(nodes), hq, hkv, hd, tuple(scales), float_part)


# -- host side: quantize representatives the way the graph dequantizes them ------------------------------
def quantize_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """f32 [R, Hkv, hd] -> (u8 [R, Hkv, hd], f32 [R, Hkv, 2] scale/zero-point), asymmetric per row and head
    (as OpenVINO's u8 by-token cache rows: x ~ (q - zp) * scale)."""
    lo, hi = x.min(-1, keepdims=True), x.max(-1, keepdims=True)
    scale = np.where(hi > lo, (hi - lo) / 255.0, 1.0).astype(np.float32)
    zp = np.round(-lo / scale).astype(np.float32)
    q = np.clip(np.round(x / scale + zp), 0, 255).astype(np.uint8)
    return q, np.concatenate([scale, zp], -1).astype(np.float32)


def dequantize_rows(q: np.ndarray, sz: np.ndarray) -> np.ndarray:
    return (q.astype(np.float32) - sz[..., 1:2]) * sz[..., 0:1]


def bytes_per_token(num_kv_heads: int, head_size: int, precision: str) -> int:
    """Key + value bytes of one token in one layer: float pool rows, or our u8 rows with f32 scale + zp."""
    if precision == "u8":
        return 2 * num_kv_heads * (head_size + 8)
    return 2 * num_kv_heads * head_size * {"f32": 4, "f16": 2, "bf16": 2}[precision]


def single_sequence_inputs(token_ids: np.ndarray, start: int, past: int, tables: list[list[int]],
                           reps: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]] | None,
                           input_names: set[str], head: tuple[int, int] = (1, 1)) -> dict[str, np.ndarray]:
    """Inputs of one step of ONE sequence for a paged model made by transforms.make_paged_model (per-layer
    block tables, shared past_lens) plus this pass: `token_ids` new tokens at true positions start..,
    `past` slots already cached, `tables[layer]` its block ids, `reps[layer]` = (keys u8, key scales,
    values u8, value scales, rep_len) or None for no representatives (a 1-row dummy with rep_len 0)."""
    t = len(token_ids)
    inputs = {
        "input_ids": np.asarray(token_ids, dtype=np.int64),
        "position_ids": np.arange(start, start + t, dtype=np.int64),
        "past_lens": np.array([past], dtype=np.int32),
        "subsequence_begins": np.array([0, t], dtype=np.int32),
        "max_context_len": np.array(past + t, dtype=np.int32),
        "block_indices_begins": np.array([0, len(tables[0])], dtype=np.int32),
    }
    if "score_aggregation_window" in input_names:
        inputs["score_aggregation_window"] = np.zeros(1, dtype=np.int32)
    if "sampled_tokens_indices" in input_names:
        inputs["sampled_tokens_indices"] = np.array([t - 1], dtype=np.int64)
    hkv, hd = head
    for layer, table in enumerate(tables):
        inputs[f"block_indices.{layer}"] = np.asarray(table, dtype=np.int32)
        if reps is None or reps[layer] is None:
            z = np.zeros((1, hkv, hd), np.uint8), np.ones((1, hkv, 2), np.float32)
            rep = (z[0], z[1], z[0], z[1], 0)
        else:
            rep = reps[layer]
        for name, value in zip(REP_INPUTS, rep):
            inputs[f"{name}.{layer}"] = np.array([value], np.int32) if name == "rep_len" else value
    return inputs
