"""User-facing configuration, mirroring openvino_genai's GenerationConfig and SchedulerConfig.

Both accept the openvino_genai object of the same name, so switching backends is a change of import.
Every field is validated up front: a bad value raises ConfigError naming the field and what is allowed.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError
from .eviction_config import CacheEvictionConfig

# The KV cache precisions (OpenVINO's KV_CACHE_PRECISION values this engine reads and writes): floats,
# and integers stored as rows of [f32 scale, f32 zero-point, values].
FLOAT_KV_PRECISIONS = ("f32", "f16", "bf16")
QUANTIZED_KV_PRECISIONS = ("u8", "u4")
KV_PRECISIONS = FLOAT_KV_PRECISIONS + QUANTIZED_KV_PRECISIONS

_UNSET = 2**64 - 1  # openvino_genai's SIZE_MAX: "not set"
_COLLECTIONS = (set, frozenset, list, tuple)


def _show(values: Any) -> str:
    return str(sorted(map(repr, values))) if isinstance(values, _COLLECTIONS) else repr(values)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass
class GenerationConfig:
    """How to generate one request: length, stopping and sampling (greedy by default)."""

    max_new_tokens: int = 256
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0 = disabled
    top_p: float = 1.0
    rng_seed: int = 0
    eos_token_id: int = -1  # -1 = take it from the model's generation_config.json
    stop_token_ids: set[int] = field(default_factory=set)
    stop_strings: set[str] = field(default_factory=set)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    apply_chat_template: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        _check(isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1,
               f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        _check(isinstance(self.min_new_tokens, int) and 0 <= self.min_new_tokens <= self.max_new_tokens,
               f"min_new_tokens must be in [0, max_new_tokens={self.max_new_tokens}], got {self.min_new_tokens!r}")
        _check(isinstance(self.temperature, (int, float)) and self.temperature > 0,
               f"temperature must be > 0, got {self.temperature!r} (use do_sample=False for greedy)")
        _check(isinstance(self.top_k, int) and self.top_k >= 0,
               f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        _check(isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1,
               f"top_p must be in (0, 1], got {self.top_p!r}")
        _check(isinstance(self.rng_seed, int) and self.rng_seed >= 0,
               f"rng_seed must be an integer >= 0, got {self.rng_seed!r}")
        _check(isinstance(self.stop_strings, _COLLECTIONS) and all(isinstance(s, str) and s for s in self.stop_strings),
               f"stop_strings must be a set of non-empty strings, got {_show(self.stop_strings)}")
        _check(isinstance(self.stop_token_ids, _COLLECTIONS)
               and all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
               f"stop_token_ids must be a set of non-negative integers, got {_show(self.stop_token_ids)}")
        _check(isinstance(self.eos_token_id, int),
               f"eos_token_id must be an integer (-1: the model's), got {self.eos_token_id!r}")
        for name in ("do_sample", "include_stop_str_in_output", "ignore_eos", "apply_chat_template"):
            _check(isinstance(getattr(self, name), bool), f"{name} must be True or False, got {getattr(self, name)!r}")

    def updated(self, **kwargs: Any) -> "GenerationConfig":
        """A copy with some fields replaced (the `**kwargs` of generate())."""
        unknown = sorted(set(kwargs) - {f.name for f in dataclasses.fields(self)})
        _check(not unknown, f"unknown generation parameter(s) {unknown}; "
               f"valid: {', '.join(f.name for f in dataclasses.fields(self))}")
        fields = {**dataclasses.asdict(self), **kwargs}
        if isinstance(fields["stop_strings"], str):  # one stop string, not a set of its characters
            fields["stop_strings"] = {fields["stop_strings"]}
        for name in ("stop_token_ids", "stop_strings"):
            if isinstance(fields[name], _COLLECTIONS):
                try:
                    fields[name] = set(fields[name])
                except TypeError:  # unhashable items: validate() names the field
                    pass
        return GenerationConfig(**fields)

    @classmethod
    def from_any(cls, config: Any) -> "GenerationConfig":
        """Accept ours, an openvino_genai.GenerationConfig, a dict, or None (defaults)."""
        if config is None:
            return cls()
        if isinstance(config, cls):
            return config
        if isinstance(config, dict):
            return cls().updated(**{str(k): v for k, v in config.items()})
        if type(config).__name__ == "GenerationConfig":  # openvino_genai's
            if getattr(config, "num_beams", 1) > 1 or getattr(config, "num_return_sequences", 1) > 1:
                raise ConfigError("beam search / num_return_sequences > 1 are not supported; "
                                  "use greedy or multinomial sampling")
            return cls(
                max_new_tokens=256 if config.max_new_tokens == _UNSET else int(config.max_new_tokens),
                min_new_tokens=int(config.min_new_tokens),
                do_sample=bool(config.do_sample),
                temperature=float(config.temperature),
                top_k=0 if config.top_k == _UNSET else int(config.top_k),
                top_p=float(config.top_p),
                rng_seed=int(config.rng_seed),
                eos_token_id=int(config.eos_token_id),
                stop_token_ids=set(config.stop_token_ids),
                stop_strings=set(config.stop_strings),
                include_stop_str_in_output=bool(config.include_stop_str_in_output),
                ignore_eos=bool(config.ignore_eos),
                apply_chat_template=bool(config.apply_chat_template),
            )
        raise ConfigError(f"generation_config must be a GenerationConfig, dict or None, not {type(config).__name__}")


@dataclass
class SchedulerConfig:
    """How the engine shares one KV block pool among requests (openvino_genai semantics).

    cache_size is in GB for all layers together; num_kv_blocks, when > 0, wins over it.
    """

    cache_size: float = 1.0
    num_kv_blocks: int = 0
    max_num_batched_tokens: int = 256
    max_num_seqs: int = 256
    # ours (a dict of its fields becomes one here), openvino_genai's (an engine translates it with its
    # device's block size), or None = full cache
    cache_eviction_config: CacheEvictionConfig | Any = None
    kv_cache_precision: str | None = None  # one of KV_PRECISIONS, or None (device default)

    def __post_init__(self) -> None:
        if isinstance(self.cache_eviction_config, dict):
            self.cache_eviction_config = CacheEvictionConfig.from_any(self.cache_eviction_config)
        self.validate()

    def validate(self) -> None:
        _check(isinstance(self.cache_size, (int, float)) and 0 <= self.cache_size < math.inf,
               f"cache_size must be a finite number >= 0 (GB), got {self.cache_size!r}")
        _check(isinstance(self.num_kv_blocks, int) and self.num_kv_blocks >= 0,
               f"num_kv_blocks must be an integer >= 0 (0 = derive from cache_size), got {self.num_kv_blocks!r}")
        _check(self.cache_size > 0 or self.num_kv_blocks > 0,
               "set cache_size (GB) > 0 or num_kv_blocks > 0: the KV pool cannot be empty")
        _check(isinstance(self.max_num_batched_tokens, int) and self.max_num_batched_tokens >= 1,
               f"max_num_batched_tokens must be an integer >= 1, got {self.max_num_batched_tokens!r}")
        _check(isinstance(self.max_num_seqs, int) and self.max_num_seqs >= 1,
               f"max_num_seqs must be an integer >= 1, got {self.max_num_seqs!r}")
        _check(self.kv_cache_precision is None or self.kv_cache_precision in KV_PRECISIONS,
               f"kv_cache_precision must be one of {', '.join(KV_PRECISIONS)} or None, got {self.kv_cache_precision!r}")

    @classmethod
    def from_any(cls, config: Any) -> "SchedulerConfig":
        """Accept ours, an openvino_genai.SchedulerConfig, a dict, or None (defaults)."""
        if config is None:
            return cls()
        if isinstance(config, cls):
            return config
        if isinstance(config, dict):
            names = [f.name for f in dataclasses.fields(cls)]
            unknown = sorted(map(repr, set(config) - set(names)))
            _check(not unknown, f"unknown scheduler config field(s) {', '.join(unknown)}; valid: {', '.join(names)}")
            return cls(**config)
        if type(config).__name__ == "SchedulerConfig":  # openvino_genai's
            eviction = config.cache_eviction_config if config.use_cache_eviction else None
            return cls(
                cache_size=float(config.cache_size) if config.cache_size else (0.0 if config.num_kv_blocks else 1.0),
                num_kv_blocks=int(config.num_kv_blocks),
                max_num_batched_tokens=int(config.max_num_batched_tokens),
                max_num_seqs=int(config.max_num_seqs),
                cache_eviction_config=eviction,
            )
        raise ConfigError(f"scheduler_config must be a SchedulerConfig, dict or None, not {type(config).__name__}")
