"""Shared test fixtures: tiny synthetic data, Hydra config composition, subprocess runs.

Tests run on the CPU with one thread each and never touch the network.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import distiller.cli  # noqa: F401,E402 - registers the config resolvers used by composed configs
import torch

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"
SHARED = REPO.parent / "shared"

torch.set_num_threads(1)


def run_cli(script: str, *overrides: str, cwd: Path | None = None, env: dict | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
    """Run an entry point exactly as a user types it; returns the completed process."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    full_env.pop("HYDRA_FULL_ERROR", None)
    full_env.update(env or {})
    return subprocess.run([sys.executable, str(REPO / script), *overrides], cwd=cwd or REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def tiny_overrides(tmp: Path, train_size: int = 200, test_size: int = 100) -> list[str]:
    """Overrides for a tiny, fast CPU run on synthetic data inside ``tmp``."""
    return [
        "dataset=synthetic", f"dataset.root={tmp / 'data'}", f"dataset.train_size={train_size}",
        f"dataset.test_size={test_size}", "dataset.batch_size=32", "dataset.eval_batch_size=100",
        "trainer.epochs=1", "trainer.device=cpu", "trainer.progress=false", f"teacher_dir={tmp / 'teachers'}",
    ]


@pytest.fixture
def compose():
    """Compose a primary config with overrides through Hydra's compose API."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    def _compose(config_name: str, overrides: list[str] = (), return_hydra_config: bool = False):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            return hydra_compose(config_name=config_name, overrides=list(overrides),
                                 return_hydra_config=return_hydra_config)

    yield _compose
    GlobalHydra.instance().clear()
