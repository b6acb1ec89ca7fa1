"""The engine loop: one thread owns the LLMEngine and steps it; every other thread talks to it through
request handles.

Callers enqueue commands (add, abort) and wait on their handle; the loop thread applies the commands
between steps, so a request from any thread joins the running batch at the next step. The thread
starts when work arrives and ends when none is left (an idle pipeline holds no thread). An error in
one step fails the requests in flight with a one-line reason; the loop keeps serving new ones.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import enum
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Iterator

from ..core.config import GenerationConfig
from ..core.engine.llm_engine import EngineMetrics, LLMEngine
from ..core.engine.sequence import FinishReason, Sequence
from ..core.errors import KVCrushError

log = logging.getLogger("kvcrush_ov.api.engine_loop")

RATE_WINDOW_S = 10.0  # tokens/s gauges average over this many seconds


class GenerationStatus(enum.Enum):
    """openvino_genai.GenerationStatus, plus FAILED (an error ended the request; see handle.error)."""

    RUNNING = 0    # queued or generating
    FINISHED = 1   # EOS, stop string/token or max_new_tokens
    IGNORED = 2
    CANCEL = 3     # cancel(): aborted by the caller
    STOP = 4       # stop(): ended early by the caller, output kept
    FAILED = 5


class GenerationFinishReason(enum.Enum):
    """openvino_genai.GenerationFinishReason."""

    NONE = 0
    STOP = 1
    LENGTH = 2


@dataclass
class GenerationOutput:
    """What a handle yields: the tokens (and, for text streaming, the text) since the last read."""

    generated_ids: list[int]
    text: str = ""
    finish_reason: GenerationFinishReason = GenerationFinishReason.NONE
    score: float = 0.0
    generated_log_probs: list[float] = field(default_factory=list)


def visible_ids(seq: Sequence) -> list[int]:
    """Generated ids without a trailing EOS."""
    out = seq.output_ids
    if seq.finish_reason is FinishReason.STOP and out and out[-1] in seq.eos_token_ids:
        out = out[:-1]
    return out


def final_text(seq: Sequence, decode: Callable[[list[int]], str]) -> str:
    """A finished sequence's text (cut at its stop string when one ended it)."""
    if seq.finish_reason is FinishReason.STOP and seq.config.stop_strings and seq.text:
        return seq.text
    return decode(visible_ids(seq))


class GenerationHandle:
    """One request, as openvino_genai's GenerationHandle: read()/read_all()/can_read()/get_status()/
    cancel()/stop(), plus stream() (blocking iterator) and astream() (asyncio) over its outputs."""

    def __init__(self, loop: "EngineLoop", request_id: Any, text: bool) -> None:
        self.request_id = request_id
        self.sequence: Sequence | None = None  # the engine's; read it only once finished
        self.error: str | None = None
        self.final_text: str = ""
        self._loop, self._text = loop, text
        self._status = GenerationStatus.RUNNING
        self._cond = threading.Condition()
        self._outputs: collections.deque[GenerationOutput] = collections.deque()
        self._wakers: list[Callable[[], None]] = []
        self._accepted = threading.Event()
        self._add_error: BaseException | None = None
        self._text_parts: list[str] = []   # written by the loop thread (engine streamer), drained by it
        self._published = 0                # output tokens already handed out
        self._ended_by: GenerationStatus | None = None  # CANCEL/STOP asked by the caller
        self._abort_done = threading.Event()

    # -- caller side ---------------------------------------------------------------------------------
    def get_status(self) -> GenerationStatus:
        return self._status

    @property
    def finished(self) -> bool:
        return self._status is not GenerationStatus.RUNNING

    def can_read(self) -> bool:
        with self._cond:
            return bool(self._outputs)

    def read(self, timeout: float | None = None) -> dict[int, GenerationOutput]:
        """New output since the last read (blocks until there is some or the request has ended)."""
        with self._cond:
            self._cond.wait_for(lambda: self._outputs or self.finished, timeout)
            if not self._outputs:
                return {}
            out = self._outputs.popleft()
            while self._outputs:  # merge everything pending into one delta
                nxt = self._outputs.popleft()
                out = GenerationOutput(out.generated_ids + nxt.generated_ids, out.text + nxt.text, nxt.finish_reason)
            return {0: out}

    def stream(self) -> Iterator[GenerationOutput]:
        """Outputs as they come, until the request ends."""
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._outputs or self.finished)
                if not self._outputs:
                    return
                out = self._outputs.popleft()
            yield out

    async def astream(self) -> AsyncIterator[GenerationOutput]:
        """stream() for asyncio: awaits without blocking the event loop."""
        aio = asyncio.get_running_loop()
        event = asyncio.Event()

        def wake() -> None:
            aio.call_soon_threadsafe(event.set)

        with self._cond:
            self._wakers.append(wake)
        try:
            while True:
                with self._cond:
                    out = self._outputs.popleft() if self._outputs else None
                    ended = self.finished and not self._outputs
                if out is not None:
                    yield out
                elif ended:
                    return
                else:
                    await event.wait()
                    event.clear()
        finally:
            with self._cond:
                self._wakers.remove(wake)

    def read_all(self) -> list[GenerationOutput]:
        """Wait for the end; the whole output."""
        self.wait()
        seq = self.sequence
        reason = {FinishReason.LENGTH: GenerationFinishReason.LENGTH,
                  FinishReason.STOP: GenerationFinishReason.STOP}.get(seq.finish_reason, GenerationFinishReason.NONE)
        return [GenerationOutput(list(seq.output_ids), self.final_text, reason)]

    def wait(self, timeout: float | None = None) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.finished, timeout)

    def cancel(self, wait: bool = True) -> None:
        """Abort the request; its KV blocks are freed before the next step (wait: until they are)."""
        self._end(GenerationStatus.CANCEL, wait)

    def stop(self, wait: bool = True) -> None:
        """End the request now, keeping what it generated."""
        self._end(GenerationStatus.STOP, wait)

    def _end(self, status: GenerationStatus, wait: bool) -> None:
        if self.finished or self.sequence is None:
            return
        self._ended_by = self._ended_by or status
        self._loop.submit(("abort", self))
        if wait and threading.current_thread() is not self._loop.thread:
            self._abort_done.wait()

    # -- loop side -----------------------------------------------------------------------------------
    def _push(self, out: GenerationOutput | None, status: GenerationStatus | None = None) -> None:
        with self._cond:
            if out is not None:
                self._outputs.append(out)
            if status is not None:
                self._status = status
            self._cond.notify_all()
            wakers = list(self._wakers)
        for wake in wakers:
            wake()


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
        self._commands: list[tuple] = []
        self._active: dict[int, GenerationHandle] = {}
        self._steps = 0
        self._finished: collections.Counter[str] = collections.Counter()
        self._modes: collections.Counter[str] = collections.Counter()
        self._prompt_tokens = self._generation_tokens = 0
        self._recent: collections.deque[tuple[float, int, int]] = collections.deque()
        self._metrics = self._snapshot()

    # -- called from any thread ----------------------------------------------------------------------
    def add(self, requests: list[tuple[Any, list[int], GenerationConfig, Any]], text: bool = False,
            ) -> list[GenerationHandle]:
        """Queue requests (request_id, prompt ids, config, eviction) to join the batch at the next step.

        Returns once the loop has accepted all of them; if one is rejected, the others are cancelled
        and its error (one line, e.g. PromptError) is raised here.
        """
        handles = [GenerationHandle(self, rid, text) for rid, *_ in requests]
        with self._cond:
            for h, (_, ids, config, eviction) in zip(handles, requests):
                self._commands.append(("add", h, ids, config, eviction))
            self._ensure_thread()
        for h in handles:
            h._accepted.wait()
        bad = next((h for h in handles if h._add_error is not None), None)
        if bad is not None:
            for h in handles:
                if h._add_error is None:
                    h.cancel()
            raise bad._add_error
        return handles

    def submit(self, command: tuple) -> None:
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

    def _iteration(self, commands: list[tuple]) -> None:
        aborted = [c[1] for c in commands if c[0] == "abort"]
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
            handle._push(out, status)
        for handle in aborted:  # cancel()/stop() return once the request's end is published
            handle._abort_done.set()

    def _fail_all(self, reason: str, commands: list[tuple]) -> None:
        with self._cond:
            active, self._active = list(self._active.items()), {}
        for seq_id, handle in active:
            try:
                self.engine.abort(seq_id)
            except Exception:  # keep releasing the others
                log.error("could not abort request %s", handle.request_id)
            handle.error = handle.error or reason
            handle._push(GenerationOutput([]), GenerationStatus.FAILED)
        for command in commands:
            handle = command[1]
            if not handle._accepted.is_set():
                handle._add_error = KVCrushError(reason)
                handle._push(None, GenerationStatus.FAILED)
                handle._accepted.set()
            handle._abort_done.set()

    def _apply(self, command: tuple) -> None:
        kind, handle = command[0], command[1]
        if kind == "add":
            _, _, ids, config, eviction = command
            try:
                streamer = handle._text_parts.append if handle._text else None
                handle.sequence = self.engine.add_request(ids, config, streamer=streamer, eviction=eviction)
                with self._cond:
                    self._active[handle.sequence.seq_id] = handle
            except Exception as e:  # bad input is the caller's error: raise it in the caller's thread
                handle._add_error = e if isinstance(e, KVCrushError) else KVCrushError(_one_line(e))
                handle._push(None, GenerationStatus.FAILED)
            handle._accepted.set()
        elif kind == "abort":
            if handle.sequence is not None and not handle.finished:
                self.engine.abort(handle.sequence.seq_id)

    def _step(self) -> None:
        try:
            self.engine.step()
        except Exception as e:  # fail what is in flight, keep the loop (and the engine) serving
            reason = _one_line(e)
            log.error("engine step failed; %d request(s) in flight end with an error: %s", len(self._active), reason)
            for seq_id, handle in list(self._active.items()):
                if not handle.sequence.is_finished:
                    self.engine.abort(seq_id)
                    handle.sequence.error = reason
            return
        stats = self.engine.last_step
        if stats is not None:
            self._prompt_tokens += stats.num_prefill_tokens

    def _publish(self) -> list[tuple[GenerationHandle, GenerationOutput, GenerationStatus | None]]:
        """Each active request's new tokens (to push to its handle); retire the finished ones."""
        new_tokens, pushes = 0, []
        for seq_id, handle in list(self._active.items()):
            seq = handle.sequence
            ids = seq.output_ids[handle._published:]
            handle._published += len(ids)
            new_tokens += len(ids)
            text = "".join(handle._text_parts)
            handle._text_parts.clear()
            if not seq.is_finished:
                if ids or text:
                    pushes.append((handle, GenerationOutput(ids, text), None))
                continue
            with self._cond:
                del self._active[seq_id]
            handle.final_text = final_text(seq, self.decode)
            reason = {FinishReason.LENGTH: GenerationFinishReason.LENGTH,
                      FinishReason.STOP: GenerationFinishReason.STOP}.get(seq.finish_reason,
                                                                         GenerationFinishReason.NONE)
            if seq.error:
                handle.error, status = seq.error, GenerationStatus.FAILED
            elif handle._ended_by is not None:
                status = handle._ended_by
            else:
                status = GenerationStatus.FINISHED
            self._finished[status.name.lower()] += 1
            self._modes[seq.eviction_mode] += 1
            pushes.append((handle, GenerationOutput(ids, text, reason), status))
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
