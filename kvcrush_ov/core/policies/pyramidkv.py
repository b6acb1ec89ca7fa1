"""PyramidKV (Cai et al. 2024): attention funnels from broad in low layers to a few tokens in high
layers, so give low layers more cache and high layers less, at the same total memory."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from kvcrush_ov.core.policies.base import require_fraction, require_int
from kvcrush_ov.core.policies.snapkv import SnapKV


@dataclass(frozen=True)
class PyramidKV(SnapKV):
    """SnapKV scoring with a linearly decreasing per-layer budget.

    Above the protected sinks+recent, layer 0 gets 2*(budget-P) - (budget-P)/beta slots and the last
    layer (budget-P)/beta (PyramidKV's beta=20), linear in between, so the mean is exactly `budget`.
    Layers that would exceed the T available slots are capped and their surplus spread evenly over
    the others; rounding is largest-remainder so the integers sum to L*budget exactly.
    Note: the engine needs per-layer cache lengths (past_lens.N) to realise the memory saving."""

    name: ClassVar[str] = "pyramidkv"
    per_layer_budgets: ClassVar[bool] = True
    beta: float = 20.0

    def __post_init__(self) -> None:
        super().__post_init__()
        require_fraction(self.name, "beta", self.beta, lo=1.0, hi=1e9)

    def layer_budgets(self, num_layers: int, budget: int, num_tokens: int) -> np.ndarray:
        L = require_int(self.name, "num_layers", num_layers, lo=1)
        B = self.check_budget(budget)
        T = require_int(self.name, "num_tokens", num_tokens, lo=0)
        if T <= B:
            return np.full(L, T, dtype=np.int64)
        P = self.protected_tokens
        extra = float(B - P)
        top = extra / self.beta
        bottom = 2.0 * extra - top
        frac = np.arange(L, dtype=np.float64) / max(L - 1, 1)
        b = P + bottom - (bottom - top) * frac if L > 1 else np.array([float(B)])
        target = L * B
        b = np.minimum(b, T)
        for _ in range(L):  # water-filling: at most one more layer saturates per pass
            deficit = target - b.sum()
            free = b < T
            if deficit <= 1e-9 * target or not free.any():
                break
            b = np.minimum(b + free * (deficit / free.sum()), T)
        out = np.floor(b + 1e-9).astype(np.int64)
        out = np.clip(out, P, T)
        rem = target - int(out.sum())
        if rem > 0:  # largest remainder first; ties -> lower layer (the pyramid favours low layers)
            prio = np.where(out < T, b - out, -np.inf)
            out[np.argsort(-prio, kind="stable")[:rem]] += 1
        elif rem < 0:  # float noise only; take back from the largest
            out[np.argsort(-out, kind="stable")[: -rem]] -= 1
        return out
