"""The command line read before Hydra reads it: paths Hydra's grammar needs quoted are accepted as typed
(``~`` expanded), a malformed override or a bad value inside a sweep is one line and status 2, and a sweep
job that fails on a user error is reported without a traceback."""
from __future__ import annotations

import sys

import pytest
from helpers import run_cli, tiny_overrides

from common.errors import UserError
from distiller.config.overrides import readable_overrides

EXIT_USER_ERROR = 2
AWKWARD = "données d'été"  # a non-ASCII letter, an apostrophe and a space: Hydra reads none of them unquoted


def one_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == EXIT_USER_ERROR, (result.returncode, result.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    return lines[0]


# ---- paths -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("typed, read", [
    (f"dataset.root=/data/{AWKWARD}", "dataset.root='/data/données d\\'été'"),
    ("hydra.run.dir=runs/l'été", "hydra.run.dir='runs/l\\'été'"),
    ("teacher.ckpt=C:\\w\\it's\\", "teacher.ckpt='C:\\w\\it\\'s\\\\'"),  # the quote and the final backslash escaped
    ("teacher_dir=~/teachers", "teacher_dir='/home/u/teachers'"),
    ("dataset.root=~", "dataset.root='/home/u'"),
    ("seed=3", "seed=3"),  # what Hydra reads as typed is left as typed
    ("dataset.root='~/quoted'", "dataset.root='~/quoted'"),
])
def test_a_path_hydra_cannot_read_unquoted_is_quoted_for_it(monkeypatch, typed, read):
    monkeypatch.setenv("HOME", "/home/u")
    assert readable_overrides([typed], multirun=False) == [read]


def test_each_value_of_a_sweep_is_quoted_alone(monkeypatch):
    monkeypatch.setenv("HOME", "/home/u")
    assert readable_overrides(["dataset.root=~/a,/b/é"], multirun=True) == ["dataset.root='/home/u/a','/b/é'"]


@pytest.mark.parametrize("value", [f"/data/{AWKWARD}/it's", "C:\\w\\it's\\", "/a/\\'b\\\\"])
def test_quoted_paths_compose_to_exactly_what_was_typed(compose, value):
    cfg = compose("train_student", readable_overrides([f"dataset.root={value}"], multirun=False))
    assert cfg.dataset.root == value


def test_awkward_paths_reach_the_job_as_typed(tmp_path):
    """Hydra takes them (the run directory by that name, made beforehand) and the job reads them: here it
    stops at the teacher file, which it looked for in the ``~`` folder of the (test's) home."""
    home, run = tmp_path / "home", tmp_path / f"runs {AWKWARD}"
    run.mkdir()
    result = run_cli("train_student.py", "teacher=resnet8", "student=resnet8",
                     *tiny_overrides(tmp_path / AWKWARD), "teacher_dir=~/teachers", f"hydra.run.dir={run}",
                     env={"HOME": str(home)})
    line = one_line(result)
    assert f"{home}/teachers/resnet8.pt" in line, line
    assert run.is_dir() and not any(run.iterdir())  # a command that cannot start leaves nothing in it


def test_the_schema_expands_a_home_path_where_it_is_read(monkeypatch, compose):
    from distiller.config.validation import load_job

    monkeypatch.setenv("HOME", "/home/u")
    job = load_job(compose("train_student", ["dataset.root='~/d'", "teacher_dir='~/t'",
                                             "teacher.ckpt='~/w/t.pt'"]), "train_student")
    assert (job.dataset.root, job.teacher_dir, job.teacher.ckpt) == ("/home/u/d", "/home/u/t", "/home/u/w/t.pt")
    outside = load_job(compose("train_student", ["student=torchvision", "student.name=resnet18",
                                                 "student.weights='~/r18.pth'"]), "train_student")
    assert outside.student.weights == "/home/u/r18.pth"


# ---- malformed overrides ---------------------------------------------------------------------------------
@pytest.mark.parametrize("args, words", [
    (["foo"], ["'foo' is not an override", "KEY=VALUE"]),
    (["seed=[1"], ["seed=[1", "quotes"]),
    (["-m", "seed=[1"], ["seed=[1", "quotes"]),
    (["-m", "seed=0,1", "foo"], ["'foo' is not an override"]),
])
def test_a_malformed_override_is_one_line(tmp_path, args, words):
    line = one_line(run_cli("train_teacher.py", *args, f"hydra.sweep.dir={tmp_path / 'sweep'}"))
    assert all(w in line for w in words), line
    assert not (tmp_path / "sweep").exists()


def test_readable_overrides_refuses_an_unreadable_list():
    with pytest.raises(UserError, match=r"schedule\.milestones=\[150,180"):
        readable_overrides(["schedule.milestones=[150,180"], multirun=False)


# ---- sweeps ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sweep, words", [
    (["seed=8,abc,9"], ["seed=abc is not a whole number", "nothing was run"]),
    (["distill=kd,att", "seed=0,1"], ["unknown distill 'att'", "Did you mean 'at'", "nothing was run"]),
    (["seed=0,1", "trainer.epochs=0,1"], ["trainer.epochs=0 must be > 0"]),
])
def test_a_bad_value_inside_a_sweep_stops_it_before_any_job(tmp_path, sweep, words):
    result = run_cli("train_student.py", "-m", *sweep, f"hydra.sweep.dir={tmp_path / 'sweep'}")
    line = one_line(result)
    assert all(w in line for w in words), line
    assert not (tmp_path / "sweep").exists()


def test_a_sweep_jobs_user_error_is_reported_without_a_traceback(tmp_path):
    """What only a job can find (here: its teacher file is missing) ends that job; Hydra reports it when the
    sweep ends, as our one line (and its own line naming the job), with no traceback."""
    result = run_cli("train_student.py", "-m", "teacher=resnet8", "student=resnet8", "seed=0,1",
                     *tiny_overrides(tmp_path), f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "teacher checkpoint not found" in errors[0], result.stderr
    # nothing written: the folders Hydra made for the two jobs are gone again
    assert (tmp_path / "sweep" / "multirun.yaml").is_file()
    assert not list((tmp_path / "sweep").glob("synthetic/resnet8-resnet8/kd/seed*"))


def test_flags_after_the_overrides_are_moved_first_for_hydra(monkeypatch):
    from distiller.config.preflight import preflight

    argv = ["seed=0,1", "-m", "model=RESNET8"]
    monkeypatch.setattr("sys.argv", ["train_teacher.py", *argv])
    preflight("train_teacher", argv)
    assert sys.argv[1:] == ["-m", "seed=0,1", "model=resnet8"]

