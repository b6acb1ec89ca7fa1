"""Expected Attention (Devoto, Jeblick, Jégou 2025, arXiv 2510.00636): scores that need no question.

Memory-bounded prefill compacts a prompt before its question has been read, so the newest queries
(SnapKV's window) judge the document by what the document itself looks at. Expected Attention judges
by the queries still to come instead: it fits a Gaussian N(mu, Sigma) per layer and query head to the
queries seen so far, taken BEFORE RoPE (so position-free), moves it to the next `future` positions with
the average RoPE rotation R (mu' = R mu, Sigma' = R Sigma R^T) and scores key k, per head, by the
expected softmax numerator in closed form (the Gaussian moment generating function):

    E[exp(s q.k)] = exp(s mu'.k + s^2/2 k^T Sigma' k),   q ~ N(mu', Sigma'),  s = the softmax scale,

normalised over the cached keys of that head: the share of attention a future query is expected to pay.
kvpress's press also multiplies by ||v|| (a key matters by what it adds to the output); it is optional
here (`value_norm`) and measured, not assumed.

The queries the engine exposes are post-RoPE: `Rope.unrotate` takes RoPE out again (HF's rotate_half
convention: dim i pairs with dim i + R/2; checked against HF's pre-RoPE queries in the tests). Running
sums (not a window) hold the statistics, so any number of chunks and decode steps fold in exactly.

The interface is arrays in, per-query-head scores [L, Hq, S] out (what `window_scores` returns and the
policies rank): `expected_scores` takes the future-query moments and the keys, so another backend (a
compiled OpenVINO scorer) can produce the same thing from the same inputs. `reference_scores` is the slow
loop version of the whole pipeline, for tests.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar, Sequence as Seq

import numpy as np

DEFAULT_FUTURE = 512     # upcoming positions the rotation is averaged over (kvpress's n_future_positions)
DEFAULT_SKIP_FIRST = 4   # first positions left out of the statistics: attention-sink queries are outliers


@dataclass(frozen=True)
class ExpectedOptions:
    """future: upcoming positions the RoPE rotation is averaged over; covariance: use Sigma (else the
    mean query alone, a plain dot product); value_norm: weight by ||v||; skip_first: leading positions
    whose queries are left out of the statistics."""

    future: int = DEFAULT_FUTURE
    covariance: bool = True
    value_norm: bool = False
    skip_first: int = DEFAULT_SKIP_FIRST


# --------------------------------------------------------------------------------------------------
# RoPE, as the model applies it
# --------------------------------------------------------------------------------------------------
def _inv_freq(params: dict, rotary: int) -> np.ndarray:
    """Angular frequency of each rotated pair [rotary/2] for one HF rope parameter set."""
    theta = float(params.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    inv = 1.0 / theta ** (np.arange(0, rotary, 2, dtype=np.float64) / rotary)
    if kind == "default":
        return inv
    if kind == "linear":
        return inv / float(params["factor"])
    if kind == "llama3":  # Llama 3.1's piecewise rescaling of low frequencies
        factor, lo, hi = float(params["factor"]), float(params["low_freq_factor"]), float(params["high_freq_factor"])
        old = float(params["original_max_position_embeddings"])
        wavelen = 2 * np.pi / inv
        smooth = (old / wavelen - lo) / (hi - lo)
        mid = (1 - smooth) * inv / factor + smooth * inv
        return np.where(wavelen > old / lo, inv / factor, np.where(wavelen < old / hi, inv, mid))
    raise ValueError(f"RoPE type {kind!r} is not modelled by expected attention (default, linear, llama3 are)")


@dataclass(frozen=True)
class Rope:
    """inv_freq [L, R/2]: each layer's angular frequency per rotated pair (Gemma 3's local and global
    layers differ); head_size hd >= R (partial rotary leaves dims R.. unrotated)."""

    inv_freq: np.ndarray
    head_size: int

    @classmethod
    def from_config(cls, config: dict, num_layers: int, head_size: int,
                    sliding_windows: Seq[int] = ()) -> "Rope":
        """From config.json: transformers v5 `rope_parameters` (per layer type for Gemma 3) or v4
        `rope_theta` / `rope_scaling`. Raises ValueError for a RoPE this module does not model."""
        rotary = int(head_size * float(config.get("partial_rotary_factor", 1.0))) // 2 * 2
        params = config.get("rope_parameters")
        if params is None:
            params = {"rope_theta": config.get("rope_theta", 10000.0), **(config.get("rope_scaling") or {})}
        if "full_attention" in params or "sliding_attention" in params:  # per layer type (Gemma 3, v5)
            types = config.get("layer_types") or ["sliding_attention" if w else "full_attention"
                                                  for w in (sliding_windows or [0] * num_layers)]
            rows = [_inv_freq(params[t], rotary) for t in types[:num_layers]]
        else:
            local = config.get("rope_local_base_freq")  # Gemma 3, transformers v4
            windows = list(sliding_windows) or [0] * num_layers
            rows = [_inv_freq({**params, "rope_theta": local, "rope_type": "default"} if (w and local) else params,
                              rotary) for w in windows]
        return cls(np.stack(rows), int(head_size))

    @property
    def rotary(self) -> int:
        return 2 * self.inv_freq.shape[-1]

    def unrotate(self, queries: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Post-RoPE queries [L, T, Hq, hd] at positions [T] -> pre-RoPE (f32). A pair (a, b) rotated by
        angle w is (a cos w - b sin w, b cos w + a sin w); rotating back by -w restores it."""
        h = self.rotary // 2
        ang = positions.astype(np.float64)[None, :, None] * self.inv_freq[:, None, :]   # [L, T, h]
        cos, sin = np.cos(ang).astype(np.float32)[:, :, None], np.sin(ang).astype(np.float32)[:, :, None]
        x1, x2 = queries[..., :h], queries[..., h:2 * h]
        out = queries.astype(np.float32, copy=True)
        out[..., :h] = x1 * cos + x2 * sin
        out[..., h:2 * h] = x2 * cos - x1 * sin
        return out

    def mean_rotation(self, start: int, n: int, layers: np.ndarray | None = None) -> np.ndarray:
        """[L, hd, hd]: the RoPE rotation averaged over positions start..start+n-1 (per pair: the mean
        cos and sin; high frequencies average out, so they stop contributing to the expected logit)."""
        inv = self.inv_freq if layers is None else self.inv_freq[layers]
        ang = (start + np.arange(max(n, 1), dtype=np.float64))[None, :, None] * inv[:, None, :]  # [L, n, h]
        c, s = np.cos(ang).mean(axis=1), np.sin(ang).mean(axis=1)                            # [L, h]
        L, h, hd = inv.shape[0], inv.shape[1], self.head_size
        R = np.zeros((L, hd, hd))
        i = np.arange(h)
        R[:, i, i] = c
        R[:, i + h, i + h] = c
        R[:, i, i + h] = -s
        R[:, i + h, i] = s
        j = np.arange(2 * h, hd)  # unrotated dims (partial rotary)
        R[:, j, j] = 1.0
        return R


# --------------------------------------------------------------------------------------------------
# running query statistics (immutable: forks share them safely)
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class QueryStats:
    """Sums over the pre-RoPE queries seen so far: count, total [L, Hq, hd], outer [L, Hq, hd, hd]
    (float64, so the covariance E[qq^T] - mu mu^T does not cancel to noise), plus the newest rows not
    folded in yet: decode steps come one query at a time, and folding each into fresh float64 sums
    would cost more than the step's own attention."""

    count: int
    total: np.ndarray
    outer: np.ndarray
    pending: tuple[np.ndarray, ...] = ()   # pre-RoPE rows [L, t, Hq, hd], oldest first
    FOLD_ROWS: ClassVar[int] = 64          # fold once this many rows are pending

    @classmethod
    def empty(cls, num_layers: int, num_q_heads: int, head_size: int) -> "QueryStats":
        return cls(0, np.zeros((num_layers, num_q_heads, head_size)),
                   np.zeros((num_layers, num_q_heads, head_size, head_size)))

    @property
    def num_queries(self) -> int:
        return self.count + sum(p.shape[1] for p in self.pending)

    def add(self, queries: np.ndarray) -> "QueryStats":
        """Fold in pre-RoPE queries [L, T, Hq, hd]; returns new statistics (the old stay valid)."""
        if queries.shape[1] == 0:
            return self
        pending = self.pending + (queries,)
        if sum(p.shape[1] for p in pending) < self.FOLD_ROWS:
            return replace(self, pending=pending)
        return self._folded(pending)

    def _folded(self, pending: tuple[np.ndarray, ...]) -> "QueryStats":
        if not pending:
            return self
        q = np.concatenate(pending, axis=1) if len(pending) > 1 else pending[0]
        q = np.ascontiguousarray(q.transpose(0, 2, 1, 3), dtype=np.float32)          # [L, Hq, T, hd]
        return QueryStats(self.count + q.shape[2], self.total + q.sum(axis=2, dtype=np.float64),
                          self.outer + np.matmul(q.transpose(0, 1, 3, 2), q))

    def moments(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean [L, Hq, hd] and population covariance (divide by n) [L, Hq, hd, hd], pending rows included."""
        s = self._folded(self.pending)
        n = max(s.count, 1)
        mu = s.total / n
        return mu, s.outer / n - mu[..., :, None] * mu[..., None, :]

    @property
    def mean(self) -> np.ndarray:
        return self.moments()[0]

    @property
    def covariance(self) -> np.ndarray:
        return self.moments()[1]


def future_moments(stats: QueryStats, rope: Rope, position: int, future: int = DEFAULT_FUTURE,
                   layers: np.ndarray | None = None, covariance: bool = True
                   ) -> tuple[np.ndarray, np.ndarray | None]:
    """Mean [L, Hq, hd] and covariance [L, Hq, hd, hd] (or None) of the post-RoPE queries expected at
    positions position..position+future-1, for the given layers (all by default)."""
    sel = slice(None) if layers is None else layers
    R = rope.mean_rotation(position, future, layers)[:, None]                       # [L, 1, hd, hd]
    mu, sigma = stats.moments()
    mean = np.matmul(R, mu[sel][..., None])[..., 0]
    if not covariance:
        return mean.astype(np.float32), None
    cov = np.matmul(np.matmul(R, sigma[sel]), np.swapaxes(R, -1, -2))
    return mean.astype(np.float32), cov.astype(np.float32)


# --------------------------------------------------------------------------------------------------
# the scorer: arrays in, [L, Hq, S] out
# --------------------------------------------------------------------------------------------------
def expected_scores(mean: np.ndarray, cov: np.ndarray | None, keys: np.ndarray,
                    scale: float | np.ndarray, value_norms: np.ndarray | None = None) -> np.ndarray:
    """Expected attention share [L, Hq, S] of each cached key, per query head.

    mean [L, Hq, hd], cov [L, Hq, hd, hd] or None: the future queries (post-RoPE, see future_moments);
    keys [L, Hkv, S, hd] post-RoPE as cached; scale: softmax scale, a number or one per layer;
    value_norms [L, Hkv, S] or None: ||v|| to weight by. Query head h reads KV head h // (Hq // Hkv)."""
    L, hkv, S, hd = keys.shape
    hq = mean.shape[1]
    g = hq // hkv
    s = np.broadcast_to(np.asarray(scale, dtype=np.float32), (L,)).reshape(L, 1, 1, 1)
    mu = mean.astype(np.float32).reshape(L, hkv, g, hd)
    logits = np.matmul(mu, np.swapaxes(keys, -1, -2)) * s                            # [L, Hkv, g, S]
    if cov is not None:
        sig = cov.astype(np.float32).reshape(L, hkv, g, hd, hd)
        for layer in range(L):  # k^T Sigma k per head: one [g, S, hd] temporary per layer
            k = keys[layer][:, None]                                                  # [Hkv, 1, S, hd]
            logits[layer] += 0.5 * s[layer] ** 2 * (np.matmul(k, sig[layer]) * k).sum(axis=-1)
    logits -= logits.max(axis=-1, keepdims=True)
    np.exp(logits, out=logits)
    logits /= logits.sum(axis=-1, keepdims=True)
    if value_norms is not None:
        logits *= value_norms.astype(np.float32)[:, :, None, :]
    return logits.reshape(L, hq, S)


def reference_scores(queries: np.ndarray, positions: np.ndarray, keys: np.ndarray, scale: Seq[float],
                     inv_freq: np.ndarray, position: int, future: int, *, skip_first: int = 0,
                     covariance: bool = True, values: np.ndarray | None = None) -> np.ndarray:
    """Slow, loop-by-loop reference of the whole pipeline (tests only), from the paper's formula.

    queries [L, T, Hq, hd] post-RoPE at positions [T]; keys [L, Hkv, S, hd]; inv_freq [L, hd/2];
    values [L, Hkv, S, hd] or None. Returns [L, Hq, S]."""
    L, T, hq, hd = queries.shape
    hkv, S = keys.shape[1], keys.shape[2]
    h = hd // 2
    out = np.zeros((L, hq, S))

    def rotation(layer: int, p: float) -> np.ndarray:
        R = np.zeros((hd, hd))
        for i in range(h):
            w = p * inv_freq[layer, i]
            R[i, i], R[i, i + h], R[i + h, i], R[i + h, i + h] = np.cos(w), -np.sin(w), np.sin(w), np.cos(w)
        return R

    for layer in range(L):
        Rbar = sum(rotation(layer, p) for p in range(position, position + future)) / future
        for head in range(hq):
            pre = [rotation(layer, positions[t]).T @ queries[layer, t, head].astype(np.float64)
                   for t in range(T) if positions[t] >= skip_first]
            mu = sum(pre) / len(pre)
            sigma = sum(np.outer(q - mu, q - mu) for q in pre) / len(pre)
            mu_f, sigma_f = Rbar @ mu, Rbar @ sigma @ Rbar.T
            kv = head // (hq // hkv)
            z = np.zeros(S)
            for j in range(S):
                k = keys[layer, kv, j].astype(np.float64)
                z[j] = scale[layer] * mu_f @ k + (0.5 * scale[layer] ** 2 * k @ sigma_f @ k if covariance else 0.0)
            p = np.exp(z - z.max())
            p /= p.sum()
            if values is not None:
                p = p * np.array([np.linalg.norm(values[layer, kv, j].astype(np.float64)) for j in range(S)])
            out[layer, head] = p
    return out


def score(stats: QueryStats, rope: Rope, keys: np.ndarray, scale: float | np.ndarray, position: int,
          options: ExpectedOptions = ExpectedOptions(), layers: np.ndarray | None = None,
          value_norms: np.ndarray | None = None) -> np.ndarray:
    """[len(layers), Hq, S]: expected attention of the queries to come (from `position` on) over keys
    [len(layers), Hkv, S, hd] of those layers."""
    mean, cov = future_moments(stats, rope, position, options.future, layers, options.covariance)
    return expected_scores(mean, cov, keys, scale, value_norms if options.value_norm else None)


def pre_rope_rows(rope: Rope, queries: np.ndarray, first_position: int, skip_first: int) -> np.ndarray:
    """The rows of one chunk's post-RoPE queries [L, T, Hq, hd] (positions first_position..) that feed the
    statistics, un-rotated: every position from skip_first on."""
    drop = max(0, min(queries.shape[1], skip_first - first_position))
    positions = first_position + np.arange(drop, queries.shape[1])
    return rope.unrotate(queries[:, drop:], positions)

