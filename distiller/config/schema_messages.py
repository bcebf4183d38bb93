"""One line for a value the schema refuses: the key, what is wrong and what is valid, read from the schema's
declarations (:func:`describe_error`), and the small readers of those declarations that validation shares."""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any, Dict, List, Union

from omegaconf import ListConfig
from omegaconf.errors import ConfigKeyError, InterpolationResolutionError, MissingMandatoryValue

from distiller.config.key_scope import combine_label_message

_UNIONS = (Union, types.UnionType)
_EXPECTED = {int: "a whole number", float: "a number", bool: "true or false", str: "a string"}


def describe_error(err: BaseException, schema: type | None = None) -> str:
    """One line for an OmegaConf error met while composing or validating: which key, what is wrong."""
    full_key = str(getattr(err, "full_key", "") or "")
    value = getattr(err, "value", None)
    first = next((line.strip() for line in str(getattr(err, "msg", err)).splitlines() if line.strip()), "")
    missing_value = re.search(r"Missing mandatory value: ([\w.\[\]]+)", first)
    if isinstance(err, InterpolationResolutionError) and missing_value:  # a key that others interpolate is unset
        return f"config key '{missing_value.group(1)}' has no value; set it with {missing_value.group(1)}=VALUE"
    if isinstance(err, InterpolationResolutionError):
        return f"invalid configuration: {full_key}: {first}" if full_key else f"invalid configuration: {first}"
    if isinstance(err, MissingMandatoryValue):
        unnamed = re.fullmatch(r"combine\.([^.]+)\.(name|method)", full_key)
        if unnamed:  # +combine.<label>.<key>=... without the method under that label
            return combine_label_message(unnamed.group(1))
        return f"config key '{full_key}' has no value; set it with {full_key}=VALUE"
    if isinstance(err, ConfigKeyError):
        missing = re.search(r"Key '([^']+)' not in", first)
        where = full_key or (missing.group(1) if missing else "")
        return (f"config key '{where}' does not exist; check the spelling"
                f"{_valid_keys(schema, where)}" if where else f"invalid configuration: {first}")
    if full_key:
        declared = _field_at(schema, full_key) if schema else None
        if declared is not None and "choices" in declared.metadata:
            return f"{full_key}={show(value)} is not valid; use {either(declared.metadata['choices'])}"
        expected = _expected(schema, full_key) if schema else None
        if expected is None:
            expected = next((text for name, text in (("Integer", "a whole number"), ("Float", "a number"),
                                                     ("Boolean", "true or false"), ("ListConfig", "a list"),
                                                     ("DictConfig", "a mapping"), ("Dict", "a mapping"))
                             if name in first), None)
        if expected:
            return f"{full_key}={show(value)} is not {expected}"
        return f"{full_key}={show(value)}: {first}"
    return f"invalid configuration: {first}"


def _type_at(schema: type, full_key: str) -> Any:
    kind: Any = schema
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", full_key):
        kind = unwrap(kind)
        if part.startswith("["):
            args = typing.get_args(kind)
            kind = args[0] if args else None
        elif dataclasses.is_dataclass(kind):
            kind = typing.get_type_hints(kind).get(part)
        elif typing.get_origin(kind) in (dict, Dict):
            kind = typing.get_args(kind)[1]
        else:
            return None
        if kind is None:
            return None
    return unwrap(kind)


def _field_at(schema: type, full_key: str) -> dataclasses.Field | None:
    parent, _, name = full_key.rpartition(".")
    owner = _type_at(schema, parent) if parent else schema
    if dataclasses.is_dataclass(owner):
        return next((f for f in dataclasses.fields(owner) if f.name == name), None)
    return None


def _expected(schema: type, full_key: str) -> str | None:
    kind = _type_at(schema, full_key)
    if kind in _EXPECTED:
        return _EXPECTED[kind]
    if typing.get_origin(kind) in (list, List):
        item = _EXPECTED.get(unwrap(typing.get_args(kind)[0]), "values")
        return f"a list of {item.removeprefix('a ').removeprefix('an ')}s, e.g. [1,2]"
    if dataclasses.is_dataclass(kind) or typing.get_origin(kind) in (dict, Dict):
        return "a mapping of keys to values"
    if typing.get_origin(kind) in _UNIONS:
        return " or ".join(_EXPECTED.get(a, str(a)) for a in typing.get_args(kind))
    return None


def _valid_keys(schema: type | None, full_key: str) -> str:
    parent = _type_at(schema, full_key.rpartition(".")[0]) if schema and "." in full_key else None
    if dataclasses.is_dataclass(parent):
        return f" (valid keys: {', '.join(f.name for f in dataclasses.fields(parent))})"
    return ""


def unwrap(kind: Any) -> Any:
    """``X | None`` -> ``X``."""
    args = typing.get_args(kind)
    if typing.get_origin(kind) in _UNIONS and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0] if len(rest) == 1 else Union[tuple(rest)]
    return kind


def show(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, (list, tuple, ListConfig)):
        return "[" + ",".join(show(v) for v in value) + "]"
    return str(value)


def either(choices: tuple) -> str:
    names = [show(c) for c in choices]
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]
