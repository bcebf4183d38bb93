"""torchvision's ImageNet teachers passed by path: a plain state dict loads, the index records its sha256, a file
named after its sha256 is held to it, and the measured top-1 is compared with torchvision's published one.

The published numbers are checked against torchvision's own weight metadata (an independent copy
of its documentation) and typed from the docs by hand; hashes are recomputed with :mod:`hashlib`.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import torchvision
from helpers import run_cli, seed

from common.errors import UserError
from distiller.config.schema import PUBLISHED_IMAGENET_TOP1
from distiller.jobs.teacher_accuracy import published_check
from distiller.jobs.teachers import load_teacher_weights, read_index, verify_teacher
from models.external import build_network

# torchvision's documentation, IMAGENET1K_V1 acc@1 (pytorch.org/vision/stable/models): typed by hand
DOCS_TOP1 = {"resnet18": 69.758, "resnet34": 73.314, "resnet50": 76.130}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def plain_weights(folder: Path, name: str, num_classes: int = 5, named_by_hash: bool = False) -> Path:
    """A torchvision network's state dict saved as torchvision ships it (no wrapper); optionally named
    ``<name>-<first 8 hex of its sha256>.pth`` as its downloads are."""
    torch.manual_seed(seed(30))
    path = folder / f"{name}.pth"
    torch.save(torchvision.models.get_model(name, num_classes=num_classes).state_dict(), path)
    if named_by_hash:
        path = path.rename(folder / f"{name}-{sha256(path)[:8]}.pth")
    return path


def test_the_published_imagenet_numbers_are_torchvisions() -> None:
    assert {k.removeprefix("torchvision-"): v for k, v in PUBLISHED_IMAGENET_TOP1.items()} == DOCS_TOP1
    for name, top1 in DOCS_TOP1.items():
        meta = torchvision.models.get_model_weights(name).IMAGENET1K_V1.meta
        assert meta["_metrics"]["ImageNet-1K"]["acc@1"] == pytest.approx(top1, abs=1e-9)


def test_published_check_on_imagenets_val_split_by_hand() -> None:
    ok = published_check("torchvision-resnet34", "imagenet", 50000, 72.5)
    assert ok["published_top1"] == 73.314 and ok["difference"] == pytest.approx(-0.814) and ok["ok"]
    low = published_check("torchvision-resnet50", "imagenet", 50000, 75.0)
    assert low["difference"] == pytest.approx(-1.13) and not low["ok"]
    assert published_check("torchvision-resnet34", "imagenet", 49999, 72.5) is None  # a partial val split
    assert published_check("torchvision-resnet101", "imagenet", 50000, 72.5) is None  # no number kept
    # the zoo's CIFAR ResNet50 carries CIFAR-100's 79.34 in its teacher node: never compared on ImageNet
    assert published_check("ResNet50", "imagenet", 50000, 10.0, published=79.34) is None
    assert published_check("ResNet50", "cifar100", 10000, 79.0, published=79.34)["ok"]  # CIFAR-100 as before


def test_a_plain_torchvision_state_dict_loads_as_the_teacher(tmp_path: Path) -> None:
    path = plain_weights(tmp_path, "resnet34")
    teacher = build_network({"source": "torchvision", "name": "resnet34"}, 5, (32, 32), role="teacher")
    assert load_teacher_weights(teacher, path, "torchvision-resnet34", dataset="imagenet") is None  # not indexed
    saved = torch.load(path, weights_only=True)
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in saved.items())
    # a file of another architecture: tests/test_imagenet_runs.py (one line, status 2, from the command line)


def test_add_records_the_sha256_and_the_run_checks_the_file_against_it(tmp_path: Path) -> None:
    path = plain_weights(tmp_path, "resnet18", named_by_hash=True)
    added = run_cli("scripts/teachers.py", "add", str(path), "model=torchvision", "model.name=resnet18",
                    "dataset=imagenet", "--json")
    assert added.returncode == 0, added.stderr
    entry = json.loads(added.stdout)
    assert entry == read_index(tmp_path)[path.name]
    assert (entry["arch"], entry["dataset"], entry["num_classes"]) == ("torchvision-resnet18", "imagenet", 5)
    assert entry["sha256"] == sha256(path) and entry["bytes"] == path.stat().st_size
    assert verify_teacher(path, "torchvision-resnet18", "imagenet") == entry
    with pytest.raises(UserError, match="indexed as a torchvision-resnet18 teacher, not torchvision-resnet34"):
        verify_teacher(path, "torchvision-resnet34")
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x01  # one bit
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match="changed since it was indexed"):
        verify_teacher(path, "torchvision-resnet18")


def test_a_file_named_after_its_sha256_is_held_to_it(tmp_path: Path) -> None:
    path = plain_weights(tmp_path, "resnet18", named_by_hash=True)
    assert verify_teacher(path, "torchvision-resnet18") is None  # right prefix, not indexed: loads
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    actual = sha256(path)[:8]
    with pytest.raises(UserError) as err:
        verify_teacher(path, "torchvision-resnet18")
    message = str(err.value)
    assert f"begins {actual}, not {path.name[9:17]}" in message and "\n" not in message
    refused = run_cli("scripts/teachers.py", "add", str(path), "model=torchvision", "model.name=resnet18")
    assert refused.returncode == 2 and "is not the file its name promises" in refused.stderr
    assert not (tmp_path / "index.json").exists()  # a damaged download is never indexed
    # names without torchvision's hash part are not checked
    plain = plain_weights(tmp_path, "resnet18")
    assert verify_teacher(plain.rename(tmp_path / "resnet18-teacher.pth"), "torchvision-resnet18") is None
