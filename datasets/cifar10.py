"""CIFAR-10 (``dataset=cifar10``): torchvision's official archive, read by the shared CIFAR reader.

The folder ``cifar-10-batches-py/`` holds ``data_batch_1`` .. ``data_batch_5`` (the
training split, 10000 images each), ``test_batch`` (keys ``data``: uint8 N x 3072
channel-planar RGB, ``labels``, ``filenames``, ``batch_label``) and ``batches.meta``
(``label_names``, ``num_cases_per_batch``, ``num_vis``). Same offline rules, checksum
check and messages as CIFAR-100 (:mod:`datasets.cifar`).
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from datasets import cifar
from datasets.base import DATASETS, DataSplits

# The training split's per-channel mean and (population) standard deviation, pixels in [0, 1].
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

CIFAR10 = cifar.CifarFormat(title="CIFAR-10", archive_class="CIFAR10", labels_key="labels",
                            num_classes=10, mean=CIFAR10_MEAN, std=CIFAR10_STD)


def read_cifar10_folder(folder: Path) -> DataSplits:
    """Read the six batches and ``batches.meta`` of a ``cifar-10-batches-py`` folder (no checksum check)."""
    return cifar.read_folder(folder, CIFAR10)


@DATASETS.register("cifar10", facts=CIFAR10.facts, options=("download", "verify_checksums"))
def load_cifar10(cfg: Mapping[str, Any]) -> DataSplits:
    """``dataset=cifar10``: the real data set under ``dataset.root`` (downloaded when missing)."""
    return cifar.load_official(cfg, CIFAR10)
