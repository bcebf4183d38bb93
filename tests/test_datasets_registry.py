"""Data sets as a registry with their own facts: CIFAR-10, the image folder, resolutions other than 32 x 32.

CPU only, no network. The data are written by the tests themselves (CIFAR-10 pickles in the
official layout, PNG files with PIL) and the expected values come from independent reads:
the arrays the test wrote, torchvision's own CIFAR10 reader, PIL reading the files back,
float64 statistics computed with NumPy, and windows of padded images built with loops.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
import torchvision.datasets.cifar as tv_cifar
from helpers import REPO, generator, objective_of, run_cli, seed
from PIL import Image

import datasets.imagefolder as imagefolder
from common.errors import UserError
from datasets import DATASETS, DatasetFacts, DeviceLoader, dataset_facts, load_dataset
from datasets.augment import crop_and_flip, padding_for
from datasets.views import VIEWS
from distiller.features import STAGES, Features
from distiller.methods.base import METHODS, BuildContext, DistillMethod
from models import build_model

CIFAR10_TRAIN_FILES = [f"data_batch_{k}" for k in range(1, 6)]


# ----------------------------------------------------------------------------------------------
# Writers of test data (the official CIFAR-10 layout; PNG folders)


def write_cifar10(folder: Path, per_batch: int, test_n: int, base: int = 0) -> dict[str, np.ndarray]:
    """A CIFAR-10 folder in the official pickle layout; returns what was written (the truth)."""
    rng = np.random.default_rng(seed(base))
    folder.mkdir(parents=True)
    written: dict[str, list[np.ndarray]] = {"train_data": [], "train_labels": []}
    for k, name in enumerate(CIFAR10_TRAIN_FILES):
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in (np.arange(per_batch) + k) % 10]
        entry = {"batch_label": f"training batch {k + 1} of 5", "labels": labels, "data": data,
                 "filenames": [f"img_{k}_{i}.png" for i in range(per_batch)]}
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
        written["train_data"].append(data)
        written["train_labels"].append(np.array(labels))
    test_data = rng.integers(0, 256, (test_n, 3072), dtype=np.uint8)
    test_labels = [int(v) for v in np.arange(test_n) % 10]
    (folder / "test_batch").write_bytes(pickle.dumps(
        {"batch_label": "testing batch 1 of 1", "labels": test_labels, "data": test_data,
         "filenames": [f"test_{i}.png" for i in range(test_n)]}, protocol=2))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps(
        {"num_cases_per_batch": per_batch, "label_names": names, "num_vis": 3072}, protocol=2))
    return {"train_data": np.concatenate(written["train_data"]),
            "train_labels": np.concatenate(written["train_labels"]), "test_data": test_data,
            "test_labels": np.array(test_labels), "names": np.array(names)}


def write_png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def write_folder(root: Path, classes: dict[str, tuple[int, int]], size: int = 64, base: int = 0) -> None:
    """``root/train/<class>/`` and ``root/val/<class>/`` with (train, val) PNGs of random pixels per class.

    Each class has a bright channel, so the classes are learnable and the statistics differ per channel.
    """
    rng = np.random.default_rng(seed(base))
    for c, (name, counts) in enumerate(classes.items()):
        for split, count in zip(("train", "val"), counts):
            for i in range(count):
                pixels = rng.integers(0, 128, (size, size, 3), dtype=np.uint8)
                pixels[..., c % 3] += 127
                write_png(root / split / name / f"{i:03d}.png", pixels)


def pil_read(path: Path) -> np.ndarray:
    """The image as PIL reads it, [3, H, W] uint8: the independent decoding."""
    with Image.open(path) as image:
        return np.array(image.convert("RGB")).transpose(2, 0, 1)


def folder_cfg(root: Path, **more: object) -> dict:
    return {"name": "imagefolder", "root": str(root), **more}


# ----------------------------------------------------------------------------------------------
# The registry and its facts


def test_registry_lists_every_data_set_with_its_facts() -> None:
    assert {"cifar10", "cifar100", "imagefolder", "synthetic"} <= set(DATASETS.names())
    cifar10 = dataset_facts("cifar10")
    assert (cifar10.num_classes, cifar10.image_size, cifar10.channels) == (10, (32, 32), 3)
    # the training set's statistics as commonly published for CIFAR-10 / CIFAR-100
    assert cifar10.mean == (0.4914, 0.4822, 0.4465) and cifar10.std == (0.2470, 0.2435, 0.2616)
    cifar100 = dataset_facts("cifar100")
    assert (cifar100.num_classes, cifar100.image_size) == (100, (32, 32))
    assert cifar100.mean == (0.5071, 0.4867, 0.4408) and cifar100.std == (0.2675, 0.2565, 0.2761)
    assert dataset_facts("imagefolder").num_classes is None  # from the folder


def test_a_data_set_is_one_registered_loader(register, tmp_path: Path) -> None:
    from datasets import DataSplits

    images = torch.zeros(4, 1, 8, 8, dtype=torch.uint8)
    images[:, :, :, 4:] = 255  # half black, half white: mean 0.5, std 0.5 exactly
    labels = torch.tensor([0, 1, 0, 1])

    def load_toy(cfg):  # a one-file data set: loader + facts
        return DataSplits(images, labels, images, labels, 2, ["a", "b"])

    register(DATASETS, "toy", load_toy)
    splits = load_dataset({"name": "toy", "num_classes": None})
    assert splits.num_classes == 2 and splits.image_shape == (1, 8, 8)
    assert splits.mean == (0.5,) and splits.std == (0.5,)  # the training split's own statistics
    with pytest.raises(UserError, match=r"dataset.num_classes=3 .* 2 classes"):
        load_dataset({"name": "toy", "num_classes": 3})
    DATASETS.add("toy_wrong", load_toy, facts=DatasetFacts(image_size=(32, 32)))
    try:
        with pytest.raises(ValueError, match="image_size"):  # a loader that breaks its own declaration
            load_dataset({"name": "toy_wrong"})
    finally:
        DATASETS.remove("toy_wrong")


def test_mean_and_std_overrides(tmp_path: Path) -> None:
    root = tmp_path / "c10"
    write_cifar10(root / "cifar-10-batches-py", 4, 6)
    cfg = {"name": "cifar10", "root": str(root), "verify_checksums": False, "download": False}
    splits = load_dataset({**cfg, "mean": [0.5, 0.25, 0], "std": [1, 2, 0.5]})
    assert splits.mean == (0.5, 0.25, 0.0) and splits.std == (1.0, 2.0, 0.5)
    for bad in ({"mean": [0.5, 0.5]}, {"std": [1, 0, 1]}, {"mean": "0.5"}):
        with pytest.raises(UserError, match="list of 3"):
            load_dataset({**cfg, **bad})


# ----------------------------------------------------------------------------------------------
# CIFAR-10


def test_cifar10_reads_the_official_layout(tmp_path: Path) -> None:
    truth = write_cifar10(tmp_path / "cifar-10-batches-py", per_batch=7, test_n=9)
    for root in (tmp_path, tmp_path / "cifar-10-batches-py"):
        splits = load_dataset({"name": "cifar10", "root": str(root), "verify_checksums": False, "download": False,
                               "num_classes": 10})
        assert splits.train_images.shape == (35, 3, 32, 32) and splits.test_images.shape == (9, 3, 32, 32)
        # batch files in order 1..5, rows channel-planar: R plane, G plane, B plane of 32 x 32
        for k in (0, 8, 34):
            row = truth["train_data"][k]
            for c in range(3):
                plane = row[c * 1024 : (c + 1) * 1024].reshape(32, 32)
                assert np.array_equal(splits.train_images[k, c].numpy(), plane)
        assert splits.train_labels.tolist() == truth["train_labels"].tolist()
        assert np.array_equal(splits.test_images.reshape(9, -1).numpy(), truth["test_data"])
        assert splits.test_labels.tolist() == truth["test_labels"].tolist()
        assert splits.class_names == truth["names"].tolist()
        assert splits.mean == (0.4914, 0.4822, 0.4465)


def test_torchvision_reads_the_same_cifar10(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_cifar10(tmp_path / "cifar-10-batches-py", per_batch=5, test_n=6)
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)
    ours = load_dataset({"name": "cifar10", "root": str(tmp_path), "verify_checksums": False})
    for train, images, labels in ((True, ours.train_images, ours.train_labels),
                                  (False, ours.test_images, ours.test_labels)):
        tv = torchvision.datasets.CIFAR10(str(tmp_path), train=train, download=False)
        assert np.array_equal(tv.data, images.permute(0, 2, 3, 1).numpy())
        assert tv.targets == labels.tolist()
        assert tv.classes == ours.class_names


def test_cifar10_checksums_are_the_official_ones(tmp_path: Path) -> None:
    from datasets.cifar10 import CIFAR10

    # md5 of the archive as published with CIFAR-10
    assert CIFAR10.archive.tgz_md5 == "c58f30108f718f92721af3b95e74349a"
    assert sorted(CIFAR10.official_md5) == sorted([*CIFAR10_TRAIN_FILES, "test_batch", "batches.meta"])
    write_cifar10(tmp_path / "cifar-10-batches-py", 3, 3)
    with pytest.raises(UserError, match="official CIFAR-10 checksum.*verify_checksums=false") as info:
        load_dataset({"name": "cifar10", "root": str(tmp_path), "download": False})
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("download", [True, False])
def test_offline_missing_cifar10_says_where_to_put_the_archive(tmp_path: Path, offline: None, download: bool) -> None:
    with pytest.raises(UserError) as info:
        load_dataset({"name": "cifar10", "root": str(tmp_path), "download": download})
    message = str(info.value)
    assert str(tmp_path / "cifar-10-python.tar.gz") in message and str(tmp_path / "cifar-10-batches-py") in message
    assert "CIFAR-10 " in message and "\n" not in message
    assert ("network is unreachable" in message) == download


def test_incomplete_cifar10_folder_is_reported(tmp_path: Path, offline: None) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10(folder, 3, 3)
    (folder / "data_batch_3").write_bytes(b"\x80\x02garbage")
    with pytest.raises(UserError, match="cannot read .*data_batch_3"):
        load_dataset({"name": "cifar10", "root": str(tmp_path), "verify_checksums": False, "download": False})


def test_synthetic_cifar10_stand_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = {"name": "synthetic", "root": str(tmp_path), "train_size": 53, "test_size": 20, "num_classes": 10}
    splits = load_dataset(cfg)
    folder = tmp_path / "synthetic10-53-20-seed0" / "cifar-10-batches-py"
    assert sorted(p.name for p in folder.iterdir()) == sorted([*CIFAR10_TRAIN_FILES, "test_batch", "batches.meta"])
    assert splits.num_classes == 10 and torch.bincount(splits.train_labels).tolist() == [6, 6, 6] + [5] * 7
    # torchvision's reader sees the same set: it is the official layout
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)
    tv = torchvision.datasets.CIFAR10(str(folder.parent), train=True, download=False)
    assert np.array_equal(tv.data, splits.train_images.permute(0, 2, 3, 1).numpy())
    assert tv.targets == splits.train_labels.tolist()
    # and dataset=cifar10 reads it as a reconstructed copy
    as_cifar10 = load_dataset({"name": "cifar10", "root": str(folder.parent), "verify_checksums": False})
    assert torch.equal(as_cifar10.test_images, splits.test_images)
    # the 100-class set stays where it was
    assert load_dataset({**cfg, "num_classes": 100, "train_size": 100}).num_classes == 100
    assert (tmp_path / "synthetic-100-20-seed0" / "cifar-100-python" / "meta").is_file()
    with pytest.raises(UserError, match="num_classes=7 .*100 .*10"):
        load_dataset({**cfg, "num_classes": 7})


# ----------------------------------------------------------------------------------------------
# The image folder: decoding, cache, statistics


@pytest.fixture
def folder64(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    write_folder(root, {"cat": (5, 2), "dog": (4, 3), "eel": (3, 0)}, size=64)
    return root


def test_imagefolder_tensors_equal_the_files_read_back(folder64: Path) -> None:
    splits = load_dataset(folder_cfg(folder64, num_classes=None))
    assert splits.class_names == ["cat", "dog", "eel"] and splits.num_classes == 3
    assert splits.image_shape == (3, 64, 64)
    for split, images, labels in (("train", splits.train_images, splits.train_labels),
                                  ("val", splits.test_images, splits.test_labels)):
        expected = [(c, p) for c, name in enumerate(splits.class_names)
                    for p in sorted((folder64 / split / name).glob("*.png"))]
        assert len(images) == len(expected)
        for k, (label, path) in enumerate(expected):
            assert labels[k].item() == label
            assert np.array_equal(images[k].numpy(), pil_read(path)), path


def test_imagefolder_statistics_and_normalisation(folder64: Path) -> None:
    splits = load_dataset(folder_cfg(folder64))
    files = sorted((folder64 / "train").rglob("*.png"))
    pixels = np.stack([pil_read(p) for p in files]).astype(np.float64) / 255.0  # [N, 3, H, W]
    mean = pixels.mean(axis=(0, 2, 3))
    std = pixels.std(axis=(0, 2, 3))  # population std, as Normalize statistics are usually computed
    assert np.allclose(splits.mean, mean, rtol=0, atol=1e-12) and np.allclose(splits.std, std, rtol=0, atol=1e-12)
    assert not np.allclose(mean, mean[0])  # the channels differ, so a mix-up would show
    loader = DeviceLoader(splits.test_images, splits.test_labels, 4, "cpu", train=False,
                          mean=splits.mean, std=splits.std)
    batch = next(iter(loader.epoch(0)))
    raw = splits.test_images[1]
    for c, y, x in ((0, 0, 0), (1, 17, 40), (2, 63, 63)):
        by_hand = (raw[c, y, x].item() / 255.0 - mean[c]) / std[c]
        # float32 arithmetic on values of magnitude < 1/std < 10: error well below 1e-5
        assert batch.images[1, c, y, x].item() == pytest.approx(by_hand, abs=1e-5)


def test_imagefolder_cache_is_reused_and_rebuilt(folder64: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = load_dataset(folder_cfg(folder64))
    caches = list(folder64.glob(".kd-cache-*.pt"))
    assert len(caches) == 1 and caches[0].name.startswith(".kd-cache-native-")
    original = imagefolder.decode_image

    def refuse(path: Path, size: int | None) -> np.ndarray:
        raise AssertionError(f"decoded {path} although the cache is valid")

    monkeypatch.setattr(imagefolder, "decode_image", refuse)
    again = load_dataset(folder_cfg(folder64))
    assert torch.equal(again.train_images, first.train_images) and torch.equal(again.test_labels, first.test_labels)
    assert again.mean == first.mean
    # a changed file: new pixels (and a new mtime) -> the cache is rebuilt and the old one dropped
    changed = folder64 / "train" / "dog" / "001.png"
    new_pixels = np.full((64, 64, 3), 7, dtype=np.uint8)
    write_png(changed, new_pixels)
    stat = changed.stat()
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    decoded: list[Path] = []
    monkeypatch.setattr(imagefolder, "decode_image", lambda p, s: decoded.append(p) or original(p, s))
    rebuilt = load_dataset(folder_cfg(folder64))
    assert len(decoded) == 12 + 5  # every file once
    index = 5 + 1  # cat has 5 training images; dog/001 is the second dog
    assert np.array_equal(rebuilt.train_images[index].numpy(), new_pixels.transpose(2, 0, 1))
    assert [p.name for p in folder64.glob(".kd-cache-*.pt")] != [c.name for c in caches]
    assert len(list(folder64.glob(".kd-cache-*.pt"))) == 1
    # a new file is noticed too
    write_png(folder64 / "val" / "eel" / "000.png", new_pixels)
    assert load_dataset(folder_cfg(folder64)).test_labels.tolist() == [0, 0, 1, 1, 1, 2]


def test_corrupt_cache_is_rebuilt(folder64: Path) -> None:
    first = load_dataset(folder_cfg(folder64))
    (cache,) = folder64.glob(".kd-cache-*.pt")
    cache.write_bytes(cache.read_bytes()[:100])
    assert torch.equal(load_dataset(folder_cfg(folder64)).train_images, first.train_images)


def test_imagefolder_resizes_to_image_size(tmp_path: Path) -> None:
    root = tmp_path / "mixed"
    rng = np.random.default_rng(seed(3))
    for split, name, shape in (("train", "a", (20, 30)), ("train", "b", (16, 16)), ("val", "a", (40, 8))):
        write_png(root / split / name / "x.jpg", rng.integers(0, 256, (*shape, 3), dtype=np.uint8))
    with pytest.raises(UserError, match="image_size") as info:
        load_dataset(folder_cfg(root))
    assert "\n" not in str(info.value) and str(root / "train") in str(info.value)
    splits = load_dataset(folder_cfg(root, image_size=16))
    assert splits.image_shape == (3, 16, 16)
    with Image.open(root / "train" / "a" / "x.jpg") as image:
        expected = np.array(image.convert("RGB").resize((16, 16), Image.Resampling.BILINEAR)).transpose(2, 0, 1)
    assert np.array_equal(splits.train_images[0].numpy(), expected)
    assert np.array_equal(splits.train_images[1].numpy(), pil_read(root / "train" / "b" / "x.jpg"))  # kept
    assert {p.name.split("-")[2] for p in root.glob(".kd-cache-*.pt")} == {"16x16"}


def test_tiny_imagenet_layout_with_nested_folders(tmp_path: Path) -> None:
    """Tiny-ImageNet keeps train images in train/<wnid>/images/*.JPEG beside a boxes file."""
    root = tmp_path / "tiny"
    rng = np.random.default_rng(seed(4))
    for wnid in ("n01443537", "n01629819"):
        write_png(root / "train" / wnid / "images" / f"{wnid}_0.JPEG", rng.integers(0, 256, (8, 8, 3), np.uint8))
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("0 0 8 8\n")
        write_png(root / "val" / wnid / "val_0.JPEG", rng.integers(0, 256, (8, 8, 3), np.uint8))
    (root / "train" / ".DS_Store").write_text("x")
    splits = load_dataset(folder_cfg(root))
    assert splits.class_names == ["n01443537", "n01629819"] and splits.train_labels.tolist() == [0, 1]


# ----------------------------------------------------------------------------------------------
# Bad image folders: one line each, naming the path


def bad_folder(tmp_path: Path, case: str) -> tuple[Path, str]:
    root = tmp_path / "bad"
    good = np.zeros((8, 8, 3), dtype=np.uint8)
    if case == "missing root":
        return root, str(root)
    for split in ("train", "val"):
        for name in ("a", "b"):  # two classes: a folder with one class is refused before anything else
            write_png(root / split / name / "0.png", good)
    if case == "no train":
        shutil.rmtree(root / "train")
        return root, str(root / "train")
    if case == "no val":
        shutil.rmtree(root / "val")
        return root, str(root / "val")
    if case == "no class folders":
        for name in ("a", "b"):
            shutil.rmtree(root / "val" / name)
        return root, str(root / "val")
    if case == "empty class":
        (root / "train" / "c").mkdir()
        (root / "train" / "c" / "notes.txt").write_text("no images here")
        return root, str(root / "train" / "c")
    if case == "val class not in train":
        write_png(root / "val" / "zebra" / "0.png", good)
        return root, "zebra"
    if case == "mixed sizes":
        write_png(root / "train" / "a" / "1.png", np.zeros((9, 8, 3), dtype=np.uint8))
        return root, str(root / "train" / "a" / "1.png")
    if case == "corrupt image":
        (root / "train" / "a" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
        return root, str(root / "train" / "a" / "1.png")
    if case == "truncated image":
        Image.fromarray(np.arange(64 * 64 * 3, dtype=np.uint8).reshape(64, 64, 3)).save(root / "val" / "a" / "0.png")
        data = (root / "val" / "a" / "0.png").read_bytes()
        for other in ("train/a", "train/b", "val/b"):
            write_png(root / other / "0.png", np.zeros((64, 64, 3), dtype=np.uint8))
        (root / "val" / "a" / "0.png").write_bytes(data[: len(data) // 2])
        return root, str(root / "val" / "a" / "0.png")
    raise ValueError(case)


BAD_CASES = ["missing root", "no train", "no val", "no class folders", "empty class", "val class not in train",
             "mixed sizes", "corrupt image", "truncated image"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_image_folder_is_one_clear_error(tmp_path: Path, case: str) -> None:
    root, named = bad_folder(tmp_path, case)
    with pytest.raises(UserError) as info:
        load_dataset(folder_cfg(root))
    message = str(info.value)
    assert named in message and "\n" not in message, message
    assert not list(root.glob(".kd-cache-*")) if root.is_dir() else True  # nothing half-built is left


def test_imagefolder_needs_a_root() -> None:
    with pytest.raises(UserError, match="dataset.root=DIR"):
        load_dataset({"name": "imagefolder", "root": None})


def test_num_classes_must_match_the_folder(folder64: Path) -> None:
    with pytest.raises(UserError, match="dataset.num_classes=10 but the imagefolder data set has 3 classes"):
        load_dataset(folder_cfg(folder64, num_classes=10))
    assert load_dataset(folder_cfg(folder64, num_classes=3)).num_classes == 3


# ----------------------------------------------------------------------------------------------
# Resolution: augmentation, streaming, probe


def padded_window(image: torch.Tensor, pad: int, oy: int, ox: int, flip: bool) -> torch.Tensor:
    """The crop at (oy, ox) of the image zero-padded by ``pad``, mirrored when ``flip`` (slices, no gather)."""
    c, h, w = image.shape
    padded = torch.zeros(c, h + 2 * pad, w + 2 * pad, dtype=image.dtype)
    padded[:, pad : pad + h, pad : pad + w] = image
    crop = padded[:, oy : oy + h, ox : ox + w]
    return crop[:, :, [w - 1 - j for j in range(w)]] if flip else crop


def test_padding_scales_with_the_size() -> None:
    assert [padding_for(s, s) for s in (32, 64, 16, 7)] == [4, 8, 2, 0]
    assert padding_for(64, 48) == 6


def test_crop_at_64_uses_padding_8() -> None:
    gen = generator(5)
    images = torch.randint(0, 256, (300, 3, 64, 64), dtype=torch.uint8, generator=gen)
    loader = DeviceLoader(images, torch.zeros(300, dtype=torch.int64), 50, "cpu", train=True, seed=seed(1))
    _, offsets, flips = loader.epoch_plan(0)
    assert loader.pad == 8
    assert offsets.min().item() == 0 and offsets.max().item() == 16  # 17 values, 600 draws: all ends appear
    assert set(offsets.flatten().tolist()) == set(range(17))
    # the crop itself, against loops, at the extremes and a flip
    sample = images[:4]
    cases = torch.tensor([[0, 0], [16, 16], [3, 11], [8, 8]]), torch.tensor([False, True, True, False])
    out = crop_and_flip(sample, *cases)
    for k in range(4):
        oy, ox = cases[0][k].tolist()
        assert torch.equal(out[k], padded_window(sample[k], 8, oy, ox, bool(cases[1][k])))
    # the extra view scales the same way: its windows come from offsets in 0..16
    view = VIEWS.get("standard")(sample, generator(6))
    for k in range(4):
        assert any(torch.equal(view[k], padded_window(sample[k], 8, oy, ox, f))
                   for oy in range(17) for ox in range(17) for f in (False, True))


def test_streaming_gives_the_same_batches() -> None:
    gen = generator(7)
    images = torch.randint(0, 256, (45, 3, 16, 16), dtype=torch.uint8, generator=gen)
    labels = torch.arange(45) % 3
    for train in (True, False):
        kwargs = dict(train=train, seed=seed(2), mean=(0.1, 0.2, 0.3), std=(0.5, 0.6, 0.7), views=("standard",))
        resident = DeviceLoader(images, labels, 8, "cpu", resident=True, **kwargs)
        streamed = DeviceLoader(images, labels, 8, "cpu", resident=False, **kwargs)
        assert resident.resident and not streamed.resident
        for a, b in zip(resident.epoch(1), streamed.epoch(1), strict=True):
            assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
            assert torch.equal(a.indices, b.indices)
            assert all(torch.equal(a.views[k], b.views[k]) for k in a.views)


def test_a_set_too_large_for_the_accelerator_streams_with_a_message(monkeypatch: pytest.MonkeyPatch,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    import datasets.device_loader as device_loader

    fits = device_loader.fits_on_device
    assert fits(10**12, torch.device("cpu"))  # the CPU holds the set already
    monkeypatch.setattr(device_loader, "fits_on_device", lambda nbytes, device: False)
    images = torch.zeros(6, 3, 8, 8, dtype=torch.uint8)
    with caplog.at_level("WARNING"):
        loader = DeviceLoader(images, torch.zeros(6, dtype=torch.int64), 2, "cpu", train=True)
    assert not loader.resident and "does not fit" in caplog.text and "each batch is moved" in caplog.text


def test_objective_probes_at_the_data_set_resolution(register) -> None:
    seen: dict[str, Features] = {}

    class Recorder(DistillMethod):
        student_features = frozenset({STAGES})
        teacher_features = frozenset({STAGES})

        def build(self, student: Features, teacher: Features, ctx: BuildContext) -> None:
            seen["student"], seen["teacher"] = student, teacher

        def forward(self, student, teacher, batch, ctx):
            return {}

    register(METHODS, "recorder", Recorder)
    objective = objective_of({"name": "recorder", "method": "recorder", "beta": 1.0})
    student, teacher = build_model("vgg8", num_classes=5), build_model("vgg8", num_classes=5)
    from distiller.features import FeatureHooks

    ctx = BuildContext(num_classes=5, num_samples=4, train_labels=torch.zeros(4, dtype=torch.int64),
                       device=torch.device("cpu"), student=student, teacher=teacher, image_shape=(3, 64, 64))
    objective.build(FeatureHooks(student, {STAGES}), FeatureHooks(teacher, {STAGES}), ctx)
    # vgg8's four stages each end in a 2x2 max-pool: 32, 16, 8, 4 at 64 px (16, 8, 4, 2 at 32 px)
    for side in (seen["student"], seen["teacher"]):
        assert [tuple(shape[-2:]) for shape in side.stages] == [(32, 32), (16, 16), (8, 8), (4, 4)]
    assert seen["student"].logits == (2, 5)


# ----------------------------------------------------------------------------------------------
# From the command line


def cli_overrides(tmp: Path) -> list[str]:
    return ["trainer.epochs=1", "trainer.device=cpu", "trainer.progress=false", f"teacher_dir={tmp / 'teachers'}",
            "dataset.batch_size=16", "dataset.eval_batch_size=64"]


def epoch_record(run: Path) -> dict:
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "finished"
    return metrics["epochs"][-1]


def test_cli_trains_on_a_generated_cifar10(tmp_path: Path) -> None:
    write_cifar10(tmp_path / "data" / "cifar-10-batches-py", per_batch=16, test_n=20)
    run = tmp_path / "run"
    result = run_cli("train_teacher.py", "model=resnet8", "dataset=cifar10", f"dataset.root={tmp_path / 'data'}",
                     "dataset.verify_checksums=false", "dataset.download=false", f"hydra.run.dir={run}",
                     *cli_overrides(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    final = torch.load(run / "final.pt", weights_only=True)
    assert final["num_classes"] == 10 and final["model"]["fc.weight"].shape[0] == 10
    assert 0.0 <= epoch_record(run)["test_top1"] <= 100.0


@pytest.fixture(scope="module")
def cli_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("cli_folder")
    write_folder(tmp / "images", {"a": (24, 6), "b": (24, 6), "c": (24, 6)}, size=64, base=9)
    return tmp


def test_cli_trains_a_teacher_and_a_student_on_a_64px_image_folder(cli_folder: Path) -> None:
    tmp = cli_folder
    data = [f"dataset.root={tmp / 'images'}", "dataset=imagefolder"]
    result = run_cli("train_teacher.py", "model=vgg8", *data, f"hydra.run.dir={tmp / 'teacher'}", *cli_overrides(tmp))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp / "teachers" / "vgg8.pt").is_file() and list((tmp / "images").glob(".kd-cache-native-*.pt"))
    config = (tmp / "teacher" / "config.yaml").read_text()
    assert "imagefolder" in config
    result = run_cli("train_student.py", "teacher=vgg8", "student=vgg8", "distill=at", *data,
                     f"hydra.run.dir={tmp / 'student'}", *cli_overrides(tmp))
    assert result.returncode == 0, result.stderr[-3000:]
    final = torch.load(tmp / "student" / "final.pt", weights_only=True)
    assert final["num_classes"] == 3
    record = epoch_record(tmp / "student")
    assert np.isfinite(record["train_loss"]) and record["loss_at"] > 0


def test_cli_bad_folder_is_one_line_and_status_2(tmp_path: Path) -> None:
    result = run_cli("train_teacher.py", "model=vgg8", "dataset=imagefolder", f"dataset.root={tmp_path / 'nowhere'}",
                     f"hydra.run.dir={tmp_path / 'run'}", *cli_overrides(tmp_path))
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and str(tmp_path / "nowhere") in lines[0] and "Traceback" not in result.stderr


REAL_CIFAR100 = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.mark.skipif(not (REAL_CIFAR100 / "cifar-100-python").is_dir(), reason="no local CIFAR-100 copy")
def test_declared_cifar100_statistics_are_those_of_its_training_split() -> None:
    splits = load_dataset({"name": "cifar100", "root": str(REAL_CIFAR100), "verify_checksums": False,
                           "download": False, "num_classes": None})
    assert splits.mean == dataset_facts("cifar100").mean and splits.num_classes == 100
    pixels = splits.train_images.numpy()
    for c in range(3):
        channel = pixels[:, c].astype(np.float64) / 255.0
        # the recipes' published values (RepDistiller's), which round the exact ones to within 2e-4
        assert abs(channel.mean() - splits.mean[c]) < 3e-4 and abs(channel.std() - splits.std[c]) < 3e-4


def test_torchvision_is_imported_only_when_an_archive_is_checked() -> None:
    """Importing torchvision costs seconds (its models pull in torch._dynamo): a command that fails on its
    configuration, or trains on other data, must not pay it; reading an archive's facts imports it."""
    code = ("import sys, distiller.config.preflight, distiller.jobs.train, datasets, datasets.cifar100 as c; "
            "before = 'torchvision' in sys.modules; md5 = c.CIFAR100.official_md5; "
            "print(before, 'torchvision' in sys.modules, md5['meta'])")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    # meta's md5 as torchvision's CIFAR100 class publishes it
    assert result.stdout.split() == ["False", "True", "7973b15100ade9c7d40fb424638fde48"]


def test_each_image_folder_keeps_its_own_teachers(compose, monkeypatch, tmp_path: Path) -> None:
    """teacher_dir's default: one folder per data set, and per image folder (its name and the first 8 hex digits of
    the sha256 of its resolved path), so training a teacher on a second folder, even one of the same name, never
    replaces the first folder's teacher; two spellings of one folder share its teachers."""
    import hashlib

    def expected(root: Path) -> str:
        resolved = root.resolve()
        digest = hashlib.sha256(str(resolved).encode()).hexdigest()[:8]
        return f"checkpoints/teachers/imagefolder-{resolved.name}-{digest}"

    monkeypatch.delenv("KD_TEACHER_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a" / "flowers").mkdir(parents=True)
    dirs = {}
    for root in ("data/tiny-imagenet-200", f"{tmp_path}/flowers/", "flowers", "a/flowers", "a/../flowers"):
        cfg = compose("train_student", ["dataset=imagefolder", f"dataset.root={root}", "teacher=vgg13"])
        dirs[root] = cfg.teacher_dir
        assert cfg.teacher.ckpt == f"{cfg.teacher_dir}/vgg13.pt"
    assert dirs["data/tiny-imagenet-200"] == expected(tmp_path / "data" / "tiny-imagenet-200")
    # one folder, three spellings; another folder of the same name elsewhere (this assertion changed: the two
    # folders named "flowers" shared "imagefolder-flowers", so one's teacher replaced the other's)
    assert dirs[f"{tmp_path}/flowers/"] == dirs["flowers"] == dirs["a/../flowers"] == expected(tmp_path / "flowers")
    assert dirs["a/flowers"] == expected(tmp_path / "a" / "flowers") != dirs["flowers"]
    assert compose("train_teacher", ["dataset=imagefolder", "dataset.root=x/y"]).teacher_dir == \
        expected(tmp_path / "x" / "y")
    assert compose("train_teacher", ["dataset=cifar100"]).teacher_dir == "checkpoints/teachers/cifar100"
    monkeypatch.setenv("KD_TEACHER_DIR", str(tmp_path / "mine"))
    assert compose("train_teacher", ["dataset=imagefolder", "dataset.root=x/y"]).teacher_dir == str(tmp_path / "mine")


def test_two_image_folders_of_one_name_keep_their_own_teachers(monkeypatch, tmp_path: Path) -> None:
    """Teachers trained on /a/data and /b/data (other classes) by the default teacher_dir: two folders, no .bak, each
    entry naming its folder; a student on folder A given B's teacher is warned that the folders differ."""
    import hashlib

    monkeypatch.delenv("KD_TEACHER_DIR", raising=False)
    roots = {"a": tmp_path / "a" / "data", "b": tmp_path / "b" / "data"}
    write_folder(roots["a"], {"cat": (8, 4), "dog": (8, 4)}, size=32, base=11)
    write_folder(roots["b"], {"car": (8, 4), "bus": (8, 4)}, size=32, base=12)
    settings = [s for s in cli_overrides(tmp_path) if not s.startswith("teacher_dir=")]
    folders = {}
    for name, root in roots.items():
        result = run_cli("train_teacher.py", "model=resnet8", "dataset=imagefolder", f"dataset.root={root}",
                         f"hydra.run.dir={tmp_path / ('teacher_' + name)}", *settings, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        resolved = root.resolve()
        digest = hashlib.sha256(str(resolved).encode()).hexdigest()[:8]
        folders[name] = tmp_path / "checkpoints" / "teachers" / f"imagefolder-data-{digest}"
        entry = json.loads((folders[name] / "index.json").read_text())["teachers"]["resnet8.pt"]
        assert entry["data_root"] == str(resolved) and entry["dataset"] == "imagefolder"
    assert folders["a"] != folders["b"]
    for folder in folders.values():
        assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == ["index.json", "resnet8.pt"]
    student = tmp_path / "student"
    result = run_cli("train_student.py", "teacher=resnet8", "student=resnet8", "dataset=imagefolder",
                     f"dataset.root={roots['a']}", f"teacher_dir={folders['b']}", f"hydra.run.dir={student}",
                     *settings, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (f"teacher {folders['b'] / 'resnet8.pt'} was trained on the imagefolder data at {roots['b'].resolve()}, "
            f"this run uses {roots['a'].resolve()}") in (student / "train_student.log").read_text()


def test_an_image_folder_without_root_is_one_line(capsys) -> None:
    from distiller.config.preflight import preflight

    for config in ("train_teacher", "train_student"):
        with pytest.raises(SystemExit) as caught:
            preflight(config, ["dataset=imagefolder"])
        assert caught.value.code == 2
        assert capsys.readouterr().err.strip() == \
            "error: config key 'dataset.root' has no value; set it with dataset.root=VALUE"
