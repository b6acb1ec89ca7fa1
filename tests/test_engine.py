"""Engine correctness on the tiny random Llama: against openvino-genai's continuous batching (same
kernels, so the same tokens), and scheduling invariants (chunking, mixed batches, block accounting)."""
from __future__ import annotations

import numpy as np
import openvino as ov
import openvino_genai as ov_genai
import pytest

import kvcrush_ov
from kvcrush_ov.core.config import GenerationConfig, SchedulerConfig
from kvcrush_ov.core.engine.llm_engine import LLMEngine

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves falling on a quiet river.",
    "List three prime numbers.",
    "Explain paged attention " * 70,
]


def native_ids(model_dir, prompt_ids: list[list[int]], max_new_tokens: int, **sched) -> list[list[int]]:
    cb = ov_genai.ContinuousBatchingPipeline(str(model_dir), _native_sched(**sched), "CPU")
    gc = ov_genai.GenerationConfig()
    gc.max_new_tokens = max_new_tokens
    gc.apply_chat_template = False
    out = cb.generate([ov.Tensor(np.array([ids], dtype=np.int64)) for ids in prompt_ids], [gc] * len(prompt_ids))
    return [list(o.m_generation_ids[0]) for o in out]


def _native_sched(**kw) -> ov_genai.SchedulerConfig:
    sc = ov_genai.SchedulerConfig()
    for k, v in kw.items():
        setattr(sc, k, v)
    return sc


@pytest.fixture(scope="module")
def pipe(tiny_llama_dir):
    return kvcrush_ov.LLMPipeline(tiny_llama_dir, "CPU", scheduler_config=SchedulerConfig(cache_size=0.05))


def _strip_eos(ids: list[int], eos: int) -> list[int]:
    return ids[:-1] if ids and ids[-1] == eos else ids


def test_matches_native_single_and_batched(pipe, tiny_llama_dir):
    ids = [pipe.tokenizer.prepare(p, True) for p in PROMPTS]
    ref = native_ids(tiny_llama_dir, ids, 24, cache_size=1)
    single = [pipe.generate_ids([i], GenerationConfig(max_new_tokens=24, eos_token_id=pipe.generation_config.eos_token_id))[0].output_ids for i in ids]
    batched = [s.output_ids for s in pipe.generate_ids(ids, GenerationConfig(max_new_tokens=24, eos_token_id=pipe.generation_config.eos_token_id))]
    eos = pipe.generation_config.eos_token_id
    assert [_strip_eos(r, eos) for r in ref] == [_strip_eos(s, eos) for s in single]
    assert [_strip_eos(r, eos) for r in ref] == [_strip_eos(b, eos) for b in batched]
    assert pipe.engine.blocks.num_used_blocks == 0


def test_chunked_prefill_matches_native_with_same_budget(tiny_llama_dir):
    """A 300-token prompt under a 64-token step budget is prefilled in 5 chunks, mixed with decodes."""
    ours = kvcrush_ov.LLMPipeline(tiny_llama_dir, scheduler_config=SchedulerConfig(cache_size=0.05, max_num_batched_tokens=64))
    ids = [ours.tokenizer.prepare(p, True) for p in PROMPTS]
    assert len(ids[-1]) > 4 * 64
    ref = native_ids(tiny_llama_dir, ids, 16, cache_size=1, max_num_batched_tokens=64)
    got = [s.output_ids for s in ours.generate_ids(ids, GenerationConfig(max_new_tokens=16))]
    assert got == ref
    ours.engine.blocks.check_invariants()
    assert ours.engine.blocks.num_used_blocks == 0


def _engine(model_dir, **sched) -> LLMEngine:
    # f32 everywhere so results do not depend on how tokens are batched.
    return LLMEngine(model_dir, "CPU", SchedulerConfig(**{"cache_size": 0.02, **sched}),
                     {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": ov.Type.f32})


def _run(engine: LLMEngine, seqs) -> None:
    while engine.has_unfinished:
        engine.step()
        engine.blocks.check_invariants()


def test_chunking_and_mixed_batches_do_not_change_tokens(tiny_llama_dir, pipe):
    ids = [pipe.tokenizer.prepare(p, True) for p in PROMPTS]
    cfg = GenerationConfig(max_new_tokens=12, ignore_eos=True)
    alone = []
    for i in ids:
        e = _engine(tiny_llama_dir, max_num_batched_tokens=4096)
        s = e.add_request(i, cfg)
        _run(e, [s])
        alone.append(s.output_ids)
    # Small budget: chunks cross block boundaries (block 32) and mix with other sequences' decodes;
    # requests arrive while others decode and finish at different times.
    e = _engine(tiny_llama_dir, max_num_batched_tokens=20)
    seqs = [e.add_request(ids[0], cfg), e.add_request(ids[3], cfg.updated(max_new_tokens=5))]
    mixed_steps = 0
    for _ in range(6):
        e.step()
        mixed_steps += e.last_step.num_decode_seqs > 0 and e.last_step.num_prefill_tokens > 0
    seqs += [e.add_request(ids[1], cfg), e.add_request(ids[2], cfg)]
    while e.has_unfinished:
        e.step()
        mixed_steps += e.last_step.num_decode_seqs > 0 and e.last_step.num_prefill_tokens > 0
        e.blocks.check_invariants()
    assert mixed_steps > 0
    assert [s.output_ids for s in seqs] == [alone[0], alone[3][:5], alone[1], alone[2]]
    assert [s.num_generated for s in seqs] == [12, 5, 12, 12]
    assert e.blocks.num_used_blocks == 0


def test_preemption_by_recompute_keeps_greedy_output(tiny_llama_dir, pipe):
    ids = [pipe.tokenizer.prepare(p, True) for p in PROMPTS[:3]]
    cfg = GenerationConfig(max_new_tokens=40, ignore_eos=True)
    big = _engine(tiny_llama_dir)
    ref = [big.add_request(i, cfg) for i in ids]
    _run(big, ref)
    small = _engine(tiny_llama_dir, num_kv_blocks=5, cache_size=0)  # 160 slots for 3 x ~60 tokens
    seqs = [small.add_request(i, cfg) for i in ids]
    _run(small, seqs)
    assert sum(s.num_preemptions for s in seqs) > 0
    assert [s.output_ids for s in seqs] == [s.output_ids for s in ref]
    assert small.blocks.num_used_blocks == 0


def test_abort_frees_blocks_at_once(tiny_llama_dir, pipe):
    e = _engine(tiny_llama_dir)
    s = e.add_request(pipe.tokenizer.prepare(PROMPTS[3], True), GenerationConfig(max_new_tokens=50))
    e.step()
    assert e.blocks.num_used_blocks > 0
    e.abort(s.seq_id)
    assert e.blocks.num_used_blocks == 0 and s.finish_reason.value == "abort"
    assert not e.has_unfinished


def test_sampling_is_seeded_and_respects_top_k(pipe):
    a = pipe.generate("Tell me a story.", max_new_tokens=16, do_sample=True, temperature=1.5, top_k=5, rng_seed=7)
    b = pipe.generate("Tell me a story.", max_new_tokens=16, do_sample=True, temperature=1.5, top_k=5, rng_seed=7)
    c = pipe.generate("Tell me a story.", max_new_tokens=16, do_sample=True, temperature=1.5, top_k=5, rng_seed=8)
    greedy = pipe.generate("Tell me a story.", max_new_tokens=16)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids  # another seed, another sample (16 tokens of 5 choices each)
    top1 = pipe.generate("Tell me a story.", max_new_tokens=16, do_sample=True, top_k=1, rng_seed=3)
    assert top1.token_ids == greedy.token_ids


def test_streaming_pieces_join_to_the_text(pipe):
    pieces: list[str] = []
    res = pipe.generate("What is the capital of France?", max_new_tokens=20, streamer=pieces.append)
    assert len(pieces) > 1 and "".join(pieces) == res.texts[0]


def test_stop_strings_and_streamer_stop(pipe):
    full = pipe.generate("List three prime numbers.", max_new_tokens=20, ignore_eos=True).texts[0]
    stop = full[5:8]
    assert stop.strip(), full
    res = pipe.generate("List three prime numbers.", max_new_tokens=20, ignore_eos=True, stop_strings={stop})
    assert res.texts[0] == full[:full.index(stop)] and res.finish_reasons == ["stop"]
    calls = []
    res = pipe.generate("List three prime numbers.", max_new_tokens=20, ignore_eos=True,
                        streamer=lambda piece: calls.append(piece) or len(calls) == 2)
    assert len(calls) == 2 and len(res.token_ids[0]) < 20


@pytest.mark.parametrize("kwargs, match", [
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"temperature": 0, "do_sample": True}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"no_such_field": 1}, "unknown generation parameter"),
])
def test_bad_generation_parameters(pipe, kwargs, match):
    with pytest.raises(kvcrush_ov.ConfigError, match=match):
        pipe.generate("hi", **kwargs)


def test_bad_prompts(pipe):
    with pytest.raises(kvcrush_ov.PromptError, match="empty"):
        pipe.generate("")
    with pytest.raises(kvcrush_ov.PromptError, match="maximum position"):
        pipe.generate("word " * 5000, max_new_tokens=8)
    with pytest.raises(kvcrush_ov.PromptError):
        pipe.generate([b"bytes"])
    assert pipe.engine.blocks.num_used_blocks == 0


def test_pool_too_small_for_one_request(tiny_llama_dir):
    p = kvcrush_ov.LLMPipeline(tiny_llama_dir, scheduler_config=SchedulerConfig(num_kv_blocks=2, cache_size=0))
    with pytest.raises(kvcrush_ov.CacheCapacityError, match="needs .* KV blocks"):
        p.generate("Explain paged attention " * 40, max_new_tokens=8)


def test_bad_model_dirs(tmp_path, tiny_llama_dir):
    with pytest.raises(kvcrush_ov.ModelError, match="does not exist"):
        kvcrush_ov.LLMPipeline(tmp_path / "nope")
    with pytest.raises(kvcrush_ov.ModelError, match="openvino_model.xml"):
        kvcrush_ov.LLMPipeline(tmp_path)
    with pytest.raises(kvcrush_ov.ModelError, match="device"):
        kvcrush_ov.LLMPipeline(tiny_llama_dir, "NPU7")


def test_accepts_openvino_genai_configs(tiny_llama_dir):
    sc = ov_genai.SchedulerConfig()
    sc.cache_size = 1
    sc.max_num_batched_tokens = 128
    p = kvcrush_ov.LLMPipeline(tiny_llama_dir, scheduler_config=sc)
    gc = ov_genai.GenerationConfig()
    gc.max_new_tokens = 7
    gc.ignore_eos = True
    res = p.generate("What is the capital of France?", gc)
    assert len(res.token_ids[0]) == 7
    assert p.engine.scheduler.max_num_batched_tokens == 128


def test_kv_precision_the_device_does_not_honour_is_an_error_not_silent(tiny_llama_dir):
    """On CPUs whose inference precision is bf16, OpenVINO compiles a bf16 cache when f16 is asked."""
    import openvino as ov
    if ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT") != ov.Type.bf16:
        pytest.skip("this CPU does not infer in bf16 by default")
    with pytest.raises(kvcrush_ov.ConfigError, match="INFERENCE_PRECISION_HINT"):
        kvcrush_ov.LLMPipeline(tiny_llama_dir, scheduler_config=SchedulerConfig(cache_size=0.05, kv_cache_precision="f16"))
    p = kvcrush_ov.LLMPipeline(tiny_llama_dir, scheduler_config=SchedulerConfig(cache_size=0.05, kv_cache_precision="f16"),
                               INFERENCE_PRECISION_HINT="f16")
    assert p.engine.runner.layout.precision == "f16"


@pytest.mark.parametrize("precision, key_bytes_per_token, value_bytes_per_token", [
    ("f32", 4 * 16, 4 * 16),
    ("u8", 16 + 8 * 16 / 32, 16 + 8),     # keys by channel: 8 header rows of hd bytes per 32-token block
    ("u4", 16 / 2 + 16 * 16 / 2 / 32, 16 / 2 + 16 / 2),  # u4: 16 header rows of hd nibbles per block; values hd/2 + 8 bytes
])
def test_kv_bytes_are_exact_per_precision(tiny_llama_dir, precision, key_bytes_per_token, value_bytes_per_token):
    """tiny-llama: 2 layers, 2 KV heads, head_size 16, 32-token blocks; scales and zero-points included."""
    e = LLMEngine(tiny_llama_dir, "CPU", SchedulerConfig(num_kv_blocks=8, cache_size=0, kv_cache_precision=precision),
                  {"INFERENCE_PRECISION_HINT": "f32"})
    layout = e.runner.layout
    assert layout.precision == precision and layout.block_size == 32
    per_block_layer = (key_bytes_per_token + value_bytes_per_token) * 32 * 2  # x 2 KV heads
    assert layout.bytes_per_layer_block == per_block_layer
    assert e.runner.bytes_per_block_all_layers == per_block_layer * 2  # x 2 layers
    allocated = sum(t.get_byte_size() for t in e.runner.kv._tensors)
    assert allocated == 8 * e.runner.bytes_per_block_all_layers


def test_full_cache_engine_binds_one_block_table_for_all_layers(tiny_llama_dir):
    """Without eviction every layer holds the same blocks: the graph reads one `block_indices` (as
    openvino-genai compiles a full-cache pipeline); an evicting engine keeps one table per layer."""
    full = LLMEngine(tiny_llama_dir, scheduler_config=SchedulerConfig(cache_size=0.05))
    evicting = LLMEngine(tiny_llama_dir, scheduler_config=SchedulerConfig(cache_size=0.05), enable_eviction=True)
    layers = full.runner.num_layers
    assert "block_indices" in full.runner.input_names
    assert not any(f"block_indices.{i}" in full.runner.input_names for i in range(layers))
    assert "block_indices" not in evicting.runner.input_names
    assert all(f"block_indices.{i}" in evicting.runner.input_names for i in range(layers))
    # Requests that grow, finish and free blocks at different times: the shared table stays every layer's.
    rng = np.random.default_rng(0)
    prompts = [rng.integers(10, 1000, n).tolist() for n in (40, 7, 90, 33)]
    outs = {}
    for name, engine in (("full", full), ("evicting", evicting)):
        seqs = [engine.add_request(p, GenerationConfig(max_new_tokens=n, ignore_eos=True))
                for p, n in zip(prompts, (20, 45, 9, 30))]
        while engine.has_unfinished:
            engine.step()
            tables = engine.blocks.tables
            assert all(all(t == ts[0] for t in ts) for ts in tables.values())
        outs[name] = [s.output_ids for s in seqs]
    assert outs["full"] == outs["evicting"]


def test_request_input_tensors_are_reused_across_steps(tiny_llama_dir):
    """Inputs are written into the request's own tensors, resized as the batch changes (no new tensor
    bound per step), and the tokens are those of one request run alone."""
    engine = LLMEngine(tiny_llama_dir, scheduler_config=SchedulerConfig(cache_size=0.05, max_num_batched_tokens=32))
    rng = np.random.default_rng(1)
    prompts = [rng.integers(10, 1000, n).tolist() for n in (50, 5, 70)]
    alone = []
    for p in prompts:
        s = engine.add_request(p, GenerationConfig(max_new_tokens=12, ignore_eos=True))
        while engine.has_unfinished:
            engine.step()
        alone.append(s.output_ids)
    seqs = [engine.add_request(p, GenerationConfig(max_new_tokens=12, ignore_eos=True)) for p in prompts]
    sizes = set()
    while engine.has_unfinished:
        engine.step()
        sizes.add(int(engine.runner.request.get_tensor("input_ids").shape[0]))
    assert len(sizes) > 2  # the batch shape changed from step to step
    assert [s.output_ids for s in seqs] == alone
    for name in ("input_ids", "position_ids", "past_lens", "block_indices"):  # the request reads what _feed wrote
        assert np.shares_memory(engine.runner.request.get_tensor(name).data, engine.runner._inputs[name].data)


def test_full_cache_engine_refuses_per_request_eviction_it_cannot_express(tiny_llama_dir):
    """One block table for all layers cannot hold layers that compacted differently: a request asking to
    evict on such an engine is refused up front (even a policy that needs no scores), not served wrong."""
    from kvcrush_ov import CacheEvictionConfig
    from kvcrush_ov.core.errors import ConfigError
    engine = LLMEngine(tiny_llama_dir, scheduler_config=SchedulerConfig(cache_size=0.05))
    ids = list(range(10, 200))
    with pytest.raises(ConfigError, match="without eviction support"):
        engine.add_request(ids, GenerationConfig(max_new_tokens=4), eviction=CacheEvictionConfig("streaming", budget=128))
    s = engine.add_request(ids, GenerationConfig(max_new_tokens=4, ignore_eos=True), eviction=None)
    while engine.has_unfinished:
        engine.step()
    assert len(s.output_ids) == 4
