"""EA-KD: Entropy-based Adaptive Knowledge Distillation (Su et al., ICCV 2025), on KD and on DKD."""
from __future__ import annotations

import torch

from datasets.batch import Batch
from distiller import functional as F
from distiller.features import Features
from distiller.methods.base import METHODS, DistillMethod, TermContext
from distiller.methods.key_types import NonNegative


def _check(temperature: float, entropy_temperature: float, h_ub: float | None) -> None:
    if not temperature > 0 or not entropy_temperature > 0:
        raise ValueError(f"ea_temperature={temperature} and entropy_temperature={entropy_temperature} must be > 0")
    if h_ub is not None and not h_ub > 0:
        raise ValueError(f"h_ub={h_ub} must be > 0 (null: log C, the largest entropy; the CIFAR code used 100)")


@METHODS.register("eakd")
class EAKD(DistillMethod):
    """EA-KD on KD (Su et al., ICCV 2025; arXiv 2311.13621): each sample's KD loss weighted by
    ``w_i = H_t,i (1 + H_s,i / h_ub) / 2`` (entropies at ``entropy_temperature`` of the raw logits, no gradient).

    One term, ``eakd``: :func:`distiller.functional.eakd_kd` at ``ea_temperature``, unweighted (the
    config's ``beta`` is KD's 0.9, ``gamma`` its 0.1; no warm-up). ``h_ub``: the released CIFAR code
    divides by 100 (= C, not log C), which the config keeps; null means ``log C`` (the paper's bound).
    """

    def __init__(self, ea_temperature: float = 4.0, entropy_temperature: float = 3.0,
                 h_ub: float | None = 100.0) -> None:
        super().__init__()
        _check(ea_temperature, entropy_temperature, h_ub)
        self.ea_temperature, self.entropy_temperature = float(ea_temperature), float(entropy_temperature)
        self.h_ub = None if h_ub is None else float(h_ub)

    def forward(self, student: Features[torch.Tensor], teacher: Features[torch.Tensor], batch: Batch,
                ctx: TermContext) -> dict[str, torch.Tensor]:
        return {"eakd": F.eakd_kd(student.logits, teacher.logits, temperature=self.ea_temperature,
                                  entropy_temperature=self.entropy_temperature, h_ub=self.h_ub)}

    def extra_repr(self) -> str:
        return f"T={self.ea_temperature}, t={self.entropy_temperature}, h_ub={self.h_ub or 'log C'}"


@METHODS.register("eakd_dkd")
class EADKD(DistillMethod):
    """EA-KD on DKD (Su et al., ICCV 2025): DKD's per-sample ``T^2 (tckd_weight TCKD + nckd_weight NCKD)``
    weighted by the EA weight ``w_i`` before the batch mean.

    One term, ``eakd_dkd``: :func:`distiller.functional.eakd_dkd`, already weighted (the config's
    ``beta`` is 1, CE 1, DKD's 20-epoch warm-up as ``warmup_epochs``). ``h_ub`` as :class:`EAKD`'s.
    Needs ``batch.labels``.
    """

    weights_own_terms = True

    def __init__(self, tckd_weight: NonNegative = 1.0, nckd_weight: NonNegative = 8.0, ea_temperature: float = 4.0,
                 entropy_temperature: float = 3.0, h_ub: float | None = 100.0) -> None:
        super().__init__()
        _check(ea_temperature, entropy_temperature, h_ub)
        self.tckd_weight, self.nckd_weight = float(tckd_weight), float(nckd_weight)
        self.ea_temperature, self.entropy_temperature = float(ea_temperature), float(entropy_temperature)
        self.h_ub = None if h_ub is None else float(h_ub)

    def forward(self, student: Features[torch.Tensor], teacher: Features[torch.Tensor], batch: Batch,
                ctx: TermContext) -> dict[str, torch.Tensor]:
        return {"eakd_dkd": F.eakd_dkd(student.logits, teacher.logits, batch.labels, alpha=self.tckd_weight,
                                       beta=self.nckd_weight, temperature=self.ea_temperature,
                                       entropy_temperature=self.entropy_temperature, h_ub=self.h_ub)}

    def extra_repr(self) -> str:
        return (f"tckd={self.tckd_weight}, nckd={self.nckd_weight}, T={self.ea_temperature}, "
                f"t={self.entropy_temperature}, h_ub={self.h_ub or 'log C'}")
