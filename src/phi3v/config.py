"""Typed YAML configs: dataclasses filled from a YAML file plus ``--key value`` overrides, validated on load.

    config = load_config(TrainConfig, "configs/tiny.yaml", ["--lora.r", "8", "--learning_rate", "1e-4"])

- Every key must be a field of the dataclass (or of a nested dataclass, written ``lora: {r: 8}`` in YAML and
  ``--lora.r 8`` on the command line); an unknown key is an error naming the closest known one.
- Values are checked against the field's annotation (``str``, ``int``, ``float``, ``bool``, ``Literal``, optional,
  ``dict``, ``list``); numbers written as text (``"2e-4"``, which YAML 1.1 reads as a string) are converted.
- A field annotated ``dict[str, Any]`` whose metadata names a ``passthrough`` dataclass (e.g. the ``training`` block
  → `transformers.TrainingArguments`) takes that dataclass's fields, checked and converted the same way; overrides
  that match no field of the config itself land there (``--learning_rate 1e-4``).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """A config file or override that does not fit the config's schema."""


def _suggest(name: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def coerce_value(where: str, value: Any, annotation: Any) -> Any:
    """``value`` converted to / checked against ``annotation``; ConfigError naming ``where`` if it does not fit."""
    origin = typing.get_origin(annotation)
    if annotation is Any or annotation is object:
        return value
    if origin in (Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return coerce_value(where, value, option)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits none of {annotation}")
    if origin is Literal:
        choices = typing.get_args(annotation)
        if isinstance(value, bool) and value not in choices and str(value).lower() in choices:
            value = str(value).lower()  # YAML reads `false` as False: the text choice "false" was meant
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(repr(c) for c in choices)}")
        return value
    if origin in (list, tuple, Sequence) or annotation in (list, tuple):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(annotation)
        return [coerce_value(f"{where}[{i}]", item, args[0] if args else Any) for i, item in enumerate(value)]
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"):
            return value.lower() in ("true", "yes")
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected text, got {value!r}")
    members = getattr(annotation, "__members__", {})
    if value is False and isinstance(annotation, type) and "no" in {m.value for m in members.values()}:
        return "no"  # YAML 1.1 reads `eval_strategy: no` as False: give strategy enums their "no" back
    if isinstance(annotation, type) and issubclass(annotation, str) and isinstance(value, str):  # str enums
        try:
            return annotation(value).value
        except ValueError as err:
            raise ConfigError(f"{where}: {err}") from err
    if isinstance(annotation, type) and isinstance(value, annotation):
        return value
    if isinstance(annotation, type):
        raise ConfigError(f"{where}: expected {annotation.__name__}, got {value!r}")
    return value  # annotations we do not model (callables, ...): the target class validates them


def _fill(cls: type, data: dict[str, Any], where: str) -> Any:
    """An instance of dataclass ``cls`` from ``data``, every key known and every value checked."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(f"{where}unknown key {key!r}{_suggest(key, list(fields))}")
        annotation = hints[key]
        nested = annotation if dataclasses.is_dataclass(annotation) else None
        passthrough = fields[key].metadata.get("passthrough")
        if nested is not None:
            if not isinstance(value, dict):
                raise ConfigError(
                    f"{where}{key}: expected a mapping of {sorted(f.name for f in dataclasses.fields(nested))}"
                )
            kwargs[key] = _fill(nested, value, f"{where}{key}.")
        elif passthrough is not None:
            if not isinstance(value, dict):
                raise ConfigError(f"{where}{key}: expected a mapping of {passthrough.__name__} options")
            kwargs[key] = check_passthrough(passthrough, value, f"{where}{key}.")
        else:
            kwargs[key] = coerce_value(f"{where}{key}", value, annotation)
    missing = [
        name
        for name, f in fields.items()
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{where}missing required key(s): {', '.join(missing)}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where.rstrip('.') or cls.__name__}: {err}") from err


# TrainingArguments fields whose annotation is narrower than what they accept (``fsdp: true``, ``fsdp: [full_shard]``)
_WIDER_ANNOTATIONS: dict[str, Any] = {"fsdp": bool | str | list[str] | None}


def check_passthrough(cls: type, data: dict[str, Any], where: str) -> dict[str, Any]:
    """``data`` with every key a field of dataclass ``cls`` and every value converted to its annotation."""
    hints = {**typing.get_type_hints(cls), **_WIDER_ANNOTATIONS}
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    out = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(f"{where}unknown key {key!r}{_suggest(key, names)}")
        out[key] = coerce_value(f"{where}{key}", value, hints.get(key, Any))
    return out


def parse_overrides(args: Sequence[str]) -> dict[str, Any]:
    """``["--a.b", "1", "--flag", "--c=x"]`` -> ``{"a.b": 1, "flag": True, "c": "x"}`` (values read as YAML)."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        token = args[i]
        if not token.startswith("--") or len(token) == 2:
            raise ConfigError(f"override {token!r}: expected --key value or --key=value")
        key, sep, raw = token[2:].partition("=")
        if not sep:
            if i + 1 < len(args) and not args[i + 1].startswith("--"):
                raw = args[i + 1]
                i += 1
            else:
                raw = "true"
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        if isinstance(value, str | dict) and value != raw and not raw.lstrip().startswith(("{", "'", '"')):
            value = raw  # plain text holding " #" or ": " (a prompt), not a YAML comment or mapping
        out[key.replace("-", "_")] = value
        i += 1
    return out


def _place_override(cls: type, data: dict[str, Any], key: str, value: Any) -> None:
    """Put one override into the raw config mapping: a field, a nested ``a.b`` field, or the passthrough block."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    head, _, rest = key.partition(".")
    if head in fields and rest:
        data.setdefault(head, {})
        if not isinstance(data[head], dict):
            raise ConfigError(f"override --{key}: {head} is not a mapping")
        data[head][rest] = value
        return
    if head in fields and not rest:
        data[head] = value
        return
    passthrough = [name for name, f in fields.items() if f.metadata.get("passthrough") is not None]
    for name in passthrough:
        target = fields[name].metadata["passthrough"]
        if key in {f.name for f in dataclasses.fields(target)}:
            data.setdefault(name, {})[key] = value
            return
    known = list(fields)
    for name in passthrough:
        known += [f.name for f in dataclasses.fields(fields[name].metadata["passthrough"])]
    raise ConfigError(f"unknown override --{key}{_suggest(key, known)}")


def load_config(cls: type, path: str | Path | None, overrides: Sequence[str] = ()) -> Any:
    """Read a YAML config into dataclass ``cls``, apply ``--key value`` overrides, validate everything.

    Args:
        cls: The config dataclass.
        path: A YAML file holding a mapping (None: overrides only).
        overrides: Command-line style overrides (see `parse_overrides`).

    Returns:
        An instance of ``cls``.

    Raises:
        ConfigError: On an unreadable file, unknown keys, wrong types or missing required keys (message names them).
    """
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as err:
            raise ConfigError(f"cannot read config {str(path)!r}: {err}") from err
        except yaml.YAMLError as err:
            raise ConfigError(f"config {str(path)!r} is not valid YAML: {err}") from err
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config {str(path)!r} must hold a mapping of keys, got {type(loaded).__name__}")
        data = loaded
    for key, value in parse_overrides(overrides).items():
        _place_override(cls, data, key, value)
    prefix = f"{path}: " if path is not None else ""
    return _fill(cls, data, prefix)


def config_to_dict(config: Any) -> dict[str, Any]:
    """A config dataclass as plain YAML-able data (the resolved config written beside a run's outputs)."""
    return dataclasses.asdict(config)
