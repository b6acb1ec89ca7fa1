"""Teacher forcing through the engine's request hooks: a forked request follows the full-cache
continuation (a token source) while its logits are compared with the full cache's (logits observers).

The reference (full-cache) request records one log-softmax row per generated position; each forced fork
turns its own row at the same position into running NLL and KL sums at once, so forks store nothing.
A row observed with g tokens generated predicts output token g; position 0 (the prefill's) is shared by
the parent and every fork, so measuring starts at position 1.
"""
from __future__ import annotations

import numpy as np

from .metrics import kl_divergence


def log_softmax(row: np.ndarray) -> np.ndarray:
    """float64 log-probabilities of one logits row."""
    z = row.astype(np.float64)
    z -= z.max()
    return z - np.log(np.exp(z).sum())


class FullCacheReference:
    """Attach `observe` to the full-cache request; fork forced runs with `forced_run()`."""

    def __init__(self) -> None:
        self.rows: dict[int, np.ndarray] = {}  # position -> log-softmax row of the full cache
        self._seq = None                       # the full-cache request, once it produced logits

    @property
    def tokens(self) -> list[int]:
        """The full cache's continuation so far (the engine samples the reference before its forced forks)."""
        return [] if self._seq is None else self._seq.output_ids

    def observe(self, seq, row: np.ndarray) -> None:
        self._seq = seq
        if seq.num_generated >= 1:
            self.rows[seq.num_generated] = log_softmax(row)

    def nll(self, tokens: list[int]) -> float | None:
        """Mean NLL of the full cache's own continuation (positions 1..)."""
        lp = [self.rows[g][t] for g, t in enumerate(tokens) if g >= 1 and g in self.rows]
        return float(-np.mean(lp)) if lp else None

    def forced_run(self) -> "ForcedRun":
        return ForcedRun(self)


class ForcedRun:
    """One forced fork: its token source replays the reference's tokens; its observer sums NLL and KL."""

    def __init__(self, reference: FullCacheReference) -> None:
        self.reference = reference
        self.nll_sum = 0.0
        self.kl_sum = 0.0
        self.count = 0

    def next_token(self, seq) -> int | None:
        """The reference's token at this position, or None once its continuation is used up."""
        g, tokens = seq.num_generated, self.reference.tokens
        return tokens[g] if g < len(tokens) else None

    def observe(self, seq, row: np.ndarray) -> None:
        g, tokens = seq.num_generated, self.reference.tokens
        ref = self.reference.rows.get(g)
        if ref is None or g >= len(tokens):
            return  # beyond the reference's continuation
        lp = log_softmax(row)
        self.nll_sum -= float(lp[tokens[g]])
        self.kl_sum += float(kl_divergence(ref, lp))
        self.count += 1

    @property
    def nll(self) -> float | None:
        return self.nll_sum / self.count if self.count else None

    @property
    def kl(self) -> float | None:
        return self.kl_sum / self.count if self.count else None
