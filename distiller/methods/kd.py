"""Distilling the Knowledge in a Neural Network (Hinton, Vinyals and Dean, 2015)."""
from __future__ import annotations

import torch

from datasets.batch import Batch
from distiller import functional as F
from distiller.features import Features
from distiller.methods.base import METHODS, DistillMethod, TermContext


@METHODS.register("kd")
class KD(DistillMethod):
    """Distilling the Knowledge in a Neural Network (Hinton et al., NIPS workshop 2015).

    The term ``kd``: :func:`distiller.functional.kd` of the two networks' logits at the step's
    temperature (``distill.temperature``, or the one a method supplies, CTKD's). The objective
    holds one KD of its own for its ``alpha`` term, so KD combines with every method; the config
    ``distill=kd`` is that term alone (``gamma 0.1, alpha 0.9``, this method's ``beta`` 0).
    """

    logit_terms = True
    reads_temperature = True

    def forward(self, student: Features[torch.Tensor], teacher: Features[torch.Tensor], batch: Batch,
                ctx: TermContext) -> dict[str, torch.Tensor]:
        return {"kd": F.kd(student.logits, teacher.logits, ctx.temperature)}
