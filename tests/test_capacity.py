"""`kvcrush-ov bench --capacity` on the tiny model: one pool, full cache vs a policy, both arrival patterns."""
from __future__ import annotations

import json

from kvcrush_ov.cli import main


def test_capacity_bench_reports_both_sides_and_the_ratio(tiny_llama_dir, tmp_path):
    out = tmp_path / "cap.json"
    rc = main(["bench", "--capacity", "--model", str(tiny_llama_dir), "--num-kv-blocks", "32", "--requests", "8",
               "--prompt-tokens", "400", "--new-tokens", "24", "--policy", "snapkv", "--budget", "128",
               "--arrival-rate", "50", "--out", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 10_000
    for key in ("capacity", "capacity_poisson"):
        cap = report[key]
        full, policy = cap["full"], cap["policy"]
        for side in (full, policy):
            assert side["requests"] == 8 and side["peak_kv_blocks"] <= 32
            assert side["ttft_s_p50"] <= side["ttft_s_p95"] and side["tpot_ms_p50"] <= side["tpot_ms_p95"]
        # 400 + 24 tokens = 14 blocks: the full cache holds 2 sequences; evicted to 128 tokens (5 blocks)
        # once their prompt is done, more of them fit the same pool
        assert full["max_decoding"] <= 2 < policy["max_decoding"]
        assert cap["ratio"]["max_running"] == policy["max_running"] / full["max_running"]
        assert full["preemptions"] > 0 and policy["preemptions"] <= full["preemptions"]
    timeline = json.loads((tmp_path / report["timelines_file"]).read_text())["all"]["full"]
    assert len(timeline["t"]) == len(timeline["kv_blocks"]) and max(timeline["kv_blocks"]) <= 32
