"""Where a run goes and what a command leaves there: the default run directory names the data set and the
optimizer where they are not CIFAR-100 and SGD (the default paths stay as they were), and a command the
directory refuses, or that finds its run finished, writes nothing: not even Hydra's ``.hydra/`` or the log."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
import yaml
from helpers import run_cli, tiny_overrides

from models import build_model

EXIT_USER_ERROR = 2


def image_folder(root: str) -> str:
    """An image folder's name in run and teacher directories, as documented: ``imagefolder-<name>-<first 8 hex
    digits of the sha256 of its resolved path>``."""
    resolved = Path(root).resolve()
    return f"imagefolder-{resolved.name}-{hashlib.sha256(str(resolved).encode()).hexdigest()[:8]}"


def run_dir(compose, name: str, *overrides: str) -> tuple[str, str]:
    cfg = compose(name, list(overrides), return_hydra_config=True)
    return str(cfg.hydra.run.dir), str(cfg.hydra.sweep.subdir)


# ---- the default run directory -------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, expected", [
    ([], "resnet32x4-resnet8x4/kd/seed0"),  # as always: existing runs and the docs stay valid
    (["distill=crd", "seed=3"], "resnet32x4-resnet8x4/crd/seed3"),
    (["optim=dot"], "resnet32x4-resnet8x4/kd_dot/seed0"),  # the README's distill=kd optim=dot
    (["dataset=cifar10"], "cifar10/resnet32x4-resnet8x4/kd/seed0"),
    (["dataset=cifar10", "optim=dot", "+distill@combine.at=at"], "cifar10/resnet32x4-resnet8x4/kd_dot+at/seed0"),
    (["dataset=imagefolder", "dataset.root=/data/flowers"],
     f"{image_folder('/data/flowers')}/resnet32x4-resnet8x4/kd/seed0"),
    (["dataset=imagefolder", "dataset.root=/data/birds"],
     f"{image_folder('/data/birds')}/resnet32x4-resnet8x4/kd/seed0"),
    # two folders of one name: two directories (the student of one never finds the other's run finished)
    (["dataset=imagefolder", "dataset.root=/elsewhere/flowers"],
     f"{image_folder('/elsewhere/flowers')}/resnet32x4-resnet8x4/kd/seed0"),
    # the DOT preset labels its runs kd_dot already: the label is not doubled, its runs stay where they were
    (["experiment=new_methods_table_dot", "pair=resnet32x4-resnet8x4"], "resnet32x4-resnet8x4/kd_dot/seed0"),
    # logit standardization by its switch is KD+LS, as its preset is (not the plain KD run's folder)
    (["distill.logit_standardize=true"], "resnet32x4-resnet8x4/kd_ls/seed0"),
    (["distill=kd_ls"], "resnet32x4-resnet8x4/kd_ls/seed0"),
    # any spelling of true the schema takes turns it on (and names it), not only 'true'
    (["distill.logit_standardize=yes"], "resnet32x4-resnet8x4/kd_ls/seed0"),
    (["distill.logit_standardize=on"], "resnet32x4-resnet8x4/kd_ls/seed0"),
    (["distill.logit_standardize=no"], "resnet32x4-resnet8x4/kd/seed0"),
    (["distill=dkd", "distill.logit_standardize=true", "+distill@combine.at=at"],
     "resnet32x4-resnet8x4/dkd_ls+at/seed0"),
    # networks from outside the zoo by source and name, as their files: two sources' resnet18 never share a folder
    (["teacher=torchvision", "teacher.name=resnet18", "student=timm", "student.name=resnet18"],
     "torchvision-resnet18-timm-resnet18/kd/seed0"),
    (["teacher=timm", "teacher.name=resnet18", "student=module", "student._target_=pkg.Net"],
     "timm-resnet18-module-pkg.Net/kd/seed0"),
])
def test_student_run_directory_names_data_set_and_optimizer_only_where_not_the_default(compose, overrides,
                                                                                      expected):
    run, subdir = run_dir(compose, "train_student", *overrides)
    assert (run, subdir) == (f"runs/student/{expected}", expected)


@pytest.mark.parametrize("overrides, expected", [
    (["model=resnet56"], "resnet56/seed0"),
    (["model=resnet56", "optim=dot"], "resnet56_dot/seed0"),
    (["model=resnet56", "dataset=synthetic", "seed=2"], "synthetic/resnet56/seed2"),
    # the 10-class stand-in is another data set: its runs never meet the 100-class set's (named as its cache)
    (["model=resnet56", "dataset=synthetic", "dataset.num_classes=10"], "synthetic10/resnet56/seed0"),
    (["model=resnet56", "dataset=synthetic", "dataset.num_classes=100"], "synthetic/resnet56/seed0"),
    (["model=torchvision", "model.name=resnet18", "optim=dot"], "torchvision-resnet18_dot/seed0"),
    (["model=module", "model._target_=pkg.Net"], "module-pkg.Net/seed0"),
])
def test_teacher_run_directory_names_data_set_and_optimizer_only_where_not_the_default(compose, overrides,
                                                                                      expected):
    assert run_dir(compose, "train_teacher", *overrides) == (f"runs/teacher/{expected}", expected)


@pytest.mark.parametrize("name", ["train_teacher", "train_student"])
def test_the_ten_class_synthetic_teachers_have_a_folder_of_their_own(compose, name: str) -> None:
    """A 10-class teacher stored into the 100-class set's folder replaced its teacher, and every 100-class
    student then failed on the class count."""
    folder = {n: str(compose(name, ["dataset=synthetic", f"dataset.num_classes={n}"]).teacher_dir) for n in (10, 100)}
    assert folder == {10: "checkpoints/teachers/synthetic10", 100: "checkpoints/teachers/synthetic"}


# ---- what a refused command leaves -----------------------------------------------------------------------
def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file below ``folder``, Hydra's ``.hydra/`` record and the job's log included."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, list[str]]:
    """A finished KD run in a default run directory below ``tmp`` (a random resnet8 teacher, tiny data)."""
    tmp = tmp_path_factory.mktemp("rundirs")
    (tmp / "teachers").mkdir()
    torch.save({"arch": "resnet8", "model": build_model("resnet8").state_dict()}, tmp / "teachers" / "resnet8.pt")
    command = ["teacher=resnet8", "student=resnet8", *tiny_overrides(tmp, train_size=100, test_size=100),
               "trainer.precision=fp32"]
    result = run_cli("train_student.py", *command, cwd=tmp)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp, command


def test_a_finished_run_keeps_hydras_record_of_its_own_command(finished):
    tmp, command = finished
    run = tmp / "runs/student/synthetic/resnet8-resnet8/kd/seed0"
    assert yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text()) == command
    assert yaml.safe_load((run / ".hydra" / "config.yaml").read_text())["optim"]["name"] == "sgd"
    assert "epoch 1/1" in (run / "train_student.log").read_text()  # records logged before the run started too
    assert "teacher resnet8: test top-1" in (run / "train_student.log").read_text()


@pytest.mark.parametrize("change", [["optim=dot"], ["dataset.train_size=120"]])  # another optimizer, other data
def test_a_refused_command_writes_nothing_in_the_finished_run(finished, change):
    tmp, command = finished
    run = tmp / "runs/student/synthetic/resnet8-resnet8/kd/seed0"
    before = snapshot(run)
    result = run_cli("train_student.py", *command, *change, f"hydra.run.dir={run}", cwd=tmp)
    assert result.returncode == EXIT_USER_ERROR, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "holds a different run" in lines[0], result.stderr
    assert snapshot(run) == before  # .hydra/overrides.yaml still lists the finished run's command


def test_the_other_jobs_run_directory_is_named_so(finished):
    """A teacher command pointed at a student's run directory got a diff of every key that differs."""
    tmp, command = finished
    run = tmp / "runs/student/synthetic/resnet8-resnet8/kd/seed0"
    before = snapshot(run)
    result = run_cli("train_teacher.py", "model=resnet8", *command[2:], f"hydra.run.dir={run}", cwd=tmp)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == EXIT_USER_ERROR and len(lines) == 1, result.stderr[-2000:]
    assert lines[0] == (f"error: run directory {run} holds a student's run (train_student.py), not this job's; "
                        "choose another hydra.run.dir")
    assert snapshot(run) == before


def test_a_switch_at_its_default_is_shown_by_its_value_in_the_difference() -> None:
    """teacher.cache=true on the first command, left out on the second: 'teacher.cache True -> <absent>'."""
    from distiller.jobs.run_dir import _differences, run_identity

    base = {"trainer": {"epochs": 1}, "teacher": {"name": "resnet8"}}
    cached = {"trainer": {"epochs": 1}, "teacher": {"name": "resnet8", "cache": True}}
    assert _differences(run_identity(cached), run_identity(base)) == ["teacher.cache True -> False"]


def test_rerunning_a_finished_run_writes_nothing(finished):
    tmp, command = finished
    run = tmp / "runs/student/synthetic/resnet8-resnet8/kd/seed0"
    before = snapshot(run)
    result = run_cli("train_student.py", *command, cwd=tmp)
    assert result.returncode == 0 and "already finished" in result.stdout, result.stderr[-2000:]
    assert snapshot(run) == before


@pytest.mark.parametrize("extra", [[], ["trainer.force=true"]])
def test_the_same_run_with_auto_resume_off_says_how_to_continue_or_start_over(finished, extra):
    """With trainer.auto_resume=false the same command over its own last.pt is refused; the line offers what works
    (force starts afresh only over another run's config, so it is not offered), and nothing is written."""
    tmp, command = finished
    run = tmp / "runs/student/synthetic/resnet8-resnet8/kd/seed0"
    before = snapshot(run)
    result = run_cli("train_student.py", *command, "trainer.auto_resume=false", *extra, cwd=tmp)
    assert result.returncode == EXIT_USER_ERROR, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [
        f"error: run directory {run} already holds this run (last.pt) and trainer.auto_resume=false: pass "
        "trainer.resume=true to continue it, or another hydra.run.dir to start it over (trainer.force=true starts "
        "afresh only over another run)"]
    assert snapshot(run) == before


def test_the_readmes_dot_run_after_a_kd_run_gets_its_own_directory(finished):
    tmp, command = finished
    kd = tmp / "runs/student/synthetic/resnet8-resnet8/kd/seed0"
    before = snapshot(kd)
    result = run_cli("train_student.py", *command, "optim=dot", cwd=tmp)
    assert result.returncode == 0, result.stderr[-3000:]
    dot = tmp / "runs/student/synthetic/resnet8-resnet8/kd_dot/seed0"
    assert yaml.safe_load((dot / "config.yaml").read_text())["optim"]["name"] == "dot"
    assert yaml.safe_load((dot / ".hydra" / "overrides.yaml").read_text())[-1] == "optim=dot"
    assert snapshot(kd) == before


def test_force_moves_the_old_runs_record_aside_with_its_files(finished, tmp_path):
    tmp, command = finished
    run = tmp_path / "run"
    first = run_cli("train_student.py", *command, f"hydra.run.dir={run}", cwd=tmp)
    assert first.returncode == 0, first.stderr[-3000:]
    old = snapshot(run)
    again = run_cli("train_student.py", *command, "distill.temperature=2", "trainer.force=true",
                    f"hydra.run.dir={run}", cwd=tmp)
    assert again.returncode == 0, again.stderr[-3000:]
    aside = next(run.glob("replaced-*"))
    assert snapshot(aside) == old  # the old run whole: its files, its .hydra/ record and its log
    assert "distill.temperature=2" in yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text())
    assert "train_student.log" in {p.name for p in run.iterdir()}
