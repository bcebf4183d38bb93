"""CIFAR-100 in its official python on-disk format: reader, checksum check and download.

The folder ``cifar-100-python/`` holds three pickles: ``train`` and ``test`` (keys
``data``: uint8 N x 3072 channel-planar RGB, ``fine_labels``, ``coarse_labels``,
``filenames``, ``batch_label``) and ``meta`` (``fine_label_names``,
``coarse_label_names``). We read that format ourselves rather than through
``torchvision.datasets.CIFAR100`` because its constructor insists on the official
checksums, and a reconstructed copy (or our synthetic stand-in) has other bytes.
torchvision is used for what it does well: the verified download of the archive.
"""
from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.datasets import CIFAR100 as _TorchvisionCIFAR100
from torchvision.datasets import utils as tv_utils

from common.errors import UserError

log = logging.getLogger(__name__)

CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)

BASE_FOLDER = "cifar-100-python"  # the folder name inside the official archive
ARCHIVE_NAME = "cifar-100-python.tar.gz"
SPLIT_FILES = ("meta", "train", "test")  # meta first: the cheap file fails fast
NUM_CLASSES = 100
NUM_COARSE = 20
DATA_ROOT_ENV = "KD_DATA_ROOT"

# md5 of the official files, taken from torchvision so there is one source of truth.
OFFICIAL_MD5 = {
    **{name: md5 for name, md5 in _TorchvisionCIFAR100.train_list + _TorchvisionCIFAR100.test_list},
    _TorchvisionCIFAR100.meta["filename"]: _TorchvisionCIFAR100.meta["md5"],
}


@dataclass
class DataSplits:
    """A whole data set in memory: uint8 images [N, 3, 32, 32] and int64 labels [N] on the CPU."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int
    class_names: list[str]


class CorruptDataError(UserError):
    """A data file exists but cannot be read as the official format (truncated, garbage, wrong shapes)."""


def cfg_get(cfg: Mapping[str, Any], key: str, default: Any = None) -> Any:
    """``cfg[key]`` for a plain Mapping or an OmegaConf DictConfig, ``default`` when absent or null."""
    value = cfg.get(key, default)
    return default if value is None else value


def cfg_int(cfg: Mapping[str, Any], key: str, default: int, minimum: int) -> int:
    """An integer config value of at least ``minimum``; anything else is a :class:`UserError`."""
    value = cfg_get(cfg, key, default)
    # bool is an int subclass; `dataset.train_size=true` is a typo, not 1.
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise UserError(f"dataset.{key} must be an integer >= {minimum}, got {value!r}")
    try:
        number = int(value)
    except ValueError:
        raise UserError(f"dataset.{key} must be an integer >= {minimum}, got {value!r}") from None
    if number < minimum:
        raise UserError(f"dataset.{key} must be an integer >= {minimum}, got {number}")
    return number


def data_root(cfg: Mapping[str, Any]) -> Path:
    """``dataset.root``; when unset, ``$KD_DATA_ROOT`` or ``./data`` (the config default does the same)."""
    root = cfg_get(cfg, "root") or os.environ.get(DATA_ROOT_ENV) or "data"
    return Path(str(root)).expanduser()


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
        # Files written by numpy 1.x (the official archive) name numpy.core; numpy 2 moved it.
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


def _class_names(meta: dict[str, Any], path: Path) -> list[str]:
    names = meta.get("fine_label_names")
    if not isinstance(names, list) or len(names) != NUM_CLASSES or not all(isinstance(n, str) for n in names):
        raise CorruptDataError(f"cannot read {path}: 'fine_label_names' is not a list of {NUM_CLASSES} names")
    return names


def _split_tensors(entry: dict[str, Any], path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [N, 3, 32, 32] uint8 and labels [N] int64 of one split, after checking shapes and ranges."""
    data = entry.get("data")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", None)
        dtype = getattr(data, "dtype", None)
        raise CorruptDataError(f"cannot read {path}: 'data' should be uint8 N x 3072, found {dtype} {shape}")
    try:
        labels = np.asarray(entry.get("fine_labels"), dtype=np.int64)
    except (TypeError, ValueError):
        raise CorruptDataError(f"cannot read {path}: 'fine_labels' is not a list of integers") from None
    if labels.shape != (data.shape[0],):
        raise CorruptDataError(f"cannot read {path}: {labels.size} labels for {data.shape[0]} images")
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise CorruptDataError(f"cannot read {path}: labels outside 0..{NUM_CLASSES - 1}")
    # Channel-planar rows reshape to [N, 3, 32, 32] without a copy.
    images = torch.from_numpy(np.ascontiguousarray(data).reshape(-1, 3, 32, 32))
    return images, torch.from_numpy(labels)


def read_cifar_folder(folder: Path) -> DataSplits:
    """Read ``train``, ``test`` and ``meta`` of an official-format folder (no checksum check)."""
    folder = Path(folder)
    missing = [name for name in SPLIT_FILES if not (folder / name).is_file()]
    if missing:
        raise CorruptDataError(f"{folder} lacks {', '.join(missing)}: it is not a complete {BASE_FOLDER} folder")
    class_names = _class_names(load_pickle(folder / "meta"), folder / "meta")
    train_images, train_labels = _split_tensors(load_pickle(folder / "train"), folder / "train")
    test_images, test_labels = _split_tensors(load_pickle(folder / "test"), folder / "test")
    return DataSplits(train_images, train_labels, test_images, test_labels, NUM_CLASSES, class_names)


def _is_cifar_folder(folder: Path) -> bool:
    return all((folder / name).is_file() for name in SPLIT_FILES)


def find_cifar_folder(root: Path) -> Path | None:
    """``<root>/cifar-100-python`` when complete; ``root`` itself when it is that folder; else None."""
    for folder in (root / BASE_FOLDER, root):
        if _is_cifar_folder(folder):
            return folder
    return None


def check_official_checksums(folder: Path) -> None:
    """Raise a :class:`UserError` unless every file matches the official archive's md5."""
    for name in SPLIT_FILES:
        if not tv_utils.check_integrity(str(folder / name), OFFICIAL_MD5[name]):
            raise UserError(
                f"{folder / name} does not match the official CIFAR-100 checksum: delete {folder} to "
                f"download it again, or set dataset.verify_checksums=false for a trusted reconstructed copy"
            )


def _missing_message(root: Path) -> str:
    return (
        f"put the official CIFAR-100 archive at {root / ARCHIVE_NAME} (or its extracted folder at "
        f"{root / BASE_FOLDER}/), point dataset.root (or ${DATA_ROOT_ENV}) at the folder holding it, "
        f"or use dataset=synthetic"
    )


def download_cifar100(root: Path) -> None:
    """Download (when absent) and extract the official archive into ``root``, verifying its md5."""
    tv_utils.download_and_extract_archive(
        _TorchvisionCIFAR100.url, str(root), filename=ARCHIVE_NAME, md5=_TorchvisionCIFAR100.tgz_md5
    )


def prepare_cifar100(root: Path, download: bool = True, verify_checksums: bool = True) -> Path:
    """The folder holding the official files under ``root``, extracting or downloading them if needed."""
    folder = find_cifar_folder(root)
    archive = root / ARCHIVE_NAME
    if folder is None and archive.is_file():
        if verify_checksums and not tv_utils.check_integrity(str(archive), _TorchvisionCIFAR100.tgz_md5):
            raise UserError(
                f"{archive} does not match the official checksum (partial or corrupt download): delete it "
                f"and run again, or set dataset.verify_checksums=false for a trusted copy"
            )
        try:
            tv_utils.extract_archive(str(archive), str(root))
        except Exception as e:  # noqa: BLE001 - any failure to extract is the archive's
            raise UserError(f"cannot extract {archive} ({type(e).__name__}: {e}): delete it and run again") from None
        folder = find_cifar_folder(root)
    if folder is None:
        if not download:
            raise UserError(f"CIFAR-100 not found under {root} and dataset.download=false: {_missing_message(root)}")
        log.info("downloading CIFAR-100 to %s", root)
        try:
            download_cifar100(root)
        except Exception as e:  # noqa: BLE001 - URLError, OSError, md5 mismatch (RuntimeError), bad archive...
            raise UserError(
                f"could not download CIFAR-100 ({type(e).__name__}: {e}); {_missing_message(root)}"
            ) from None
        folder = find_cifar_folder(root)
        if folder is None:
            raise UserError(f"the downloaded archive did not contain {BASE_FOLDER}/; {_missing_message(root)}")
    if verify_checksums:
        check_official_checksums(folder)
    return folder


def load_cifar100(cfg: Mapping[str, Any]) -> DataSplits:
    """``dataset=cifar100``: the real data set under ``dataset.root`` (downloaded when missing)."""
    root = data_root(cfg)
    folder = prepare_cifar100(
        root,
        download=bool(cfg_get(cfg, "download", True)),
        verify_checksums=bool(cfg_get(cfg, "verify_checksums", True)),
    )
    try:
        return read_cifar_folder(folder)
    except CorruptDataError as e:
        raise CorruptDataError(f"{e}; delete {folder} and run again to re-extract or re-download it") from None
