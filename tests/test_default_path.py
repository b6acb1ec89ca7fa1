"""The default eviction path: evicted after the whole prompt whenever the KV pool can hold it,
memory-bounded only for a prompt the pool can never hold; reported per request; measured by the eval
exactly as LLMPipeline runs it. Tiny Llama with f32 compute and KV, so outputs do not depend on how
requests are batched (equalities below are exact)."""
from __future__ import annotations

import json

import pytest

import kvcrush_ov
from kvcrush_ov import CacheEvictionConfig, SchedulerConfig
from kvcrush_ov.cli import build_parser
from kvcrush_ov.tools.eval.runner import EvalConfig, run_eval, sample_ids
from kvcrush_ov.tools.eval.suite import Sample

F32 = {"INFERENCE_PRECISION_HINT": "f32"}
POOL_BLOCKS = 16  # x 32 = 512 slots
BUDGET = 128
OURS = ["streaming", "h2o", "snapkv", "pyramidkv", "kvcrush", "kvcrush-block"]


def pipeline(model_dir, policy: str | None, blocks: int = POOL_BLOCKS) -> kvcrush_ov.LLMPipeline:
    eviction = None if policy is None else CacheEvictionConfig(policy, budget=BUDGET)
    return kvcrush_ov.LLMPipeline(model_dir, scheduler_config=SchedulerConfig(
        num_kv_blocks=blocks, kv_cache_precision="f32", cache_eviction_config=eviction), **F32)


def run(pipe: kvcrush_ov.LLMPipeline, ids: list[list[int]], **config) -> kvcrush_ov.DecodedResults:
    """LLMPipeline.generate on token ids (the eval's prompts, built as a user of openvino_genai would)."""
    config = pipe.get_generation_config().updated(**config)
    return pipe.results(pipe.generate_ids(ids, config))


def samples() -> list[Sample]:
    """9 prompts of ~190-460 tokens (the pool holds each whole) and one of ~900 (it cannot)."""
    hay = "The grass is green. The sky is blue. The sun is yellow. Here we go. "
    return [Sample(id=f"s{i}", prompt=hay * reps + f"The pass key is {4000 + i}. " + hay * 3 + "What is the pass key?",
                   answers=[str(4000 + i)], metric="contains", max_new_tokens=8, task="niah", length=0,
                   answer_prefix="The pass key is")
            for i, reps in enumerate([4, 6, 8, 10, 12, 14, 16, 18, 20, 50])]


@pytest.fixture(scope="module")
def evaluated(tiny_llama_dir, tmp_path_factory):
    config = EvalConfig(policies=["full"] + OURS, budgets=[BUDGET], num_kv_blocks=POOL_BLOCKS, kv_precision="f32",
                        properties=F32)
    res = run_eval(tiny_llama_dir, samples(), config, tmp_path_factory.mktemp("eval"),
                   {"suite": "t", "command": "pytest"}, progress=False)
    return {(r["policy"], r["id"]): r for r in res["samples"]}


@pytest.mark.parametrize("policy", OURS)
def test_eval_rows_equal_pipeline_outputs(evaluated, tiny_llama_dir, policy):
    """Each eval row is what LLMPipeline.generate answers with a plain CacheEvictionConfig(policy,
    budget): the same text, the same path (after the prompt, or memory-bounded for the prompt the pool
    cannot hold) and the same peak KV."""
    pipe = pipeline(tiny_llama_dir, policy)
    ids = [sample_ids(pipe.tokenizer, s) for s in samples()]
    assert max(map(len, ids[:-1])) + 9 <= POOL_BLOCKS * 32 < len(ids[-1])
    res = run(pipe, ids, max_new_tokens=8)
    rows = [evaluated[(policy, s.id)] for s in samples()]
    assert res.eviction_modes == ["after_prompt"] * 9 + ["memory_bounded"]
    assert [r["eviction_mode"] for r in rows] == res.eviction_modes
    assert [r["prediction"] for r in rows] == res.texts
    assert [r["peak_kv_bytes"] for r in rows] == res.peak_kv_bytes
    assert rows[-1]["kl"] is None and rows[0]["kl"] is not None  # no full-cache reference for the long one


def test_full_cache_row_is_absent_where_the_pool_cannot_hold_it(evaluated):
    assert ("full", "s9") not in evaluated and ("full", "s8") in evaluated
    assert evaluated[("snapkv", "s9")]["rouge_l_full"] is None


def test_peak_kv_is_the_whole_prompt_before_eviction(tiny_llama_dir):
    """peak_kv_bytes is the most KV a request held at any moment: the whole prompt just before the
    eviction after it (hand-computed from the model's shape), not the budget it was evicted to."""
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    layers, kv_heads = config["num_hidden_layers"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    pipe = pipeline(tiny_llama_dir, "snapkv")
    ids = sample_ids(pipe.tokenizer, samples()[5])
    res = run(pipe, [ids], max_new_tokens=40, ignore_eos=True)
    per_token = layers * 2 * kv_heads * head_dim * 4  # K and V, f32
    assert res.peak_kv_bytes == [len(ids) * per_token]
    assert res.kv_bytes[0] < (BUDGET + 32) * per_token and res.evictions[0] >= 2


def test_the_path_depends_on_the_pool_not_the_load(tiny_llama_dir):
    """The same request takes the same path and gives the same answer alone and behind a queue that
    fills the pool: under load it waits for room instead of taking the lossy memory-bounded path."""
    pipe = pipeline(tiny_llama_dir, "kvcrush")
    ids = [sample_ids(pipe.tokenizer, s) for s in samples()[:9]]
    alone = run(pipe, [ids[8]], max_new_tokens=8)
    busy = run(pipe, ids, max_new_tokens=8)  # the others hold the pool when ids[8] arrives, last
    assert busy.eviction_modes == ["after_prompt"] * 9
    assert alone.texts[0] == busy.texts[-1] and alone.peak_kv_bytes[0] == busy.peak_kv_bytes[-1]
    assert busy.ttft_s[-1] > busy.ttft_s[0]  # it did wait behind the others


def test_a_prompt_the_pool_cannot_hold_runs_memory_bounded_only_with_eviction(tiny_llama_dir):
    from kvcrush_ov.core.errors import CacheCapacityError
    long_ids = sample_ids(pipeline(tiny_llama_dir, None).tokenizer, samples()[-1])
    with pytest.raises(CacheCapacityError, match="budget"):
        run(pipeline(tiny_llama_dir, None), [long_ids], max_new_tokens=4)
    res = run(pipeline(tiny_llama_dir, "snapkv"), [long_ids], max_new_tokens=4)
    assert res.eviction_modes == ["memory_bounded"] and res.peak_kv_bytes[0] < len(long_ids) * 64 * 4 * 2


@pytest.mark.parametrize("command", ["generate", "serve", "bench"])
def test_command_line_default_is_auto(command):
    """generate, serve and bench build the same default CacheEvictionConfig (prefill="auto")."""
    args = build_parser().parse_args([command])
    assert args.prefill == CacheEvictionConfig().prefill == "auto"
