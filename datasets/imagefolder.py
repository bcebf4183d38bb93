"""An image folder (``dataset=imagefolder dataset.root=DIR``): ``DIR/train/<class>/`` and ``DIR/val/<class>/``.

The layout is torchvision's ImageFolder one split per folder, e.g. Tiny-ImageNet after the
usual reorganisation (its ``val/images`` moved into ``val/<wnid>/``). Every ``.png``,
``.jpg`` or ``.jpeg`` file below a class folder (any depth, case-insensitive suffix,
hidden files skipped) is an image of that class; the classes are the sorted folder names
of ``train/``, and ``val/`` may hold a subset of them (``val`` is the test split).

Why decode once: the training loop augments uint8 tensors on the device (see
:mod:`datasets.device_loader`), so the images are decoded with PIL once, converted to RGB,
and stored as one uint8 tensor file ``DIR/.kd-cache-<size>-<key>.pt``. The key hashes the
file list with each file's size and modification time, so adding, removing or changing an
image rebuilds the cache; later runs read the tensors without decoding anything. The
training split's per-channel mean/std are computed at the same time and cached with it.

Sizes: without ``dataset.image_size`` every image must have the size of the first one (a
clear error names the first one that differs); ``dataset.image_size=N`` resizes every
image to N x N (bilinear, PIL's antialiased resize) instead.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from common.errors import UserError
from common.files import atomic_write
from datasets.base import DATASETS, DatasetFacts, DataSplits, cfg_get, cfg_int, channel_stats

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SPLITS = ("train", "val")
CACHE_PREFIX = ".kd-cache-"
CACHE_VERSION = 1  # bump when the cache's content changes meaning: old files are then rebuilt
_LAYOUT = "dataset=imagefolder reads DIR/train/<class>/*.png|jpg|jpeg and DIR/val/<class>/..."


@dataclass
class _Split:
    """The image files of one split, in class order then path order, with their class index."""

    files: list[Path]
    labels: list[int]


def _visible(path: Path, root: Path) -> bool:
    return not any(part.startswith(".") for part in path.relative_to(root).parts)


def _class_folders(folder: Path) -> dict[str, Path]:
    """The split's class folders by name (sorted); a missing or class-less folder is a :class:`UserError`."""
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder: {_LAYOUT}")
    classes = {p.name: p for p in sorted(folder.iterdir()) if p.is_dir() and not p.name.startswith(".")}
    if not classes:
        raise UserError(f"{folder} has no class folders: {_LAYOUT}")
    return classes


def _images_of(class_folder: Path) -> list[Path]:
    """Every image file below ``class_folder``, sorted; none is a :class:`UserError`."""
    files = sorted(p for p in class_folder.rglob("*")
                   if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and _visible(p, class_folder))
    if not files:
        raise UserError(f"{class_folder} holds no {'/'.join(IMAGE_SUFFIXES)} images: add images or remove the folder")
    return files


def scan(root: Path) -> tuple[list[str], dict[str, _Split]]:
    """The class names (sorted ``train/`` folders) and the files of both splits."""
    if not root.is_dir():
        raise UserError(f"dataset.root={root} is not a folder: {_LAYOUT}")
    folders = {split: _class_folders(root / split) for split in SPLITS}
    classes = list(folders["train"])
    foreign = sorted(set(folders["val"]) - set(classes))
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise UserError(f"{root / 'val'} has class folder(s) {shown} that {root / 'train'} lacks: the classes "
                        f"come from train/, so rename or remove them")
    index = {name: i for i, name in enumerate(classes)}
    splits = {}
    for split, by_name in folders.items():
        files: list[Path] = []
        labels: list[int] = []
        for name, folder in by_name.items():
            found = _images_of(folder)
            files += found
            labels += [index[name]] * len(found)
        splits[split] = _Split(files, labels)
    return classes, splits


def cache_key(root: Path, classes: Sequence[str], splits: Mapping[str, _Split], size: int | None) -> str:
    """A hash of everything the decoded tensors depend on: file list, sizes, modification times, resize."""
    h = hashlib.sha256()
    h.update(json.dumps([CACHE_VERSION, size, list(classes)]).encode())
    for split in SPLITS:
        for path, label in zip(splits[split].files, splits[split].labels):
            st = path.stat()
            h.update(json.dumps([split, str(path.relative_to(root)), label, st.st_size, st.st_mtime_ns]).encode())
    return h.hexdigest()[:24]


def cache_path(root: Path, key: str, size: int | None) -> Path:
    tag = "native" if size is None else f"{size}x{size}"
    return root / f"{CACHE_PREFIX}{tag}-{key}.pt"


def decode_image(path: Path, size: int | None) -> np.ndarray:
    """One image file as uint8 RGB [H, W, 3], resized to ``size`` x ``size`` when given."""
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")  # decodes the whole file: a truncated one fails here
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"cannot decode image {path} ({type(e).__name__}: {e}): replace or delete it") from None
    if size is not None and rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
    return np.array(rgb, dtype=np.uint8)  # a copy: writable, so torch.from_numpy takes it without a warning


def _decode_all(files: Sequence[Path], size: int | None, shape: tuple[int, int] | None,
                reference: Path | None) -> tuple[torch.Tensor, tuple[int, int], Path]:
    """uint8 [N, 3, H, W] of ``files`` (decoded by a thread pool: PIL releases the GIL while decoding).

    Without ``size`` every image must be ``shape`` (the first image's size when ``shape`` is None).
    """
    first = decode_image(files[0], size)
    if shape is None:
        shape, reference = first.shape[:2], files[0]
    out = torch.empty((len(files), 3, *shape), dtype=torch.uint8)
    workers = min(8, os.cpu_count() or 1)
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        decoded = pool.map(lambda p: decode_image(p, size), files[1:])
        for i, (path, pixels) in enumerate(zip(files, itertools.chain([first], decoded))):
            if pixels.shape[:2] != tuple(shape):
                raise UserError(
                    f"{path} is {pixels.shape[1]}x{pixels.shape[0]} but {reference} is {shape[1]}x{shape[0]}: "
                    f"the images must share one size, or set dataset.image_size=N to resize every image to N x N"
                )
            out[i] = torch.from_numpy(pixels).permute(2, 0, 1)
    finally:
        pool.shutdown(cancel_futures=True)  # on an error, the files not yet decoded are not decoded
    return out, tuple(shape), reference


def _decode(root: Path, classes: list[str], splits: Mapping[str, _Split], size: int | None) -> dict[str, Any]:
    """Decode both splits and compute the training split's statistics: the cache's content."""
    start = time.perf_counter()
    train, shape, reference = _decode_all(splits["train"].files, size, None, None)
    val, _, _ = _decode_all(splits["val"].files, size, shape, reference)
    mean, std = channel_stats(train)
    log.info("decoded %d + %d images of %s (%dx%d) in %.1f s", len(train), len(val), root, shape[1], shape[0],
             time.perf_counter() - start)
    return {
        "version": CACHE_VERSION, "classes": list(classes),
        "train_images": train, "train_labels": torch.tensor(splits["train"].labels, dtype=torch.int64),
        "test_images": val, "test_labels": torch.tensor(splits["val"].labels, dtype=torch.int64),
        "mean": list(mean), "std": list(std),
    }


def _read_cache(path: Path, classes: list[str]) -> dict[str, Any] | None:
    """The cache's content, or None when it is missing or unreadable (it is then rebuilt)."""
    if not path.is_file():
        return None
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file raises many different types
        log.warning("ignoring the unreadable image cache %s (%s: %s); decoding again", path, type(e).__name__, e)
        return None
    if not isinstance(content, dict) or content.get("version") != CACHE_VERSION or content.get("classes") != classes:
        log.warning("ignoring the image cache %s: it was written for other data; decoding again", path)
        return None
    return content


def _write_cache(content: dict[str, Any], path: Path) -> None:
    """Store the cache atomically and drop older caches of the same size; a read-only folder only warns."""
    try:
        atomic_write(content, path, "torch")
    except OSError as e:
        log.warning("cannot write the image cache %s (%s): the images will be decoded again next run", path, e)
        return
    tag = path.name[len(CACHE_PREFIX):].rsplit("-", 1)[0]
    for stale in path.parent.glob(f"{CACHE_PREFIX}{tag}-*.pt"):
        if stale != path:
            stale.unlink(missing_ok=True)


@DATASETS.register("imagefolder", facts=DatasetFacts(channels=3), teachers_per_root=True)
def load_imagefolder(cfg: Mapping[str, Any]) -> DataSplits:
    """``dataset=imagefolder``: the folder at ``dataset.root``, from its cache when the files did not change."""
    given = cfg_get(cfg, "root")
    if given is None or str(given) == "":
        raise UserError(f"dataset=imagefolder needs dataset.root=DIR: {_LAYOUT}")
    root = Path(str(given)).expanduser()
    size = None if cfg_get(cfg, "image_size") is None else cfg_int(cfg, "image_size", 0, minimum=1)
    classes, splits = scan(root)
    path = cache_path(root, cache_key(root, classes, splits, size), size)
    content = _read_cache(path, classes)
    if content is None:
        content = _decode(root, classes, splits, size)
        _write_cache(content, path)
    else:
        log.info("read the decoded images of %s from %s", root, path)
    return DataSplits(content["train_images"], content["train_labels"], content["test_images"],
                      content["test_labels"], len(classes), list(classes),
                      mean=tuple(content["mean"]), std=tuple(content["std"]))
