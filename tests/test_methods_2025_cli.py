"""Every method of 2023-2026 trains one epoch from the command line, on the built-in synthetic data.

``python train_student.py ... distill=<name>`` runs in this process (:func:`helpers.run_cli`) with a
torchvision teacher (resnet18 with a CIFAR stem), a random network saved as the teacher checkpoint;
with a zoo teacher, every method's epoch is tests/test_entry_points.py's. What is tested is that the
method's wiring runs end to end (features, classifier, calibration pass, checkpoint, metrics), not its
accuracy. Tiny sizes: 10 classes, 20 training images, 2 steps; fp32.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import run_cli, seed

from models.external import build_network

METHODS_2025 = ["rld", "luminet", "skd", "abkd", "eakd", "eakd_dkd", "normkd", "normkd_dkd", "wkd_l", "wkd_f",
                "sdd_kd", "sdd_dkd", "sdd_nkd", "cat_kd"]
CLASSES = 10
TORCHVISION = {"source": "torchvision", "name": "resnet18", "cifar_stem": True}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A random torchvision teacher checkpoint and a data folder shared by the runs."""
    tmp = tmp_path_factory.mktemp("methods_2025_cli")
    torch.manual_seed(seed(11))
    torch.save({"model": build_network(TORCHVISION, CLASSES, role="teacher").state_dict()}, tmp / "resnet18.pt")
    return tmp


def overrides(tmp: Path, run: str) -> list[str]:
    return ["student=resnet8", "dataset=synthetic", f"dataset.root={tmp / 'data'}", f"dataset.num_classes={CLASSES}",
            "dataset.train_size=20", "dataset.test_size=10", "dataset.batch_size=10", "dataset.eval_batch_size=20",
            "trainer.epochs=1", "trainer.device=cpu", "trainer.precision=fp32", "trainer.eval_precision=fp32",
            "trainer.progress=false", "logger=none", f"teacher_dir={tmp / 'teachers'}", f"hydra.run.dir={tmp / run}"]


TEACHERS = {
    "torchvision": lambda tmp: ["teacher=torchvision", "teacher.name=resnet18", "teacher.cifar_stem=true",
                                f"teacher.ckpt={tmp / 'resnet18.pt'}"],
}


@pytest.mark.parametrize("teacher", sorted(TEACHERS))
@pytest.mark.parametrize("method", METHODS_2025)
def test_one_epoch_from_the_command_line(workdir: Path, method: str, teacher: str) -> None:
    run = f"{method}_{teacher}"
    result = run_cli("train_student.py", f"distill={method}", *TEACHERS[teacher](workdir), *overrides(workdir, run))
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((workdir / run / "metrics.json").read_text())
    assert metrics["status"] == "finished" and metrics["method"] == method
    (record,) = metrics["epochs"]
    # the method's own term was computed and recorded (every term is named after its method)
    assert math.isfinite(record[f"loss_{method}"]) and math.isfinite(record["train_loss"])
    last = torch.load(workdir / run / "last.pt", weights_only=True)
    assert last["run"]["finished"]
    if method == "wkd_l":  # the cost matrix of the calibration pass is in the checkpoint
        cost = last["objective"]["methods.wkd_l.cost"]
        assert cost.shape == (CLASSES, CLASSES) and last["run"]["calibrated"]
        off_diagonal = cost[~torch.eye(CLASSES, dtype=torch.bool)]
        assert torch.isfinite(cost).all() and (off_diagonal > 0).all() and (off_diagonal < 1).all()
