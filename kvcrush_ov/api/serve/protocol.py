"""The OpenAI request bodies we accept, and their translation into a prompt + GenerationConfig.

Fields we cannot honour (n > 1, logprobs, echo, penalties) are rejected with a 400 naming them, never
silently ignored; fields OpenAI clients send that do not change the answer (user, metadata) are ignored.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ...core.config import GenerationConfig
from ...core.errors import ConfigError, PromptError
from ...core.eviction_config import DEFAULT_EVICTION, CacheEvictionConfig, RequestEviction


class KVCacheEviction(BaseModel):
    """Per-request eviction override: {"policy": "kvcrush", "budget": 512, "options": {...}}; `prefill` and
    `decode_slack` as the CLI's --prefill/--decode-slack (their defaults, not the server's, when unset)."""

    model_config = ConfigDict(extra="forbid")
    policy: str
    budget: int | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    evict_during_decode: bool = True
    prefill: Literal["auto", "after", "chunked"] = "auto"
    decode_slack: int = Field(default=0, ge=0)


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)          # extension (vLLM's)
    min_tokens: int | None = Field(default=None, ge=0)     # extension (vLLM's)
    ignore_eos: bool = False                               # extension (vLLM's)
    seed: int | None = Field(default=None, ge=0)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    logprobs: Any = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    kv_cache_eviction: KVCacheEviction | None = None

    def unsupported(self) -> None:
        if self.n != 1:
            raise ConfigError(f"n={self.n} is not supported: ask for one choice per request (n=1)")
        if self.logprobs not in (None, False, 0):
            raise ConfigError("logprobs are not supported by this server; leave logprobs unset")
        if self.presence_penalty or self.frequency_penalty:
            raise ConfigError("presence_penalty/frequency_penalty are not supported; leave them at 0")

    def generation_config(self, base: GenerationConfig, default_max_tokens: int) -> GenerationConfig:
        fields: dict[str, Any] = {"max_new_tokens": self.max_tokens or default_max_tokens,
                                  "ignore_eos": self.ignore_eos, "apply_chat_template": False}
        if self.temperature is not None:
            fields["do_sample"] = self.temperature > 0
            fields["temperature"] = self.temperature if self.temperature > 0 else 1.0
        if self.top_p is not None:
            fields["top_p"] = self.top_p
        if self.top_k is not None:
            fields["top_k"] = self.top_k
        if self.seed is not None:
            fields["rng_seed"] = self.seed
        if self.min_tokens is not None:
            fields["min_new_tokens"] = self.min_tokens
        if self.stop:
            stops = [self.stop] if isinstance(self.stop, str) else self.stop
            if any(not s for s in stops):
                raise ConfigError("stop strings must be non-empty")
            fields["stop_strings"] = set(stops)
        return base.updated(**fields)

    def eviction(self) -> RequestEviction:
        """DEFAULT_EVICTION (the server's), None (full cache) or this request's CacheEvictionConfig."""
        e = self.kv_cache_eviction
        if e is None:
            return DEFAULT_EVICTION
        if e.policy == "full":
            return None
        if e.budget is None:
            raise ConfigError("kv_cache_eviction needs a budget (KV tokens kept per sequence per layer)")
        return CacheEvictionConfig(e.policy, budget=e.budget, options=e.options,
                                   evict_during_decode=e.evict_during_decode, prefill=e.prefill,
                                   decode_slack=e.decode_slack)


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str]
    echo: bool = False

    def unsupported(self) -> None:
        super().unsupported()
        if self.echo:
            raise ConfigError("echo is not supported; leave echo unset")


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Sampling):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(default=None, ge=1)


def completion_prompt(req: CompletionRequest, tokenizer) -> list[int]:
    prompt = req.prompt
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        if len(prompt) != 1:
            raise PromptError(f"give one prompt per request, got a list of {len(prompt)}")
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise PromptError("the prompt is empty: give some text")
        return tokenizer.prepare(prompt, apply_chat_template=False)
    if not prompt:
        raise PromptError("the prompt is empty: give some text or token ids")
    return list(prompt)


def chat_prompt(req: ChatRequest, tokenizer) -> list[int]:
    if not req.messages:
        raise PromptError("messages is empty: give at least one message")
    if not tokenizer.has_chat_template:
        raise PromptError("this model has no chat template; use /v1/completions with a plain prompt")
    history = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
    if not any(h["content"] for h in history):
        raise PromptError("every message is empty: give some text")
    templated = tokenizer.apply_chat_template(history, True)
    return tokenizer.encode(templated, add_special_tokens=False)
