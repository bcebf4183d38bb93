"""``scripts/evaluate.py`` and ``scripts/teachers.py add`` on networks from outside the zoo.

The reference builds the torchvision network itself (``torchvision.models.<name>``, with the
CIFAR stem replaced by hand: a 3x3 stride-1 first convolution and no max-pool) and evaluates
one image at a time in float64. Tolerance as in ``test_evaluate_cmd.py``: float32 batches vs
float64 per image can flip a top-1 decision only where the two largest logits are closer than
``AMBIGUOUS_GAP``; the mean loss agrees to 1e-4.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torchvision
from helpers import compose_config, run_cli, seed, tiny_overrides

from common.errors import UserError
from datasets import load_dataset
from distiller.jobs.evaluate import evaluate_checkpoint, load_checkpoint
from distiller.jobs.train import train_network

CLASSES, TRAIN, TEST = 10, 64, 40
AMBIGUOUS_GAP = 1e-3


def data_overrides(tmp: Path) -> list[str]:
    tiny = tiny_overrides(tmp, train_size=TRAIN, test_size=TEST)  # the data set and device: what evaluation reads
    return [*(o for o in tiny if o.startswith(("dataset", "trainer.device"))), f"dataset.num_classes={CLASSES}"]


def reference_network(name: str, cifar_stem: bool) -> torch.nn.Module:
    net = getattr(torchvision.models, name)(num_classes=CLASSES)
    if cifar_stem:  # what the issue defines the switch to be, written here independently
        net.conv1 = torch.nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = torch.nn.Identity()
    return net


def naive(net: torch.nn.Module, state: dict, data) -> dict:
    """Top-1 hits, mean loss and near-ties of ``net`` with ``state``, one image at a time in float64."""
    net = net.double()
    net.load_state_dict(state)
    net.eval()
    hits, loss, ambiguous = 0, 0.0, 0
    with torch.no_grad():
        for image, label in zip(data.test_images, data.test_labels.tolist()):
            x = image.double() / 255.0
            for c in range(3):
                x[c] = (x[c] - data.mean[c]) / data.std[c]
            logits = net(x[None])[0].tolist()
            ranked = sorted(logits, reverse=True)
            hits += logits.index(ranked[0]) == label
            loss += -(logits[label] - ranked[0] - math.log(sum(math.exp(v - ranked[0]) for v in logits)))
            ambiguous += ranked[0] - ranked[1] < AMBIGUOUS_GAP
    return {"hits": hits, "loss": loss / len(data.test_labels), "ambiguous": ambiguous}


def check(result: dict, ref: dict) -> None:
    assert result["num_images"] == TEST
    assert abs(result["test_top1"] * TEST / 100 - ref["hits"]) <= ref["ambiguous"] + 1e-6
    assert result["test_loss"] == pytest.approx(ref["loss"], abs=1e-4)


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory) -> dict:
    """A torchvision resnet18 (CIFAR stem) trained for one epoch by ``train_teacher``'s own job."""
    tmp = tmp_path_factory.mktemp("external-teacher")
    cfg = compose_config("train_teacher", ["model=torchvision", "model.name=resnet18", "model.cifar_stem=true",
                                           *tiny_overrides(tmp, train_size=TRAIN, test_size=TEST),
                                           f"dataset.num_classes={CLASSES}", f"seed={seed(7)}"])
    train_network(cfg, tmp / "run")
    return {"tmp": tmp, "final": tmp / "run" / "final.pt"}


def test_a_torchvision_teacher_is_rebuilt_from_its_recorded_config(teacher_run) -> None:
    """No ``model=`` needed: the run's config in the file says torchvision resnet18 with the CIFAR stem."""
    tmp = teacher_run["tmp"]
    result = evaluate_checkpoint(teacher_run["final"], [f"dataset.root={tmp / 'data'}", "trainer.device=cpu"])
    assert result["arch"] == "torchvision-resnet18" and result["arch_from"] == "header"
    assert result["dataset"] == "synthetic" and result["dataset_from"] == "the checkpoint's config"
    assert result["num_classes"] == CLASSES and result["published"] is None
    state = torch.load(teacher_run["final"], map_location="cpu", weights_only=True)["model"]
    data = load_dataset({"name": "synthetic", "root": str(tmp / "data"), "train_size": TRAIN, "test_size": TEST,
                         "seed": 0, "num_classes": CLASSES})
    check(result, naive(reference_network("resnet18", cifar_stem=True), state, data))
    assert result["stored_top1"] == pytest.approx(result["test_top1"])  # what training measured on the same split


def test_a_file_of_the_earlier_release_with_taps_in_its_config_is_rebuilt(teacher_run, tmp_path: Path) -> None:
    """Files written before ``taps`` became ``features`` record the old key: read as the new one, not handed
    to torchvision's constructor as an argument."""
    saved = torch.load(teacher_run["final"], map_location="cpu", weights_only=True)
    node = saved["config"]["model"]
    node["taps"] = node.pop("features")
    node["taps"]["stem"] = "relu"  # what the rebuild must read as a declaration
    torch.save(saved, tmp_path / "old.pt")
    loaded = load_checkpoint(tmp_path / "old.pt")
    assert loaded.arch == "torchvision-resnet18"
    assert next(i for i in loaded.model.feature_info if i.name == "stem").module == "relu"


def test_a_plain_torchvision_state_dict_needs_model_and_then_matches(tmp_path: Path) -> None:
    """A bare state dict carries no name: ``model=torchvision model.name=...`` says it, classes from its shape."""
    torch.manual_seed(seed(8))
    net = torchvision.models.mobilenet_v3_small(num_classes=CLASSES)
    with torch.no_grad():  # spread the predictions: random BatchNorm statistics instead of 0/1
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    path = tmp_path / "mobilenet.pth"
    torch.save(net.state_dict(), path)
    data = data_overrides(tmp_path)
    with pytest.raises(UserError, match="model=torchvision"):
        evaluate_checkpoint(path, data)  # matches no zoo network
    result = evaluate_checkpoint(path, ["model=torchvision", "model.name=mobilenet_v3_small", *data])
    assert result["arch"] == "torchvision-mobilenet_v3_small" and result["arch_from"] == "model="
    assert result["num_classes"] == CLASSES  # read from the classifier's shape, built as torchvision builds it
    check(result, naive(reference_network("mobilenet_v3_small", cifar_stem=False), net.state_dict(),
                        load_dataset({"name": "synthetic", "root": str(tmp_path / "data"), "train_size": TRAIN,
                                      "test_size": TEST, "seed": 0, "num_classes": CLASSES})))
    with pytest.raises(UserError, match=r"does not fit torchvision-resnet18 \(model=\)"):
        load_checkpoint(path, {"source": "torchvision", "name": "resnet18"})  # the wrong network: keys named


def test_the_commands_take_an_external_teacher(teacher_run, tmp_path: Path) -> None:
    """As typed: evaluate.py prints the network's name; teachers.py add indexes it under that name."""
    tmp = teacher_run["tmp"]
    shown = run_cli("scripts/evaluate.py", str(teacher_run["final"]), f"dataset.root={tmp / 'data'}",
                    "trainer.device=cpu", "--json")
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert json.loads(shown.stdout)["arch"] == "torchvision-resnet18"
    copy = tmp_path / "teachers" / "torchvision-resnet18.pt"
    copy.parent.mkdir()
    copy.write_bytes(teacher_run["final"].read_bytes())
    added = run_cli("scripts/teachers.py", "add", str(copy), "--json")
    assert added.returncode == 0, added.stderr[-2000:]
    entry = json.loads(added.stdout)
    assert entry["arch"] == "torchvision-resnet18" and entry["dataset"] == "synthetic"
    assert entry["num_classes"] == CLASSES


def test_the_recorded_node_is_the_one_the_header_names() -> None:
    """A distillation run's file records teacher and student; the student (the file's network) is rebuilt."""
    from distiller.jobs.evaluate import recorded_network

    student = {"source": "torchvision", "name": "mobilenet_v3_small", "cifar_stem": True}
    teacher = {"source": "torchvision", "name": "resnet18", "cifar_stem": True}
    config = {"student": student, "teacher": teacher}
    assert recorded_network({"arch": "torchvision-mobilenet_v3_small", "config": config}) == student
    assert recorded_network({"arch": "torchvision-resnet18", "config": {"model": teacher}}) == teacher
    assert recorded_network({"arch": "resnet8", "config": {"student": {"name": "resnet8"}, "teacher": teacher}}) is None
    assert recorded_network({"arch": "torchvision-resnet18"}) is None  # no config recorded: model= must say it


def test_a_bare_file_in_a_teacher_folder_is_known_by_its_index_entry(tmp_path: Path) -> None:
    """No header, but the folder's teacher index names the file's architecture: a zoo one is built from it (as
    the index says, not guessed); an outside one, which the index cannot rebuild, is named in the refusal with
    the command line that chooses it."""
    from distiller.jobs.teachers import add_teacher
    from models import build_model
    from tests.external_nets import TinyNet

    torch.save(build_model("resnet8", num_classes=10).state_dict(), tmp_path / "r8.pth")
    add_teacher(tmp_path / "r8.pth", "resnet8", num_classes=10)
    loaded = load_checkpoint(tmp_path / "r8.pth")
    assert (loaded.arch, loaded.arch_from, loaded.num_classes) == ("resnet8", "teacher index", 10)
    torch.save(TinyNet(num_classes=10).state_dict(), tmp_path / "tiny.pth")
    add_teacher(tmp_path / "tiny.pth", "module-tests.external_nets.TinyNet", num_classes=10)
    with pytest.raises(UserError, match=r"its folder's teacher index names it module-tests.external_nets.TinyNet: "
                                        r"pass model=module model._target_=tests.external_nets.TinyNet with the keys"):
        load_checkpoint(tmp_path / "tiny.pth")
