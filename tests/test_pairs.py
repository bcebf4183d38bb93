"""Published per-pair settings follow teacher and student without pair=..., and explicit values still win."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides

import distiller.pairs as pairs
from distiller.pairs import apply_pair_settings
from distiller.run import distill
from models import build_model

# The published values (RECIPES.md DKD per pair; mdistiller's ReviewKD CIFAR-100 configs)
DKD_NCKD = {("resnet56", "resnet20"): 2.0, ("resnet110", "resnet32"): 2.0, ("resnet32x4", "resnet8x4"): 8.0,
            ("wrn_40_2", "wrn_16_2"): 6.0, ("wrn_40_2", "wrn_40_1"): 6.0, ("vgg13", "vgg8"): 6.0,
            ("vgg13", "MobileNetV2"): 6.0, ("ResNet50", "MobileNetV2"): 8.0, ("resnet32x4", "ShuffleV1"): 8.0,
            ("resnet32x4", "ShuffleV2"): 8.0, ("wrn_40_2", "ShuffleV1"): 8.0}
REVIEWKD_WEIGHT = {("resnet56", "resnet20"): 0.6, ("resnet110", "resnet32"): 1.0, ("resnet32x4", "ShuffleV2"): 8.0,
                   ("resnet32x4", "resnet8x4"): 5.0, ("vgg13", "vgg8"): 5.0}


@pytest.mark.parametrize(("teacher", "student"), list(DKD_NCKD))
def test_dkd_takes_the_published_nckd_weight_of_the_pair(compose, teacher: str, student: str) -> None:
    cfg = compose("train_student", [f"teacher={teacher}", f"student={student}", "distill=dkd"])
    changed = apply_pair_settings(cfg)
    assert cfg.distill.nckd_weight == DKD_NCKD[(teacher, student)]
    expected_change = DKD_NCKD[(teacher, student)] != 8.0  # 8.0 is the config's own default
    assert changed == ([f"distill.nckd_weight={DKD_NCKD[(teacher, student)]}"] if expected_change else [])


@pytest.mark.parametrize(("teacher", "student"), list(REVIEWKD_WEIGHT))
def test_reviewkd_takes_the_published_loss_weight_of_the_pair(compose, teacher: str, student: str) -> None:
    cfg = compose("train_student", [f"teacher={teacher}", f"student={student}", "distill=reviewkd"])
    apply_pair_settings(cfg)
    assert cfg.distill.beta == REVIEWKD_WEIGHT[(teacher, student)]
    explicit = compose("train_student", [f"pair={teacher}-{student}", "distill=reviewkd"])
    assert explicit.distill.beta == REVIEWKD_WEIGHT[(teacher, student)]  # the table presets agree


def test_an_explicit_value_wins_and_unrelated_methods_are_untouched(compose) -> None:
    cfg = compose("train_student", ["teacher=resnet56", "student=resnet20", "distill=dkd", "distill.nckd_weight=8"])
    assert apply_pair_settings(cfg) == [] and cfg.distill.nckd_weight == 8.0
    kd = compose("train_student", ["teacher=resnet56", "student=resnet20", "distill=kd"])
    assert apply_pair_settings(kd) == [] and kd.pair is None  # KD reads no pair setting: config unchanged
    unknown = compose("train_student", ["teacher=resnet8", "student=resnet8", "distill=dkd"])
    assert apply_pair_settings(unknown) == [] and unknown.distill.nckd_weight == 8.0  # no published pair


def test_the_run_prints_and_records_what_the_pair_changed(compose, tmp_path: Path, monkeypatch, capsys) -> None:
    (tmp_path / "pairs").mkdir()
    (tmp_path / "pairs" / "resnet8-resnet8.yaml").write_text("pair:\n  name: resnet8-resnet8\n  dkd_nckd_weight: 3.0\n")
    monkeypatch.setattr(pairs, "PAIR_DIR", tmp_path / "pairs")
    teacher = tmp_path / "teacher.pt"
    torch.save({"model": build_model("resnet8").state_dict()}, teacher)
    cfg = compose("train_student", ["teacher=resnet8", "student=resnet8", "distill=dkd", f"teacher.ckpt={teacher}",
                                    *tiny_overrides(tmp_path)])
    distill(cfg, tmp_path / "run")
    assert "published settings of the pair resnet8-resnet8: distill.nckd_weight=3.0" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "finished"
    assert "nckd_weight: 3.0" in (tmp_path / "run" / "config.yaml").read_text()


def test_every_pair_file_is_found_from_its_teacher_and_student(compose) -> None:
    """Each configs/pair/<teacher>-<student>.yaml applies to exactly that teacher and student, by name."""
    files = sorted(pairs.PAIR_DIR.glob("*.yaml"))
    assert len(files) >= len(DKD_NCKD)
    for path in files:
        teacher, student = path.stem.split("-")
        settings = pairs.pair_settings(teacher.lower(), student.lower())  # names are case-insensitive
        assert settings is not None and settings["name"] == path.stem
