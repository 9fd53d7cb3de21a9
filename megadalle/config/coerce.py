"""Plain dicts (YAML, overrides, checkpoints) -> validated dataclasses, with messages that name
the key and what is wrong."""

from __future__ import annotations

import copy
import dataclasses
import math
import typing
from pathlib import Path
from typing import Any

import yaml

from megadalle.errors import ConfigError


def read_yaml(path: str | Path, what: str = "config file", expect: str = "a mapping of sections",
              empty_ok: bool = True) -> dict[str, Any]:
    """The mapping a YAML file holds (safe_load: no tags that build objects); ConfigError naming
    `what` and the file when it is missing, not YAML, or not a mapping (`expect` says what it should
    hold)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{what} {path} is not valid YAML: {e}") from None
    if data is None and empty_ok:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} must hold {expect}, not {type(data).__name__}")
    return data


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def merge(dst: dict[str, Any], src: dict[str, Any], cls: type, prefix: str) -> None:
    types = _field_types(cls)
    for key, value in src.items():
        name = f"{prefix}{key}"
        if key not in types:
            raise ConfigError(f"unknown config key {name!r}; known keys here: {', '.join(types)}")
        sub = types[key]
        if dataclasses.is_dataclass(sub):
            if not isinstance(value, dict):
                raise ConfigError(f"{name} is a section; give it a mapping, not {value!r}")
            merge(dst[key], value, sub, name + ".")
        else:
            dst[key] = copy.deepcopy(value)


def set_dotted(d: dict[str, Any], key: str, value: Any, cls: type) -> None:
    parts = key.split(".")
    nested: Any = value
    for p in reversed(parts):
        nested = {p: nested}
    merge(d, nested, cls, "")


def _coerce(value: Any, typ: Any, name: str) -> Any:
    origin = typing.get_origin(typ)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        try:
            f = float(value)
        except ValueError:
            raise ConfigError(f"{name} must be an integer, got {value!r}") from None
        if not math.isfinite(f) or f != int(f):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        return int(f)
    if typ is float:
        if isinstance(value, bool):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name} must be a number, got {value!r}") from None
    if typ is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{name} must be a string, got {value!r}")
        return "" if value is None else str(value)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        (inner, *_) = typing.get_args(typ) or (Any,)
        return type(value)(_coerce(v, inner, name) for v in value) if inner is not Any else value
    return value


def build_dataclass(cls: type, d: dict[str, Any], prefix: str) -> Any:
    if not isinstance(d, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping")
    types = _field_types(cls)
    unknown = set(d) - set(types)
    if unknown:
        raise ConfigError(f"unknown config key(s) {sorted(prefix + u for u in unknown)}; "
                          f"known keys here: {', '.join(types)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in d:
            continue
        typ = types[f.name]
        name = prefix + f.name
        if dataclasses.is_dataclass(typ):
            kwargs[f.name] = build_dataclass(typ, d[f.name], name + ".")
        else:
            kwargs[f.name] = _coerce(d[f.name], typ, name)
    return cls(**kwargs)
