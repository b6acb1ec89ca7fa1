"""Token-level mixed precision prototype on SmolLM2-135M: decode latency, memory, attention error.

    .venv/bin/python scripts/mixed_precision/proto.py [--pivotal 1024 --reps 256 --steps 40]

One sequence, decode steps, driven directly (not through the engine). Configurations:
  f16 N          the paged model as the engine runs it, f16 KV pool, N float tokens in context
  u8 N           the same with the u8 pool (this CPU's default KV precision)
  mixed-pa       our pass, float part from PagedAttention + float LSE in our ops: P f16 tokens + R u8 reps
  mixed-ours     our pass, float part entirely in our ops (PagedAttention only writes the cache)
Latency: median wall time of one decode step (infer() of the whole model, 1 token), configurations
interleaved in rounds. Memory: bytes per token per layer of each part, scales/zero-points included,
from the compiled pool shapes. Attention error: SmolLM2 fp32 IR, a real ~1.3k-token prompt, f32 pool;
per layer and query head, the last token's attention output with keys/values stored as f16 / u8 / mixed
(the top-P tokens by that head's attention in f16, the rest u8) vs exact, as relative L2 error.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import openvino as ov
import openvino.opset13 as ops

from kvcrush_ov.core import transforms
from kvcrush_ov.tools.models import prepare
from graph_pass import (add_representative_attention, bytes_per_token, dequantize_rows,
                                                   quantize_rows, single_sequence_inputs)

HEAD_SIZE = 64
CORE = ov.Core()


class Proto:
    """A compiled single-sequence model: variant 'plain' (no pass), 'pa' or 'ours'."""

    def __init__(self, model_dir: Path, variant: str, kv: str, num_blocks: int, *, expose_q: bool = False,
                 props: dict | None = None, cache_type: ov.Type | None = None) -> None:
        model = CORE.read_model(model_dir / "openvino_model.xml")
        transforms.make_paged_model(model)
        if expose_q:
            for layer, node in enumerate(transforms.paged_attention_nodes(model)):
                r = ops.result(node.input_value(0))
                r.output(0).get_tensor().set_names({f"q.{layer}"})
                model.add_results([r])
        self.info = add_representative_attention(model, HEAD_SIZE, float_part=variant,
                                                 cache_type=cache_type) if variant != "plain" else None
        self.num_layers = len(transforms.paged_attention_nodes(model))
        self.compiled = CORE.compile_model(model, "CPU", {"KV_CACHE_PRECISION": getattr(ov.Type, kv), **(props or {})})
        self.request = self.compiled.create_infer_request()
        self.names = {n for i in self.compiled.inputs for n in i.get_names()}
        rng = np.random.default_rng(0)
        self.pools, self.shapes = [], []
        for layer in range(self.num_layers):
            for name in (f"key_cache.{layer}", f"value_cache.{layer}"):
                port = self.compiled.input(name)
                shape = [num_blocks] + [port.get_partial_shape()[i].get_length() for i in range(1, 4)]
                t = ov.Tensor(port.get_element_type(), shape)
                x = rng.standard_normal(shape).astype(np.float32)  # realistic magnitudes; u8 pools stay 0
                if port.get_element_type() == ov.Type.bf16:
                    t.data.view(np.uint16)[...] = (x.view(np.uint32) >> 16).astype(np.uint16)
                elif port.get_element_type() in (ov.Type.f16, ov.Type.f32):
                    t.data[...] = x.astype(t.data.dtype)
                else:
                    t.data[...] = 0
                self.request.set_tensor(name, t)
                self.pools.append(t.data)
                self.shapes.append(shape[1:])
        if cache_type is not None and self.compiled.input("key_cache.0").get_element_type() != cache_type:
            raise RuntimeError(f"pool compiled as {self.compiled.input('key_cache.0').get_element_type()}, "
                               f"the pass assumed {cache_type}")
        self.precision = str(self.compiled.input("key_cache.0").get_element_type().get_type_name())
        self.inference_precision = str(self.compiled.get_property("INFERENCE_PRECISION_HINT"))

    def bytes_per_token_layer(self) -> float:
        """Pool bytes (key + value, headers included) of one token in one layer."""
        k, v = self.shapes[0], self.shapes[1]
        bits = self.compiled.input("key_cache.0").get_element_type().bitwidth
        block = v[1]
        return (np.prod(k) + np.prod(v)) * bits / 8 / block

    def set_step(self, ids, start: int, past: int, reps=None) -> None:
        bs = self.shapes[1][1]
        table = list(range(-(-(past + len(ids)) // bs)))
        hkv = self.shapes[0][0]
        inputs = single_sequence_inputs(np.asarray(ids), start, past, [table] * self.num_layers, reps, self.names,
                                        (hkv, HEAD_SIZE))
        for name, value in inputs.items():
            if name in self.names:
                self.request.set_tensor(name, ov.Tensor(value))


def random_reps(num_layers: int, r: int, hkv: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(num_layers):
        k, v = (rng.standard_normal((r, hkv, HEAD_SIZE)).astype(np.float32) for _ in range(2))
        out.append((*quantize_rows(k), *quantize_rows(v), r))
    return out


def latency(args) -> None:
    model_dir = prepare("smollm2-135m")
    p, r = args.pivotal, args.reps
    n = p + r
    blocks = -(-n // 32) + 2
    plain = Proto(model_dir, "plain", "f16", blocks)
    pool = plain.compiled.input("key_cache.0").get_element_type()  # f16 asked; bf16 under bf16 inference
    configs = {
        f"f16 {n} float": (plain, n, None),
        f"f16 {p} float (no reps)": (Proto(model_dir, "plain", "f16", blocks), p, None),
        f"u8 {n} (all u8 pool)": (Proto(model_dir, "plain", "u8", blocks), n, None),
        f"mixed-pa {p} f16 + {r} u8": (Proto(model_dir, "pa", "f16", blocks, cache_type=pool), p, r),
        f"mixed-ours {p} f16 + {r} u8": (Proto(model_dir, "ours", "f16", blocks, cache_type=pool), p, r),
        f"mixed-pa {p} f16 + {r} u8, f32 cast": (Proto(model_dir, "pa", "f16", blocks), p, r),
    }
    any_proto = next(iter(configs.values()))[0]
    hkv = any_proto.shapes[0][0]
    print(f"SmolLM2-135M fp16-weight IR, CPU, inference precision {any_proto.inference_precision}, one sequence, "
          f"decode step (1 token), {args.steps} timed steps per config in rounds")
    for proto, ctx, reps in configs.values():
        proto.set_step([42], ctx - 1, ctx - 1, random_reps(proto.num_layers, reps, hkv) if reps else None)
        for _ in range(3):
            proto.request.infer()
    times = {k: [] for k in configs}
    rounds = 5
    for _ in range(rounds):
        for name, (proto, _, _) in configs.items():
            for _ in range(args.steps // rounds):
                t0 = time.perf_counter()
                proto.request.infer()
                times[name].append(time.perf_counter() - t0)
    base = statistics.median(times[f"f16 {n} float"])
    print(f"{'config':34s} {'median ms':>10s} {'vs f16 ' + str(n):>12s}   pool precision")
    for name, (proto, _, _) in configs.items():
        med = statistics.median(times[name])
        print(f"{name:34s} {med * 1e3:10.2f} {med / base:12.3f}   {proto.precision}")

    f16_tok = bytes_per_token(hkv, HEAD_SIZE, "f16")
    u8_tok = bytes_per_token(hkv, HEAD_SIZE, "u8")
    u8_pool_tok = configs[f"u8 {n} (all u8 pool)"][0].bytes_per_token_layer()
    assert configs[f"f16 {n} float"][0].bytes_per_token_layer() == f16_tok
    layers = any_proto.num_layers
    print(f"\nmemory per token per layer (K+V, scales/zero-points included): f16 pool {f16_tok} B, "
          f"our u8 representative rows {u8_tok} B ({u8_tok / f16_tok:.3f} of f16), OpenVINO u8 pool "
          f"(keys by channel) {u8_pool_tok:g} B")
    mixed = (p * f16_tok + r * u8_tok) * layers
    print(f"per sequence, {layers} layers: f16 {n} tokens {n * f16_tok * layers / 2**20:.2f} MiB; mixed {p}+{r} "
          f"{mixed / 2**20:.2f} MiB ({mixed / (n * f16_tok * layers):.3f}); all-u8 pool {n} tokens "
          f"{n * u8_pool_tok * layers / 2**20:.2f} MiB ({u8_pool_tok / f16_tok:.3f}); "
          f"same bytes as mixed hold {mixed / layers / f16_tok:.0f} f16 tokens")


def _bf16(x: np.ndarray) -> np.ndarray:
    """Round to bfloat16 (nearest even) and back, as a bf16 pool stores."""
    u = x.astype(np.float32).view(np.uint32)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return u.view(np.float32).astype(np.float64)


def attention_error(args) -> None:
    """Relative L2 error of each head's last-token attention output, f32 pool as the exact reference."""
    model_dir = prepare("smollm2-135m", "fp32")
    from kvcrush_ov import Tokenizer
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    ids = Tokenizer(model_dir).encode(text)[: args.pivotal + args.reps]
    n = len(ids)
    proto = Proto(model_dir, "pa", "f32", -(-n // 32) + 1, expose_q=True,
                  props={"INFERENCE_PRECISION_HINT": "f32"})
    proto.set_step(ids, 0, 0)
    proto.request.infer()
    hkv = proto.shapes[0][0]
    hq = proto.info.num_q_heads
    g = hq // hkv
    p = min(args.pivotal, n - 1)
    errs = {"all bf16": [], "all f16": [], f"top-{p} f16 + rest u8": [], f"random {p} f16 + rest u8": [], "all u8 (by token)": []}
    rng = np.random.default_rng(0)
    for layer in range(proto.num_layers):
        rows = lambda pool: pool.transpose(1, 0, 2, 3).reshape(hkv, -1, HEAD_SIZE)[:, :n]  # noqa: E731
        k, v = rows(proto.pools[2 * layer]).astype(np.float64), rows(proto.pools[2 * layer + 1]).astype(np.float64)
        q = proto.request.get_tensor(f"q.{layer}").data[-1].reshape(hq, HEAD_SIZE).astype(np.float64)
        kq = lambda x: dequantize_rows(*quantize_rows(x.astype(np.float32).transpose(1, 0, 2))).transpose(1, 0, 2)  # noqa
        k8, v8 = kq(k), kq(v)
        k16, v16 = k.astype(np.float16).astype(np.float64), v.astype(np.float16).astype(np.float64)
        kb, vb = _bf16(k), _bf16(v)
        scale = proto.info.scales[layer]
        for h in range(hq):
            kv = h // g

            def attend(kk, vv):
                logit = scale * kk[kv] @ q[h]
                w = np.exp(logit - logit.max())
                return w / w.sum() @ vv[kv]
            exact = attend(k, v)
            prob = np.exp(scale * k[kv] @ q[h] - (scale * k[kv] @ q[h]).max())
            for name, kk, vv in (("all bf16", kb, vb), ("all f16", k16, v16), ("all u8 (by token)", k8, v8)):
                errs[name].append(np.linalg.norm(attend(kk, vv) - exact) / np.linalg.norm(exact))
            for name, keep in ((f"top-{p} f16 + rest u8", np.argsort(-prob)[:p]),
                               (f"random {p} f16 + rest u8", rng.choice(n, p, replace=False))):
                mask = np.zeros(n, bool)
                mask[keep] = True
                km, vm = np.where(mask[None, :, None], k16, k8), np.where(mask[None, :, None], v16, v8)
                errs[name].append(np.linalg.norm(attend(km, vm) - exact) / np.linalg.norm(exact))
    print(f"\nattention output error, SmolLM2 fp32 IR, real {n}-token prompt (README.md), last token, "
          f"{proto.num_layers} layers x {hq} heads, relative L2 vs f32 KV (mean / max):")
    for name, e in errs.items():
        print(f"  {name:32s} {np.mean(e):.2e} / {np.max(e):.2e}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pivotal", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=256)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--skip-error", action="store_true")
    ap.add_argument("--skip-latency", action="store_true")
    args = ap.parse_args()
    if not args.skip_latency:
        latency(args)
    if not args.skip_error:
        attention_error(args)


if __name__ == "__main__":
    main()
