"""Similarity-Preserving Knowledge Distillation (Tung and Mori, ICCV 2019)."""
from __future__ import annotations

import torch

from datasets.batch import Batch
from distiller import functional as F
from distiller.features import STAGES, Features
from distiller.methods.base import METHODS, DistillMethod, TermContext


@METHODS.register("sp", aliases=("similarity",))
class SP(DistillMethod):
    """Similarity-Preserving Knowledge Distillation (Tung & Mori, ICCV 2019).

    Matches the row-normalised batch Gram matrices of the last stage (RepDistiller's
    ``feat[-2]``); channel counts and sizes of the two maps may differ.
    """

    student_features = frozenset({STAGES})
    teacher_features = frozenset({STAGES})

    def forward(self, student: Features[torch.Tensor], teacher: Features[torch.Tensor],
                batch: Batch, ctx: TermContext) -> dict[str, torch.Tensor]:
        return {"sp": F.similarity(student.stages[-1], teacher.stages[-1])}
