"""KVCrush (Jha et al. 2025, arXiv 2503.00022), read at token level on top of a per-KV-head base.

An importance policy (the base: SnapKV, H2O, ...) keeps the pivotal tokens but throws away whole
regions of the context. KVCrush spends a slice of the budget on *representatives* of what the base
evicts: tokens are described by which heads attend to them (one bit per head), grouped by Hamming
distance to an anchor, and one token per group is kept as a stand-in for the group. All of it is
O(T * H) with no pairwise distances.

Our reading of the paper on a GQA model (each KV head's cache is compacted on its own, so every KV
head must keep the same number of slots):
1. split: of the selectable budget S = budget - sinks - recent, R = floor(representative_fraction * S)
   slots go to representatives and the base runs, exactly as it would alone, at budget - R. So the base
   is never starved at small budgets, and representative_fraction=0 IS the base, bit for bit;
2. candidates = the tokens the base evicted from EVERY KV head of the layer (a token some head still
   holds is not lost). Each representative is added to every KV head, so all heads keep the same count;
3. signature of a candidate = one bit per query head of the layer (all Hq heads, the paper's one bit
   per head), bit h = score_h(t) > theta_h, theta_h over the candidates (mean | median | top fraction);
4. key = Hamming distance to an anchor (or several anchors, combined by sum or lexicographically);
5. candidates sorted by (key, time) are split into R contiguous buckets of near-equal size;
6. per bucket the member closest to the bucket's centre (per-bit mean) is kept; ties -> earliest.
   "Closest" is L1 to the centre = mean Hamming distance to the bucket's members (a medoid).
If fewer than R tokens were evicted by every head (large budgets), all of them are kept and each head
fills its remaining slots with its own next-best base scores.

Options beyond the paper (measured in docs/eval/kvcrush-options.md): `span` keeps each representative
with its neighbours (a short span, R // span buckets), `dynamic_split` gives layers whose window
attention is diffuse more representatives and concentrated layers fewer (same total).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import ClassVar

import numpy as np

from kvcrush_ov.core.errors import ConfigError
from kvcrush_ov.core.policies.base import (AttentionStats, Policy, is_int, require_choice,
                                      require_fraction, require_int, topk_keep_mask)
from kvcrush_ov.core.policies.snapkv import SnapKV

THRESHOLDS = ("mean", "median", "top")
ANCHORS = ("random", "zeros", "ones", "mean", "alternate")
ANCHOR_COMBINES = ("sum", "lex")
PICKS = ("medoid", "best")
# The one rule for KVCrush's base: any policy but these (a base that never evicts leaves nothing to
# represent; nesting KVCrush makes no sense). policies.KVCRUSH_BASES names the registry's others.
NOT_KVCRUSH_BASES = ("full", "kvcrush", "kvcrush-block")


@dataclass(frozen=True)
class KVCrushConfig:
    """The tunable parts of KVCrush (defaults may move after measurement).

    representative_fraction: share of the SELECTABLE budget (budget - sinks - recent) spent on
        representatives. Paper: 0.25; 0.1 by default here, with pick="best": on the tuning seeds
        (docs/eval/kvcrush-options.md) that was the only setting whose paired CI vs SnapKV stayed
        within ~2 points on both suites; 0.25 with medoids lost 2.2 points on real text.
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
    span: tokens kept per representative, centred on it (odd; 1 = the paper's single token). A
        representative then brings its neighbours, as SnapKV's pooling does for pivotal tokens.
    pick: which member stands for a bucket: "medoid" (the paper: nearest the bucket's centre) or
        "best" (the member the base scores highest, mean over KV heads: diverse AND important).
    dynamic_split: per-layer R from how diffuse the layer's attention is (1 - the mass share the
        base's selection holds), scaled so the mean over layers stays R (the paper's open question).
    """

    representative_fraction: float = 0.1
    threshold: str = "median"
    top_fraction: float = 0.5
    anchors: tuple[str, ...] = ("mean",)
    anchor_combine: str = "sum"
    seed: int = 0
    span: int = 1
    dynamic_split: bool = False
    pick: str = "best"

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
        if not (is_int(self.span) and self.span >= 1 and self.span % 2 == 1):
            raise ConfigError(f"kvcrush.span must be an odd int >= 1 (1 = single-token representatives), "
                              f"got {self.span!r}")
        require_choice(owner, "pick", self.pick, PICKS)
        if not isinstance(self.dynamic_split, (bool, np.bool_)):
            raise ConfigError(f"kvcrush.dynamic_split must be true or false, got {self.dynamic_split!r}")


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
                           num_buckets: int, importance: np.ndarray | None = None) -> np.ndarray:
    """int [R, B]: candidate positions (indices into n) of one representative per bucket.

    codes: uint64 [R, W, n] packed signatures of the candidates in time order; keys: int [R, n].
    Candidates sorted by (key, position) are cut into `num_buckets` near-equal buckets; each bucket
    keeps the member with the least L1 distance to the bucket's per-bit mean (= least mean Hamming
    distance to the bucket's members, a medoid), ties -> earliest position. 1 <= B <= n.
    importance: float [R, n] (time order): keep each bucket's most important member instead."""
    R, W, n = codes.shape
    small = keys.size == 0 or (keys.min() >= 0 and keys.max() < 2**15)
    order = np.argsort(keys.astype(np.int16) if small else keys, axis=1, kind="stable")  # radix sort
    starts = bucket_bounds(n, num_buckets)
    if importance is not None:  # rank 0 = most important; ties -> earliest position
        rank = np.empty((R, n), dtype=np.int64)
        np.put_along_axis(rank, np.argsort(-importance, axis=1, kind="stable"), np.arange(n)[None, :], axis=1)
        composite = np.take_along_axis(rank, order, axis=1) * n + order
        return np.minimum.reduceat(composite, starts, axis=1) % n
    srt = gather_last(codes, order).view(np.int64)  # signed view: (x >> h) & 1 is still bit h
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


def select_representatives(keep_rows: np.ndarray, head_scores: np.ndarray, num_reps: np.ndarray | int,
                           config: KVCrushConfig, importance: np.ndarray | None = None) -> np.ndarray:
    """bool [R, T]: `keep_rows` plus up to `num_reps[r]` representatives among each row's unkept slots.

    keep_rows: bool [R, T] (what the base holds); head_scores: [R, H, T] per-head scores (H bits);
    num_reps: int or int [R]. With span > 1, num_reps // span buckets (single tokens if num_reps < span) each keep their representative
    and its unkept neighbours within span // 2 (so a row may get fewer than num_reps: the caller fills)."""
    out = keep_rows.copy()
    R, T = out.shape
    H = head_scores.shape[1]
    reps_per_row = np.broadcast_to(np.asarray(num_reps, dtype=np.int64), (R,))
    rng = np.random.default_rng(config.seed)
    n_cand = T - out.sum(axis=1)
    for n, k in sorted(set(zip(n_cand.tolist(), reps_per_row.tolist()))):  # usually one pass
        rows = np.flatnonzero((n_cand == n) & (reps_per_row == k))
        if n == 0 or k <= 0:
            continue
        if n <= k:
            out[rows] = True
            continue
        span = config.span if k >= config.span else 1  # fewer slots than one span: single tokens
        buckets, half = k // span, span // 2
        cand_t = (np.flatnonzero(~keep_rows[rows]) % T).reshape(len(rows), n)  # time order
        src = head_scores if len(rows) == R else head_scores[rows]
        bits = token_signatures(gather_last(src, cand_t), config.threshold, config.top_fraction)
        codes = pack_signatures(bits)
        keys = anchor_keys(bits, codes, config.anchors, config.anchor_combine, rng)
        imp = None if importance is None else np.take_along_axis(importance[rows], cand_t, axis=1)
        picks = np.take_along_axis(cand_t, bucket_representatives(codes, keys, H, buckets, imp), axis=1)
        if half:
            picks = np.clip(picks[:, :, None] + np.arange(-half, half + 1), 0, T - 1).reshape(len(rows), -1)
        sub = out[rows]
        sub[np.arange(len(rows))[:, None], picks] = True
        out[rows] = sub | keep_rows[rows]  # neighbours the base kept stay kept (no-op), others join
    return out


def fill_to_count(keep: np.ndarray, scores: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """bool [L, H, T]: `keep` plus each row's best-scored unkept slots until row (l, h) holds counts[l]."""
    need = counts[:, None] - keep.sum(axis=-1)  # [L, H]
    for k in np.unique(need[need > 0]):
        l_idx, h_idx = np.nonzero(need == k)
        free = np.where(keep[l_idx, h_idx], -np.inf, scores[l_idx, h_idx].astype(np.float64))
        idx = np.argpartition(-free, int(k) - 1, axis=-1)[:, : int(k)]
        sub = keep[l_idx, h_idx]
        np.put_along_axis(sub, idx, True, axis=-1)
        keep[l_idx, h_idx] = sub
    return keep


def diffuseness(scores: np.ndarray, base_mask: np.ndarray, sink: int, recent: int) -> np.ndarray:
    """float [L]: share of the middle's attention mass (mean over KV heads) that the base's selection
    misses. Near 0: the layer's attention is concentrated on what the base keeps; near 1: diffuse."""
    T = scores.shape[-1]
    mid = scores[..., sink: T - recent].astype(np.float64)
    total = mid.sum(axis=-1)
    held = (mid * base_mask[..., sink: T - recent]).sum(axis=-1)
    return (1.0 - held / np.maximum(total, 1e-30)).mean(axis=1)


def split_by_layer(weights: np.ndarray, total: int, cap: np.ndarray) -> np.ndarray:
    """int [L]: non-negative counts proportional to `weights`, each <= cap[l], summing to
    min(total, cap.sum()); what a capped layer cannot take is spread over the others by weight
    (water-filling), then rounded by largest remainder (ties -> lower layer)."""
    L = len(weights)
    cap = np.asarray(cap, dtype=np.int64)
    total = min(int(total), int(cap.sum()))
    w = np.maximum(np.asarray(weights, dtype=np.float64), 0.0)
    want = np.zeros(L)
    for _ in range(L + 1):
        free = want < cap
        surplus = total - want.sum()
        if surplus <= 1e-9 or not free.any():
            break
        share = w * free
        share = share / share.sum() if share.sum() > 0 else free / free.sum()
        want = np.minimum(want + surplus * share, cap)
    out = np.minimum(np.floor(want + 1e-9).astype(np.int64), cap)
    rem = total - int(out.sum())
    if rem > 0:
        prio = np.where(out < cap, want - out, -np.inf)
        out[np.argsort(-prio, kind="stable")[:rem]] += 1
    return out


# --------------------------------------------------------------------------------------------------
# the policy
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KVCrush(Policy):
    """The base runs per KV head at budget - R exactly as alone; R = floor(representative_fraction *
    (budget - sinks - recent)) representatives of the tokens it evicted from every KV head join every
    head (see the module docstring for the reading).

    sink_tokens, recent_tokens, window and score_source are the base's; so are its state hooks
    (update/compact), forwarded. A base that needs no scores (streaming) still gets "accumulated"
    scores, since signatures need them."""

    name: ClassVar[str] = "kvcrush"
    base: Policy = field(default_factory=SnapKV)
    config: KVCrushConfig = field(default_factory=KVCrushConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.base, Policy) or getattr(self.base, "name", "") in NOT_KVCRUSH_BASES:
            got = getattr(self.base, "name", type(self.base).__name__)
            raise ConfigError(f"kvcrush.base must be a policy that evicts (not {', '.join(NOT_KVCRUSH_BASES)}), "
                              f"got {got!r}")
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

    # policy-owned state (the engine's update/compact hooks): the base's, untouched (H2O's accumulator)
    @property
    def stateful(self) -> bool:  # type: ignore[override]
        return self.base.stateful

    @property
    def per_layer_budgets(self) -> bool:  # type: ignore[override]
        return self.base.per_layer_budgets

    def keeping_spans(self, back: int) -> "KVCrush":
        return replace(self, base=self.base.keeping_spans(back))

    def update(self, state, scores: np.ndarray):
        return self.base.update(state, scores)

    def compact(self, state, keep: np.ndarray):
        return self.base.compact(state, keep)

    def num_representatives(self, budget: int) -> int:
        """R: the representatives' share of the selectable budget (budget - sinks - recent)."""
        budget = self.check_budget(budget)
        selectable = budget - self.protected_tokens
        return min(int(np.floor(self.config.representative_fraction * selectable + 1e-9)), selectable)

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
        base_mask = self.base.keep_mask(stats, budget - r)  # per KV head, exactly as alone
        if r == 0:
            return base_mask
        counts = np.minimum(self.base.layer_budgets(L, budget - r, T) + r, T)
        reps = np.full(L, r, dtype=np.int64)
        if self.config.dynamic_split and L > 1:
            base_scores = self.base.score(stats)
            base_counts = counts - r
            cap = base_counts - self.protected_tokens + r  # the base keeps at least sinks + recent
            reps = split_by_layer(diffuseness(base_scores, base_mask, self.sink_tokens, self.recent_tokens),
                                  L * r, cap)
            base_mask = topk_keep_mask(base_scores, counts - reps, self.sink_tokens, self.recent_tokens)
        lost = ~base_mask.any(axis=1)  # [L, T] evicted from every KV head: the candidates
        importance = self.base.score(stats).mean(axis=1) if self.config.pick == "best" else None
        chosen = select_representatives(~lost, stats.scores, reps, self.config, importance) & lost
        keep = base_mask | chosen[:, None, :]
        if (keep.sum(axis=-1) < counts[:, None]).any():  # few candidates, or spans overlapping the base
            keep = fill_to_count(keep, self.base.score(stats), counts)
        return keep

    @staticmethod
    def config_fields() -> tuple[str, ...]:
        """Names of the KVCrushConfig options (make_policy routes these to the config)."""
        return tuple(f.name for f in fields(KVCrushConfig))
