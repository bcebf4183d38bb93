"""Data sets (CIFAR-100, CIFAR-10, an image folder, a generated stand-in) and on-device batching.

``load_dataset(cfg)`` turns the ``dataset`` config node into :class:`DataSplits`
(uint8 images and int64 labels on the CPU, with the data set's classes, image size and
mean/std); :class:`DeviceLoader` moves a split to the training device and yields
augmented, normalised :class:`Batch` es.

Every module of this package is imported (in name order), so a data set registers
itself: adding one is adding its file (``@DATASETS.register(name, facts=DatasetFacts(...))``
on its loader; see :mod:`datasets.base`) and, optionally, ``configs/dataset/<name>.yaml``.
"""
from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping
from typing import Any

from common.errors import UserError
from datasets.base import (
    DATASETS,
    DatasetFacts,
    DataSplits,
    cfg_floats,
    cfg_get,
    cfg_int,
    dataset_facts,
    teacher_folder,
)

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")

from datasets.batch import Batch  # noqa: E402 - after the auto-import, like the other re-exports
from datasets.cifar100 import CIFAR100_MEAN, CIFAR100_STD  # noqa: E402
from datasets.device_loader import DeviceLoader  # noqa: E402


def load_dataset(cfg: Mapping[str, Any]) -> DataSplits:
    """Load the data set the ``dataset`` config node names (``name``, ``root`` and its own keys).

    When the node sets ``num_classes`` it must match the data (models are built from it);
    ``num_classes: null`` takes the data set's own count. ``dataset.mean`` / ``dataset.std``,
    when set, replace the data set's normalisation statistics.
    """
    name = cfg_get(cfg, "name")
    if name is None:
        raise UserError(f"the dataset config has no 'name'; choose one of: {', '.join(DATASETS.names())}")
    splits = DATASETS.get(str(name))(cfg)
    _check_facts(str(name), splits, dataset_facts(str(name)))
    expected = cfg_int(cfg, "num_classes", splits.num_classes, minimum=1)
    if expected != splits.num_classes:
        raise UserError(
            f"dataset.num_classes={expected} but the {name} data set has {splits.num_classes} classes; "
            f"set dataset.num_classes={splits.num_classes} (or null to take it from the data)"
        )
    mean = cfg_floats(cfg, "mean", splits.channels)
    std = cfg_floats(cfg, "std", splits.channels, positive=True)
    splits.mean = mean if mean is not None else splits.mean
    splits.std = std if std is not None else splits.std
    return splits


def _check_facts(name: str, splits: DataSplits, facts: DatasetFacts) -> None:
    """The loaded data must be what the data set declared (a mismatch is a bug in its loader)."""
    found = {"num_classes": splits.num_classes, "image_size": splits.image_size, "channels": splits.channels}
    for key, value in found.items():
        declared = getattr(facts, key)
        if key == "image_size" and declared is not None:
            declared = tuple(declared)
        if declared is not None and declared != value:
            raise ValueError(f"data set {name} declares {key}={declared} but its loader returned {value}")
    if len(splits.class_names) != splits.num_classes:
        raise ValueError(f"data set {name} has {splits.num_classes} classes but {len(splits.class_names)} names")


__all__ = [
    "Batch",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "DATASETS",
    "DataSplits",
    "DatasetFacts",
    "DeviceLoader",
    "dataset_facts",
    "load_dataset",
    "teacher_folder",
]
