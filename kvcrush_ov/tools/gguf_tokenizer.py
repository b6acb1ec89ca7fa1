"""Tokenizers from GGUF metadata: the checks that tell a working conversion from a broken one, and
rebuilders for the GGUF tokenizer kinds whose transformers conversion is broken.

transformers converts a GGUF's tokenizer when it loads the file; for some models that conversion is
wrong (SmolLM2: every space became ``<|endoftext|>``; Gemma 3: "capital" became c/ap/it/al, no BOS)
while for others (Qwen2.5) it is right. :func:`tokenizer_problems` measures a tokenizer against the
GGUF's own vocabulary; :func:`rebuild_tokenizer` builds one from the GGUF's tokens, merges/scores and
token types with the ``tokenizers`` library where this project knows the recipe.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..core.errors import ModelError

# A plain English sentence of common words, and a round-trip sample with spaces, digits, punctuation,
# accents, CJK, an emoji, tabs and newlines.
PLAIN_SENTENCE = "The capital of France is Paris, and the river that runs through it is the Seine."
ROUND_TRIP_TEXT = "Hello world!  It costs 12345 euros, naïve café — 東京 🙂\n\tdef f(x): return x * 2"
# A correct BPE tokenizer covers common English words with about one piece each (Qwen2.5, SmolLM2,
# Gemma 3: 18-19 pieces for the 16 words and 2 commas/periods above); the broken conversions above
# needed ~1.5x as many or more.
_MAX_PIECES_PER_WORD = 1.4
# llama.cpp byte-level pre-tokenizers this module can rebuild -> digits split one by one first.
# "smollm" is StarCoder's: every digit on its own, then GPT-2's regex on byte-level text (the
# vocabulary has no multi-digit token). No prefix space.
_BYTELEVEL_PRE = {"smollm": True}


def gguf_metadata(gguf_path: Path) -> Callable[[str], object]:
    """key -> the GGUF file's metadata value (a one-line ModelError when the key is missing)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_path))

    def field(key: str):
        f = reader.fields.get(key)
        if f is None:
            raise ModelError(f"{gguf_path.name} has no {key} metadata")
        return f.contents()

    return field


def _gguf_tokenizer_fields(gguf_path: Path) -> dict:
    field = gguf_metadata(gguf_path)

    return {
        "model": field("tokenizer.ggml.model"),
        "pre": field("tokenizer.ggml.pre"),
        "tokens": list(field("tokenizer.ggml.tokens")),
        "token_type": list(field("tokenizer.ggml.token_type")),
        "merges": list(field("tokenizer.ggml.merges")),
        "bos_token_id": int(field("tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(field("tokenizer.ggml.eos_token_id")),
        "unk_token_id": int(field("tokenizer.ggml.unknown_token_id")),
        "pad_token_id": int(field("tokenizer.ggml.padding_token_id")),
        "chat_template": field("tokenizer.chat_template"),
        "add_bos": bool(_optional(field, "tokenizer.ggml.add_bos_token", False)),
    }


def _optional(field: Callable[[str], object], key: str, default: object) -> object:
    try:
        return field(key)
    except ModelError:
        return default


def build_bytelevel_bpe_tokenizer(gguf_path: Path, model_max_length: int):
    """A GPT-2 style byte-level BPE tokenizer rebuilt from the GGUF metadata (transformers' conversion
    of SmolLM2's is broken), as a ``transformers.PreTrainedTokenizerFast`` with the chat template; no
    special tokens added by ``encode``. Only the llama.cpp pre-tokenizers in _BYTELEVEL_PRE are known.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    meta = _gguf_tokenizer_fields(gguf_path)
    if meta["model"] != "gpt2":
        raise ModelError(f"unexpected GGUF tokenizer model {meta['model']!r} (expected gpt2 byte-level BPE)")
    if meta["pre"] not in _BYTELEVEL_PRE:
        raise ModelError(f"{gguf_path.name}: no rebuilder for the byte-level BPE pre-tokenizer {meta['pre']!r} "
                         f"(known: {', '.join(_BYTELEVEL_PRE)})")
    tokens = meta["tokens"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    merges = [tuple(m.split(" ")) for m in meta["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            *([pre_tokenizers.Digits(individual_digits=True)] if _BYTELEVEL_PRE[meta["pre"]] else []),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    specials = [t for t, kind in zip(tokens, meta["token_type"]) if int(kind) == 3]  # 3 = CONTROL
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    for t in specials:
        if tok.token_to_id(t) != vocab[t]:
            raise ModelError(f"special token {t!r} got id {tok.token_to_id(t)}, GGUF says {vocab[t]}")

    named = {key: tokens[meta[f"{key}_id"]] for key in ("bos_token", "eos_token", "pad_token", "unk_token")}
    if meta["add_bos"]:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{named['bos_token']} $A", pair=f"{named['bos_token']} $A $B",
            special_tokens=[(named["bos_token"], meta["bos_token_id"])])
    # else no post-processor: encode() adds no bos/eos (SmolLM2); the chat template does.
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        **named,
        additional_special_tokens=[t for t in specials if t not in named.values()],
        chat_template=meta["chat_template"],
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )


def _sentencepiece_merges(tokens: list[str], scores: list[float], normal: list[bool]) -> list[tuple[str, str]]:
    """BPE merges of a SentencePiece BPE vocabulary: every normal piece that splits into two normal
    pieces gives a merge, ranked by the merged piece's score (higher first), then by its parts' ranks."""
    rank = {t: i for i, t in enumerate(tokens) if normal[i]}
    by_score = sorted(rank, key=lambda t: (-scores[rank[t]], rank[t]))
    merges = []
    for piece in by_score:
        splits = [(piece[:i], piece[i:]) for i in range(1, len(piece))]
        splits = [(a, b) for a, b in splits if a in rank and b in rank]
        merges.extend(sorted(splits, key=lambda ab: (rank[ab[0]], rank[ab[1]])))
    return merges


def build_sentencepiece_tokenizer(gguf_path: Path, model_max_length: int):
    """Gemma's SentencePiece-BPE tokenizer rebuilt from the GGUF's own vocabulary, scores and token types
    (transformers' conversion of it is broken: "capital" became c/ap/it/al and no BOS was added).

    Spaces become U+2581 (no dummy prefix, as the GGUF says), unknown bytes fall back to <0xNN> pieces,
    control (3) and user-defined (4) pieces are matched whole, and BOS is prepended as Gemma needs."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    field = gguf_metadata(gguf_path)

    if field("tokenizer.ggml.model") != "llama":
        raise ModelError(f"unexpected GGUF tokenizer model {field('tokenizer.ggml.model')!r} (expected SentencePiece)")
    tokens = list(field("tokenizer.ggml.tokens"))
    scores = [float(x) for x in field("tokenizer.ggml.scores")]
    types = [int(x) for x in field("tokenizer.ggml.token_type")]  # 1 normal 2 unk 3 control 4 user 5 unused 6 byte
    if field("tokenizer.ggml.add_space_prefix"):
        raise ModelError(f"{gguf_path.name} asks for a space prefix, which this Gemma tokenizer does not add")
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = _sentencepiece_merges(tokens, scores, [k == 1 for k in types])
    unk = tokens[int(field("tokenizer.ggml.unknown_token_id"))]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == 3])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == 4])
    bos = tokens[int(field("tokenizer.ggml.bos_token_id"))]
    if field("tokenizer.ggml.add_bos_token"):
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=tokens[int(field("tokenizer.ggml.eos_token_id"))],
        pad_token=tokens[int(field("tokenizer.ggml.padding_token_id"))],
        unk_token=unk,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
        add_bos_token=bool(field("tokenizer.ggml.add_bos_token")),
    )



def rebuild_tokenizer(gguf_path: Path, model_max_length: int):
    """The tokenizer of ``gguf_path`` rebuilt from its metadata, chat template included, for the kinds
    this module knows (byte-level BPE with a known pre-tokenizer; SentencePiece BPE without a space
    prefix, as Gemma's); a one-line ModelError for any other kind."""
    field = gguf_metadata(gguf_path)
    kind = field("tokenizer.ggml.model")
    if kind == "gpt2":
        tokenizer = build_bytelevel_bpe_tokenizer(gguf_path, model_max_length)
    elif kind == "llama":
        tokenizer = build_sentencepiece_tokenizer(gguf_path, model_max_length)
    else:
        raise ModelError(f"{gguf_path.name}: no rebuilder for GGUF tokenizer model {kind!r} "
                         f"(known: gpt2 byte-level BPE, llama SentencePiece BPE)")
    tokenizer.chat_template = _optional(field, "tokenizer.chat_template", None)  # None: a base model
    return tokenizer


def tokenizer_problems(tokenizer, gguf_path: Path) -> list[str]:
    """What is wrong with ``tokenizer`` for the GGUF model (empty when nothing): the round trip of
    ROUND_TRIP_TEXT; pieces and special tokens that are the GGUF's own at the same ids; common words in
    about one piece each; EOS as the GGUF names it; BOS prepended by ``encode`` iff the GGUF asks.
    (transformers 5.5 converts SmolLM2's GGUF with a BOS added and EOS = ``<|im_start|>``; older
    versions turned its spaces into ``<|endoftext|>``.)"""
    field = gguf_metadata(gguf_path)
    tokens = list(field("tokenizer.ggml.tokens"))
    problems = []
    ids = tokenizer.encode(ROUND_TRIP_TEXT, add_special_tokens=False)
    back = tokenizer.decode(ids, skip_special_tokens=False)
    if back != ROUND_TRIP_TEXT:
        problems.append(f"round trip gives {back[:60]!r}")
    specials = set(tokenizer.all_special_ids)
    if any(i in specials for i in ids):
        problems.append("plain text encodes to special tokens")
    foreign = [(i, t) for i, t in zip(ids + sorted(specials), tokenizer.convert_ids_to_tokens(ids + sorted(specials)))
               if not (0 <= i < len(tokens) and tokens[i] == t)]
    if foreign:
        problems.append(f"token {foreign[0][1]!r} (id {foreign[0][0]}) is not the GGUF's token at that id")
    words = len(PLAIN_SENTENCE.split())
    pieces = len(tokenizer.encode(PLAIN_SENTENCE, add_special_tokens=False))
    if pieces > _MAX_PIECES_PER_WORD * words:
        problems.append(f"common words split apart ({pieces} pieces for {words} words)")
    eos = int(field("tokenizer.ggml.eos_token_id"))
    if tokenizer.eos_token_id != eos:
        problems.append(f"EOS is {tokenizer.eos_token!r} ({tokenizer.eos_token_id}), the GGUF's is {tokens[eos]!r} ({eos})")
    wants_bos = bool(_optional(field, "tokenizer.ggml.add_bos_token", False))
    bos = _optional(field, "tokenizer.ggml.bos_token_id", None)
    first = (tokenizer.encode("Hello") or [None])[0]
    if wants_bos and first != bos:
        problems.append(f"the GGUF asks for BOS {bos} first, encode() starts with {first}")
    if not wants_bos and bos is not None and first == int(bos):
        problems.append(f"encode() prepends BOS {tokens[int(bos)]!r}, which the GGUF does not ask for")
    return problems
