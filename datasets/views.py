"""Extra augmented views of a training batch, made on the device from the same uint8 images.

A method that reads a second view of each batch (MLKD's strongly augmented one) names it in
``DistillMethod.views``; the loader then adds ``batch.views[name]``: the batch's images
augmented again, independently, and normalised like the main view. A view is a function
``(uint8 images [B, C, H, W], generator) -> uint8 images``; its randomness comes only from
the CPU ``generator`` it is given, seeded by (seed, epoch, step, view), so any step of any
epoch is rebuilt exactly on resume and every rank draws the same parameters.
"""
from __future__ import annotations

from typing import Callable

import torch

from common.registry import Registry
from datasets.augment import PAD, crop_and_flip

View = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
VIEWS: Registry[View] = Registry("view")


@VIEWS.register("standard")
def standard_view(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Another RandomCrop(32, padding 4) + horizontal flip, independent of the main view's."""
    b = images.shape[0]
    offsets = torch.randint(0, 2 * PAD + 1, (b, 2), generator=gen).to(images.device)
    flips = (torch.rand(b, generator=gen) < 0.5).to(images.device)
    return crop_and_flip(images, offsets, flips)
