"""Shared test fixtures: tiny synthetic data, Hydra config composition, subprocess runs, seeds, descent checks.

Tests run on the CPU with one thread each and never touch the network.

Robustness knobs (environment variables, read once per session):

``KD_TEST_SEED_OFFSET`` (integer, default 0)
    Added to every seed the tests use: an autouse fixture seeds ``torch``, NumPy and ``random``
    with ``seed(0)`` before each test, and tests build their own generators with ``seed(k)`` /
    ``generator(k)`` instead of literal seeds. ``KD_TEST_SEED_OFFSET=1 pytest ...`` reruns the
    suite on other random networks and batches: a test that only passes for one draw is fragile.
``KD_TEST_MKLDNN`` (``0`` or ``1``, default: leave PyTorch's setting alone)
    Sets ``torch.backends.mkldnn.enabled`` for the whole session, so the suite can be run on
    the oneDNN kernels and on ATen's own ones (they block and round differently).
``KD_AUTO_PRECISION`` (``fp32`` or ``bf16``, default: the CPU decides)
    What ``trainer.precision=auto`` resolves to on the CPU (read by :mod:`distiller.engine.runtime`, so
    in-process jobs and the subprocesses the tests start alike). ``KD_AUTO_PRECISION=bf16`` runs
    the suite as a CPU with native bf16 (AVX-512 BF16, AMX) runs it, on any machine; CI runs the
    numeric end-to-end tests (marker ``numeric``) that way. A test that compares numbers from a
    job therefore pins ``trainer.precision`` or asserts only what holds in every precision.
``KD_NUMERIC_AUTO_PRECISION`` (``fp32`` or ``bf16``, default: unset)
    The same, for the tests marked ``numeric`` only: ``KD_NUMERIC_AUTO_PRECISION=bf16 pytest -m "numeric or
    slow"`` runs those as a native-bf16 CPU would (the slow ones among them too: the torchrun run and
    most SIGKILL resumes) and the other slow ones as this CPU does, in one session balanced over the
    cores (CI does this).
"""
from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch
from helpers import seed

import distiller.config.compose  # noqa: F401 - the config store and resolvers composed configs use
from common.registry import Registry

torch.set_num_threads(1)

_MKLDNN = os.environ.get("KD_TEST_MKLDNN", "").strip()
if _MKLDNN not in ("", "0", "1"):
    raise ValueError(f"KD_TEST_MKLDNN must be 0 or 1, got {_MKLDNN!r}")


def pytest_report_header(config) -> str:
    from distiller.engine.runtime import auto_precision

    forced = os.environ.get("KD_AUTO_PRECISION")
    how = f"forced by KD_AUTO_PRECISION={forced}" if forced else "this CPU's choice"
    return f"trainer.precision=auto resolves to {auto_precision(torch.device('cpu'))} on the CPU ({how})"


@pytest.fixture(autouse=True)
def _seed_everything():
    """Every test starts from the same (offset) state of the global generators."""
    torch.manual_seed(seed(0))
    np.random.seed(seed(0))
    random.seed(seed(0))


@pytest.fixture(scope="session", autouse=True)
def _mkldnn_switch():
    """``KD_TEST_MKLDNN=0|1`` switches oneDNN kernels off / on for the whole session."""
    if not _MKLDNN:
        yield
        return
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = _MKLDNN == "1"
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before


@pytest.fixture(autouse=True)
def _numeric_auto_precision(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """``KD_NUMERIC_AUTO_PRECISION`` becomes ``KD_AUTO_PRECISION`` for the tests marked ``numeric``."""
    value = os.environ.get("KD_NUMERIC_AUTO_PRECISION", "").strip()
    if value and request.node.get_closest_marker("numeric"):
        monkeypatch.setenv("KD_AUTO_PRECISION", value)


@pytest.fixture
def register():
    """Register toys for one test only (other tests check the registries' exact contents)."""
    added: list[tuple[Registry, str]] = []

    def _register(registry: Registry, name: str, obj) -> None:
        registry.add(name, obj)
        added.append((registry, name))

    yield _register
    for registry, name in added:
        registry.remove(name)


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may reach the network: torchvision's download and, as a guard, urlopen both fail."""
    import urllib.error
    import urllib.request

    import torchvision.datasets.utils as tv_utils

    def refuse(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(tv_utils, "download_url", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)


@pytest.fixture
def compose():
    """Compose a primary config with overrides through Hydra's compose API."""
    from distiller.config.compose import compose as compose_config

    return compose_config
