"""Decoupled Knowledge Distillation (Zhao et al., CVPR 2022)."""
from __future__ import annotations

import torch

from datasets.batch import Batch
from distiller import functional as F
from distiller.features import Features
from distiller.methods.base import METHODS, DistillMethod, TermContext
from distiller.methods.key_types import NonNegative, Positive


@METHODS.register("dkd")
class DKD(DistillMethod):
    """Decoupled Knowledge Distillation (Zhao et al., CVPR 2022).

    Returns the two parts of :func:`distiller.functional.dkd` as separate terms,
    ``tckd`` (already times ``tckd_weight``) and ``nckd`` (times ``nckd_weight``),
    so both are logged; their sum is DKD's loss. ``dkd_temperature`` is DKD's own
    temperature (its config defaults it to the KD ``temperature`` key, 4). The paper's
    linear warm-up over 20 epochs is the config's generic ``warmup_epochs``, which the
    objective applies to ``beta``. A temperature supplied by another method (CTKD's learned T)
    replaces ``dkd_temperature``; with ``logit_standardize`` it sees standardised logits. Needs
    ``batch.labels``.
    """

    logit_terms = True
    takes_temperature = True
    weights_own_terms = True

    def __init__(self, tckd_weight: NonNegative = 1.0, nckd_weight: NonNegative = 8.0,
                 dkd_temperature: Positive = 4.0) -> None:
        super().__init__()
        self.tckd_weight = tckd_weight
        self.nckd_weight = nckd_weight
        self.dkd_temperature = float(dkd_temperature)

    def forward(self, student: Features[torch.Tensor], teacher: Features[torch.Tensor], batch: Batch,
                ctx: TermContext) -> dict[str, torch.Tensor]:
        z_s, z_t, y = student.logits, teacher.logits, batch.labels
        supplied = ctx.supplied_temperature
        t = self.dkd_temperature if supplied is None else supplied
        return {
            "tckd": F.dkd(z_s, z_t, y, alpha=self.tckd_weight, beta=0.0, temperature=t),
            "nckd": F.dkd(z_s, z_t, y, alpha=0.0, beta=self.nckd_weight, temperature=t),
        }

    def extra_repr(self) -> str:
        return f"tckd_weight={self.tckd_weight}, nckd_weight={self.nckd_weight}, dkd_temperature={self.dkd_temperature}"
