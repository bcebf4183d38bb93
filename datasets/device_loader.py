"""Batches straight from a uint8 data set held on the training device, augmented there.

Why: small CIFAR models run faster than Python data loaders can decode and augment
images, so the whole uint8 set (150 MB for CIFAR-100) lives on the device as one
tensor and each batch is cropped, flipped and normalised with a few batched tensor
ops (no per-image Python). All randomness of an epoch is drawn up front from a
generator seeded by (seed, epoch) alone, so any step of any epoch can be rebuilt
without replaying the ones before it: that is how a run resumes mid-epoch.

Batch rules (train mode), with B the per-rank batch size and W the world size:

* The global batch is B * W. Global step s covers positions ``[s*B*W, (s+1)*B*W)``
  of the epoch permutation (the same on every rank) and rank r takes the r-th
  contiguous slice of it, so W ranks see exactly the batches one process with
  batch B * W would see, with disjoint shards.
* Steps per epoch are ``ceil(N / (B*W))``, equal on all ranks. The last, partial
  global batch of R samples is split as evenly as possible (the first ``R % W``
  ranks get one more) and is kept only when every rank gets at least 2 samples
  (R >= 2W); otherwise it is dropped for that epoch, because BatchNorm cannot train
  on a single sample. With W = 1 this means: a final batch of one sample is dropped.

When the uint8 set does not fit on an accelerator (more than :data:`DEVICE_FRACTION` of its
free memory, e.g. a large image folder), it stays in CPU memory (pinned) and each batch is
gathered there and moved to the device: the same batches, one transfer per step (logged once).

Eval mode: no shuffling and no augmentation; rank r owns the r-th contiguous shard
of the data set (sizes as even as possible) and walks it in order, keeping the
last partial batch whatever its size. Shards cover every sample exactly once; ranks
may differ by one step, so reduce metrics after the loop, not per step.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import torch

from datasets.augment import crop_and_flip, padding_for
from datasets.batch import Batch
from datasets.cifar100 import CIFAR100_MEAN, CIFAR100_STD
from datasets.loader_base import ShardedLoader
from datasets.sharding import check_start_step, draw_epoch_plan, epoch_seed

log = logging.getLogger(__name__)

# A data set is kept on an accelerator when it takes at most this share of the free memory;
# the rest is for the networks, their activations and the optimizer.
DEVICE_FRACTION = 0.5


def fits_on_device(nbytes: int, device: torch.device) -> bool:
    """Whether ``nbytes`` of data may live on ``device`` (always on the CPU: it is already there)."""
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes <= DEVICE_FRACTION * free


class DeviceLoader(ShardedLoader):
    """Iterates normalised, augmented :class:`Batch` es of an on-device uint8 data set.

    ``images``: uint8 [N, C, H, W]; ``labels``: integer [N]. ``train`` switches on
    shuffling and crop / flip augmentation (padding scaled to the size, :func:`padding_for`).
    ``seed`` fixes the per-epoch randomness; ``rank`` / ``world_size`` shard it for DDP (see the
    module docstring for the rules). ``mean`` / ``std``: the data set's per-channel statistics.
    ``resident``: keep the images on the device (``None``: when they fit, :func:`fits_on_device`);
    ``False`` streams each batch from CPU memory instead, with identical batches.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        device: torch.device | str,
        *,
        train: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        channels_last: bool = False,
        mean: Sequence[float] = CIFAR100_MEAN,
        std: Sequence[float] = CIFAR100_STD,
        views: Sequence[str] = (),
        resident: bool | None = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        if labels.shape != images.shape[:1]:
            raise ValueError(f"{labels.shape[0] if labels.ndim else 0} labels for {images.shape[0]} images")
        super().__init__(images.shape[0], labels, batch_size, device, train=train, seed=seed, rank=rank,
                         world_size=world_size, channels_last=channels_last, mean=mean, std=std,
                         channels=images.shape[1], views=views)
        self.pad = padding_for(images.shape[2], images.shape[3])
        nbytes = images.numel() * images.element_size()
        self.resident = fits_on_device(nbytes, self.device) if resident is None else bool(resident)
        if self.resident:
            # One transfer of the whole set; every batch afterwards is a gather on the device.
            self.images = images.to(self.device)
        else:
            if resident is None:
                log.warning("the %s split (%.2f GiB of uint8 images) does not fit in %d%% of the free memory of "
                            "%s: it stays in CPU memory and each batch is moved to the device (slower)",
                            "training" if train else "test", nbytes / 2**30, int(DEVICE_FRACTION * 100), self.device)
            pin = self.device.type == "cuda" and not images.is_pinned()
            self.images = images.pin_memory() if pin else images

    @property
    def dataset_size(self) -> int:
        return self.images.shape[0]

    def epoch_plan(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The epoch's permutation [N], crop offsets [N, 2] (row, col in 0..2*pad) and flips [N] (bool).

        Indexed by position in the epoch, drawn on the CPU from a generator seeded by
        (seed, epoch) and moved to the device once. Identical on every rank.
        """
        order, offsets, flips = draw_epoch_plan(self.seed, epoch, self.dataset_size, self.pad)
        return order.to(self.device), offsets.to(self.device), flips.to(self.device)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        """The batches of ``epoch`` from ``start_step`` on; earlier steps are skipped, not computed."""
        check_start_step(start_step, len(self))
        if self.train:
            order, offsets, flips = self.epoch_plan(epoch)
            # streaming gathers on the CPU: one copy of the order per epoch, no device sync per step
            source = order if self.resident else order.cpu()
            for step, (start, size) in enumerate(self._spans[start_step:], start=start_step):
                pos = slice(start, start + size)
                idx = order[pos]
                raw = self._gather(source[pos])
                augmented = crop_and_flip(raw, offsets[pos], flips[pos], self.pad)
                batch = Batch(self._normalise(augmented), self.labels[idx], idx, {},
                              offsets=offsets[pos], flips=flips[pos])
                for k, (name, make_view) in enumerate(self.views.items(), start=1):
                    gen = torch.Generator(device="cpu").manual_seed(epoch_seed(self.seed, epoch, step, k))
                    batch.views[name] = self._normalise(make_view(raw, gen))
                yield batch
        else:
            for start, size in self._spans[start_step:]:
                idx = torch.arange(start, start + size, device=self.device)
                images = self.images[start : start + size].to(self.device)  # a no-op when resident
                yield Batch(self._normalise(images), self.labels[start : start + size], idx, {})

    def _gather(self, idx: torch.Tensor) -> torch.Tensor:
        """The uint8 images at ``idx`` (given where the set lives), on the device."""
        if self.resident:
            return self.images[idx]
        return self.images[idx].to(self.device)
