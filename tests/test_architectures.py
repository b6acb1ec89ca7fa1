"""The architecture matrix (kvcrush_ov.tools.matrix): one tiny random-weight model per decoder family
openvino-genai pages (kvcrush_ov.tools.models.TINY_ARCHS, fp32 IR built once and cached). For each: greedy
full-cache outputs equal openvino-genai's ContinuousBatchingPipeline token for token on the same IR,
per-head scores equal HF transformers' eager attention probabilities, and every policy runs with
eviction with the block accounting back to zero. Sliding-window layers keep only what they can see."""
from __future__ import annotations

import numpy as np
import pytest

from kvcrush_ov import CacheEvictionConfig
from kvcrush_ov.tools import matrix
from kvcrush_ov.tools.models import TINY_ARCHS, hf_dir, prepare

pytest.importorskip("torch")
pytest.importorskip("transformers")

NEW_TOKENS = 24


@pytest.fixture(scope="session", params=list(TINY_ARCHS))
def arch(request) -> tuple[str, object]:
    return request.param, prepare(request.param, "fp32")


def test_greedy_matches_openvino_genai(arch):
    name, model_dir = arch
    prompts = [matrix.prompt_ids(n, seed=i) for i, n in enumerate(matrix.PARITY_LENGTHS)]
    same = matrix.parity(model_dir, prompts, NEW_TOKENS, {"INFERENCE_PRECISION_HINT": "f32"})
    bad = [n for n, ok in zip(matrix.PARITY_LENGTHS, same) if not ok]
    assert not bad, f"{name}: outputs differ from openvino-genai for prompt lengths {bad}"


def test_per_head_scores_match_hf(arch):
    name, model_dir = arch
    prompts = [matrix.prompt_ids(n, seed=i) for i, n in enumerate(matrix.SCORE_LENGTHS)]
    err = matrix.score_error(model_dir, hf_dir(name), prompts)
    assert err <= 1e-4, f"{name}: per-head scores differ from HF eager attention by {err:.2e}"


def test_every_policy_evicts_and_frees_every_block(arch):
    """Per-layer caches stay within budget (sliding layers within their window) plus growth below one
    block; block invariants hold every step; nothing is left allocated."""
    name, model_dir = arch
    runs, used = matrix.every_policy(model_dir)
    windows = np.asarray(prepare_windows(model_dir))
    bs = 32
    for run in runs:
        most, targets = np.asarray(run.max_layer_slots), np.asarray(run.targets)
        if run.policy != "full":
            assert run.evictions >= 2, (name, run)
            assert (most < targets + bs).all(), (name, run)
            assert targets.mean() <= matrix.EVICT_BUDGET, (name, run)  # PyramidKV: the mean over layers
        assert (targets[windows > 0] <= windows[windows > 0]).all(), (name, run, windows)
    assert used == 0, f"{name}: {used} blocks still used"


def prepare_windows(model_dir) -> list[int]:
    import openvino as ov

    from kvcrush_ov.core import transforms

    model = ov.Core().read_model(model_dir / "openvino_model.xml")
    transforms.make_paged_model(model)
    return transforms.sliding_windows(model)


def test_sliding_windows_read_from_the_graph():
    assert prepare_windows(prepare("tiny-mistral", "fp32")) == [48, 48]
    assert prepare_windows(prepare("tiny-gemma3", "fp32")) == [40, 40, 0]
    assert prepare_windows(prepare("tiny-llama", "fp32")) == [0, 0]


def test_sliding_layers_evict_only_what_they_cannot_see():
    """Mistral: every layer slides (window 48). With a budget above the window, eviction drops only
    tokens no layer can see any more, so greedy outputs stay equal to openvino-genai's full cache, for
    every policy, while each layer holds at most window + one block."""
    model_dir = prepare("tiny-mistral", "fp32")
    props = {"INFERENCE_PRECISION_HINT": "f32"}
    prompts = [matrix.prompt_ids(n, seed=200 + i) for i, n in enumerate((90, 161, 300))]
    ref = matrix.native_outputs(model_dir, prompts, NEW_TOKENS * 2, props)
    for policy in ("snapkv", "kvcrush", "h2o", "streaming"):
        eviction = CacheEvictionConfig(policy, budget=96, options=matrix.small_options(policy))
        ours, engine = matrix.our_outputs(model_dir, prompts, NEW_TOKENS * 2, eviction, props)
        assert ours == ref, policy
        assert engine.evictor.stats.evictions >= 3, policy
        assert engine.blocks.num_used_blocks == 0
