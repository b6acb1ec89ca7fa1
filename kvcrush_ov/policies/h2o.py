"""H2O (Zhang et al. 2023): keep the heavy hitters, the slots with the most attention accumulated
over every query seen so far."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from kvcrush_ov.policies.base import (DEFAULT_RECENT_TOKENS, DEFAULT_SINK_TOKENS, HEAD_REDUCTIONS,
                                      AttentionStats, Policy, require_choice)


@dataclass(frozen=True)
class H2O(Policy):
    """Top-k of accumulated attention per KV head among the middle slots, plus sinks and recent.

    head_reduce: how a KV head combines its query heads' scores ("sum" == "mean" in ranking;
    "max" keeps a slot any one query head needs)."""

    name: ClassVar[str] = "h2o"
    score_source: ClassVar[str] = "accumulated"
    sink_tokens: int = DEFAULT_SINK_TOKENS
    recent_tokens: int = DEFAULT_RECENT_TOKENS
    head_reduce: str = "sum"

    def __post_init__(self) -> None:
        self._check_protected()
        require_choice(self.name, "head_reduce", self.head_reduce, HEAD_REDUCTIONS)

    def score(self, stats: AttentionStats) -> np.ndarray:
        return stats.kv_scores(self.head_reduce)
