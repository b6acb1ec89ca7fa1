"""KVCrush (Jha et al. 2025, arXiv 2503.00022), read faithfully at token level.

An importance policy (the base: SnapKV, H2O, ...) keeps the pivotal tokens but throws away whole
regions of the context. KVCrush spends a slice of the budget on *representatives* of what the base
evicts: tokens are described by which heads attend to them (one bit per head), grouped by Hamming
distance to an anchor, and one token per group is kept as a stand-in for the group. All of it is
O(T * H) with no pairwise distances.

Steps for one layer (vectorised over layers):
1. base keeps `budget - R` slots (incl. sinks and recent); its other slots are the candidates;
2. signature of a candidate = Hq bits, bit h = score_h(t) > theta_h, theta_h taken over the
   candidates (mean | median | top fraction);
3. key = Hamming distance to an anchor (or several anchors, combined by sum or lexicographically);
4. candidates sorted by (key, time) are split into R contiguous buckets of near-equal size;
5. per bucket the member closest to the bucket's centre (per-bit mean) is kept; ties -> earliest.
   "Closest" is L1 to the centre = mean Hamming distance to the bucket's members (a medoid).

Why one keep-set per layer by default: a signature describes a token by *all* heads' views of it,
so the token is either kept for every head or for none; the base's scores are averaged over the KV
heads so the base agrees. `shared_across_kv_heads=False` runs it per KV head with the group's
query heads as bits (only Hq/Hkv bits: 3 on SmolLM2, usually too coarse).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import ClassVar

import numpy as np

from kvcrush_ov.errors import ConfigError
from kvcrush_ov.policies.base import (AttentionStats, Policy, require_choice,
                                      require_fraction, require_int, topk_keep_mask)
from kvcrush_ov.policies.snapkv import SnapKV

THRESHOLDS = ("mean", "median", "top")
ANCHORS = ("random", "zeros", "ones", "mean", "alternate")
ANCHOR_COMBINES = ("sum", "lex")
# a base that never evicts leaves nothing to represent; nesting block-level KVCrush makes no sense
_BAD_BASES = ("full", "kvcrush", "kvcrush-block")


@dataclass(frozen=True)
class KVCrushConfig:
    """The tunable parts of KVCrush (defaults may move after measurement).

    representative_fraction: share of the budget spent on representatives (paper: 0.25).
    threshold: how theta_h is set over the candidates. "median" by default: every bit then splits
        the candidates in half, so bits carry the most information; "mean" on heavy-tailed attention
        makes nearly all bits 0 and signatures collapse. "top" = exactly floor(top_fraction * n)
        ones per head (genai's top-half indicator generalised per head).
    anchors: one or more of random | zeros | ones | mean (per-bit majority, tie -> 0) | alternate.
        Note: with the median threshold no bit has a strict majority of ones, so "mean" equals
        "zeros" (distance = how many heads find the token important); with "mean" on heavy-tailed
        scores it usually does too. Several anchors give each candidate a distance vector; anchor_combine "sum" adds them (a
        finer 1-D key), "lex" sorts by the first anchor then the next (tuple order).
    seed: the random anchor is drawn from default_rng(seed) on each call, so calls are reproducible.
    """

    representative_fraction: float = 0.25
    threshold: str = "median"
    top_fraction: float = 0.5
    anchors: tuple[str, ...] = ("mean",)
    anchor_combine: str = "sum"
    seed: int = 0
    shared_across_kv_heads: bool = True

    def __post_init__(self) -> None:
        owner = "kvcrush"
        require_fraction(owner, "representative_fraction", self.representative_fraction)
        require_choice(owner, "threshold", self.threshold, THRESHOLDS)
        require_fraction(owner, "top_fraction", self.top_fraction, open_lo=True)
        anchors = self.anchors
        if isinstance(anchors, str):  # "mean" or "mean,alternate" (CLI friendly)
            anchors = tuple(a.strip() for a in anchors.split(","))
        if not isinstance(anchors, (tuple, list)) or not anchors:
            raise ConfigError(f"kvcrush.anchors must be a non-empty tuple of {', '.join(ANCHORS)}, "
                              f"got {anchors!r}")
        for a in anchors:
            require_choice(owner, "anchors", a, ANCHORS)
        object.__setattr__(self, "anchors", tuple(anchors))
        require_choice(owner, "anchor_combine", self.anchor_combine, ANCHOR_COMBINES)
        require_int(owner, "seed", self.seed, lo=0)
        if not isinstance(self.shared_across_kv_heads, (bool, np.bool_)):
            raise ConfigError(f"kvcrush.shared_across_kv_heads must be True or False, "
                              f"got {self.shared_across_kv_heads!r}")


# --------------------------------------------------------------------------------------------------
# the algorithm's pieces. Rows r are layers (or (layer, KV head) pairs), H heads give H bits.
# Signatures are packed into uint64 words [R, W, N] (bit h -> word h // 64, bit h % 64) so that
# Hamming distance is XOR + popcount and reordering candidates moves W words, not H bools.
# --------------------------------------------------------------------------------------------------
def gather_last(x: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """x[r, h, idx[r, j]] -> [R, H, M] (flat indexing: faster than take_along_axis)."""
    R, H, N = x.shape
    off = (np.arange(R * H, dtype=np.int64) * N).reshape(R, H, 1)
    return x.reshape(-1)[off + idx[:, None, :]]


def token_signatures(values: np.ndarray, threshold: str = "median",
                     top_fraction: float = 0.5) -> np.ndarray:
    """bool [R, H, n] from per-head candidate scores [R, H, n]: bit h of token j = head h rates it
    above its own threshold theta_h over the n candidates (per head, since heads differ in scale).

    "median" compares with the lower middle value using ">", which equals `> np.median` exactly (no
    value lies strictly between the two middle ones) for one partition instead of two.
    "top" sets exactly floor(top_fraction * n) bits per head."""
    n = values.shape[-1]
    if n == 0:
        return np.zeros(values.shape, dtype=bool)
    if threshold == "mean":
        return values > values.mean(axis=-1, keepdims=True)
    if threshold == "median":
        k = (n - 1) // 2
        return values > np.partition(values, k, axis=-1)[..., k: k + 1]
    if threshold == "top":
        k = int(np.floor(top_fraction * n + 1e-9))
        bits = np.zeros(values.shape, dtype=bool)
        if k >= n:
            bits[...] = True
        elif k > 0:
            idx = np.argpartition(-values, k - 1, axis=-1)[..., :k]
            np.put_along_axis(bits, idx, True, axis=-1)
        return bits
    raise ConfigError(f"kvcrush.threshold must be one of {', '.join(THRESHOLDS)}, got {threshold!r}")


def pack_signatures(bits: np.ndarray) -> np.ndarray:
    """uint64 [R, W, N] from bool [R, H, N], W = ceil(H / 64); one pass per head, not per token."""
    R, H, N = bits.shape
    codes = np.zeros((R, -(-H // 64), N), dtype=np.uint64)
    for h in range(H):
        codes[:, h // 64, :] |= bits[:, h, :].astype(np.uint64) << np.uint64(h % 64)
    return codes


def make_anchor(kind: str, bits: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
    """bool [R, H]: the reference point every signature of the row (bits [R, H, n]) is compared with."""
    R, H, n = bits.shape
    if kind == "zeros":
        return np.zeros((R, H), dtype=bool)
    if kind == "ones":
        return np.ones((R, H), dtype=bool)
    if kind == "alternate":  # 0101...
        return np.broadcast_to(np.arange(H) % 2 == 1, (R, H)).copy()
    if kind == "mean":  # per-bit majority over the candidates; exactly half -> 0
        return 2 * bits.sum(axis=-1) > n
    if kind == "random":
        rng = rng if rng is not None else np.random.default_rng(0)
        return rng.integers(0, 2, size=(R, H)).astype(bool)
    raise ConfigError(f"kvcrush.anchors entries must be one of {', '.join(ANCHORS)}, got {kind!r}")


def anchor_keys(bits: np.ndarray, codes: np.ndarray, anchors: tuple[str, ...], combine: str = "sum",
                rng: np.random.Generator | None = None) -> np.ndarray:
    """int64 [R, n]: the 1-D grouping key. One anchor: the Hamming distance to it; several: the sum
    of the distances ("sum") or the distance tuple in lexicographic order ("lex")."""
    H = bits.shape[1]
    keys = np.zeros((bits.shape[0], bits.shape[2]), dtype=np.int64)
    for kind in anchors:
        d = hamming(codes, pack_signatures(make_anchor(kind, bits, rng)[:, :, None])[..., 0])
        keys = keys + d if combine == "sum" else keys * (H + 1) + d
    return keys


_POPCOUNT8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def popcount(x: np.ndarray) -> np.ndarray:
    """Set bits per uint64 element (np.bitwise_count on numpy >= 2, a byte table before)."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x)
    return _POPCOUNT8[np.ascontiguousarray(x).view(np.uint8)].reshape(x.shape + (8,)).sum(-1)


def hamming(codes: np.ndarray, anchor_codes: np.ndarray) -> np.ndarray:
    """int [R, N]: on how many heads each signature disagrees with the row's anchor (XOR+popcount)."""
    return popcount(codes ^ anchor_codes[:, :, None]).sum(axis=1, dtype=np.int64)


def bucket_bounds(n: int, num_buckets: int) -> np.ndarray:
    """int [B]: starts of B contiguous buckets over n sorted items, as np.array_split cuts them
    (the first n % B buckets hold one item more)."""
    b = np.arange(num_buckets, dtype=np.int64)
    return b * (n // num_buckets) + np.minimum(b, n % num_buckets)


def bucket_representatives(codes: np.ndarray, keys: np.ndarray, num_bits: int,
                           num_buckets: int) -> np.ndarray:
    """int [R, B]: candidate positions (indices into n) of one representative per bucket.

    codes: uint64 [R, W, n] packed signatures of the candidates in time order; keys: int [R, n].
    Candidates sorted by (key, position) are cut into `num_buckets` near-equal buckets; each bucket
    keeps the member with the least L1 distance to the bucket's per-bit mean (= least mean Hamming
    distance to the bucket's members, a medoid), ties -> earliest position. 1 <= B <= n."""
    R, W, n = codes.shape
    small = keys.size == 0 or (keys.min() >= 0 and keys.max() < 2**15)
    order = np.argsort(keys.astype(np.int16) if small else keys, axis=1, kind="stable")  # radix sort
    srt = gather_last(codes, order).view(np.int64)  # signed view: (x >> h) & 1 is still bit h
    starts = bucket_bounds(n, num_buckets)
    sizes = np.diff(np.append(starts, n))
    # size * L1(x, centre) = sum_h |x_h*size - ones_h| = sum_h ones_h + sum_h x_h*(size - 2*ones_h);
    # the first sum is the same for the whole bucket, so only the second decides the argmin
    dist = np.zeros((R, n), dtype=np.int64)
    for h in range(num_bits):  # per head: [R, n] arrays, no per-token work
        x = (srt[:, h // 64, :] >> (h % 64)) & 1
        ones = np.add.reduceat(x, starts, axis=1)  # [R, B] bucket members with bit h set
        x *= np.repeat(sizes - 2 * ones, sizes, axis=1)
        dist += x
    composite = (dist + n * num_bits) * n + order  # shifted >= 0; ties -> earliest position
    return np.minimum.reduceat(composite, starts, axis=1) % n


def select_representatives(keep_rows: np.ndarray, head_scores: np.ndarray, num_reps: int,
                           config: KVCrushConfig) -> np.ndarray:
    """bool [R, T]: `keep_rows` plus `num_reps` representatives among each row's unkept slots.

    keep_rows: bool [R, T] (the base's choice); head_scores: [R, H, T] per-head scores (H bits)."""
    out = keep_rows.copy()
    R, T = out.shape
    H = head_scores.shape[1]
    if num_reps <= 0:
        return out
    rng = np.random.default_rng(config.seed)
    n_cand = T - out.sum(axis=1)
    for n in np.unique(n_cand):  # one pass unless layers keep different counts (PyramidKV base)
        rows = np.flatnonzero(n_cand == n)
        if n == 0:
            continue
        if n <= num_reps:
            out[rows] = True
            continue
        cand_t = (np.flatnonzero(~keep_rows[rows]) % T).reshape(len(rows), n)  # time order
        src = head_scores if len(rows) == R else head_scores[rows]
        bits = token_signatures(gather_last(src, cand_t), config.threshold, config.top_fraction)
        codes = pack_signatures(bits)
        keys = anchor_keys(bits, codes, config.anchors, config.anchor_combine, rng)
        reps = bucket_representatives(codes, keys, H, num_reps)
        out[rows[:, None], np.take_along_axis(cand_t, reps, axis=1)] = True
    return out


# --------------------------------------------------------------------------------------------------
# the policy
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KVCrush(Policy):
    """Base policy keeps budget - R slots; R = floor(representative_fraction * budget) (capped so the
    base still holds its sinks + recent) go to KVCrush representatives of the base's evictions.

    sink_tokens, recent_tokens, window and score_source are the base's. A base that needs no
    scores (streaming) still gets "accumulated" scores, since signatures need them."""

    name: ClassVar[str] = "kvcrush"
    base: Policy = field(default_factory=SnapKV)
    config: KVCrushConfig = field(default_factory=KVCrushConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.base, Policy) or getattr(self.base, "name", "") in _BAD_BASES:
            got = getattr(self.base, "name", type(self.base).__name__)
            raise ConfigError(f"kvcrush.base must be a policy that evicts (streaming, h2o, snapkv, "
                              f"pyramidkv), got {got!r}")
        if not isinstance(self.config, KVCrushConfig):
            raise ConfigError(f"kvcrush.config must be a KVCrushConfig, got {type(self.config).__name__}")

    # the base decides the protected regions and which scores the engine must collect
    @property
    def sink_tokens(self) -> int:  # type: ignore[override]
        return self.base.sink_tokens

    @property
    def recent_tokens(self) -> int:  # type: ignore[override]
        return self.base.recent_tokens

    @property
    def window(self) -> int:  # type: ignore[override]
        return self.base.window

    @property
    def score_source(self) -> str:  # type: ignore[override]
        return "accumulated" if self.base.score_source == "none" else self.base.score_source

    # H2O as a base: its accumulated scores are the base's state
    @property
    def stateful(self) -> bool:  # type: ignore[override]
        return self.base.stateful

    @property
    def per_layer_budgets(self) -> bool:  # type: ignore[override]
        return self.base.per_layer_budgets

    def update(self, state, scores: np.ndarray):
        return self.base.update(state, scores)

    def compact(self, state, keep: np.ndarray):
        return self.base.compact(state, keep)

    def num_representatives(self, budget: int) -> int:
        """R: the representatives' share of `budget`, leaving the base at least sinks + recent."""
        budget = self.check_budget(budget)
        r = int(np.floor(self.config.representative_fraction * budget + 1e-9))
        return min(r, budget - self.protected_tokens)

    def layer_budgets(self, num_layers: int, budget: int, num_tokens: int) -> np.ndarray:
        require_int(self.name, "num_layers", num_layers, lo=1)
        budget = self.check_budget(budget)
        if num_tokens <= budget:
            return np.full(num_layers, int(num_tokens), dtype=np.int64)
        r = self.num_representatives(budget)
        base = self.base.layer_budgets(num_layers, budget - r, num_tokens)
        return np.minimum(base + r, num_tokens)

    def score(self, stats: AttentionStats) -> np.ndarray:
        return self.base.score(stats)

    def keep_mask(self, stats: AttentionStats, budget: int) -> np.ndarray:
        budget = self.check_budget(budget)
        L, hkv, T = stats.num_layers, stats.num_kv_heads, stats.num_tokens
        if T <= budget:
            return np.ones((L, hkv, T), dtype=bool)
        r = self.num_representatives(budget)
        base_keep = self.base.layer_budgets(L, budget - r, T)
        s = self.base.score(stats)
        if self.config.shared_across_kv_heads:
            s = s.mean(axis=1, keepdims=True)  # [L, 1, T]: one keep-set per layer
            head_scores = stats.scores  # Hq bits per token
        else:
            head_scores = stats.scores.reshape(L * hkv, stats.group_size, T)
        base_mask = topk_keep_mask(s, base_keep, self.sink_tokens, self.recent_tokens)
        keep = select_representatives(base_mask.reshape(-1, T), head_scores, r, self.config)
        keep = keep.reshape(L, -1, T)
        return np.repeat(keep, hkv, axis=1) if keep.shape[1] == 1 and hkv > 1 else keep

    @staticmethod
    def config_fields() -> tuple[str, ...]:
        """Names of the KVCrushConfig options (make_policy routes these to the config)."""
        return tuple(f.name for f in fields(KVCrushConfig))
