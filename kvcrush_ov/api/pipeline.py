"""The user's door: an openvino_genai.LLMPipeline look-alike over our engine.

    pipe = kvcrush_ov.LLMPipeline(models_path, "CPU", scheduler_config=kvcrush_ov.SchedulerConfig(...))
    print(pipe.generate("Why is the sky blue?", max_new_tokens=64))

Prompts are templated and tokenized exactly as openvino_genai does (chat template on by default,
special tokens added only when no template is applied), so both backends see the same token ids.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import openvino_genai as ov_genai
from tqdm import tqdm

from ..core.config import GenerationConfig, SchedulerConfig
from ..core.engine.llm_engine import LLMEngine
from ..core.engine.model_runner import read_model_dir
from ..core.engine.sequence import FinishReason, Sequence
from ..core.engine.stopping import final_text
from ..core.errors import ConfigError, KVCrushError, ModelError, PromptError
from ..core.eviction_config import DEFAULT_EVICTION, RequestEviction, is_default
from .engine_loop import EngineLoop
from .generation_handle import GenerationHandle, Streamer
from .native import native_pipeline, to_native_generation


def _reason(e: Exception) -> str:
    """The informative line of an OpenVINO error (its first lines only name C++ source files)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return next((line for line in lines if not line.startswith(("Exception from", "Check "))), lines[-1] if lines else "")


@dataclass
class DecodedResults:
    """Like openvino_genai.DecodedResults: `texts`, `scores` (cumulative log-probability of each
    request's generated tokens); str() gives the text(s). Per request also what it cost: the KV bytes
    it held while decoding (its peak, after eviction), the most it held at any moment, which eviction
    path it took, its evictions and its timings."""

    texts: list[str]
    scores: list[float]
    token_ids: list[list[int]] = field(default_factory=list)
    finish_reasons: list[str] = field(default_factory=list)
    prompt_lengths: list[int] = field(default_factory=list)
    kv_bytes: list[int] = field(default_factory=list)
    peak_kv_bytes: list[int] = field(default_factory=list)  # at any moment, before eviction included (longest layer)
    # the path each request took: "none" (full cache), "after_prompt" or "memory_bounded" (its prompt was
    # compacted while prefilled, because the KV pool cannot hold it whole)
    eviction_modes: list[str] = field(default_factory=list)
    evictions: list[int] = field(default_factory=list)
    tokens_evicted: list[int] = field(default_factory=list)
    eviction_seconds: list[float] = field(default_factory=list)
    ttft_s: list[float] = field(default_factory=list)
    latency_s: list[float] = field(default_factory=list)

    def __str__(self) -> str:
        return self.texts[0] if len(self.texts) == 1 else "\n".join(self.texts)


class Tokenizer:
    """openvino_genai's Tokenizer (openvino-tokenizers models exported next to the IR) plus the
    prompt preparation rule of openvino_genai's pipelines."""

    def __init__(self, models_path: str | Path) -> None:
        self.ov_tokenizer = ov_genai.Tokenizer(str(models_path))
        self.eos_token_id = int(self.ov_tokenizer.get_eos_token_id())

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.ov_tokenizer.encode(text, add_special_tokens=add_special_tokens).input_ids.data[0].tolist()

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.ov_tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def decode_batch(self, ids: list[list[int]], skip_special_tokens: bool = True) -> list[str]:
        """Several sequences in one detokenizer call (the engine's streaming: the cost is mostly per call)."""
        return list(self.ov_tokenizer.decode([list(i) for i in ids], skip_special_tokens=skip_special_tokens))

    def apply_chat_template(self, history: list[dict], add_generation_prompt: bool = True) -> str:
        return self.ov_tokenizer.apply_chat_template(history, add_generation_prompt)

    @property
    def has_chat_template(self) -> bool:
        return bool(self.ov_tokenizer.chat_template)

    def prepare(self, prompt: str, apply_chat_template: bool) -> list[int]:
        if not isinstance(prompt, str):
            raise PromptError(f"a prompt must be a str, not {type(prompt).__name__}")
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as e:  # lone surrogates, e.g. non-UTF-8 bytes decoded with surrogateescape
            raise PromptError(f"the prompt is not valid UTF-8 text ({e.reason} at character {e.start}: "
                              f"{prompt[e.start:e.end]!r}); decode its bytes with errors='replace'") from None
        if not prompt:
            raise PromptError("the prompt is empty: give some text")
        if apply_chat_template and self.has_chat_template:
            templated = self.apply_chat_template([{"role": "user", "content": prompt}], True)
            return self.encode(templated, add_special_tokens=False)
        return self.encode(prompt, add_special_tokens=True)

    # openvino_genai.Tokenizer compatibility
    def __getattr__(self, name: str) -> Any:
        return getattr(self.ov_tokenizer, name)


class LLMPipeline:
    """generate() over a continuous-batching engine; several prompts run batched in one engine."""

    def __init__(self, models_path: str | Path, device: str = "CPU", scheduler_config: Any = None,
                 backend: str = "ours", *, enable_eviction: bool = False, **properties: Any) -> None:
        """backend: "ours" (this engine) or "native" (openvino_genai's own continuous batching, with its
        own eviction; configs are translated). enable_eviction: accept per-request eviction settings
        even without a default cache_eviction_config."""
        if backend not in ("ours", "native"):
            raise ConfigError(f"backend must be 'ours' or 'native', got {backend!r}")
        path, _ = read_model_dir(models_path)
        self.models_path = path
        self.backend = backend
        try:
            self.tokenizer = Tokenizer(path)
        except RuntimeError as e:
            raise ModelError(f"cannot load the tokenizer of {path}: {_reason(e)}") from None
        self.generation_config = self._default_generation_config(path)
        config = SchedulerConfig.from_any(scheduler_config)
        self.native = native_pipeline(path, device, config, properties) if backend == "native" else None
        self.engine = None if self.native else LLMEngine(
            path, device, config, properties, decode=self.tokenizer.decode,
            eos_token_ids=frozenset({self.generation_config.eos_token_id}), enable_eviction=enable_eviction)
        # One thread steps the engine; generate() from any thread adds requests to its running batch.
        self.loop = None if self.engine is None else EngineLoop(self.engine, self.tokenizer.decode)
        self._native_lock = threading.Lock()  # openvino_genai's LLMPipeline runs one generate() at a time

    def _default_generation_config(self, path: Path) -> GenerationConfig:
        cfg = GenerationConfig()
        gen_file = path / "generation_config.json"
        if gen_file.is_file():
            try:
                ov_cfg = ov_genai.GenerationConfig(str(gen_file))
            except RuntimeError as e:
                raise ModelError(f"cannot read {gen_file}: {_reason(e)}") from None
            cfg = GenerationConfig.from_any(ov_cfg)
        if cfg.eos_token_id < 0:
            cfg.eos_token_id = self.tokenizer.eos_token_id
        return cfg

    def get_tokenizer(self) -> Tokenizer:
        return self.tokenizer

    def get_generation_config(self) -> GenerationConfig:
        return self.generation_config

    def set_generation_config(self, config: Any) -> None:
        self.generation_config = GenerationConfig.from_any(config)

    def generate(self, inputs: str | list[str], generation_config: Any = None, streamer: Streamer | None = None,
                 progress: bool = False, eviction: RequestEviction = DEFAULT_EVICTION, **kwargs: Any) -> DecodedResults:
        """Generate for one prompt or a batch. Extra kwargs override generation_config fields.

        eviction: DEFAULT_EVICTION ("default": the scheduler config's), None (full cache) or a CacheEvictionConfig for
        these requests (without a default config, build the pipeline with enable_eviction=True).

        Thread-safe: calls from several threads join one running batch (the engine loop's).
        """
        config = self.request_config(generation_config, kwargs)
        prompts = [inputs] if isinstance(inputs, str) else list(inputs) if isinstance(inputs, (list, tuple)) else None
        if not prompts:
            raise PromptError("inputs must be a non-empty str or a non-empty list of str")
        if streamer is not None and len(prompts) > 1:
            raise ConfigError("a streamer can only be used with a single prompt (as in openvino_genai)")
        token_ids = [self.tokenizer.prepare(p, config.apply_chat_template) for p in prompts]
        if self.native is not None:
            if not is_default(eviction):
                raise ConfigError("per-request eviction needs backend='ours'; the native backend takes its "
                                  "eviction from the scheduler config")
            with self._native_lock:
                res = self.native.generate(prompts, to_native_generation(config))
            return DecodedResults(texts=list(res.texts), scores=list(res.scores),
                                  prompt_lengths=[len(t) for t in token_ids])
        handles = self._run(token_ids, config, streamer, progress, eviction)
        # what the caller gets: the handle's view (what the streamer saw, if it ended a request early)
        return self._results([h.sequence for h in handles], [h.final_text for h in handles],
                             [h.output_ids for h in handles], [h.finish_reason for h in handles])

    def results(self, seqs: list[Sequence]) -> DecodedResults:
        """Finished sequences (e.g. from generate_ids) -> DecodedResults (texts, scores and what each cost)."""
        return self._results(seqs, [final_text(s, self.tokenizer.decode) for s in seqs],
                             [s.output_ids for s in seqs], [s.finish_reason for s in seqs])

    def _results(self, seqs: list[Sequence], texts: list[str], token_ids: list[list[int]],
                 finish_reasons: list[FinishReason]) -> DecodedResults:
        bpt = self.kv_bytes_per_token
        end = [s.token_times[-1] if s.token_times else s.arrival for s in seqs]
        return DecodedResults(
            texts=texts,
            scores=[s.cumulative_logprob for s in seqs],
            token_ids=token_ids,
            finish_reasons=[r.value for r in finish_reasons],
            prompt_lengths=[s.num_prompt_tokens for s in seqs],
            kv_bytes=[int(round(s.metrics.peak_decode_kv_slots * bpt)) for s in seqs],
            peak_kv_bytes=[s.metrics.peak_kv_slots * bpt for s in seqs],
            eviction_modes=[s.eviction_mode for s in seqs],
            evictions=[s.metrics.evictions for s in seqs],
            tokens_evicted=[s.metrics.tokens_evicted for s in seqs],
            eviction_seconds=[s.metrics.eviction_seconds for s in seqs],
            ttft_s=[(s.first_token_time or s.arrival) - s.arrival for s in seqs],
            latency_s=[e - s.arrival for s, e in zip(seqs, end)],
        )

    def generate_ids(self, token_ids: Iterable[list[int]], config: GenerationConfig,
                     streamer: Streamer | None = None, progress: bool = False,
                     eviction: RequestEviction = DEFAULT_EVICTION) -> list[Sequence]:
        """Token ids in, the engine's finished sequences out (all requests batched, with any other
        caller's; eviction: these requests' own, as in generate()). A streamer that ends a request
        early leaves the sequence whole; generate() gives what the streamer saw."""
        return [h.sequence for h in self._run(list(token_ids), config, streamer, progress, eviction)]

    def _run(self, token_ids: list[list[int]], config: GenerationConfig, streamer: Streamer | None,
             progress: bool, eviction: RequestEviction = DEFAULT_EVICTION) -> list[GenerationHandle]:
        handles = self.loop.add([(i, ids, config, eviction) for i, ids in enumerate(token_ids)],
                                text=streamer is not None)
        try:
            if streamer is not None:
                handles[0].feed(streamer)
            bar = tqdm(total=len(handles), desc="generate", disable=not progress, unit="req")
            for h in handles:
                h.wait()
                bar.update(1)
            bar.close()
        except BaseException:
            for h in handles:  # leave the engine clean for the next call
                h.cancel()
            raise
        failed = [h for h in handles if h.error]
        if failed and len(handles) == 1:
            raise KVCrushError(failed[0].error)
        return handles

    def request_config(self, generation_config: Any = None, overrides: dict | None = None) -> GenerationConfig:
        """A request's config: the model's defaults, then generation_config, then overrides (fields)."""
        base = self.generation_config if generation_config is None else GenerationConfig.from_any(generation_config)
        if generation_config is not None and base.eos_token_id < 0:
            base = base.updated(eos_token_id=self.generation_config.eos_token_id)
        return base.updated(**overrides) if overrides else base

    @property
    def kv_bytes_per_token(self) -> int:
        """KV bytes one token slot costs, all layers, scales included (our backend)."""
        return self.engine.kv_bytes_per_token

    @property
    def kv_precision(self) -> str:
        """The KV cache precision the device compiled (our backend)."""
        return self.engine.kv_precision
