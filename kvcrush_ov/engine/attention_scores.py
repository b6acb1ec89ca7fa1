"""Per-head attention probabilities of a sequence's last W queries over its cached keys (numpy).

The kernel's `scores.N` is summed over heads; these are per query head. The W queries are the W
newest cache slots, so query i may see slots up to T - W + i (causal mask inside the window).
"""
from __future__ import annotations

import numpy as np


def window_probabilities(queries: np.ndarray, keys: np.ndarray, scale: float) -> np.ndarray:
    """queries [W, Hq, hd] (post-RoPE), keys [Hkv, T, hd] -> softmax probabilities [Hq, W, T].

    Query head h reads KV head h // (Hq // Hkv) (GQA)."""
    w, hq, hd = queries.shape
    hkv, t, _ = keys.shape
    g = hq // hkv
    q = queries.transpose(1, 0, 2).reshape(hkv, g * w, hd)         # heads h = kv * g + j
    logits = np.matmul(q, keys.transpose(0, 2, 1)) * np.float32(scale)  # [Hkv, g*W, T]
    logits = logits.reshape(hq, w, t)
    future = np.arange(t)[None, :] > (t - w + np.arange(w))[:, None]     # [W, T]
    logits[:, future] = -np.inf
    logits -= logits.max(axis=-1, keepdims=True)
    np.exp(logits, out=logits)
    logits /= logits.sum(axis=-1, keepdims=True)
    return logits


def window_scores(queries: np.ndarray, keys: np.ndarray, scale: float) -> np.ndarray:
    """[Hq, T]: attention mass each head's window queries gave each slot (summed over the window)."""
    return window_probabilities(queries, keys, scale).sum(axis=1)
