"""Crash safety: a run killed at any moment resumes to the same result as an uninterrupted run."""
from __future__ import annotations

import hashlib
import json
import shutil
import signal
from pathlib import Path

import pytest
import torch
from helpers import (
    assert_same_weights,
    comparable_metrics,
    compose_config,
    kill_when,
    run_cli,
    seed,
    start_command,
    tiny_overrides,
    train_tiny_teacher,
)

from distiller.engine.checkpoints import slim_checkpoint
from distiller.jobs.teacher_store import store_teacher
from models import build_model

pytestmark = pytest.mark.numeric


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("resume")
    train_tiny_teacher(tmp)
    return tmp


def distill_overrides(tmp: Path, run: str, *extra: str) -> list[str]:
    return ["teacher=resnet8", "student=resnet8", f"hydra.run.dir={tmp / run}",
            *tiny_overrides(tmp, train_size=640), "trainer.epochs=2", "trainer.checkpoint_every_steps=1",
            "trainer.log_interval=5", *extra]


@pytest.mark.parametrize("method, extra, kill_condition", [
    # killed in the middle of the first main epoch
    ("crd", ("distill=crd", "distill.nce_k=64"), lambda s: s["phase"] == 0 and s["epoch"] == 0 and s["step"] >= 4),
    # killed during the initialisation phase of a two-stage method (slow: CI runs it with the numeric tests)
    pytest.param("ab", ("distill=ab", "distill.init_epochs=1"), lambda s: s["phase"] == 0 and s["step"] >= 4,
                 marks=pytest.mark.slow),
])
def test_sigkill_then_resume_equals_uninterrupted(teacher, method, extra, kill_condition):
    reference = run_cli("train_student.py", *distill_overrides(teacher, f"{method}_ref", *extra))
    assert reference.returncode == 0, reference.stderr[-3000:]

    victim = start_command("train_student.py", *distill_overrides(teacher, f"{method}_killed", *extra))
    state = kill_when(victim, teacher / f"{method}_killed" / "last.pt", kill_condition)
    assert victim.returncode == -signal.SIGKILL
    assert not state["finished"]
    resumed = run_cli("train_student.py", *distill_overrides(teacher, f"{method}_killed", *extra))
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    assert_same_weights(teacher / f"{method}_ref" / "final.pt", teacher / f"{method}_killed" / "final.pt")
    assert_same_weights(teacher / f"{method}_ref" / "last.pt", teacher / f"{method}_killed" / "last.pt")
    assert comparable_metrics(teacher / f"{method}_ref") == comparable_metrics(teacher / f"{method}_killed")


def test_finished_run_recognises_it_is_finished(teacher):
    overrides = ["teacher=resnet8", "student=resnet8", "distill=kd", f"hydra.run.dir={teacher / 'done'}",
                 *tiny_overrides(teacher)]
    first = run_cli("train_student.py", *overrides)
    assert first.returncode == 0, first.stderr[-3000:]
    files = lambda: {p.name: p.stat().st_mtime_ns for p in (teacher / "done").iterdir()
                     if p.is_file() and p.suffix != ".log"}  # the job log records every launch
    stamp = files()
    again = run_cli("train_student.py", *overrides)
    assert again.returncode == 0
    assert "already finished" in again.stdout
    assert stamp == files()


def test_resume_without_checkpoint_is_an_error(teacher, tmp_path):
    result = run_cli("train_student.py", "teacher=resnet8", "student=resnet8", "distill=kd", "trainer.resume=true",
                     f"hydra.run.dir={tmp_path / 'fresh'}", *tiny_overrides(teacher))
    assert result.returncode == 2
    assert "holds no last.pt" in result.stderr


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(teacher, monkeypatch):
    """A NaN KD term at step 5: the run stops naming the term, epoch and step; last.pt stays the step-4 one."""
    from distiller import functional
    from distiller.engine.loop import NonFiniteLossError
    from distiller.jobs.train import distill

    calls = {"n": 0}
    real_kd = functional.kd

    def kd_with_nan(*args, **kwargs):
        calls["n"] += 1
        value = real_kd(*args, **kwargs)
        return value * float("nan") if calls["n"] == 5 else value

    monkeypatch.setattr(functional, "kd", kd_with_nan)
    run_dir = teacher / "nan_run"
    cfg = compose_config("train_student", [
        "teacher=resnet8", "student=resnet8", "distill=kd", *tiny_overrides(teacher, train_size=640),
        "trainer.checkpoint_every_steps=2", "trainer.log_interval=100"])
    with pytest.raises(NonFiniteLossError) as err:
        distill(cfg, run_dir)
    message = str(err.value)
    assert "'kd'" in message and "epoch 1" in message and "step 5" in message
    checkpoint = torch.load(run_dir / "last.pt", weights_only=True)
    assert checkpoint["run"]["step"] == 4
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values() if v.is_floating_point())
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "failed"


# ---- a resumed student keeps its teacher file --------------------------------------------------------------
def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file below ``folder`` (Hydra's record and the log included)."""
    return {str(p.relative_to(folder)): sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def student_command(teacher: Path, run: Path, teachers: Path) -> list[str]:
    """A two-epoch KD run of a resnet8 student on the module's data, its teacher from ``teachers``."""
    return ["teacher=resnet8", "student=resnet8", "distill=kd", f"hydra.run.dir={run}",
            *[o for o in tiny_overrides(teacher) if not o.startswith("teacher_dir=")], f"teacher_dir={teachers}",
            "trainer.epochs=2", "trainer.precision=fp32"]


@pytest.fixture(scope="module")
def student_runs(teacher) -> dict[str, Path]:
    """The student run uninterrupted (``reference``), and stopped by an exception after its first epoch's
    checkpoint (``stopped``: its last.pt is what a kill -9 at that moment leaves)."""
    from distiller.engine.loop import Trainer

    runs = {"reference": teacher / "sha_reference", "stopped": teacher / "sha_stopped"}
    result = run_cli("train_student.py", *student_command(teacher, runs["reference"], teacher / "teachers"))
    assert result.returncode == 0, result.stderr[-3000:]
    run_epoch = Trainer._run_epoch

    def stop_at_epoch_2(self, phase, epoch, *args):
        if epoch == 2:
            raise RuntimeError("stopped for the test")
        return run_epoch(self, phase, epoch, *args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Trainer, "_run_epoch", stop_at_epoch_2)
        stopped = run_cli("train_student.py", *student_command(teacher, runs["stopped"], teacher / "teachers"))
    assert stopped.returncode == 1 and "stopped for the test" in stopped.stderr
    assert torch.load(runs["stopped"] / "last.pt", weights_only=True)["run"]["epoch"] == 1
    return runs


def stopped_copy(teacher: Path, student_runs: dict[str, Path], tmp_path: Path) -> tuple[Path, Path, list[str]]:
    """A copy of the stopped run, a private copy of its teacher folder, and the command that resumes the copy
    with that folder."""
    run, teachers = tmp_path / "run", tmp_path / "teachers"
    shutil.copytree(student_runs["stopped"], run)
    shutil.copytree(teacher / "teachers", teachers)
    return run, teachers, student_command(teacher, run, teachers)


def retrain_teacher(teachers: Path, tmp_path: Path) -> Path:
    """Another resnet8 stored in the teacher's place as train_teacher.py stores one; returns the kept old file."""
    final = tmp_path / "retrained" / "final.pt"
    final.parent.mkdir()
    torch.manual_seed(seed(5))
    torch.save(slim_checkpoint(build_model("resnet8").state_dict(), "resnet8", 100, 1, 1.0, {}), final)
    store_teacher(final, teachers, "resnet8", "synthetic", {"test_top1": 1.0}, {}, final.parent)
    (backup,) = teachers.glob("resnet8.pt.*.bak")
    return backup


def test_a_student_records_its_teacher_file(teacher, student_runs):
    expected = sha256(teacher / "teachers" / "resnet8.pt")
    run = student_runs["reference"]
    for name in ("last.pt", "final.pt", "best.pt"):
        assert torch.load(run / name, weights_only=True)["teacher_sha256"] == expected, name
    assert torch.load(student_runs["stopped"] / "last.pt", weights_only=True)["teacher_sha256"] == expected
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["teacher_sha256"] == expected
    assert metrics["teacher_file"] == str(teacher / "teachers" / "resnet8.pt")


def test_a_resumed_student_refuses_another_teacher_file(teacher, student_runs, tmp_path):
    """The teacher retrained while the student was stopped: its resumption is refused in one line naming both
    hashes, the file and the ways out, and writes nothing; the kept file resumes it (to the uninterrupted run's
    result), trainer.force starts it over with the new teacher."""
    run, teachers, command = stopped_copy(teacher, student_runs, tmp_path)
    old_sha = sha256(teachers / "resnet8.pt")
    backup = retrain_teacher(teachers, tmp_path)
    new_sha = sha256(teachers / "resnet8.pt")
    before = snapshot(run)
    refused = run_cli("train_student.py", *command)
    assert refused.returncode == 2, refused.stderr[-3000:]
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in refused.stderr, refused.stderr
    for part in (str(teachers / "resnet8.pt"), new_sha[:12], old_sha[:12], f"teacher.ckpt={backup}",
                 "trainer.force=true"):
        assert part in lines[0], (part, lines[0])
    assert snapshot(run) == before  # nothing written: not even Hydra's record or the log

    aside = tmp_path / "run_before_force"
    shutil.copytree(run, aside)
    resumed = run_cli("train_student.py", *command, f"teacher.ckpt={backup}")  # the file it started with
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights(student_runs["reference"] / "final.pt", run / "final.pt")
    assert comparable_metrics(student_runs["reference"]) == comparable_metrics(run)

    shutil.rmtree(run)
    shutil.copytree(aside, run)
    again = run_cli("train_student.py", *command, "trainer.force=true")  # start over with the new teacher
    assert again.returncode == 0, again.stderr[-3000:]
    (replaced,) = run.glob("replaced-*")
    assert snapshot(replaced) == before  # the stopped run, whole
    assert torch.load(run / "last.pt", weights_only=True)["teacher_sha256"] == new_sha
    assert json.loads((run / "metrics.json").read_text())["completed_epochs"] == 2


def test_a_finished_student_is_not_reported_for_another_teacher_file(teacher, student_runs, tmp_path):
    """The teacher retrained after the student finished: rerunning the command said 'already finished' with the
    old teacher's result, even with trainer.force=true. It is refused in one line (the file it was trained with
    still shows the result); trainer.force=true trains it again with the new teacher."""
    run, teachers = tmp_path / "run", tmp_path / "teachers"
    shutil.copytree(student_runs["reference"], run)
    shutil.copytree(teacher / "teachers", teachers)
    command = student_command(teacher, run, teachers)
    backup = retrain_teacher(teachers, tmp_path)
    before = snapshot(run)
    refused = run_cli("train_student.py", *command)
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and len(lines) == 1, refused.stderr[-3000:]
    assert "is not the file this finished run was trained with" in lines[0] and f"teacher.ckpt={backup}" in lines[0]
    assert snapshot(run) == before
    kept = run_cli("train_student.py", *command, f"teacher.ckpt={backup}")
    assert kept.returncode == 0 and "already finished" in kept.stdout, kept.stderr[-3000:]
    assert snapshot(run) == before
    again = run_cli("train_student.py", *command, "trainer.force=true")
    assert again.returncode == 0, again.stderr[-3000:]
    (replaced,) = run.glob("replaced-*")
    assert snapshot(replaced) == before
    assert torch.load(run / "final.pt", weights_only=True)["teacher_sha256"] == sha256(teachers / "resnet8.pt")


def test_a_last_pt_without_teacher_hash_still_resumes(teacher, student_runs, tmp_path):
    """A checkpoint written before runs recorded their teacher's hash resumes (to the uninterrupted run's result),
    saying at info level that the teacher file cannot be checked."""
    run, _, command = stopped_copy(teacher, student_runs, tmp_path)
    last = torch.load(run / "last.pt", weights_only=True)
    del last["teacher_sha256"]
    torch.save(last, run / "last.pt")
    resumed = run_cli("train_student.py", *command)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "records no sha256 of its teacher file" in (run / "train_student.log").read_text()
    assert_same_weights(student_runs["reference"] / "final.pt", run / "final.pt")


def test_resuming_with_another_eval_precision_says_the_evaluations_change(teacher, student_runs, tmp_path):
    """trainer.eval_precision may change when a run resumes (it trains nothing differently), but the accuracies the
    run reports from then on come from the new precision: the resumption says so (config.yaml keeps fp32)."""
    run, _, command = stopped_copy(teacher, student_runs, tmp_path)
    resumed = run_cli("train_student.py", *command, "trainer.eval_precision=bf16")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log_text = (run / "train_student.log").read_text()
    assert (f"trainer.eval_precision=bf16, but the run in {run} has been evaluated with fp32 so far (config.yaml keeps "
            "the value it started with): its evaluations from here on use bf16") in log_text
    assert "eval_precision: fp32" in (run / "config.yaml").read_text()
    again = tmp_path / "same"
    run2, _, command2 = stopped_copy(teacher, student_runs, again)
    assert run_cli("train_student.py", *command2).returncode == 0
    assert "has been evaluated with" not in (run2 / "train_student.log").read_text()  # unchanged: no line
