"""One request's tokens and where its generation stands."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..config import GenerationConfig


class Status(enum.Enum):
    WAITING = "waiting"    # not yet (or no longer, after preemption) holding KV blocks
    RUNNING = "running"    # holds blocks; prefilling or decoding
    FINISHED = "finished"


class FinishReason(enum.Enum):
    LENGTH = "length"
    STOP = "stop"          # EOS, stop token or stop string
    ABORT = "abort"        # aborted, or the streamer asked to stop / raised
    ERROR = "error"


# Hooks a caller may attach to a request (evaluation uses them; the engine knows no evaluation):
# a token source supplies each next token instead of the sampler (None: it has no more, the request
# ends), and a logits observer sees every logits row the request samples from.
TokenSource = Callable[["Sequence"], "int | None"]
LogitsObserver = Callable[["Sequence", np.ndarray], None]


@dataclass
class RequestMetrics:
    """What a request cost, kept across preemptions. Eviction figures are written by the evictor
    only, the rest by the engine only."""

    evictions: int = 0
    tokens_evicted: int = 0        # per layer, mean over layers, summed over evictions
    eviction_seconds: float = 0.0
    peak_kv_slots: int = 0         # most KV slots held in any layer (the whole prompt, before eviction)
    peak_decode_kv_slots: float = 0.0  # most KV slots held while decoding, mean over layers (~ the budget)


@dataclass(eq=False)  # a request is itself: compared by identity, hashable
class Sequence:
    """A request = one sequence (no beams): the request itself and its output. Positions are true
    token positions; how many KV slots it holds per layer is the block manager's business, and its
    eviction state the evictor's."""

    seq_id: int
    token_ids: list[int]
    num_prompt_tokens: int
    config: GenerationConfig
    eos_token_ids: frozenset[int] = frozenset()
    streamer: Callable[[str], Any] | None = None
    eviction: Any = None           # EvictionPlan or None (full cache); fixed for the request's life
    query_window: int = 0          # newest queries kept for scoring: the plan's window, or what forks need
    query_stats: bool = False      # keep running query statistics (expected attention): the plan's, or forks'
    position_offset: int = 0       # true position of token_ids[0] (a probe of a prompt's tail runs at its place)
    token_source: TokenSource | None = None
    logits_observer: LogitsObserver | None = None
    status: Status = Status.WAITING  # the scheduler moves WAITING <-> RUNNING; finish() ends it
    finish_reason: FinishReason | None = None
    error: str | None = None
    num_computed: int = 0          # tokens whose K/V have been written (written by the scheduler only)
    num_preemptions: int = 0
    cumulative_logprob: float = 0.0  # sum of log p(token) over the generated tokens (as openvino_genai's scores)
    metrics: RequestMetrics = field(default_factory=RequestMetrics)
    rng: np.random.Generator = field(init=False)
    text: str = ""                 # detokenized output so far (maintained when needed)
    streamed_chars: int = 0
    arrival: float = 0.0
    first_token_time: float | None = None
    token_times: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.config.rng_seed)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def eviction_mode(self) -> str:
        """The path this request takes: "none" (full cache), "after_prompt" (evicted once its whole prompt
        is cached) or "memory_bounded" (compacted while its prompt is prefilled: the pool cannot hold it)."""
        return "none" if self.eviction is None else self.eviction.path

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_uncomputed(self) -> int:
        """Tokens still to be fed to the model (prompt chunks, the last sampled token, or all after preemption)."""
        return len(self.token_ids) - self.num_computed

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    def append_token(self, token: int, logprob: float, now: float) -> None:
        """A generated token, its log-probability and when it came (the first one is the TTFT)."""
        self.cumulative_logprob += logprob
        self.token_ids.append(token)
        if self.first_token_time is None:
            self.first_token_time = now
        self.token_times.append(now)

    def finish(self, reason: FinishReason, error: str | None = None) -> None:
        self.status = Status.FINISHED
        self.finish_reason = reason
        self.error = error
