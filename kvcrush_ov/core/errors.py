"""Exception types: every user-facing failure is one of these, with a one-line actionable message."""


class KVCrushError(Exception):
    """Base class of all kvcrush_ov errors. The CLI prints `error: <message>` and exits 2."""


class ModelError(KVCrushError):
    """The model directory is missing, incomplete, or not a decoder-only SDPA OpenVINO export."""


class ConfigError(KVCrushError, ValueError):
    """A configuration value is out of range or inconsistent with another one."""


class PromptError(KVCrushError, ValueError):
    """A prompt cannot be served: empty, not text, or longer than the model's context."""


class CacheCapacityError(KVCrushError):
    """The KV block pool cannot hold even one request; give a larger cache_size or num_kv_blocks."""
