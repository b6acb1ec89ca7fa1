"""kvcrush-ov: KV-cache compression (KVCrush and baselines) for LLM inference on OpenVINO."""
from .config import GenerationConfig, SchedulerConfig
from .eviction_config import CacheEvictionConfig
from .errors import CacheCapacityError, ConfigError, KVCrushError, ModelError, PromptError
from .pipeline import DecodedResults, LLMPipeline, Tokenizer
from .continuous_batching import ContinuousBatchingPipeline, GenerationStatus  # noqa: E402 (after pipeline)

__version__ = "0.1.0"
__all__ = ["LLMPipeline", "ContinuousBatchingPipeline", "GenerationStatus", "GenerationConfig", "SchedulerConfig", "CacheEvictionConfig", "DecodedResults", "Tokenizer",
           "KVCrushError", "ModelError", "ConfigError", "PromptError", "CacheCapacityError"]
