"""Eviction inside the engine on the tiny Llama: compaction correctness, generation after eviction
against an HF reference with the evicted tokens masked out, block accounting, decode-time eviction,
fan-out forks, and config errors."""
from __future__ import annotations

import numpy as np
import openvino as ov
import openvino_genai as ov_genai
import pytest

import kvcrush_ov
from kvcrush_ov import CacheEvictionConfig, SchedulerConfig
from kvcrush_ov.core.config import GenerationConfig
from kvcrush_ov.core.engine.llm_engine import LLMEngine
from kvcrush_ov.tools.models import prepare

F32 = {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": ov.Type.f32}
PROMPT = "Explain how paged attention stores keys and values in fixed-size blocks. " * 8
POLICIES = ["streaming", "h2o", "snapkv", "kvcrush", "kvcrush-block"]
SMALL = {"sink_tokens": 4, "recent_tokens": 16}


def small_options(policy: str) -> dict:
    opts = dict(SMALL)
    if policy in ("snapkv", "pyramidkv", "kvcrush"):
        opts["window"] = 8
    if policy == "kvcrush-block":
        opts["block_size"] = 32
    return opts


@pytest.fixture(scope="module")
def tok(tiny_llama_dir):
    return kvcrush_ov.Tokenizer(tiny_llama_dir)


def make_engine(model_dir, eviction=None, **sched) -> LLMEngine:
    return LLMEngine(model_dir, "CPU", SchedulerConfig(**{"cache_size": 0.05, "cache_eviction_config": eviction, **sched}),
                     F32, enable_eviction=True)


def run(engine: LLMEngine) -> None:
    while engine.has_unfinished:
        engine.step()
        engine.blocks.check_invariants()
        for s in engine.scheduler.seqs:  # blocks held = what the slots need, per layer
            if s.seq_id in engine.blocks.tables:
                lens = engine.blocks.layer_lens(s.seq_id)
                assert all(len(t) >= engine.blocks.blocks_for(n) for t, n in zip(engine.blocks.tables[s.seq_id], lens))


@pytest.mark.parametrize("policy", POLICIES)
def test_budget_above_length_equals_full_cache(tiny_llama_dir, tok, policy):
    ids = tok.prepare(PROMPT, True)
    cfg = GenerationConfig(max_new_tokens=10, ignore_eos=True)
    full = make_engine(tiny_llama_dir)
    a = full.add_request(ids, cfg)
    run(full)
    ev = make_engine(tiny_llama_dir, CacheEvictionConfig(policy, budget=len(ids) + 64, options=small_options(policy)))
    b = ev.add_request(ids, cfg)
    run(ev)
    assert b.output_ids == a.output_ids and b.metrics.evictions == 0
    assert ev.blocks.num_used_blocks == 0


def step_capturing_first_eviction(e: LLMEngine) -> dict:
    """Run one engine step; return every layer's keys just before the first eviction and the policy's mask."""
    captured: dict = {}
    real = e.evictor._evict

    def capture(seq, plan, st, *rest):
        captured["before"] = [e.runner.kv.read_keys(l, e.blocks.tables[seq.seq_id][l], e.blocks.cache_len(seq.seq_id)).copy()
                              for l in range(e.runner.num_layers)]
        keep_mask = plan.policy.keep_mask
        object.__setattr__(plan.policy, "keep_mask", lambda stats, budget: captured.setdefault("mask", keep_mask(stats, budget)))
        try:
            return real(seq, plan, st, *rest)
        finally:
            object.__delattr__(plan.policy, "keep_mask")

    e.evictor._evict = capture
    try:
        e.step()
    finally:
        e.evictor._evict = real
    return captured


@pytest.mark.parametrize("policy", POLICIES)
def test_eviction_compacts_kept_rows_per_head(tiny_llama_dir, tok, policy):
    ids = tok.prepare(PROMPT, True)
    e = make_engine(tiny_llama_dir, CacheEvictionConfig(policy, budget=48, options=small_options(policy), prefill="after"),
                    max_num_batched_tokens=len(ids))  # the prompt in one chunk, then one eviction
    s = e.add_request(ids, GenerationConfig(max_new_tokens=2, ignore_eos=True))
    captured = step_capturing_first_eviction(e)  # prefill + eviction
    assert e.blocks.cache_len(s.seq_id) == 48 and s.metrics.tokens_evicted == len(ids) - 48
    mask = captured["mask"]
    assert mask.shape == (e.runner.num_layers, e.runner.num_kv_heads, len(ids))
    for layer, before in enumerate(captured["before"]):
        after = e.runner.kv.read_keys(layer, e.blocks.tables[s.seq_id][layer], e.blocks.cache_len(s.seq_id))
        for h in range(e.runner.num_kv_heads):
            np.testing.assert_array_equal(after[h], before[h][mask[layer, h]])
        assert len(e.blocks.tables[s.seq_id][layer]) == e.blocks.blocks_for(48)
    run(e)
    assert e.blocks.num_used_blocks == 0


def test_generation_after_eviction_matches_masked_hf_reference(tok):
    """StreamingLLM keeps the same tokens in every head, so HF can replay it: the prompt's K/V are
    computed with full attention (as in our prefill), then each new token attends only to the kept
    positions (a 4D mask) at its true position. Logits of the first 3 decode steps must agree."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from kvcrush_ov.tools.models import hf_dir
    model_dir = prepare("tiny-llama", "fp32")
    ids = tok.prepare(PROMPT, True)
    budget = 40
    e = make_engine(model_dir, CacheEvictionConfig("streaming", budget=budget, options=SMALL, prefill="after"),
                    max_num_batched_tokens=len(ids))
    s = e.add_request(ids, GenerationConfig(max_new_tokens=4, ignore_eos=True))
    logits = []
    run_model = e.runner.run
    e.runner.run = lambda chunks, blocks: logits.append(run_model(chunks, blocks)[0].astype(np.float64)) or logits[-1][None]
    run(e)
    assert s.metrics.evictions == 1 and len(logits) == 4
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir("tiny-llama"), dtype=torch.float32,
                                                           attn_implementation="eager").eval()
    n = len(ids)
    kept = np.r_[0:4, n - (budget - 4):n]  # sinks + recent after the prompt
    with torch.no_grad():
        out = hf(torch.tensor([ids]), use_cache=True)
        cache = out.past_key_values
        np.testing.assert_allclose(out.logits[0, -1].numpy(), logits[0], atol=1e-4)
        visible = set(kept.tolist())
        for step in range(1, 4):
            pos = n + step - 1
            visible.add(pos)
            mask = torch.full((1, 1, 1, pos + 1), float("-inf"))
            mask[..., sorted(visible)] = 0.0
            o = hf(torch.tensor([[s.token_ids[pos]]]), past_key_values=cache, attention_mask=mask,
                   position_ids=torch.tensor([[pos]]), use_cache=True)
            cache = o.past_key_values
            np.testing.assert_allclose(o.logits[0, -1].numpy(), logits[step], atol=1e-4)


def _decode_with_eviction(model_dir, tok, new_tokens: int, **config) -> tuple[LLMEngine, object, int]:
    """(engine, sequence, peak slots held) after generating new_tokens with snapkv at budget 40."""
    e = make_engine(model_dir, CacheEvictionConfig("snapkv", budget=40, options=small_options("snapkv"), **config))
    s = e.add_request(tok.prepare("Count slowly.", True), GenerationConfig(max_new_tokens=new_tokens, ignore_eos=True))
    peak = 0
    while e.has_unfinished:
        e.step()
        peak = max(peak, e.blocks.cache_len(s.seq_id))
        e.blocks.check_invariants()
    assert s.num_generated == new_tokens
    return e, s, peak


def test_decode_time_eviction_keeps_cache_within_budget(tiny_llama_dir, tok):
    e, s, peak = _decode_with_eviction(tiny_llama_dir, tok, 120)
    assert peak < 40 + e.runner.block_size and s.metrics.evictions >= 3
    assert e.blocks.num_used_blocks == 0


def test_decode_slack_makes_fewer_larger_evictions(tiny_llama_dir, tok):
    """decode_slack=40 rounds up to 2 blocks: decoding evicts at budget + 3 blocks, not + 1 block."""
    peaks, evictions = {}, {}
    for slack in (0, 40):
        e, s, peaks[slack] = _decode_with_eviction(tiny_llama_dir, tok, 200, decode_slack=slack)
        evictions[slack] = s.metrics.evictions
    bs = e.runner.block_size
    assert peaks[0] < 40 + bs and 40 + bs < peaks[40] < 40 + 3 * bs
    assert evictions[40] <= evictions[0] // 2 and evictions[40] >= 2


def test_fork_fans_one_prefill_out_to_policies(tiny_llama_dir, tok):
    ids = tok.prepare(PROMPT, True)
    cfg = GenerationConfig(max_new_tokens=8, ignore_eos=True)
    configs = {p: CacheEvictionConfig(p, budget=48, options=small_options(p), prefill="after")  # as a fork does
               for p in ("streaming", "snapkv", "kvcrush")}
    alone = {}
    for name, ev in configs.items():
        e = make_engine(tiny_llama_dir, ev)
        s = e.add_request(ids, cfg)
        run(e)
        alone[name] = s.output_ids
    e = make_engine(tiny_llama_dir)
    parent = e.add_request(ids, cfg, query_window=max(ev.window for ev in configs.values()))
    while parent.num_generated == 0:
        e.step()
    children = {name: e.fork(parent, cfg, ev) for name, ev in configs.items()}
    e.blocks.check_invariants()
    assert all(e.blocks.cache_len(c.seq_id) == 48 for c in children.values())
    run(e)
    assert {n: c.output_ids for n, c in children.items()} == alone
    full = make_engine(tiny_llama_dir)
    ref = full.add_request(ids, cfg)
    run(full)
    assert parent.output_ids == ref.output_ids  # the parent's shared blocks were never written by children
    assert e.blocks.num_used_blocks == 0


@pytest.mark.parametrize("kwargs, match", [
    ({"policy": "nope"}, "unknown policy"),
    ({"budget": -5}, "budget"),
    ({"budget": 10, "options": {"sink_tokens": 8, "recent_tokens": 16}}, "budget"),
    ({"options": {"anchors": "north"}}, "anchor"),
    ({"options": {"representative_fraction": 1.5}}, "representative_fraction"),
    ({"policy": "snapkv", "options": {"sink_tokens": -1}}, "sink_tokens"),
    ({"decode_slack": -32}, "decode_slack"),
])
def test_bad_eviction_configs(kwargs, match):
    with pytest.raises(kvcrush_ov.ConfigError, match=match):
        CacheEvictionConfig(**{"policy": "kvcrush", "budget": 256, **kwargs})


def test_budget_beyond_context_and_pool(tiny_llama_dir):
    with pytest.raises(kvcrush_ov.ConfigError, match="context"):
        make_engine(tiny_llama_dir, CacheEvictionConfig("streaming", budget=100_000), cache_size=1.0)
    with pytest.raises(kvcrush_ov.ConfigError, match="pool"):
        make_engine(tiny_llama_dir, CacheEvictionConfig("streaming", budget=512), num_kv_blocks=4, cache_size=0)


def test_openvino_genai_eviction_config_is_translated(tiny_llama_dir, tok):
    cfg = ov_genai.CacheEvictionConfig(32, 32, 128, ov_genai.AggregationMode.NORM_SUM)
    ours = CacheEvictionConfig.from_any(cfg)
    assert (ours.policy, ours.budget, ours.options["sink_tokens"], ours.options["recent_tokens"]) == ("snapkv", 128, 32, 32)
    cfg.kvcrush_config = ov_genai.KVCrushConfig(2, ov_genai.KVCrushAnchorPointMode.MEAN, 0)
    ours = CacheEvictionConfig.from_any(cfg)
    assert (ours.policy, ours.budget) == ("kvcrush-block", 128 + 2 * 32)  # its blocks sit on top of max_cache_size
    sc = ov_genai.SchedulerConfig()
    sc.cache_size = 1
    sc.use_cache_eviction = True
    sc.cache_eviction_config = ov_genai.CacheEvictionConfig(32, 32, 128, ov_genai.AggregationMode.NORM_SUM)
    pipe = kvcrush_ov.LLMPipeline(tiny_llama_dir, scheduler_config=sc)
    res = pipe.generate(PROMPT * 2, max_new_tokens=4)
    assert len(res.token_ids[0]) == 4 and pipe.engine.evictor.stats.evictions >= 1


def test_pyramidkv_holds_different_lengths_per_layer(tiny_llama_dir, tok):
    ids = tok.prepare(PROMPT, True)
    cfg = GenerationConfig(max_new_tokens=70, ignore_eos=True)
    e = make_engine(tiny_llama_dir, CacheEvictionConfig("pyramidkv", budget=48, options=small_options("pyramidkv")))
    s = e.add_request(ids, cfg)
    while s.metrics.evictions == 0:
        e.step()
    lens = e.blocks.layer_lens(s.seq_id)
    assert lens[0] > lens[-1] and lens.sum() == 48 * e.runner.num_layers  # equal memory, pyramid shape
    assert [len(t) for t in e.blocks.tables[s.seq_id]] == [e.blocks.blocks_for(n) for n in lens]
    while s.num_generated < 69:  # decoding continues with per-layer past_lens and evicts per layer again
        e.step()
        e.blocks.check_invariants()
    assert (e.blocks.layer_lens(s.seq_id) < e.evictor.state(s).targets + e.runner.block_size).all()
    run(e)
    assert s.num_generated == 70 and s.metrics.evictions >= 2
    # memory reported is the mean over layers: the budget (+ growth), not the largest layer
    assert s.metrics.peak_decode_kv_slots < 48 + e.runner.block_size < lens[0] + e.runner.block_size
    assert e.blocks.num_used_blocks == 0


@pytest.mark.parametrize("precision", ["u8", "u4", "f16"])
def test_eviction_on_quantized_and_half_caches(tiny_llama_dir, tok, precision):
    """u8 caches are compiled with keys quantized per token when eviction is on, so a kept token is
    one self-contained row (scale and zero-point travel with it)."""
    ids = tok.prepare(PROMPT, True)
    e = LLMEngine(tiny_llama_dir, "CPU", SchedulerConfig(cache_size=0.05, kv_cache_precision=precision,
                  cache_eviction_config=CacheEvictionConfig("snapkv", budget=48, options=small_options("snapkv"))),
                  {"INFERENCE_PRECISION_HINT": "f32"})  # bf16 inference would turn an f16 cache into bf16
    assert e.runner.layout.precision == precision and e.runner.layout.token_rows
    s = e.add_request(ids, GenerationConfig(max_new_tokens=40, ignore_eos=True))
    before = step_capturing_first_eviction(e)
    after = e.runner.kv.read_keys(0, e.blocks.tables[s.seq_id][0], e.blocks.cache_len(s.seq_id))
    for h in range(e.runner.num_kv_heads):
        np.testing.assert_array_equal(after[h], before["before"][0][h][before["mask"][0, h]])
    run(e)
    assert s.num_generated == 40 and e.blocks.num_used_blocks == 0


def test_native_translation_keeps_total_tokens_and_fits_small_budgets():
    from kvcrush_ov.api.native import to_native_eviction
    from kvcrush_ov.core.policies.defaults import SNAPKV_WINDOW
    n = to_native_eviction(CacheEvictionConfig("kvcrush-block", budget=512))
    # 25% of the 416 selectable tokens -> 3 KVCrush blocks on top of max_cache_size, 512 in total
    assert (n.get_max_cache_size(), n.kvcrush_config.budget, n.snapkv_window_size) == (416, 3, SNAPKV_WINDOW)
    n = to_native_eviction(CacheEvictionConfig("kvcrush-block", budget=132))
    assert n.get_start_size() + n.get_recent_size() < n.get_max_cache_size() <= 132
    n = to_native_eviction(CacheEvictionConfig("snapkv", budget=512))
    assert (n.get_start_size(), n.get_recent_size(), n.get_max_cache_size(), n.snapkv_window_size) == (32, 64, 512,
                                                                                                     SNAPKV_WINDOW)
    with pytest.raises(kvcrush_ov.ConfigError, match="natively"):
        to_native_eviction(CacheEvictionConfig("pyramidkv", budget=512))
