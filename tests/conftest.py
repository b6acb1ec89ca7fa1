"""Shared fixtures: OpenVINO IR of the test models, built once into the kvcrush-ov cache
(``$KVCRUSH_OV_HOME`` or ``~/.cache/kvcrush-ov``) and reused by later runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvcrush_ov.tools.models import prepare


@pytest.fixture(scope="session")
def tiny_llama_dir() -> Path:
    """IR of the random-weight tiny Llama (fp16; ~20 s to build the first time)."""
    return prepare("tiny-llama")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """IR of SmolLM2-135M-Instruct (fp16; ~2 min to build the first time). Use with @pytest.mark.model."""
    return prepare("smollm2-135m")


@pytest.fixture(scope="session")
def gemma3_dir() -> Path:
    """IR of Gemma 3 270M (fp16; ~5 min to build the first time). Use with @pytest.mark.model."""
    return prepare("gemma3-270m")
