"""Batches decoded from image files by DataLoader workers: the device loader's protocol for sets too large for memory.

:class:`StreamLoader` is constructed with the same facts as :class:`~datasets.device_loader.DeviceLoader`
(batch size, device, train, seed, rank, world size, channels_last, mean/std, views) and keeps
every one of its guarantees (its module docstring has the rules), because both cut an epoch
with :mod:`datasets.sharding`:

* the sample order of an epoch is a permutation drawn from (seed, epoch) alone, identical
  on every rank; global step s covers positions ``[s*B*W, (s+1)*B*W)`` and rank r takes the
  r-th contiguous slice, so W ranks see exactly one process's batches with batch B * W;
* the same last-batch rule (kept only when every rank gets >= 2 samples), and eval shards
  contiguous in data-set order with the last partial batch kept;
* ``epoch(e, start_step=k)`` starts at step k: the workers are only handed the keys of steps
  k and later, so the skipped samples are never read or decoded;
* the random augmentation of the sample at position p of epoch e comes from a generator
  seeded by (seed, e, p) alone (:func:`sample_seed`), never from a worker's state, so it is
  the same whichever worker decodes it, on whichever rank, resumed or not.

Work split: a worker reads and decodes one file (:func:`datasets.decode.decode_rgb`), applies
the data set's recipe (:mod:`datasets.sample_transforms`) and stacks uint8 samples into a
batch; the main process moves the uint8 batch (pinned on CUDA) to the device, and there
applies the device loader's crop and flip plan when the recipe asks for it, then normalises.
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from common.errors import UserError
from datasets.augment import crop_and_flip, padding_for
from datasets.batch import Batch
from datasets.decode import UnreadableImage, decode_rgb
from datasets.loader_base import ShardedLoader
from datasets.sample_transforms import SampleTransform
from datasets.sharding import check_start_step, draw_epoch_plan, epoch_seed
from datasets.streaming import local_processes

SAMPLE_STREAM = 0x5A4D50  # tags the per-sample seeds, apart from the views' (seed, epoch, step, k) seeds
PREFETCH = 4  # batches each worker prepares ahead


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """The seed of the augmentation of the sample at ``position`` of ``epoch``'s order."""
    return epoch_seed(seed, epoch, SAMPLE_STREAM, position)


def default_workers() -> int:
    """Decoding processes per training process: this process's cores shared by the processes on the node."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // local_processes())


# (data-set index, epoch, position in the epoch's order); epoch/position None: no random augmentation
Key = tuple[int, int | None, int | None]


class _FileSamples(Dataset):
    """Decodes the file of one key into a uint8 sample; an unreadable file comes back as its error, not raised.

    Paths are held as one numpy bytes array: forked workers then share it without the
    reference-count writes that copy a Python list page by page into every worker.
    """

    def __init__(self, files: Sequence[str | os.PathLike], transform: SampleTransform, seed: int) -> None:
        self.files = np.array([os.fsencode(f) for f in files], dtype=np.bytes_)
        self.transform, self.seed = transform, seed

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: Key) -> torch.Tensor | UnreadableImage:
        index, epoch, position = key
        try:
            image = decode_rgb(os.fsdecode(self.files[index]))
        except UnreadableImage as e:
            return e  # raised in the main process, as one line (a worker's exception arrives as a traceback)
        return self.transform(image, None if position is None else sample_seed(self.seed, epoch, position))


def _stack(samples: list[torch.Tensor | UnreadableImage]) -> torch.Tensor | UnreadableImage:
    for sample in samples:
        if isinstance(sample, UnreadableImage):
            return sample
    return torch.stack(samples)


class _StepKeys:
    """The keys of each step from a start step on, made lazily (a list of a million keys costs memory)."""

    def __init__(self, spans: Sequence[tuple[int, int]], order: torch.Tensor | None, epoch: int | None,
                 seeded: bool) -> None:
        self.spans, self.order, self.epoch, self.seeded = spans, order, epoch, seeded

    def __len__(self) -> int:
        return len(self.spans)

    def __iter__(self) -> Iterator[list[Key]]:
        for start, size in self.spans:
            positions = range(start, start + size)
            indices = positions if self.order is None else self.order[start: start + size].tolist()
            yield [(int(i), self.epoch, p if self.seeded else None) for i, p in zip(indices, positions)]


class StreamLoader(ShardedLoader):
    """Iterates normalised, augmented :class:`Batch` es decoded from ``files`` (see the module docstring).

    ``files`` / ``labels``: one path and one class index per sample. ``transform``: the data
    set's recipe; with ``transform.device_crop`` the training batches get the device loader's
    padded crop and flip on the device (padding :func:`padding_for` the sample size).
    ``workers``: decoding processes (0: decode in this process; None: :func:`default_workers`).
    ``views`` (:mod:`datasets.views`) are made on the device from the batch's uint8 samples as the
    recipe left them (for the ImageNet recipe: already cropped and flipped).
    """

    def __init__(
        self,
        files: Sequence[str | os.PathLike],
        labels: torch.Tensor,
        batch_size: int,
        device: torch.device | str,
        *,
        train: bool,
        transform: SampleTransform,
        mean: Sequence[float],
        std: Sequence[float],
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        channels_last: bool = False,
        views: Sequence[str] = (),
        workers: int | None = None,
    ) -> None:
        if labels.shape != (len(files),):
            raise ValueError(f"{labels.shape[0] if labels.ndim else 0} labels for {len(files)} files")
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 0):
            raise UserError(f"dataset.workers must be an integer >= 0, got {workers!r}")
        super().__init__(len(files), labels, batch_size, device, train=train, seed=seed, rank=rank,
                         world_size=world_size, channels_last=channels_last, mean=mean, std=std, channels=3,
                         views=views)
        self.transform = transform
        self.workers = default_workers() if workers is None else workers
        self.pad = padding_for(*transform.output_size) if transform.device_crop else 0
        self.samples = _FileSamples(files, transform, seed)

    @property
    def dataset_size(self) -> int:
        return len(self.samples)

    def _batches(self, keys: _StepKeys) -> DataLoader:
        extra = dict(prefetch_factor=PREFETCH) if self.workers > 0 else {}
        # a generator of its own: each iterator draws its workers' base seed from it, never from the global RNG,
        # which the run's checkpoints restore (a resumed epoch makes one iterator fewer than the run it continues,
        # and a method drawing from the global RNG, CRD's negatives, then drew other numbers). Every random choice
        # of a sample comes from its own seeded generator (_FileSamples), so the base seed changes no batch.
        own = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.samples, batch_sampler=keys, collate_fn=_stack, num_workers=self.workers,
                          pin_memory=self.device.type == "cuda", generator=own, **extra)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        """The batches of ``epoch`` from ``start_step`` on; earlier steps are never decoded."""
        check_start_step(start_step, len(self))
        spans = self._spans[start_step:]
        if not self.train:
            for (start, size), raw in zip(spans, self._batches(_StepKeys(spans, None, None, False)), strict=True):
                idx = torch.arange(start, start + size, device=self.device)
                yield Batch(self._normalise(self._to_device(raw)), self.labels[idx], idx, {})
            return
        order, offsets, flips = draw_epoch_plan(self.seed, epoch, self.dataset_size, self.pad)
        keys = _StepKeys(spans, order, epoch, seeded=not self.transform.device_crop)
        for step, ((start, size), raw) in enumerate(zip(spans, self._batches(keys), strict=True), start=start_step):
            pos = slice(start, start + size)
            idx = order[pos].to(self.device)
            raw = self._to_device(raw)
            images = raw
            if self.transform.device_crop:
                images = crop_and_flip(raw, offsets[pos].to(self.device), flips[pos].to(self.device), self.pad)
            batch = Batch(self._normalise(images), self.labels[idx], idx, {})
            for k, (name, make_view) in enumerate(self.views.items(), start=1):
                gen = torch.Generator(device="cpu").manual_seed(epoch_seed(self.seed, epoch, step, k))
                batch.views[name] = self._normalise(make_view(raw, gen))
            yield batch

    def _to_device(self, raw: torch.Tensor | UnreadableImage) -> torch.Tensor:
        if isinstance(raw, UnreadableImage):  # the up-front check passed, so the file changed since
            raise UnreadableImage(raw.path, f"{raw.reason}; it was readable when the data set was loaded")
        return raw.to(self.device, non_blocking=True)
