"""Curriculum Temperature for Knowledge Distillation (Li et al., AAAI 2023)."""
from __future__ import annotations

import math

import torch
from torch import nn

from datasets.batch import Batch
from distiller import functional as F
from distiller.features import Features
from distiller.methods.base import METHODS, DistillMethod, TermContext


@METHODS.register("ctkd")
class CTKD(DistillMethod):
    """Curriculum Temperature for Knowledge Distillation (Li et al., AAAI 2023).

    A learnable scalar ``theta`` (initialised to 1, trained in the student's optimizer with its
    weight decay, as the authors do) sets the temperature of every logit term of a step,
    ``T = t_min + t_range * sigmoid(theta)``, through a gradient reversal whose strength
    lambda follows a cosine ramp over the first ``ramp_epochs`` epochs, fixed within an epoch.
    The student descends the KD loss while theta ascends it, so distillation gets harder.

    It adds no term of its own: the objective's KD term (``alpha``) and any method whose
    ``forward`` takes a ``temperature`` run at this T; the config's ``temperature`` is unused
    while it is active. ``always_active``: theta trains at ``beta = 0``. T and lambda are
    recorded each epoch. The instance-wise variant is not implemented.
    """

    always_active = True

    def __init__(self, lambda_min: float = 0.0, lambda_max: float = 1.0, ramp_epochs: int = 10,
                 t_min: float = 1.0, t_range: float = 20.0) -> None:
        super().__init__()
        if not t_min > 0 or t_range < 0:
            raise ValueError(f"t_min={t_min} must be > 0 and t_range={t_range} >= 0 "
                             "(T lies between t_min and t_min + t_range)")
        # checked here, not left to the first step: an infinite or NaN reversal strength makes theta's
        # gradient non-finite, and the run would stop blaming the learning rate
        if not (math.isfinite(lambda_min) and math.isfinite(lambda_max)):
            raise ValueError(f"distill.lambda_min={lambda_min} and distill.lambda_max={lambda_max} must be finite "
                             f"numbers (the paper ramps lambda from 0 to 1)")
        if lambda_min > lambda_max:
            raise ValueError(f"distill.lambda_min={lambda_min} must not exceed distill.lambda_max={lambda_max} "
                             f"(lambda ramps up from lambda_min to lambda_max)")
        self.lambda_min, self.lambda_max, self.ramp_epochs = float(lambda_min), float(lambda_max), int(ramp_epochs)
        self.t_min, self.t_range = float(t_min), float(t_range)
        self.theta = nn.Parameter(torch.tensor(1.0))
        self.lambda_ = F.ctkd_lambda(0, self.lambda_min, self.lambda_max, self.ramp_epochs)

    def on_epoch_start(self, epoch: int) -> None:
        self.lambda_ = F.ctkd_lambda(epoch, self.lambda_min, self.lambda_max, self.ramp_epochs)

    def temperature(self) -> torch.Tensor:
        return F.ctkd_temperature(self.theta, self.lambda_, self.t_min, self.t_range)

    def forward(self, student: Features[torch.Tensor], teacher: Features[torch.Tensor],
                batch: Batch, ctx: TermContext) -> dict[str, torch.Tensor]:
        return {}

    def scalars(self) -> dict[str, float]:
        with torch.no_grad():
            return {"temperature": float(self.temperature()), "lambda": self.lambda_}

    def extra_repr(self) -> str:
        return (f"lambda {self.lambda_min}->{self.lambda_max} over {self.ramp_epochs} epochs, "
                f"T in ({self.t_min}, {self.t_min + self.t_range})")
