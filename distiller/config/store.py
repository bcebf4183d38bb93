"""Hydra's ConfigStore for the two jobs: their schemas, and the model zoo's config groups.

The groups ``model``, ``teacher`` and ``student`` have no YAML files: one node per registered
architecture is generated from the model registry (name, and the ``lr`` the model file declares),
so adding a model is adding its file in ``models/``; and one per network source outside the zoo
(``torchvision``, ``timm``, ``module``: :mod:`models.external`), whose nodes carry further keys.
Importing this module fills the store. It also holds the base every ``configs/distill/<name>.yaml``
pulls in (``_objective``): the objective keys at the schema's defaults.
"""
from __future__ import annotations

from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf, open_dict

from distiller.config.schema import (
    EXTRA,
    NETWORK_GROUPS,
    PUBLISHED_TEACHER_TOP1,
    SCHEMAS,
    ExternalModelConfig,
    ExternalTeacherConfig,
    ModelConfig,
    TeacherConfig,
    objective_defaults,
)
from models import MODEL_METADATA_DEFAULTS, MODELS, list_models, model_metadata
from models.external import SOURCES

OBJECTIVE_BASE = "_objective"  # the distill group's base (configs/distill/*.yaml: defaults)


def model_nodes(arch: str) -> dict[str, Any]:
    """The ``model``, ``student`` and ``teacher`` config nodes of one registered architecture."""
    lr = float(model_metadata(arch)["lr"])
    return {
        "model": ModelConfig(name=arch, lr=lr),
        "student": ModelConfig(name=arch, lr=lr),
        # train_teacher.py model=<arch> writes the default checkpoint
        "teacher": TeacherConfig(name=arch, lr=lr, ckpt=f"${{teacher_dir}}/{arch}.pt",
                                 published_top1=PUBLISHED_TEACHER_TOP1.get(arch), verify=True),
    }


def external_nodes(source: str) -> dict[str, Any]:
    """The ``model``, ``student`` and ``teacher`` nodes of a network source (``teacher=torchvision``).

    ``name`` is the library's model name (module: the import path); ``lr`` is the zoo's default; the
    teacher's checkpoint is where ``train_teacher.py model=<source> model.name=<name>`` stores it.
    """
    common = dict(source=source, name="${._target_}" if source == "module" else MISSING,
                  lr=float(MODEL_METADATA_DEFAULTS["lr"]), _target_=MISSING if source == "module" else None)
    return {
        "model": ExternalModelConfig(**common),
        "student": ExternalModelConfig(**common),
        "teacher": ExternalTeacherConfig(**common, ckpt="${teacher_dir}/${.source}-${.name}.pt", published_top1=None,
                                         verify=True),
    }


def _without_extra(node: Any) -> DictConfig:
    """A typed node as composition sees it: without the ``extra`` field, which checking fills (its keys are
    written beside the declared ones: ``+teacher.width=2``)."""
    typed = OmegaConf.structured(node)
    with open_dict(typed):
        del typed[EXTRA]
    return typed


def register_configs(store: ConfigStore | None = None) -> None:
    """Fill Hydra's ConfigStore: the job schemas, and one model/teacher/student node per architecture
    and per network source (torchvision, timm, module).

    Each architecture is also stored under its lower-case spelling and its aliases (``model=mobilenetv2``).
    """
    store = store or ConfigStore.instance()
    for job, schema in SCHEMAS.items():
        store.store(group="schema", name=job, node=schema)
    for arch in list_models():
        spellings = dict.fromkeys([arch, arch.lower(), *MODELS.aliases(arch)])
        for group, node in model_nodes(arch).items():
            for spelling in spellings:
                store.store(group=group, name=spelling, node=node)
    for source in SOURCES.names():
        for group, node in external_nodes(source).items():
            store.store(group=group, name=source, node=_without_extra(node))
    # what every configs/distill/<name>.yaml pulls in first: the objective keys at the schema's defaults
    store.store(group="distill", name=OBJECTIVE_BASE, node=objective_defaults())


def group_options(group: str) -> list[str]:
    """Names a config group offers from the ConfigStore (canonical architecture names for the model groups)."""
    if group in NETWORK_GROUPS:
        return list_models() + SOURCES.names()
    entries = ConfigStore.instance().repo.get(group, {})
    return sorted(name.removesuffix(".yaml") for name in entries if isinstance(name, str) and name.endswith(".yaml")
                  and not name.startswith("_"))  # a base other configs pull in, not a choice


def share_store_on_copy() -> None:
    """Let a deep copy of Hydra's ConfigStore be the store itself.

    Hydra deep-copies its config repository at every composition (``CachingConfigRepository``), and the
    repository holds the ConfigStore: every composition copied all of our ~200 nodes (0.1 s each time,
    three or four times per job start, 6 s for ``--help``, which composes once per config group).
    Composition only reads the store, and ``ConfigStore.load`` copies each node it hands out, so sharing
    the store instead of copying it changes no configuration.
    """
    ConfigStore.__deepcopy__ = lambda self, memo: self  # type: ignore[attr-defined]


register_configs()
share_store_on_copy()
