"""Scale Decoupled Distillation (Wei et al., CVPR 2024): SD-KD, SD-DKD and SD-NKD."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from datasets.batch import Batch
from distiller import functional as F
from distiller.features import CLASSIFIER, POOL_INPUT, Features
from distiller.methods.base import METHODS, BuildContext, DistillMethod, TermContext, check_classifier_on_map
from distiller.methods.key_types import NonNegative


class _ScaleDecoupled(DistillMethod):
    """What the three SDD losses share: both networks' region logits [B, C, N].

    Each network's own classifier (weight and bias, :data:`distiller.features.CLASSIFIER`) is applied
    to the cells of its pre-pool map (:data:`distiller.features.POOL_INPUT`) pooled to each of
    ``sdd_scales`` (:func:`distiller.functional.sdd_region_logits`; region 0 is the global one, the
    model's own logits). The student's classifier receives gradient through every region; the
    teacher's runs without. No helper, no parameter of its own.
    """

    student_features = frozenset({POOL_INPUT, CLASSIFIER})
    teacher_features = frozenset({POOL_INPUT, CLASSIFIER})

    def __init__(self, sdd_scales: Sequence[int] = (1, 2, 4), sdd_temperature: float = 4.0) -> None:
        super().__init__()
        scales = tuple(int(s) for s in sdd_scales)
        if not scales or scales[0] != 1 or not set(scales) <= {1, 2, 4} or list(scales) != sorted(set(scales)):
            raise ValueError(f"sdd_scales={list(sdd_scales)} must be ascending, distinct, drawn from [1, 2, 4] and "
                             "start with 1 (region 0 is the global one), e.g. [1, 2] or [1, 2, 4]")
        if not sdd_temperature > 0:
            raise ValueError(f"sdd_temperature={sdd_temperature} must be > 0")
        self.sdd_scales, self.sdd_temperature = scales, float(sdd_temperature)

    def build(self, student: Features[torch.Size], teacher: Features[torch.Size], ctx: BuildContext) -> None:
        for role, f in (("student", student), ("teacher", teacher)):
            check_classifier_on_map(type(self).__name__, role, f)

    def regions(self, student: Features[torch.Tensor],
                teacher: Features[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Region logits [B, C, N] of the student and of the teacher."""
        return (F.sdd_region_logits(student.pool_input, *student.classifier, scales=self.sdd_scales),
                F.sdd_region_logits(teacher.pool_input, *teacher.classifier, scales=self.sdd_scales))

    def extra_repr(self) -> str:
        return f"scales={list(self.sdd_scales)}, T={self.sdd_temperature}"


@METHODS.register("sdd_kd")
class SDDKD(_ScaleDecoupled):
    """SD-KD (Wei et al., CVPR 2024): KD on every (sample, region) pair, complementary regions weighted 2.

    One term, ``sdd_kd``: :func:`distiller.functional.sdd_kd`, unweighted (the config's ``beta`` is
    KD's 0.9 and ``gamma`` 0.1; no warm-up). Needs ``batch.labels`` (the region weights).
    """

    def forward(self, student: Features[torch.Tensor], teacher: Features[torch.Tensor], batch: Batch,
                ctx: TermContext) -> dict[str, torch.Tensor]:
        r_s, r_t = self.regions(student, teacher)
        return {"sdd_kd": F.sdd_kd(r_s, r_t, batch.labels, temperature=self.sdd_temperature)}


@METHODS.register("sdd_dkd")
class SDDDKD(_ScaleDecoupled):
    """SD-DKD (Wei et al., CVPR 2024): DKD's per-sample terms on every (sample, region) pair.

    One term, ``sdd_dkd``: :func:`distiller.functional.sdd_dkd` with ``tckd_weight`` and ``nckd_weight``
    (8, or 6 / 2 per pair), already weighted (the config's ``beta`` is 1, CE 1, 20-epoch warm-up).
    """

    weights_own_terms = True

    def __init__(self, tckd_weight: NonNegative = 1.0, nckd_weight: NonNegative = 8.0,
                 sdd_scales: Sequence[int] = (1, 2, 4), sdd_temperature: float = 4.0) -> None:
        super().__init__(sdd_scales, sdd_temperature)
        self.tckd_weight, self.nckd_weight = float(tckd_weight), float(nckd_weight)

    def forward(self, student: Features[torch.Tensor], teacher: Features[torch.Tensor], batch: Batch,
                ctx: TermContext) -> dict[str, torch.Tensor]:
        r_s, r_t = self.regions(student, teacher)
        return {"sdd_dkd": F.sdd_dkd(r_s, r_t, batch.labels, alpha=self.tckd_weight, beta=self.nckd_weight,
                                     temperature=self.sdd_temperature)}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, tckd={self.tckd_weight}, nckd={self.nckd_weight}"


@METHODS.register("sdd_nkd")
class SDDNKD(_ScaleDecoupled):
    """SD-NKD as released (Wei et al., CVPR 2024): NKD's target term plus ``nontarget_weight * T^2`` times the
    cross-entropy of the softmaxes over all classes (the authors' mask keeps the label column), per region.

    One term, ``sdd_nkd``: :func:`distiller.functional.sdd_nkd`, already weighted (the config's ``beta``
    is 1, CE 1, 20-epoch warm-up; ``nontarget_weight`` is the authors' ``DKD.BETA``, 8 or 6 / 2 per pair).
    """

    weights_own_terms = True

    def __init__(self, nontarget_weight: NonNegative = 8.0, sdd_scales: Sequence[int] = (1, 2, 4),
                 sdd_temperature: float = 4.0) -> None:
        super().__init__(sdd_scales, sdd_temperature)
        self.nontarget_weight = float(nontarget_weight)

    def forward(self, student: Features[torch.Tensor], teacher: Features[torch.Tensor], batch: Batch,
                ctx: TermContext) -> dict[str, torch.Tensor]:
        r_s, r_t = self.regions(student, teacher)
        return {"sdd_nkd": F.sdd_nkd(r_s, r_t, batch.labels, temperature=self.sdd_temperature,
                                     gamma=self.nontarget_weight)}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, nontarget_weight={self.nontarget_weight}"
