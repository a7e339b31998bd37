"""Typed config: a section of params.yaml loaded into its frozen dataclass (pipeline/params/).

`load_params(FetchParams, "fetch")` reads `params.yaml` and returns a `FetchParams`. An unknown key, a
missing key, a value of the wrong type or out of its field's range (`epochs: int = at_least(1)`,
`warmup: float = interval("[0, 1)")`; a dataclass's `conflict()` checks its fields together) is a `ConfigError`
that names the file and the key, so a typo in params.yaml (or in `dvc exp run -S ...`) fails the stage at once
instead of being ignored or failing deep in torch. A `ConfigError` is a `SystemExit` too: uncaught, it ends a
stage with its one line, no traceback, as argparse's errors do. The dataclasses live in pipeline/params/, one
module per stage, so that a stage depends on the fields it reads and no others.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml

PARAMS_FILE = "params.yaml"
LOG_FORMAT = "%(asctime)s %(name)s %(message)s"
COMPETITION = "dogs-vs-cats-redux-kernels-edition"


class ConfigError(SystemExit, ValueError):
    """params.yaml does not match the dataclass it is loaded into. A SystemExit, so that a stage's `main` ends with
    the message alone (exit status 1) and needs no try; a ValueError, so that `except ValueError` still catches it."""


# --- ranges: a field declared `epochs: int = at_least(1)` is checked by from_dict -----------------------------


def rule(test: Callable[[Any], bool], says: str) -> Any:
    """A dataclass field (required, no default) whose value must pass `test`; the error reads "must be <says>"."""
    return dataclasses.field(metadata={"rule": (test, says)})


def _number(test: Callable[[float], bool], says: str) -> Any:
    # a number's rule passes any other value: `clip: Literal["evaluate"] | float` checks the float alone
    return rule(lambda v: not isinstance(v, int | float) or test(v), says)


def at_least(low: float) -> Any:
    return _number(lambda v: v >= low, f">= {low}")


def above(low: float) -> Any:
    return _number(lambda v: v > low, f"> {low}")


def zero_or_at_least(low: int) -> Any:
    """0 means off or automatic (image_size 0: the weights' own; folds 0: not measured), else at least `low`."""
    return _number(lambda v: v == 0 or v >= low, f"0 or >= {low}")


def interval(bounds: str) -> Any:
    """A number within `bounds`, written as in mathematics: "[0, 1)" is 0 <= value < 1, "(0, 1]" 0 < value <= 1."""
    low, high = (float(b) for b in bounds[1:-1].split(","))
    low_ok = (lambda v: v > low) if bounds[0] == "(" else (lambda v: v >= low)
    high_ok = (lambda v: v < high) if bounds[-1] == ")" else (lambda v: v <= high)
    return _number(lambda v: low_ok(v) and high_ok(v), f"in {bounds}")


def any_number() -> Any:
    """A number with no range (not even >= 0, the default of a field with no rule)."""
    return rule(lambda v: True, "any number")


def text() -> Any:
    return rule(lambda v: isinstance(v, str) and v.strip() == v and v != "", "a non-empty string (no spaces around)")


def matching(pattern: str, says: str) -> Any:
    """A string that matches `pattern` whole (a name used in a path, a URL or a tag)."""
    return rule(lambda v: isinstance(v, str) and re.fullmatch(pattern, v) is not None, says)


# a field with no rule: a number must not be negative (no count, size, rate or seed of params.yaml is)
NOT_NEGATIVE = (lambda v: not isinstance(v, int | float) or v >= 0, ">= 0")


def check_range(field: dataclasses.Field, value: object, where: str) -> None:
    test, says = field.metadata.get("rule", NOT_NEGATIVE)
    if not test(value):
        raise ConfigError(f"{where} must be {says}, got {value!r}")


# ---------------------------------------------------------------------------------------------------


def load_params(cls: type, section: str, path: str | Path = PARAMS_FILE):
    """Read `section` of the YAML file at `path` into the dataclass `cls`."""
    data = load_yaml(path)
    if section not in data:
        raise ConfigError(f"{path}: section '{section}' is missing")
    return from_dict(cls, data[section], f"{path}: {section}")


def from_dict(cls: type, data: object, where: str):
    """Build dataclass `cls` from a mapping, checking every key, type and range; `where` names the key path
    (after the file's name and a colon, if it has one: "params.yaml: train")."""
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
    values = {}
    for name, field in fields.items():
        values[name] = _convert(hints[name], data[name], f"{where}.{name}")
        check_range(field, values[name], f"{where}.{name}")
    params = cls(**values)
    conflict = params.conflict() if hasattr(params, "conflict") else None  # what fields say together
    if conflict:
        raise ConfigError(f"{where}: {conflict}")
    return params


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
    return _convert(tp, data[section][key], f"{path}: {section}.{key}")


def load_yaml(path: str | Path = PARAMS_FILE) -> dict:
    """The whole params file as a mapping."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path} not found: run the stage from the project root")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:  # its own text spans lines and quotes the document: one line, where and what
        mark = getattr(e, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{at}: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    return data


def setup_logging() -> None:
    """Every command's log lines the same way: time, the module's logger name, the message; INFO and up."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
