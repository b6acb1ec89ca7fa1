"""End-to-end eval on the tiny Llama: 2 policies x 2 budgets (plus full and a native anchor), files
and schema, resumability, and fan-out equal to separate runs."""
from __future__ import annotations

import json

import pytest

from kvcrush_ov.tools.eval.runner import EvalConfig, run_eval
from kvcrush_ov.tools.eval.suite import Sample

SUMMARY_KEYS = {"policy", "budget", "n", "score", "faithfulness", "kv_bytes_per_seq", "latency_s"}


def samples() -> list[Sample]:
    hay = "The grass is green. The sky is blue. The sun is yellow. Here we go. " * 30
    return [Sample(id=f"s{i}", prompt=hay + f"The pass key is {1000 + i}. " + hay + "What is the pass key?",
                   answers=[str(1000 + i)], metric="contains", max_new_tokens=6, task="niah", length=600,
                   answer_prefix="The pass key is") for i in range(2)]


@pytest.fixture(scope="module")
def result(tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    config = EvalConfig(policies=["full", "snapkv", "kvcrush", "native-snapkv"], budgets=[0.25, 160])
    res = run_eval(tiny_llama_dir, samples(), config, out, {"suite": "test", "command": "pytest"}, progress=False)
    return out, res, config


def test_files_and_schema(result):
    out, res, _ = result
    assert (out / "report.md").read_text().count("\n| ") >= 8 and (out / "plot.png").stat().st_size > 1000
    data = json.loads((out / "results.json").read_text())
    assert len(data["summary"]) == 4 * 2
    for row in data["summary"]:
        assert SUMMARY_KEYS <= set(row)
        assert 0 <= row["score"] <= 100 and 0 <= row["faithfulness"] <= 100 and row["n"] == 2
    full = [r for r in data["summary"] if r["policy"] == "full"]
    assert all(r["faithfulness"] == 100 for r in full)
    evicting = [r for r in data["summary"] if r["policy"] == "snapkv"]
    assert all(r["kl"] > 0 and r["nll"] > 0 for r in evicting)  # measured on forced forks that evicted
    assert all(r["kv_bytes_per_seq"] < full[0]["kv_bytes_per_seq"] for r in evicting)
    assert {r["policy"] for r in data["samples"]} == {"full", "snapkv", "kvcrush", "native-snapkv"}
    assert data["meta"]["fanout"]["saving_fraction"] > 0


def test_budget_semantics(result):
    _, res, _ = result
    rows = {(r["id"], r["policy"], r["budget"]): r for r in res["samples"]}
    for (sid, policy, budget), r in rows.items():
        if policy == "snapkv":
            want = int(budget * r["prompt_tokens"]) if budget < 1 else int(budget)
            assert r["budget_tokens"] == max(want, 96)


def test_fanout_equals_separate_runs(result, tiny_llama_dir):
    """A forked policy run gives the same greedy text as the same policy run on its own."""
    import kvcrush_ov
    from kvcrush_ov import CacheEvictionConfig, SchedulerConfig
    from kvcrush_ov.tools.eval.runner import sample_ids
    _, res, _ = result
    row = next(r for r in res["samples"] if r["policy"] == "snapkv" and r["budget"] == 160 and r["id"] == "s0")
    pipe = kvcrush_ov.LLMPipeline(tiny_llama_dir, scheduler_config=SchedulerConfig(
        cache_size=0.05, cache_eviction_config=CacheEvictionConfig("snapkv", budget=160, prefill="after")))
    ids = sample_ids(pipe.tokenizer, samples()[0])
    seq = pipe.generate_ids([ids], pipe.get_generation_config().updated(max_new_tokens=6))[0]
    assert pipe.tokenizer.decode([t for t in seq.output_ids if t not in seq.eos_token_ids]) == row["prediction"]


def test_resume_uses_cache(result, tiny_llama_dir):
    out, res, config = result
    before = {p.name: p.stat().st_mtime_ns for p in (out / "samples").rglob("*.json")}
    again = run_eval(tiny_llama_dir, samples(), config, out, {"suite": "test", "command": "pytest"}, progress=False)
    after = {p.name: p.stat().st_mtime_ns for p in (out / "samples").rglob("*.json")}
    assert before == after and again["summary"] == res["summary"]


def test_equal_bytes_across_kv_precisions(tiny_llama_dir, tmp_path):
    """--kv-precisions bf16/f32,u8 --budget-bytes: each precision keeps as many tokens as the bytes buy."""
    config = EvalConfig(policies=["snapkv"], budgets=[80_000.0], budget_bytes=True,
                        properties={"INFERENCE_PRECISION_HINT": "f32"})
    res = run_eval(tiny_llama_dir, samples()[:1], config, tmp_path, {"suite": "t", "command": "pytest"},
                   progress=False, kv_precisions=["f32", "u8"])
    rows = {r["kv_precision"]: r for r in res["summary"]}
    assert set(rows) == {"f32", "u8"} and all("kv_precision" in r for r in res["summary"])
    # u8 rows cost ~1/4 of f32 ones (+8 bytes of scale/zero-point per row): ~3x the tokens for the bytes
    assert rows["u8"]["budget_tokens_mean"] > 2.5 * rows["f32"]["budget_tokens_mean"]
    assert abs(rows["u8"]["kv_bytes_per_seq"] - rows["f32"]["kv_bytes_per_seq"]) < 0.35 * rows["f32"]["kv_bytes_per_seq"]


def test_memory_bounded_prefill_variant_runs_alone(tiny_llama_dir, tmp_path):
    """`snapkv:prefill=chunked` is prefilled on its own, compacted between chunks: it holds far less KV
    at its peak than the shared full prefill, and its text equals a pipeline run with the same config."""
    import kvcrush_ov
    from kvcrush_ov import CacheEvictionConfig, SchedulerConfig
    from kvcrush_ov.tools.eval.runner import sample_ids
    config = EvalConfig(policies=["full", "snapkv", "snapkv:prefill=chunked"], budgets=[160])
    res = run_eval(tiny_llama_dir, samples()[:1], config, tmp_path, {"suite": "test", "command": "pytest"},
                   progress=False)
    rows = {r["policy"]: r for r in res["samples"]}
    assert rows["snapkv:prefill=chunked"]["peak_kv_bytes"] < 0.6 * rows["snapkv"]["peak_kv_bytes"]
    assert 0.95 * rows["full"]["peak_kv_bytes"] <= rows["snapkv"]["peak_kv_bytes"] <= rows["full"]["peak_kv_bytes"]  # whole prompt
    assert rows["snapkv:prefill=chunked"]["kl"] is not None
    pipe = kvcrush_ov.LLMPipeline(tiny_llama_dir, scheduler_config=SchedulerConfig(
        cache_eviction_config=CacheEvictionConfig("snapkv", budget=160, prefill="chunked")))
    ids = sample_ids(pipe.tokenizer, samples()[0])
    seq = pipe.generate_ids([ids], pipe.get_generation_config().updated(max_new_tokens=6))[0]
    text = pipe.tokenizer.decode([t for t in seq.output_ids if t not in seq.eos_token_ids])
    assert text == rows["snapkv:prefill=chunked"]["prediction"]
