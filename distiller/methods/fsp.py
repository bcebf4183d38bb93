"""FSP (Yim et al., "A Gift from Knowledge Distillation: Fast Optimization, Network Minimization
and Transfer Learning", CVPR 2017).

The "flow of solution procedure" between consecutive feature maps, an inner-product
(Gram) matrix over their channels, is matched between student and teacher. As in the
RepDistiller benchmark it is an initialisation phase (default 30 epochs) that trains the
student's feature layers; the main phase is cross-entropy only (``beta: 0``).
FSP matrices compare channel by channel, so student and teacher must have equal channel
counts at every tapped position; ``build`` refuses other pairs before any training.
"""
from __future__ import annotations

import torch

from common.errors import UserError
from datasets.batch import Batch
from distiller import functional as F
from distiller.features import STAGES, STEM, Features, feature_extractor_parameters
from distiller.methods.base import METHODS, BuildContext, DistillMethod, InitPhase, TermContext, init_phase
from distiller.methods.key_types import Epochs, Positive


def _levels(features: Features) -> list:
    """``[stem, stage1, ..., stageL]`` (``feats[:-1]`` of METHODS.md) with their names."""
    return [features.stem, *features.stages]


def _level_names(features: Features) -> list[str]:
    return ["stem", *(f"stage{i + 1}" for i in range(len(features.stages)))]


@METHODS.register("fsp")
class FSP(DistillMethod):
    """FSP (Yim et al., CVPR 2017): match Gram matrices between consecutive maps, stem to last stage.

    With different numbers of levels the last ``min`` of ``[stem, stages]`` are paired (the
    deepest levels); every paired position must have the same channel count.
    """

    student_features = frozenset({STEM, STAGES})
    teacher_features = frozenset({STEM, STAGES})

    def __init__(self, init_epochs: Epochs = 30, init_lr: Positive | None = None) -> None:
        super().__init__()
        self.init_epochs = int(init_epochs)
        self.init_lr = init_lr
        self.num_levels = 0

    def build(self, student: Features[torch.Size], teacher: Features[torch.Size], ctx: BuildContext) -> None:
        s_levels, t_levels = _levels(student), _levels(teacher)
        n = min(len(s_levels), len(t_levels))
        if n < 2:
            raise UserError("fsp needs at least two feature maps (stem and one stage) from both networks")
        s_names, t_names = _level_names(student)[-n:], _level_names(teacher)[-n:]
        mismatched = [f"student {sn} has {s[1]} channels, teacher {tn} has {t[1]}"
                      for sn, tn, s, t in zip(s_names, t_names, s_levels[-n:], t_levels[-n:]) if s[1] != t[1]]
        if mismatched:
            raise UserError("fsp needs equal channel counts at every tapped position, but "
                            + "; ".join(mismatched)
                            + ". Choose a same-width pair (e.g. resnet32x4->resnet8x4, vgg13->vgg8) or another method")
        self.num_levels = n

    def fsp_loss(self, student: Features[torch.Tensor], teacher: Features[torch.Tensor]) -> torch.Tensor:
        n = self.num_levels
        return F.fsp(_levels(student)[-n:], _levels(teacher)[-n:])

    def forward(self, student: Features[torch.Tensor], teacher: Features[torch.Tensor],
                batch: Batch, ctx: TermContext) -> dict[str, torch.Tensor]:
        return {"fsp": self.fsp_loss(student, teacher)}

    def phases(self) -> list[InitPhase]:
        return init_phase(
            self.init_epochs, self.init_lr,
            parameters=feature_extractor_parameters,  # the stem and the stages, not the head
            loss=lambda s, t, batch: {"fsp": self.fsp_loss(s, t)},
        )
