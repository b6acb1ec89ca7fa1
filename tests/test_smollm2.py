"""Model-level checks on SmolLM2-135M-Instruct (marker `model`): our engine against openvino-genai's
continuous batching on the same IR (token for token), and first-step logits against HF transformers."""
from __future__ import annotations

import functools
import inspect
import importlib

import numpy as np
import openvino as ov
import openvino_genai as ov_genai
import pytest

import kvcrush_ov
from kvcrush_ov.core.config import GenerationConfig, SchedulerConfig

pytestmark = pytest.mark.model

_MODULES = ["json", "argparse", "collections", "functools", "itertools", "pathlib", "subprocess", "threading",
            "typing", "unittest", "logging", "email", "http.client", "csv", "datetime", "decimal", "heapq",
            "inspect", "string", "textwrap"]
_QUESTIONS = ["Summarize the text above in one sentence.", "What is the main topic of the text above?",
              "Name one function mentioned above.", "Is the text above about cooking? Answer yes or no."]


def _document(module: str) -> str:
    mod = importlib.import_module(module)
    parts = [inspect.getdoc(mod) or ""]
    for name, obj in sorted(vars(mod).items()):
        if not name.startswith("_") and (inspect.isfunction(obj) or inspect.isclass(obj)):
            parts.append(f"{name}: {inspect.getdoc(obj) or ''}")
    return "\n\n".join(p for p in parts if p)


def prompts_for(tokenizer, n: int = 20, lo: int = 50, hi: int = 3000) -> list[list[int]]:
    """n chat-templated prompts whose lengths span lo..hi tokens, made of stdlib documentation."""
    targets = np.geomspace(lo, hi, n).astype(int)
    out = []
    for i, target in enumerate(targets):
        doc_ids = tokenizer.encode(_document(_MODULES[i % len(_MODULES)]), add_special_tokens=False)
        while len(doc_ids) < target:
            doc_ids = doc_ids + doc_ids
        doc = tokenizer.decode(doc_ids[:max(8, target - 40)])
        out.append(tokenizer.prepare(doc + "\n\n" + _QUESTIONS[i % len(_QUESTIONS)], True))
    return out


def native_outputs(model_dir, prompts, max_new_tokens: int) -> list[list[int]]:
    sc = ov_genai.SchedulerConfig()
    sc.cache_size = 2
    cb = ov_genai.ContinuousBatchingPipeline(str(model_dir), sc, "CPU")
    gc = ov_genai.GenerationConfig()
    gc.max_new_tokens = max_new_tokens
    gc.apply_chat_template = False
    res = cb.generate([ov.Tensor(np.array([p], dtype=np.int64)) for p in prompts], [gc] * len(prompts))
    return [list(r.m_generation_ids[0]) for r in res]


def test_greedy_matches_openvino_genai_token_for_token(smollm2_dir):
    pipe = kvcrush_ov.LLMPipeline(smollm2_dir, "CPU", scheduler_config=SchedulerConfig(cache_size=2))
    prompts = prompts_for(pipe.tokenizer)
    lengths = [len(p) for p in prompts]
    assert min(lengths) <= 60 and max(lengths) >= 2900, lengths
    cfg = pipe.get_generation_config().updated(max_new_tokens=24)
    ref = native_outputs(smollm2_dir, prompts, 24)
    batched = [s.output_ids for s in pipe.generate_ids(prompts, cfg)]
    mismatches = [(i, lengths[i]) for i in range(len(prompts)) if batched[i] != ref[i]]
    assert not mismatches, f"batched outputs differ from openvino-genai for (index, prompt length) {mismatches}"
    for i in (0, 9, 19):  # single requests, short to long, against openvino-genai run the same way (a
        # request alone is chunked differently from one in a batch, which moves bf16 results by an ulp)
        single = native_outputs(smollm2_dir, [prompts[i]], 24)[0]
        assert pipe.generate_ids([prompts[i]], cfg)[0].output_ids == single, f"single prompt {i} ({lengths[i]} tokens)"
    assert pipe.engine.blocks.num_used_blocks == 0


@functools.lru_cache(maxsize=1)
def _stateful_model(model_dir) -> ov.CompiledModel:
    return ov.Core().compile_model(str(model_dir / "openvino_model.xml"), "CPU", _F32)


def _stateful_last_logits(model_dir, ids: list[int]) -> np.ndarray:
    """The exported stateful model itself (no paging), f32: isolates the engine from the export."""
    n = len(ids)
    req = _stateful_model(model_dir).create_infer_request()
    req.infer({"input_ids": np.array([ids]), "attention_mask": np.ones((1, n), np.int64),
               "position_ids": np.arange(n)[None], "beam_idx": np.zeros(1, np.int32)})
    return req.get_tensor("logits").data[0, -1].astype(np.float64)


_F32 = {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": ov.Type.f32}


def test_first_step_logits_match_hf_transformers(smollm2_dir):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from kvcrush_ov.tools.models import hf_dir
    from kvcrush_ov.core.engine.llm_engine import LLMEngine

    # The IR holds fp16-rounded weights (--weight-format fp16); the reference uses the same weights
    # and both compute in f32, so what is measured is computation, not the export's rounding.
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir("smollm2-135m"), dtype=torch.float32)
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(p.half().float())
    hf.eval()
    engine = LLMEngine(smollm2_dir, "CPU", SchedulerConfig(cache_size=0.5, max_num_batched_tokens=4096), _F32)
    tok = kvcrush_ov.Tokenizer(smollm2_dir)
    texts = ["What is the capital of France?", "Write a short poem about the sea.", "2 + 2 =",
             _document("heapq")[:1500], _document("json")[:1200], _document("json")[:3000]]
    vs_hf, vs_stateful = [], []
    for text in texts:
        ids = tok.prepare(text, True)
        seq = engine.add_request(ids, GenerationConfig(max_new_tokens=1))
        ours = engine.runner.run(engine.scheduler.schedule().chunks, engine.blocks)[0].astype(np.float64)
        engine.abort(seq.seq_id)
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0, -1].double().numpy()
        vs_hf.append((len(ids), float(np.abs(ours - ref).max())))
        vs_stateful.append((len(ids), float(np.abs(ours - _stateful_last_logits(smollm2_dir, ids)).max())))
    # The paged engine reproduces the exported model itself almost exactly at every length ...
    assert max(d for _, d in vs_stateful) <= 1e-3, vs_stateful
    # ... and HF within 1e-2 on the five prompts up to ~500 tokens. Past that, the EXPORT (stateful
    # OpenVINO model, no engine involved) drifts from HF: 1.9e-2 at 1k tokens, measured and kept visible.
    short = [(n, d) for n, d in vs_hf if n <= 600]
    assert len(short) >= 5 and max(d for _, d in short) <= 1e-2, vs_hf
