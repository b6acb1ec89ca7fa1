"""H2O (Zhang et al. 2023): keep the heavy hitters, the slots that have drawn the most attention.

The engine scores a window of the newest queries at each eviction (scoring every query of a long
prompt per head would be O(T^2)); H2O adds those windows up across the sequence's evictions, so a slot's
score is the attention it drew from every scored window since it entered the cache."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from kvcrush_ov.core.policies.base import (DEFAULT_RECENT_TOKENS, DEFAULT_SINK_TOKENS, HEAD_REDUCTIONS,
                                      AttentionStats, Policy, require_choice)


@dataclass(frozen=True)
class H2O(Policy):
    """Top-k of accumulated attention per KV head among the middle slots, plus sinks and recent.

    head_reduce: how a KV head combines its query heads' scores ("sum" == "mean" in ranking;
    "max" keeps a slot any one query head needs)."""

    name: ClassVar[str] = "h2o"
    score_source: ClassVar[str] = "accumulated"
    stateful: ClassVar[bool] = True
    sink_tokens: int = DEFAULT_SINK_TOKENS
    recent_tokens: int = DEFAULT_RECENT_TOKENS
    head_reduce: str = "sum"

    def __post_init__(self) -> None:
        self._check_protected()
        require_choice(self.name, "head_reduce", self.head_reduce, HEAD_REDUCTIONS)

    def update(self, state: np.ndarray | None, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """state: [L, Hq, n] attention accumulated over the earlier windows for the slots held then;
        slots added since then (the tail) start from zero."""
        T = scores.shape[2]
        if state is None:
            state = np.zeros(scores.shape, np.float32)
        elif state.shape[2] < T:
            state = np.pad(state, ((0, 0), (0, 0), (0, T - state.shape[2])))
        state = state[:, :, :T] + scores
        return state, state

    def compact(self, state: np.ndarray | None, keep: np.ndarray) -> np.ndarray | None:
        """Keep the accumulated score of each kept slot, per query head of its KV head."""
        if state is None:
            return None
        L, hq, T = state.shape
        hkv, n = keep.shape[1], keep.shape[2]
        grouped = state.reshape(L, hkv, hq // hkv, T)
        return np.take_along_axis(grouped, keep[:, :, None, :], axis=3).reshape(L, hq, n)

    def score(self, stats: AttentionStats) -> np.ndarray:
        return stats.kv_scores(self.head_reduce)
