"""The scores of attention_scores.window_scores and expected_attention.expected_scores as OpenVINO graphs
that read the paged pool themselves.

Why a graph: scoring in numpy cost most of an eviction (one thread, the keys copied and converted to f32
layer by layer before one matmul per group of layers). Here the keys are gathered from the pool tensors
by block table INSIDE the graph (the pool's own ov.Tensor is bound to the `key_cache.N` inputs, no copy),
converted, and scored on the device's threads, one infer for all layers.

Window graph inputs (n = layers in the graph, W = queries, nb = blocks read, S = slots scored <= nb * bs):
  queries        f32 [n, W, Hq, hd]   post-RoPE, times the layer's softmax scale; the newest last
  block_rows     i32 [n, Hkv, nb]     row of (block, KV head) in the pool seen as [blocks * Hkv, bs, hd]:
                                      block * Hkv + head, so the gather comes out head-major (no transpose)
  mask           bool [W, nb * bs]    where a query may look: not after it (causal), not at slots >= S
  window_slots   i64 [W]              slot of each query for the sliding-window rule (S - W + i)
  key_cache.N    pool type [blocks, Hkv, bs, hd], one per layer of the graph
Output `scores` f32 [n, Hq, nb * bs]: per query head, softmax probabilities summed over the W queries
(slots >= S are 0).
Expected graph: the same key inputs and `mask` [1, nb * bs] (slots < S), with `mean` f32 [n, Hq, hd]
(times the scale) and `covariance` f32 [n, Hq, hd, hd] (times scale^2 / 2; zeros without covariance);
output `scores` f32 [n, Hq, nb * bs]: softmax over the slots of mean.k + k^T covariance k.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import openvino as ov
import openvino.opset13 as ops


def _i64(values) -> ov.Node:
    return ops.constant(np.asarray(values, dtype=np.int64))


def _keys(pool: ov.Node, rows: ov.Output, shape: tuple[int, int, int, int]) -> ov.Output:
    """One layer's keys f32 [Hkv, nb*bs, hd], gathered head-major from the pool seen as [blocks*Hkv, bs, hd]."""
    hq, hkv, bs, hd = shape
    flat = ops.reshape(pool, _i64([-1, bs, hd]), special_zero=False)
    keys = ops.convert(ops.gather(flat, rows, _i64(0)), ov.Type.f32)         # [Hkv, nb, bs, hd]
    return ops.reshape(keys, _i64([hkv, -1, hd]), special_zero=False).output(0)


def _layer_scores(pool: ov.Node, rows: ov.Output, q: ov.Output, mask: ov.Output,
                  shape: tuple[int, int, int, int]) -> ov.Output:
    """[Hq, nb*bs] for one layer: gather its blocks head-major, score the W queries per head where the mask
    allows, softmax, sum over W. Slots past S are masked (their rows hold whatever the pool held, NaN
    included: a select, not an added -inf, keeps them out); the caller drops them."""
    hq, hkv, bs, hd = shape
    keys = _keys(pool, rows, shape)
    # query head h reads KV head h // g (GQA): [W, Hq, hd] -> [Hq, W, hd] -> [Hkv, g*W, hd]
    qh = ops.reshape(ops.transpose(q, _i64([1, 0, 2])), _i64([hkv, -1, hd]), special_zero=False)
    logits = ops.matmul(qh, keys, transpose_a=False, transpose_b=True)       # [Hkv, g*W, nb*bs]
    logits = ops.reshape(logits, _i64([hq, -1, 0]), special_zero=True)       # [Hq, W, nb*bs]
    probs = ops.softmax(ops.select(mask, logits, ops.constant(np.float32(-np.inf))), -1)
    return ops.reduce_sum(probs, _i64([1]), keep_dims=False)                  # [Hq, nb*bs]


def _layer_expected(pool: ov.Node, rows: ov.Output, mean: ov.Output, cov: ov.Output, mask: ov.Output,
                    shape: tuple[int, int, int, int]) -> ov.Output:
    """[Hq, nb*bs] for one layer: softmax over slots of mean.k + k^T cov k, per query head."""
    hq, hkv, bs, hd = shape
    keys = _keys(pool, rows, shape)                                           # [Hkv, S', hd]
    mu = ops.reshape(mean, _i64([hkv, -1, hd]), special_zero=False)          # [Hkv, g, hd]
    logits = ops.matmul(mu, keys, transpose_a=False, transpose_b=True)       # [Hkv, g, S']
    sig = ops.reshape(cov, _i64([hkv, -1, hd, hd]), special_zero=False)      # [Hkv, g, hd, hd]
    k4 = ops.unsqueeze(keys, _i64([1]))                                       # [Hkv, 1, S', hd]
    quad = ops.reduce_sum(ops.multiply(ops.matmul(k4, sig, False, False), k4), _i64([-1]), keep_dims=False)
    logits = ops.reshape(ops.add(logits, quad), _i64([hq, -1]), special_zero=False)  # [Hq, S']
    return ops.softmax(ops.select(mask, logits, ops.constant(np.float32(-np.inf))), -1).output(0)


def _per_layer(n: int, shape: tuple[int, int, int, int], pool_type: ov.Type, layer_fn) -> tuple[list, ov.Output]:
    """The pool and row Parameters of n layers, layer_fn(i, pool, rows) -> [Hq, S'] each, stacked [n, Hq, S']."""
    hq, hkv, bs, hd = shape
    rows = ops.parameter(ov.PartialShape([n, hkv, -1]), ov.Type.i32, name="block_rows")
    pools = [ops.parameter(ov.PartialShape([-1, hkv, bs, hd]), pool_type, name=f"key_cache.{i}") for i in range(n)]
    outputs = []
    for i in range(n):
        r = ops.squeeze(ops.gather(rows, _i64([i]), _i64(0)), _i64([0]))    # [Hkv, nb]
        outputs.append(ops.unsqueeze(layer_fn(i, pools[i], r.output(0)), _i64([0])))
    return [rows, *pools], (ops.concat(outputs, 0) if n > 1 else outputs[0]).output(0)


def _model(scores: ov.Output, params: list, name: str) -> ov.Model:
    result = ops.result(scores)
    result.output(0).get_tensor().set_names({"scores"})
    for p in params:
        p.output(0).get_tensor().set_names({p.get_friendly_name()})
    return ov.Model([result], params, name)


def build_window_graph(pool_type: ov.Type, num_q_heads: int, num_kv_heads: int, block_size: int, head_size: int,
                       sliding_windows: Sequence[int]) -> ov.Model:
    """One graph for len(sliding_windows) layers (one window per layer of the graph, 0 = global)."""
    n, shape = len(sliding_windows), (num_q_heads, num_kv_heads, block_size, head_size)
    queries = ops.parameter(ov.PartialShape([n, -1, num_q_heads, head_size]), ov.Type.f32, name="queries")
    mask = ops.parameter(ov.PartialShape([-1, -1]), ov.Type.boolean, name="mask")
    window = ops.parameter(ov.PartialShape([-1]), ov.Type.i64, name="window_slots")
    slots = ops.range(_i64(0), ops.gather(ops.shape_of(mask), _i64(1), _i64(0)), _i64(1), ov.Type.i64)

    def layer(i: int, pool: ov.Node, rows: ov.Output) -> ov.Output:
        m = mask
        if sliding_windows[i] > 0:  # key slot j is out of query i's window when j <= slot(i) - window
            edge = ops.subtract(ops.unsqueeze(window, _i64([1])), _i64(int(sliding_windows[i])))
            m = ops.logical_and(mask, ops.greater(ops.unsqueeze(slots, _i64([0])), edge))
        q = ops.squeeze(ops.gather(queries, _i64([i]), _i64(0)), _i64([0]))  # [W, Hq, hd]
        return _layer_scores(pool, rows, q.output(0), m.output(0), shape)

    params, scores = _per_layer(n, shape, pool_type, layer)
    return _model(scores, [queries, mask, window, *params], "window_scores")


def build_expected_graph(pool_type: ov.Type, num_q_heads: int, num_kv_heads: int, block_size: int, head_size: int,
                         num_layers: int) -> ov.Model:
    """One graph for num_layers layers: expected attention (expected_attention.expected_scores, no value norms)."""
    shape = (num_q_heads, num_kv_heads, block_size, head_size)
    mean = ops.parameter(ov.PartialShape([num_layers, num_q_heads, head_size]), ov.Type.f32, name="mean")
    cov = ops.parameter(ov.PartialShape([num_layers, num_q_heads, head_size, head_size]), ov.Type.f32,
                        name="covariance")
    mask = ops.parameter(ov.PartialShape([1, -1]), ov.Type.boolean, name="mask")

    def layer(i: int, pool: ov.Node, rows: ov.Output) -> ov.Output:
        pick = lambda x: ops.squeeze(ops.gather(x, _i64([i]), _i64(0)), _i64([0])).output(0)  # noqa: E731
        return _layer_expected(pool, rows, pick(mean), pick(cov), mask.output(0), shape)

    params, scores = _per_layer(num_layers, shape, pool_type, layer)
    return _model(scores, [mean, cov, mask, *params], "expected_scores")
