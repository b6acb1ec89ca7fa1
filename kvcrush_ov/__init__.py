"""kvcrush-ov: KV-cache compression (KVCrush and baselines) for LLM inference on OpenVINO."""
from .core.config import GenerationConfig, SchedulerConfig
from .core.eviction_config import CacheEvictionConfig
from .core.errors import CacheCapacityError, ConfigError, KVCrushError, ModelError, PromptError
from .api.pipeline import DecodedResults, LLMPipeline, Tokenizer
from .api.continuous_batching import ContinuousBatchingPipeline, GenerationStatus  # noqa: E402 (after pipeline)

__version__ = "0.1.0"
__all__ = ["LLMPipeline", "ContinuousBatchingPipeline", "GenerationStatus", "GenerationConfig", "SchedulerConfig", "CacheEvictionConfig", "DecodedResults", "Tokenizer",
           "KVCrushError", "ModelError", "ConfigError", "PromptError", "CacheCapacityError"]
