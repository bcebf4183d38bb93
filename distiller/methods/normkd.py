"""NormKD: Normalized Logits for Knowledge Distillation (Chi et al., 2023), on KD and on DKD."""
from __future__ import annotations

import torch

from datasets.batch import Batch
from distiller import functional as F
from distiller.features import Features
from distiller.methods.base import METHODS, DistillMethod, TermContext
from distiller.methods.key_types import NonNegative


def _check(t_norm: float) -> float:
    if not t_norm > 0:
        raise ValueError(f"t_norm={t_norm} must be > 0 (each sample's temperature is t_norm times its logits' std)")
    return float(t_norm)


@METHODS.register("normkd")
class NormKD(DistillMethod):
    """NormKD (Chi et al., arXiv 2308.00520): KD with a per-sample temperature ``t_norm * std(z_i)``
    for each network, and the teacher's per-sample ``T^2`` as the compensation.

    One term, ``normkd``: :func:`distiller.functional.normkd`, unweighted (the config's ``beta`` is
    0.9, ``gamma`` 0.1; no warm-up). The student's std is not detached. Labels only in CE.
    """

    def __init__(self, t_norm: float = 2.0) -> None:
        super().__init__()
        self.t_norm = _check(t_norm)

    def forward(self, student: Features[torch.Tensor], teacher: Features[torch.Tensor], batch: Batch,
                ctx: TermContext) -> dict[str, torch.Tensor]:
        return {"normkd": F.normkd(student.logits, teacher.logits, t_norm=self.t_norm)}

    def extra_repr(self) -> str:
        return f"t_norm={self.t_norm}"


@METHODS.register("normkd_dkd")
class NormKDDKD(DistillMethod):
    """NormKD+DKD (Chi et al., 2023): DKD's TCKD and NCKD at NormKD's per-sample temperatures.

    One term, ``normkd_dkd``: :func:`distiller.functional.normkd_dkd` with ``tckd_weight`` and
    ``nckd_weight`` (per pair), already weighted (the config's ``beta`` is 1, CE 1, the 20-epoch
    warm-up as ``warmup_epochs``). Needs ``batch.labels``.
    """

    weights_own_terms = True

    def __init__(self, tckd_weight: NonNegative = 1.0, nckd_weight: NonNegative = 8.0, t_norm: float = 2.0) -> None:
        super().__init__()
        self.tckd_weight, self.nckd_weight = float(tckd_weight), float(nckd_weight)
        self.t_norm = _check(t_norm)

    def forward(self, student: Features[torch.Tensor], teacher: Features[torch.Tensor], batch: Batch,
                ctx: TermContext) -> dict[str, torch.Tensor]:
        return {"normkd_dkd": F.normkd_dkd(student.logits, teacher.logits, batch.labels, alpha=self.tckd_weight,
                                           beta=self.nckd_weight, t_norm=self.t_norm)}

    def extra_repr(self) -> str:
        return f"tckd={self.tckd_weight}, nckd={self.nckd_weight}, t_norm={self.t_norm}"
