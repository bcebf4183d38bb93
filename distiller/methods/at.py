"""Paying More Attention to Attention (Zagoruyko and Komodakis, ICLR 2017)."""
from __future__ import annotations

import torch

from datasets.batch import Batch
from distiller import functional as F
from distiller.features import STAGES, Features
from distiller.helpers import log_stage_pairing, pair_stages
from distiller.methods.base import METHODS, BuildContext, DistillMethod, TermContext
from distiller.methods.key_types import Positive


@METHODS.register("at", aliases=("attention",))
class AT(DistillMethod):
    """Paying More Attention to Attention: Attention Transfer (Zagoruyko & Komodakis, ICLR 2017).

    Sums :func:`distiller.functional.attention` (spatial attention maps ``mean_c f^p``,
    L2-normalised) over the stage pairs of :func:`~distiller.helpers.pair_stages`
    (all stages when the counts match, else the last ``min(L_s, L_t)`` of each).
    """

    student_features = frozenset({STAGES})
    teacher_features = frozenset({STAGES})

    def __init__(self, p: Positive = 2.0) -> None:
        super().__init__()
        self.p = p

    def build(self, student: Features[torch.Size], teacher: Features[torch.Size], ctx: BuildContext) -> None:
        pair_stages(student.stages, teacher.stages, "at")
        log_stage_pairing("at", len(student.stages), len(teacher.stages))

    def forward(self, student: Features[torch.Tensor], teacher: Features[torch.Tensor],
                batch: Batch, ctx: TermContext) -> dict[str, torch.Tensor]:
        pairs = pair_stages(student.stages, teacher.stages, "at")
        return {"at": sum(F.attention(f_s, f_t, self.p) for f_s, f_t in pairs)}

    def extra_repr(self) -> str:
        return f"p={self.p}"
