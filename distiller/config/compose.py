"""Composing a job's config in this process, as the command line would (Hydra's compose API).

One helper for everything that composes outside a Hydra entry point: the command-line preflight,
evaluation, the sweep tables, the benchmark and the tests. It clears Hydra's global state before and
after, so compositions never see each other.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from omegaconf import DictConfig

import distiller.config.store  # noqa: F401 - the model/teacher/student nodes and the objective base
from distiller.config.resolvers import register_resolvers

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def compose(name: str, overrides: Iterable[str] = (), return_hydra_config: bool = False) -> DictConfig:
    """``configs/<name>.yaml`` (``train_teacher`` or ``train_student``) composed with ``overrides``."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_resolvers()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            return hydra_compose(config_name=name, overrides=list(overrides), return_hydra_config=return_hydra_config)
    finally:
        GlobalHydra.instance().clear()
