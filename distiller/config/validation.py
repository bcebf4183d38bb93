"""Checking a composed config against the schema, converting it, and saying in one line what is wrong.

:func:`validate` merges the composed config into the schema's dataclasses (types), then checks every
declared key's range or valid values (:func:`distiller.config.schema.key`); :func:`check_job` also gathers
each node's untyped keys into its ``extra`` field, so ``OmegaConf.to_object`` converts the result once into
the dataclasses every part of a job reads (:func:`load_job`). A mistake met on the way is one line naming
the key, what is wrong and what is valid (:func:`describe_error`), read from the schema's declarations.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any, Dict, List, Mapping, Union

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf, open_dict
from omegaconf.errors import ConfigKeyError, InterpolationResolutionError, MissingMandatoryValue, OmegaConfBaseException

from common.errors import UserError
from distiller.config.key_scope import (
    check_cache_settings,
    check_combine_labels,
    check_options,
    combine_label_message,
    expand_home,
)
from distiller.config.schema import (
    EXTRA,
    NETWORK_GROUPS,
    SCHEMAS,
    DistillConfig,
    ExternalModelConfig,
    ExternalTeacherConfig,
    StudentJob,
    TeacherJob,
)


def validate(cfg: DictConfig | dict, job: str | None = None) -> DictConfig:
    """The config as a typed, resolved, range-checked view; a bad value raises one :class:`UserError`.

    ``job`` is ``train_teacher`` or ``train_student`` (default: ``train_student`` when the config has
    a ``distill`` node). Keys outside the schema at the top level (``bench`` of the benchmark, ...)
    pass untyped; Hydra's own ``hydra`` node is left out. A view that is already typed comes back as is.
    """
    if isinstance(cfg, DictConfig) and OmegaConf.get_type(cfg) in SCHEMAS.values():
        return cfg
    schema = SCHEMAS[job] if job else (StudentJob if "distill" in cfg else TeacherJob)
    _require_network_names(cfg)
    data = _resolved(cfg)
    expand_home(data, schema)  # a path's ~ is the home folder (key_scope.py)
    typed = OmegaConf.structured(schema)
    OmegaConf.set_struct(typed, False)  # unknown top-level keys pass; every group node stays closed
    if isinstance(data.get("combine"), dict):
        check_combine_labels(data["combine"])
        typed.combine = {name: OmegaConf.structured(DistillConfig) for name in data["combine"]}
    external = _type_external_networks(typed, data)
    _open_nodes(typed, schema)
    try:
        typed = OmegaConf.merge(typed, data)
        _check(typed, schema, "", data)
        for group, kind in external.items():
            _check(typed[group], kind, f"{group}.", data[group])
        check_options(typed, data)  # a data set's or optimizer's own keys only for it (key_scope.py)
    except OmegaConfBaseException as err:
        raise UserError(describe_error(err, schema)) from None
    check_cache_settings(typed)
    return typed


def check_job(cfg: DictConfig | dict, job: str) -> DictConfig:
    """The composed config of ``job`` (``train_teacher`` or ``train_student``) checked (:func:`validate`) and
    ready to convert: the untyped keys of a node that takes them are gathered into its ``extra`` field, so
    ``OmegaConf.to_object`` turns it, once, into the schema's dataclasses (see :func:`load_job`)."""
    typed = validate(cfg, job)
    _gather_extras(typed)
    return typed


def load_job(cfg: DictConfig | dict, job: str) -> TeacherJob | StudentJob:
    """The composed config of ``job``, checked and converted into the schema's dataclasses."""
    return OmegaConf.to_object(check_job(cfg, job))


def method_config(node: Mapping[str, Any], where: str = "distill") -> DistillConfig:
    """One ``distill`` node (a method's objective keys and its own parameters) checked and converted alone,
    its objective keys defaulting as the schema says: for building an objective outside a composed job."""
    data = dict(node)
    data.setdefault("method", data.get("name"))
    typed = OmegaConf.structured(DistillConfig)
    OmegaConf.set_struct(typed, False)
    try:
        typed = OmegaConf.merge(typed, data)
        _check(typed, DistillConfig, f"{where}.", data)
    except OmegaConfBaseException as err:
        raise UserError(describe_error(err, DistillConfig)) from None
    _gather_extras(typed)
    return OmegaConf.to_object(typed)


def _gather_extras(node: DictConfig) -> None:
    """Move the keys a typed view's dataclasses do not declare into their ``extra`` field (a node that takes
    them); drop them elsewhere (the top level's keys of other commands, e.g. the benchmark's ``bench``)."""
    kind = OmegaConf.get_type(node)
    if not dataclasses.is_dataclass(kind):
        return
    declared = {f.name for f in dataclasses.fields(kind)}
    undeclared = [k for k in node.keys() if k not in declared]
    with open_dict(node):
        for k in undeclared:
            if EXTRA in declared:
                node[EXTRA][k] = node[k]
            del node[k]
    for name in declared:
        child = node._get_node(name)
        if isinstance(child, DictConfig) and not child._is_none():
            if dataclasses.is_dataclass(OmegaConf.get_type(child)):
                _gather_extras(child)
            else:
                for value in child.values():
                    if isinstance(value, DictConfig):
                        _gather_extras(value)


def _require_network_names(cfg: DictConfig | dict) -> None:
    """An external network node names its model (``teacher=torchvision teacher.name=resnet18``): say so in one line."""
    for group in NETWORK_GROUPS:
        node = cfg.get(group) if isinstance(cfg, (dict, DictConfig)) else None
        if not isinstance(node, (dict, DictConfig)) or node.get("source") is None:
            continue
        key = "_target_" if node.get("source") == "module" else "name"
        example = "pkg.module.Class" if key == "_target_" else "resnet18"
        if isinstance(node, DictConfig):
            absent = key not in node.keys() or OmegaConf.is_missing(node, key)
        else:
            absent = node.get(key) in (None, MISSING)
        if absent:
            raise UserError(f"{group}={node.get('source')} needs {group}.{key}=... (e.g. {group}.{key}={example})")
        if key == "name" and node.get("_target_") not in (None, MISSING):
            raise UserError(f"{group}._target_ is read only with {group}=module; {group}={node.get('source')} builds "
                            f"{group}.name={node.get('name')}: drop {group}._target_, or use {group}=module")


def _type_external_networks(typed: DictConfig, data: dict) -> dict[str, type]:
    """Type the network nodes that name a ``source`` as external networks, open for constructor arguments."""
    external = {}
    for group in NETWORK_GROUPS:
        node = data.get(group)
        if group in typed.keys() and isinstance(node, dict) and node.get("source") is not None:
            kind = ExternalTeacherConfig if group == "teacher" else ExternalModelConfig
            typed[group] = OmegaConf.structured(kind)
            OmegaConf.set_struct(typed[group], False)
            OmegaConf.set_struct(typed[group].features, True)  # a misspelt features key is an error
            external[group] = kind
    return external


def _resolved(cfg: DictConfig | dict) -> dict:
    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.create(cfg)
    if "hydra" in cfg:
        cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as err:
        raise UserError(describe_error(err)) from None


def _open_nodes(node: DictConfig, schema: type) -> None:
    """Let the nodes declared with ``extra_keys`` carry untyped keys beside their typed ones."""
    for f in dataclasses.fields(schema):
        child = node._get_node(f.name)
        if f.metadata.get("extra_keys") and isinstance(child, DictConfig):
            OmegaConf.set_struct(child, False)
            for value in (child.values() if OmegaConf.get_type(child) is dict else ()):
                if isinstance(value, DictConfig):
                    OmegaConf.set_struct(value, False)


def _check(node: Any, schema: type, prefix: str, given: Any) -> None:
    """Range and valid-value checks of every declared key below ``node`` (the merge checked the types).

    ``given`` is the same part of the config as the user wrote it, for messages (``0``, not ``0.0``).
    """
    hints = typing.get_type_hints(schema)
    given = given if isinstance(given, dict) else {}
    # the networks' nodes first: optim.lr follows model.lr / student.lr, and the message should name those
    for f in sorted(dataclasses.fields(schema), key=lambda f: f.name not in NETWORK_GROUPS):
        path = f"{prefix}{f.name}"
        value = node[f.name]  # a MISSING value raises MissingMandatoryValue here
        kind = unwrap(hints[f.name])
        if dataclasses.is_dataclass(kind):
            _check(value, kind, f"{path}.", given.get(f.name))
        elif typing.get_origin(kind) in (dict, Dict) and value is not None:
            item = unwrap(typing.get_args(kind)[1])
            if dataclasses.is_dataclass(item):
                for name, child in value.items():
                    _check(child, item, f"{path}.{name}.", (given.get(f.name) or {}).get(name))
        elif isinstance(value, ListConfig):
            items = given.get(f.name) if isinstance(given.get(f.name), list) else list(value)
            for i, (item, shown) in enumerate(zip(value, items)):
                _check_value(f"{path}[{i}]", item, f.metadata.get("each", {}), shown)
        else:
            _check_value(path, value, f.metadata, given.get(f.name, value))


def _check_value(path: str, value: Any, checks: Any, given: Any) -> None:
    if value is None:
        return
    shown = show(given)
    if checks.get("path") and isinstance(value, str) and not value.strip():
        raise UserError(f"{path} is empty: give a folder or file path (an environment variable it reads, such as "
                        f"KD_TEACHER_DIR or KD_DATA_ROOT, is set but empty: unset it or give it a path)")
    if "pattern" in checks:
        if not re.fullmatch(checks["pattern"], str(value)):
            raise UserError(f"{path}={shown} is not valid; use {either(checks['choices'])}")
    elif "choices" in checks and not any(value == c and type(value) is type(c) for c in checks["choices"]):
        raise UserError(f"{path}={shown} is not valid; use {either(checks['choices'])}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value != value:
            raise UserError(f"{path}={shown} is not a number")
        for op, fails, text in (("gt", lambda lim: value <= lim, ">"), ("ge", lambda lim: value < lim, ">="),
                                ("le", lambda lim: value > lim, "<="), ("lt", lambda lim: value >= lim, "<")):
            if op in checks and fails(checks[op]):
                raise UserError(f"{path}={shown} must be {text} {show(checks[op])}")


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
