"""Runs the paged OpenVINO model: the only file that knows PagedAttention input names.

It loads the IR, applies the transforms/ passes, compiles, owns the KV block pool tensors (one
key_cache/value_cache pair per layer, shapes and precision read from the compiled model), turns a
list of scheduled chunks into PagedAttention inputs and returns the logits of sampled positions.
"""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import openvino as ov

from .. import transforms
from ..config import KV_PRECISIONS
from ..errors import CacheCapacityError, ConfigError, ModelError
from .block_manager import BlockManager
from .kv_cache import KVCache
from .scheduler import ScheduledChunk

_PRECISIONS = {name: getattr(ov.Type, name) for name in KV_PRECISIONS}


def read_model_dir(model_dir: str | Path) -> tuple[Path, dict]:
    """Check an optimum-cli export directory; return (path, config.json contents)."""
    path = Path(model_dir)
    if not path.is_dir():
        raise ModelError(f"model directory {str(path)!r} does not exist; run `kvcrush-ov prepare smollm2-135m` "
                         f"or export one with `optimum-cli export openvino`")
    config = {}
    if (path / "config.json").is_file():
        try:
            config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            raise ModelError(f"{path / 'config.json'} is not valid JSON ({str(e).splitlines()[0]}); re-export the "
                             f"model or restore the file") from None
        if not isinstance(config, dict):
            raise ModelError(f"{path / 'config.json'} must hold a JSON object, not {type(config).__name__}")
    _check_decoder_only(path, config)
    for name in ("openvino_model.xml", "openvino_model.bin", "openvino_tokenizer.xml", "openvino_detokenizer.xml"):
        if not (path / name).is_file():
            raise ModelError(f"{path} has no {name}: not an `optimum-cli export openvino` directory of an LLM "
                             f"(export with --task text-generation-with-past, tokenizers included)")
    return path, config


# HF head classes of models that are not causal decoders (the export of one is not an LLM to serve).
_NOT_CAUSAL = ("ForMaskedLM", "ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering",
               "ForMultipleChoice", "ForImageClassification", "ForSpeechSeq2Seq", "ForCTC")


def _check_decoder_only(path: Path, config: dict) -> None:
    arch = str((config.get("architectures") or [""])[0])
    kind = config.get("model_type", "?")
    if config.get("is_encoder_decoder"):
        raise ModelError(f"{path} holds {arch or kind}, an encoder-decoder model: kvcrush-ov serves decoder-only "
                         f"LLMs (export one with `optimum-cli export openvino --task text-generation-with-past`)")
    if arch.endswith(_NOT_CAUSAL) or (arch.endswith("Model") and not arch.endswith("LMHeadModel")):
        raise ModelError(f"{path} holds {arch} ({kind}), an encoder or base model without a causal LM head: "
                         f"kvcrush-ov serves decoder-only LLMs (…ForCausalLM, exported with --task "
                         f"text-generation-with-past)")


def _check_pageable(model: ov.Model, where: Path, kind: str) -> None:
    """The stateful SDPA export that openvino's paged transformation (and openvino-genai's CB) needs."""
    ops = {op.get_type_name() for op in model.get_ops()}
    if not model.get_sinks():
        raise ModelError(f"{where} ({kind}) has no KV-cache state (exported without past); re-export it with "
                         f"`optimum-cli export openvino --task text-generation-with-past`")
    if "ScaledDotProductAttention" not in ops:
        raise ModelError(f"{where} ({kind}) has no ScaledDotProductAttention op: its attention (or recurrent state) "
                         f"cannot be paged by openvino's PagedAttention transformation, nor served by openvino-genai's "
                         f"continuous batching")


class ModelRunner:
    def __init__(self, model_dir: str | Path, device: str = "CPU", *, cache_size_gb: float = 1.0,
                 num_kv_blocks: int = 0, kv_cache_precision: str | None = None,
                 properties: dict | None = None, core: ov.Core | None = None,
                 expose_queries: bool = False, per_layer_lengths: bool = False) -> None:
        """expose_queries: add the post-RoPE query outputs per-head scoring reads (eviction);
        per_layer_lengths: let layers hold different lengths (policies with per-layer budgets)."""
        self.model_dir, self.hf_config = read_model_dir(model_dir)
        self.core = core or ov.Core()
        try:
            model = self.core.read_model(self.model_dir / "openvino_model.xml")
        except RuntimeError as e:
            raise ModelError(f"cannot read {self.model_dir / 'openvino_model.xml'}: {str(e).splitlines()[0]}") from None
        kind = self.hf_config.get("model_type", "unknown architecture")
        _check_pageable(model, self.model_dir, kind)
        try:
            # PagedAttention's own `scores.N` (summed over heads) are not what we score with: not requested.
            # Layers hold different blocks only once a sequence evicts (or with per-layer lengths): else one
            # block table for all layers, as openvino-genai compiles a full-cache pipeline.
            self.info = transforms.make_paged_model(model, score_outputs=False,
                                                    per_layer_block_indices=expose_queries or per_layer_lengths)
        except RuntimeError as e:  # OpenVINO's own message is pages long: keep its last line
            raise ModelError(f"openvino cannot turn {self.model_dir} ({kind}) into a PagedAttention model: "
                             f"{str(e).strip().splitlines()[-1]}") from None
        left = [op.get_friendly_name() for op in model.get_ops() if op.get_type_name() == "ScaledDotProductAttention"]
        if left or model.get_sinks():
            raise ModelError(f"{self.model_dir} ({kind}) keeps {len(left)} attention op(s) and {len(model.get_sinks())} "
                             f"state(s) that PagedAttention cannot page (e.g. recurrent or cross-attention state)")
        self.sliding_windows = transforms.sliding_windows(model, self.core)  # per layer, 0 = global
        self.uses_alibi = transforms.uses_alibi(model)  # per-head scores would miss its biases
        try:
            self.softmax_scales = (transforms.expose_queries(model, self._config_head_size())
                                   if expose_queries else [])
        except ValueError as e:
            raise ModelError(f"{self.model_dir} ({kind}): {e}; per-head scoring cannot run on it") from None
        # sliding layers keep at most their window once a sequence evicts: layers then differ in length
        self.per_layer_lengths = per_layer_lengths or (expose_queries and any(self.sliding_windows))
        if self.per_layer_lengths:
            transforms.split_lengths_per_layer(model)
        props = dict(properties or {})
        if kv_cache_precision is not None:
            props["KV_CACHE_PRECISION"] = _PRECISIONS[kv_cache_precision]
        if device.upper() not in [d.upper() for d in self.core.available_devices] and not device.upper().startswith(
                ("AUTO", "HETERO", "MULTI")):
            raise ModelError(f"device {device!r} is not available here; available: {', '.join(self.core.available_devices)}")
        self.device, self.compile_properties = device, props  # a compiled scorer runs with the same settings
        try:
            self.compiled = self.core.compile_model(model, device, props)
        except RuntimeError as e:
            raise ModelError(f"cannot compile the paged model on {device}: {str(e).strip().splitlines()[-1]}") from None
        self.request = self.compiled.create_infer_request()
        self._inputs: dict[str, ov.Tensor] = {}  # the request's own input tensors, written in place each step
        self.input_names = {name for i in self.compiled.inputs for name in i.get_names()}
        self.num_layers = self.info.num_layers
        try:
            self.num_blocks = num_kv_blocks or self._blocks_for_gb(cache_size_gb)
            self.kv = KVCache(self.compiled, self.request, self.num_layers, self.num_blocks)
        except (RuntimeError, OverflowError, MemoryError, TypeError) as e:  # e.g. std::bad_alloc
            size = f"num_kv_blocks={num_kv_blocks}" if num_kv_blocks else f"cache_size={cache_size_gb} GB"
            raise CacheCapacityError(f"cannot allocate a KV pool of {size} on {device} ({type(e).__name__}); "
                                     f"lower cache_size or num_kv_blocks") from None
        self.layout = self.kv.layout
        if kv_cache_precision is not None and self.layout.precision != kv_cache_precision:
            raise ConfigError(f"KV cache precision {kv_cache_precision} was asked but {device} compiled "
                              f"{self.layout.precision} (inference precision "
                              f"{self.compiled.get_property('INFERENCE_PRECISION_HINT')}); pass "
                              f"INFERENCE_PRECISION_HINT='f16' or 'f32' as a property, or use {self.layout.precision}")
        self.block_size = self.layout.block_size
        self.num_kv_heads = self.layout.num_kv_heads
        self.head_size = self.info.kv_width // self.num_kv_heads
        self.num_q_heads = self.info.q_width // self.head_size
        self.bytes_per_block_all_layers = self.kv.bytes_per_block_all_layers
        self.max_position = int(self.hf_config.get("max_position_embeddings", 0)) or None
        vocab = self.compiled.output("logits").get_partial_shape()[-1]
        self.vocab_size = vocab.get_length() if vocab.is_static else None

    def _config_head_size(self) -> int:
        """Head size from config.json (fallback softmax scale only; 0 if it does not say)."""
        c = self.hf_config
        hidden = c.get("hidden_size") or c.get("n_embd") or c.get("d_model")
        heads = c.get("num_attention_heads") or c.get("n_head") or c.get("n_heads")
        return int(c.get("head_dim") or (hidden // heads if hidden and heads else 0))

    def _blocks_for_gb(self, cache_size_gb: float) -> int:
        key, value = self.compiled.input("key_cache.0"), self.compiled.input("value_cache.0")
        per_block = sum(int(np.prod([p.get_partial_shape()[i].get_length() for i in range(1, 4)]))
                        for p in (key, value)) * key.get_element_type().bitwidth // 8 * self.num_layers
        n = int(cache_size_gb * 2**30) // per_block
        if n < 1:
            raise CacheCapacityError(f"cache_size {cache_size_gb} GB holds no KV block ({per_block} bytes "
                                     f"each); raise cache_size or num_kv_blocks")
        return n

    def make_block_manager(self) -> BlockManager:
        return BlockManager(self.num_blocks, self.num_layers, self.block_size)

    def queries(self, layer: int) -> np.ndarray:
        """Post-RoPE queries of every token of the last step, [T, Hq, hd] (needs expose_queries)."""
        q = self.request.get_tensor(f"queries.{layer}").data
        return q.reshape(q.shape[0], -1, self.head_size)

    # -- one step ----------------------------------------------------------------------------------
    def _feed(self, inputs: dict[str, np.ndarray]) -> None:
        """Write the step's inputs into the request's own input tensors (resized in place), as openvino-genai
        does: binding new tensors every step makes the plugin re-bind its input memory in every infer."""
        tensors = self._inputs
        for name, value in inputs.items():
            tensor = tensors.get(name)
            if tensor is None:
                tensor = tensors[name] = self.request.get_tensor(name)
            if tensor.shape != value.shape:
                tensor.shape = value.shape
            tensor.data[...] = value

    def run(self, chunks: list[ScheduledChunk], blocks: BlockManager) -> np.ndarray:
        """Feed the chunks; return logits [S, V] for the chunks that sample, in chunk order.

        Built with a fixed number of numpy calls per step plus one per chunk (no per-token or per-layer
        Python loops over the batch): with many running requests this is the engine's own cost per step."""
        seqs = [c.seq for c in chunks]
        ids = [s.seq_id for s in seqs]
        n = len(chunks)
        lens = np.fromiter((c.num_tokens for c in chunks), dtype=np.int64, count=n)
        starts = np.fromiter((s.num_computed for s in seqs), dtype=np.int64, count=n)
        first_pos = starts + np.fromiter((s.position_offset for s in seqs), dtype=np.int64, count=n)
        layer_past = blocks.lens_of(ids).astype(np.int32)  # [L, S]
        past = layer_past.max(axis=0)
        total = int(lens.sum())
        if total == n:  # one token each (decoding): no slices
            input_ids = np.fromiter(map(list.__getitem__, (s.token_ids for s in seqs), starts.tolist()),
                                    dtype=np.int64, count=n)
        else:
            input_ids = np.fromiter(itertools.chain.from_iterable(
                s.token_ids[b:b + k] for s, b, k in zip(seqs, starts.tolist(), lens.tolist())), dtype=np.int64, count=total)
        # True positions: evicted tokens leave gaps in the cache, not in RoPE positions.
        begins = np.zeros(n + 1, dtype=np.int32)
        np.cumsum(lens, out=begins[1:])
        position_ids = np.arange(total, dtype=np.int64) + np.repeat(first_pos - begins[:-1], lens)
        sample_rows = np.flatnonzero(starts + lens == np.fromiter(map(len, seqs), dtype=np.int64, count=n))
        inputs = {
            "input_ids": input_ids,
            "position_ids": position_ids,
            "subsequence_begins": begins,
            "max_context_len": np.array(int((past + lens).max()), dtype=np.int32),
        }
        if self.info.has_per_layer_block_indices:
            block_ids, block_begins = blocks.gather_tables(ids)
            for layer in range(self.num_layers):
                inputs[f"block_indices.{layer}"] = block_ids[layer]
                if self.per_layer_lengths:
                    inputs[f"past_lens.{layer}"] = layer_past[layer]
                    inputs[f"block_indices_begins.{layer}"] = block_begins[layer]
        else:  # every layer holds the same blocks: layer 0's table is all layers'
            block_ids, block_begins = blocks.gather_tables(ids, layers=1)
            inputs["block_indices"] = block_ids[0]
        if not self.per_layer_lengths:
            inputs["block_indices_begins"] = block_begins[0]
            inputs["past_lens"] = past
        if "score_aggregation_window" in self.input_names:
            inputs["score_aggregation_window"] = np.zeros(n, dtype=np.int32)
        if self.info.gathers_logits:
            inputs["sampled_tokens_indices"] = (begins[1:][sample_rows] - 1).astype(np.int64)
        self._feed(inputs)
        self.request.infer(share_outputs=True)  # (the default copies every output into a new array first)
        logits = self.request.get_tensor("logits").data
        vocab = logits.shape[-1]
        logits = logits.reshape(-1, vocab)
        if not self.info.gathers_logits:
            logits = logits[begins[1:][sample_rows] - 1]
        return logits
