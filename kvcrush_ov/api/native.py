"""The native anchor: openvino_genai's own continuous-batching pipeline, with its own eviction.

`LLMPipeline(..., backend="native")` delegates here, so one script can run both engines. Our configs
are translated to openvino_genai's; its eviction is block-level (32 tokens on CPU), head-summed, and
its KVCrush blocks sit ON TOP of max_cache_size — the translation keeps total KV tokens equal.
"""
from __future__ import annotations

from typing import Any

import openvino_genai as ov_genai

from ..core.config import GenerationConfig, SchedulerConfig
from ..core.errors import ConfigError
from ..core.eviction_config import CacheEvictionConfig
from ..core.policies import defaults

NATIVE_POLICIES = ("snapkv", "h2o", "kvcrush-block")
_ANCHORS = {"random": "RANDOM", "zeros": "ZEROS", "ones": "ONES", "mean": "MEAN", "alternate": "ALTERNATE"}


def _round_down(n: int, block: int) -> int:
    return max(block, n - n % block)


def to_native_eviction(config: CacheEvictionConfig, block_size: int = 32) -> ov_genai.CacheEvictionConfig:
    """Our budget (total KV tokens per sequence per layer) -> openvino_genai's sizes (block multiples)."""
    if not isinstance(config.policy, str) or config.policy not in NATIVE_POLICIES:
        raise ConfigError(f"openvino_genai natively offers only {', '.join(NATIVE_POLICIES)}; "
                          f"policy {config.policy!r} runs on backend='ours'")
    o = config.options
    start = _round_down(int(o.get("sink_tokens", defaults.SINK_TOKENS)), block_size)
    recent = _round_down(int(o.get("recent_tokens", defaults.RECENT_TOKENS)), block_size)
    total = _round_down(config.budget, block_size)
    # Small budgets: shrink the protected windows (block by block) before giving up, as a user would.
    while total <= start + recent and recent > block_size:
        recent -= block_size
    while total <= start + recent and start > block_size:
        start -= block_size
    crush_blocks = 0
    if config.policy == "kvcrush-block":
        # the split rule of our kvcrush/kvcrush-block: a fraction of the selectable part (minus start/recent)
        fraction = float(o.get("representative_fraction", 0.25))
        given = o.get("budget_blocks")
        crush_blocks = int(given) if given is not None else int(fraction * (total - start - recent) / block_size + 1e-9)
        crush_blocks = max(0, min(crush_blocks, (total - start - recent) // block_size - 1))
    max_size = total - crush_blocks * block_size
    if max_size <= start + recent:
        raise ConfigError(f"budget {config.budget} leaves no evictable room natively (max_cache_size {max_size} "
                          f"<= start {start} + recent {recent}); raise the budget")
    mode = ov_genai.AggregationMode.NORM_SUM
    native = ov_genai.CacheEvictionConfig(start, recent, max_size, mode)
    native.snapkv_window_size = int(o.get("window", defaults.SNAPKV_WINDOW)) if config.policy != "h2o" else 0
    if crush_blocks:
        anchor = getattr(ov_genai.KVCrushAnchorPointMode, _ANCHORS.get(str(o.get("anchor", "mean")), "MEAN"))
        native.kvcrush_config = ov_genai.KVCrushConfig(crush_blocks, anchor, int(o.get("seed", 0)))
    return native


def to_native_scheduler(config: SchedulerConfig, block_size: int = 32) -> ov_genai.SchedulerConfig:
    sc = ov_genai.SchedulerConfig()
    sc.cache_size = max(1, int(round(config.cache_size))) if not config.num_kv_blocks else 0
    sc.num_kv_blocks = config.num_kv_blocks
    sc.max_num_batched_tokens = config.max_num_batched_tokens
    sc.max_num_seqs = config.max_num_seqs
    eviction = CacheEvictionConfig.from_any(config.cache_eviction_config, block_size)
    if eviction is not None:
        sc.use_cache_eviction = True
        sc.cache_eviction_config = to_native_eviction(eviction, block_size)
    return sc


def to_native_generation(config: GenerationConfig) -> ov_genai.GenerationConfig:
    gc = ov_genai.GenerationConfig()
    gc.max_new_tokens = config.max_new_tokens
    gc.min_new_tokens = config.min_new_tokens
    gc.do_sample = config.do_sample
    gc.temperature = config.temperature
    if config.top_k:
        gc.top_k = config.top_k
    gc.top_p = config.top_p
    gc.rng_seed = config.rng_seed
    if config.eos_token_id >= 0:
        gc.eos_token_id = config.eos_token_id
    gc.stop_token_ids = set(config.stop_token_ids)
    gc.stop_strings = set(config.stop_strings)
    gc.include_stop_str_in_output = config.include_stop_str_in_output
    gc.ignore_eos = config.ignore_eos
    gc.apply_chat_template = config.apply_chat_template
    return gc


def native_pipeline(models_path: str, device: str, config: SchedulerConfig, properties: dict[str, Any]) -> ov_genai.LLMPipeline:
    props = dict(properties)
    if config.kv_cache_precision:
        props.setdefault("KV_CACHE_PRECISION", config.kv_cache_precision)
    return ov_genai.LLMPipeline(str(models_path), device, scheduler_config=to_native_scheduler(config), **props)
