"""Variational Information Distillation for Knowledge Transfer (Ahn et al., CVPR 2019)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as nnf
from torch import nn

from datasets.batch import Batch
from distiller import functional as F
from distiller.features import STAGES, Features
from distiller.helpers import log_stage_pairing, pair_stages
from distiller.methods.base import METHODS, BuildContext, DistillMethod, TermContext
from distiller.methods.key_types import Positive


def _conv1x1(c_in: int, c_out: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=1, bias=False)


class VIDRegressor(nn.Module):
    """Gaussian predictor of one teacher map from one student map: the mean comes from
    three 1x1 convs ``C_s -> C_t -> C_t -> C_t`` (ReLU between, no bias) and the
    per-channel variance from ``softplus(log_scale) + eps``, ``log_scale`` initialised so
    that the initial variance is ``init_pred_var`` (as the authors' code).
    """

    def __init__(self, c_s: int, c_t: int, init_pred_var: float = 5.0, eps: float = 1e-5) -> None:
        super().__init__()
        self.regressor = nn.Sequential(_conv1x1(c_s, c_t), nn.ReLU(), _conv1x1(c_t, c_t), nn.ReLU(),
                                       _conv1x1(c_t, c_t))
        self.log_scale = nn.Parameter(torch.full((c_t,), math.log(math.expm1(init_pred_var - eps))))
        self.eps = eps

    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        # Pool to match (the larger map to the smaller one's H x W) before regressing.
        size = (min(f_s.shape[-2], f_t.shape[-2]), min(f_s.shape[-1], f_t.shape[-1]))
        if tuple(f_s.shape[-2:]) != size:
            f_s = nnf.adaptive_avg_pool2d(f_s, size)
        if tuple(f_t.shape[-2:]) != size:
            f_t = nnf.adaptive_avg_pool2d(f_t, size)
        return F.vid(self.regressor(f_s), f_t, self.log_scale, self.eps)


@METHODS.register("vid")
class VID(DistillMethod):
    """Variational Information Distillation for Knowledge Transfer (Ahn et al., CVPR 2019).

    One :class:`VIDRegressor` per stage pair of :func:`~distiller.helpers.pair_stages`;
    the negative log-likelihoods are summed over the pairs.
    """

    student_features = frozenset({STAGES})
    teacher_features = frozenset({STAGES})

    def __init__(self, init_pred_var: Positive = 5.0, eps: Positive = 1e-5) -> None:
        super().__init__()
        self.init_pred_var = init_pred_var
        self.eps = eps

    def build(self, student: Features[torch.Size], teacher: Features[torch.Size], ctx: BuildContext) -> None:
        pairs = pair_stages(student.stages, teacher.stages, "vid")
        log_stage_pairing("vid", len(student.stages), len(teacher.stages))
        self.regressors = nn.ModuleList(VIDRegressor(int(s[1]), int(t[1]), self.init_pred_var, self.eps)
                                        for s, t in pairs)
        self.to(ctx.device)

    def forward(self, student: Features[torch.Tensor], teacher: Features[torch.Tensor],
                batch: Batch, ctx: TermContext) -> dict[str, torch.Tensor]:
        pairs = pair_stages(student.stages, teacher.stages, "vid")
        return {"vid": sum(reg(f_s, f_t) for reg, (f_s, f_t) in zip(self.regressors, pairs))}
