"""Configuration: YAML presets + ``key.sub=value`` command-line overrides, saved beside the outputs.

A config is a plain nested dict. ``resolve`` merges, in order: the method's defaults, a YAML preset
(a path, or the name of a packaged preset under ``promptkd/presets``), then ``--set`` overrides.
Unknown keys are an error, so a typo never silently does nothing.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    pass


def preset_names() -> list[str]:
    root = resources.files("promptkd") / "presets"
    names: list[str] = []

    def walk(node, prefix: str) -> None:
        for child in node.iterdir():
            if child.is_dir():
                walk(child, f"{prefix}{child.name}/")
            elif child.name.endswith(".yaml"):
                names.append(prefix + child.name[: -len(".yaml")])

    if root.is_dir():
        walk(root, "")
    return sorted(names)


def load_yaml(source: str | Path) -> dict:
    """Read a YAML config from a path, or a packaged preset by name (``b2n/caltech101``)."""
    path = Path(source)
    if path.is_file():
        text = path.read_text()
        origin = str(path)
    else:
        packaged = resources.files("promptkd") / "presets" / f"{source}.yaml"
        if not packaged.is_file():
            raise ConfigError(
                f"config {source!r}: no such file, and not a packaged preset (known: {', '.join(preset_names())})"
            )
        text = packaged.read_text()
        origin = f"preset {source}"
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{origin}: invalid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: top level must be a mapping, got {type(data).__name__}")
    return data


def merge(base: Mapping, update: Mapping, *, strict: bool = True, where: str = "") -> dict:
    """Deep-merge ``update`` into a copy of ``base``; with strict, keys must already exist in base."""
    out = copy.deepcopy(dict(base))
    for key, value in update.items():
        path = f"{where}.{key}" if where else str(key)
        if strict and key not in out:
            known = ", ".join(sorted(map(str, out))) or "(none)"
            raise ConfigError(f"unknown config key {path!r} (known at this level: {known})")
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value, strict=strict, where=path)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """``optim.lr=0.01`` -> (["optim", "lr"], 0.01); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(cfg: Mapping, overrides: Iterable[str], *, strict: bool = True) -> dict:
    out = copy.deepcopy(dict(cfg))
    for text in overrides:
        keys, value = parse_override(text)
        nested: Any = value
        for k in reversed(keys):
            nested = {k: nested}
        out = merge(out, nested, strict=strict)
    return out


def resolve(defaults: Mapping, config: str | Path | None = None, overrides: Iterable[str] = ()) -> dict:
    cfg = copy.deepcopy(dict(defaults))
    if config:
        cfg = merge(cfg, load_yaml(config))
    return apply_overrides(cfg, overrides)


def save(cfg: Mapping, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(_plain(cfg), sort_keys=False))
    return path


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def flatten(cfg: Mapping, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out: dict = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        out.update(flatten(value, name + ".") if isinstance(value, Mapping) else {name: value})
    return out


def differences(old: Mapping, new: Mapping, ignore: Iterable[str] = ()) -> list[str]:
    """``"key: old -> new"`` for every flattened key whose value differs (keys in ``ignore`` skipped)."""
    a, b, skip = flatten(old), flatten(new), set(ignore)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and k not in skip]
