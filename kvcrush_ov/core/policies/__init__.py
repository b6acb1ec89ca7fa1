"""KV-cache eviction policies, pure numpy: the engine hands a policy an `AttentionStats` and a budget
and gets back a bool keep-mask [layers, kv_heads, tokens].

    from kvcrush_ov.core.policies import make_policy, AttentionStats
    policy = make_policy("kvcrush", base="snapkv", window=8, representative_fraction=0.25)
    keep = policy.keep_mask(AttentionStats(scores, num_kv_heads=3), budget=1024)
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from kvcrush_ov.core.errors import ConfigError
from kvcrush_ov.core.policies.base import AttentionStats, Policy
from kvcrush_ov.core.policies.full import FullCache
from kvcrush_ov.core.policies.h2o import H2O
from kvcrush_ov.core.policies.kvcrush import NOT_KVCRUSH_BASES, KVCrush, KVCrushConfig
from kvcrush_ov.core.policies.kvcrush_block import KVCrushBlock
from kvcrush_ov.core.policies.pyramidkv import PyramidKV
from kvcrush_ov.core.policies.snapkv import SnapKV
from kvcrush_ov.core.policies.streaming import StreamingLLM

POLICIES: dict[str, type[Policy]] = {
    cls.name: cls for cls in (FullCache, StreamingLLM, H2O, SnapKV, PyramidKV, KVCrush, KVCrushBlock)
}
KVCRUSH_BASES = tuple(name for name in POLICIES if name not in NOT_KVCRUSH_BASES)  # streaming, h2o, snapkv, pyramidkv


def _options(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in fields(cls) if f.init)


def _build(name: str, kwargs: dict[str, Any]) -> Policy:
    cls = POLICIES[name]
    allowed = _options(cls)
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join(map(repr, unknown))} for policy {name!r}; "
                          f"allowed: {', '.join(allowed) or 'none'}")
    return cls(**kwargs)


def make_policy(name: str, **kwargs: Any) -> Policy:
    """Build a policy by registry name with its options as keywords.

    kvcrush takes `base` (a name from KVCRUSH_BASES or a Policy; default "snapkv"), the
    KVCrushConfig options (or `config=`), and passes every other keyword to its base."""
    if name not in POLICIES:
        raise ConfigError(f"unknown policy {name!r}; choose one of: {', '.join(POLICIES)}")
    if name != KVCrush.name:
        return _build(name, kwargs)
    base = kwargs.pop("base", SnapKV.name)
    cfg_names = set(KVCrush.config_fields())
    cfg_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in cfg_names}
    config = kwargs.pop("config", None)
    if config is not None and cfg_kwargs:
        raise ConfigError(f"kvcrush: give either config= or the options "
                          f"{', '.join(sorted(cfg_kwargs))}, not both")
    config = config if config is not None else KVCrushConfig(**cfg_kwargs)
    if isinstance(base, Policy):
        if kwargs:
            raise ConfigError(f"kvcrush: options {', '.join(sorted(kwargs))} cannot be applied to a base "
                              f"policy instance; set them on the instance or pass base by name")
    elif base in KVCRUSH_BASES:
        base = _build(base, kwargs)
    else:
        raise ConfigError(f"kvcrush.base must be one of {', '.join(KVCRUSH_BASES)} or a Policy, got {base!r}")
    return KVCrush(base=base, config=config)


__all__ = [
    "AttentionStats", "Policy", "FullCache", "StreamingLLM", "H2O", "SnapKV", "PyramidKV", "KVCrush",
    "KVCrushConfig", "KVCrushBlock", "POLICIES", "KVCRUSH_BASES", "make_policy",
]
