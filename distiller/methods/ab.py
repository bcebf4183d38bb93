"""Activation Boundaries (Heo et al., "Knowledge Transfer via Distillation of Activation Boundaries
Formed by Hidden Neurons", AAAI 2019).

The student learns where the teacher's neurons switch on: a hinge-like loss on the
pre-activation stage outputs pushes each student response beyond ``+margin`` where the
teacher's is positive and below ``-margin`` where it is not. As in the RepDistiller
benchmark this runs as an initialisation phase (default 30 epochs) that trains only the
connectors and the student's feature layers; the main phase is cross-entropy only
(``beta: 0``), though a positive ``beta`` keeps the same term in the main phase.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from datasets.batch import Batch
from distiller import functional as F
from distiller.features import STAGES_PREACT, Features, feature_extractor_parameters
from distiller.helpers import Resize, log_stage_pairing, pair_stages
from distiller.methods.base import METHODS, BuildContext, DistillMethod, InitPhase, TermContext, init_phase
from distiller.methods.key_types import Epochs, NonNegative, Positive


class BoundaryConnector(nn.Module):
    """Maps a student pre-activation map onto the teacher's shape; no ReLU, the AB loss needs signs.

    Conv + BN to the teacher's channels, the kernel following the spatial ratio as in
    RepDistiller's ``ConvReg(use_relu=False)``: 1x1 when sizes agree, 3x3 stride 2 when the
    student map is twice as large, a 4x4 stride-2 transposed conv when it is half as large,
    a valid ``(1+dH)x(1+dW)`` conv when it is otherwise larger. For a student map smaller by
    another factor (where ConvReg fails) it is resized to the teacher's size first, then 1x1.
    """

    def __init__(self, s_shape: Sequence[int], t_shape: Sequence[int]) -> None:
        super().__init__()
        _, s_c, s_h, s_w = (int(d) for d in s_shape)
        _, t_c, t_h, t_w = (int(d) for d in t_shape)
        self.resize: nn.Module = nn.Identity()
        if (s_h, s_w) == (2 * t_h, 2 * t_w):
            conv: nn.Module = nn.Conv2d(s_c, t_c, kernel_size=3, stride=2, padding=1)
        elif (2 * s_h, 2 * s_w) == (t_h, t_w):
            conv = nn.ConvTranspose2d(s_c, t_c, kernel_size=4, stride=2, padding=1)
        elif s_h >= t_h and s_w >= t_w:
            conv = nn.Conv2d(s_c, t_c, kernel_size=(1 + s_h - t_h, 1 + s_w - t_w))
        else:
            self.resize = Resize((t_h, t_w))
            conv = nn.Conv2d(s_c, t_c, kernel_size=1)
        self.conv = conv
        self.bn = nn.BatchNorm2d(t_c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(self.resize(x)))


@METHODS.register("ab", aliases=("abound",))
class ActivationBoundaries(DistillMethod):
    """Activation Boundaries (Heo et al., AAAI 2019): hinge loss on the signs of pre-activations.

    Stages are paired from the deepest up: when the networks have different numbers of
    stages the last ``min(L_s, L_t)`` of each are used. Stage ``i`` of ``n`` is weighted
    ``2^(i-n+1)`` and the sum is divided by the batch size and scaled by 3/1000 (RepDistiller).
    """

    student_features = frozenset({STAGES_PREACT})
    teacher_features = frozenset({STAGES_PREACT})

    def __init__(self, margin: NonNegative = 1.0, init_epochs: Epochs = 30, init_lr: Positive | None = None) -> None:
        super().__init__()
        self.margin = float(margin)
        self.init_epochs = int(init_epochs)
        self.init_lr = init_lr
        self.connectors = nn.ModuleList()

    def build(self, student: Features[torch.Size], teacher: Features[torch.Size], ctx: BuildContext) -> None:
        log_stage_pairing("ab", len(student.stages), len(teacher.stages))
        for s_shape, t_shape in pair_stages(student.stages, teacher.stages, "ab"):
            if tuple(s_shape[1:]) == tuple(t_shape[1:]):
                self.connectors.append(nn.Identity())  # shapes agree: compare the maps directly
            else:
                self.connectors.append(BoundaryConnector(s_shape, t_shape))
        self.to(ctx.device)

    def ab_loss(self, s_stages: Sequence[torch.Tensor], t_stages: Sequence[torch.Tensor]) -> torch.Tensor:
        """The weighted AB loss over the paired stages (the published scale)."""
        n = len(self.connectors)
        total = s_stages[0].new_zeros((), dtype=torch.float32)
        for i, (connector, (f_s, f_t)) in enumerate(zip(self.connectors, pair_stages(s_stages, t_stages, "ab"))):
            total = total + 2.0 ** (i - n + 1) * F.ab(connector(f_s), f_t, self.margin)
        return total / s_stages[0].shape[0] / 1000 * 3

    def forward(self, student: Features[torch.Tensor], teacher: Features[torch.Tensor],
                batch: Batch, ctx: TermContext) -> dict[str, torch.Tensor]:
        return {"ab": self.ab_loss(student.stages, teacher.stages)}

    def phases(self) -> list[InitPhase]:
        return init_phase(
            self.init_epochs, self.init_lr,
            # the connectors and the student's feature layers; the classifier stays as initialised
            parameters=lambda student: [*self.connectors.parameters(), *feature_extractor_parameters(student)],
            loss=lambda s, t, batch: {"ab": self.ab_loss(s.stages, t.stages)},
        )
