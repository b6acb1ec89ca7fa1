"""No eviction: the accuracy ceiling every other policy is measured against."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from kvcrush_ov.core.errors import ConfigError
from kvcrush_ov.core.policies.base import AttentionStats, Policy, require_int


@dataclass(frozen=True)
class FullCache(Policy):
    """Keeps every slot; the engine never needs to evict (budget is ignored)."""

    name: ClassVar[str] = "full"
    score_source: ClassVar[str] = "none"
    sink_tokens: ClassVar[int] = 0
    recent_tokens: ClassVar[int] = 0

    def check_budget(self, budget: object) -> int:
        if not isinstance(budget, (int, np.integer)) or isinstance(budget, bool) or budget < 0:
            raise ConfigError(f"budget must be a non-negative int (tokens kept per layer), got {budget!r}")
        return int(budget)

    def score(self, stats: AttentionStats) -> np.ndarray:
        return np.zeros((stats.num_layers, stats.num_kv_heads, stats.num_tokens), dtype=np.float32)

    def layer_budgets(self, num_layers: int, budget: int, num_tokens: int) -> np.ndarray:
        require_int(self.name, "num_layers", num_layers, lo=1)
        return np.full(num_layers, int(num_tokens), dtype=np.int64)

    def keep_mask(self, stats: AttentionStats, budget: int) -> np.ndarray:
        self.check_budget(budget)
        return np.ones((stats.num_layers, stats.num_kv_heads, stats.num_tokens), dtype=bool)
