"""CacheEvictionConfig: which policy, what budget, when to evict.

Budget = KV tokens kept per sequence per layer INCLUDING sinks, the recent window and KVCrush
representatives, so equal budget means equal KV memory across policies.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field, fields
from functools import cached_property
from typing import Any, Union

from .errors import ConfigError
from .policies import POLICIES, Policy, make_policy
from .policies.defaults import ACCUMULATION_WINDOW as DEFAULT_ACCUMULATION_WINDOW
from .policies.defaults import PREFILL_POOL_BACK

PREFILL_MODES = ("auto", "after", "chunked")
PREFILL_SCORES = ("window", "probe", "reread", "expected")
SCORES = ("window", "expected")
PROBE_TOKENS = 64  # a probe's length: the question, its instruction and the chat template's tail


class DefaultEviction(str, enum.Enum):
    """A request's eviction when it names none: the scheduler config's. A str enum, so the spelling
    "default" (as callers of openvino_genai-shaped APIs write it) is this same value."""

    DEFAULT = "default"


DEFAULT_EVICTION = DefaultEviction.DEFAULT


def is_default(eviction: "RequestEviction") -> bool:
    """Whether a request's eviction setting asks for the scheduler config's."""
    return isinstance(eviction, str) and eviction == DEFAULT_EVICTION


@dataclass(frozen=True)
class CacheEvictionConfig:
    """policy: a registry name (full, streaming, h2o, snapkv, pyramidkv, kvcrush, kvcrush-block) or a
    Policy instance; options: keyword options for the named policy (e.g. sink_tokens, recent_tokens,
    window, representative_fraction, anchors, threshold, base)."""

    policy: str | Policy = "kvcrush"
    budget: int = 512
    options: dict[str, Any] = field(default_factory=dict)
    evict_during_decode: bool = True
    # Decoding evicts each time a layer holds one block + decode_slack tokens (rounded up to whole blocks)
    # past its budget: a slack makes decoding evictions fewer and larger (each scores and moves a whole
    # cache) at the cost of holding up to that many more slots. 0: every block.
    decode_slack: int = 0
    score_window: int = 0  # queries scored per eviction; 0 = the policy's window (or 32 if it accumulates)
    # When the prompt is evicted. "auto" (default): after the whole prompt whenever the KV pool can hold
    # it (the question has been read, so its queries choose what stays), memory-bounded ("chunked") only
    # for a prompt the pool can never hold; decided from the request and the pool's size, never from the
    # momentary load, so an answer does not depend on how busy the engine is. "after": always after the
    # whole prompt (a prompt larger than the pool is refused). "chunked": always memory-bounded: compacted
    # each time prefill_chunk more prompt tokens are cached, so a sequence never holds more than
    # budget + prefill_chunk + one block, at the cost of deciding before the question is read.
    prefill: str = "auto"
    prefill_chunk: int = 0  # memory-bounded: prompt tokens added between two compactions; 0 = the budget
    # memory-bounded: queries that score the compactions inside the prompt (the probe's length for
    # "probe"/"reread"); 0 = PROBE_TOKENS for those, the policy's window for "window"
    prefill_window: int = 0
    # Memory-bounded: what scores the compactions inside the prompt, before the question has been read.
    # "reread" (default): the whole prompt is read twice; the first read is memory-bounded and scored by a
    # probe, and its last `prefill_window` queries, which have read the (compacted) document as the
    # question's will, score the second read: about twice the prefill time, for prompts beyond the pool only.
    # "probe": the prompt's own last `prefill_window` tokens (usually the question), run alone first at their
    # true positions (they have read nothing). "window": the newest queries so far (they have not read the
    # question). "expected" (here and in `scores`): expected attention (engine/expected_attention.py), the
    # attention the queries still to come are expected to pay, from the statistics of the queries seen so far.
    # Measured on tuning seeds in docs/long-prompts.md.
    prefill_scores: str = "reread"
    # memory-bounded: compactions inside the prompt also keep this many tokens after a well-scored one
    # (policies that pool scores over neighbours: SnapKV, PyramidKV, KVCrush over them); 0 = as after it
    prefill_pool_back: int = PREFILL_POOL_BACK
    # What scores the evictions at the prompt's end and in decoding: "window" (the policy's newest queries) or
    # "expected". prefill_scores="expected" with scores="window" = expected attention inside the prompt, the
    # question's own window at its end.
    scores: str = "window"
    expected_future: int = 512  # expected attention: upcoming positions its RoPE rotation is averaged over
    expected_value_norm: bool = False  # expected attention: weight each key by its value's norm (kvpress does)

    def __post_init__(self) -> None:
        if not isinstance(self.budget, int) or isinstance(self.budget, bool) or self.budget < 1:
            raise ConfigError(f"CacheEvictionConfig.budget must be an integer >= 1 (KV tokens kept per sequence "
                              f"per layer), got {self.budget!r}")
        if not isinstance(self.score_window, int) or self.score_window < 0:
            raise ConfigError(f"CacheEvictionConfig.score_window must be an integer >= 0, got {self.score_window!r}")
        if not isinstance(self.policy, (str, Policy)):
            raise ConfigError(f"CacheEvictionConfig.policy must be a policy name ({', '.join(POLICIES)}) or a Policy, "
                              f"got {self.policy!r}")
        if not isinstance(self.options, dict):
            raise ConfigError(f"CacheEvictionConfig.options must be a dict of policy options, got {self.options!r}")
        if not isinstance(self.prefill_chunk, int) or isinstance(self.prefill_chunk, bool) or self.prefill_chunk < 0:
            raise ConfigError(f"CacheEvictionConfig.prefill_chunk must be an integer >= 0 (0 = the budget), "
                              f"got {self.prefill_chunk!r}")
        if not isinstance(self.prefill_window, int) or isinstance(self.prefill_window, bool) or self.prefill_window < 0:
            raise ConfigError(f"CacheEvictionConfig.prefill_window must be an integer >= 0 (0 = the policy's "
                              f"window), got {self.prefill_window!r}")
        if not isinstance(self.prefill_pool_back, int) or isinstance(self.prefill_pool_back, bool) \
                or self.prefill_pool_back < 0:
            raise ConfigError(f"CacheEvictionConfig.prefill_pool_back must be an integer >= 0, "
                              f"got {self.prefill_pool_back!r}")
        if self.prefill_scores not in PREFILL_SCORES:
            raise ConfigError(f"CacheEvictionConfig.prefill_scores must be one of "
                              f"{', '.join(map(repr, PREFILL_SCORES))}, got {self.prefill_scores!r}")
        if self.scores not in SCORES:
            raise ConfigError(f"CacheEvictionConfig.scores must be one of {', '.join(map(repr, SCORES))}, "
                              f"got {self.scores!r}")
        if not isinstance(self.expected_future, int) or isinstance(self.expected_future, bool) or self.expected_future < 1:
            raise ConfigError(f"CacheEvictionConfig.expected_future must be an integer >= 1, got {self.expected_future!r}")
        if not isinstance(self.expected_value_norm, bool):
            raise ConfigError(f"CacheEvictionConfig.expected_value_norm must be True or False, "
                              f"got {self.expected_value_norm!r}")
        if self.prefill not in PREFILL_MODES:
            raise ConfigError(f"CacheEvictionConfig.prefill must be one of {', '.join(map(repr, PREFILL_MODES))}, "
                              f"got {self.prefill!r}")
        if not isinstance(self.decode_slack, int) or isinstance(self.decode_slack, bool) or self.decode_slack < 0:
            raise ConfigError(f"CacheEvictionConfig.decode_slack must be an integer >= 0 (KV tokens), "
                              f"got {self.decode_slack!r}")
        if not isinstance(self.evict_during_decode, bool):
            raise ConfigError(f"CacheEvictionConfig.evict_during_decode must be True or False, "
                              f"got {self.evict_during_decode!r}")
        if isinstance(self.policy, str) and self.policy not in POLICIES:
            raise ConfigError(f"unknown policy {self.policy!r}; choose one of: {', '.join(POLICIES)}")
        self.resolved_policy.check_budget(self.budget)  # budget >= sinks + recent, options valid

    @cached_property
    def resolved_policy(self) -> Policy:
        """The policy object: built once from the name and options (the config is frozen)."""
        if isinstance(self.policy, Policy):
            if self.options:
                raise ConfigError("CacheEvictionConfig.options apply to a policy given by name, not an instance")
            return self.policy
        return make_policy(self.policy, **self.options)

    @property
    def window(self) -> int:
        """How many of the newest queries are scored per head at each eviction."""
        if self.score_window:
            return self.score_window
        if self.resolved_policy.score_source == "none":
            return 0
        return self.resolved_policy.window or DEFAULT_ACCUMULATION_WINDOW

    @property
    def uses_expected(self) -> bool:
        """Whether some eviction is scored by expected attention (the engine then keeps query statistics)."""
        return "expected" in (self.scores, self.prefill_scores)

    @classmethod
    def from_any(cls, config: Any, block_size: int = 32) -> "CacheEvictionConfig | None":
        if config is None or isinstance(config, cls):
            return config
        if isinstance(config, dict):
            names = [f.name for f in fields(cls)]
            unknown = sorted(map(repr, set(config) - set(names)))
            if unknown:
                raise ConfigError(f"unknown cache_eviction_config field(s) {', '.join(unknown)}; valid: {', '.join(names)}")
            try:
                return cls(**config)
            except TypeError as e:
                raise ConfigError(f"bad cache_eviction_config: {e}".splitlines()[0]) from None
        if type(config).__name__ == "CacheEvictionConfig":  # openvino_genai's
            return cls.from_openvino_genai(config, block_size)
        raise ConfigError(f"cache_eviction_config must be a CacheEvictionConfig, dict or None, "
                          f"not {type(config).__name__}")

    @classmethod
    def from_openvino_genai(cls, cfg: Any, block_size: int = 32) -> "CacheEvictionConfig":
        """Translate openvino_genai.CacheEvictionConfig. Its KVCrush blocks sit ON TOP of
        max_cache_size; our budget includes them, so the budget grows by those blocks (equal memory)."""
        start, recent, max_size = cfg.get_start_size(), cfg.get_recent_size(), cfg.get_max_cache_size()
        window = int(cfg.snapkv_window_size)
        crush_blocks = int(cfg.kvcrush_config.budget) if cfg.kvcrush_config is not None else 0
        common = {"sink_tokens": start, "recent_tokens": recent}
        if crush_blocks > 0:
            anchor = str(cfg.kvcrush_config.anchor_point_mode).split(".")[-1].lower()
            return cls("kvcrush-block", max_size + crush_blocks * block_size,
                       {**common, "block_size": block_size, "budget_blocks": crush_blocks,
                        "window": min(window, recent), "anchor": anchor, "seed": int(cfg.kvcrush_config.rng_seed)})
        if window > 0:
            return cls("snapkv", max_size, {**common, "window": min(window, recent)})
        return cls("h2o", max_size, common)


# What a request may name as its eviction: the scheduler config's (DEFAULT_EVICTION), None (the full
# cache), or its own: ours or a dict of its fields (openvino_genai's CacheEvictionConfig is taken too).
RequestEviction = Union[DefaultEviction, CacheEvictionConfig, dict, None]
