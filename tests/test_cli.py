"""The command line: one-line errors with a non-zero exit and no traceback; prepare prints the
directory last; generate and bench run on the tiny model."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest


def cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvcrush_ov", *args], capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(proc: subprocess.CompletedProcess, match: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and match in lines[0], proc.stderr


def test_prepare_prints_directory_last(tiny_llama_dir):
    proc = cli("prepare", "tiny-llama")
    assert proc.returncode == 0
    assert proc.stdout.strip().splitlines()[-1] == str(tiny_llama_dir)


@pytest.mark.parametrize("args, match", [
    (["generate", "--model", "/no/such/dir", "--prompt", "hi"], "does not exist"),
    (["prepare", "gpt-17"], "unknown model"),
    (["prepare", "tiny-llama", "--weight-format", "int3"], "weight format"),
    (["generate", "--model", "tiny-llama", "--prompt", "hi", "--policy", "magic"], "unknown policy"),
    (["generate", "--model", "tiny-llama", "--prompt", "hi", "--policy", "snapkv", "--budget", "8"], "budget"),
    (["generate", "--model", "tiny-llama", "--prompt", "hi", "--max-new-tokens", "0"], "max_new_tokens"),
    (["generate", "--model", "tiny-llama", "--prompt", ""], "empty"),
    (["generate", "--model", "tiny-llama", "--prompt", "hi", "--device", "NPU9"], "device"),
    (["generate", "--model", "tiny-llama", "--prompt", "hi", "--policy", "kvcrush", "--policy-option", "anchors=north"], "anchor"),
])
def test_bad_input_is_one_line(tiny_llama_dir, args, match):
    assert_one_line_error(cli(*args), match)


def test_non_utf8_prompt_file(tmp_path, tiny_llama_dir):
    bad = tmp_path / "p.txt"
    bad.write_bytes(b"caf\xe9 \xff\xfe")
    assert_one_line_error(cli("generate", "--model", "tiny-llama", "--prompt-file", str(bad)), "utf-8")


def test_model_without_sdpa(tmp_path, tiny_llama_dir):
    """A directory whose openvino_model.xml is not a stateful SDPA LLM (here: the tokenizer model)."""
    for name in ("openvino_tokenizer.xml", "openvino_tokenizer.bin", "openvino_detokenizer.xml", "openvino_detokenizer.bin"):
        shutil.copy(tiny_llama_dir / name, tmp_path / name)
    shutil.copy(tiny_llama_dir / "openvino_tokenizer.xml", tmp_path / "openvino_model.xml")
    shutil.copy(tiny_llama_dir / "openvino_tokenizer.bin", tmp_path / "openvino_model.bin")
    assert_one_line_error(cli("generate", "--model", str(tmp_path), "--prompt", "hi"), "ScaledDotProductAttention")


def test_generate_takes_the_memory_bounded_path_only_for_a_prompt_the_pool_cannot_hold(tiny_llama_dir):
    """8 blocks = 256 slots: a ~600-token prompt runs memory-bounded with eviction (the default --prefill
    auto), and is a one-line error without it."""
    args = ("generate", "--model", "tiny-llama", "--prompt", "Say hi. " * 150, "--num-kv-blocks", "8",
            "--max-new-tokens", "4")
    proc = cli(*args, "--policy", "snapkv", "--budget", "96")
    assert proc.returncode == 0 and "eviction path memory_bounded" in proc.stderr, proc.stderr
    assert_one_line_error(cli(*args), "KV blocks")


def test_generate_and_bench_run(tmp_path, tiny_llama_dir):
    proc = cli("generate", "--model", "tiny-llama", "--prompt", "Say hi. " * 40, "--policy", "kvcrush",
               "--budget", "128", "--max-new-tokens", "8")
    assert proc.returncode == 0 and "policy kvcrush, eviction path after_prompt" in proc.stderr
    out = tmp_path / "b.json"
    proc = cli("bench", "--model", "tiny-llama", "--backend", "compare", "--prompt-tokens", "64",
               "--concurrency", "2", "--new-tokens", "4", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert {r["backend"] for r in report["results"]} == {"ours", "native"}
    by = {b: [r["e2e_tok_s"] for r in report["results"] if r["backend"] == b] for b in ("ours", "native")}
    ratio = report["ratios"][0]["e2e_throughput_ours_over_native"]
    assert ratio == pytest.approx(float(np.median(by["ours"]) / np.median(by["native"])))
