"""The streaming loader holds no pixels: what it keeps does not depend on the images' size and does not grow over an
epoch, and nothing it holds has more than one element per image.

Structural facts only (why memory stays flat when the folder grows); the measured figures come from
``scripts/stream_memory.py``, never asserted here.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import seed
from image_files import noise_jpeg

from datasets import load_dataset
from datasets.loaders import make_loader
from scripts.stream_memory import held_arrays, held_bytes


def folder(root: Path, side: int, per_class: int = 4) -> Path:
    """``root/train/<wnid>/k.JPEG`` and a ``val/`` of the same names, every image ``side`` x ``side``."""
    rng = np.random.default_rng(seed(50))
    for wnid in ("n00000001", "n00000002"):
        for split in ("train", "val"):
            for k in range(per_class):
                noise_jpeg(root / split / wnid / f"{k}.JPEG", rng, side, side)
    return root


def loader_of(root: Path, train: bool = True):
    data = load_dataset({"name": "imagenet", "root": str(root), "image_size": 16, "eval_resize": 16, "workers": 0})
    return make_loader(data, "train" if train else "test", 4, "cpu", train=train, seed=0)


@pytest.mark.parametrize("train", [True, False])
def test_what_the_loader_holds_depends_on_neither_pixels_nor_epochs(tmp_path: Path, train: bool) -> None:
    # the same file names (so the same path bytes) with 16 and 64 times as many pixels
    small, large = loader_of(folder(tmp_path / "a", 16), train), loader_of(folder(tmp_path / "b", 64), train)
    assert len(str(tmp_path / "a")) == len(str(tmp_path / "b"))
    assert held_bytes(small) == held_bytes(large)
    built = held_bytes(large)
    assert sum(len(batch) for batch in large.epoch(0)) == 8
    assert held_bytes(large) == built  # nothing cached while reading


def test_nothing_held_has_more_than_one_element_per_image(tmp_path: Path) -> None:
    loader = loader_of(folder(tmp_path / "net", 32, per_class=6))
    arrays = held_arrays(loader)
    n = loader.dataset_size
    assert n == 12 and arrays  # the labels and the path array at least
    for array in arrays:
        elements = array.numel() if isinstance(array, torch.Tensor) else array.size
        assert elements <= n, (type(array), tuple(array.shape))


@pytest.mark.parametrize("images", [2, 3, 8, 20])
def test_the_measurement_folder_has_every_class_in_both_splits_however_few_images(tmp_path: Path, images: int) -> None:
    """``--images 2`` wrote 2 training classes and 8 validation ones, which the data set's check refuses (the
    measurement scripts then blamed their own temporary folder, or died on a child's traceback)."""
    from distiller.bench.loader_speed import write_photo_folder

    root = write_photo_folder(tmp_path / "photos", images, size=(16, 16))
    train = {p.name for p in (root / "train").iterdir()}
    assert train == {p.name for p in (root / "val").iterdir()} and len(train) == min(8, images)
    assert len(list((root / "train").rglob("*.JPEG"))) == images
    load_dataset({"name": "imagenet", "root": str(root), "stream": True})  # the data set's own check passes
