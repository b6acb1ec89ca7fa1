"""Model-level checks on Gemma 3 270M (marker `model`), the second real model: 18 layers, 5 sliding
(window 512) : 1 global, 4 query heads, 1 KV head, head_dim 256, QK-norm. Its tokenizer is rebuilt from
the GGUF (transformers' conversion is broken); our engine equals openvino-genai's continuous batching
token for token, and with eviction its sliding layers shed exactly what they cannot see."""
from __future__ import annotations

import numpy as np
import pytest

import kvcrush_ov
from kvcrush_ov import CacheEvictionConfig
from kvcrush_ov.tools import matrix
from kvcrush_ov.core.config import SchedulerConfig
from kvcrush_ov.tools.models import hf_dir

pytestmark = pytest.mark.model

WINDOW = 512


@pytest.fixture(scope="module")
def tok(gemma3_dir):
    return kvcrush_ov.Tokenizer(gemma3_dir)


def gemma_prompts(tok, n: int = 10, lo: int = 20, hi: int = 2000) -> list[list[int]]:
    from test_smollm2 import prompts_for  # stdlib documentation of n lengths, a question at the end

    return prompts_for(tok, n, lo, hi)


def test_tokenizer_is_gemmas_sentencepiece_with_bos(gemma3_dir, tok):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(hf_dir("gemma3-270m"))
    ids = tok.encode("The capital of France is")
    assert hf.convert_ids_to_tokens(ids) == ["<bos>", "The", "▁capital", "▁of", "▁France", "▁is"]
    texts = ["Hello world! 12345", "naïve café — 東京 🙂", "a\n\n\tb   c", "<start_of_turn>user\nhi<end_of_turn>"]
    for text in texts:  # the OpenVINO tokenizer (openvino-tokenizers) agrees with the repaired HF one
        assert tok.encode(text) == hf(text).input_ids, text
        assert tok.decode(tok.encode(text), skip_special_tokens=False).replace("<bos>", "") == text


def test_answers_plain_facts(gemma3_dir):
    pipe = kvcrush_ov.LLMPipeline(gemma3_dir, "CPU", scheduler_config=SchedulerConfig(cache_size=0.5))
    assert "100" in str(pipe.generate("Water boils at a temperature of", max_new_tokens=6))
    assert "Tokyo" in str(pipe.generate("The capital of France is Paris. The capital of Japan is", max_new_tokens=4))


def test_greedy_matches_openvino_genai_token_for_token(gemma3_dir, tok):
    prompts = gemma_prompts(tok)
    lengths = [len(p) for p in prompts]
    assert min(lengths) <= 30 and max(lengths) >= 1900, lengths  # beyond the 512 window
    ref = matrix.native_outputs(gemma3_dir, prompts, 24)
    ours, engine = matrix.our_outputs(gemma3_dir, prompts, 24, cache_size=0.5)
    bad = [lengths[i] for i in range(len(prompts)) if ours[i] != ref[i]]
    assert not bad, f"outputs differ from openvino-genai for prompt lengths {bad}"
    assert engine.blocks.num_used_blocks == 0
    single, _ = matrix.our_outputs(gemma3_dir, [prompts[-1]], 24, cache_size=0.5)
    assert single[0] == ref[-1]


def test_sliding_layers_shed_what_they_cannot_see(gemma3_dir, tok):
    """The `full` policy with eviction on: global layers keep everything, the 15 sliding layers keep
    their newest 512 tokens; outputs stay equal to openvino-genai's full cache while sliding layers
    hold at most window + one block."""
    prompts = gemma_prompts(tok)[-3:]  # ~900-2000 tokens
    ref = matrix.native_outputs(gemma3_dir, prompts, 40)
    ours, engine = matrix.our_outputs(gemma3_dir, prompts, 40, CacheEvictionConfig("full", budget=WINDOW),
                                      cache_size=0.5)
    assert ours == ref
    windows = np.asarray(engine.runner.sliding_windows)
    assert (windows > 0).sum() == 15 and set(windows[windows > 0]) == {WINDOW}
    assert engine.evictor.stats.evictions >= 3
    assert engine.blocks.num_used_blocks == 0


def test_kvcrush_on_one_kv_head_keeps_sliding_layers_in_their_window(gemma3_dir, tok):
    """KVCrush (4 query heads -> 4-bit signatures) at a 256-token budget on one KV head: it runs with
    decode-time evictions and returns every block (the sliding-layer rule is checked on tiny-gemma3)."""
    prompts = gemma_prompts(tok)[-2:]
    eviction = CacheEvictionConfig("kvcrush", budget=256)
    engine_out, engine = matrix.our_outputs(gemma3_dir, prompts, 40, eviction, cache_size=0.5)
    assert all(len(o) == 40 for o in engine_out)
    assert engine.evictor.stats.evictions >= 2
    assert engine.blocks.num_used_blocks == 0
