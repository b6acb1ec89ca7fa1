"""Evaluation data and metrics: the `ruler-mini` generated suite, custom JSONL suites, scoring.

The runner that drives an engine over these samples lives elsewhere; see suite.py for how a Sample
becomes model input.
"""

from kvcrush_ov.tools.eval.metrics import (
    METRICS,
    exact_match_rate,
    kl_divergence,
    mean_and_ci,
    mean_rouge_l,
    nll,
    normalize,
    rouge_l,
    score,
    target_logprobs,
)
from kvcrush_ov.tools.eval.ruler_mini import (
    AGGREGATION_TASKS,
    DEFAULT_TASKS,
    FAITHFULNESS_TASKS,
    RETRIEVAL_TASKS,
    TASKS,
    ruler_mini,
)
from kvcrush_ov.tools.eval.suite import SUITES, Sample, load_jsonl, load_suite, save_jsonl

__all__ = [
    "METRICS", "SUITES", "TASKS", "DEFAULT_TASKS", "RETRIEVAL_TASKS", "AGGREGATION_TASKS",
    "FAITHFULNESS_TASKS", "Sample", "ruler_mini", "load_jsonl", "save_jsonl", "load_suite", "score",
    "rouge_l", "normalize", "exact_match_rate", "mean_rouge_l", "nll", "target_logprobs",
    "kl_divergence", "mean_and_ci",
]
