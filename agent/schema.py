"""Turn raw TOML tables into frozen dataclasses, once, at the boundary.

Every config section, step parameter set and model manifest is a frozen
dataclass; `build()` checks a raw table against its fields: unknown keys,
missing required keys and wrong types are `ConfigError`s that name the key
and where it came from. Nothing past this module handles raw dicts.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

from agent.errors import ConfigError

T = TypeVar("T")

_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "K": 2**10, "M": 2**20, "G": 2**30}
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_size(value: object, where: str) -> int:
    """Parse `256MB`, `1GiB`, `512M` or a plain integer into bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+)(?:\.(\d+))?\s*([A-Za-z]*)\s*", value)
        if m and m.group(3).upper() in _SIZE_UNITS:
            unit = _SIZE_UNITS[m.group(3).upper()]
            frac = m.group(2) or ""
            # Exact integer arithmetic: a float would round sizes above 2**53.
            return (int(m.group(1)) * unit) + (int(frac) * unit // 10 ** len(frac) if frac else 0)
    raise ConfigError(f"{where}: expected a size like 256MB or 1GiB, got {value!r}")


def parse_duration(value: object, where: str) -> float:
    """Parse `1h`, `30s`, `250ms` or a plain number of seconds."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ConfigError(f"{where}: expected a duration like 30s or 1h, got {value!r}")
        return float(value)
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*", value)
        if m:
            return float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    raise ConfigError(f"{where}: expected a duration like 30s or 1h, got {value!r}")


class Size(int):
    """A byte count; accepts `256MB` in config."""


class Duration(float):
    """Seconds; accepts `1h` in config."""


class Seconds(int):
    """Whole seconds (what MQTT's keep alive counts in); accepts `30s` and `1m` in config."""


def parse_seconds(value: object, where: str) -> int:
    """A duration that is a whole number of seconds: `30s`, `2m`, `45`."""
    seconds = parse_duration(value, where)
    if seconds != int(seconds):
        raise ConfigError(f"{where}: expected whole seconds, got {value!r}")
    return int(seconds)


SECRET_KEYS = frozenset({"password"})  # their values are never echoed in an error


def build(cls: type[T], raw: object, where: str) -> T:
    """Validate `raw` against dataclass `cls`; `where` names the file and table.

    A `__post_init__` refusal becomes a ConfigError; worded `"key: why"` it names that key.
    """
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected a table, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(fields))})"
        )
    values: dict[str, Any] = {}
    for name, f in fields.items():
        if name in raw:
            try:
                values[name] = convert(hints[name], raw[name], f"{where}.{name}")
            except ConfigError:
                if name not in SECRET_KEYS:
                    raise
                raise ConfigError(f"{where}.{name}: expected a string") from None
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}: missing required key {name!r}")
    try:
        return cls(**values)
    except (ValueError, TypeError, KeyError, IndexError) as exc:  # a __post_init__ refused it
        # A refusal worded "key: why" names its key, like the errors above.
        key, sep, why = str(exc).partition(": ")
        if sep and key.partition("[")[0] in fields:  # "url[1]: why" names an item
            raise ConfigError(f"{where}.{key}: {why}") from exc
        raise ConfigError(f"{where}: {exc}") from exc


def convert(tp: Any, value: object, where: str) -> Any:
    """Check and convert one value to type `tp` (the subset of types configs use)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        errors = []
        for arg in get_args(tp):
            if arg is type(None):
                if value is None:
                    return None
                continue
            try:
                return convert(arg, value, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: bad value {value!r}")
    if origin is Literal:
        if value not in get_args(tp):
            options = ", ".join(repr(a) for a in get_args(tp))
            raise ConfigError(f"{where}: expected one of {options}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
        pairs = enumerate(zip(args, value, strict=True))
        return tuple(convert(a, v, f"{where}[{i}]") for i, (a, v) in pairs)
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a table, got {type(value).__name__}")
        return dict(value)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return build(tp, value, where)
    if tp is Size:
        return Size(parse_size(value, where))
    if tp is Duration:
        return Duration(parse_duration(value, where))
    if tp is Seconds:
        return Seconds(parse_seconds(value, where))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float) \
                or not math.isfinite(value):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {tp!r}")  # a schema bug, not a user error


def to_dict(obj: object) -> Any:
    """The inverse of `build`, for printing the effective config."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple | list):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Mapping):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj
