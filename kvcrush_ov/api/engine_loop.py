"""The engine loop: one thread owns the LLMEngine and steps it; every other thread talks to it through
request handles.

Callers enqueue commands (AddRequest, AbortRequest) and wait on their handle; the loop thread applies the commands
between steps, so a request from any thread joins the running batch at the next step. The thread
starts when work arrives and ends when none is left (an idle pipeline holds no thread). An error in
one step fails the requests in flight with a one-line reason; the loop keeps serving new ones.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from ..core.config import GenerationConfig
from ..core.engine.llm_engine import EngineMetrics, LLMEngine
from ..core.errors import KVCrushError
from ..core.eviction_config import RequestEviction
from .generation_handle import (GenerationFinishReason, GenerationHandle, GenerationOutput,  # noqa: F401 (re-exported)
                                GenerationStatus)

log = logging.getLogger("kvcrush_ov.api.engine_loop")

RATE_WINDOW_S = 10.0  # tokens/s gauges average over this many seconds


@dataclass(frozen=True)
class AddRequest:
    """Command: join the batch at the next step."""

    handle: GenerationHandle
    prompt_ids: list[int]
    config: GenerationConfig
    eviction: RequestEviction


@dataclass(frozen=True)
class AbortRequest:
    """Command: end the request now (the handle says whether as a cancel or a stop)."""

    handle: GenerationHandle


Command = AddRequest | AbortRequest


@dataclass(frozen=True)
class LoopMetrics:
    """The engine's load plus the loop's counters (a consistent snapshot taken between steps)."""

    engine: EngineMetrics
    requests_active: int
    requests_finished: dict[str, int]
    requests_by_eviction_mode: dict[str, int]  # finished requests by the path they took (Sequence.eviction_mode)
    prompt_tokens: int
    generation_tokens: int
    prompt_tokens_per_s: float
    generation_tokens_per_s: float
    steps: int


class EngineLoop:
    """Owns one LLMEngine; only its thread calls engine methods once requests go through it."""

    def __init__(self, engine: LLMEngine, decode: Callable[[list[int]], str]) -> None:
        self.engine = engine
        self.decode = decode
        self.thread: threading.Thread | None = None
        self._cond = threading.Condition()
        self._commands: list[Command] = []
        self._active: dict[int, GenerationHandle] = {}
        self._steps = 0
        self._finished: collections.Counter[str] = collections.Counter()
        self._modes: collections.Counter[str] = collections.Counter()
        self._prompt_tokens = self._generation_tokens = 0
        self._recent: collections.deque[tuple[float, int, int]] = collections.deque()
        self._metrics = self._snapshot()

    # -- called from any thread ----------------------------------------------------------------------
    def add(self, requests: list[tuple[Any, list[int], GenerationConfig, RequestEviction]], text: bool = False,
            ) -> list[GenerationHandle]:
        """Queue requests (request_id, prompt ids, config, eviction) to join the batch at the next step.

        Returns once the loop has accepted all of them; if one is rejected, the others are cancelled
        and its error (one line, e.g. PromptError) is raised here.
        """
        handles = [GenerationHandle(self, rid, text) for rid, *_ in requests]
        with self._cond:
            for h, (_, ids, config, eviction) in zip(handles, requests):
                self._commands.append(AddRequest(h, ids, config, eviction))
            self._ensure_thread()
        errors = [h.wait_accepted() for h in handles]
        bad = next((e for e in errors if e is not None), None)
        if bad is not None:
            for h, e in zip(handles, errors):
                if e is None:
                    h.cancel()
            raise bad
        return handles

    def abort(self, handle: GenerationHandle) -> None:
        """End the handle's request before the next step (its handle calls this on cancel()/stop())."""
        self.submit(AbortRequest(handle))

    def submit(self, command: Command) -> None:
        with self._cond:
            self._commands.append(command)
            self._ensure_thread()

    def step(self, timeout: float | None = None) -> None:
        """Wait until the loop has run one more step (returns at once when there is no work)."""
        with self._cond:
            target = self._steps + 1
            self._cond.wait_for(lambda: self._steps >= target or self.thread is None, timeout)

    @property
    def has_unfinished(self) -> bool:
        with self._cond:
            return bool(self._active or self._commands)

    def metrics(self) -> LoopMetrics:
        """The snapshot of the last step, with tokens/s over the last RATE_WINDOW_S seconds."""
        with self._cond:
            snap, recent = self._metrics, list(self._recent)
        if not recent:
            return snap
        now = time.perf_counter()
        start = now - RATE_WINDOW_S
        before = [r for r in recent if r[0] <= start]
        t0, p0, g0 = before[-1] if before else recent[0]
        span = max(now - max(t0, start), 1e-3)
        _, p1, g1 = recent[-1]
        return dataclasses.replace(snap, prompt_tokens_per_s=(p1 - p0) / span,
                                   generation_tokens_per_s=(g1 - g0) / span)

    def close(self, timeout: float = 30.0) -> None:
        """Cancel everything in flight and wait for the thread to end."""
        with self._cond:
            handles = list(self._active.values())
        for h in handles:
            h.cancel(wait=False)
        thread = self.thread
        if thread is not None:
            thread.join(timeout)

    # -- the loop thread -----------------------------------------------------------------------------
    def _ensure_thread(self) -> None:
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, name="kvcrush-engine-loop", daemon=True)
            self.thread.start()
        self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                commands, self._commands = self._commands, []
                if not commands and not self._active:
                    self.thread = None
                    self._cond.notify_all()
                    return
            try:
                self._iteration(commands)
            except Exception as e:  # a bug of ours must not leave callers waiting forever
                log.exception("engine loop iteration failed: %s", _one_line(e))
                self._fail_all(_one_line(e), commands)

    def _iteration(self, commands: list[Command]) -> None:
        aborted = [c.handle for c in commands if isinstance(c, AbortRequest)]
        for command in commands:
            self._apply(command)
        if self.engine.has_unfinished:
            self._step()
        pushes = self._publish()
        with self._cond:
            self._steps += 1
            now = time.perf_counter()
            self._recent.append((now, self._prompt_tokens, self._generation_tokens))
            while len(self._recent) > 2 and now - self._recent[1][0] > RATE_WINDOW_S:
                self._recent.popleft()
            self._metrics = self._snapshot()
            self._cond.notify_all()
        for handle, out, status in pushes:  # after the snapshot: a caller woken here sees its effect
            handle.push(out, status)
        for handle in aborted:  # cancel()/stop() return once the request's end is published
            handle.abort_published()

    def _fail_all(self, reason: str, commands: list[Command]) -> None:
        with self._cond:
            active, self._active = list(self._active.items()), {}
        for seq_id, handle in active:
            try:
                self.engine.abort(seq_id)
            except Exception:  # keep releasing the others
                log.error("could not abort request %s", handle.request_id)
            handle.fail(reason)
        for command in commands:
            command.handle.reject(KVCrushError(reason))  # no-op for a request already accepted
            command.handle.abort_published()

    def _apply(self, command: Command) -> None:
        handle = command.handle
        if isinstance(command, AddRequest):
            try:
                seq = self.engine.add_request(command.prompt_ids, command.config, streamer=handle.engine_streamer,
                                              eviction=command.eviction)
            except Exception as e:  # bad input is the caller's error: raise it in the caller's thread
                handle.reject(e if isinstance(e, KVCrushError) else KVCrushError(_one_line(e)))
                return
            with self._cond:
                self._active[seq.seq_id] = handle
            handle.accept(seq)
        elif handle.sequence is not None and not handle.finished:
            self.engine.abort(handle.sequence.seq_id)

    def _step(self) -> None:
        try:
            self.engine.step()
        except Exception as e:  # fail what is in flight, keep the loop (and the engine) serving
            reason = _one_line(e)
            log.error("engine step failed; %d request(s) in flight end with an error: %s", len(self._active), reason)
            for seq_id, handle in list(self._active.items()):
                self.engine.abort(seq_id, error=reason)  # no-op for a request already finished
            return
        stats = self.engine.last_step
        if stats is not None:
            self._prompt_tokens += stats.num_prefill_tokens

    def _publish(self) -> list[tuple[GenerationHandle, GenerationOutput, GenerationStatus | None]]:
        """Each active request's new tokens (to push to its handle); retire the finished ones."""
        new_tokens, pushes = 0, []
        for seq_id, handle in list(self._active.items()):
            seq = handle.sequence
            ids, text = handle.take_new()
            new_tokens += len(ids)
            if not seq.is_finished:
                if ids or text:
                    pushes.append((handle, GenerationOutput(ids, text), None))
                continue
            with self._cond:
                del self._active[seq_id]
            status = handle.finish()
            self._finished[status.name.lower()] += 1
            self._modes[seq.eviction_mode] += 1
            pushes.append((handle, GenerationOutput(ids, text, GenerationFinishReason.of(seq.finish_reason)), status))
        self._generation_tokens += new_tokens
        return pushes

    def _snapshot(self) -> LoopMetrics:
        return LoopMetrics(self.engine.metrics(), len(self._active), dict(self._finished), dict(self._modes),
                           self._prompt_tokens,
                           self._generation_tokens, 0.0, 0.0, self._steps)


def _one_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    text = next((line for line in lines if not line.startswith(("Exception from", "Check "))), "")
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
