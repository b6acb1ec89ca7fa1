"""The architecture matrix: checks run per model (tests/test_architectures.py asserts them, and
`python scripts/arch_matrix.py` writes their figures into the README between its markers).

For one IR directory: greedy full-cache outputs against openvino-genai's ContinuousBatchingPipeline
on the same IR, per-head scores against HF transformers' eager attention probabilities (fp32 IR), and
every policy evicting in one batched engine with block accounting checked every step.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openvino as ov

from ..core.config import GenerationConfig, SchedulerConfig
from ..core.engine.attention_scores import window_probabilities
from ..core.engine.llm_engine import LLMEngine
from ..core.eviction_config import CacheEvictionConfig
from ..core.policies import POLICIES

F32 = {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": ov.Type.f32}
SCORE_WINDOW = 8  # scored query window
# Prompt lengths crossing block (32) and sliding-window (40/48) boundaries.
PARITY_LENGTHS = (5, 33, 47, 90, 161, 300)
SCORE_LENGTHS = (12, 90, 161)
EVICT_BUDGET = 48
_SMALL = {"sink_tokens": 4, "recent_tokens": 16}


def prompt_ids(n: int, seed: int, vocab: int = 40000) -> list[int]:
    """n random ordinary token ids (above the specials at the start of the vocabulary), reproducible."""
    return np.random.default_rng(seed).integers(20, vocab, n).tolist()


def small_options(policy: str) -> dict:
    """Policy options small enough for ~100-token prompts (sinks 4, recent 16, window 8)."""
    opts = {} if policy == "full" else dict(_SMALL)
    if policy in ("snapkv", "pyramidkv", "kvcrush"):
        opts["window"] = 8
    if policy == "kvcrush-block":
        opts["block_size"] = 32
    return opts


def native_outputs(model_dir: Path, prompts: list[list[int]], max_new_tokens: int,
                   properties: dict | None = None) -> list[list[int]]:
    """Greedy outputs of openvino-genai's continuous batching (full cache, EOS ignored), prompts batched."""
    import openvino_genai as ov_genai

    sc = ov_genai.SchedulerConfig()
    sc.cache_size = 1
    cb = ov_genai.ContinuousBatchingPipeline(str(model_dir), sc, "CPU", properties or {})
    gc = ov_genai.GenerationConfig()
    gc.max_new_tokens = max_new_tokens
    gc.apply_chat_template = False
    gc.ignore_eos = True  # as ours: every run is max_new_tokens long (random prompts may hit EOS)
    res = cb.generate([ov.Tensor(np.array([p], dtype=np.int64)) for p in prompts], [gc] * len(prompts))
    return [list(r.m_generation_ids[0]) for r in res]


def our_outputs(model_dir: Path, prompts: list[list[int]], max_new_tokens: int, eviction=None,
                properties: dict | None = None, cache_size: float = 0.1) -> tuple[list[list[int]], LLMEngine]:
    """Greedy outputs of our engine (prompts batched), and the engine (for its block accounting)."""
    engine = LLMEngine(model_dir, "CPU", SchedulerConfig(cache_size=cache_size, cache_eviction_config=eviction),
                       properties)
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, ignore_eos=True)
    seqs = [engine.add_request(p, cfg) for p in prompts]
    while engine.has_unfinished:
        engine.step()
    return [s.output_ids for s in seqs], engine


def parity(model_dir: Path, prompts: list[list[int]], max_new_tokens: int,
           properties: dict | None = None) -> list[bool]:
    """Per prompt: our greedy outputs equal openvino-genai's, token for token."""
    ref = native_outputs(model_dir, prompts, max_new_tokens, properties)
    ours, engine = our_outputs(model_dir, prompts, max_new_tokens, properties=properties)
    if engine.blocks.num_used_blocks:
        raise AssertionError(f"{engine.blocks.num_used_blocks} blocks still used after every request finished")
    return [a == b for a, b in zip(ours, ref)]


# ----------------------------------------------------------------------------------- scores vs HF


def hf_model(hf_dir: Path, as_exported: bool = True):
    """HF eager reference. as_exported: attention-logit soft-capping off (Gemma 2), because the SDPA
    export drops it (its IR has one Tanh, the final-logit cap), so openvino-genai and we run without it."""
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(hf_dir)
    if as_exported and getattr(config, "attn_logit_softcapping", None):
        config.attn_logit_softcapping = None
    return transformers.AutoModelForCausalLM.from_pretrained(hf_dir, config=config, dtype=torch.float32,
                                                             attn_implementation="eager").eval()


def _hf_window_probs(model, ids: list[int]) -> list[np.ndarray]:
    import torch

    with torch.no_grad():
        att = model(torch.tensor([ids]), output_attentions=True).attentions
    return [a[0, :, -SCORE_WINDOW:, :].double().numpy() for a in att]  # per layer [Hq, W, T]


def score_error(model_dir: Path, hf_dir: Path, prompts: list[list[int]], as_exported: bool = True) -> float:
    """Batched prefill, then one batched decode step: worst |ours - HF| over layers, heads, queries, keys."""
    eviction = CacheEvictionConfig("snapkv", budget=4000, options={"window": SCORE_WINDOW, "recent_tokens": 64})
    engine = LLMEngine(model_dir, "CPU", SchedulerConfig(cache_size=0.5, max_num_batched_tokens=8192,
                                                         cache_eviction_config=eviction), F32)
    hf = hf_model(hf_dir, as_exported)
    seqs = [engine.add_request(p, GenerationConfig(max_new_tokens=3, ignore_eos=True)) for p in prompts]
    runner, worst = engine.runner, 0.0
    for _ in range(2):
        engine.step()
        for seq in seqs:
            queries = engine.evictor.state(seq).queries
            ref = _hf_window_probs(hf, seq.token_ids[:seq.num_computed])
            for layer in range(runner.num_layers):
                keys = runner.kv.read_keys(layer, engine.blocks.tables[seq.seq_id][layer],
                                           engine.blocks.cache_len(seq.seq_id))
                ours = window_probabilities(queries[layer], keys, runner.softmax_scales[layer],
                                            runner.sliding_windows[layer])
                worst = max(worst, float(np.abs(ours - ref[layer]).max()))
    for s in seqs:
        engine.abort(s.seq_id)
    return worst


# ------------------------------------------------------------------------------------- eviction


@dataclass
class PolicyRun:
    policy: str
    evictions: int
    max_layer_slots: list[int]   # most slots any step, per layer
    targets: list[int]           # per-layer slots kept after eviction


def every_policy(model_dir: Path, budget: int = EVICT_BUDGET, new_tokens: int = 40) -> tuple[list[PolicyRun], int]:
    """Every policy in one engine, one request each (161 and 300 prompt tokens), batched, with
    decode-time evictions; block invariants checked every step. Returns the runs and the blocks
    still used at the end (0 when accounting is right)."""
    engine = LLMEngine(model_dir, "CPU", SchedulerConfig(cache_size=0.3), F32, enable_eviction=True,
                       per_layer_lengths=True)
    L = engine.runner.num_layers
    seqs = []
    for i, policy in enumerate(POLICIES):
        cfg = CacheEvictionConfig(policy, budget=budget, options=small_options(policy))
        seqs.append(engine.add_request(prompt_ids((161, 300)[i % 2], seed=100 + i),
                                       GenerationConfig(max_new_tokens=new_tokens, ignore_eos=True), eviction=cfg))
    most = {s.seq_id: np.zeros(L, dtype=np.int64) for s in seqs}
    targets = {}
    while engine.has_unfinished:
        engine.step()
        engine.blocks.check_invariants()
        for s in seqs:
            if not s.is_finished and engine.evictor.has_evicted(s):
                most[s.seq_id] = np.maximum(most[s.seq_id], engine.blocks.layer_lens(s.seq_id))
                targets[s.seq_id] = [int(t) for t in engine.evictor.state(s).targets]
    runs = [PolicyRun(s.eviction.policy.name, s.metrics.evictions, most[s.seq_id].tolist(),
                      targets.get(s.seq_id, [])) for s in seqs]
    if any(len(s.output_ids) != new_tokens for s in seqs):
        raise AssertionError("a request stopped early")
    return runs, engine.blocks.num_used_blocks
