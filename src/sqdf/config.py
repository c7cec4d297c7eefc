"""Config dataclasses: help text on every field, YAML files and ``--set key=value`` overrides with clear errors.

A run's config has three sections, ``trainer``, ``method`` and ``task``, each a dataclass. Keys are written
``section.field`` (``method.gamma=0.95``) or just ``field`` when only one section has it (``gamma=0.95``).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from typing import Any

import yaml

from .errors import ConfigError

_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def option(default: Any, help: str, **kwargs) -> Any:  # noqa: A002 - mirrors argparse's name
    """A dataclass field with a help string (shown by ``sqdf train --help-config``)."""
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)


def field_help(cls) -> dict[str, str]:
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


def _allowed_types(annotation) -> tuple[list[type], bool]:
    """Plain types an annotation admits, and whether None is allowed."""
    if isinstance(annotation, str):
        annotation = eval(annotation, {"typing": typing}, {})  # noqa: S307 - our own annotations only
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        plain = [a for a in args if a is not type(None)]
        return [typing.get_origin(a) or a for a in plain], type(None) in args
    return [origin or annotation], False


def coerce(value: Any, annotation, key: str) -> Any:
    """Convert a parsed YAML value to the field's type, or raise a ConfigError naming the key."""
    types_ok, nullable = _allowed_types(annotation)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
        if nullable:
            return None
        raise ConfigError(f"{key}=None is not allowed; give a {types_ok[0].__name__}")
    for typ in types_ok:
        if typ is bool:
            if isinstance(value, bool):
                return value
            continue
        if typ is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if typ is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if typ is float and isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads 1e-3 (no dot) as text
        if typ is str and isinstance(value, str):
            return value
        if typ is list and isinstance(value, (list, tuple)):
            return list(value)
    names = " or ".join(t.__name__ for t in types_ok)
    raise ConfigError(f"{key}={value!r} is not a valid {names}")


class RunConfig:
    """The three sections of a run, each a dataclass instance."""

    SECTIONS = ("trainer", "method", "task")

    def __init__(self, trainer, method, task):
        self.trainer, self.method, self.task = trainer, method, task

    def sections(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.SECTIONS}

    def to_dict(self) -> dict[str, dict]:
        return {name: dataclasses.asdict(cfg) for name, cfg in self.sections().items()}

    def all_keys(self) -> list[str]:
        return [f"{s}.{f.name}" for s, cfg in self.sections().items() for f in dataclasses.fields(cfg)]

    def set(self, key: str, value: Any, raw: bool = True) -> None:
        """Set one key (``section.field`` or a unique ``field``). With ``raw``, a string value is parsed as YAML
        (``--set`` text); otherwise the value is taken as already typed (from a YAML file)."""
        section, name = self._resolve(key)
        cfg = getattr(self, section)
        fld = {f.name: f for f in dataclasses.fields(cfg)}[name]
        key = f"{section}.{name}"
        if raw and isinstance(value, str):
            text = value
            try:
                value = yaml.safe_load(text) if text.strip() else text
            except yaml.YAMLError:
                value = text
            allowed, _ = _allowed_types(fld.type)
            if str in allowed and value is not None and not isinstance(value, tuple(t for t in allowed if t is not str)):
                value = text  # e.g. mixed_precision=no stays the string 'no'
        setattr(self, section, dataclasses.replace(cfg, **{name: coerce(value, fld.type, key)}))

    def update(self, nested: dict) -> None:
        """Apply a nested dict {section: {field: value}} (as read from YAML) or flat {key: value}."""
        for key, value in nested.items():
            if key in self.SECTIONS and isinstance(value, dict):
                for sub, v in value.items():
                    self.set(f"{key}.{sub}", v, raw=False)
            else:
                self.set(key, value, raw=False)

    def _resolve(self, key: str) -> tuple[str, str]:
        keys = self.all_keys()
        if "." in key:
            section, name = key.split(".", 1)
            if section in self.SECTIONS and f"{section}.{name}" in keys:
                return section, name
        else:
            matches = [k for k in keys if k.split(".", 1)[1] == key]
            if len(matches) == 1:
                return tuple(matches[0].split(".", 1))  # type: ignore[return-value]
            if len(matches) > 1:
                raise ConfigError(f"config key {key!r} is ambiguous: write one of {', '.join(matches)}")
        short = [k.split(".", 1)[1] for k in keys]
        near = difflib.get_close_matches(key, keys + short, n=3, cutoff=0.5)
        hint = f"; did you mean {' or '.join(near)}?" if near else "; run `sqdf train TASK --help-config` for all keys"
        raise ConfigError(f"unknown config key {key!r}{hint}")


def load_yaml(path: str) -> dict:
    """Read a YAML config file into a dict, with clear errors."""
    try:
        with open(path) as fh:
            data = yaml.safe_load(fh) or {}
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path!r} does not exist") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path!r} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r} must hold a mapping like {{method: {{gamma: 0.9}}}}")
    return data


def parse_assignment(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise ConfigError(f"--set {text!r} must look like key=value, e.g. --set method.gamma=0.95")
    key, value = text.split("=", 1)
    return key.strip(), value
