"""When a request stops (EOS, stop tokens, stop strings, length), what its streamer is handed, and the
ids and text its caller is given at the end."""
from __future__ import annotations

from typing import Callable

from .sequence import FinishReason, Sequence

# Detokenizes one sequence's ids. When it is a bound method of an object that also has
# decode_batch(list of id lists) -> list of texts (the pipeline's Tokenizer), that is called instead,
# once per step for every sequence that needs its text: the detokenizer's cost is mostly per call.
Decode = Callable[[list[int]], str]


def decode_many(decode: Decode, ids: list[list[int]]) -> list[str]:
    """Texts of several id lists: one batched call if `decode` offers one, else one call each."""
    batch = getattr(getattr(decode, "__self__", None), "decode_batch", None)
    if batch is not None:
        return list(batch(ids))
    return [decode(i) for i in ids]


def after_tokens(seqs: list[Sequence], decode: Decode | None) -> None:
    """Every sequence of the step has its new token: detokenize those that stream or watch stop strings
    (one call for all), then check each one's stops and feed its streamer, in order."""
    wants = [s for s in seqs if s.streamer is not None or s.config.stop_strings] if decode is not None else []
    texts = dict(zip(map(id, wants), decode_many(decode, [s.output_ids for s in wants]))) if wants else {}
    for seq in seqs:
        if seq.is_finished:  # e.g. aborted while another request's streamer ran
            continue
        text = texts.get(id(seq))
        check_stop(seq, seq.token_ids[-1], text)
        stream(seq, text)


def check_stop(seq: Sequence, token: int, text: str | None) -> None:
    """Finish the sequence on EOS / a stop token (after min_new_tokens), a stop string, or its length.
    text: the whole output detokenized (None: not known, stop strings are not checked)."""
    cfg = seq.config
    if not cfg.ignore_eos and (token in seq.eos_token_ids or token in cfg.stop_token_ids) \
            and seq.num_generated >= cfg.min_new_tokens:
        seq.finish(FinishReason.STOP)
    elif cfg.stop_strings and text is not None:
        seq.text = text
        tail = seq.text[max(0, seq.streamed_chars - max(map(len, cfg.stop_strings))):]
        hits = [(tail.find(s), s) for s in cfg.stop_strings if s in tail]
        if hits:
            pos, stop = min(hits)
            cut = len(seq.text) - len(tail) + pos
            seq.text = seq.text[:cut + (len(stop) if cfg.include_stop_str_in_output else 0)]
            seq.finish(FinishReason.STOP)
    if not seq.is_finished and seq.num_generated >= cfg.max_new_tokens:
        seq.finish(FinishReason.LENGTH)


def stream(seq: Sequence, text: str | None) -> None:
    """Hand the streamer the new, complete text (held back: a partial UTF-8 character or what could start
    a stop string); a broken streamer ends only its own request. text: the whole output detokenized."""
    if seq.streamer is None or text is None:
        return
    if not (seq.is_finished and seq.config.stop_strings and seq.finish_reason is FinishReason.STOP):
        seq.text = text  # else check_stop has cut it at the stop string
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
