"""Next-token choice from logits: greedy, or temperature / top-k / top-p sampling with a per-request seed."""
from __future__ import annotations

import numpy as np

from ..config import GenerationConfig


def sample(logits: np.ndarray, config: GenerationConfig, rng: np.random.Generator,
           suppress: frozenset[int] = frozenset()) -> int:
    """One token from one row of logits [V]. `suppress` masks tokens (EOS before min_new_tokens)."""
    if suppress:
        logits = logits.copy()
        logits[list(suppress)] = -np.inf
    if not config.do_sample:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / config.temperature
    if 0 < config.top_k < z.shape[0]:
        kth = np.partition(z, -config.top_k)[-config.top_k]
        z = np.where(z < kth, -np.inf, z)
    z -= z.max()
    p = np.exp(z)
    p /= p.sum()
    if config.top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        cut = int(np.searchsorted(cum, config.top_p)) + 1  # smallest prefix with mass >= top_p
        keep = order[:cut]
        q = np.zeros_like(p)
        q[keep] = p[keep]
        p = q / q.sum()
    return int(rng.choice(p.shape[0], p=p))


def greedy_batch(logits: np.ndarray) -> np.ndarray:
    """Argmax over rows [S, V] at once (the common case: every request greedy)."""
    return logits.argmax(axis=-1)


def token_logprobs(logits: np.ndarray, tokens: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """float64 [R]: log p(tokens[i]) under logits row rows[i] of [S, V] (all rows when rows is None;
    openvino_genai's scores sum these).

    The exp of a vocabulary-sized row is the whole cost, paid by every request at every step: it runs in
    float32 (as openvino_genai's sampler computes log-probs), row by row through one reused buffer that
    stays in cache, at about half the time of float64. Within ~1e-7 of the float64 value per token (the
    shift by the row's max is exact: the logits hold bf16/f32 values); each row's result does not depend
    on the other rows."""
    rows = np.arange(logits.shape[0]) if rows is None else np.asarray(rows)
    tops = logits.max(axis=-1)[rows]
    sums = np.empty(len(rows), dtype=np.float64)
    buf = np.empty(logits.shape[-1], dtype=np.float32)
    for i, row in enumerate(rows.tolist()):
        np.subtract(logits[row], tops[i], out=buf, dtype=np.float32)
        sums[i] = np.exp(buf, out=buf).sum()
    return logits[rows, tokens].astype(np.float64) - tops.astype(np.float64) - np.log(sums)
