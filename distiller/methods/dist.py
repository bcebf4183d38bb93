"""DIST: Knowledge Distillation from A Stronger Teacher (Huang et al., NeurIPS 2022)."""
from __future__ import annotations

import torch

from datasets.batch import Batch
from distiller import functional as F
from distiller.features import Features
from distiller.gather import gather_batch
from distiller.methods.base import METHODS, DistillMethod, TermContext
from distiller.methods.key_types import NonNegative, Positive


@METHODS.register("dist")
class DIST(DistillMethod):
    """Knowledge Distillation from A Stronger Teacher (Huang et al., NeurIPS 2022).

    One term, :func:`distiller.functional.dist`: Pearson correlations of the softmaxes at
    ``dist_temperature``, across classes (``inter_weight``, the paper's beta) and across the
    batch (``intra_weight``, its gamma), times ``tau^2`` as in the authors' code. The intra
    term correlates the samples of one batch: under DDP both networks' logits are gathered over
    the ranks (:func:`distiller.gather.gather_batch`), so loss and gradient are those of one
    process with the global batch.
    """

    # a logit term: with distill.logit_standardize the objective hands it standardised logits
    logit_terms = True

    def __init__(self, inter_weight: NonNegative = 1.0, intra_weight: NonNegative = 1.0,
                 dist_temperature: Positive = 4.0) -> None:
        super().__init__()
        self.inter_weight = float(inter_weight)
        self.intra_weight = float(intra_weight)
        self.dist_temperature = float(dist_temperature)

    def forward(self, student: Features[torch.Tensor], teacher: Features[torch.Tensor],
                batch: Batch, ctx: TermContext) -> dict[str, torch.Tensor]:
        z_s, z_t = gather_batch(student.logits), gather_batch(teacher.logits)
        return {"dist": F.dist(z_s, z_t, beta=self.inter_weight, gamma=self.intra_weight,
                               temperature=self.dist_temperature)}

    def extra_repr(self) -> str:
        return f"inter_weight={self.inter_weight}, intra_weight={self.intra_weight}, tau={self.dist_temperature}"
