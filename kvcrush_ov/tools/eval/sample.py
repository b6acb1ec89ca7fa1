"""The `Sample` record: one evaluation item, as every suite generator produces it."""

from __future__ import annotations

from dataclasses import dataclass, field

from kvcrush_ov.core.errors import ConfigError
from kvcrush_ov.tools.eval.metrics import METRICS


@dataclass
class Sample:
    """One evaluation item.

    id:             unique within its suite.
    prompt:         the user message (chat=True) or the raw text to continue (chat=False).
    answers:        reference answers; what they mean depends on `metric`.
    metric:         "contains" | "exact" | "rouge_l" (see metrics.score).
    max_new_tokens: generation budget.
    chat:           wrap `prompt` in the model's chat template.
    task:           task name (e.g. "niah_single"), for grouping results.
    length:         target prompt length in tokens the generator sized it for (0: unknown).
    answer_prefix:  text placed at the start of the assistant's reply before generation
                    (e.g. "The pass key is"); the model's output is scored without it.
    meta:           generator details (needle depths, source modules, ...); not part of JSONL.
    """

    id: str
    prompt: str
    answers: list[str]
    metric: str
    max_new_tokens: int = 32
    chat: bool = True
    task: str = ""
    length: int = 0
    answer_prefix: str = ""
    meta: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.metric not in METRICS:
            raise ConfigError(f"sample {self.id!r}: unknown metric {self.metric!r}; use one of {', '.join(METRICS)}")
        if not self.answers:
            raise ConfigError(f"sample {self.id!r}: answers must be a non-empty list")
        if self.max_new_tokens <= 0:
            raise ConfigError(f"sample {self.id!r}: max_new_tokens must be positive")


def check_suite_args(tasks, known: dict, default: tuple, lengths, min_length: int, samples_per_task,
                     label: str = "") -> tuple[tuple, tuple]:
    """Validate a generated suite's tasks / lengths / samples_per_task; return (tasks, lengths) as tuples.

    label names the suite in the messages (e.g. "real-text ")."""
    tasks = default if tasks is None else tuple([tasks] if isinstance(tasks, str) else tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown or not tasks:
        raise ConfigError(f"unknown {label}task {unknown[0] if unknown else '(none given)'!r}; "
                          f"choose from {', '.join(known)}")
    lengths = tuple(lengths)
    bad = [x for x in lengths if isinstance(x, bool) or not isinstance(x, int) or x < min_length]
    if bad or not lengths:
        raise ConfigError(f"{label}lengths must be integers >= {min_length} tokens, got {bad[0] if bad else lengths!r}")
    if isinstance(samples_per_task, bool) or not isinstance(samples_per_task, int) or samples_per_task < 1:
        raise ConfigError(f"samples_per_task must be a positive integer, got {samples_per_task!r}")
    return tasks, lengths
