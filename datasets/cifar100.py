"""CIFAR-100 (``dataset=cifar100``): torchvision's official archive, read by the shared CIFAR reader.

The folder ``cifar-100-python/`` holds three pickles: ``train`` and ``test`` (keys
``data``: uint8 N x 3072 channel-planar RGB, ``fine_labels``, ``coarse_labels``,
``filenames``, ``batch_label``) and ``meta`` (``fine_label_names``,
``coarse_label_names``). See :mod:`datasets.cifar` for the reader, the checksum check
and the download.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from datasets import cifar
from datasets.base import DATASETS, CorruptDataError, DataSplits, cfg_get, cfg_int, data_root
from datasets.cifar import load_pickle

__all__ = ["CIFAR100", "CIFAR100_MEAN", "CIFAR100_STD", "CorruptDataError", "DataSplits", "cfg_get", "cfg_int",
           "data_root", "load_cifar100", "load_pickle", "prepare_cifar100", "read_cifar_folder"]

# The training split's per-channel statistics (pixels in [0, 1]), as the CIFAR-100 recipes normalise.
CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)

CIFAR100 = cifar.CifarFormat(title="CIFAR-100", archive_class="CIFAR100", labels_key="fine_labels",
                             num_classes=100, mean=CIFAR100_MEAN, std=CIFAR100_STD)
NUM_CLASSES = CIFAR100.num_classes
NUM_COARSE = 20
# The archive's file names and md5s are CIFAR100.base_folder, .archive_name, .split_files and
# .official_md5: read from torchvision when first asked for (importing it costs seconds).


def read_cifar_folder(folder: Path) -> DataSplits:
    """Read ``train``, ``test`` and ``meta`` of a ``cifar-100-python`` folder (no checksum check)."""
    return cifar.read_folder(folder, CIFAR100)


def prepare_cifar100(root: Path, download: bool = True, verify_checksums: bool = True) -> Path:
    """The folder holding the official files under ``root``, extracting or downloading them if needed."""
    return cifar.prepare(root, CIFAR100, download_missing=download, verify_checksums=verify_checksums)


@DATASETS.register("cifar100", facts=CIFAR100.facts, options=("download", "verify_checksums"))
def load_cifar100(cfg: Mapping[str, Any]) -> DataSplits:
    """``dataset=cifar100``: the real data set under ``dataset.root`` (downloaded when missing)."""
    return cifar.load_official(cfg, CIFAR100)
