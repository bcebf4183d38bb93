"""Wasserstein Distance Rivals Kullback-Leibler Divergence for KD (Lv et al., NeurIPS 2024): the feature part, WKD-F."""
from __future__ import annotations

import torch

from common.errors import UserError
from datasets.batch import Batch
from distiller import functional as F
from distiller.features import STAGES, Features
from distiller.helpers import ConvRegressor
from distiller.methods.base import METHODS, BuildContext, DistillMethod, TermContext
from distiller.methods.key_types import Count, Epochs, NonNegative
from distiller.methods.wkd_l import cosine_decay


@METHODS.register("wkd_f")
class WKDFeature(DistillMethod):
    """WKD-F (Lv et al., NeurIPS 2024): 2-Wasserstein distance between per-(channel, cell) Gaussians of the
    last-stage maps.

    The student's last stage map goes through a :class:`~distiller.helpers.ConvRegressor` (conv, BN,
    ReLU: mdistiller's ``ConvReg``, sized from the probed shapes) to the teacher's shape. One term,
    ``wkd_f``: :func:`distiller.functional.wkd_feature` with ``mean_cov_ratio`` and ``spatial_grid``,
    unweighted: the config's ``beta`` is the authors' weight w0 (per pair), and :meth:`weight_factor`
    decays it by a cosine from ``cosine_decay_epoch`` to 0 at the last epoch. CE 1, no logit term.
    """

    student_features = frozenset({STAGES})
    teacher_features = frozenset({STAGES})

    def __init__(self, mean_cov_ratio: NonNegative = 4.0, spatial_grid: Count = 1,
                 cosine_decay_epoch: Epochs = 150) -> None:
        super().__init__()
        self.mean_cov_ratio, self.spatial_grid = float(mean_cov_ratio), int(spatial_grid)
        self.cosine_decay_epoch, self.epochs = int(cosine_decay_epoch), 240

    def build(self, student: Features[torch.Size], teacher: Features[torch.Size], ctx: BuildContext) -> None:
        if not student.stages or not teacher.stages:
            raise UserError("wkd_f needs stage features from both networks; check their feature_info")
        t_shape = teacher.stages[-1]
        g, (h, w) = self.spatial_grid, (int(t_shape[-2]), int(t_shape[-1]))
        side = lambda n: min(-(-(i + 1) * n // g) - i * n // g for i in range(g))  # the smallest cell's side
        if h < g or w < g or side(h) * side(w) < 2:
            fix = ("lower distill.spatial_grid" if g > 1 and h * w >= 2 else
                   "no grid fits: give the teacher larger maps (a CIFAR stem, teacher.cifar_stem=true, or larger "
                   "images) or choose another method")
            raise UserError(f"wkd_f: the teacher's last map is {h}x{w}, too small for a {g}x{g} grid (every cell needs "
                            f"2 pixels for its variance); {fix}")
        self.regressor = ConvRegressor(student.stages[-1], t_shape)
        self.epochs = ctx.epochs
        self.to(ctx.device)

    def weight_factor(self, epoch: int) -> float:
        return cosine_decay(epoch, self.cosine_decay_epoch, self.epochs)

    def forward(self, student: Features[torch.Tensor], teacher: Features[torch.Tensor], batch: Batch,
                ctx: TermContext) -> dict[str, torch.Tensor]:
        f_s = self.regressor(student.stages[-1])
        return {"wkd_f": F.wkd_feature(f_s, teacher.stages[-1], mean_cov_ratio=self.mean_cov_ratio,
                                       grid=self.spatial_grid)}

    def extra_repr(self) -> str:
        return (f"mean_cov_ratio={self.mean_cov_ratio}, grid={self.spatial_grid}, "
                f"decay after epoch {self.cosine_decay_epoch}")
