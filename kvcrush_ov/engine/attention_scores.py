"""Per-head attention probabilities of a sequence's last W queries over its cached keys (numpy).

The kernel's `scores.N` is summed over heads; these are per query head. The W queries are the W
newest cache slots, so query i may see slots up to T - W + i (causal mask inside the window), and on a
sliding-window layer only the `sliding_window` slots ending there (the kernel's rule, on slots).
"""
from __future__ import annotations

import numpy as np


def window_probabilities(queries: np.ndarray, keys: np.ndarray, scale: float,
                         sliding_window: int = 0) -> np.ndarray:
    """queries [W, Hq, hd] (post-RoPE), keys [Hkv, T, hd] -> softmax probabilities [Hq, W, T].

    Query head h reads KV head h // (Hq // Hkv) (GQA); sliding_window 0 = global attention."""
    w, hq, hd = queries.shape
    hkv, t, _ = keys.shape
    g = hq // hkv
    q = queries.transpose(1, 0, 2).reshape(hkv, g * w, hd)         # heads h = kv * g + j
    logits = np.matmul(q, keys.transpose(0, 2, 1)) * np.float32(scale)  # [Hkv, g*W, T]
    logits = logits.reshape(hq, w, t)
    query_slot = (t - w + np.arange(w))[:, None]
    hidden = np.arange(t)[None, :] > query_slot                          # [W, T] future
    if sliding_window:
        hidden |= np.arange(t)[None, :] <= query_slot - sliding_window   # slid out of the window
    logits[:, hidden] = -np.inf
    logits -= logits.max(axis=-1, keepdims=True)
    np.exp(logits, out=logits)
    logits /= logits.sum(axis=-1, keepdims=True)
    return logits


def window_scores(queries: np.ndarray, keys: np.ndarray, scale: float, sliding_window: int = 0) -> np.ndarray:
    """[Hq, T]: attention mass each head's window queries gave each slot (summed over the window)."""
    return window_probabilities(queries, keys, scale, sliding_window).sum(axis=1)
