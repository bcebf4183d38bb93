"""Data sets (real CIFAR-100 and a generated stand-in in the same format) and on-device batching.

``load_dataset(cfg)`` turns the ``dataset`` config node into :class:`DataSplits`
(uint8 images and int64 labels on the CPU); :class:`DeviceLoader` moves a split to
the training device and yields augmented, normalised :class:`Batch` es.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

from common.errors import UserError
from common.registry import Registry
from datasets.batch import Batch
from datasets.cifar100 import CIFAR100_MEAN, CIFAR100_STD, DataSplits, cfg_get, cfg_int, load_cifar100
from datasets.device_loader import DeviceLoader
from datasets.synthetic import load_synthetic

DATASETS: Registry[Callable[[Mapping[str, Any]], DataSplits]] = Registry("dataset")
DATASETS.add("cifar100", load_cifar100)
DATASETS.add("synthetic", load_synthetic)


def load_dataset(cfg: Mapping[str, Any]) -> DataSplits:
    """Load the data set the ``dataset`` config node names (``name``, ``root`` and its own keys).

    When the node sets ``num_classes`` it must match the data (models are built from it).
    """
    name = cfg_get(cfg, "name")
    if name is None:
        raise UserError(f"the dataset config has no 'name'; choose one of: {', '.join(DATASETS.names())}")
    splits = DATASETS.get(str(name))(cfg)
    expected = cfg_int(cfg, "num_classes", splits.num_classes, minimum=1)
    if expected != splits.num_classes:
        raise UserError(
            f"dataset.num_classes={expected} but the {name} data set has {splits.num_classes} classes; "
            f"set dataset.num_classes={splits.num_classes}"
        )
    return splits


__all__ = [
    "Batch",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "DATASETS",
    "DataSplits",
    "DeviceLoader",
    "load_dataset",
]
