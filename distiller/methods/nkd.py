"""Normalized KD (Yang et al., ICCV 2023)."""
from __future__ import annotations

import torch

from datasets.batch import Batch
from distiller import functional as F
from distiller.features import Features
from distiller.methods.base import METHODS, DistillMethod, TermContext
from distiller.methods.key_types import NonNegative, Positive


@METHODS.register("nkd")
class NKD(DistillMethod):
    """From Knowledge Distillation to Self-Knowledge Distillation: A Unified Approach with
    Normalized Loss and Customized Soft Labels (Yang et al., ICCV 2023).

    One term, :func:`distiller.functional.nkd`: the teacher's target probability weights the
    student's target log-probability, and the softmaxes over the non-target classes (label
    column removed) are matched at ``nkd_temperature`` with weight ``nontarget_weight``
    (the paper's gamma). Needs ``batch.labels``.
    """

    # a logit term: with distill.logit_standardize the objective hands it standardised logits
    logit_terms = True

    def __init__(self, nkd_temperature: Positive = 1.0, nontarget_weight: NonNegative = 1.5) -> None:
        super().__init__()
        if not nkd_temperature > 0:
            raise ValueError(f"nkd_temperature={nkd_temperature} must be > 0")
        self.nkd_temperature = float(nkd_temperature)
        self.nontarget_weight = float(nontarget_weight)

    def forward(self, student: Features[torch.Tensor], teacher: Features[torch.Tensor],
                batch: Batch, ctx: TermContext) -> dict[str, torch.Tensor]:
        return {"nkd": F.nkd(student.logits, teacher.logits, batch.labels, temperature=self.nkd_temperature,
                             gamma=self.nontarget_weight)}

    def extra_repr(self) -> str:
        return f"nkd_temperature={self.nkd_temperature}, nontarget_weight={self.nontarget_weight}"
