"""Crash safety: a run killed at any moment resumes to the same result as an uninterrupted run."""
from __future__ import annotations

import json
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
    start_command,
    tiny_overrides,
    train_tiny_teacher,
)

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
