"""KVCrush as openvino-genai reads it: whole blocks, head-summed scores, one bit per token.

Kept as a faithful reproduction of the other public reading so both can be measured side by side
(docs/eval/*-vs-native-kvcrush). Differences from the paper: the bits are not per head (a token's bit
is "in the top half of this layer's scores"), a signature is a BLOCK's block_size token bits, and representatives
are picked at a uniform stride through the distance-sorted evicted blocks instead of per bucket.

Unlike genai, the budget here is the total kept (its KVCrush blocks included), so it compares with
the other policies at equal memory, and the count is exact: whole blocks first, then any slots the
block grid cannot fill (partial last block, budget not a multiple of block_size) go to the best
remaining single tokens.

Pinned behaviours (genai's C++ tests): indicators have exactly n/2 ones; MEAN anchor bit = 1 iff more
than half of the blocks have 1 there; budget 2 of eligible blocks {0,1,2,3} keeps {0,2}; a budget >=
the eligible count keeps all of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from kvcrush_ov.core.errors import ConfigError
from kvcrush_ov.core.policies.defaults import SNAPKV_WINDOW
from kvcrush_ov.core.policies.kvcrush import ANCHORS, make_anchor
from kvcrush_ov.core.policies.base import (DEFAULT_RECENT_TOKENS, DEFAULT_SINK_TOKENS, AttentionStats,
                                      Policy, is_int, pool_tokens, require_choice, require_fraction,
                                      require_int, require_odd_kernel)

BLOCK_ANCHORS = ANCHORS


def block_indicators(scores: np.ndarray) -> np.ndarray:
    """bool [..., n]: exactly n // 2 ones, on the top half of the scores (ties: argpartition's order)."""
    n = scores.shape[-1]
    k = n // 2
    bits = np.zeros(scores.shape, dtype=bool)
    if k > 0:
        idx = np.argpartition(-scores, k - 1, axis=-1)[..., :k]
        np.put_along_axis(bits, idx, True, axis=-1)
    return bits


def block_anchor(kind: str, signatures: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
    """bool [L, block_size] from block signatures [L, num_blocks, block_size]: KVCrush's anchor rules
    (make_anchor) with blocks as the candidates; "mean" = 1 iff strictly more than half have a 1."""
    if kind not in BLOCK_ANCHORS:
        raise ConfigError(f"kvcrush-block.anchor must be one of {', '.join(BLOCK_ANCHORS)}, got {kind!r}")
    return make_anchor(kind, signatures.transpose(0, 2, 1), rng)


def block_hamming(signatures: np.ndarray, anchor: np.ndarray) -> np.ndarray:
    """int [L, num_blocks]: Hamming distance of each block's signature to the anchor."""
    return np.count_nonzero(signatures != anchor[:, None, :], axis=-1)


def select_blocks_at_stride(distances: np.ndarray, eligible: np.ndarray, budget_blocks: int) -> np.ndarray:
    """bool [L, nb]: eligible blocks sorted by (distance, index), then every (E // keep)-th one kept,
    keep = min(budget_blocks, E) (genai's uniform stride)."""
    L, nb = distances.shape
    out = np.zeros((L, nb), dtype=bool)
    counts = eligible.sum(axis=1)
    key = np.where(eligible, distances.astype(np.int64), np.iinfo(np.int64).max)
    order = np.argsort(key, axis=1, kind="stable")
    for e in np.unique(counts):  # one pass unless rows have different eligible counts
        keep = int(min(budget_blocks, e))
        if keep <= 0:
            continue
        rows = np.flatnonzero(counts == e)
        picks = order[rows][:, np.arange(keep) * (int(e) // keep)]
        out[rows[:, None], picks] = True
    return out


@dataclass(frozen=True)
class KVCrushBlock(Policy):
    """Block-level SnapKV-like base + genai-style KVCrush blocks, one keep-set per layer.

    Token score = query-head SUM of the scores (what PagedAttention's score output gives), max-pooled
    over `kernel` tokens; block score = sum over its tokens. Blocks tile the middle (between sinks and
    recent) from the first non-sink slot. Of the selectable budget M = budget - sinks - recent,
    K = budget_blocks (or floor(representative_fraction * M / block_size): the split rule of
    token-level KVCrush and of our translation to openvino-genai) blocks go to KVCrush and
    floor((M - K*block_size) / block_size) blocks to the base's top block scores. window: SnapKV's
    default, as the native rows'; window = 0 -> accumulated scores (H2O-like)."""

    name: ClassVar[str] = "kvcrush-block"
    sink_tokens: int = DEFAULT_SINK_TOKENS
    recent_tokens: int = DEFAULT_RECENT_TOKENS
    block_size: int = 32
    window: int | None = None  # None: SnapKV's default, within the recent window
    kernel: int = 7
    representative_fraction: float = 0.25
    budget_blocks: int | None = None
    anchor: str = "mean"
    seed: int = 0

    def __post_init__(self) -> None:
        self._check_protected()
        require_int(self.name, "block_size", self.block_size, lo=1)
        if self.window is None and is_int(self.recent_tokens):
            object.__setattr__(self, "window", min(SNAPKV_WINDOW, self.recent_tokens))
        if not (is_int(self.window) and 0 <= self.window <= self.recent_tokens):
            raise ConfigError(f"{self.name}.window must be an int in [0, recent_tokens={self.recent_tokens}] "
                              f"(0 = accumulated scores), got {self.window!r}")
        require_odd_kernel(self.name, self.kernel)
        require_fraction(self.name, "representative_fraction", self.representative_fraction)
        if self.budget_blocks is not None:
            require_int(self.name, "budget_blocks", self.budget_blocks, lo=0,
                        hint="or None to use representative_fraction")
        require_choice(self.name, "anchor", self.anchor, BLOCK_ANCHORS)
        require_int(self.name, "seed", self.seed, lo=0)

    @property
    def score_source(self) -> str:  # type: ignore[override]
        return "window" if self.window > 0 else "accumulated"

    def score(self, stats: AttentionStats) -> np.ndarray:
        s = pool_tokens(stats.scores.sum(axis=1), self.kernel, "max")  # [L, T]
        return np.broadcast_to(s[:, None, :], (stats.num_layers, stats.num_kv_heads, stats.num_tokens))

    def kvcrush_blocks(self, budget: int) -> int:
        """K: blocks given to KVCrush, capped to what fits in the middle budget."""
        budget = self.check_budget(budget)
        k = self.budget_blocks
        if k is None:
            k = int(np.floor(self.representative_fraction * (budget - self.protected_tokens) / self.block_size
                             + 1e-9))
        return min(int(k), (budget - self.protected_tokens) // self.block_size)

    def keep_mask(self, stats: AttentionStats, budget: int) -> np.ndarray:
        budget = self.check_budget(budget)
        L, hkv, T = stats.num_layers, stats.num_kv_heads, stats.num_tokens
        if T <= budget:
            return np.ones((L, hkv, T), dtype=bool)
        bs, lo, hi = self.block_size, self.sink_tokens, T - self.recent_tokens
        m, M = hi - lo, budget - self.protected_tokens  # m > M since T > budget
        nb = -(-m // bs)
        K = self.kvcrush_blocks(budget)
        nb_base = (M - K * bs) // bs
        mid = self.score(stats)[:, 0, lo:hi]  # [L, m]
        blk_scores = np.add.reduceat(mid, np.arange(0, m, bs), axis=1)  # [L, nb]
        kept = np.zeros((L, nb), dtype=bool)
        if nb_base > 0:
            idx = np.argpartition(-blk_scores, nb_base - 1, axis=1)[:, :nb_base]
            np.put_along_axis(kept, idx, True, axis=1)
        if K > 0:
            bits = np.zeros((L, nb * bs), dtype=bool)
            bits[:, :m] = block_indicators(mid)  # over the whole evictable area, as genai
            sig = bits.reshape(L, nb, bs)
            anchor = block_anchor(self.anchor, sig, np.random.default_rng(self.seed))
            kept |= select_blocks_at_stride(block_hamming(sig, anchor), ~kept, K)
        tok = np.repeat(kept, bs, axis=1)[:, :m]
        rem = M - tok.sum(axis=1)  # > 0 only off the block grid: fill with the best single tokens
        for r in np.unique(rem[rem > 0]):
            rows = np.flatnonzero(rem == r)
            free = np.where(tok[rows], -np.inf, mid[rows])
            idx = np.argpartition(-free, int(r) - 1, axis=1)[:, : int(r)]
            sub = tok[rows]
            np.put_along_axis(sub, idx, True, axis=1)
            tok[rows] = sub
        mask = np.ones((L, T), dtype=bool)
        mask[:, lo:hi] = tok
        return np.repeat(mask[:, None, :], hkv, axis=1)
