"""ContinuousBatchingPipeline: openvino_genai's request-level API over our engine and its loop thread.

    pipe = ContinuousBatchingPipeline(models_path, scheduler_config, "CPU")
    handle = pipe.add_request(0, "Why is the sky blue?", GenerationConfig(max_new_tokens=64))
    for out in handle.stream(): print(out.text, end="")       # or handle.read() / handle.read_all()

Requests from any thread or asyncio task join the running batch at the next step; each may carry its
own eviction settings (`eviction=CacheEvictionConfig(...)`, None for the full cache).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ..core.config import GenerationConfig
from ..core.errors import ConfigError, PromptError
from ..core.eviction_config import DEFAULT_EVICTION, RequestEviction
from .engine_loop import EngineLoop, LoopMetrics
from .generation_handle import (GenerationFinishReason, GenerationHandle, GenerationOutput,  # noqa: F401 (re-exported)
                                GenerationStatus)
from .pipeline import LLMPipeline, Tokenizer


@dataclass
class GenerationResult:
    """openvino_genai.GenerationResult: texts for text prompts, token ids for id prompts."""

    m_request_id: Any
    m_generation_ids: list
    m_scores: list[float]
    m_status: GenerationStatus
    finish_reason: str = ""
    num_prompt_tokens: int = 0
    error: str | None = None
    token_ids: list[int] = field(default_factory=list)

    def get_generation_ids(self) -> list:
        return self.m_generation_ids


class ContinuousBatchingPipeline:
    def __init__(self, models_path: str | Path | LLMPipeline, scheduler_config: Any = None, device: str = "CPU",
                 properties: dict | None = None, enable_eviction: bool = True) -> None:
        """models_path: a model directory, or an LLMPipeline whose engine and loop to share (the other
        arguments are then its own). enable_eviction: build the engine so that any request may evict
        (costs one small query output per layer each step); False serves only the scheduler config's
        own eviction."""
        if isinstance(models_path, LLMPipeline):
            self._pipe = models_path
        else:
            self._pipe = LLMPipeline(models_path, device, scheduler_config, enable_eviction=enable_eviction,
                                     **(properties or {}))
        if self._pipe.loop is None:
            raise ConfigError("ContinuousBatchingPipeline needs backend='ours'")
        self.tokenizer: Tokenizer = self._pipe.tokenizer
        self.loop: EngineLoop = self._pipe.loop
        self.engine = self._pipe.engine

    @classmethod
    def from_pipeline(cls, pipe: LLMPipeline) -> "ContinuousBatchingPipeline":
        """Share an LLMPipeline's engine and loop (both doors then feed one batch)."""
        return cls(pipe)

    # -- openvino_genai API -------------------------------------------------------------------------
    def get_tokenizer(self) -> Tokenizer:
        return self.tokenizer

    def get_config(self) -> GenerationConfig:
        return self._pipe.get_generation_config()

    def prompt_ids(self, prompt: str | list[int] | np.ndarray | Any, config: GenerationConfig) -> list[int]:
        """Text is templated/tokenized as LLMPipeline does; ids (list, array, ov.Tensor) pass through."""
        if isinstance(prompt, str):
            return self.tokenizer.prepare(prompt, config.apply_chat_template)
        data = getattr(prompt, "data", prompt)  # openvino.Tensor
        try:
            arr = np.asarray(data)
        except ValueError:
            raise PromptError("prompt token ids must be a flat list of integers") from None
        if arr.ndim == 2 and arr.shape[0] == 1:
            arr = arr[0]
        if arr.ndim != 1:
            raise PromptError(f"prompt token ids must be one flat sequence of integers, got shape {arr.shape}")
        return arr.tolist()

    def config(self, generation_config: Any = None, **kwargs: Any) -> GenerationConfig:
        """A request's config: the model's defaults, then generation_config, then kwargs."""
        return self._pipe.request_config(generation_config, kwargs)

    def add_request(self, request_id: Any, prompt: str | list[int] | Any, generation_config: Any = None,
                    eviction: RequestEviction = DEFAULT_EVICTION, stream_text: bool = True) -> GenerationHandle:
        """Queue one request; returns its handle once the engine accepted it (bad input raises here).

        eviction: DEFAULT_EVICTION ("default": the scheduler config's), None (full cache), a CacheEvictionConfig
        or a dict of its fields. stream_text: outputs carry detokenized text pieces (costs a decode per token).
        """
        config = self.config(generation_config)
        return self.loop.add([(request_id, self.prompt_ids(prompt, config), config, eviction)], text=stream_text)[0]

    def step(self) -> None:
        """Wait for one engine step (the loop thread runs them; this keeps genai's step()-driven code working)."""
        self.loop.step()

    def has_non_finished_requests(self) -> bool:
        return self.loop.has_unfinished

    def generate(self, prompts: Iterable[str | list[int]] | str, generation_config: Any = None,
                 streamer: Any = None, eviction: RequestEviction | list[RequestEviction] = DEFAULT_EVICTION,
                 ) -> list[GenerationResult]:
        """Run a batch to the end. generation_config: one for all or one per prompt; eviction likewise."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise PromptError("give at least one prompt")
        configs = generation_config if isinstance(generation_config, (list, tuple)) else [generation_config] * len(prompts)
        evictions = eviction if isinstance(eviction, (list, tuple)) else [eviction] * len(prompts)
        if len(configs) != len(prompts) or len(evictions) != len(prompts):
            raise ConfigError(f"{len(prompts)} prompts need as many generation configs / eviction settings, "
                              f"got {len(configs)} / {len(evictions)}")
        if streamer is not None and len(prompts) > 1:
            raise ConfigError("a streamer can only be used with a single prompt (as in openvino_genai)")
        configs = [self.config(c) for c in configs]
        requests = [(i, self.prompt_ids(p, c), c, e) for i, (p, c, e) in enumerate(zip(prompts, configs, evictions))]
        handles = self.loop.add(requests, text=streamer is not None)
        try:
            if streamer is not None:
                handles[0].feed(streamer)
            for h in handles:
                h.wait()
        except BaseException:
            for h in handles:
                h.cancel()
            raise
        return [self._result(h, isinstance(p, str)) for h, p in zip(handles, prompts)]

    @staticmethod
    def _result(h: GenerationHandle, text: bool) -> GenerationResult:
        return GenerationResult(h.request_id, [h.final_text] if text else [list(h.output_ids)], [0.0],
                                h.get_status(), h.finish_reason.value, h.sequence.num_prompt_tokens, h.error,
                                list(h.output_ids))

    def get_metrics(self) -> LoopMetrics:
        """Running/waiting requests, KV blocks used/free, evictions, token counts and rates."""
        return self.loop.metrics()

    def close(self) -> None:
        self.loop.close()
