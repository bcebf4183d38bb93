"""What both loaders hold: this rank's shard of every epoch, the batch size, the extra views, normalisation.

:class:`~datasets.device_loader.DeviceLoader` (a uint8 set in memory) and
:class:`~datasets.stream_loader.StreamLoader` (files decoded per batch) differ only in where a
batch's uint8 samples come from; the facts they are built with, the checks on them, the batch
spans of a rank (:mod:`datasets.sharding`) and the float32 normalisation are this one class.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from common.errors import UserError
from datasets.sharding import eval_spans, train_spans
from datasets.views import VIEWS


class ShardedLoader:
    """``n`` samples with ``labels``, cut into this rank's batches of ``batch_size``: shuffled training
    steps (``train``) or a contiguous evaluation shard. ``mean``/``std`` have one value per channel."""

    def __init__(self, n: int, labels: torch.Tensor, batch_size: int, device: torch.device | str, *, train: bool,
                 seed: int, rank: int, world_size: int, channels_last: bool, mean: Sequence[float],
                 std: Sequence[float], channels: int, views: Sequence[str]) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise UserError(f"the batch size must be a positive integer, got {batch_size!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if len(mean) != channels or len(std) != channels:
            raise ValueError(f"mean/std need {channels} values, got {len(mean)}/{len(std)}")
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.train = train
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.channels_last = channels_last
        self.views = {VIEWS.canonical(v): VIEWS.get(v) for v in views}  # extra views of each training batch
        self.labels = labels.to(self.device, torch.int64)
        self._mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self._spans = (train_spans(n, batch_size, rank, world_size) if train
                       else eval_spans(n, batch_size, rank, world_size))

    def __len__(self) -> int:
        """Steps per epoch on this rank."""
        return len(self._spans)

    def _normalise(self, images: torch.Tensor) -> torch.Tensor:
        return normalise(images, self._mean, self._std, self.channels_last)


def normalise(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """uint8 -> float32 ``(x / 255 - mean) / std``, the same ops as ToTensor + Normalize (mean/std [1, C, 1, 1])."""
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    x = images.to(torch.float32)  # a new tensor (keeps the memory format), so in-place is safe
    return x.div_(255.0).sub_(mean).div_(std)
