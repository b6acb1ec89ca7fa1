"""One request as its caller holds it: openvino_genai's GenerationHandle over a request of the engine loop.

The engine's Sequence is the engine's (read it, never write it). What the caller may change about the
result lives here: when the caller's own streamer ends the request, the handle keeps only the tokens
that streamer saw and the finish reason it asked for. The loop thread writes the rest through the
methods under "loop side"; nothing else writes a handle's state.
"""
from __future__ import annotations

import asyncio
import collections
import enum
import threading
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Iterator, Protocol

from ..core.engine.sequence import FinishReason, Sequence
from ..core.engine.stopping import final_text, visible_ids
from ..core.errors import KVCrushError

Streamer = Callable[[str], Any]


class ServingLoop(Protocol):
    """What a handle needs of the engine loop serving it (engine_loop.EngineLoop)."""

    thread: threading.Thread | None
    decode: Callable[[list[int]], str]

    def abort(self, handle: "GenerationHandle") -> None: ...


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

    @classmethod
    def of(cls, reason: FinishReason | None) -> "GenerationFinishReason":
        """The engine's finish reason as openvino_genai names it (an abort or error is NONE)."""
        return {FinishReason.LENGTH: cls.LENGTH, FinishReason.STOP: cls.STOP}.get(reason, cls.NONE)


@dataclass
class GenerationOutput:
    """What a handle yields: the tokens (and, for text streaming, the text) since the last read."""

    generated_ids: list[int]
    text: str = ""
    finish_reason: GenerationFinishReason = GenerationFinishReason.NONE


class GenerationHandle:
    """One request, as openvino_genai's GenerationHandle: read()/read_all()/can_read()/get_status()/
    cancel()/stop(), plus stream() (blocking iterator) and astream() (asyncio) over its outputs."""

    def __init__(self, loop: ServingLoop, request_id: Any, stream_text: bool) -> None:
        self.request_id = request_id
        self._loop, self._stream_text = loop, stream_text
        self._sequence: Sequence | None = None  # the engine's, set once the loop accepted the request
        self._error: str | None = None
        self._final_text = ""
        self._status = GenerationStatus.RUNNING
        self._cond = threading.Condition()
        self._outputs: collections.deque[GenerationOutput] = collections.deque()
        self._wakers: list[Callable[[], None]] = []
        self._accepted = threading.Event()
        self._add_error: BaseException | None = None
        self._text_parts: list[str] = []   # written by the engine's streamer (loop thread), drained by take_new()
        self._published = 0                # output tokens already handed out
        self._ended_by: GenerationStatus | None = None  # CANCEL/STOP asked by the caller
        self._abort_done = threading.Event()
        # caller side: the caller's streamer ended the request having seen this many tokens, with this reason
        self._kept_tokens: int | None = None
        self._caller_finish_reason: FinishReason | None = None

    # -- what the request produced (read once finished) ------------------------------------------
    @property
    def sequence(self) -> Sequence | None:
        """The engine's sequence (None until accepted); read it only once finished."""
        return self._sequence

    @property
    def error(self) -> str | None:
        """Why the request failed (one line), or None."""
        return self._error

    @property
    def output_ids(self) -> list[int]:
        """The generated ids, cut where the caller's streamer ended the request."""
        ids = self._sequence.output_ids
        return ids if self._kept_tokens is None else ids[:self._kept_tokens]

    @property
    def finish_reason(self) -> FinishReason | None:
        """Why the request ended: the caller's streamer's reason when it ended it, else the engine's."""
        return self._caller_finish_reason or self._sequence.finish_reason

    @property
    def final_text(self) -> str:
        """The whole text (see stopping.final_text), as the caller's streamer left it when it ended the request."""
        return self._final_text

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
        return [GenerationOutput(list(self.output_ids), self.final_text, GenerationFinishReason.of(self.finish_reason))]

    def wait(self, timeout: float | None = None) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.finished, timeout)

    def cancel(self, wait: bool = True) -> None:
        """Abort the request; its KV blocks are freed before the next step (wait: until they are)."""
        self._end(GenerationStatus.CANCEL, wait)

    def stop(self, wait: bool = True) -> None:
        """End the request now, keeping what it generated."""
        self._end(GenerationStatus.STOP, wait)

    def feed(self, streamer: Streamer) -> None:
        """Call the user's streamer (in the caller's thread) with each text piece, as openvino_genai does:
        True or StreamingStatus.STOP ends the request keeping what the streamer saw, CANCEL aborts it;
        a streamer that raises ends only this request (KVCrushError)."""
        seen = 0
        for out in self.stream():
            seen += len(out.generated_ids)
            if not out.text:
                continue
            try:
                status = streamer(out.text)
            except Exception as e:  # a broken streamer only ends its own request
                self.cancel()
                raise KVCrushError(f"streamer raised {type(e).__name__}: {e}") from None
            name = getattr(status, "name", "")
            if status is True or name in ("STOP", "CANCEL"):
                self.stop() if name != "CANCEL" else self.cancel()
                self.wait()
                self._keep(seen, FinishReason.ABORT if name == "CANCEL" else FinishReason.STOP)
                return

    def _keep(self, num_tokens: int, reason: FinishReason) -> None:
        """The result is what the caller's streamer saw: the first num_tokens, ended for this reason."""
        self._kept_tokens, self._caller_finish_reason = num_tokens, reason
        self._final_text = self._loop.decode(visible_ids(self.output_ids, reason, self._sequence.eos_token_ids))

    def _end(self, status: GenerationStatus, wait: bool) -> None:
        if self.finished or self._sequence is None:
            return
        self._ended_by = self._ended_by or status
        self._loop.abort(self)
        if wait and threading.current_thread() is not self._loop.thread:
            self._abort_done.wait()

    # -- loop side: called by the engine loop only ---------------------------------------------------
    def wait_accepted(self) -> BaseException | None:
        """Block until the loop has taken the request; the error that rejected it, if one did."""
        self._accepted.wait()
        return self._add_error

    @property
    def engine_streamer(self) -> Streamer | None:
        """What the engine hands text pieces to (only when the caller streams text)."""
        return self._text_parts.append if self._stream_text else None

    def accept(self, sequence: Sequence) -> None:
        self._sequence = sequence
        self._accepted.set()

    def reject(self, error: BaseException) -> None:
        """The request never joined the batch (bad input, or the loop failed first)."""
        if self._accepted.is_set():
            return
        self._add_error = error
        self.push(None, GenerationStatus.FAILED)
        self._accepted.set()

    def take_new(self) -> tuple[list[int], str]:
        """The output tokens and text produced since the last call."""
        ids = self._sequence.output_ids[self._published:]
        self._published += len(ids)
        text = "".join(self._text_parts)
        self._text_parts.clear()
        return ids, text

    def finish(self) -> GenerationStatus:
        """The sequence has finished: settle the final text and error; the status to publish."""
        seq = self._sequence
        self._final_text = final_text(seq, self._loop.decode)
        if seq.error:
            self._error = seq.error
            return GenerationStatus.FAILED
        return self._ended_by or GenerationStatus.FINISHED

    def fail(self, reason: str) -> None:
        """An error of the loop ended the request."""
        self._error = self._error or reason
        self.push(GenerationOutput([]), GenerationStatus.FAILED)

    def abort_published(self) -> None:
        """cancel()/stop() may return: the request's end is published."""
        self._abort_done.set()

    def push(self, out: GenerationOutput | None, status: GenerationStatus | None = None) -> None:
        with self._cond:
            if out is not None:
                self._outputs.append(out)
            if status is not None:
                self._status = status
            self._cond.notify_all()
            wakers = list(self._wakers)
        for wake in wakers:
            wake()
