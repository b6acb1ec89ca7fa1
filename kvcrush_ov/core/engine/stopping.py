"""When a request stops (EOS, stop tokens, stop strings, length), what its streamer is handed, and the
ids and text its caller is given at the end."""
from __future__ import annotations

from typing import Callable

from .sequence import FinishReason, Sequence

Decode = Callable[[list[int]], str]


def check_stop(seq: Sequence, token: int, decode: Decode | None) -> None:
    """Finish the sequence on EOS / a stop token (after min_new_tokens), a stop string, or its length."""
    cfg = seq.config
    if not cfg.ignore_eos and (token in seq.eos_token_ids or token in cfg.stop_token_ids) \
            and seq.num_generated >= cfg.min_new_tokens:
        seq.finish(FinishReason.STOP)
    elif cfg.stop_strings and decode is not None:
        seq.text = decode(seq.output_ids)
        tail = seq.text[max(0, seq.streamed_chars - max(map(len, cfg.stop_strings))):]
        hits = [(tail.find(s), s) for s in cfg.stop_strings if s in tail]
        if hits:
            pos, stop = min(hits)
            cut = len(seq.text) - len(tail) + pos
            seq.text = seq.text[:cut + (len(stop) if cfg.include_stop_str_in_output else 0)]
            seq.finish(FinishReason.STOP)
    if not seq.is_finished and seq.num_generated >= cfg.max_new_tokens:
        seq.finish(FinishReason.LENGTH)


def stream(seq: Sequence, decode: Decode | None) -> None:
    """Hand the streamer the new, complete text (held back: a partial UTF-8 character or what could start
    a stop string); a broken streamer ends only its own request."""
    if seq.streamer is None or decode is None:
        return
    if not (seq.is_finished and seq.config.stop_strings and seq.finish_reason is FinishReason.STOP):
        seq.text = decode(seq.output_ids)
    text = seq.text
    end = len(text)
    if not seq.is_finished:
        if text.endswith("\ufffd"):
            return  # an incomplete UTF-8 character: wait for the next token
        if seq.config.stop_strings:  # hold back what could be the start of a stop string
            end = max(seq.streamed_chars, end - max(map(len, seq.config.stop_strings)) + 1)
    piece = text[seq.streamed_chars:end]
    if not piece:
        return
    seq.streamed_chars = end
    try:
        status = seq.streamer(piece)
    except Exception as e:  # a broken streamer only ends its own request
        seq.finish(FinishReason.ABORT, error=f"streamer raised {type(e).__name__}: {e}")
        return
    if status is True or getattr(status, "name", "") in ("STOP", "CANCEL"):
        seq.finish(FinishReason.ABORT if getattr(status, "name", "") == "CANCEL" else FinishReason.STOP)


def visible_ids(output_ids: list[int], finish_reason: FinishReason | None, eos_token_ids: frozenset[int]) -> list[int]:
    """The generated ids a caller is given: without the EOS that ended the request (an EOS that did not
    end it, e.g. under ignore_eos, stays)."""
    if finish_reason is FinishReason.STOP and output_ids and output_ids[-1] in eos_token_ids:
        return output_ids[:-1]
    return output_ids


def final_text(seq: Sequence, decode: Decode) -> str:
    """A finished sequence's text: cut at its stop string when one ended it, else its visible ids decoded."""
    if seq.finish_reason is FinishReason.STOP and seq.config.stop_strings and seq.text:
        return seq.text
    return decode(visible_ids(seq.output_ids, seq.finish_reason, seq.eos_token_ids))
