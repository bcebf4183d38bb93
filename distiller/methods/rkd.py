"""Relational Knowledge Distillation (Park et al., CVPR 2019)."""
from __future__ import annotations

import torch

from datasets.batch import Batch
from distiller import functional as F
from distiller.features import EMBEDDING, Features
from distiller.methods.base import METHODS, DistillMethod, TermContext
from distiller.methods.key_types import NonNegative


@METHODS.register("rkd")
class RKD(DistillMethod):
    """Relational Knowledge Distillation (Park et al., CVPR 2019).

    Distance- and angle-wise relations among the batch's embeddings (the pooled
    vectors entering the classifiers), weighted ``distance_weight`` and ``angle_weight``.
    """

    student_features = frozenset({EMBEDDING})
    teacher_features = frozenset({EMBEDDING})

    def __init__(self, distance_weight: NonNegative = 25.0, angle_weight: NonNegative = 50.0) -> None:
        super().__init__()
        self.distance_weight = distance_weight
        self.angle_weight = angle_weight

    def forward(self, student: Features[torch.Tensor], teacher: Features[torch.Tensor],
                batch: Batch, ctx: TermContext) -> dict[str, torch.Tensor]:
        return {"rkd": F.rkd(student.embedding, teacher.embedding, self.distance_weight, self.angle_weight)}

    def extra_repr(self) -> str:
        return f"distance_weight={self.distance_weight}, angle_weight={self.angle_weight}"
