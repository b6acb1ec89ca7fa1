"""Scoring: task metrics (0-100), faithfulness to the full cache, teacher-forced NLL/KL, error bars.

Pure Python + numpy; nothing here knows about models or OpenVINO.

Conventions
- `score`, `exact_match_rate`, `mean_rouge_l` return percentages in [0, 100].
- `rouge_l` returns an F1 in [0, 1] (the building block).
- `nll` / `kl_divergence` work in nats, averaged over positions.
"""

from __future__ import annotations

import math
import difflib
import re
import statistics
import unicodedata
from typing import Sequence

import numpy as np

from kvcrush_ov.core.errors import ConfigError

METRICS = ("contains", "exact", "rouge_l", "edit_sim", "first_line_exact")

_WS = re.compile(r"\s+")
_WORD = re.compile(r"\w+")
_EDGE_PUNCT = " \t\n\"'`.,;:!?()[]{}<>*_-"


def normalize(text: str) -> str:
    """NFKC, lower case, every whitespace run -> one space, stripped."""
    return _WS.sub(" ", unicodedata.normalize("NFKC", text).lower()).strip()


def _normalize_exact(text: str) -> str:
    """`normalize`, then drop quotes/punctuation at both ends ("Paris." == "paris")."""
    return normalize(text).strip(_EDGE_PUNCT)


def _tokens(text: str) -> list[str]:
    return _WORD.findall(unicodedata.normalize("NFKC", text).lower())


def _lcs_len(a: Sequence[str], b: Sequence[str]) -> int:
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(a: str, b: str) -> float:
    """ROUGE-L F1 in [0, 1] between two texts: LCS over lower-cased word tokens (\\w+).

    Symmetric. Two texts without any word token score 1.0 (identical emptiness); one empty, 0.0.
    """
    ta, tb = _tokens(a), _tokens(b)
    if not ta and not tb:
        return 1.0
    if not ta or not tb:
        return 0.0
    lcs = _lcs_len(ta, tb)
    if lcs == 0:
        return 0.0
    p, r = lcs / len(ta), lcs / len(tb)
    return 2 * p * r / (p + r)


def score(prediction: str, answers: Sequence[str], metric: str) -> float:
    """Score one prediction against its reference answers, in [0, 100].

    contains: percentage of the answers that occur in the prediction (case-insensitive, whitespace
              normalized) -- partial credit for multi-answer tasks;
    exact:    100 if the normalized prediction equals any normalized answer (surrounding
              punctuation/quotes ignored), else 0;
    rouge_l:  100 x the best ROUGE-L F1 over the answers;
    edit_sim: 100 x the best difflib similarity ratio of the prediction's first non-empty line
              (stripped) to an answer (LCC's code-line edit similarity);
    first_line_exact: `exact` on the prediction's first non-empty line (few-shot labels, where a
              model goes on with the next example).
    """
    if metric not in METRICS:
        raise ConfigError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")
    if isinstance(answers, str):
        answers = [answers]
    if len(answers) == 0:
        raise ConfigError("score() needs at least one reference answer")
    if metric == "contains":
        pred = normalize(prediction)
        hits = sum(1 for a in answers if normalize(a) in pred)
        return 100.0 * hits / len(answers)
    if metric == "exact":
        pred = _normalize_exact(prediction)
        return 100.0 if any(_normalize_exact(a) == pred for a in answers) else 0.0
    if metric in ("edit_sim", "first_line_exact"):
        line = next((x.strip() for x in prediction.splitlines() if x.strip()), "")
        if metric == "first_line_exact":
            return score(line, answers, "exact")
        return 100.0 * max(difflib.SequenceMatcher(None, line, a.strip(), autojunk=False).ratio() for a in answers)
    return 100.0 * max(rouge_l(prediction, a) for a in answers)


# ----------------------------------------------------------------------------- faithfulness


def _paired(preds: Sequence[str], refs: Sequence[str]) -> None:
    if len(preds) != len(refs):
        raise ConfigError(f"got {len(preds)} predictions but {len(refs)} references; pair them 1:1")
    if len(preds) == 0:
        raise ConfigError("no predictions to compare")


def exact_match_rate(preds: Sequence[str], refs: Sequence[str], normalized: bool = False) -> float:
    """Percentage of predictions identical to their reference (e.g. the full-cache output).

    By default only leading/trailing whitespace is ignored: two generations of the same model either
    agree token for token or they do not. `normalized=True` compares `normalize`d texts instead.
    """
    _paired(preds, refs)
    f = normalize if normalized else str.strip
    return 100.0 * sum(f(p) == f(r) for p, r in zip(preds, refs)) / len(preds)


def mean_rouge_l(preds: Sequence[str], refs: Sequence[str]) -> float:
    """Mean ROUGE-L F1 (x100) of each prediction against its paired reference."""
    _paired(preds, refs)
    return 100.0 * sum(rouge_l(p, r) for p, r in zip(preds, refs)) / len(preds)


# ----------------------------------------------------------------------------- teacher forcing


def target_logprobs(logp: np.ndarray, targets: Sequence[int]) -> np.ndarray:
    """Gather log p(target_t) from a per-position log-softmax array [T, V] -> [T]."""
    logp = np.asarray(logp)
    t = np.asarray(targets, dtype=np.int64)
    if logp.ndim != 2 or t.ndim != 1 or logp.shape[0] != t.shape[0]:
        raise ConfigError(f"need logp [T, V] and targets [T]; got {logp.shape} and {t.shape}")
    if t.size and (t.min() < 0 or t.max() >= logp.shape[1]):
        raise ConfigError(f"target ids must be in [0, {logp.shape[1]}); got {t.min()}..{t.max()}")
    return logp[np.arange(t.shape[0]), t]


def nll(logprobs_of_targets: Sequence[float]) -> float:
    """Mean negative log-likelihood (nats/token) from the log-probs of the forced target tokens.

    exp(nll) is the perplexity. A -inf log-prob gives +inf (the target was impossible).
    """
    lp = np.asarray(logprobs_of_targets, dtype=np.float64).reshape(-1)
    if lp.size == 0:
        raise ConfigError("nll() needs at least one target log-prob")
    if np.any(lp > 1e-4):
        raise ConfigError("log-probs must be <= 0; pass log-softmax values, not logits or probs")
    return float(-lp.mean())


def kl_divergence(logp_full: np.ndarray, logp_other: np.ndarray, reduction: str = "mean"):
    """KL(P_full || P_other) per position, from log-softmax arrays [T, V] (or one position [V]).

    Top-k input is accepted: the columns must name the same token ids in both arrays (e.g. the full
    cache's top-k ids, gathered from both runs). The probability mass outside those columns,
    1 - sum(p), is then treated as one extra "rest" outcome, which gives a lower bound of the true KL
    (exact when the arrays cover the whole vocabulary, where the rest is ~0 and ignored).

    reduction: "mean" -> float (mean over positions), "none" -> array [T].
    """
    lf = np.asarray(logp_full, dtype=np.float64)
    lo = np.asarray(logp_other, dtype=np.float64)
    if lf.shape != lo.shape or lf.ndim not in (1, 2) or lf.size == 0:
        raise ConfigError(f"need two equal-shaped [T, V] log-prob arrays; got {lf.shape} and {lo.shape}")
    if reduction not in ("mean", "none"):
        raise ConfigError(f"reduction must be 'mean' or 'none', not {reduction!r}")
    if lf.ndim == 1:
        lf, lo = lf[None], lo[None]
    pf = np.exp(lf)
    with np.errstate(invalid="ignore", divide="ignore"):
        terms = np.where(pf > 0, pf * (lf - lo), 0.0)
    kl = terms.sum(axis=1)
    tail_f = np.clip(1.0 - pf.sum(axis=1), 0.0, 1.0)
    tail_o = np.clip(1.0 - np.exp(lo).sum(axis=1), 1e-12, 1.0)
    has_tail = tail_f > 1e-6
    kl = kl + np.where(has_tail, tail_f * (np.log(np.maximum(tail_f, 1e-300)) - np.log(tail_o)), 0.0)
    kl = np.maximum(kl, 0.0)  # rounding can give -1e-17
    return float(kl.mean()) if reduction == "mean" else kl


# ----------------------------------------------------------------------------- error bars


def mean_and_ci(values: Sequence[float], confidence: float = 0.95, method: str = "normal",
                n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """(mean, half-width of the `confidence` interval) for error bars.

    method="normal": z * sample std / sqrt(n) (z = 1.96 at 95%).
    method="bootstrap": half the width of the percentile interval of `n_boot` resampled means
    (seeded, so deterministic). With fewer than two values the half-width is nan (no spread known).
    """
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if v.size == 0:
        raise ConfigError("mean_and_ci() needs at least one value")
    if not 0.0 < confidence < 1.0:
        raise ConfigError(f"confidence must be in (0, 1), not {confidence}")
    mean = float(v.mean())
    if v.size < 2:
        return mean, math.nan
    if method == "normal":
        z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2)
        return mean, float(z * v.std(ddof=1) / math.sqrt(v.size))
    if method == "bootstrap":
        if n_boot < 1:
            raise ConfigError(f"n_boot must be >= 1, not {n_boot}")
        rng = np.random.default_rng(seed)
        means = v[rng.integers(0, v.size, size=(n_boot, v.size))].mean(axis=1)
        lo, hi = np.quantile(means, [0.5 - confidence / 2, 0.5 + confidence / 2])
        return mean, float((hi - lo) / 2)
    raise ConfigError(f"method must be 'normal' or 'bootstrap', not {method!r}")
