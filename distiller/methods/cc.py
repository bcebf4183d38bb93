"""Correlation Congruence for Knowledge Distillation (Peng et al., ICCV 2019)."""
from __future__ import annotations

import torch

from common.errors import UserError
from datasets.batch import Batch
from distiller import functional as F
from distiller.features import EMBEDDING, Features
from distiller.helpers import Embed, flat_dim
from distiller.methods.base import METHODS, BuildContext, DistillMethod, TermContext
from distiller.methods.key_types import Count, Positive

VARIANTS = ("benchmark", "gram", "rbf")


@METHODS.register("cc", aliases=("correlation",))
class CC(DistillMethod):
    """Correlation Congruence for Knowledge Distillation (Peng et al., ICCV 2019).

    Both embeddings go through their own trainable ``Linear(D, feat_dim)`` (no
    normalisation, as RepDistiller); ``variant`` picks the correlation:
    ``benchmark`` (:func:`~distiller.functional.correlation`, the form behind the
    published CRD-table numbers), ``gram`` (normalised Gram matrices) or ``rbf`` (the
    paper's Gaussian-RBF kernel, Taylor order ``rbf_order``, ``rbf_gamma``).
    """

    student_features = frozenset({EMBEDDING})
    teacher_features = frozenset({EMBEDDING})

    def __init__(self, feat_dim: Count = 128, variant: str = "benchmark", rbf_gamma: Positive = 0.4,
                 rbf_order: Count = 2) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise UserError(f"unknown CC variant '{variant}'; use distill.variant= one of {', '.join(VARIANTS)}")
        self.feat_dim = int(feat_dim)
        self.variant = variant
        self.rbf_gamma = rbf_gamma
        self.rbf_order = int(rbf_order)

    def build(self, student: Features[torch.Size], teacher: Features[torch.Size], ctx: BuildContext) -> None:
        self.embed_s = Embed(flat_dim(student.embedding), self.feat_dim, normalize=False)
        self.embed_t = Embed(flat_dim(teacher.embedding), self.feat_dim, normalize=False)
        self.to(ctx.device)

    def forward(self, student: Features[torch.Tensor], teacher: Features[torch.Tensor],
                batch: Batch, ctx: TermContext) -> dict[str, torch.Tensor]:
        e_s, e_t = self.embed_s(student.embedding), self.embed_t(teacher.embedding)
        if self.variant == "benchmark":
            loss = F.correlation(e_s, e_t)
        elif self.variant == "gram":
            loss = F.correlation_gram(e_s, e_t)
        else:
            loss = F.correlation_rbf(e_s, e_t, self.rbf_gamma, self.rbf_order)
        return {"cc": loss}

    def extra_repr(self) -> str:
        return f"feat_dim={self.feat_dim}, variant={self.variant}"
