"""Build plumbing shared by every model recipe: the cache layout, atomic builds with a completion
marker, progress lines on stderr, and the OpenVINO export exactly as ``optimum-cli export openvino``
runs it (kvcrush_ov.tools.models and kvcrush_ov.tools.gguf_models build through it).

Every build happens in a temporary sibling directory; a completion marker is written last and the
directory is then renamed into place, so an interrupted build is redone.
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

from ..core.errors import KVCrushError, ModelError

MARKER = "kvcrush_ov_build.json"  # written last inside a finished build directory
# Version of the build recipes, kept in every marker: bump it whenever a change here would change
# what a build produces, and every cached build is redone once.
RECIPE = 1
_TASK = "text-generation-with-past"
# Extra optimum-cli flags per weight format. The CLI's int4 default (group size 128) fails on both
# models: NNCF refuses group-wise quantization of a 576-wide (SmolLM2) or 64-wide (tiny-llama) input
# channel; every input width of both is a multiple of 64.
_CLI_EXTRA_ARGS = {"int4": ("--group-size", "64")}


def default_cache_dir() -> Path:
    """``$KVCRUSH_OV_HOME`` if set, else ``~/.cache/kvcrush-ov``."""
    env = os.environ.get("KVCRUSH_OV_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kvcrush-ov"



def is_prepared(path: Path) -> bool:
    """True when ``path`` is a finished build of the current recipe (its completion marker says so)."""
    try:
        info = json.loads((Path(path) / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and info.get("recipe") == RECIPE



def status(msg: str) -> None:
    print(f"[kvcrush-ov] {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def step(what: str) -> Iterator[None]:
    status(f"{what} ...")
    t0 = time.perf_counter()
    yield
    status(f"{what}: done in {time.perf_counter() - t0:.1f} s")


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


def build_atomically(out: Path, build: Callable[[Path], dict], label: str, force: bool = False) -> None:
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
            status(f"{label}: another process finished it first; keeping that build")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    status(f"{label}: built in {time.perf_counter() - t0:.1f} s -> {out}")


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for pkg in ("openvino", "openvino-tokenizers", "optimum-intel", "nncf", "transformers", "torch"):
        try:
            found[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return found


def require_prepare_extra() -> None:
    missing = [
        mod
        for mod in ("torch", "transformers", "optimum.intel", "nncf", "gguf", "accelerate", "tokenizers", "openvino_tokenizers")
        if importlib.util.find_spec(mod.split(".")[0]) is None
    ]
    if missing:
        raise ModelError(
            f"building model IR needs {', '.join(missing)}: install the `prepare` extra (pip install 'kvcrush-ov[prepare]')"
        )



def special_ids(tokenizer) -> dict:
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }



def generation_config(ids: dict):
    from transformers import GenerationConfig

    return GenerationConfig(**ids)



def _cli_args(src: Path, out: Path, weight_format: str) -> list[str]:
    return [
        "--model", str(src), "--task", _TASK, "--weight-format", weight_format,
        *_CLI_EXTRA_ARGS.get(weight_format, ()), str(out),
    ]  # fmt: skip


def export_openvino(src: Path, out: Path, weight_format: str, label: str) -> list[str]:
    """Run ``optimum-cli export openvino <_cli_args>`` in-process, through the CLI's own argument
    parser and command object (so int8/int4 get the CLI's NNCF weight-compression defaults), and
    return the argument list."""
    require_prepare_extra()
    from argparse import ArgumentParser

    from optimum.commands.export.openvino import OVExportCommand, parse_args_openvino

    argv = _cli_args(src, out, weight_format)
    parser = ArgumentParser("optimum-cli export openvino")
    parse_args_openvino(parser)
    command = OVExportCommand(None, parser.parse_args(argv), from_defaults_factory=True, parser=parser)
    with step(f"{label}: optimum-cli export openvino {' '.join(argv[4:-1])}"), _gemma_version_cap_lifted():
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

