"""Configuration: YAML presets + ``key.sub=value`` command-line overrides, saved beside the outputs.

A config is a plain nested dict. ``resolve`` merges, in order: the method's defaults, a YAML preset
(a path, or the name of a packaged preset under ``promptkd/presets``), then ``--set`` overrides.
Unknown keys are an error, so a typo never silently does nothing.

A *schema* is a dataclass whose fields are the config's keys (nested dataclasses are sections).
:func:`check` validates a config dict against it before any work starts: every key known (with the
closest known key suggested), every value of its field's type (``--set train.lr=1e-3`` is the float
the user meant, ``train.epochs=2.5`` is refused), within the range or choices the field's metadata
declares (:func:`spec`). The error is one line per problem, naming the key, the value and what is
expected.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
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
            names = preset_names()
            close = difflib.get_close_matches(str(source), names, n=1, cutoff=0.6)
            if close:
                raise ConfigError(f"config {source!r}: no such file, and not a packaged preset (did you mean "
                                  f"{close[0]!r}?)")
            groups = sorted({n.rsplit("/", 1)[0] + "/..." if n.count("/") > 1 else n for n in names})
            raise ConfigError(f"config {source!r}: no such file, and not a packaged preset (known: "
                              f"{', '.join(groups)}; '...' is a dataset, e.g. distill/base2novel/dtd)")
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
    """Write ``cfg`` as YAML, atomically (a killed run never leaves a half-written config)."""
    from promptkd.fileio import atomic_write

    return atomic_write(path, yaml.safe_dump(_plain(cfg), sort_keys=False))


def load_saved(path: str | Path) -> dict:
    """A run's saved ``config.yaml``; an empty or unreadable file is an error naming it."""
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise FileNotFoundError(f"{p}: not found") from None
    if not text.strip():
        raise ConfigError(f"{p}: the saved config is empty (an interrupted write?); start a new run with --overwrite")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: invalid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping, got {type(data).__name__}")
    return data


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


# --------------------------------------------------------------------------------------------------
# schemas: dataclasses whose fields are the keys, with ranges/choices in the field metadata


def spec(default: Any = dataclasses.MISSING, *, help: str = "", choices: Iterable[Any] | None = None,
         ge: float | None = None, gt: float | None = None, le: float | None = None, lt: float | None = None,
         default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with the constraints :func:`check` enforces (``ge``/``gt``/``le``/``lt`` bounds)."""
    meta = {"help": help, "choices": tuple(choices) if choices is not None else None,
            "ge": ge, "gt": gt, "le": le, "lt": lt}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _hints(schema: type) -> dict[str, Any]:
    return typing.get_type_hints(schema)


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        return f"a list of {_type_name(typing.get_args(tp)[0])}" if typing.get_args(tp) else "a list"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(value: Any, tp: Any) -> Any:
    """``value`` as type ``tp`` (the way a user typing it on a command line means it), or ValueError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.strip().lower() in ("null", "none", "~")):
            if type(None) in args:
                return None
        # a text value is tried as a number first, then kept as text, and only then split into a list
        order = {int: 0, float: 1, bool: 2, str: 3}
        for arg in sorted((a for a in args if a is not type(None)), key=lambda a: order.get(a, 4)):
            if arg is str and not isinstance(value, (str, int, float)):
                continue
            try:
                return _coerce(value, arg)
            except ValueError:
                continue
        raise ValueError(f"expected {_type_name(tp)}")
    if origin in (list, tuple):
        (item,) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()] if "," in value else [value]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"expected {_type_name(tp)}")
        return [_coerce(v, item) if item is not Any else v for v in value]
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.strip().lower() in ("true", "yes", "on", "1")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ValueError("expected true or false")
    if tp is int:
        if isinstance(value, bool):
            raise ValueError("expected an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip().replace("_", ""))
            except ValueError:
                try:
                    f = float(value)
                except ValueError:
                    raise ValueError("expected an integer") from None
                if math.isfinite(f) and f.is_integer():
                    return int(f)
        raise ValueError("expected an integer")
    if tp is float:
        if isinstance(value, bool):
            raise ValueError("expected a number")
        if isinstance(value, (int, float)):
            f = float(value)
        elif isinstance(value, str):
            try:
                f = float(value.strip())
            except ValueError:
                raise ValueError("expected a number") from None
        else:
            raise ValueError("expected a number")
        if math.isnan(f):
            raise ValueError("NaN is not a valid value")
        return f
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ValueError("expected a string")
        return value if isinstance(value, str) else str(value)
    if _is_section(tp):
        raise ValueError("is a section")
    return value


def _check_bounds(value: Any, meta: Mapping) -> str | None:
    choices = meta.get("choices")
    if choices is not None and value is not None:
        items = value if isinstance(value, list) else [value]
        bad = [v for v in items if v not in choices]
        if bad:
            return f"expected one of {', '.join(map(str, choices))}"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value) and any(meta.get(k) is not None for k in ("le", "lt")):
            return "expected a finite number"
        for key, op, word in (("ge", lambda a, b: a >= b, ">="), ("gt", lambda a, b: a > b, ">"),
                              ("le", lambda a, b: a <= b, "<="), ("lt", lambda a, b: a < b, "<")):
            bound = meta.get(key)
            if bound is not None and not op(value, bound):
                return f"expected a value {word} {bound}"
    return None


def keys_of(schema: type, prefix: str = "", exclude: Iterable[str] = ()) -> list[str]:
    """Every dotted key a schema accepts."""
    out = []
    skip = set(exclude)
    for f in dataclasses.fields(schema):
        name = f"{prefix}{f.name}"
        if name in skip:
            continue
        tp = _hints(schema)[f.name]
        out.extend(keys_of(tp, name + ".", skip) if _is_section(tp) else [name])
    return out


def describe(schema: type, exclude: Iterable[str] = ()) -> list[tuple[str, str]]:
    """``(key=default, help with bounds or choices)`` for every key of ``schema``, for ``--help`` texts.

    The defaults are :func:`defaults_of`'s, so a section whose owner sets its own values shows those."""
    defaults = flatten(defaults_of(schema, exclude))
    rows = []

    def walk(sch: type, prefix: str) -> None:
        hints = _hints(sch)
        for f in dataclasses.fields(sch):
            name = f"{prefix}{f.name}"
            if name in defaults:
                rows.append((name, f.metadata or {}))
            elif _is_section(hints[f.name]):
                walk(hints[f.name], name + ".")

    walk(schema, "")
    lines = []
    for name, meta in rows:
        limits = [f"{word}{meta[k]}" for k, word in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
                  if meta.get(k) is not None]
        if meta.get("choices"):
            limits.append("one of " + ", ".join(map(str, meta["choices"])))
        text = meta.get("help", "")
        if limits:
            text = f"{text} ({'; '.join(limits)})" if text else "; ".join(limits)
        value = defaults[name]
        shown = "null" if value is None else f'"{value}"' if isinstance(value, str) and " " in value else value
        lines.append((f"{name}={shown}", text))
    return lines


def _suggest(key: str, known: Iterable[str]) -> str:
    known = list(known)
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    if not close:  # a bare leaf name given without its section: 'lr' -> 'train.lr'
        close = [k for k in known if k.rsplit(".", 1)[-1] == key.rsplit(".", 1)[-1]][:1]
    return f" (did you mean {close[0]!r}?)" if close else ""


def check(cfg: Mapping, schema: type, *, exclude: Iterable[str] = (), where: str = "config") -> dict:
    """``cfg`` validated and coerced against ``schema``; a ``ConfigError`` lists every problem.

    ``exclude``: dotted keys of the schema that this config must not set (derived elsewhere)."""
    problems: list[str] = []
    all_keys = keys_of(schema, exclude=exclude)
    skip = set(exclude)

    def walk(node: Any, sch: type, prefix: str) -> dict:
        if not isinstance(node, Mapping):
            problems.append(f"{prefix.rstrip('.') or 'the config'} is a section: set "
                            f"{prefix or ''}KEY=VALUE for one of its keys, not {node!r}")
            return {}
        hints = _hints(sch)
        by_name = {f.name: f for f in dataclasses.fields(sch) if f"{prefix}{f.name}" not in skip}
        out: dict = {}
        for key, value in node.items():
            path = f"{prefix}{key}"
            f = by_name.get(str(key))
            if f is None:
                leaves = [f"{path}.{k}" for k in flatten(value)] if isinstance(value, Mapping) and value else [path]
                problems.extend(f"unknown key {leaf!r}{_suggest(leaf, all_keys)}" for leaf in leaves)
                continue
            tp = hints[f.name]
            if _is_section(tp):
                out[f.name] = walk(value, tp, path + ".")
                continue
            if isinstance(value, Mapping):
                problems.append(f"{path} is a value ({_type_name(tp)}), not a section")
                continue
            try:
                coerced = _coerce(value, tp)
            except ValueError as exc:
                problems.append(f"{path}={value!r}: {exc}")
                continue
            bad = _check_bounds(coerced, f.metadata)
            if bad:
                problems.append(f"{path}={value!r}: {bad}")
                continue
            out[f.name] = coerced
        return out

    result = walk(cfg, schema, "")
    if problems:
        shown = "; ".join(problems[:12]) + (f"; ... ({len(problems) - 12} more)" if len(problems) > 12 else "")
        raise ConfigError(f"invalid {where}: {shown}")
    return result


def defaults_of(schema: type, exclude: Iterable[str] = ()) -> dict:
    """The schema's default values as a nested dict (sections included)."""
    skip = set(exclude)

    def walk(sch: type, prefix: str) -> dict:
        out = {}
        hints = _hints(sch)
        for f in dataclasses.fields(sch):
            if f"{prefix}{f.name}" in skip:
                continue
            tp = hints[f.name]
            if _is_section(tp):
                section = walk(tp, f"{prefix}{f.name}.")
                if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]  # the owner's defaults
                    own = dataclasses.asdict(f.default_factory())  # type: ignore[misc]
                    section = {k: own[k] for k in section}
                out[f.name] = section
            elif f.default is not dataclasses.MISSING:
                out[f.name] = copy.deepcopy(f.default)
            elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                out[f.name] = f.default_factory()  # type: ignore[misc]
        return out

    return walk(schema, "")


def parse_overrides(overrides: Iterable[str] | Mapping[str, Any]) -> dict:
    """``["a.b=1", ...]`` (YAML values) or ``{"a.b": 1}`` (Python values) -> a nested dict."""
    items = overrides.items() if isinstance(overrides, Mapping) else (
        (".".join(k), v) for k, v in map(parse_override, overrides))
    out: dict = {}
    for key, value in items:
        parts = str(key).split(".")
        node = out
        for part in parts[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {key!r}: {part!r} was given a value and is used as a section")
            node = nxt
        node[parts[-1]] = value
    return out


def build(schema: type, preset: str | Path | None = None, overrides: Iterable[str] | Mapping[str, Any] = (),
          *, base: Mapping | None = None, exclude: Iterable[str] = (), where: str = "config") -> dict:
    """defaults (or ``base``) <- preset <- overrides, validated against ``schema``: a plain nested dict."""
    cfg = copy.deepcopy(dict(base)) if base is not None else defaults_of(schema, exclude)
    if preset:
        cfg = overlay(cfg, check(load_yaml(preset), schema, exclude=exclude, where=f"preset {preset}"))
    cfg = overlay(cfg, parse_overrides(overrides))
    return check(cfg, schema, exclude=exclude, where=where)


def overlay(base: Mapping, update: Mapping) -> dict:
    """``update`` deep-merged over ``base`` without key checks (``check`` reports unknown keys afterwards)."""
    out = copy.deepcopy(dict(base))
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = overlay(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def instantiate(schema: type, cfg: Mapping) -> Any:
    """A (nested) dataclass instance from a checked config dict."""
    hints = _hints(schema)
    kwargs = {}
    for f in dataclasses.fields(schema):
        if f.name not in cfg:
            continue
        tp = hints[f.name]
        kwargs[f.name] = instantiate(tp, cfg[f.name]) if _is_section(tp) else cfg[f.name]
    return schema(**kwargs)


def validate_instance(obj: Any, where: str = "config") -> None:
    """Check a dataclass instance's fields against their types and metadata bounds (API use)."""
    problems = []
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        tp, value = hints[f.name], getattr(obj, f.name)
        if _is_section(tp):
            if dataclasses.is_dataclass(value):
                validate_instance(value, where)
            continue
        try:
            coerced = _coerce(value, tp)
        except ValueError as exc:
            problems.append(f"{f.name}={value!r}: {exc}")
            continue
        if coerced != value and not (isinstance(value, int) and isinstance(coerced, float)):
            problems.append(f"{f.name}={value!r}: expected {_type_name(tp)}")
            continue
        bad = _check_bounds(coerced, f.metadata)
        if bad:
            problems.append(f"{f.name}={value!r}: {bad}")
    if problems:
        raise ConfigError(f"invalid {where}: " + "; ".join(problems))
