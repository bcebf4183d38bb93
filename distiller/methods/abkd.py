"""ABKD: Proper Allocation of the Probability Mass in KD via alpha-beta-Divergence (Wang et al., ICML 2025)."""
from __future__ import annotations

import math

import torch

from datasets.batch import Batch
from distiller import functional as F
from distiller.features import Features
from distiller.methods.base import METHODS, DistillMethod, TermContext


@METHODS.register("abkd")
class ABKD(DistillMethod):
    """ABKD (Wang et al., ICML 2025): the alpha-beta divergence between the softmaxes at ``abkd_temperature``.

    One term, ``abkd``: :func:`distiller.functional.abkd` with ``ab_alpha``, ``ab_beta`` (no ``T^2``
    factor), unweighted: the config's ``beta`` is the authors' ``-b`` weight. No warm-up; labels
    only in CE. With ``distill.logit_standardize=true`` it is the authors' ABLSD: the objective
    hands it logits standardised per sample and the term gains the ``T^2`` factor of their ``ls.py``
    (``T**2 * abkd(Z(z_s), Z(z_t))``; at ``ab_alpha=1, ab_beta=0`` exactly KD+LS).
    """

    logit_terms = True

    def __init__(self, ab_alpha: float = 0.5, ab_beta: float = 0.5, abkd_temperature: float = 4.0) -> None:
        super().__init__()
        if not abkd_temperature > 0 or not (math.isfinite(ab_alpha) and math.isfinite(ab_beta)):
            raise ValueError(f"abkd_temperature={abkd_temperature} must be > 0 and ab_alpha={ab_alpha}, "
                             f"ab_beta={ab_beta} finite")
        self.ab_alpha, self.ab_beta = float(ab_alpha), float(ab_beta)
        self.abkd_temperature = float(abkd_temperature)

    def forward(self, student: Features[torch.Tensor], teacher: Features[torch.Tensor], batch: Batch,
                ctx: TermContext) -> dict[str, torch.Tensor]:
        t = self.abkd_temperature
        term = F.abkd(student.logits, teacher.logits, alpha=self.ab_alpha, beta=self.ab_beta, temperature=t)
        return {"abkd": t ** 2 * term if ctx.standardize else term}

    def extra_repr(self) -> str:
        return f"alpha={self.ab_alpha}, beta={self.ab_beta}, T={self.abkd_temperature}"
