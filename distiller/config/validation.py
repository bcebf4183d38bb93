"""Checking a composed config against the schema (one :class:`UserError` naming the key), and converting it.

:func:`validate` merges the composed config into the schema's dataclasses (types), then checks every
declared key's range or valid values (:func:`distiller.config.schema.key`). :func:`load_job` does that
once and converts the result, once, into the schema's dataclasses: the form every part of a job reads.
"""
from __future__ import annotations

import dataclasses
import re
import typing
from typing import Any, Dict, Mapping

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from common.errors import UserError
from distiller.config.key_scope import check_options, expand_home
from distiller.config.messages import describe_error, either, show, unwrap
from distiller.config.schema import (
    SCHEMAS,
    DistillConfig,
    ExternalModelConfig,
    ExternalTeacherConfig,
    ModelConfig,
    StudentJob,
    TeacherConfig,
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
    return typed


def load_job(cfg: DictConfig | dict, job: str) -> TeacherJob | StudentJob:
    """The composed config of ``job`` (``train_teacher`` or ``train_student``), validated and converted into
    the schema's dataclasses; untyped keys (a method's parameters, a network's arguments) go to ``extra``."""
    schema = SCHEMAS[job]
    typed = validate(cfg, job)
    data = OmegaConf.to_container(typed, resolve=True)
    return _convert(schema, {k: v for k, v in data.items() if k in {f.name for f in dataclasses.fields(schema)}})


def method_config(node: Mapping[str, Any], where: str = "distill") -> DistillConfig:
    """One ``distill`` node (a method's objective keys and its own parameters) validated and converted alone,
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
    return _convert(DistillConfig, OmegaConf.to_container(typed, resolve=True))


def _convert(kind: type, data: Any) -> Any:
    """``data`` (plain containers of a validated node) as an instance of the schema dataclass ``kind``."""
    if data is None or not dataclasses.is_dataclass(kind):
        return data
    if isinstance(data, dict) and data.get("source") is not None and issubclass(kind, ModelConfig):
        kind = ExternalTeacherConfig if issubclass(kind, TeacherConfig) else ExternalModelConfig
    hints = typing.get_type_hints(kind)
    declared = {f.name for f in dataclasses.fields(kind)}
    values = {}
    for name in declared & set(data):
        hint = unwrap(hints[name])
        if typing.get_origin(hint) in (dict, Dict) and dataclasses.is_dataclass(unwrap(typing.get_args(hint)[1])):
            item = unwrap(typing.get_args(hint)[1])
            values[name] = {k: _convert(item, v) for k, v in (data[name] or {}).items()}
        else:
            values[name] = _convert(hint, data[name])
    node = kind(**values)
    node.extra = {k: v for k, v in data.items() if k not in declared}
    return node


def _require_network_names(cfg: DictConfig | dict) -> None:
    """An external network node names its model (``teacher=torchvision teacher.name=resnet18``): say so in one line."""
    for group in ("model", "teacher", "student"):
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


def _type_external_networks(typed: DictConfig, data: dict) -> dict[str, type]:
    """Type the network nodes that name a ``source`` as external networks, open for constructor arguments."""
    external = {}
    for group in ("model", "teacher", "student"):
        node = data.get(group)
        if group in typed.keys() and isinstance(node, dict) and node.get("source") is not None:
            kind = ExternalTeacherConfig if group == "teacher" else ExternalModelConfig
            typed[group] = OmegaConf.structured(kind)
            OmegaConf.set_struct(typed[group], False)
            OmegaConf.set_struct(typed[group].taps, True)  # a misspelt tap key is an error
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
    for f in sorted(dataclasses.fields(schema), key=lambda f: f.name not in ("model", "teacher", "student")):
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


def check_before_start(cfg: DictConfig | dict, job: str) -> None:
    """What a job refuses in its config before it starts, in one :class:`UserError`: the schema (:func:`load_job`)
    and, for distillation, the objective's own checks (a method's parameters, ``logit_standardize`` where no
    term compares logits, ...: :meth:`distiller.objective.Objective.from_config`)."""
    from distiller.objective import Objective

    typed = load_job(cfg, job)
    if isinstance(typed, StudentJob):
        Objective.from_config(typed.distill, typed.combine)
