"""The unit of data the training loop consumes."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Batch:
    """Images (normalised float, on the device), labels, dataset indices, and side data.

    ``extras`` carries method-specific side data without the loop knowing its meaning;
    ``views`` the extra augmented views the methods asked for (normalised, like ``images``).
    ``offsets`` [B, 2] (crop row, col in ``0..2*pad``) and ``flips`` [B] (bool) say which augmentation
    of each sample ``images`` holds (None for eval batches, which are not augmented): with ``indices``
    they name the exact input, e.g. a row of the teacher-output cache (:mod:`distiller.engine.teacher_cache`).
    """

    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor
    extras: dict[str, Any] = field(default_factory=dict)
    views: dict[str, torch.Tensor] = field(default_factory=dict)
    offsets: torch.Tensor | None = None
    flips: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.labels.shape[0]
