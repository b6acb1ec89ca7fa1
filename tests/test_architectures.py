"""The architecture matrix: one tiny random-weight model per decoder family openvino-genai pages
(kvcrush_ov.models.TINY_ARCHS, fp32 IR built once and cached). For each: greedy full-cache outputs equal
openvino-genai's ContinuousBatchingPipeline token for token on the same IR, per-head scores equal HF
transformers' eager attention probabilities, and every policy runs with eviction with the block
accounting back to zero. Sliding-window layers keep only what they can see."""
from __future__ import annotations

import numpy as np
import openvino as ov
import openvino_genai as ov_genai
import pytest

import kvcrush_ov
from kvcrush_ov import CacheEvictionConfig, SchedulerConfig
from kvcrush_ov.config import GenerationConfig
from kvcrush_ov.engine.attention_scores import window_probabilities
from kvcrush_ov.engine.llm_engine import LLMEngine
from kvcrush_ov.models import TINY_ARCHS, hf_dir, prepare
from kvcrush_ov.policies import POLICIES as _POLICY_CLASSES

POLICIES = list(_POLICY_CLASSES)

ARCHS = list(TINY_ARCHS)
F32 = {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": ov.Type.f32}
W = 8  # scored query window
# Lengths cross block (32) and sliding-window (40/48) boundaries; one prompt per length.
LENGTHS = (5, 33, 47, 90, 161, 300)
NEW_TOKENS = 24


def prompt_ids(tokenizer, n: int, seed: int) -> list[int]:
    """A prompt of exactly n token ids: random ordinary (non-special) tokens, reproducible."""
    rng = np.random.default_rng(seed)
    return rng.integers(20, 40000, n).tolist()


@pytest.fixture(scope="session", params=ARCHS)
def arch(request) -> tuple[str, object]:
    return request.param, prepare(request.param, "fp32")


def native_outputs(model_dir, prompts, max_new_tokens: int) -> list[list[int]]:
    sc = ov_genai.SchedulerConfig()
    sc.cache_size = 1
    cb = ov_genai.ContinuousBatchingPipeline(str(model_dir), sc, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    gc = ov_genai.GenerationConfig()
    gc.max_new_tokens = max_new_tokens
    gc.apply_chat_template = False
    res = cb.generate([ov.Tensor(np.array([p], dtype=np.int64)) for p in prompts], [gc] * len(prompts))
    return [list(r.m_generation_ids[0]) for r in res]


def our_outputs(model_dir, prompts, max_new_tokens: int, eviction=None) -> tuple[list[list[int]], LLMEngine]:
    engine = LLMEngine(model_dir, "CPU", SchedulerConfig(cache_size=0.1, cache_eviction_config=eviction),
                       {"INFERENCE_PRECISION_HINT": "f32"})
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, ignore_eos=True)
    seqs = [engine.add_request(p, cfg) for p in prompts]
    while engine.has_unfinished:
        engine.step()
    return [s.output_ids for s in seqs], engine


# ----------------------------------------------------------------------------------- scores vs HF


def hf_model(name: str, as_exported: bool = True):
    """HF eager reference. as_exported: attention logit soft-capping off (Gemma 2), because the SDPA
    export drops it (the IR has one Tanh, the final-logit cap; measured), so openvino-genai and we
    run the model without it."""
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(hf_dir(name))
    if as_exported and getattr(config, "attn_logit_softcapping", None):
        config.attn_logit_softcapping = None
    return transformers.AutoModelForCausalLM.from_pretrained(hf_dir(name), config=config, dtype=torch.float32,
                                                             attn_implementation="eager").eval()


def hf_window_probs(model, ids: list[int]) -> list[np.ndarray]:
    import torch

    with torch.no_grad():
        att = model(torch.tensor([ids]), output_attentions=True).attentions
    return [a[0, :, -W:, :].double().numpy() for a in att]  # per layer [Hq, W, T]


def score_error(model_dir, name: str, prompts: list[list[int]], as_exported: bool = True) -> float:
    """Batched prefill, then one batched decode step: worst |ours - HF| over layers, heads, queries, keys."""
    eviction = CacheEvictionConfig("snapkv", budget=4000, options={"window": W, "recent_tokens": 64})
    engine = LLMEngine(model_dir, "CPU", SchedulerConfig(cache_size=0.1, max_num_batched_tokens=8192,
                                                         cache_eviction_config=eviction), F32)
    hf = hf_model(name, as_exported)
    seqs = [engine.add_request(p, GenerationConfig(max_new_tokens=3, ignore_eos=True)) for p in prompts]
    worst = 0.0
    for _ in range(2):
        engine.step()
        for seq in seqs:
            st = engine.evictor.state(seq)
            ref = hf_window_probs(hf, seq.token_ids[:seq.num_computed])
            for layer in range(engine.runner.num_layers):
                keys = engine.runner.kv.read_keys(layer, engine.blocks.tables[seq.seq_id][layer], seq.cache_len)
                ours = window_probabilities(st.queries[layer], keys, engine.runner.softmax_scales[layer],
                                            engine.runner.sliding_windows[layer])
                worst = max(worst, float(np.abs(ours - ref[layer]).max()))
    for s in seqs:
        engine.abort(s.seq_id)
    return worst


def test_per_head_scores_match_hf(arch):
    name, model_dir = arch
    prompts = [prompt_ids(None, n, seed=i) for i, n in enumerate((12, 90, 161))]
    err = score_error(model_dir, name, prompts)
    assert err <= 1e-4, f"{name}: per-head scores differ from HF eager attention by {err:.2e}"


def test_greedy_matches_openvino_genai(arch):
    name, model_dir = arch
    prompts = [prompt_ids(None, n, seed=i) for i, n in enumerate(LENGTHS)]
    ref = native_outputs(model_dir, prompts, NEW_TOKENS)
    ours, engine = our_outputs(model_dir, prompts, NEW_TOKENS)
    bad = [LENGTHS[i] for i in range(len(prompts)) if ours[i] != ref[i]]
    assert not bad, f"{name}: outputs differ from openvino-genai for prompt lengths {bad}"
    assert engine.blocks.num_used_blocks == 0


# ------------------------------------------------------------------------------------- eviction

EVICT_BUDGET = 48
SMALL = {"sink_tokens": 4, "recent_tokens": 16}


def small_options(policy: str) -> dict:
    opts = {} if policy == "full" else dict(SMALL)
    if policy in ("snapkv", "pyramidkv", "kvcrush"):
        opts["window"] = 8
    if policy == "kvcrush-block":
        opts["block_size"] = 32
    return opts


def test_every_policy_evicts_and_frees_every_block(arch):
    """All policies batched in one engine (one request each, two prompt lengths), with decode-time
    evictions: per-layer caches stay within budget (sliding layers within their window) plus one block,
    block accounting is consistent every step and back to zero at the end."""
    name, model_dir = arch
    engine = LLMEngine(model_dir, "CPU", SchedulerConfig(cache_size=0.1), F32, enable_eviction=True)
    windows = np.asarray(engine.runner.sliding_windows)
    bs = engine.runner.block_size
    seqs = []
    for i, policy in enumerate(POLICIES):
        cfg = CacheEvictionConfig(policy, budget=EVICT_BUDGET, options=small_options(policy))
        ids = prompt_ids(None, (161, 300)[i % 2], seed=100 + i)
        seqs.append(engine.add_request(ids, GenerationConfig(max_new_tokens=40, ignore_eos=True), eviction=cfg))
    while engine.has_unfinished:
        engine.step()
        engine.blocks.check_invariants()
        for s in seqs:
            if s.is_finished or s.kv_state is None or s.kv_state.targets is None:
                continue
            lens, targets = s.layer_lens(engine.runner.num_layers), s.kv_state.targets
            if s.eviction.policy.name != "full":  # PyramidKV: the budget is the mean over layers
                assert (lens < targets + bs).all(), (name, s.eviction.policy.name, lens, targets)
                assert targets.mean() <= EVICT_BUDGET, (name, s.eviction.policy.name, targets)
            assert (targets[windows > 0] <= windows[windows > 0]).all(), (name, s.eviction.policy.name, targets)
    assert all(len(s.output_ids) == 40 for s in seqs)
    assert all(s.kv_state.num_evictions >= 2 for s in seqs if s.eviction.policy.name != "full"), name
    assert engine.blocks.num_used_blocks == 0


def test_sliding_layers_evict_only_what_they_cannot_see():
    """Mistral: every layer slides (window 48). With a budget above the window, eviction drops only
    tokens no layer can see any more, so greedy outputs stay equal to openvino-genai's full cache,
    for every policy, while each layer holds at most window + one block."""
    model_dir = prepare("tiny-mistral", "fp32")
    prompts = [prompt_ids(None, n, seed=200 + i) for i, n in enumerate((90, 161, 300))]
    ref = native_outputs(model_dir, prompts, NEW_TOKENS * 2)
    for policy in ("snapkv", "kvcrush", "h2o", "streaming"):
        eviction = CacheEvictionConfig(policy, budget=96, options=small_options(policy))
        ours, engine = our_outputs(model_dir, prompts, NEW_TOKENS * 2, eviction)
        assert ours == ref, policy
        assert engine.evictor.stats.evictions >= 3, policy
        assert engine.blocks.num_used_blocks == 0
