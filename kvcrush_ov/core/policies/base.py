"""The policy interface and the small numpy kernels every policy shares.

A policy looks at what the engine observed about ONE sequence's cache (`AttentionStats`) and returns
which slots to keep, per (layer, KV head). Policies are pure numpy and never import the engine, so
they can be tested by hand and swapped by name.

Conventions (the engine relies on them):
- budget = KV slots kept per layer INCLUDING sinks and the recent window, so equal budget means equal
  memory across policies;
- the mask has exactly `layer_budgets(L, budget, T)[l]` True per (layer, KV head) row;
- the first `sink_tokens` and last `recent_tokens` slots are always kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Iterable

import numpy as np

from kvcrush_ov.core.errors import ConfigError

from kvcrush_ov.core.policies.defaults import RECENT_TOKENS as DEFAULT_RECENT_TOKENS  # noqa: F401 (re-exported)
from kvcrush_ov.core.policies.defaults import SINK_TOKENS as DEFAULT_SINK_TOKENS  # noqa: F401 (re-exported)

HEAD_REDUCTIONS = ("sum", "mean", "max")
POOLINGS = ("max", "avg", "none")


# --------------------------------------------------------------------------------------------------
# validation helpers: every failure is a ConfigError with one actionable line
# --------------------------------------------------------------------------------------------------
def is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def require_int(owner: str, field: str, value: object, lo: int = 0, hi: int | None = None,
                hint: str = "") -> int:
    """Return `value` as int or raise a one-line ConfigError naming the field and the allowed range."""
    ok = is_int(value) and value >= lo and (hi is None or value <= hi)
    if not ok:
        allowed = f"an int >= {lo}" if hi is None else f"an int in [{lo}, {hi}]"
        raise ConfigError(f"{owner}.{field} must be {allowed}, got {value!r}" + (f"; {hint}" if hint else ""))
    return int(value)


def require_choice(owner: str, field: str, value: object, allowed: Iterable[str]) -> str:
    """Raise a one-line ConfigError unless `value` is one of `allowed`."""
    allowed = tuple(allowed)
    if not isinstance(value, str) or value not in allowed:
        raise ConfigError(f"{owner}.{field} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
    return value


def require_odd_kernel(owner: str, value: object) -> int:
    """Pooling kernels must be odd so the window is centred on the token (1 = no pooling)."""
    if not (is_int(value) and value >= 1 and value % 2 == 1):
        raise ConfigError(f"{owner}.kernel must be an odd int >= 1 (1 = no pooling), got {value!r}")
    return int(value)


def require_fraction(owner: str, field: str, value: object, lo: float = 0.0, hi: float = 1.0,
                     open_lo: bool = False) -> float:
    """Raise a one-line ConfigError unless `value` is a real number in [lo, hi] (or (lo, hi])."""
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    ok = ok and np.isfinite(value) and (value > lo if open_lo else value >= lo) and value <= hi
    if not ok:
        interval = f"{'(' if open_lo else '['}{lo}, {hi}]"
        raise ConfigError(f"{owner}.{field} must be a number in {interval}, got {value!r}")
    return float(value)


# --------------------------------------------------------------------------------------------------
# what the engine observed
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AttentionStats:
    """What the engine observed for ONE sequence's cache, all layers.

    scores: float [L, Hq, T], the attention mass query head h gave to cache slot t (which mass:
    see `Policy.score_source`). Slot t of query head h is slot t of KV head h // (Hq // Hkv); slots
    are in time order (compaction keeps order).
    """

    scores: np.ndarray
    num_kv_heads: int

    def __post_init__(self) -> None:
        s = self.scores
        if not isinstance(s, np.ndarray) or s.ndim != 3 or not np.issubdtype(s.dtype, np.floating):
            shape = getattr(s, "shape", None)
            raise ConfigError(f"AttentionStats.scores must be a float ndarray [layers, q_heads, tokens], "
                              f"got shape {shape} dtype {getattr(s, 'dtype', type(s).__name__)}")
        if s.shape[0] < 1 or s.shape[1] < 1:
            raise ConfigError(f"AttentionStats.scores needs >= 1 layer and >= 1 head, got shape {s.shape}")
        hkv = require_int("AttentionStats", "num_kv_heads", self.num_kv_heads, lo=1, hi=s.shape[1])
        if s.shape[1] % hkv:
            raise ConfigError(f"AttentionStats.num_kv_heads={hkv} must divide the {s.shape[1]} query heads")
        if not np.isfinite(s).all():
            raise ConfigError("AttentionStats.scores contains NaN or inf; check the engine's score output")

    @property
    def num_layers(self) -> int:
        return self.scores.shape[0]

    @property
    def num_q_heads(self) -> int:
        return self.scores.shape[1]

    @property
    def num_tokens(self) -> int:
        return self.scores.shape[2]

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA group)."""
        return self.scores.shape[1] // self.num_kv_heads

    def kv_scores(self, reduce: str = "sum") -> np.ndarray:
        """[L, Hkv, T]: one score per KV head, reducing over the query heads of its group.

        A KV slot is shared by its group's query heads, so the group decides together."""
        L, hq, T = self.scores.shape
        g = self.scores.reshape(L, self.num_kv_heads, hq // self.num_kv_heads, T)
        if reduce == "sum":
            return g.sum(axis=2)
        if reduce == "mean":
            return g.mean(axis=2)
        if reduce == "max":
            return g.max(axis=2)
        raise ConfigError(f"head reduction must be one of 'sum', 'mean', 'max', got {reduce!r}")


# --------------------------------------------------------------------------------------------------
# shared kernels (vectorised over every leading axis)
# --------------------------------------------------------------------------------------------------
def _sliding_max(x: np.ndarray, k: int) -> np.ndarray:
    """out[..., i] = max(x[..., i:i+k]) in O(log k) whole-array passes (doubling), length n-k+1."""
    w = 1
    while 2 * w <= k:
        x = np.maximum(x[..., :-w], x[..., w:])
        w *= 2
    if w < k:  # two overlapping windows of width w cover width k (k - w <= w)
        x = np.maximum(x[..., : x.shape[-1] - (k - w)], x[..., k - w:])
    return x


def pool_tokens(x: np.ndarray, kernel: int, mode: str = "max", back: int = 0) -> np.ndarray:
    """1-D pooling over the last (token) axis, same length out: token t pools t-r-back .. t+r (r = kernel//2).

    SnapKV pools so that a kept token brings its neighbours' evidence: an answer spans several
    tokens, and keeping one of them alone is useless. `back` reaches further into the past, so the
    tokens FOLLOWING a well-scored one are kept too (a fact's value follows its cue: "pass key is 4 8 2 1 3").
    Edges use only the real neighbours."""
    if (kernel <= 1 and not back) or mode == "none" or x.shape[-1] == 0:
        return x
    r = kernel // 2
    lead = x.shape[:-1]
    if mode == "max":
        left, right = np.full(lead + (r + back,), -np.inf, dtype=x.dtype), np.full(lead + (r,), -np.inf, dtype=x.dtype)
        return _sliding_max(np.concatenate([left, x, right], axis=-1), 2 * r + 1 + back)
    if mode == "avg":
        T = x.shape[-1]
        c = np.concatenate([np.zeros(lead + (1,)), np.cumsum(x.astype(np.float64), axis=-1)], axis=-1)
        t = np.arange(T)
        lo, hi = np.maximum(t - r - back, 0), np.minimum(t + r, T - 1)
        return ((c[..., hi + 1] - c[..., lo]) / (hi - lo + 1)).astype(x.dtype)
    raise ConfigError(f"pooling must be one of {', '.join(map(repr, POOLINGS))}, got {mode!r}")


def topk_keep_mask(scores: np.ndarray, keep: np.ndarray | int, sink: int, recent: int) -> np.ndarray:
    """bool [L, H, T]: sinks + recent + the top-(keep_l - sink - recent) middle slots of each row.

    scores: [L, H, T]; keep: per-layer count (int or int array [L]) with sink + recent <= keep_l <= T.
    Ties are broken deterministically (argpartition on identical input gives identical output)."""
    L, H, T = scores.shape
    keep = np.broadcast_to(np.asarray(keep, dtype=np.int64), (L,))
    mask = np.zeros((L, H, T), dtype=bool)
    if T == 0:
        return mask
    full = keep >= T
    mask[full] = True
    lo, hi = sink, T - recent
    mask[~full, :, :lo] = True
    mask[~full, :, hi:] = True
    if hi <= lo:
        return mask
    mid_scores = scores[..., lo:hi]
    m = hi - lo
    for k in np.unique(keep[~full] - sink - recent):  # one pass per distinct budget (1 unless PyramidKV)
        if k <= 0:
            continue
        rows = np.flatnonzero(~full & (keep - sink - recent == k))
        every = len(rows) == L
        sub = mask[:, :, lo:hi] if every else mask[rows, :, lo:hi]  # view when all rows share k
        if k >= m:
            sub[...] = True
        else:
            idx = np.argpartition(-(mid_scores if every else mid_scores[rows]), int(k) - 1, axis=-1)
            np.put_along_axis(sub, idx[..., : int(k)], True, axis=-1)
        if not every:
            mask[rows, :, lo:hi] = sub
    return mask


# --------------------------------------------------------------------------------------------------
# the interface
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Policy:
    """Base class: decides which cache slots of one sequence survive, per (layer, KV head).

    Subclasses normally only implement `score` (kvpress-style: higher = keep); the base does the
    budget bookkeeping so that every policy keeps exactly the same number of slots.
    """

    name: ClassVar[str] = "base"
    # "none" | "window" (sum of the last `window` prompt queries' probabilities) | "accumulated"
    # (sum over all queries seen so far). Read it from the instance: KVCrush forwards its base's.
    score_source: ClassVar[str] = "none"
    # SnapKV observation window W the engine must aggregate over when score_source == "window".
    # Unannotated on purpose: subclasses that need it declare a real dataclass field.
    window = 0

    if TYPE_CHECKING:  # fields every concrete policy has (declared there, so defaults stay per class)
        sink_tokens: int
        recent_tokens: int

    # ---- to override -------------------------------------------------------------------------
    def score(self, stats: AttentionStats) -> np.ndarray:
        """float [L, Hkv, T], higher = more worth keeping."""
        raise NotImplementedError

    def layer_budgets(self, num_layers: int, budget: int, num_tokens: int) -> np.ndarray:
        """int [L]: slots each layer keeps (the row count of `keep_mask`). Uniform by default."""
        require_int(self.name, "num_layers", num_layers, lo=1)
        self.check_budget(budget)
        return np.full(num_layers, min(int(budget), int(num_tokens)), dtype=np.int64)

    def keeping_spans(self, back: int) -> "Policy":
        """This policy, where it pools scores over neighbours, also keeping the `back` tokens that follow
        a well-scored one (a whole fact after its cue); unchanged otherwise."""
        return self

    # ---- state carried from one eviction of a sequence to the next (most policies keep none) ----
    # True when update() keeps state aligned with the slots (H2O): such a policy needs every layer to
    # hold the same slots, so it cannot follow per-layer budgets (PyramidKV).
    stateful: ClassVar[bool] = False
    # True when layer_budgets differ between layers (PyramidKV): the engine must let layers hold
    # different lengths.
    per_layer_budgets: ClassVar[bool] = False

    def update(self, state: Any, scores: np.ndarray) -> tuple[Any, np.ndarray]:
        """Fold one eviction's scores [L, Hq, T] into the state; return (new state, scores to rank by).

        `state` is None at a sequence's first eviction. Stateless policies rank by the scores as given."""
        return None, scores

    def compact(self, state: Any, keep: np.ndarray) -> Any:
        """The state after compaction: keep [L, Hkv, n] are the kept slots per KV head, in time order."""
        return state

    # ---- shared ------------------------------------------------------------------------------
    @property
    def protected_tokens(self) -> int:
        """Sinks + recent window: the smallest legal budget."""
        return self.sink_tokens + self.recent_tokens

    def check_budget(self, budget: object) -> int:
        """The budget must at least hold the slots this policy promises never to evict."""
        if not is_int(budget) or budget < 0:
            raise ConfigError(f"budget must be a non-negative int (tokens kept per layer), got {budget!r}")
        if budget < self.protected_tokens:
            raise ConfigError(f"budget={budget} is below {self.name} sink_tokens+recent_tokens="
                              f"{self.protected_tokens}; raise the budget or lower sink_tokens/recent_tokens")
        return int(budget)

    def keep_mask(self, stats: AttentionStats, budget: int) -> np.ndarray:
        """bool [L, Hkv, T]: row (l, h) has exactly layer_budgets(L, budget, T)[l] True, sinks and
        recent always among them."""
        budget = self.check_budget(budget)
        L, T = stats.num_layers, stats.num_tokens
        if T <= budget:
            return np.ones((L, stats.num_kv_heads, T), dtype=bool)
        keep = self.layer_budgets(L, budget, T)
        return topk_keep_mask(self.score(stats), keep, self.sink_tokens, self.recent_tokens)

    def _check_protected(self) -> None:
        require_int(self.name, "sink_tokens", self.sink_tokens, lo=0)
        require_int(self.name, "recent_tokens", self.recent_tokens, lo=0)
