"""One parser for policy options written as text, shared by the CLI, the eval and the server.

Three spellings, one value rule:
    KEY=VALUE                       --policy-option window=8
    POLICY.KEY=VALUE                kvcrush-ov eval --policy-option kvcrush.anchors=mean
    NAME:KEY=VALUE;KEY=VALUE        an eval variant, kvcrush:representative_fraction=0.1;anchors=alternate
Values: true/false (any case) -> bool, then int, then float, else the text itself.
"""
from __future__ import annotations

from typing import Iterable

from .errors import ConfigError

OptionValue = bool | int | float | str


def parse_value(text: str) -> OptionValue:
    """'true'/'false' -> bool, '8' -> 8, '0.25' -> 0.25, anything else stays a string."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _split(item: str, spelling: str) -> tuple[str, OptionValue]:
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"policy option {item!r} must be written {spelling}")
    return key, parse_value(value.strip())


def parse_options(items: Iterable[str]) -> dict[str, OptionValue]:
    """['window=8', 'pool=max'] -> {'window': 8, 'pool': 'max'}."""
    return dict(_split(item, "KEY=VALUE (e.g. window=8)") for item in items)


def parse_qualified_options(items: Iterable[str]) -> dict[str, dict[str, OptionValue]]:
    """['kvcrush.anchors=mean', 'snapkv.window=16'] -> {'kvcrush': {'anchors': 'mean'}, 'snapkv': {...}}."""
    out: dict[str, dict[str, OptionValue]] = {}
    for item in items:
        key, value = _split(item, "POLICY.KEY=VALUE (e.g. kvcrush.anchors=mean)")
        policy, dot, name = key.partition(".")
        if not (dot and policy and name):
            raise ConfigError(f"policy option {item!r} must be written POLICY.KEY=VALUE (e.g. kvcrush.anchors=mean)")
        out.setdefault(policy, {})[name] = value
    return out


def parse_policy_spec(spec: str) -> tuple[str, dict[str, OptionValue]]:
    """'kvcrush' -> ('kvcrush', {}); 'kvcrush:anchors=alternate;seed=1' -> ('kvcrush', {...})."""
    name, _, rest = spec.partition(":")
    items = [item for item in rest.split(";") if item.strip()]
    return name.strip(), dict(_split(item, f"NAME:KEY=VALUE;KEY=VALUE (in {spec!r})") for item in items)
