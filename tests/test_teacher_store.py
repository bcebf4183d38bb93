"""Storing a finished teacher survives kill -9 at every step: the rerun completes the store.

A resnet8 teacher is trained once (in process, by ``train_teacher``'s job). Each test copies its
finished run, takes away its receipt (as if the store had never run), puts an older indexed
teacher in a fresh teacher folder, and runs the store in a forked child that SIGKILLs itself
after step k. Then the run is rerun as a user would (the same config, ``train_network``), and the
folder must be consistent: the new teacher under its name, the old one as the only ``.bak``,
every file indexed with its own sha256 (recomputed here with :mod:`hashlib`), no temporary files,
and a student's load gets the new weights. Before the rerun a student gets either a consistent
file or a one-line refusal.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from helpers import compose_config, seed, tiny_overrides

from common.errors import UserError
from distiller.engine.checkpoints import slim_checkpoint
from distiller.jobs.teacher_store import RECEIPT_NAME, STORE_STEPS, store_teacher
from distiller.jobs.teachers import INDEX_NAME, add_teacher, load_teacher_weights, read_index
from distiller.jobs.train import train_network
from models import build_model

ARCH = "resnet8"


def compose(overrides: list[str]):
    return compose_config("train_teacher", overrides)


def overrides(tmp: Path, data: Path, teachers: Path) -> list[str]:
    return [f"model={ARCH}", *tiny_overrides(tmp), f"dataset.root={data}", f"teacher_dir={teachers}",
            "logger=none", f"seed={seed(1)}"]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """One finished teacher run (its data cache is shared by the tests; the data root is not part of the run)."""
    tmp = tmp_path_factory.mktemp("store")
    train_network(compose(overrides(tmp, tmp / "data", tmp / "teachers")), tmp / "run")
    return {"tmp": tmp, "run": tmp / "run", "data": tmp / "data"}


@pytest.fixture
def scene(trained, tmp_path) -> dict:
    """A finished run whose store has not happened yet, and a teacher folder holding an older indexed teacher."""
    run = tmp_path / "run"
    shutil.copytree(trained["run"], run)
    (run / RECEIPT_NAME).unlink()
    teachers = tmp_path / "teachers"
    teachers.mkdir()
    torch.manual_seed(seed(2))
    old_model = build_model(ARCH, num_classes=100)
    torch.save(slim_checkpoint(old_model.state_dict(), ARCH, 100, 3, 5.0, {}), teachers / f"{ARCH}.pt")
    add_teacher(teachers / f"{ARCH}.pt", ARCH, "synthetic", 100, {"test_top1": 5.0})
    cfg = compose(overrides(tmp_path, trained["data"], teachers))
    return {"run": run, "teachers": teachers, "cfg": cfg, "old_sha": sha256(teachers / f"{ARCH}.pt"),
            "new_sha": sha256(run / "final.pt")}


def store_killed_at(scene: dict, step: str, run: Path | None = None) -> None:
    """Store the run's final.pt in a forked child that SIGKILLs itself right after ``step``."""
    run = run or scene["run"]

    def kill(name: str) -> None:
        if name == step:
            os.kill(os.getpid(), signal.SIGKILL)

    pid = os.fork()
    if pid == 0:  # the child: the store as train_network's last lines run it
        try:
            config = json.loads(json.dumps(dict(torch.load(run / "final.pt", weights_only=True)["config"])))
            store_teacher(run / "final.pt", scene["teachers"], ARCH, "synthetic", {"test_top1": 1.0}, config, run,
                          on_step=kill)
        finally:
            os._exit(3)  # reached only if the step never came: the parent fails
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"the store never reached {step}"


def student_load(path: Path) -> dict[str, torch.Tensor]:
    model = build_model(ARCH, num_classes=100)
    load_teacher_weights(model, path, ARCH, dataset="synthetic")
    return model.state_dict()


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def check_consistent(teachers: Path) -> dict[str, dict]:
    """Every teacher file is indexed with its own sha256, every entry names a file, nothing half-done is left."""
    entries = read_index(teachers)
    files = {p.name for p in teachers.iterdir() if p.name != INDEX_NAME and not p.name.startswith(".")}
    assert files == set(entries), (files, set(entries))
    for name, entry in entries.items():
        assert entry["sha256"] == sha256(teachers / name), name
        assert entry["bytes"] == (teachers / name).stat().st_size
    hidden = {p.name for p in teachers.iterdir() if p.name.startswith(".")}
    assert hidden <= {f".{INDEX_NAME}.lock"}, hidden  # no temporary file survives
    return entries


@pytest.mark.parametrize("step", STORE_STEPS)
def test_a_kill_at_any_step_of_the_store_is_completed_by_the_rerun(scene, step, capsys):
    teachers, run = scene["teachers"], scene["run"]
    target = teachers / f"{ARCH}.pt"
    new_weights, old_weights = weights(run / "final.pt"), weights(target)
    store_killed_at(scene, step)

    # before the rerun: a student gets the old or the new teacher, each checked against its entry, or one line
    try:
        loaded = student_load(target)
        assert same(loaded, old_weights) or same(loaded, new_weights)
    except UserError as err:
        assert "\n" not in str(err) and "was interrupted" in str(err) and str(run) in str(err)

    assert train_network(scene["cfg"], run) is None  # the rerun: already trained, nothing to train again
    assert "already finished" in capsys.readouterr().out
    entries = check_consistent(teachers)
    backups = sorted(p for p in teachers.iterdir() if p.name.endswith(".bak"))
    assert len(backups) == 1 and sha256(backups[0]) == scene["old_sha"]  # the previous teacher, kept once
    assert entries[target.name]["sha256"] == sha256(target) == scene["new_sha"]
    assert entries[target.name]["run_dir"] == str(run) and entries[target.name]["dataset"] == "synthetic"
    assert entries[backups[0].name]["test_top1"] == 5.0  # the old entry moved with its file
    receipt = json.loads((run / RECEIPT_NAME).read_text())
    assert receipt["sha256"] == scene["new_sha"] and receipt["teacher"] == str(target)
    assert same(student_load(target), new_weights)

    # a further rerun changes nothing
    before = {p.name: p.stat().st_mtime_ns for p in teachers.iterdir()}
    assert train_network(scene["cfg"], run) is None
    assert {p.name: p.stat().st_mtime_ns for p in teachers.iterdir()} == before


def test_a_kill_before_final_pt_is_completed_from_last_pt(scene):
    """Killed between the last epoch's last.pt and final.pt: the rerun rebuilds final.pt and stores it."""
    run, teachers = scene["run"], scene["teachers"]
    expected = weights(run / "final.pt")
    (run / "final.pt").unlink()
    assert train_network(scene["cfg"], run) is None
    assert same(weights(run / "final.pt"), expected)
    last = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    assert torch.load(run / "final.pt", weights_only=True)["accuracy"] == last["run"]["history"][-1]["test_top1"]
    check_consistent(teachers)
    assert sha256(teachers / f"{ARCH}.pt") == sha256(run / "final.pt")
    assert same(student_load(teachers / f"{ARCH}.pt"), expected)


def test_a_run_stored_without_a_receipt_is_not_stored_again(scene):
    """A teacher stored before receipts existed is found by its sha256 in the index: no second copy, no .bak."""
    run, teachers = scene["run"], scene["teachers"]
    shutil.copy(run / "final.pt", teachers / "resnet8_earlier.pt")
    add_teacher(teachers / "resnet8_earlier.pt", ARCH, "synthetic", 100)
    assert train_network(scene["cfg"], run) is None
    assert sorted(p.name for p in teachers.glob("*.pt*")) == ["resnet8.pt", "resnet8_earlier.pt"]
    assert json.loads((run / RECEIPT_NAME).read_text())["teacher"] == str(teachers / "resnet8_earlier.pt")


def test_another_store_completes_an_interrupted_one_first(scene, trained, tmp_path):
    """Run A is killed mid-store; run B then stores into the same file: A's store completes, then B's."""
    first = scene["run"]
    store_killed_at(scene, "backed_up")
    second = tmp_path / "run_b"
    shutil.copytree(first, second)
    torch.manual_seed(seed(3))
    other = build_model(ARCH, num_classes=100).state_dict()
    torch.save(slim_checkpoint(other, ARCH, 100, 1, 2.0, {}), second / "final.pt")
    store_teacher(second / "final.pt", scene["teachers"], ARCH, "synthetic", {"test_top1": 2.0}, {}, second)
    entries = check_consistent(scene["teachers"])
    by_sha = {e["sha256"]: name for name, e in entries.items()}
    assert by_sha[sha256(second / "final.pt")] == f"{ARCH}.pt"
    assert by_sha[scene["new_sha"]].endswith(".bak") and by_sha[scene["old_sha"]].endswith(".bak")
    assert json.loads((first / RECEIPT_NAME).read_text())["sha256"] == scene["new_sha"]


def test_teacher_dir_naming_a_file_is_refused_before_training(trained, tmp_path):
    not_a_folder = tmp_path / "teachers.txt"
    not_a_folder.write_text("notes\n")
    for teacher_dir, says in ((not_a_folder, "is a file, not a folder"), (not_a_folder / "sub", "lies inside")):
        cfg = compose(overrides(tmp_path, trained["data"], teacher_dir))
        with pytest.raises(UserError, match=says) as err:
            train_network(cfg, tmp_path / "run")
        assert "\n" not in str(err.value) and "save_teacher=false" in str(err.value)
        assert not (tmp_path / "run" / "last.pt").exists()  # nothing trained
    assert not_a_folder.read_text() == "notes\n"


def test_the_check_command_reports_an_interrupted_store(scene, capsys):
    from scripts import teachers as teachers_cmd

    store_killed_at(scene, "intent")
    with pytest.raises(SystemExit) as stop:
        teachers_cmd.main(["check", str(scene["teachers"])])
    assert stop.value.code == 2
    captured = capsys.readouterr()
    assert "store interrupted" in captured.out and str(scene["teachers"] / f"{ARCH}.pt") in captured.err


def test_a_finished_run_rerun_with_another_teacher_dir_stores_its_teacher_there(trained, tmp_path, capsys):
    """The run stored its teacher in one folder; its command rerun with another teacher_dir stores it there too
    (the command a student's "teacher checkpoint not found" message suggests), trains nothing, and says so."""
    run = tmp_path / "run"
    shutil.copytree(trained["run"], run)
    first = json.loads((run / RECEIPT_NAME).read_text())
    other = tmp_path / "other_teachers"
    cfg = compose(overrides(tmp_path, trained["data"], other))
    assert train_network(cfg, run) is None
    out = capsys.readouterr().out
    assert f"stored the finished run's teacher as {other / f'{ARCH}.pt'}" in out and "already finished" in out
    entries = check_consistent(other)
    assert list(entries) == [f"{ARCH}.pt"] and entries[f"{ARCH}.pt"]["sha256"] == sha256(run / "final.pt")
    assert entries[f"{ARCH}.pt"]["run_dir"] == str(run) and entries[f"{ARCH}.pt"]["source"] == "train_teacher.py"
    assert same(student_load(other / f"{ARCH}.pt"), weights(run / "final.pt"))
    assert json.loads((run / RECEIPT_NAME).read_text()) == first  # the receipt still names the first store
    # once there, a further rerun changes nothing, in either folder
    before = {p: p.stat().st_mtime_ns for folder in (other, trained["tmp"] / "teachers") for p in folder.iterdir()}
    for teacher_dir in (other, trained["tmp"] / "teachers"):
        assert train_network(compose(overrides(tmp_path, trained["data"], teacher_dir)), run) is None
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert "stored" not in capsys.readouterr().out


def test_a_finished_run_is_not_stored_again_where_its_file_is_indexed(trained, tmp_path):
    """Another teacher_dir that already holds the run's file (indexed under any name) gets no second copy."""
    run = tmp_path / "run"
    shutil.copytree(trained["run"], run)
    other = tmp_path / "other_teachers"
    other.mkdir()
    shutil.copy(run / "final.pt", other / "kept.pt")
    add_teacher(other / "kept.pt", ARCH, "synthetic", 100)
    assert train_network(compose(overrides(tmp_path, trained["data"], other)), run) is None
    assert sorted(p.name for p in other.glob("*.pt*")) == ["kept.pt"]
