"""SnapKV (Li et al. 2024): the last prompt queries (the observation window, usually the question)
already attend to what generation will need, so score the cache by that window's attention."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import numpy as np

from kvcrush_ov.core.errors import ConfigError
from kvcrush_ov.core.policies.defaults import POOL_KERNEL, SNAPKV_WINDOW
from kvcrush_ov.core.policies.base import (DEFAULT_RECENT_TOKENS, DEFAULT_SINK_TOKENS, HEAD_REDUCTIONS,
                                      POOLINGS, AttentionStats, Policy, is_int, pool_tokens,
                                      require_choice, require_int, require_odd_kernel)


@dataclass(frozen=True)
class SnapKV(Policy):
    """Window-attention scores, pooled over neighbouring tokens, top-k per KV head in the middle.

    A short window (not kvpress's 64): on SmolLM2 needle retrieval a long window spends the budget on
    the prompt's tail and blurs the question's focus. Max-pooling as openvino-genai, but wider: SmolLM2
    splits numbers into single digits, and a wider kernel keeps a whole number around its best-scored
    digit. The window tokens are the recent tokens, so recent_tokens >= window is required. Scores are
    reduced over the query heads of each KV head first (head_reduce), then pooled (Hkv rows, not Hq)."""

    name: ClassVar[str] = "snapkv"
    score_source: ClassVar[str] = "window"
    sink_tokens: int = DEFAULT_SINK_TOKENS
    recent_tokens: int = DEFAULT_RECENT_TOKENS
    window: int | None = None  # None: SNAPKV_WINDOW, within the recent window
    pool: str = "max"
    kernel: int = POOL_KERNEL
    head_reduce: str = "mean"
    pool_back: int = 0  # the pooling window also reaches this many tokens further back (keeps what follows a cue)

    def __post_init__(self) -> None:
        self._check_protected()
        if self.window is None and is_int(self.recent_tokens):
            object.__setattr__(self, "window", max(1, min(SNAPKV_WINDOW, self.recent_tokens)))
        if not (is_int(self.window) and 1 <= self.window <= self.recent_tokens):
            raise ConfigError(f"{self.name}.window must be an int in [1, recent_tokens="
                              f"{self.recent_tokens}], got {self.window!r}; the observation window lies "
                              f"inside the recent window")
        require_choice(self.name, "pool", self.pool, POOLINGS)
        require_odd_kernel(self.name, self.kernel)
        require_choice(self.name, "head_reduce", self.head_reduce, HEAD_REDUCTIONS)
        require_int(self.name, "pool_back", self.pool_back, lo=0)

    def keeping_spans(self, back: int) -> "SnapKV":
        return replace(self, pool_back=max(self.pool_back, back))

    def score(self, stats: AttentionStats) -> np.ndarray:
        return pool_tokens(stats.kv_scores(self.head_reduce), self.kernel, self.pool, self.pool_back)
