"""Streamlined Knowledge Distillation (SKD, CVPR 2026)."""
from __future__ import annotations

import torch

from datasets.batch import Batch
from distiller import functional as F
from distiller.features import Features
from distiller.gather import gather_batch
from distiller.methods.base import METHODS, DistillMethod, TermContext


@METHODS.register("skd")
class SKD(DistillMethod):
    """Streamlined Knowledge Distillation (CVPR 2026), as the authors' code computes it.

    One term, ``skd``: :func:`distiller.functional.skd`, ``frac_s * KD_T + frac_c * MD`` (KD at
    ``skd_temperature`` and the Gram-Mahalanobis term with Tikhonov factor ``tikhonov``), unweighted:
    the config's ``beta`` is the authors' KD weight and ``gamma`` their CE weight (0.9 / 0.1, and
    0.5 / 0.5 for resnet32x4 -> resnet8x4). No warm-up; labels only in CE.

    The B x B Gram matrices, their covariance and the median fractions couple the samples of a
    batch: under DDP both networks' logits are gathered over the ranks
    (:func:`distiller.gather.gather_batch`), so loss and gradient are those of one process with
    the global batch (a B x B Cholesky of the global batch on every rank).
    """

    def __init__(self, skd_temperature: float = 4.0, tikhonov: float = 0.1) -> None:
        super().__init__()
        if not skd_temperature > 0 or not tikhonov > 0:
            raise ValueError(f"skd_temperature={skd_temperature} and tikhonov={tikhonov} must be > 0")
        self.skd_temperature, self.tikhonov = float(skd_temperature), float(tikhonov)

    def forward(self, student: Features[torch.Tensor], teacher: Features[torch.Tensor], batch: Batch,
                ctx: TermContext) -> dict[str, torch.Tensor]:
        z_s, z_t = gather_batch(student.logits), gather_batch(teacher.logits)
        return {"skd": F.skd(z_s, z_t, temperature=self.skd_temperature, tikhonov=self.tikhonov)}

    def extra_repr(self) -> str:
        return f"T={self.skd_temperature}, tikhonov={self.tikhonov}"
