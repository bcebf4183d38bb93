"""Multi-Level Logit Distillation (Jin et al., CVPR 2023)."""
from __future__ import annotations

import torch
import torch.nn.functional as nnf

from datasets.batch import Batch
from distiller import functional as F
from distiller.features import Features
from distiller.gather import gather_batch
from distiller.methods.base import METHODS, DistillMethod, TermContext

STRONG = "strong"  # datasets.randaugment: crop + flip, RandAugment (2 ops), Cutout, made on the device


@METHODS.register("mlkd")
class MLKD(DistillMethod):
    """Multi-Level Logit Distillation (Jin et al., CVPR 2023), as the authors released it.

    Each batch has a second, strongly augmented view (``views``: the loader adds it, both
    networks run on it as a separate batch). The method returns two terms, already weighted
    (the config's ``beta`` is 1, as DKD's):

    * ``mlkd``: ``kd_weight * mlkd(z_s^w, z_t^w, z_s^s, z_t^s, mlkd_temperature)``, the pinned
      :func:`distiller.functional.mlkd` (KD at five temperatures on both views, class- and
      batch-level terms, confidence masks from the teacher's weak view);
    * ``ce_strong``: ``strong_ce_weight * CE(z_s^s, y)``, the second view's cross-entropy. The
      first view's is the objective's ``gamma * CE``.

    Under ``distill.logit_standardize=true`` (MLKD+LS) the objective hands it raw logits and the
    switch (``standardizes_itself``): only the KD terms standardise, the class and
    batch levels, the masks and the cross-entropy keep the raw logits, as the LS authors' code.

    The batch- and class-level terms and the masks couple the samples of a batch: under DDP the
    logits are gathered over the ranks (:func:`distiller.gather.gather_batch`), so the loss and
    its gradient are those of one process with the global batch. With an optimizer that splits
    task and distillation gradients (DOT) both terms count as distillation. A temperature supplied
    by another method (CTKD's learned T) is not taken: MLKD keeps its own list (T0, 3, 5, 2, 6).
    """

    views = (STRONG,)
    logit_terms = True
    standardizes_itself = True
    weights_own_terms = True

    def __init__(self, kd_weight: float = 0.9, strong_ce_weight: float = 0.1, mlkd_temperature: float = 4.0) -> None:
        super().__init__()
        if not mlkd_temperature > 0:
            raise ValueError(f"mlkd_temperature={mlkd_temperature} must be > 0")
        if kd_weight < 0 or strong_ce_weight < 0:
            raise ValueError(f"kd_weight={kd_weight} and strong_ce_weight={strong_ce_weight} must be >= 0")
        self.kd_weight = float(kd_weight)
        self.strong_ce_weight = float(strong_ce_weight)
        self.mlkd_temperature = float(mlkd_temperature)

    def forward(self, student: Features[torch.Tensor], teacher: Features[torch.Tensor], batch: Batch,
                ctx: TermContext) -> dict[str, torch.Tensor]:
        s_strong, t_strong = student.views[STRONG].logits, teacher.views[STRONG].logits
        logits = [gather_batch(z) for z in (student.logits, teacher.logits, s_strong, t_strong)]
        term = F.mlkd(*logits, temperature=self.mlkd_temperature, standardize=ctx.standardize)
        ce = nnf.cross_entropy(s_strong.float(), batch.labels)
        return {"mlkd": self.kd_weight * term, "ce_strong": self.strong_ce_weight * ce}

    def extra_repr(self) -> str:
        return (f"kd_weight={self.kd_weight}, strong_ce_weight={self.strong_ce_weight}, "
                f"T0={self.mlkd_temperature}, view={STRONG}")
