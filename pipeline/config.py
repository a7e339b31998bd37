"""Typed config: a section of params.yaml loaded into its frozen dataclass (pipeline/params/).

`load_params(FetchParams, "fetch")` reads `params.yaml` and returns a `FetchParams`. An unknown key, a
missing key or a value of the wrong type is a `ConfigError` that names the key, so a typo in
params.yaml (or in `dvc exp run -S ...`) fails the stage at once instead of being ignored. The dataclasses
live in pipeline/params/, one module per stage, so that a stage depends on the fields it reads and no others.
"""

from __future__ import annotations

import dataclasses
import logging
import types
import typing
from pathlib import Path
from typing import Literal

import yaml

PARAMS_FILE = "params.yaml"
LOG_FORMAT = "%(asctime)s %(name)s %(message)s"
COMPETITION = "dogs-vs-cats-redux-kernels-edition"


class ConfigError(ValueError):
    """params.yaml does not match the dataclass it is loaded into."""


def load_params(cls: type, section: str, path: str | Path = PARAMS_FILE):
    """Read `section` of the YAML file at `path` into the dataclass `cls`."""
    data = load_yaml(path)
    if section not in data:
        raise ConfigError(f"{path}: section '{section}' is missing")
    return from_dict(cls, data[section], section)


def from_dict(cls: type, data: object, where: str):
    """Build dataclass `cls` from a mapping, checking every key and type; `where` names the key path."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(fields)}")
    missing = sorted(set(fields) - set(data))
    if missing:
        raise ConfigError(f"{where}: missing key(s) {', '.join(missing)}")
    hints = typing.get_type_hints(cls)
    return cls(**{name: _convert(hints[name], data[name], f"{where}.{name}") for name in fields})


def _convert(tp, value, where: str):
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        errors = []
        for arg in typing.get_args(tp):
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError("; ".join(errors))
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = {a for a in typing.get_args(tp) if a is not Ellipsis}
        return tuple(_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    # bool is a subclass of int in Python; in a config file `true` for a count is a mistake
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    if not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def load_value(section: str, key: str, tp: type, path: str | Path = PARAMS_FILE):
    """One key of another stage's section, type-checked (evaluate reads predict.tta; package fetch.source): a stage
    that reads one key of a section need not depend on that section's whole dataclass."""
    data = load_yaml(path)
    if not isinstance(data.get(section), dict) or key not in data[section]:
        raise ConfigError(f"{path}: {section}.{key} is missing")
    return _convert(tp, data[section][key], f"{section}.{key}")


def load_yaml(path: str | Path = PARAMS_FILE) -> dict:
    """The whole params file as a mapping."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path} not found: run the stage from the project root")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    return data


def setup_logging() -> None:
    """Every command's log lines the same way: time, the module's logger name, the message; INFO and up."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
