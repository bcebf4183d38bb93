"""Checking a composed config against the schema, converting it, and saying in one line what is wrong.

:func:`validate` merges the composed config into the schema's dataclasses (types), then checks every
declared key's range or valid values (:func:`distiller.config.schema.key`); :func:`check_job` also gathers
each node's untyped keys into its ``extra`` field, so ``OmegaConf.to_object`` converts the result once into
the dataclasses every part of a job reads (:func:`load_job`). A mistake met on the way is one line naming
the key, what is wrong and what is valid, read from the schema's declarations
(:mod:`distiller.config.schema_messages`).
"""
from __future__ import annotations

import dataclasses
import re
import typing
from typing import Any, Collection, Dict, Mapping

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from common.errors import UserError
from distiller.config.key_scope import (
    check_cache_settings,
    check_combine_labels,
    check_options,
    check_set_keys,
    expand_home,
)
from distiller.config.pairs import check_chosen_pair
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
from distiller.config.schema_messages import describe_error, either, show, unwrap


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


def check_before_start(cfg: DictConfig | dict, job: str, set_keys: Collection[str] = ()) -> None:
    """What a job refuses in its config before it starts, in one :class:`UserError`: the schema (:func:`load_job`)
    and, for distillation, the objective's own checks (a method's parameters, ``logit_standardize`` where no
    term compares logits, ...: :meth:`distiller.objective.Objective.from_config`) and a ``pair=`` of another
    teacher or student (:func:`check_chosen_pair`); ``set_keys``: the keys the command line sets, each of which
    must be read (:func:`distiller.config.key_scope.check_set_keys`)."""
    from distiller.objective import Objective

    typed = load_job(cfg, job)
    objective = Objective.from_config(typed.distill, typed.combine) if isinstance(typed, StudentJob) else None
    if objective is not None and isinstance(cfg, DictConfig):
        check_chosen_pair(cfg)
    if set_keys and isinstance(cfg, DictConfig):
        check_set_keys(cfg, objective, set_keys)
