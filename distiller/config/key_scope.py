"""Where a key of the schema applies: nothing is recorded that the run then ignores.

* A key only some data sets or optimizers read (``dataset.train_size`` is synthetic's, ``optim.delta``
  DOT's) is refused when set (not null) for another one. Which entry reads which key is declared where
  it registers (``options=(...)``: datasets/, distiller/optim.py); the schema declares that the key exists.
* A key of the ``logger`` node that only one backend reads (W&B's ``project``, ``mode``, ...: declared where
  the backend registers, ``options=(...)``, distiller/engine/run_log.py) is refused when set (not null,
  not an empty list) for a run whose ``logger.backends`` lack that backend.
* A top-level key added on the command line (``+foo=1``) must be a key of the job. (A preset's own
  top-level table, read by its interpolations, comes from a file and is not refused.)
* A key set on the command line must be read (:func:`check_set_keys`): a network's ``lr`` that ``optim.lr``
  does not follow (the teacher's when distilling; the trained network's once ``optim.lr`` is set); a
  combined method's ``gamma`` / ``alpha`` / ``temperature`` / ``logit_standardize`` (the primary
  ``distill`` node sets them for the whole objective); ``distill.temperature`` where no term runs at it
  (``alpha=0`` and no method reads it, or a method supplies its own, CTKD's learned T, which also
  replaces DKD's); a warm-up of a method whose ``beta`` is 0. A preset's values are not refused, only
  what the command line sets: a sweep over a key nobody reads stops before its first run.
* ``teacher.cache_dir`` / ``cache_dtype`` only with ``teacher.cache=true`` (:func:`check_cache_settings`).
* A path key (declared with ``path=True``) may start with ``~``: it is read as the home folder.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
import typing
from collections.abc import Collection, Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf

from common.errors import UserError
from common.registry import Registry
from datasets import DATASETS
from distiller.config.schema import SCHEMAS, ExternalModelConfig, ExternalTeacherConfig, ModelConfig, TeacherConfig
from distiller.engine.run_log import BACKENDS
from distiller.optim import OPTIMIZERS

# the groups whose entries declare, where they register (options=...), which optional keys of the group they read
OPTION_READERS: dict[str, Registry] = {"dataset": DATASETS, "optim": OPTIMIZERS}


def option_error(group: str, node: Mapping[str, Any], key: str, value: Any) -> str | None:
    """The one-line refusal of ``<group>.<key>`` in ``node`` (a ``dataset`` or ``optim`` node) when the entry
    it names does not read that key but another entry of the group does; None when the key is fine there."""
    registry = OPTION_READERS.get(group)
    name = node.get("name") if registry is not None else None
    if name is None or str(name) not in registry or key in registry.metadata(str(name)).get("options", ()):
        return None
    readers = [f"{group}={n}" for n in _readers(registry, key)]
    if not readers:
        return None  # a key every entry reads, or none: not an entry's own
    setting = f"{group}.{key}" + ("" if value is None else f"={_shown(value)}")
    return (f"{setting} is a key of {' and '.join(readers)}, not of {group}={registry.canonical(str(name))}; "
            f"remove it or use {' or '.join(readers)}")


def _readers(registry: Registry, key: str) -> list[str]:
    """The entries of ``registry`` that declare, where they register, that they read ``key`` (``options=``)."""
    return [n for n in registry.names() if key in registry.metadata(n).get("options", ())]


def check_options(config: Mapping[str, Any], given: Mapping[str, Any]) -> None:
    """Every key set (not null) in the ``dataset`` and ``optim`` nodes of ``config`` is read by the entry the
    node names (:func:`option_error`), and the entry's own check of its settings passes (``check=`` where it
    registers); every key set in the ``logger`` node is read by one of its backends. ``given``: the same
    config as written, for the message."""
    for group in OPTION_READERS:
        node = config.get(group)
        if not isinstance(node, Mapping):
            continue
        written = given.get(group) if isinstance(given.get(group), Mapping) else {}
        for key in node.keys():
            value = node[key]
            message = None if value is None else option_error(group, node, str(key), written.get(key, value))
            if message:
                raise UserError(message)
        name = node.get("name")
        check = OPTION_READERS[group].metadata(str(name)).get("check") if name in OPTION_READERS[group] else None
        if check is not None:  # the entry's own refusal of its settings (datasets/base.py: check=)
            check(node)
    logger = config.get("logger")
    if isinstance(logger, Mapping):
        for key in logger.keys():
            message = _backend_option_error(logger, str(key), logger[key])
            if message:
                raise UserError(message)


def _backend_option_error(logger: Mapping[str, Any], key: str, value: Any) -> str | None:
    """The one-line refusal of ``logger.<key>`` when only backends the run does not use read it."""
    readers = _readers(BACKENDS, key)
    used = [str(b) for b in logger.get("backends") or ()]
    if value is None or (not isinstance(value, str) and not value) or not readers or set(readers) & set(used):
        return None
    return (f"logger.{key}={_shown(value)} is read only by the {' and '.join(readers)} backend, which this run does "
            f"not use (logger.backends: [{', '.join(used)}]); add logger={readers[0]}, or drop it")


def check_added_keys(keys: list[str], job: str) -> None:
    """Top-level keys added on the command line (``+foo=1``) must be keys of ``job``: one nobody reads
    would be recorded and ignored."""
    known = {f.name for f in dataclasses.fields(SCHEMAS[job])}
    for key in keys:
        if key not in known and key != "hydra":
            close = difflib.get_close_matches(str(key), sorted(known), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]}?" if close else "; check the spelling"
            raise UserError(f"config key '{key}' does not exist in {job}'s config{hint} "
                            f"(valid keys: {', '.join(sorted(known))})")


def check_set_keys(config: DictConfig, objective: Any, set_keys: Collection[str]) -> None:
    """Each key in ``set_keys`` (the keys the command line sets) that may go unread is read: a learning rate
    of a network (:func:`_check_learning_rates`), an objective key (a term of ``objective``, the
    :class:`distiller.objective.Objective` built from ``config``; None for a teacher's job). ``config``: the
    composed job before resolution."""
    _check_learning_rates(config, set_keys)
    if "teacher.weights" in set_keys and "student" in config:
        raise UserError("teacher.weights is not read here: a student run loads the whole teacher from teacher.ckpt "
                        "(library weights initialise a network before it trains: train_teacher.py model.weights=..., "
                        "or student.weights=...); drop it")
    if objective is not None:
        _check_objective_keys(config, objective, set_keys)


def _check_learning_rates(config: DictConfig, set_keys: Collection[str]) -> None:
    """A network's ``lr`` is the default of ``optim.lr`` for the network a job trains: the teacher's is not
    read when distilling, and neither is the trained network's once ``optim.lr`` is set itself."""
    if "teacher.lr" in set_keys and "student" in config:
        raise UserError("teacher.lr is not read here: it is the teacher's own learning rate when it is trained "
                        "(train_teacher.py model.lr=...); the student's is student.lr or optim.lr")
    written = OmegaConf.to_container(config.optim, resolve=False).get("lr") if "optim" in config else None
    for key in ("student.lr", "model.lr"):
        if key in set_keys and key.split(".")[0] in config and key not in str(written):
            raise UserError(f"{key} has no effect here: optim.lr={_shown(written)} sets the learning rate, and "
                            f"{key} is only its default; set optim.lr instead, or drop one of them")


def _check_objective_keys(config: DictConfig, objective: Any, set_keys: Collection[str]) -> None:
    """Each objective key in ``set_keys`` (``distill.<key>``, ``combine.<label>.<key>``) reaches a term of
    ``objective``."""
    for key in sorted(set_keys):
        parts = key.split(".")
        combined = parts[0] == "combine" and len(parts) == 3
        if not (combined or (parts[0] == "distill" and len(parts) == 2)):
            continue
        label, name = (parts[1], parts[2]) if combined else (str(config.distill.name), parts[1])
        node = f"combine.{label}" if combined else "distill"
        entry = next((e for e in objective.entries if e.label == label), None)
        if name.endswith("temperature") and entry is not None and entry.method.takes_temperature \
                and objective.supplied_temperature() is not None:
            raise UserError(f"{key} has no effect here: a method supplies the temperature of every logit term "
                            f"(CTKD's learned T), and it replaces {label}'s own; drop it")
        if combined and name == "logit_standardize":
            raise UserError(f"{key} is not read: distill.logit_standardize standardises the logits of every logit "
                            f"term of the objective, the combined methods' too; set that one instead")
        if combined and name in ("gamma", "alpha", "temperature") \
                and not (name == "temperature" and _interpolated(config.combine[label], "temperature")):
            raise UserError(f"{key} is not read: the primary method's node sets gamma, alpha and temperature for "
                            f"the whole objective (distill.{name}); a combined method takes beta, warmup_epochs "
                            f"and its own keys")
        if name == "warmup_epochs" and entry is not None and entry.beta == 0 and entry.warmup_epochs > 0:
            raise UserError(f"{key}={entry.warmup_epochs} has no effect here: the warm-up ramps the method's "
                            f"weight {node}.beta, which is 0 (the KD term, distill.alpha, has no warm-up); "
                            f"drop it, or give {node}.beta a weight")
        if key == "distill.temperature" and not objective.reads_temperature() \
                and not _interpolated(config.distill, "temperature"):
            setting = f"distill.temperature={_shown(OmegaConf.select(config, key))}"
            if objective.supplied_temperature() is not None:
                raise UserError(f"{setting} has no effect here: a method supplies the temperature of every logit "
                                f"term (CTKD's learned T); drop it")
            own = [f"distill.{k}" for k in config.distill if str(k).endswith("_temperature")]
            instead = f", or set {' / '.join(own)} (the method's own)" if own else ""
            raise UserError(f"{setting} has no effect here: distill.alpha=0 turns the KD term off and no method here "
                            f"runs at it; drop it, or set distill.alpha > 0 for a KD term at it{instead}")


def _interpolated(node: DictConfig, key: str) -> bool:
    """Whether another value of ``node`` (as written, before resolution) reads ``node.<key>``
    (``dkd_temperature: ${.temperature}``)."""
    pattern = re.compile(r"\$\{\." + re.escape(key) + r"\}")
    written = OmegaConf.to_container(node, resolve=False)
    return any(isinstance(v, str) and pattern.search(v) for k, v in written.items() if k != key)


def check_cache_settings(typed: DictConfig) -> None:
    """``teacher.cache_dir`` / ``cache_dtype`` say where and how the cache is kept: without the cache they
    would be recorded and ignored."""
    teacher = typed.get("teacher")
    if not isinstance(teacher, DictConfig) or "cache" not in teacher or teacher.cache:
        return
    for key, unset in (("cache_dir", None), ("cache_dtype", "fp32")):
        if teacher.get(key) != unset:
            raise UserError(f"teacher.{key}={teacher.get(key)} is read only with teacher.cache=true; add "
                            f"teacher.cache=true, or drop teacher.{key}")


def check_combine_labels(combine: Mapping[str, Any]) -> None:
    """``combine`` maps labels to method nodes: ``+distill@combine=METHOD`` (no label) put the method's own
    keys there instead."""
    unlabelled = [name for name, node in combine.items() if not isinstance(node, Mapping)]
    if unlabelled:
        raise UserError(f"combine holds {unlabelled[0]}={combine[unlabelled[0]]}, not a method under a label: "
                        f"combine a method with +distill@combine.<label>=METHOD")


def combine_label_message(label: str, known: list[str] | None = None) -> str:
    """One line for a key of ``combine.<label>`` where no method is combined under ``label``."""
    close = difflib.get_close_matches(label, known or [], n=1, cutoff=0.6)
    here = f"combined here: {', '.join(known)}; " if known else ""
    hint = f"did you mean combine.{close[0]}? " if close else ""
    return (f"no method is combined under the label '{label}' ({here}{hint}add one with "
            f"+distill@combine.{label}=METHOD; then combine.{label}.KEY=VALUE sets its keys)")


def expand_home(data: dict[str, Any], schema: type) -> None:
    """In ``data`` (a resolved config as plain containers), a leading ``~`` of every path key of ``schema``
    replaced by the home folder, as a shell would have done."""
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        value = data.get(f.name)
        if f.metadata.get("path") and isinstance(value, str):
            data[f.name] = os.path.expanduser(value)
        elif isinstance(value, dict):
            kind = _dataclass_in(hints.get(f.name))
            if kind is not None and value.get("source") is not None and issubclass(kind, ModelConfig):
                kind = ExternalTeacherConfig if issubclass(kind, TeacherConfig) else ExternalModelConfig
            if kind is not None:
                expand_home(value, kind)


def _dataclass_in(hint: Any) -> type | None:
    """The dataclass a field's type names (``X``, ``X | None``), else None."""
    for kind in (hint, *typing.get_args(hint)):
        if dataclasses.is_dataclass(kind):
            return kind
    return None


def _shown(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)
