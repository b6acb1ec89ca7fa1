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


@dataclass
class Sequence:
    """A request = one sequence (no beams). Positions are true token positions; the cache may hold
    fewer slots than positions once tokens are evicted, so `cache_len` is tracked apart from
    `num_computed`."""

    seq_id: int
    token_ids: list[int]
    num_prompt_tokens: int
    config: GenerationConfig
    eos_token_ids: frozenset[int] = frozenset()
    streamer: Callable[[str], Any] | None = None
    status: Status = Status.WAITING
    finish_reason: FinishReason | None = None
    error: str | None = None
    num_computed: int = 0          # tokens whose K/V have been written (true positions 0..num_computed-1)
    cache_len: int = 0             # KV slots held (the most of any layer; = num_computed - evicted)
    layer_offsets: np.ndarray | None = None  # [L] slots a layer holds fewer than cache_len (PyramidKV)
    num_preemptions: int = 0
    eviction: Any = None           # EvictionPlan or None (full cache)
    teacher: "Sequence | None" = None  # teacher forcing: emit the teacher's tokens instead of sampling
    logprobs: list | None = None   # when a list, each step's log-softmax row [V] is appended (evaluation)
    kv_state: Any = None           # the evictor's per-sequence state; dropped on preemption
    peak_cache_len: int = 0        # most KV slots held at any time (the whole prompt, before eviction)
    peak_decode_cache_len: float = 0  # most KV slots held while decoding, mean over layers (~ the budget)
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

    def layer_lens(self, num_layers: int) -> np.ndarray:
        """KV slots held by each layer."""
        lens = np.full(num_layers, self.cache_len, dtype=np.int64)
        return lens if self.layer_offsets is None else lens - self.layer_offsets

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

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

    def finish(self, reason: FinishReason, error: str | None = None) -> None:
        self.status = Status.FINISHED
        self.finish_reason = reason
        self.error = error
