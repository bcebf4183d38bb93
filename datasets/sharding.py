"""The epoch order and the per-rank batch spans that every loader shares (the rules: :mod:`datasets.device_loader`).

Both loaders, the one holding the set on the device and the one decoding files per batch
(:mod:`datasets.stream_loader`), cut an epoch the same way, so a data set gives the same sample
order, the same shards and the same last-batch rule whichever of them serves it.
"""
from __future__ import annotations

import numpy as np
import torch

from common.errors import UserError


def epoch_seed(seed: int, epoch: int, *more: int) -> int:
    """A well-mixed 64-bit generator seed that depends on (seed, epoch, *more) only."""
    state = np.random.SeedSequence([seed % 2**64, epoch, *more]).generate_state(1, np.uint64)
    return int(state[0])


def draw_epoch_plan(seed: int, epoch: int, n: int, pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The epoch's permutation [n], crop offsets [n, 2] (row, col in 0..2*pad) and flips [n] (bool), on the CPU.

    Indexed by position in the epoch and drawn in this order from one generator seeded by
    (seed, epoch): the permutation does not depend on ``pad``, so a loader that augments
    otherwise uses the same order.
    """
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    gen = torch.Generator(device="cpu").manual_seed(epoch_seed(seed, epoch))
    order = torch.randperm(n, generator=gen)
    offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=gen)
    flips = torch.rand(n, generator=gen) < 0.5
    return order, offsets, flips


def train_spans(n: int, batch_size: int, rank: int, world_size: int) -> list[tuple[int, int]]:
    """(start, size) in epoch-order positions of rank ``rank``'s batch at each training step."""
    b, w = batch_size, world_size
    full, rest = divmod(n, b * w)
    spans = [(s * b * w + rank * b, b) for s in range(full)]
    if rest >= 2 * w:  # otherwise some rank would train on < 2 samples: drop it
        sizes = [rest // w + (k < rest % w) for k in range(w)]
        spans.append((full * b * w + sum(sizes[:rank]), sizes[rank]))
    if not spans:
        raise UserError(
            f"the training set has {n} samples: too few for one step on {w} process(es) "
            f"(each needs at least 2); use more data or fewer processes"
        )
    return spans


def eval_spans(n: int, batch_size: int, rank: int, world_size: int) -> list[tuple[int, int]]:
    """(start, size) in data-set positions: rank ``rank``'s contiguous shard, in batches."""
    sizes = [n // world_size + (k < n % world_size) for k in range(world_size)]
    start, stop = sum(sizes[:rank]), sum(sizes[: rank + 1])
    return [(lo, min(batch_size, stop - lo)) for lo in range(start, stop, batch_size)]


def check_start_step(start_step: int, steps: int) -> None:
    """A resume step must lie within the epoch; otherwise the batch size or the data changed."""
    if not 0 <= start_step <= steps:
        raise UserError(
            f"cannot resume at step {start_step} of an epoch with {steps} steps: "
            f"the batch size or data set changed since the checkpoint"
        )
