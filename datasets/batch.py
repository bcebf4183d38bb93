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
    """

    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor
    extras: dict[str, Any] = field(default_factory=dict)
    views: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.labels.shape[0]
