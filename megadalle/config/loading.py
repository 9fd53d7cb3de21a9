"""Resolving a config: defaults <- preset <- YAML file <- dotted overrides (CLI > file > preset)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from megadalle.config.coerce import merge, read_yaml, set_dotted
from megadalle.config.presets import PRESETS
from megadalle.config.sections import Config
from megadalle.errors import ConfigError


def load_config(preset: str | None = None, file: str | Path | None = None,
                overrides: list[str] | dict[str, Any] | None = None) -> Config:
    """Resolve a config: defaults, then `preset`, then `file`, then `overrides`.

    `overrides` is a list of "section.key=value" strings (values parsed as YAML) or a dict of
    dotted keys. A preset named in the file applies unless `preset` is given explicitly.
    """
    d = Config().to_dict()
    file_d = read_yaml(file) if file else {}
    preset = preset or file_d.get("preset") or ""
    if preset:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        merge(d, PRESETS[preset], Config, "")
        d["preset"] = preset
    merge(d, {k: v for k, v in file_d.items() if k != "preset"}, Config, "")
    items = overrides.items() if isinstance(overrides, dict) else [parse_override(o) for o in (overrides or [])]
    for key, value in items:
        set_dotted(d, key, value, Config)
    return Config.from_dict(d)


def parse_override(text: str) -> tuple[str, Any]:
    s = text[2:] if text.startswith("--") else text
    if "=" not in s:
        raise ConfigError(f"override {text!r} must look like --section.key=value")
    key, raw = s.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key, value
