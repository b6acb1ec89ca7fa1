"""`--model DIR` on something kvcrush-ov cannot serve gets one line naming what is missing (must-have 4
of the architecture issue): an encoder-only export, an LLM exported without its KV cache, a stateful
model whose state is not attention (what openvino-genai's continuous batching cannot page either)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import openvino as ov
import openvino.opset13 as ops
import pytest

from kvcrush_ov import cli
from kvcrush_ov.core.engine.model_runner import ModelRunner
from kvcrush_ov.core.errors import ModelError
from kvcrush_ov.tools.models import hf_dir

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def _export(tmp: Path, name: str, config, model_class: str, task: str) -> Path:
    src, out = tmp / f"{name}-hf", tmp / name
    torch.manual_seed(0)
    getattr(transformers, model_class)(config).save_pretrained(src)
    for f in TOKENIZER_FILES:
        if (hf_dir("tiny-llama") / f).is_file():
            shutil.copy(hf_dir("tiny-llama") / f, src / f)
    from argparse import ArgumentParser

    from optimum.commands.export.openvino import OVExportCommand, parse_args_openvino

    parser = ArgumentParser()
    parse_args_openvino(parser)
    argv = ["--model", str(src), "--task", task, "--weight-format", "fp32", str(out)]
    OVExportCommand(None, parser.parse_args(argv), from_defaults_factory=True, parser=parser).run()
    return out


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("unsupported")
    small = dict(vocab_size=49152, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    bert = _export(tmp, "bert", transformers.BertConfig(**small), "BertForMaskedLM", "fill-mask")
    no_past = _export(tmp, "llama-no-past", transformers.LlamaConfig(num_key_value_heads=2, **small),
                      "LlamaForCausalLM", "text-generation")
    return {"bert": bert, "no-past": no_past, "recurrent": _recurrent(tmp / "recurrent", no_past)}


def _recurrent(out: Path, like: Path) -> Path:
    """A stateful OpenVINO model whose state is a running sum (no attention): what a recurrent/SSM LM
    looks like to the paged transformation. Tokenizers and config copied from a real export."""
    shutil.copytree(like, out)
    ids = ops.parameter([-1, -1], ov.Type.i64, name="input_ids")
    emb = ops.gather(ops.constant(np.ones((49152, 8), np.float32)), ids, ops.constant(0))
    info = ov.op.util.VariableInfo()
    info.data_shape, info.data_type, info.variable_id = ov.PartialShape([-1, 8]), ov.Type.f32, "state"
    var = ov.op.util.Variable(info)
    state = ops.read_value(ops.constant(np.zeros((1, 8), np.float32)), var)
    new = ops.add(state, ops.reduce_sum(emb, ops.constant([1]), False))
    logits = ops.matmul(ops.unsqueeze(new, ops.constant([1])), ops.constant(np.ones((8, 49152), np.float32)), False, False)
    result = ops.result(logits)
    result.output(0).get_tensor().set_names({"logits"})
    model = ov.Model([result], [ops.assign(new, var)], [ids], "recurrent")
    ov.save_model(model, out / "openvino_model.xml")
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "model_type": "toy-rnn"}))
    return out


@pytest.mark.parametrize("kind, message", [
    ("bert", r"holds BertForMaskedLM \(bert\), an encoder or base model without a causal LM head"),
    ("no-past", r"\(llama\) has no KV-cache state \(exported without past\); re-export it with .*text-generation-with-past"),
    ("recurrent", r"\(toy-rnn\) has no ScaledDotProductAttention op: .*cannot be paged"),
])
def test_unsupported_model_is_one_line_model_error(exports, kind, message, capsys):
    with pytest.raises(ModelError, match=message) as info:
        ModelRunner(exports[kind])
    assert "\n" not in str(info.value)
    assert cli.main(["generate", "--model", str(exports[kind]), "--prompt", "hi", "--max-new-tokens", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(exports[kind]) in err[0], err
