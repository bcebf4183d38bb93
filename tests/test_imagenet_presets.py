"""The ImageNet and Tiny-ImageNet presets: each cell composes to its authors' published settings, the sweep table lists
the cells, and the collector puts the published numbers beside ours.

The expected settings are typed by hand from mdistiller's configs (configs/imagenet/<pair>/<method>.yaml and
configs/tiny_imagenet/dot/*.yaml at a08d46f; its defaults for what a file leaves out), never read from
our YAML files: the global batch and lr are mdistiller's, the per-process ones follow from 8 GPUs.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision
import yaml

from distiller.config.compose import compose
from distiller.config.validation import load_job
from distiller.engine.runtime import Runtime
from distiller.jobs.train import base_lr

KD_IMAGENET = {"gamma": 0.5, "alpha": 0.5, "temperature": 1.0}  # KD: CE 0.5, KD 0.5, T 1
# (pair, method) -> (global batch, lr, objective weights and method parameters)
IMAGENET_CELLS = {
    ("r34_r18", "kd"): (512, 0.2, KD_IMAGENET),
    ("r34_r18", "at"): (512, 0.2, {"gamma": 1.0, "beta": 1000.0, "p": 2.0}),
    ("r34_r18", "crd"): (256, 0.1, {"gamma": 1.0, "beta": 0.8, "feat_dim": 128, "nce_k": 16384, "nce_t": 0.07,
                                    "nce_m": 0.5, "mode": "exact"}),
    ("r34_r18", "reviewkd"): (256, 0.1, {"gamma": 1.0, "beta": 1.0, "warmup_epochs": 1, "max_mid_channels": 512}),
    ("r34_r18", "dkd"): (512, 0.2, {"gamma": 1.0, "tckd_weight": 1.0, "nckd_weight": 0.5, "temperature": 1.0,
                                    "dkd_temperature": 1.0, "warmup_epochs": 1}),
    ("r34_r18", "dot"): (512, 0.2, {**KD_IMAGENET, "name": "kd_dot"}),
    ("r50_mv1", "kd"): (512, 0.2, KD_IMAGENET),
    ("r50_mv1", "at"): (512, 0.2, {"gamma": 1.0, "beta": 1000.0, "p": 2.0}),
    ("r50_mv1", "crd"): (256, 0.1, {"gamma": 1.0, "beta": 0.8, "feat_dim": 128, "nce_k": 16384, "nce_t": 0.07,
                                    "nce_m": 0.5, "mode": "exact"}),
    ("r50_mv1", "ofd"): (128, 0.05, {"gamma": 1.0, "beta": 1e-4}),
    ("r50_mv1", "reviewkd"): (256, 0.1, {"gamma": 1.0, "beta": 8.0, "warmup_epochs": 1, "max_mid_channels": 256}),
    ("r50_mv1", "dkd"): (512, 0.2, {"gamma": 1.0, "tckd_weight": 1.0, "nckd_weight": 2.0, "temperature": 1.0,
                                    "dkd_temperature": 1.0, "warmup_epochs": 1}),
    ("r50_mv1", "dot"): (512, 0.2, {**KD_IMAGENET, "name": "kd_dot"}),
}
PAIRS = {"r34_r18": ("resnet34", "torchvision", "resnet18"), "r50_mv1": ("resnet50", None, "MobileNetV1")}
GPUS = 8  # mdistiller's batch is over 8 GPUs


def job_of(preset: str):
    return load_job(compose("train_student", [f"experiment={preset}", "dataset.root=/data/imagenet"]),
                    "train_student")


@pytest.mark.parametrize(("pair", "method"), sorted(IMAGENET_CELLS))
def test_every_imagenet_cell_composes_to_mdistillers_settings(pair: str, method: str) -> None:
    job = job_of(f"imagenet/{pair}/{method}")
    batch, lr, settings = IMAGENET_CELLS[(pair, method)]
    teacher, student_source, student = PAIRS[pair]
    assert (job.teacher.source, job.teacher.name) == ("torchvision", teacher)
    assert (job.student.get("source"), job.student.name) == (student_source, student)
    # the teacher file is torchvision's IMAGENET1K_V1 download, under its own name
    official = Path(torchvision.models.get_model_weights(teacher).IMAGENET1K_V1.url).name
    assert job.teacher.ckpt == f"checkpoints/teachers/imagenet/{official}"
    assert (job.dataset.name, job.dataset.image_size, job.dataset.eval_resize) == ("imagenet", 224, 256)
    assert job.dataset.batch_size * GPUS == batch
    runtime = Runtime(torch.device("cpu"), "fp32", False, False, rank=0, world_size=GPUS)
    assert base_lr(job, runtime) == pytest.approx(lr)
    assert (job.trainer.epochs, job.schedule.milestones, job.schedule.gamma) == (100, [30, 60, 90], 0.1)
    assert job.trainer.precision == "fp32"  # mdistiller trains without autocast: the cell does too
    assert (job.optim.momentum, job.optim.weight_decay, job.optim.nesterov) == (0.9, 1e-4, False)
    assert job.optim.name == ("dot" if method == "dot" else "sgd")
    if method == "dot":
        assert job.optim.delta == 0.09
    distill = dict(job.distill)
    assert distill["name"] == settings.get("name", method)
    for key, value in settings.items():
        assert distill[key] == pytest.approx(value) if isinstance(value, float) else distill[key] == value, key


TINY_CELLS = {"kd": ("sgd", "kd"), "dot": ("dot", "kd_dot")}
# DOT's two Tiny-ImageNet pairs: the students are mdistiller's (its Tiny-ImageNet MobileNet-V2, not the CIFAR one)
TINY_PAIRS = {"r18_shuv2": "ShuffleV2", "r18_mv2": "mobilenetv2_tinyimagenet"}


@pytest.mark.parametrize("pair", sorted(TINY_PAIRS))
@pytest.mark.parametrize("method", sorted(TINY_CELLS))
def test_the_tiny_imagenet_cells_compose_to_dots_recipe(pair: str, method: str) -> None:
    job = job_of(f"tiny_imagenet/{pair}/{method}")
    optimizer, name = TINY_CELLS[method]
    assert (job.teacher.name, job.student.name, job.dataset.name) == ("ResNet18", TINY_PAIRS[pair], "imagefolder")
    assert job.dataset.mean == [0.4802, 0.4481, 0.3975] and job.dataset.std == [0.2302, 0.2265, 0.2262]
    runtime = Runtime(torch.device("cpu"), "fp32", False, False, rank=0, world_size=1)
    assert job.dataset.batch_size == 256 and base_lr(job, runtime) == pytest.approx(0.2)
    assert (job.trainer.epochs, job.schedule.milestones, job.optim.weight_decay) == (200, [60, 120, 160], 5e-4)
    assert job.trainer.precision == "fp32"  # mdistiller trains without autocast: the cell does too
    assert (job.optim.name, job.distill.name) == (optimizer, name)
    assert (job.distill.gamma, job.distill.alpha, job.distill.temperature) == (0.1, 0.9, 4.0)  # mdistiller's KD
    if method == "dot":
        assert job.optim.delta == 0.075


@pytest.mark.parametrize(("table", "cells"), [("imagenet", 13), ("tiny_imagenet", 4)])
def test_sweep_table_dry_run_lists_the_cells(capsys, table: str, cells: int) -> None:
    from scripts import sweep_table

    assert sweep_table.main([table, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"# {table}: {cells} runs in all" in out
    if table == "imagenet":
        listed = {line.split("=", 1)[1].split(":")[0] for line in out.splitlines() if line.startswith("# experiment=")}
        assert listed == {f"imagenet/{p}/{m}" for p, m in IMAGENET_CELLS}
        assert "# experiment=imagenet/r50_mv1/ofd: 1 runs\n  distill=ofd seed=0" in out
    else:
        listed = {line.split("=", 1)[1].split(":")[0] for line in out.splitlines() if line.startswith("# experiment=")}
        assert listed == {f"tiny_imagenet/{p}/{m}" for p in TINY_PAIRS for m in TINY_CELLS}


def write_run(root: Path, teacher: str, student: str, method: str, seed: int, last: float, best: float,
              dataset: str = "imagenet", teacher_source: str | None = "torchvision") -> None:
    """A finished run directory as the engine leaves it (config.yaml, metrics.json), with our numbers;
    ``teacher_source`` None: a zoo teacher (no source key)."""
    run = root / f"{teacher}-{student}" / method / f"seed{seed}"
    run.mkdir(parents=True)
    source = {} if teacher_source is None else {"source": teacher_source}
    config = {"teacher": {"name": teacher, **source}, "student": {"name": student},
              "distill": {"name": method}, "method_label": method, "seed": seed, "dataset": {"name": dataset},
              "trainer": {"epochs": 100}, "optim": {"name": "sgd", "lr": 0.025},
              "schedule": {"name": "step", "milestones": [30, 60, 90], "gamma": 0.1}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "metrics.json").write_text(json.dumps({
        "status": "finished", "final_top1": last, "best_top1": best, "final_top5": 90.0,
        "epochs": [{"epoch": 1, "train_loss": 1.0, "test_top1": last, "test_top5": 90.0, "lr": 0.2}]}))


def test_the_collector_shows_the_published_numbers_beside_ours(tmp_path: Path) -> None:
    from distiller.results import tables
    from distiller.results.published import load_published

    runs = tmp_path / "runs"
    write_run(runs, "resnet34", "resnet18", "dkd", 0, 71.0, 71.5)
    write_run(runs, "resnet50", "MobileNetV1", "kd", 0, 70.0, 70.25)
    rows, _ = tables.collect([str(runs)], tmp_path / "table", sources=["imagenet"],
                         tables=["imagenet_r34_r18", "imagenet_r50_mv1"], figure=False)
    cells = {(r.teacher, r.student, r.method): r for r in rows}
    # mdistiller's README (a08d46f), torchvision's docs, the ReviewKD paper: typed by hand
    published = {("resnet34", "resnet18", "teacher"): 73.314, ("resnet34", "resnet18", "student"): 69.758,
                 ("resnet34", "resnet18", "kd"): 71.03, ("resnet34", "resnet18", "reviewkd"): 71.61,
                 ("resnet34", "resnet18", "dkd"): 71.70, ("resnet34", "resnet18", "kd_dot"): 71.72,
                 ("resnet50", "MobileNetV1", "teacher"): 76.13, ("resnet50", "MobileNetV1", "kd"): 70.50,
                 ("resnet50", "MobileNetV1", "dkd"): 72.05, ("resnet50", "MobileNetV1", "kd_dot"): 73.09}
    assert {cell: row.published["imagenet"] for cell, row in cells.items()} == published
    assert cells[("resnet34", "resnet18", "dkd")].best.mean == 71.5
    markdown = (tmp_path / "table.md").read_text()
    assert "| dkd | 1 | 71.00 | 71.50 | 71.70 | -0.20 |" in markdown  # best epoch vs mdistiller's best-epoch number
    assert "| kd | 1 | 70.00 | 70.25 | 70.50 | -0.25 |" in markdown
    tiny = load_published(["imagenet"])
    tiny = tiny[tiny["table"] == "tiny_imagenet_dot"]
    assert sorted(zip(tiny["student"], tiny["method"], tiny["top1"])) == [
        ("ShuffleV2", "kd", 62.26), ("ShuffleV2", "kd_dot", 65.75),
        ("mobilenetv2_tinyimagenet", "kd", 58.35), ("mobilenetv2_tinyimagenet", "kd_dot", 64.01)]


def test_the_collector_shows_dots_tiny_imagenet_numbers_beside_ours(tmp_path: Path) -> None:
    from distiller.results import tables

    runs = tmp_path / "runs"
    write_run(runs, "ResNet18", "mobilenetv2_tinyimagenet", "kd_dot", 0, 63.0, 63.5, dataset="imagefolder",
              teacher_source=None)
    rows, _ = tables.collect([str(runs)], tmp_path / "table", sources=["imagenet"], tables=["tiny_imagenet_dot"],
                             figure=False)
    # mdistiller's README (a08d46f), "On Tiny-ImageNet": typed by hand
    assert {(r.student, r.method): r.published["imagenet"] for r in rows if r.teacher == "ResNet18"} == {
        ("mobilenetv2_tinyimagenet", "kd"): 58.35, ("mobilenetv2_tinyimagenet", "kd_dot"): 64.01,
        ("ShuffleV2", "kd"): 62.26, ("ShuffleV2", "kd_dot"): 65.75}
    assert "| kd_dot | 1 | 63.00 | 63.50 | 64.01 | -0.51 |" in (tmp_path / "table.md").read_text()
