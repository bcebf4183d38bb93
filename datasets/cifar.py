"""The CIFAR family's official python on-disk format: one reader, checksum check and download for both.

An extracted archive is a folder (``cifar-100-python/``, ``cifar-10-batches-py/``) of
pickles: one meta file with the class names, and training and test files whose
``data`` is uint8 N x 3072 channel-planar RGB with a list of labels beside it. The two
archives differ only in file names, key names and class count, so one
:class:`CifarFormat` per archive parametrises everything here. File names and md5s are
taken from torchvision's dataset classes (one source of truth). We read the files
ourselves rather than through torchvision because its constructor insists on the
official checksums, and a reconstructed copy (or our synthetic stand-in) has other
bytes; torchvision is used for what it does well, the verified download.
"""
from __future__ import annotations

import functools
import logging
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.errors import UserError
from datasets.base import DATA_ROOT_ENV, CorruptDataError, DatasetFacts, DataSplits, cfg_get, data_root

log = logging.getLogger(__name__)

SIDE = 32  # every CIFAR image is 32 x 32


def _tv_utils() -> Any:
    """torchvision's download and checksum helpers, imported only when data is checked or fetched.

    Importing torchvision costs seconds (it pulls in its models and ``torch._dynamo``); every
    command that fails on its configuration, or trains on other data, is spared that.
    """
    from torchvision.datasets import utils

    return utils


@dataclass(frozen=True)
class CifarFormat:
    """The facts of one official CIFAR archive; ``archive`` is torchvision's class for it (names, md5s, URL)."""

    title: str  # in messages: "CIFAR-100"
    archive_class: str  # the torchvision.datasets class holding the archive's facts, imported on first use
    labels_key: str  # the label list's key in a split file
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @functools.cached_property
    def archive(self) -> type:
        import torchvision.datasets

        return getattr(torchvision.datasets, self.archive_class)

    @property
    def base_folder(self) -> str:
        return self.archive.base_folder

    @property
    def archive_name(self) -> str:
        return self.archive.filename

    @property
    def meta_file(self) -> str:
        return self.archive.meta["filename"]

    @property
    def names_key(self) -> str:
        return self.archive.meta["key"]

    @property
    def train_files(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.archive.train_list)

    @property
    def test_files(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.archive.test_list)

    @property
    def split_files(self) -> tuple[str, ...]:
        """Every file of the folder, meta first: the cheap file fails fast."""
        return (self.meta_file, *self.train_files, *self.test_files)

    @property
    def official_md5(self) -> dict[str, str]:
        return {**dict(self.archive.train_list + self.archive.test_list), self.meta_file: self.archive.meta["md5"]}

    @property
    def facts(self) -> DatasetFacts:
        return DatasetFacts(num_classes=self.num_classes, image_size=(SIDE, SIDE), channels=3,
                            mean=self.mean, std=self.std)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays, so a data file cannot run arbitrary code."""

    _ALLOWED = {
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how protocol-2 pickles spell bytes
    }

    def find_class(self, module: str, name: str) -> Any:
        # Files written by numpy 1.x (the official archives) name numpy.core; numpy 2 moved it.
        if module.startswith("numpy.core"):
            module = "numpy._core" + module[len("numpy.core"):]
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name} in a data file")
        return super().find_class(module, name)


def load_pickle(path: Path) -> dict[str, Any]:
    """One file of the official format as a dict; any failure is a :class:`CorruptDataError`."""
    try:
        with open(path, "rb") as f:
            # latin1 decodes the Python 2 strings of the official files (as torchvision does).
            entry = _ArrayUnpickler(f, encoding="latin1").load()
    except Exception as e:  # noqa: BLE001 - truncated or garbage files raise many different types
        raise CorruptDataError(f"cannot read {path}: {type(e).__name__}: {e}") from None
    if not isinstance(entry, dict):
        raise CorruptDataError(f"cannot read {path}: expected a dict, found {type(entry).__name__}")
    return entry


def _class_names(meta: dict[str, Any], path: Path, fmt: CifarFormat) -> list[str]:
    names = meta.get(fmt.names_key)
    if not isinstance(names, list) or len(names) != fmt.num_classes or not all(isinstance(n, str) for n in names):
        raise CorruptDataError(f"cannot read {path}: '{fmt.names_key}' is not a list of {fmt.num_classes} names")
    return names


def _split_arrays(entry: dict[str, Any], path: Path, fmt: CifarFormat) -> tuple[np.ndarray, np.ndarray]:
    """Rows [N, 3072] uint8 and labels [N] int64 of one file, after checking shapes and ranges."""
    data = entry.get("data")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * SIDE**2:
        shape = getattr(data, "shape", None)
        dtype = getattr(data, "dtype", None)
        raise CorruptDataError(f"cannot read {path}: 'data' should be uint8 N x 3072, found {dtype} {shape}")
    try:
        labels = np.asarray(entry.get(fmt.labels_key), dtype=np.int64)
    except (TypeError, ValueError):
        raise CorruptDataError(f"cannot read {path}: '{fmt.labels_key}' is not a list of integers") from None
    if labels.shape != (data.shape[0],):
        raise CorruptDataError(f"cannot read {path}: {labels.size} labels for {data.shape[0]} images")
    if labels.size and (labels.min() < 0 or labels.max() >= fmt.num_classes):
        raise CorruptDataError(f"cannot read {path}: labels outside 0..{fmt.num_classes - 1}")
    return data, labels


def _read_split(folder: Path, names: tuple[str, ...], fmt: CifarFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [N, 3, 32, 32] uint8 and labels [N] int64 of the files ``names``, concatenated in order."""
    parts = [_split_arrays(load_pickle(folder / name), folder / name, fmt) for name in names]
    data = parts[0][0] if len(parts) == 1 else np.concatenate([p[0] for p in parts])
    labels = parts[0][1] if len(parts) == 1 else np.concatenate([p[1] for p in parts])
    # Channel-planar rows reshape to [N, 3, 32, 32] without a copy.
    images = torch.from_numpy(np.ascontiguousarray(data).reshape(-1, 3, SIDE, SIDE))
    return images, torch.from_numpy(labels)


def read_folder(folder: Path, fmt: CifarFormat) -> DataSplits:
    """Read every file of an official-format folder (no checksum check)."""
    folder = Path(folder)
    missing = [name for name in fmt.split_files if not (folder / name).is_file()]
    if missing:
        raise CorruptDataError(f"{folder} lacks {', '.join(missing)}: it is not a complete {fmt.base_folder} folder")
    class_names = _class_names(load_pickle(folder / fmt.meta_file), folder / fmt.meta_file, fmt)
    train_images, train_labels = _read_split(folder, fmt.train_files, fmt)
    test_images, test_labels = _read_split(folder, fmt.test_files, fmt)
    return DataSplits(train_images, train_labels, test_images, test_labels, fmt.num_classes, class_names,
                      mean=fmt.mean, std=fmt.std)


def _is_complete(folder: Path, fmt: CifarFormat) -> bool:
    return all((folder / name).is_file() for name in fmt.split_files)


def find_folder(root: Path, fmt: CifarFormat) -> Path | None:
    """``<root>/<base folder>`` when complete; ``root`` itself when it is that folder; else None."""
    for folder in (root / fmt.base_folder, root):
        if _is_complete(folder, fmt):
            return folder
    return None


def check_official_checksums(folder: Path, fmt: CifarFormat) -> None:
    """Raise a :class:`UserError` unless every file matches the official archive's md5."""
    md5 = fmt.official_md5
    for name in fmt.split_files:
        if not _tv_utils().check_integrity(str(folder / name), md5[name]):
            raise UserError(
                f"{folder / name} does not match the official {fmt.title} checksum: delete {folder} to "
                f"download it again, or set dataset.verify_checksums=false for a trusted reconstructed copy"
            )


def _missing_message(root: Path, fmt: CifarFormat) -> str:
    return (
        f"put the official {fmt.title} archive at {root / fmt.archive_name} (or its extracted folder at "
        f"{root / fmt.base_folder}/), point dataset.root (or ${DATA_ROOT_ENV}) at the folder holding it, "
        f"or use dataset=synthetic"
    )


def download(root: Path, fmt: CifarFormat) -> None:
    """Download (when absent) and extract the official archive into ``root``, verifying its md5."""
    _tv_utils().download_and_extract_archive(fmt.archive.url, str(root), filename=fmt.archive_name,
                                          md5=fmt.archive.tgz_md5)


def prepare(root: Path, fmt: CifarFormat, download_missing: bool = True, verify_checksums: bool = True) -> Path:
    """The folder holding the official files under ``root``, extracting or downloading them if needed."""
    folder = find_folder(root, fmt)
    archive = root / fmt.archive_name
    if folder is None and archive.is_file():
        if verify_checksums and not _tv_utils().check_integrity(str(archive), fmt.archive.tgz_md5):
            raise UserError(
                f"{archive} does not match the official checksum (partial or corrupt download): delete it "
                f"and run again, or set dataset.verify_checksums=false for a trusted copy"
            )
        try:
            _tv_utils().extract_archive(str(archive), str(root))
        except Exception as e:  # noqa: BLE001 - any failure to extract is the archive's
            raise UserError(f"cannot extract {archive} ({type(e).__name__}: {e}): delete it and run again") from None
        folder = find_folder(root, fmt)
    if folder is None:
        if not download_missing:
            raise UserError(
                f"{fmt.title} not found under {root} and dataset.download=false: {_missing_message(root, fmt)}"
            )
        log.info("downloading %s to %s", fmt.title, root)
        try:
            download(root, fmt)
        except Exception as e:  # noqa: BLE001 - URLError, OSError, md5 mismatch (RuntimeError), bad archive...
            raise UserError(
                f"could not download {fmt.title} ({type(e).__name__}: {e}); {_missing_message(root, fmt)}"
            ) from None
        folder = find_folder(root, fmt)
        if folder is None:
            raise UserError(
                f"the downloaded archive did not contain {fmt.base_folder}/; {_missing_message(root, fmt)}"
            )
    if verify_checksums:
        check_official_checksums(folder, fmt)
    return folder


def load_official(cfg: Mapping[str, Any], fmt: CifarFormat) -> DataSplits:
    """The real data set under ``dataset.root`` (extracted or downloaded when missing, checksums verified)."""
    root = data_root(cfg)
    folder = prepare(root, fmt, download_missing=bool(cfg_get(cfg, "download", True)),
                     verify_checksums=bool(cfg_get(cfg, "verify_checksums", True)))
    try:
        return read_folder(folder, fmt)
    except CorruptDataError as e:
        raise CorruptDataError(f"{e}; delete {folder} and run again to re-extract or re-download it") from None
