"""Batched crop-and-flip of uint8 images on their device: the standard CIFAR training augmentation.

The zero padding scales with the image: ``min(H, W) // 8`` pixels, i.e. RandomCrop(32, padding=4)
at 32 x 32 (the CIFAR recipe) and padding 8 at 64 x 64, so a crop moves the same fraction of
the image at any resolution.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

PAD = 4  # the padding at 32 x 32 (RandomCrop(32, padding=4)); see padding_for for other sizes


def padding_for(height: int, width: int) -> int:
    """The zero padding of the random crop for images of this size: an eighth of the shorter side."""
    return min(height, width) // 8


def crop_and_flip(images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor,
                  pad: int | None = None) -> torch.Tensor:
    """Random crop (zero padding ``pad``, default :func:`padding_for` the size) then horizontal flip, as one gather.

    ``offsets`` [B, 2] are (row, col) in ``0..2*pad``. Output pixel (i, j) of image k is padded
    pixel (oy + i, ox + j), or (oy + i, ox + W-1-j) when flipped: the mirror of the crop, as
    RandomCrop followed by RandomHorizontalFlip.
    """
    b, c, h, w = images.shape
    if pad is None:
        pad = padding_for(h, w)
    padded = F.pad(images, (pad, pad, pad, pad))  # zeros = black in raw pixel space
    pw = w + 2 * pad
    rows = offsets[:, 0, None] + torch.arange(h, device=images.device)  # [B, H]
    cols_fwd = torch.arange(w, device=images.device)
    cols = offsets[:, 1, None] + torch.where(flips[:, None], (w - 1) - cols_fwd, cols_fwd)  # [B, W]
    flat = (rows[:, :, None] * pw + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
    return torch.gather(padded.view(b, c, -1), 2, flat).view(b, c, h, w)
