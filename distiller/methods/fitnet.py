"""FitNets: Hints for Thin Deep Nets (Romero et al., ICLR 2015)."""
from __future__ import annotations

from typing import TypeVar

import torch

from common.errors import UserError
from datasets.batch import Batch
from distiller import functional as F
from distiller.features import STAGES, STEM, Features
from distiller.helpers import ConvRegressor
from distiller.methods.base import METHODS, BuildContext, DistillMethod, TermContext

T = TypeVar("T")


def _hint_index(hint_layer: int | str) -> int:
    """``hint_layer`` as an index into ``[stem, stage1, ..., stageL]``: 0 or "stem" is the stem,
    k or "stagek" is stage k (the published setting 2 is stage2, RepDistiller's ``feat[2]``)."""
    if isinstance(hint_layer, str):
        name = hint_layer.strip().lower()
        if name == STEM:
            return 0
        if name.startswith("stage") and name[5:].isdigit():
            return int(name[5:])
        if not name.isdigit():
            raise UserError(f"distill.hint_layer='{hint_layer}' is not a feature name; "
                            "use 0 / 'stem' or k / 'stagek' (e.g. distill.hint_layer=2)")
        hint_layer = int(name)
    if isinstance(hint_layer, bool) or not isinstance(hint_layer, int) or hint_layer < 0:
        raise UserError(f"distill.hint_layer={hint_layer!r} must be 0 (stem) or a stage number 1..L")
    return hint_layer


def _pick(features: Features[T], index: int) -> T:
    """Entry ``index`` of ``[stem, stage1, ..., stageL]``."""
    return features.stem if index == 0 else features.stages[index - 1]


@METHODS.register("fitnet", aliases=("hint",))
class FitNet(DistillMethod):
    """FitNets: Hints for Thin Deep Nets (Romero et al., ICLR 2015).

    The student's hint-layer map goes through a :class:`~distiller.helpers.ConvRegressor`
    (conv + BN + ReLU, sized from the probed shapes) and is regressed onto the teacher's
    map of the same layer with MSE. ``hint_layer``: 0 = stem, k = stage k (default 2).
    """

    student_features = frozenset({STEM, STAGES})
    teacher_features = frozenset({STEM, STAGES})

    def __init__(self, hint_layer: int | str = 2) -> None:
        super().__init__()
        self.hint_index = _hint_index(hint_layer)

    def build(self, student: Features[torch.Size], teacher: Features[torch.Size], ctx: BuildContext) -> None:
        n_s, n_t = len(student.stages), len(teacher.stages)
        if self.hint_index > min(n_s, n_t):
            raise UserError(f"distill.hint_layer={self.hint_index} does not exist in both networks: the student "
                            f"has {n_s} stages and the teacher {n_t}; use 0 (stem) .. {min(n_s, n_t)}")
        self.regressor = ConvRegressor(_pick(student, self.hint_index), _pick(teacher, self.hint_index))
        self.to(ctx.device)

    def forward(self, student: Features[torch.Tensor], teacher: Features[torch.Tensor],
                batch: Batch, ctx: TermContext) -> dict[str, torch.Tensor]:
        f_s = self.regressor(_pick(student, self.hint_index))
        return {"fitnet": F.hint(f_s, _pick(teacher, self.hint_index))}

    def extra_repr(self) -> str:
        return f"hint_layer={self.hint_index}"
