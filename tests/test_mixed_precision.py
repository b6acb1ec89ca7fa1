"""Token-level mixed precision (scripts/mixed_precision/graph_pass.py, a prototype not shipped): the merged attention of float pivotal
tokens (paged pool) and u8 representatives (our second cache) against a numpy reference that
concatenates the float keys/values with the dequantized representatives and takes one softmax per
head. tiny-llama fp32 IR, f32 inference, f32 KV pool; prefill, decode, and a 3-token chunk (causal)."""
from __future__ import annotations

import numpy as np
import openvino as ov
import openvino.opset13 as ops
import pytest

import sys
from pathlib import Path

from kvcrush_ov.core import transforms

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts" / "mixed_precision"))
from graph_pass import (add_representative_attention, bytes_per_token, dequantize_rows,
                                                   quantize_rows, single_sequence_inputs)

F32 = {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": ov.Type.f32}
NUM_BLOCKS = 6


def _compile(float_part: str):
    from kvcrush_ov.tools.models import prepare
    model_dir = prepare("tiny-llama", "fp32")
    core = ov.Core()
    model = core.read_model(model_dir / "openvino_model.xml")
    transforms.make_paged_model(model)
    pa_nodes = transforms.paged_attention_nodes(model)
    hd = 16  # tiny-llama head_dim
    for layer, node in enumerate(pa_nodes):  # expose what the reference needs: q, new k, new v
        for port, name in ((0, "q"), (1, "k"), (2, "v")):
            r = ops.result(node.input_value(port))
            r.output(0).get_tensor().set_names({f"{name}.{layer}"})
            model.add_results([r])
    info = add_representative_attention(model, hd, float_part=float_part)
    compiled = core.compile_model(model, "CPU", F32)
    request = compiled.create_infer_request()
    pools = []
    for layer in range(info.num_layers):
        for name in (f"key_cache.{layer}", f"value_cache.{layer}"):
            port = compiled.input(name)
            assert port.get_element_type() == ov.Type.f32
            shape = [NUM_BLOCKS] + [port.get_partial_shape()[i].get_length() for i in range(1, 4)]
            t = ov.Tensor(np.zeros(shape, np.float32))
            request.set_tensor(name, t)
            pools.append(t.data)
    names = {n for i in compiled.inputs for n in i.get_names()}
    return info, request, pools, names


def _reference(q, k_new, v_new, k_pool, v_pool, table, past, rep, scale, hkv, hd):
    """One softmax per query head over [float slots < past, new tokens (causal), dequantized reps]."""
    t = q.shape[0]
    rows = lambda pool: pool[table].transpose(1, 0, 2, 3).reshape(hkv, -1, hd)[:, :past]  # noqa: E731
    kf = np.concatenate([rows(k_pool), k_new.reshape(t, hkv, hd).transpose(1, 0, 2)], 1).astype(np.float64)
    vf = np.concatenate([rows(v_pool), v_new.reshape(t, hkv, hd).transpose(1, 0, 2)], 1).astype(np.float64)
    n = rep[4]
    kr = dequantize_rows(rep[0], rep[1])[:n].transpose(1, 0, 2).astype(np.float64)
    vr = dequantize_rows(rep[2], rep[3])[:n].transpose(1, 0, 2).astype(np.float64)
    hq = q.shape[1] // hd
    g = hq // hkv
    q = q.reshape(t, hq, hd).astype(np.float64)
    out = np.zeros((t, hq, hd))
    rep_mass = []
    for h in range(hq):
        kv = h // g
        lf = scale * q[:, h] @ kf[kv].T                                    # [t, past+t]
        lf[np.arange(lf.shape[1])[None, :] > past + np.arange(t)[:, None]] = -np.inf
        logits = np.concatenate([lf, scale * q[:, h] @ kr[kv].T], 1)
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        out[:, h] = p @ np.concatenate([vf[kv], vr[kv]], 0)
        rep_mass.append(p[:, lf.shape[1]:].sum(1))
    return out.reshape(t, -1), np.array(rep_mass)


@pytest.mark.parametrize("float_part", ["pa", "ours"])
def test_merged_attention_matches_dequantized_reference(float_part):
    info, request, pools, names = _compile(float_part)
    hkv, hd = info.num_kv_heads, info.head_size
    rng = np.random.default_rng(0)
    table = [3, 1, 4]  # 96 slots, non-contiguous block ids
    tables = [table] * info.num_layers
    prompt = rng.integers(10, 1000, 45)
    steps = [(prompt, 0, None), (rng.integers(10, 1000, 1), 45, 5), (rng.integers(10, 1000, 3), 46, 7)]
    worst, masses = 0.0, []
    for ids, past, capacity in steps:
        reps = None
        if capacity is not None:  # representatives near real keys so both parts carry weight
            reps = []
            for layer in range(info.num_layers):
                pick = rng.integers(0, past, capacity)
                rows = lambda pool: pool[table].transpose(0, 2, 1, 3).reshape(-1, hkv, hd)[pick]  # noqa: E731
                k = rows(pools[2 * layer]) * 1.2 + 0.3 * rng.standard_normal((capacity, hkv, hd))
                v = rows(pools[2 * layer + 1]) + 0.5 * rng.standard_normal((capacity, hkv, hd))
                reps.append((*quantize_rows(k.astype(np.float32)), *quantize_rows(v.astype(np.float32)),
                             capacity - 1))  # last row masked by rep_len
        before = [p.copy() for p in pools]
        for name, value in single_sequence_inputs(ids, past, past, tables, reps, names, (hkv, hd)).items():
            request.set_tensor(name, ov.Tensor(value))
        request.infer()
        for layer in range(info.num_layers):
            get = lambda n: request.get_tensor(f"{n}.{layer}").data  # noqa: E731
            rep = reps[layer] if reps else (np.zeros((0, hkv, hd), np.uint8), np.ones((0, hkv, 2), np.float32),
                                            np.zeros((0, hkv, hd), np.uint8), np.ones((0, hkv, 2), np.float32), 0)
            ref, mass = _reference(get("q"), get("k"), get("v"), before[2 * layer], before[2 * layer + 1], table,
                                   past, rep, info.scales[layer], hkv, hd)
            worst = max(worst, float(np.abs(get("mp_attention") - ref).max()))
            if reps:
                masses.append(mass)
            else:  # the pass leaves PagedAttention's cache writes alone: the prompt's keys are in the pool
                pool_rows = pools[2 * layer][table].transpose(0, 2, 1, 3).reshape(-1, hkv * hd)[:len(ids)]
                assert np.array_equal(pool_rows, get("k"))
    assert worst <= 1e-3, worst
    masses = np.concatenate([m.ravel() for m in masses])
    # the test means something only if both parts carry real weight in the softmax
    assert 0.02 < np.median(masses) < 0.98 and masses.max() > 0.3, (np.median(masses), masses.max())
    print(f"max |merged - reference| = {worst:.2e}; representative share of the softmax: median "
          f"{np.median(masses):.2f}, max {masses.max():.2f}")


def test_bytes_per_token():
    assert bytes_per_token(3, 64, "f16") == 768 and bytes_per_token(3, 64, "f32") == 1536
    assert bytes_per_token(3, 64, "u8") == 432  # 2 x 3 heads x (64 bytes + f32 scale + f32 zero-point)


def test_quantize_rows_roundtrip():
    x = np.random.default_rng(1).standard_normal((7, 3, 64)).astype(np.float32)
    q, sz = quantize_rows(x)
    err = np.abs(dequantize_rows(q, sz) - x)
    assert (err <= sz[..., :1] * 0.5 + 1e-6).all()
