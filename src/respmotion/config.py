"""One config system: typed dataclasses, loaded from YAML/JSON, overridden by ``key=value``.

Precedence: dataclass defaults < ``--config FILE`` < explicit command-line flags < ``key=value``
overrides (dotted keys reach nested sections, e.g. ``train.steps=100``).  Unknown keys are an
error naming the key and the file; so are sizes in ``*shape`` settings below 1, and whatever a
config class's ``__post_init__`` refuses (``ValueError``), prefixed with the file or "command line".  :func:`save_config` writes the resolved config beside
every output.

Renamed settings: a config class lists the keys older versions saved under another name in a class
attribute ``RENAMED: ClassVar[dict[str, str]]`` (old key -> today's dotted key within that class);
:func:`upgrade_keys` moves them, so a saved config of an older version still loads.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .io.atomic import atomic_path

T = TypeVar("T")


class ConfigError(ValueError):
    pass


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if value is None:
        return None
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        return _coerce(non_none[0], value, key) if len(non_none) == 1 else value
    if dataclasses.is_dataclass(tp):
        if isinstance(tp, type) and isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return from_dict(tp, value, prefix=key + ".")
    if origin in (tuple, list):
        if isinstance(value, str):
            if re.fullmatch(r"\s*\d+(\s*x\s*\d+)+\s*", value):  # "50x256x256"
                value = value.replace("x", ",")
            value = [v.strip() for v in value.split(",") if v.strip()] if value else []
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, key) for v in value)
        if origin is tuple and args:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(a, v, key) for a, v in zip(args, value))
        inner = args[0] if args else Any
        return list(_coerce(inner, v, key) for v in value)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, str):
            low = value.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return bool(value)
    if tp in (int, float, str):
        try:
            if tp is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}") from None
    return value


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "", source: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys raise :class:`ConfigError`.  At the top level, keys
    renamed since ``data`` was written (:func:`upgrade_keys`) are moved to today's names first, so a config stored
    in an older checkpoint still loads."""
    if not prefix:
        data = upgrade_keys(cls, data)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{source}: " if source else ""
        raise ConfigError(f"{where}unknown config key '{prefix}{unknown[0]}' (known: {', '.join(sorted(names))})")
    try:
        kwargs = {k: _coerce(hints[k], v, prefix + k) for k, v in data.items()}
        for k, v in kwargs.items():
            _check_shape(prefix + k, v)
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as exc:  # a config class's own __post_init__ validation
            if isinstance(exc, ConfigError):
                raise
            named = str(exc).startswith((prefix, "--"))  # names its key, or the command-line flag the user typed
            raise ConfigError(f"{prefix}{exc}" if prefix and not named else str(exc)) from None
    except ConfigError as exc:
        if source and not str(exc).startswith(f"{source}: "):
            raise ConfigError(f"{source}: {exc}") from None  # nested sections: name the file too
        raise


def upgrade_keys(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """``data`` (a mapping for ``cls``) with every key of ``cls.RENAMED`` and of its nested sections' classes
    moved to today's name (an old key given beside today's replaces it)."""
    out = dict(data)
    for old, new in getattr(cls, "RENAMED", {}).items():
        if old in out:
            _set_dotted(out, new, out.pop(old))
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]) and isinstance(out.get(f.name), dict):
            out[f.name] = upgrade_keys(hints[f.name], out[f.name])
    return out


def _check_shape(key: str, value: Any) -> None:
    """Every ``*shape`` setting (volume or latent grid, z, y, x) is a list of positive integers."""
    if not key.rsplit(".", 1)[-1].endswith("shape") or not isinstance(value, (tuple, list)):
        return
    bad = [v for v in value if isinstance(v, int) and not isinstance(v, bool) and v < 1]
    if bad:
        raise ConfigError(f"{key}: every size must be a positive number of voxels, got {list(value)}")


def to_dict(obj: Any) -> dict[str, Any]:
    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, Path):
            return str(v)
        return v

    return conv(obj)


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())  # YAML is a superset of JSON
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML/JSON ({str(exc).splitlines()[0]})") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data


def _set_dotted(d: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        d = d.setdefault(k, {})
        if not isinstance(d, dict):
            raise ConfigError(f"override {dotted}: '{k}' is not a section")
    d[keys[-1]] = value


def parse_overrides(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        if isinstance(value, (dict,)):
            value = raw
        _set_dotted(out, key.strip(), value)
    return out


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def load_config(
    cls: type[T],
    file: str | os.PathLike | None = None,
    flags: dict[str, Any] | None = None,
    overrides: list[str] | None = None,
) -> T:
    """Resolve a config: defaults < file < flags (dotted keys, None ignored) < overrides; renamed keys
    of the file and the overrides are read under today's names (:func:`upgrade_keys`)."""
    data = to_dict(cls())
    source = ""
    if file:
        data = _merge(data, upgrade_keys(cls, read_config_file(file)))
        source = str(file)
    # validate file keys before merging the rest so errors name the file
    from_dict(cls, data, source=source)
    for k, v in (flags or {}).items():
        if v is not None:
            sub: dict[str, Any] = {}
            _set_dotted(sub, k, v)
            data = _merge(data, sub)
    data = _merge(data, upgrade_keys(cls, parse_overrides(overrides or [])))
    return from_dict(cls, data, source=source or "command line")


def save_config(obj: Any, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
    path = Path(path)
    data = to_dict(obj)
    if extra:
        data = {**data, **extra}
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    return path
