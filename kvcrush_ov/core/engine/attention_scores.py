"""Per-head attention probabilities of a sequence's last W queries over its cached keys (numpy).

The kernel's `scores.N` is summed over heads; these are per query head. The W queries are the W
newest cache slots, so query i may see slots up to T - W + i (causal mask inside the window), and on a
sliding-window layer only the `sliding_window` slots ending there (the kernel's rule, on slots).
Every function takes optional leading axes (e.g. layers) so that one call scores a whole model.
"""
from __future__ import annotations

import numpy as np


def _window_logits(queries: np.ndarray, keys: np.ndarray, scale: float | np.ndarray,
                   sliding_window: int | np.ndarray = 0, causal: bool = True) -> np.ndarray:
    """Scaled logits [..., Hq, W, T], causally (and sliding-window) masked for queries that are the W
    newest slots; causal=False for queries from positions after every key (a probe of the prompt's end)."""
    *lead, w, hq, hd = queries.shape
    hkv, t = keys.shape[-3], keys.shape[-2]
    g = hq // hkv
    q = np.swapaxes(queries, -3, -2).reshape(*lead, hkv, g * w, hd)      # heads h = kv * g + j
    logits = np.matmul(q, np.swapaxes(keys, -1, -2))                     # [..., Hkv, g*W, T]
    logits *= np.asarray(scale, dtype=np.float32).reshape(*lead, 1, 1, 1) if np.ndim(scale) else np.float32(scale)
    logits = logits.reshape(*lead, hq, w, t)
    if np.any(sliding_window):  # key slot j is out of query i's window when j <= slot(i) - window
        sw = np.asarray(sliding_window, dtype=np.int64).reshape(*lead, 1, 1, 1) if np.ndim(sliding_window) \
            else np.int64(sliding_window)
        gone = (np.arange(t)[None, :] <= (t - w + np.arange(w))[:, None] - sw) & (sw > 0)
        np.putmask(logits, np.broadcast_to(gone, logits.shape), -np.inf)
    if causal:
        w = min(w, t)
        tail = logits[..., -w:]  # only the last W slots can lie in a query's future
        future = np.arange(w)[None, :] > np.arange(w)[:, None]
        np.putmask(tail, np.broadcast_to(future, tail.shape), -np.inf)
    logits -= logits.max(axis=-1, keepdims=True)
    np.exp(logits, out=logits)
    return logits


def window_probabilities(queries: np.ndarray, keys: np.ndarray, scale: float | np.ndarray,
                         sliding_window: int | np.ndarray = 0) -> np.ndarray:
    """queries [..., W, Hq, hd] (post-RoPE), keys [..., Hkv, T, hd] -> softmax probabilities [..., Hq, W, T].

    Query head h reads KV head h // (Hq // Hkv) (GQA). scale and sliding_window (0 = global): a
    number, or one per leading index."""
    e = _window_logits(queries, keys, scale, sliding_window)
    e /= e.sum(axis=-1, keepdims=True)
    return e


def window_scores(queries: np.ndarray, keys: np.ndarray, scale: float | np.ndarray,
                  sliding_window: int | np.ndarray = 0, causal: bool = True) -> np.ndarray:
    """[..., Hq, T]: attention mass each head's window queries gave each slot (summed over the window).

    The normalisation and the sum over the window are one matrix product: (1/Z)[W] @ exp[W, T]."""
    e = _window_logits(queries, keys, scale, sliding_window, causal)
    inv = 1.0 / e.sum(axis=-1)                                           # [..., Hq, W]
    return np.matmul(inv[..., None, :], e)[..., 0, :]
