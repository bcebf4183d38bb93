"""Batched crop-and-flip of uint8 images on their device: the standard CIFAR training augmentation."""
from __future__ import annotations

import torch
import torch.nn.functional as F

PAD = 4  # RandomCrop(32, padding=4): zero padding in raw pixel space, offsets 0..2*PAD


def crop_and_flip(images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Random crop (zero padding PAD) then horizontal flip of a uint8 batch, as one gather.

    Output pixel (i, j) of image k is padded pixel (oy + i, ox + j), or (oy + i, ox + W-1-j)
    when flipped: the mirror of the crop, as RandomCrop followed by RandomHorizontalFlip.
    """
    b, c, h, w = images.shape
    padded = F.pad(images, (PAD, PAD, PAD, PAD))  # zeros = black in raw pixel space
    pw = w + 2 * PAD
    rows = offsets[:, 0, None] + torch.arange(h, device=images.device)  # [B, H]
    cols_fwd = torch.arange(w, device=images.device)
    cols = offsets[:, 1, None] + torch.where(flips[:, None], (w - 1) - cols_fwd, cols_fwd)  # [B, W]
    flat = (rows[:, :, None] * pw + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
    return torch.gather(padded.view(b, c, -1), 2, flat).view(b, c, h, w)
