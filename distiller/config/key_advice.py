"""What to say about a key the composed config does not have: ``+KEY=VALUE`` only where it has an effect.

A key added with ``+`` is recorded in the run's config, so advice to add one must be right. It is
offered where a constructor takes the key (a method's own parameter, ``distill.<p>`` or
``combine.<label>.<p>``; an outside network's argument, ``teacher.<arg>`` for ``teacher=torchvision``),
and for a key of the schema that this config's files leave out once the config *with* it passes
everything a run checks before it starts (validation, the objective): ``+distill.logit_standardize=true``
is offered for a method with a KD term, and on one without, the objective's own refusal is the message.
Anything else is a misspelling (the closest key is named) or a key of another data set or optimizer.
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import typing
from typing import Any

from omegaconf import DictConfig, OmegaConf

from distiller.config.before_start import check_before_start
from distiller.config.compose import CONFIG_DIR, compose
from distiller.config.key_scope import combine_label_message, option_error
from distiller.config.overrides import override_key
from distiller.config.resolvers import switch_value
from distiller.config.schema import (
    NETWORK_GROUPS,
    RENAMED,
    SCHEMAS,
    ExternalModelConfig,
    ExternalTeacherConfig,
    ModelConfig,
    TeacherConfig,
)


def unknown_key_message(config_name: str | None, overrides: list[str], key: str) -> str:
    """One line for an override of ``key`` that Hydra refused because ``key`` is not in the config
    composed from ``configs/<config_name>.yaml`` with ``overrides`` (all of them, that one included)."""
    mine = [o for o in overrides if override_key(o) == key]
    rest = [o for o in overrides if override_key(o) != key]
    if "@" in key:  # GROUP@PACKAGE=OPTION puts a config file into a package: only as an addition
        return f"'{key}' puts a {key.split('@')[0]} file into {key.split('@')[1]}, which adds it: write +{mine[-1]}" \
            if mine else f"config key '{key}' does not exist; a GROUP@PACKAGE override is written with a leading +"
    if key.startswith("pair.") and not any(override_key(o) == "pair" for o in overrides) and _pair_key(key):
        return (f"config key '{key}' exists only with a pair preset: choose one with pair=TEACHER-STUDENT "
                f"(python train_student.py pair=resnet56-resnet20 {mine[-1] if mine else key + '=...'})")
    cfg = _composed(config_name, rest)
    parts = key.split(".")
    if len(parts) > 1 and parts[0] in NETWORK_GROUPS and parts[1] in RENAMED:  # a network's key
        return f"config key '{key}' was renamed; use {'.'.join([parts[0], RENAMED[parts[1]], *parts[2:]])}"
    parent = _node(cfg, parts[:-1])
    combined = _node(cfg, ["combine"])
    if len(parts) > 2 and parts[0] == "combine" and isinstance(combined, DictConfig) and parts[1] not in combined:
        return combine_label_message(parts[1], [str(k) for k in combined.keys()])
    elsewhere = _where_it_applies(config_name, parts)
    if not isinstance(parent, DictConfig):
        return f"config key '{key}' {elsewhere or 'does not exist; check the spelling'}"
    method = parent.get("method") if parts[0] in ("distill", "combine") else None
    params = _method_parameters(str(method)) if method is not None else None
    if params is not None and parts[-1] in params:
        return _add_it(key, f"a parameter of method '{method}'")
    if parts[0] in NETWORK_GROUPS and len(parts) == 2 and parent.get("source") is not None:
        return _add_it(key, f"an argument of the {parent.get('source')} network's constructor")
    other = option_error(parts[-2] if len(parts) > 1 else "", parent, parts[-1], None)
    if other:
        return other
    if config_name in SCHEMAS and _declared(SCHEMAS[config_name], parts) and mine:
        refusal = _refusal_with(config_name, rest + ["++" + o.lstrip("+") for o in mine])
        if refusal is None and _is_off(mine[-1]):  # a switch set off is accepted anywhere: does it apply here?
            refused_on = _refusal_with(config_name, rest + [f"++{key}=true"])
            if refused_on:
                return f"config key '{key}' does not apply here, on or off: leave it out ({refused_on})"
        return refusal or _add_it(key, "a key of the schema that applies here; this config's files leave it out")
    if elsewhere:
        return f"config key '{key}' {elsewhere}"
    known = [str(k) for k in parent.keys()] + list(params or ())
    close = difflib.get_close_matches(parts[-1], known, n=1, cutoff=0.6)
    hint = f"did you mean {'.'.join([*parts[:-1], close[0]])}?" if close else "check the spelling"
    takes = "" if params is None else f" (method '{method}' takes {', '.join(params) or 'no parameters of its own'})"
    return f"config key '{key}' does not exist; {hint}{takes}"


def _is_off(override: str) -> bool:
    """Whether ``override`` sets a switch off (``KEY=false``, ``no``, ``off``, ``0``: as the schema reads them)."""
    return switch_value(override.split("=", 1)[1] if "=" in override else "") is False


def _add_it(key: str, what: str) -> str:
    return f"config key '{key}' is not set in this config; add it with +{key}=VALUE ({what})"


def _composed(config_name: str | None, overrides: list[str]) -> DictConfig | None:
    if config_name is None:
        return None
    try:
        return compose(config_name, overrides)
    except Exception:  # noqa: BLE001 - advice only: without this config, the message is a general one
        return None


def _refusal_with(config_name: str, overrides: list[str]) -> str | None:
    """What a run with these overrides is refused for before it starts (None: nothing), in one line:
    the config's validation, then (distillation) the objective's own checks."""
    from common.errors import UserError

    try:
        check_before_start(compose(config_name, overrides), config_name)
    except UserError as err:
        return str(err)
    except Exception:  # noqa: BLE001 - a composition error: no advice to add it either
        return f"config key '{override_key(overrides[-1])}' cannot be set here; check the spelling"
    return None


def _pair_key(key: str) -> bool:
    """Whether a pair preset (``configs/pair/*.yaml``) sets ``key`` (``pair.dkd_nckd_weight``)."""
    return any(OmegaConf.select(OmegaConf.load(path), key) is not None for path in (CONFIG_DIR / "pair").glob("*.yaml"))


def _where_it_applies(config_name: str | None, parts: list[str]) -> str | None:
    """Where a rightly spelt key this config lacks is read: by a network from outside the zoo, or by the
    other entry point (None: nowhere, a misspelling)."""
    if config_name in SCHEMAS and _declared(SCHEMAS[config_name], parts):
        return None
    if parts[0] in NETWORK_GROUPS and len(parts) > 1:
        outside, zoo = (ExternalTeacherConfig, TeacherConfig) if parts[0] == "teacher" else (ExternalModelConfig,
                                                                                             ModelConfig)
        if _declared(outside, parts[1:]) and not _declared(zoo, parts[1:]):
            return f"applies only to a network from outside the zoo ({parts[0]}=torchvision, timm or module)"
    if config_name not in SCHEMAS:  # a config of its own (benchmark.yaml) builds on an entry point's: not this
        return None
    for other, schema in SCHEMAS.items():
        if other != config_name and _declared(schema, parts):
            return f"is read by {other}.py, not by this command"
    return None


def _declared(schema: type, parts: list[str]) -> bool:
    """Whether the schema declares the key ``parts`` (``combine.<label>.<key>`` as a ``DistillConfig`` key)."""
    kind: Any = schema
    for part in parts:
        hints = typing.get_type_hints(kind) if dataclasses.is_dataclass(kind) else {}
        if part in hints:
            kind = hints[part]
        elif typing.get_origin(kind) in (dict, typing.Dict):
            kind = typing.get_args(kind)[1]
        else:
            return False
        kind = next((k for k in (kind, *typing.get_args(kind)) if dataclasses.is_dataclass(k)), kind)
    return True


def _node(cfg: DictConfig | None, path: list[str]) -> Any:
    node: Any = cfg
    for part in path:
        if not isinstance(node, DictConfig) or part not in node:
            return None
        node = node._get_node(part)
    return node


def _method_parameters(method: str) -> list[str] | None:
    """The keyword parameters a method's constructor names (None for an unknown method). A bare
    ``**kwargs`` does not count: a method without its own constructor inherits ``nn.Module``'s."""
    from distiller.methods import METHODS

    if method not in METHODS:
        return None
    params = inspect.signature(METHODS.get(method).__init__).parameters.values()
    return [p.name for p in params if p.name != "self"
            and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
