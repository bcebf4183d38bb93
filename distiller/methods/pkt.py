"""Learning Deep Representations with Probabilistic Knowledge Transfer (Passalis and Tefas, ECCV 2018)."""
from __future__ import annotations

import torch

from datasets.batch import Batch
from distiller import functional as F
from distiller.features import EMBEDDING, Features
from distiller.methods.base import METHODS, DistillMethod, TermContext
from distiller.methods.key_types import Positive


@METHODS.register("pkt")
class PKT(DistillMethod):
    """Learning Deep Representations with Probabilistic Knowledge Transfer (Passalis & Tefas, ECCV 2018).

    Matches the cosine-similarity distributions among the batch's embeddings.
    """

    student_features = frozenset({EMBEDDING})
    teacher_features = frozenset({EMBEDDING})

    def __init__(self, eps: Positive = 1e-7) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, student: Features[torch.Tensor], teacher: Features[torch.Tensor],
                batch: Batch, ctx: TermContext) -> dict[str, torch.Tensor]:
        return {"pkt": F.pkt(student.embedding, teacher.embedding, self.eps)}
