"""The two entry points as a user runs them: teacher training, then one epoch of every method."""
from __future__ import annotations

import inspect
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import CONFIGS, run_cli, tiny_overrides, train_tiny_teacher

from distiller.jobs.train import distill
from distiller.methods import METHODS
from models import build_model

PINNED_EPOCH_KEYS = {"epoch", "train_loss", "test_top1", "test_top5", "lr"}
CIFAR_MEAN, CIFAR_STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)


def naive_top1(model: torch.nn.Module, data_dir: Path) -> float:
    """Test top-1 computed from the raw pickle, one image at a time (independent of our loader)."""
    with open(data_dir / "test", "rb") as f:
        test = pickle.load(f, encoding="latin1")
    images = np.asarray(test["data"], dtype=np.float32).reshape(-1, 3, 32, 32) / 255.0
    mean, std = np.array(CIFAR_MEAN).reshape(3, 1, 1), np.array(CIFAR_STD).reshape(3, 1, 1)
    model.eval()
    correct = 0
    with torch.no_grad():
        for image, label in zip(images, test["fine_labels"]):
            x = torch.from_numpy(((image - mean) / std).astype(np.float32))[None]
            correct += int(model(x).argmax(1).item() == label)
    return 100.0 * correct / len(images)


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("train")
    # a drop after epoch 1, and one after epoch 5 that a 2-epoch run never reaches (the run says so)
    result = train_tiny_teacher(tmp, "trainer.epochs=2", "schedule.milestones=[1,5]", "schedule.gamma=0.1")
    assert "final test top-1" in result.stdout
    (tmp / "teacher_output.txt").write_text(result.stdout + result.stderr)
    return tmp


def test_teacher_run_directory(teacher_run):
    run = teacher_run / "teacher_run"
    for name in ("config.yaml", "metrics.json", "last.pt", "best.pt", "final.pt"):
        assert (run / name).is_file(), name
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "finished"
    assert len(metrics["epochs"]) == 2
    for record, lr in zip(metrics["epochs"], (0.05, 0.005)):  # the zoo's lr, then x0.1 after milestone 1
        assert PINNED_EPOCH_KEYS <= set(record)
        assert 0.0 <= record["test_top1"] <= record["test_top5"] <= 100.0
        assert record["lr"] == pytest.approx(lr)
    assert metrics["final_top1"] == metrics["epochs"][-1]["test_top1"]
    assert metrics["final_top5"] == metrics["epochs"][-1]["test_top5"]
    assert metrics["best_top1"] == max(r["test_top1"] for r in metrics["epochs"])
    config = (run / "config.yaml").read_text()
    assert "resnet8" in config and "synthetic" in config


def test_a_milestone_the_run_never_reaches_is_named_once(teacher_run):
    """schedule.milestones=[1,5] with 2 epochs: the drop after epoch 5 cannot happen; the run says so, once."""
    said = [line for line in (teacher_run / "teacher_output.txt").read_text().splitlines() if "milestones" in line]
    assert len(said) == 1 and "the drop after epoch 5 never happens" in said[0], said


def test_the_240_epoch_milestones_in_a_shorter_run_are_named_with_the_published_shape():
    from distiller.engine.plan import unreached_milestones

    assert unreached_milestones([150, 180, 210], 240) is None  # the published recipe: every drop happens
    assert "the drop after epoch 210 never happens" in unreached_milestones([150, 180, 210], 200)
    short = unreached_milestones([150, 180, 210], 100)  # 150/180/210 of 240 -> 62.5/75/87.5 of 100
    assert "the lr never drops" in short and short.endswith("schedule.milestones=[62,75,87]")


def test_final_accuracy_matches_an_independent_evaluation(teacher_run):
    run = teacher_run / "teacher_run"
    final = torch.load(run / "final.pt", weights_only=True)
    model = build_model("resnet8")
    model.load_state_dict(final["model"], strict=True)
    data_dir = next((teacher_run / "data").glob("synthetic-*/cifar-100-python"))
    metrics = json.loads((run / "metrics.json").read_text())
    # batched vs one-image convolutions may round differently: allow one near-tie flip of 100 images
    assert naive_top1(model, data_dir) == pytest.approx(metrics["final_top1"], abs=1.0 + 1e-6)


def test_teacher_is_stored_where_teacher_arch_looks(teacher_run):
    stored = teacher_run / "teachers" / "resnet8.pt"
    checkpoint = torch.load(stored, weights_only=True)
    assert checkpoint["arch"] == "resnet8"
    build_model("resnet8").load_state_dict(checkpoint["model"], strict=True)


# what keeps a tiny run valid, by method parameter (CRD's K below the data size, 1 init epoch)
TINY_METHOD_OVERRIDES = {"nce_k": "distill.nce_k=32", "init_epochs": "distill.init_epochs=1"}
METHOD_CONFIGS = sorted(p.stem for p in (CONFIGS / "distill").glob("*.yaml"))


def tiny_method_overrides(distill_node) -> list[str]:
    params = inspect.signature(METHODS.get(str(distill_node.method)).__init__).parameters
    return [o for key, o in TINY_METHOD_OVERRIDES.items() if key in distill_node or key in params]


def test_every_registered_method_has_a_config():
    assert set(METHODS.names()) <= set(METHOD_CONFIGS)


@pytest.mark.parametrize("method", METHOD_CONFIGS)
def test_one_epoch_of_every_method(teacher_run, method, compose, capsys):
    """In process: compose the real config as the entry point does and call its job function."""
    run = teacher_run / f"student_{method}"
    overrides = ["teacher=resnet8", "student=resnet8", f"distill={method}", *tiny_overrides(teacher_run)]
    tiny = tiny_method_overrides(compose("train_student", overrides).distill)
    cfg = compose("train_student", overrides + tiny)
    final = distill(cfg, run)
    assert final is not None and np.isfinite(final["train_loss"])
    assert "teacher resnet8: test top-1" in capsys.readouterr().out
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "finished" and metrics["method"] == method
    assert metrics["teacher_top1"] is not None
    (record,) = metrics["epochs"]
    assert PINNED_EPOCH_KEYS <= set(record)
    assert np.isfinite(record["train_loss"])
    if TINY_METHOD_OVERRIDES["init_epochs"] in tiny:  # a method with an initialisation phase
        assert len(metrics["init_epochs"]) == 1 and np.isfinite(metrics["init_epochs"][0]["train_loss"])
    final = torch.load(run / "final.pt", weights_only=True)
    assert set(final) >= {"model", "arch", "accuracy"} and "optimizer" not in final
    last = torch.load(run / "last.pt", weights_only=True)
    assert {"model", "objective", "optimizer", "run", "rng"} <= set(last)
    if method.startswith("crd"):
        banks = [k for k in last["objective"] if "memory" in k or "bank" in k]
        assert banks, list(last["objective"])


def test_combined_methods_have_their_own_weights(teacher_run):
    run = teacher_run / "student_combined"
    result = run_cli("train_student.py", "teacher=resnet8", "student=resnet8", "distill=kd",
                     "+distill@combine.at=at", "combine.at.beta=500", f"hydra.run.dir={run}",
                     *tiny_overrides(teacher_run))
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["method"] == "kd+at"
    (record,) = metrics["epochs"]
    assert {"loss_ce", "loss_kd", "loss_at"} <= set(record)
    config = (run / "config.yaml").read_text()
    assert "beta: 500" in config
