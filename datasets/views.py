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
from datasets.augment import crop_and_flip, padding_for

View = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
VIEWS: Registry[View] = Registry("view")


@VIEWS.register("standard")
def standard_view(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Another random crop (padding 1/8 of the side: 4 at 32 x 32) + horizontal flip, independent of the main one."""
    b, _, h, w = images.shape
    pad = padding_for(h, w)
    offsets = torch.randint(0, 2 * pad + 1, (b, 2), generator=gen).to(images.device)
    flips = (torch.rand(b, generator=gen) < 0.5).to(images.device)
    return crop_and_flip(images, offsets, flips, pad)
