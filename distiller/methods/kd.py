"""Distilling the Knowledge in a Neural Network (Hinton, Vinyals and Dean, 2015)."""
from __future__ import annotations

import torch

from datasets.batch import Batch
from distiller.features import Features
from distiller.methods.base import METHODS, DistillMethod


@METHODS.register("kd")
class KD(DistillMethod):
    """Distilling the Knowledge in a Neural Network (Hinton et al., NIPS workshop 2015).

    Plain KD adds no term of its own: the objective computes ``alpha * kd(z_s, z_t, T)``
    for every method, so KD is the config ``gamma 0.1, alpha 0.9, beta 0`` with this
    empty method. It taps no features (logits are always available).
    """


    def forward(self, student: Features[torch.Tensor], teacher: Features[torch.Tensor],
                batch: Batch) -> dict[str, torch.Tensor]:
        return {}
