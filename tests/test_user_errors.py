"""Bad input gets one line on stderr, a non-zero exit, and leaves existing files untouched."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from helpers import run_cli, tiny_overrides, train_tiny_teacher

EXIT_USER_ERROR = 2


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every run file below ``folder`` (to prove nothing was written or changed).

    Hydra's own ``.hydra/`` record of the latest command line is left out, and so are
    log files, which may only grow (checked separately).
    """
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*"))
            if p.is_file() and ".hydra" not in p.parts and p.suffix != ".log"}


def logs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.glob("*.log")}


def assert_one_line_error(result, *phrases: str) -> str:
    assert result.returncode == EXIT_USER_ERROR, (result.returncode, result.stdout[-2000:], result.stderr[-3000:])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in result.stderr
    for phrase in phrases:
        assert phrase in lines[0], (phrase, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A tiny synthetic data set and a trained resnet8 teacher, shared by the tests of this file."""
    tmp = tmp_path_factory.mktemp("errors")
    train_tiny_teacher(tmp)
    assert (tmp / "teachers" / "resnet8.pt").is_file()
    return tmp


def student(tmp: Path, run: str, *extra: str):
    return run_cli("train_student.py", "teacher=resnet8", "student=resnet8", f"hydra.run.dir={tmp / run}",
                   *tiny_overrides(tmp), *extra)


def test_a_run_refused_before_it_starts_leaves_no_folder_behind(tmp_path):
    """Stopped before it took its run directory, a run removes the folders Hydra made for it, not one already there."""
    mine = tmp_path / "mine"
    mine.mkdir()
    result = run_cli("train_student.py", "dataset=imagenet", f"dataset.root={tmp_path / 'absent'}",
                     f"hydra.run.dir={mine / 'runs' / 'kd'}")
    assert_one_line_error(result, "dataset.root=", "is not a folder")
    assert mine.is_dir() and not any(mine.iterdir())


# ---- names -------------------------------------------------------------------------------------
@pytest.mark.parametrize("override, group, suggestion", [
    ("model=resnet9", "model", "resnet8"),
    ("dataset=cifar1000", "dataset", "cifar100"),
])
def test_unknown_name_in_teacher_training(tmp_path, override, group, suggestion):
    result = run_cli("train_teacher.py", override, f"hydra.run.dir={tmp_path / 'run'}")
    line = assert_one_line_error(result, f"unknown {group}", f"Did you mean '{suggestion}'")
    assert "Valid" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override, group, suggestion", [
    ("distill=kdd", "distill", "kd"),
    ("student=resnet8x5", "student", "resnet8x4"),
    ("teacher=wrn_40_3", "teacher", "wrn_40_2"),
])
def test_unknown_name_in_distillation(tmp_path, override, group, suggestion):
    result = run_cli("train_student.py", override, f"hydra.run.dir={tmp_path / 'run'}")
    line = assert_one_line_error(result, f"unknown {group}", f"Did you mean '{suggestion}'")
    assert "crd" in line or "resnet8" in line or "wrn_16_2" in line  # the valid options are listed


def test_unknown_config_key(tmp_path):
    result = run_cli("train_teacher.py", "trainer.epoch=3", f"hydra.run.dir={tmp_path / 'run'}")
    assert_one_line_error(result, "trainer.epoch", "does not exist")


# ---- values -------------------------------------------------------------------------------------
@pytest.mark.parametrize("override, phrase", [
    ("optim.lr=-0.1", "optim.lr=-0.1 must be > 0"),
    ("trainer.epochs=-1", "trainer.epochs=-1 must be > 0"),
    ("dataset.batch_size=0", "dataset.batch_size=0 must be > 0"),
    ("trainer.precision=fp8", "trainer.precision=fp8 is not valid"),
])
def test_out_of_range_values(tmp_path, override, phrase):
    result = run_cli("train_teacher.py", "model=resnet8", f"hydra.run.dir={tmp_path / 'run'}",
                     *tiny_overrides(tmp_path), override)
    assert_one_line_error(result, phrase)
    assert not (tmp_path / "run" / "last.pt").exists()


def test_temperature_must_be_positive(workspace, tmp_path):
    result = student(tmp_path, "run", "distill=kd", "distill.temperature=0")
    assert_one_line_error(result, "distill.temperature=0", "> 0")


def test_crd_negatives_larger_than_the_data_set(workspace):
    result = student(workspace, "crd_k", "distill=crd", "distill.nce_k=100000")
    assert_one_line_error(result, "nce_k")
    # a run that could not start leaves no record that would block the corrected command
    assert not (workspace / "crd_k" / "config.yaml").exists()
    fixed = student(workspace, "crd_k", "distill=crd", "distill.nce_k=64")
    assert fixed.returncode == 0, fixed.stderr[-3000:]


def test_unknown_method_parameter(workspace):
    result = student(workspace, "bad_param", "distill=at", "+distill.q=3")
    assert_one_line_error(result, "distill.q", "not a parameter", "at")


# ---- teacher checkpoints --------------------------------------------------------------------------
def test_teacher_checkpoint_missing(workspace, tmp_path):
    """A file named outside the teacher folder is not where the suggested command stores its teacher:
    the message says where that is (it once said "saved there")."""
    result = student(workspace, "missing", "distill=kd", f"teacher.ckpt={tmp_path / 'nope.pt'}")
    line = assert_one_line_error(result, "teacher checkpoint not found", "train_teacher.py model=resnet8")
    assert "saved there" not in line and f"it stores the teacher in {workspace / 'teachers'}, where" in line, line


def test_the_suggested_teacher_command_stores_where_the_student_looks(tmp_path):
    """Followed as printed, the missing teacher's suggested command trains it on the same data set into the
    same folder, and the same student command then finds it."""
    command = ["teacher=resnet8", "student=resnet8", "distill=kd", *tiny_overrides(tmp_path)]
    line = assert_one_line_error(run_cli("train_student.py", *command, f"hydra.run.dir={tmp_path / 's1'}"),
                                 "teacher checkpoint not found")
    suggested = line.split("Train it with `")[1].split("`")[0].split()
    assert suggested[:2] == ["python", "train_teacher.py"] and "dataset=synthetic" in suggested, line
    assert "(saved there)" in line, line
    # as printed, but one epoch (the suggestion keeps the recipe's 240: only the data and folder are the run's)
    stored = run_cli("train_teacher.py", *suggested[2:], "trainer.epochs=1", "trainer.progress=false",
                     f"hydra.run.dir={tmp_path / 't'}")
    assert stored.returncode == 0, stored.stderr[-2000:]
    again = run_cli("train_student.py", *command, f"hydra.run.dir={tmp_path / 's2'}")
    assert again.returncode == 0, again.stderr[-2000:]


def test_teacher_checkpoint_truncated(workspace, tmp_path):
    good = (workspace / "teachers" / "resnet8.pt").read_bytes()
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(good[: len(good) // 2])
    result = student(workspace, "truncated", "distill=kd", f"teacher.ckpt={bad}")
    assert_one_line_error(result, "corrupted", str(bad))
    assert bad.read_bytes() == good[: len(good) // 2]


def test_teacher_checkpoint_of_another_architecture(workspace):
    result = run_cli("train_student.py", "teacher=resnet20", "student=resnet8", "distill=kd",
                     f"teacher.ckpt={workspace / 'teachers' / 'resnet8.pt'}",
                     f"hydra.run.dir={workspace / 'wrong_arch'}", *tiny_overrides(workspace))
    assert_one_line_error(result, "resnet8", "resnet20")


class _Evil:
    """Unpickling this would create a file: a checkpoint must never be allowed to do that."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_checkpoint_that_runs_code_is_refused(workspace, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"model": {}, "payload": _Evil(marker)}, evil)
    assert not marker.exists()
    result = student(workspace, "evil", "distill=kd", f"teacher.ckpt={evil}")
    assert_one_line_error(result, "not loaded", "KD_TRUST_CHECKPOINTS")
    assert not marker.exists()


# ---- method / pair ---------------------------------------------------------------------------------
def test_fsp_with_mismatched_channels(workspace, tmp_path):
    from models import build_model

    ckpt = tmp_path / "resnet32x4.pt"
    torch.save({"model": build_model("resnet32x4").state_dict()}, ckpt)
    result = run_cli("train_student.py", "teacher=resnet32x4", "student=ShuffleV1", "distill=fsp",
                     f"teacher.ckpt={ckpt}", f"hydra.run.dir={tmp_path / 'run'}", *tiny_overrides(workspace))
    assert_one_line_error(result, "fsp")


# ---- data -------------------------------------------------------------------------------------------
def test_real_dataset_missing_offline(tmp_path):
    result = run_cli("train_teacher.py", "model=resnet8", "dataset=cifar100", f"dataset.root={tmp_path / 'empty'}",
                     "dataset.download=false", f"hydra.run.dir={tmp_path / 'run'}", "trainer.device=cpu")
    assert_one_line_error(result, "cifar-100-python.tar.gz", str(tmp_path / "empty"))


# ---- run directories -----------------------------------------------------------------------------------
def test_run_directory_of_another_run_is_not_overwritten(workspace):
    run = "kd_run"
    first = student(workspace, run, "distill=kd")
    assert first.returncode == 0, first.stderr[-3000:]
    before, logs_before = snapshot(workspace / run), logs(workspace / run)
    second = student(workspace, run, "distill=kd", "distill.alpha=0.5")
    assert_one_line_error(second, "holds a different run", "distill.alpha", "trainer.force=true")
    assert snapshot(workspace / run) == before
    for name, content in logs(workspace / run).items():  # the job log only grows
        assert content.startswith(logs_before.get(name, b""))


def test_debug_mode_shows_the_traceback(tmp_path):
    result = run_cli("train_teacher.py", "model=resnet8", "optim.lr=-1", f"hydra.run.dir={tmp_path / 'run'}",
                     *tiny_overrides(tmp_path), env={"HYDRA_FULL_ERROR": "1"})
    assert result.returncode != 0
    assert "Traceback" in result.stderr
