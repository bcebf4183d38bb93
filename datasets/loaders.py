"""One way to get the batches of a split, whichever form the data set was loaded in.

``make_loader(data, "train" | "test", ...)`` returns a :class:`DeviceLoader` for
:class:`~datasets.base.DataSplits` (decoded, in memory) and a :class:`StreamLoader` for
:class:`~datasets.base.FileSplits` (files decoded per batch). Both follow :class:`BatchLoader`
and the same order, shard and resume rules, so the training loop needs to know neither.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol

import torch

from datasets.base import DataSplits, FileSplits
from datasets.batch import Batch
from datasets.device_loader import DeviceLoader
from datasets.stream_loader import StreamLoader

SPLITS = ("train", "test")


class BatchLoader(Protocol):
    """What the training loop reads from a loader (the rules: :mod:`datasets.device_loader`)."""

    batch_size: int
    device: torch.device
    train: bool
    seed: int
    rank: int
    world_size: int
    channels_last: bool

    @property
    def dataset_size(self) -> int: ...

    def __len__(self) -> int: ...

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]: ...


def make_loader(data: DataSplits | FileSplits, split: str, batch_size: int, device: torch.device | str, *,
                train: bool, seed: int = 0, rank: int = 0, world_size: int = 1, channels_last: bool = False,
                views: Sequence[str] = ()) -> BatchLoader:
    """The loader of ``split`` ("train" or "test") of ``data``, normalised with the data set's mean/std.

    ``train`` switches on shuffling and augmentation (usually ``split == "train"``); the other
    arguments are :class:`DeviceLoader`'s. A streamed set decodes with ``data.workers`` processes.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    common = dict(train=train, seed=seed, rank=rank, world_size=world_size, channels_last=channels_last,
                  mean=data.mean, std=data.std, views=views)
    if isinstance(data, FileSplits):
        files, labels = (data.train_files, data.train_labels) if split == "train" else (data.test_files,
                                                                                     data.test_labels)
        return StreamLoader(files, labels, batch_size, device, transform=data.transform, workers=data.workers,
                            **common)
    images, labels = (data.train_images, data.train_labels) if split == "train" else (data.test_images,
                                                                                   data.test_labels)
    return DeviceLoader(images, labels, batch_size, device, **common)
