"""An image folder (``dataset=imagefolder dataset.root=DIR``): ``DIR/train/<class>/`` and ``DIR/val/<class>/``.

The layout is torchvision's ImageFolder one split per folder, e.g. Tiny-ImageNet after the
usual reorganisation (its ``val/images`` moved into ``val/<wnid>/``). Every ``.png``,
``.jpg`` or ``.jpeg`` file below a class folder (any depth, case-insensitive suffix,
hidden files skipped) is an image of that class; the classes are the sorted folder names
of ``train/``, and ``val/`` may hold a subset of them (``val`` is the test split).

Why decode once: the training loop augments uint8 tensors on the device (see
:mod:`datasets.device_loader`), so the images are decoded once into 8-bit RGB (whatever
their mode: :mod:`datasets.decode`; one warning line counts the files that were converted)
and stored as one uint8 tensor file ``DIR/.kd-cache-<size>-<key>.pt``. The key hashes the
file list with each file's size and modification time, so adding, removing or changing an
image rebuilds the cache; later runs read the tensors without decoding anything. The
training split's per-channel mean/std are computed at the same time and cached with it.

Sizes: without ``dataset.image_size`` every image must have the size of the first one (a
clear error names the first one that differs); ``dataset.image_size=N`` resizes every
image to N x N (bilinear, PIL's antialiased resize) instead.

Too large for memory: ``dataset.stream=auto|true|false`` (:mod:`datasets.streaming` has the
memory budget of ``auto``); a streamed folder is :class:`FileSplits` whose batches equal the
in-memory ones (same decoding, resize, order, crops and statistics).
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
from datasets.base import DATASETS, DatasetFacts, DataSplits, FileSplits, cfg_get, cfg_int, channel_stats
from datasets.decode import ConversionTally, decode_rgb, describe
from datasets.sample_transforms import FixedSize
from datasets.streaming import check_files, decide_stream, mixed_sizes, stream_setting

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SPLITS = ("train", "val")
CACHE_PREFIX = ".kd-cache-"
CACHE_VERSION = 2  # bump when the cache's content changes meaning: old files are then rebuilt
# 2: 16-bit PNGs scaled to 8 bits instead of clipped to white (datasets.decode)
_LAYOUT = "dataset=imagefolder reads DIR/train/<class>/*.png|jpg|jpeg and DIR/val/<class>/..."


@dataclass
class _Split:
    """The image files of one split, in class order then path order, with their class index."""

    files: list[Path]
    labels: list[int]


def _visible(path: Path, root: Path) -> bool:
    return not any(part.startswith(".") for part in path.relative_to(root).parts)


def _class_folders(folder: Path, layout: str = _LAYOUT) -> dict[str, Path]:
    """The split's class folders by name (sorted); a missing or class-less folder is a :class:`UserError`."""
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder: {layout}")
    classes = {p.name: p for p in sorted(folder.iterdir()) if p.is_dir() and not p.name.startswith(".")}
    if not classes:
        raise UserError(f"{folder} has no class folders: {layout}")
    return classes


def _images_of(class_folder: Path) -> list[Path]:
    """Every image file below ``class_folder``, sorted; none is a :class:`UserError`."""
    files = sorted(p for p in class_folder.rglob("*")
                   if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and _visible(p, class_folder))
    if not files:
        raise UserError(f"{class_folder} holds no {'/'.join(IMAGE_SUFFIXES)} images: add images or remove the folder")
    return files


def scan(root: Path, layout: str = _LAYOUT) -> tuple[list[str], dict[str, _Split]]:
    """The class names (sorted ``train/`` folders) and the files of both splits; ``layout`` ends the errors."""
    if not root.is_dir():
        raise UserError(f"dataset.root={root} is not a folder: {layout}")
    folders = {split: _class_folders(root / split, layout) for split in SPLITS}
    classes = list(folders["train"])
    if len(classes) < 2:
        raise UserError(f"{root / 'train'} has {len(classes)} class folder ({', '.join(classes)}): classification "
                        f"needs at least two classes (one class would train to 100 % and mean nothing)")
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
    """One image file as uint8 RGB [H, W, 3] (any mode: :func:`~datasets.decode.decode_rgb`), resized to N x N."""
    pixels = FixedSize(None if size is None else (size, size))(decode_rgb(path))
    return pixels.permute(1, 2, 0).numpy()


def _decode_all(files: Sequence[Path], size: int | None, shape: tuple[int, int] | None,
                reference: Path | None, tally: ConversionTally) -> tuple[torch.Tensor, tuple[int, int], Path]:
    """uint8 [N, 3, H, W] of ``files`` (decoded by a thread pool: the decoders release the GIL while decoding).

    Without ``size`` every image must be ``shape`` (the first image's size when ``shape`` is None).
    ``tally`` counts the files whose mode was converted.
    """
    first = decode_image(files[0], size)
    if shape is None:
        shape, reference = first.shape[:2], files[0]
    out = torch.empty((len(files), 3, *shape), dtype=torch.uint8)
    workers = min(8, os.cpu_count() or 1)
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        decoded = pool.map(lambda p: decode_image(p, size), files[1:])
        notes = pool.map(describe, files)
        for i, (path, pixels) in enumerate(zip(files, itertools.chain([first], decoded))):
            if pixels.shape[:2] != tuple(shape):
                raise mixed_sizes(path, pixels.shape[:2], reference, shape)
            out[i] = torch.from_numpy(pixels).permute(2, 0, 1)
        for note in notes:
            tally.add(note)
    finally:
        pool.shutdown(cancel_futures=True)  # on an error, the files not yet decoded are not decoded
    return out, tuple(shape), reference


def _decode(root: Path, classes: list[str], splits: Mapping[str, _Split], size: int | None) -> dict[str, Any]:
    """Decode both splits and compute the training split's statistics: the cache's content."""
    start = time.perf_counter()
    tally = ConversionTally()
    train, shape, reference = _decode_all(splits["train"].files, size, None, None, tally)
    val, _, _ = _decode_all(splits["val"].files, size, shape, reference, tally)
    mean, std = channel_stats(train)
    log.info("decoded %d + %d images of %s (%dx%d) in %.1f s", len(train), len(val), root, shape[1], shape[0],
             time.perf_counter() - start)
    return {
        "version": CACHE_VERSION, "classes": list(classes),
        "train_images": train, "train_labels": torch.tensor(splits["train"].labels, dtype=torch.int64),
        "test_images": val, "test_labels": torch.tensor(splits["val"].labels, dtype=torch.int64),
        "mean": list(mean), "std": list(std), "converted": dict(tally.counts),
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


@DATASETS.register("imagefolder", facts=DatasetFacts(channels=3), teachers_per_root=True,
                   options=("image_size", "stream", "workers"))
def load_imagefolder(cfg: Mapping[str, Any]) -> DataSplits:
    """``dataset=imagefolder``: the folder at ``dataset.root``, from its cache when the files did not change."""
    given = cfg_get(cfg, "root")
    if given is None or str(given) == "":
        raise UserError(f"dataset=imagefolder needs dataset.root=DIR: {_LAYOUT}")
    root = Path(str(given)).expanduser()
    size = None if cfg_get(cfg, "image_size") is None else cfg_int(cfg, "image_size", 0, minimum=1)
    stream = stream_setting(cfg_get(cfg, "stream", "auto"))
    classes, splits = scan(root)
    if decide_stream(stream, lambda: _decoded_bytes(splits, size), str(root)):
        return _stream(root, classes, splits, size, cfg)
    path = cache_path(root, cache_key(root, classes, splits, size), size)
    content = _read_cache(path, classes)
    if content is None:
        content = _decode(root, classes, splits, size)
        _write_cache(content, path)
    else:
        log.info("read the decoded images of %s from %s", root, path)
    message = ConversionTally(content["converted"]).message(len(content["train_labels"]) + len(content["test_labels"]),
                                                            str(root))
    if message:
        log.warning(message)
    return DataSplits(content["train_images"], content["train_labels"], content["test_images"],
                      content["test_labels"], len(classes), list(classes),
                      mean=tuple(content["mean"]), std=tuple(content["std"]))


def _decoded_bytes(splits: Mapping[str, _Split], size: int | None) -> int:
    """Bytes of both splits decoded to uint8 RGB: every image has ``size`` x ``size`` or the first one's size."""
    if size is not None:
        height = width = size
    else:
        try:
            with Image.open(splits["train"].files[0]) as first:  # the header: no decoding
                width, height = first.size
        except OSError:
            return 0  # unreadable: decoding it reports it, in one line
    return sum(len(split.files) for split in splits.values()) * 3 * height * width


def _stream(root: Path, classes: list[str], splits: Mapping[str, _Split], size: int | None,
            cfg: Mapping[str, Any]) -> FileSplits:
    """The folder as files, checked once (readable, one size, statistics): batches equal the in-memory ones."""
    resize = FixedSize(None if size is None else (size, size))
    check = check_files(root, f"imagefolder-{'native' if size is None else f'{size}x{size}'}",
                        splits["train"].files, splits["val"].files, prepare=resize, same_size=True, stats=True,
                        key_facts=(list(classes), size))
    check.warn(str(root))
    workers = None if cfg_get(cfg, "workers") is None else cfg_int(cfg, "workers", 0, minimum=0)
    return FileSplits([str(p) for p in splits["train"].files], torch.tensor(splits["train"].labels, dtype=torch.int64),
                      [str(p) for p in splits["val"].files], torch.tensor(splits["val"].labels, dtype=torch.int64),
                      len(classes), list(classes), mean=check.mean, std=check.std,
                      transform=FixedSize(resize.size, native=check.shape), workers=workers)
