"""How one decoded image file becomes one sample of a streamed batch: the data set's recipe.

A recipe runs in a loader worker on uint8 [3, H, W] tensors (torchvision's tensor ops) and
returns uint8 [3, S, S]; normalisation happens on the device, after the 4x smaller uint8
batch has been moved there. Its randomness comes only from the seed it is given, derived
from (seed, epoch, position in the epoch) by the loader, so a sample is the same whichever
worker, rank or resumed run computes it.

* :class:`InceptionCrop`, the ImageNet recipe (torchvision's reference and mdistiller's):
  train RandomResizedCrop(S, scale 0.08-1, ratio 3/4-4/3) + horizontal flip; eval
  Resize(R) (shorter side) + CenterCrop(S); bilinear with antialiasing.
* :class:`FixedSize`, the image folder's: every image resized to one size with PIL's
  bilinear resize (or kept at its own); the training augmentation is then the device
  loader's padded crop and flip, applied to the batch on the device, so a streamed folder
  gives the batches an in-memory one does.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class InceptionCrop:
    """RandomResizedCrop(size) + flip for training; Resize(resize) + CenterCrop(size) for evaluation."""

    size: int = 224
    resize: int = 256
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    device_crop = False  # the sample is already augmented; the loader only normalises

    @property
    def output_size(self) -> tuple[int, int]:
        return self.size, self.size

    def __call__(self, image: torch.Tensor, seed: int | None) -> torch.Tensor:
        """``seed`` None: the evaluation transform; otherwise the training one, drawn from ``seed`` alone."""
        import torchvision.transforms.v2.functional as F
        from torchvision.transforms import InterpolationMode, RandomResizedCrop

        if seed is None:
            image = F.resize(image, [self.resize], InterpolationMode.BILINEAR, antialias=True)
            return F.center_crop(image, [self.size, self.size])
        # torchvision's own parameter draw, from a private seed: the global RNG is left as it was
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            top, left, height, width = RandomResizedCrop.get_params(image, list(self.scale), list(self.ratio))
            flip = bool(torch.rand(1) < 0.5)
        image = F.resized_crop(image, top, left, height, width, [self.size, self.size],
                               InterpolationMode.BILINEAR, antialias=True)
        return F.horizontal_flip(image) if flip else image


@dataclass(frozen=True)
class FixedSize:
    """Every image at ``size`` (height, width), bilinear with antialiasing; ``None`` keeps each at its own size."""

    size: tuple[int, int] | None = None
    native: tuple[int, int] | None = None  # the images' shared size when ``size`` is None
    device_crop = True  # training crops and flips on the device, with the device loader's plan

    @property
    def output_size(self) -> tuple[int, int]:
        shape = self.size or self.native
        if shape is None:
            raise ValueError("FixedSize needs size or the images' native size")
        return int(shape[0]), int(shape[1])

    def __call__(self, image: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        if self.size is None or tuple(image.shape[-2:]) == tuple(self.size):
            return image
        from PIL import Image

        # PIL's antialiased bilinear resize, as the in-memory image folder has always resized
        height, width = self.size
        resized = Image.fromarray(image.permute(1, 2, 0).numpy()).resize((width, height), Image.Resampling.BILINEAR)
        return torch.from_numpy(np.array(resized, dtype=np.uint8)).permute(2, 0, 1).contiguous()


SampleTransform = InceptionCrop | FixedSize
