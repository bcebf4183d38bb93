"""The teacher index: written when train_teacher.py stores a teacher, checked when one is loaded, listed.

Hashes are recomputed here with :mod:`hashlib` over the file's bytes; accuracies come from the
run's own ``metrics.json``; the recipe from the overrides the test passed.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from helpers import run_cli, tiny_overrides

from common.errors import UserError
from distiller.jobs.teacher_store import store_teacher
from distiller.jobs.teachers import INDEX_NAME, load_teacher_weights, read_index, verify_teacher
from models import build_model
from scripts import teachers as teachers_cmd


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny teacher trained by the command a user types; returns the temporary folder."""
    tmp = tmp_path_factory.mktemp("teacher")
    run = run_cli("train_teacher.py", "model=resnet8", f"hydra.run.dir={tmp / 'run'}", *tiny_overrides(tmp),
                  "seed=3", "optim.lr=0.04")
    assert run.returncode == 0, run.stderr[-3000:]
    return tmp


@pytest.fixture
def teachers(trained, tmp_path) -> Path:
    """A private copy of the stored teacher folder (tests change files in it)."""
    folder = tmp_path / "teachers"
    shutil.copytree(trained / "teachers", folder)
    return folder


def test_train_teacher_writes_the_index(trained):
    folder = trained / "teachers"
    entries = json.loads((folder / INDEX_NAME).read_text())["teachers"]
    assert list(entries) == ["resnet8.pt"]
    entry = entries["resnet8.pt"]
    metrics = json.loads((trained / "run" / "metrics.json").read_text())
    assert entry["arch"] == "resnet8" and entry["dataset"] == "synthetic" and entry["num_classes"] == 100
    assert entry["sha256"] == sha256(folder / "resnet8.pt")
    assert entry["bytes"] == (folder / "resnet8.pt").stat().st_size
    assert entry["test_top1"] == metrics["final_top1"] and entry["test_top5"] == metrics["final_top5"]
    recipe = entry["recipe"]
    assert (recipe["epochs"], recipe["lr"], recipe["batch_size"], recipe["seed"]) == (1, 0.04, 32, 3)
    assert (recipe["train_size"], recipe["test_size"], recipe["optimizer"]) == (200, 100, "sgd")
    assert recipe["data_seed"] == 0 and entry["image_size"] == [32, 32]  # synthetic.yaml's seed, CIFAR's size
    stored = dt.datetime.fromisoformat(entry["date"])
    assert abs((dt.datetime.now(dt.timezone.utc) - stored).total_seconds()) < 24 * 3600
    assert entry["run_dir"] == str(trained / "run")


def test_a_stored_teacher_loads_and_its_entry_comes_back(teachers):
    model = build_model("resnet8", num_classes=100)
    entry = load_teacher_weights(model, teachers / "resnet8.pt", "resnet8", dataset="synthetic")
    assert entry["sha256"] == sha256(teachers / "resnet8.pt")
    saved = torch.load(teachers / "resnet8.pt", weights_only=True)["model"]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())


def test_a_modified_file_is_refused_in_one_line(teachers, tmp_path):
    path = teachers / "resnet8.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match="changed since it was indexed") as err:
        verify_teacher(path, "resnet8")
    message = str(err.value)
    assert "\n" not in message and "teacher.verify=false" in message and "scripts/teachers.py add" in message
    # the user's command: status 2, one line, no traceback, nothing trained
    run = run_cli("train_student.py", "teacher=resnet8", "student=resnet8", "distill=kd",
                  f"hydra.run.dir={tmp_path / 'student'}", *tiny_overrides(tmp_path), f"teacher_dir={teachers}")
    assert run.returncode == 2, run.stderr[-2000:]
    lines = run.stderr.strip().splitlines()
    assert lines[-1].startswith("error: teacher checkpoint") and "changed since it was indexed" in lines[-1]
    assert "Traceback" not in run.stderr
    assert not (tmp_path / "student" / "last.pt").exists()


def test_verify_false_loads_a_changed_file(teachers):
    path = teachers / "resnet8.pt"
    obj = torch.load(path, weights_only=True)
    obj["model"]["fc.bias"] = obj["model"]["fc.bias"] + 1.0  # changed on purpose: a valid file, another hash
    torch.save(obj, path)
    model = build_model("resnet8", num_classes=100)
    with pytest.raises(UserError, match="changed since it was indexed"):
        load_teacher_weights(model, path, "resnet8")
    assert load_teacher_weights(model, path, "resnet8", verify=False) is None
    assert torch.equal(model.fc.bias, obj["model"]["fc.bias"])


def test_a_wrong_architecture_is_refused(teachers):
    with pytest.raises(UserError, match="indexed as a resnet8 teacher, not resnet20: pass teacher=resnet8"):
        load_teacher_weights(build_model("resnet20", num_classes=100), teachers / "resnet8.pt", "resnet20")


def test_a_file_without_entry_loads_with_a_log_line(teachers, tmp_path, caplog):
    downloaded = tmp_path / "downloads" / "ckpt_epoch_240.pth"
    downloaded.parent.mkdir()
    saved = torch.load(teachers / "resnet8.pt", weights_only=True)["model"]
    torch.save({"model": saved, "epoch": 240}, downloaded)  # the older frameworks' layout, no index beside it
    model = build_model("resnet8", num_classes=100)
    with caplog.at_level(logging.INFO, logger="distiller"):
        assert load_teacher_weights(model, downloaded, "resnet8") is None
    assert any("has no entry" in r.getMessage() and "scripts/teachers.py add" in r.getMessage() for r in caplog.records)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())


def test_storing_again_keeps_the_previous_file_and_its_entry(teachers, tmp_path):
    old_sha = sha256(teachers / "resnet8.pt")
    model = build_model("resnet8", num_classes=100)
    final = tmp_path / "run" / "final.pt"
    final.parent.mkdir()
    torch.save({"model": model.state_dict(), "arch": "resnet8", "num_classes": 100, "epoch": 2, "accuracy": 9.0},
               final)
    store_teacher(final, teachers, "resnet8", "synthetic", {"test_top1": 9.0, "test_top5": 20.0},
                  {"trainer": {"epochs": 2}, "seed": 1}, final.parent)
    backups = list(teachers.glob("resnet8.pt.*.bak"))
    assert len(backups) == 1 and sha256(backups[0]) == old_sha
    entries = read_index(teachers)
    assert entries[backups[0].name]["sha256"] == old_sha  # the kept file stays verifiable
    new = entries["resnet8.pt"]
    assert new["sha256"] == sha256(teachers / "resnet8.pt") == sha256(final) != old_sha  # the run's file, byte for byte
    assert (new["test_top1"], new["recipe"], new["source"]) == (9.0, {"epochs": 2, "seed": 1}, "train_teacher.py")
    verify_teacher(teachers / "resnet8.pt", "resnet8")
    verify_teacher(backups[0], "resnet8")


def test_the_command_lists_checks_and_adds(teachers, tmp_path, capsys):
    assert teachers_cmd.main(["list", str(teachers.parent)]) == 0
    out = capsys.readouterr().out
    assert str(teachers / "resnet8.pt") in out and sha256(teachers / "resnet8.pt")[:12] in out
    assert teachers_cmd.main(["list", f"teacher_dir={teachers}"]) == 0  # the folder as the entry points take it
    assert str(teachers / "resnet8.pt") in capsys.readouterr().out
    with pytest.raises(SystemExit):
        teachers_cmd.main(["list", "dataset=cifar100"])
    assert capsys.readouterr().err.strip() == ("error: list takes a teacher folder (or teacher_dir=FOLDER), not the "
                                               "override dataset=cifar100")
    # a downloaded file of the older frameworks, indexed with add, then checked with check
    downloaded = teachers / "resnet8_vanilla.pth"
    torch.save({"model": torch.load(teachers / "resnet8.pt", weights_only=True)["model"]}, downloaded)
    assert teachers_cmd.main(["add", str(downloaded), "model=resnet8", "dataset=cifar100"]) == 0
    assert "indexed" in capsys.readouterr().out
    entry = read_index(teachers)["resnet8_vanilla.pth"]
    assert (entry["arch"], entry["dataset"], entry["sha256"]) == ("resnet8", "cifar100", sha256(downloaded))
    assert teachers_cmd.main(["check", str(teachers), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {Path(r["file"]).name: r["status"] for r in rows} == {"resnet8.pt": "ok", "resnet8_vanilla.pth": "ok"}
    downloaded.write_bytes(downloaded.read_bytes() + b"\0")
    with pytest.raises(SystemExit) as stop:
        teachers_cmd.main(["check", str(teachers)])
    assert stop.value.code == 2
    captured = capsys.readouterr()
    assert "changed" in captured.out and "resnet8_vanilla.pth" in captured.err
    with pytest.raises(SystemExit):  # weights that do not fit model= are not indexed
        teachers_cmd.main(["add", str(teachers / "resnet8.pt"), "model=resnet20"])
    assert "does not fit resnet20" in capsys.readouterr().err


def test_train_student_warns_when_the_teacher_is_below_its_published_accuracy(capsys) -> None:
    """resnet56's shared teacher scores 72.34 on CIFAR-100's 10,000 test images: 60 is flagged, 72 not."""
    from omegaconf import OmegaConf

    from distiller.jobs.train import _warn_below_published

    cfg = OmegaConf.create({"teacher": {"published_top1": 72.34}, "dataset": {"name": "cifar100"}})
    _warn_below_published(cfg, "resnet56", 10000, 60.0)
    assert "12.34 points below the published 72.34" in capsys.readouterr().out
    _warn_below_published(cfg, "resnet56", 10000, 72.0)  # within the 1-point tolerance
    _warn_below_published(cfg, "resnet56", 500, 10.0)  # a subset: the published number does not apply
    assert capsys.readouterr().out == ""


def test_a_teacher_for_another_class_count_is_named_as_such(tmp_path):
    """The same architecture trained on 10 classes, loaded for 100: the class counts are named, not the arch twice."""
    path = tmp_path / "resnet8.pt"
    torch.save({"model": build_model("resnet8", num_classes=10).state_dict(), "arch": "resnet8", "num_classes": 10},
               path)
    with pytest.raises(UserError) as err:
        load_teacher_weights(build_model("resnet8", num_classes=100), path, "resnet8")
    assert str(err.value) == (f"teacher checkpoint {path} holds a 10-class resnet8, but the resnet8 built here has "
                              f"100 classes (the data set's): use a checkpoint trained on this data set, or choose "
                              f"the checkpoint's data set with dataset=NAME")
    # another architecture with the same parameter names (wider layers) is still named as one
    torch.save({"model": build_model("resnet8x4", num_classes=100).state_dict()}, path)
    with pytest.raises(UserError, match=r"holds a resnet8x4 model, not resnet8"):
        load_teacher_weights(build_model("resnet8", num_classes=100), path, "resnet8")


def test_add_refuses_a_class_count_the_data_set_lacks(teachers, capsys):
    """A 100-class teacher added as a CIFAR-10 one: one line, nothing indexed (the index as it was)."""
    before = (teachers / INDEX_NAME).read_bytes()
    downloaded = teachers / "resnet8_vanilla.pth"
    torch.save({"model": torch.load(teachers / "resnet8.pt", weights_only=True)["model"]}, downloaded)
    for file in (downloaded, teachers / "resnet8.pt"):
        with pytest.raises(SystemExit) as stop:
            teachers_cmd.main(["add", str(file), "model=resnet8", "dataset=cifar10"])
        assert stop.value.code == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "100-class resnet8" in err and "cifar10 data set has 10 classes" in err
    assert (teachers / INDEX_NAME).read_bytes() == before


def test_adding_an_indexed_file_again_keeps_its_entry(teachers, capsys):
    """Re-adding the file train_teacher.py stored keeps what only the run knew (run_dir, source, top-5, date, recipe);
    a copy of it gets the same facts; facts that contradict the entry are refused in one line."""
    stored = read_index(teachers)["resnet8.pt"]
    assert teachers_cmd.main(["add", str(teachers / "resnet8.pt"), "model=resnet8"]) == 0
    assert "indexed already" in capsys.readouterr().out
    assert read_index(teachers)["resnet8.pt"] == stored
    shutil.copy(teachers / "resnet8.pt", teachers / "resnet8_copy.pt")
    assert teachers_cmd.main(["add", str(teachers / "resnet8_copy.pt"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == stored == read_index(teachers)["resnet8_copy.pt"]
    before = (teachers / INDEX_NAME).read_bytes()
    with pytest.raises(SystemExit) as stop:  # the file was trained on synthetic data, not CIFAR-100
        teachers_cmd.main(["add", str(teachers / "resnet8.pt"), "model=resnet8", "dataset=cifar100"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "already indexed" in err and "synthetic (indexed) vs cifar100" in err
    assert (teachers / INDEX_NAME).read_bytes() == before


def test_add_records_the_data_it_is_told_and_refuses_what_contradicts_it(teachers, capsys):
    """A generated set's sizes and seed on the command line: recorded for a file that does not say them, refused
    in one line where the file's index entry (or its own record) says otherwise (they were kept silently)."""
    bare = teachers / "resnet8_bare.pth"
    torch.save({"model": torch.load(teachers / "resnet8.pt", weights_only=True)["model"]}, bare)
    told = ["model=resnet8", "dataset=synthetic", "dataset.seed=3", "dataset.train_size=500"]
    assert teachers_cmd.main(["add", str(bare), *told]) == 0
    recipe = read_index(teachers)[bare.name]["recipe"]
    assert (recipe["data_seed"], recipe["train_size"]) == (3, 500)
    capsys.readouterr()
    before = (teachers / INDEX_NAME).read_bytes()
    with pytest.raises(SystemExit) as stop:
        teachers_cmd.main(["add", str(bare), "model=resnet8", "dataset=synthetic", "dataset.seed=4"])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and "\n" not in err, err
    assert "trained on other data than the command line says (its index entry says dataset.seed=3, not 4)" in err
    assert (teachers / INDEX_NAME).read_bytes() == before
    assert teachers_cmd.main(["add", str(bare), *told]) == 0  # the same facts again: the entry is kept
    assert (teachers / INDEX_NAME).read_bytes() == before


@pytest.mark.parametrize("override, says", [
    ("distill=kd", "config key 'distill' is not read by scripts/teachers.py add: it reads model=, model.*, "
                   "dataset=, dataset.*; drop distill=kd"),
    ("optim.lr=0.1", "config key 'optim.lr' is not read by scripts/teachers.py add"),
    ("trainer.device=cpu", "config key 'trainer.device' is not read by scripts/teachers.py add"),  # --measure reads it
])
def test_add_refuses_keys_it_does_not_read(teachers, capsys, override, says):
    before = (teachers / INDEX_NAME).read_bytes()
    downloaded = teachers / "resnet8_vanilla.pth"
    torch.save({"model": torch.load(teachers / "resnet8.pt", weights_only=True)["model"]}, downloaded)
    with pytest.raises(SystemExit) as stop:
        teachers_cmd.main(["add", str(downloaded), "model=resnet8", "dataset=cifar100", override])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and says in err, err
    assert (teachers / INDEX_NAME).read_bytes() == before


def test_an_image_folder_teacher_records_its_folder_and_warns_on_another(tmp_path, caplog):
    """The entry of a teacher trained on an image folder records the folder (resolved); a student on another folder
    (same data set name, same classes) is warned, one on the same folder (spelt otherwise) is not."""
    folder_a, folder_b = tmp_path / "a" / "data", tmp_path / "b" / "data"
    for folder in (folder_a, folder_b):
        folder.mkdir(parents=True)
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"model": build_model("resnet8", num_classes=3).state_dict(), "arch": "resnet8", "num_classes": 3},
               run / "final.pt")
    config = {"dataset": {"name": "imagefolder", "root": str(tmp_path / "a" / ".." / "a" / "data")}}
    target = store_teacher(run / "final.pt", tmp_path / "teachers", "resnet8", "imagefolder", {"test_top1": 50.0},
                           config, run)
    assert read_index(target.parent)["resnet8.pt"]["data_root"] == str(folder_a.resolve())
    with caplog.at_level(logging.WARNING, logger="distiller"):
        verify_teacher(target, "resnet8", "imagefolder", data_root=str(folder_a.resolve()))
        assert not caplog.records
        verify_teacher(target, "resnet8", "imagefolder", data_root=str(folder_b.resolve()))
    assert [r.getMessage() for r in caplog.records] == [
        f"teacher {target} was trained on the imagefolder data at {folder_a.resolve()}, this run uses "
        f"{folder_b.resolve()}"]


def test_a_student_on_images_of_another_size_or_another_generated_set_is_warned(teachers, caplog):
    """The entry records the size of the images the teacher learnt from and the generated set's seed; a run whose
    images are another size (dataset.image_size) or whose synthetic classes come from another dataset.seed is
    warned (the teacher's predictions are for other inputs); the same size and seed give no warning."""
    path = teachers / "resnet8.pt"
    with caplog.at_level(logging.WARNING, logger="distiller"):
        verify_teacher(path, "resnet8", "synthetic", data_facts={"image_size": [32, 32], "data_seed": 0})
        assert not caplog.records
        verify_teacher(path, "resnet8", "synthetic", data_facts={"image_size": [48, 48], "data_seed": 0})
        verify_teacher(path, "resnet8", "synthetic", data_facts={"image_size": [32, 32], "data_seed": 5})
    assert [r.getMessage() for r in caplog.records] == [
        f"teacher {path} was trained on 32x32 images, this run's are 48x48: its predictions are for another input "
        "size (dataset.image_size)",
        f"teacher {path} was trained on the synthetic set generated with dataset.seed=0, this run's has "
        "dataset.seed=5: other classes, so its predictions are for another data set"]


def test_train_student_warns_about_a_teacher_of_another_generated_set(trained, tmp_path) -> None:
    """The command line: the tiny teacher (dataset.seed 0) distilled on the set of dataset.seed=1."""
    result = run_cli("train_student.py", "teacher=resnet8", "student=resnet8", "distill=kd",
                     *tiny_overrides(tmp_path), f"teacher_dir={trained / 'teachers'}", "dataset.seed=1",
                     f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "dataset.seed=1: other classes, so its predictions are for another data set" in result.stdout + result.stderr


@pytest.mark.parametrize("damage, says", [
    ({"arch": 5}, "arch 5 is not a network's name"),
    ({"arch": "resnet8"}, "sha256 None is not a sha256 digest"),
    ("resnet8", "not a mapping"),
])
def test_a_damaged_index_entry_is_one_line_naming_it(teachers, capsys, damage, says):
    """An entry edited by hand was listed as arch 5, kept by add, and turned into the advice 'pass teacher=5'."""
    index = json.loads((teachers / INDEX_NAME).read_text())
    index["teachers"]["resnet8.pt"] = damage
    (teachers / INDEX_NAME).write_text(json.dumps(index))
    before = (teachers / INDEX_NAME).read_bytes()
    for command in (["list", str(teachers)], ["check", str(teachers)]):
        with pytest.raises(SystemExit) as stop:
            teachers_cmd.main(command)
        err = capsys.readouterr().err.strip()
        assert stop.value.code == 2 and "\n" not in err, err
        assert f"has a damaged entry for resnet8.pt ({says}); delete that entry" in err, err
    with pytest.raises(UserError, match="damaged entry for resnet8.pt"):
        load_teacher_weights(build_model("resnet8", num_classes=100), teachers / "resnet8.pt", "resnet8")
    assert (teachers / INDEX_NAME).read_bytes() == before
