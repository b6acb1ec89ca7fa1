"""StreamingLLM (Xiao et al. 2023): attention sinks + the most recent tokens, no scores needed.

The cheapest baseline: it shows how much of a task is solved by locality alone."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from kvcrush_ov.core.policies.base import (DEFAULT_RECENT_TOKENS, DEFAULT_SINK_TOKENS, AttentionStats,
                                      Policy)


@dataclass(frozen=True)
class StreamingLLM(Policy):
    """Keep the first `sink_tokens` and the last `budget - sink_tokens` slots.

    `recent_tokens` is the guaranteed minimum recent window; whatever budget is left above
    sinks + recent also goes to recency (score = position), so memory equals the other policies'."""

    name: ClassVar[str] = "streaming"
    score_source: ClassVar[str] = "none"
    sink_tokens: int = DEFAULT_SINK_TOKENS
    recent_tokens: int = DEFAULT_RECENT_TOKENS

    def __post_init__(self) -> None:
        self._check_protected()

    def score(self, stats: AttentionStats) -> np.ndarray:
        """Later = more important; used when StreamingLLM is KVCrush's base."""
        t = np.arange(stats.num_tokens, dtype=np.float32)
        return np.broadcast_to(t, (stats.num_layers, stats.num_kv_heads, stats.num_tokens))

    def keep_mask(self, stats: AttentionStats, budget: int) -> np.ndarray:
        budget = self.check_budget(budget)
        L, H, T = stats.num_layers, stats.num_kv_heads, stats.num_tokens
        keep = np.ones((L, H, T), dtype=bool)
        if T > budget:  # no scores needed: a slice, not a top-k
            keep[..., self.sink_tokens: T - (budget - self.sink_tokens)] = False
        return keep
