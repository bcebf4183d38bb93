"""Like What You Like: Knowledge Distill via Neuron Selectivity Transfer (Huang and Wang, 2017)."""
from __future__ import annotations

import torch

from datasets.batch import Batch
from distiller import functional as F
from distiller.features import STAGES, Features
from distiller.helpers import log_stage_pairing, pair_stages
from distiller.methods.base import METHODS, BuildContext, DistillMethod, TermContext


@METHODS.register("nst")
class NST(DistillMethod):
    """Like What You Like: Knowledge Distill via Neuron Selectivity Transfer (Huang & Wang, arXiv 2017).

    Sums the polynomial-kernel MMD of :func:`distiller.functional.nst` over the stage
    pairs of :func:`~distiller.helpers.pair_stages`.
    """

    student_features = frozenset({STAGES})
    teacher_features = frozenset({STAGES})

    def build(self, student: Features[torch.Size], teacher: Features[torch.Size], ctx: BuildContext) -> None:
        pair_stages(student.stages, teacher.stages, "nst")
        log_stage_pairing("nst", len(student.stages), len(teacher.stages))

    def forward(self, student: Features[torch.Tensor], teacher: Features[torch.Tensor],
                batch: Batch, ctx: TermContext) -> dict[str, torch.Tensor]:
        pairs = pair_stages(student.stages, teacher.stages, "nst")
        return {"nst": sum(F.nst(f_s, f_t) for f_s, f_t in pairs)}
