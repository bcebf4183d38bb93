"""Knowledge Distillation with Refined Logits (Sun et al., ICCV 2025)."""
from __future__ import annotations

import torch

from datasets.batch import Batch
from distiller import functional as F
from distiller.features import Features
from distiller.methods.base import METHODS, DistillMethod, TermContext
from distiller.methods.key_types import NonNegative


@METHODS.register("rld")
class RLD(DistillMethod):
    """Knowledge Distillation with Refined Logits (Sun et al., arXiv 2408.07703, ICCV 2025).

    One term, ``rld``: :func:`distiller.functional.rld`, ``rld_alpha * SCD + rld_beta * MCD``
    (already weighted, as DKD's terms: the config's ``beta`` is 1 and the 20-epoch linear warm-up is
    the generic ``warmup_epochs``). SCD runs at ``scd_temperature`` (None: ``rld_temperature``, the
    README's ``--same-t``; the bare authors' config would be 1.0), MCD at ``rld_temperature``. Needs
    ``batch.labels``; the teacher's logits carry no gradient. With ``distill.logit_standardize`` the
    objective hands it standardised logits (RLD+LS): the argmax and the mask do not change under it.
    """

    logit_terms = True
    weights_own_terms = True

    def __init__(self, rld_alpha: NonNegative = 1.0, rld_beta: NonNegative = 8.0, rld_temperature: float = 4.0,
                 scd_temperature: float | None = None) -> None:
        super().__init__()
        if not rld_temperature > 0 or (scd_temperature is not None and not scd_temperature > 0):
            raise ValueError(f"rld_temperature={rld_temperature} and scd_temperature={scd_temperature} must be > 0 "
                             "(scd_temperature null: the same as rld_temperature)")
        self.rld_alpha, self.rld_beta = float(rld_alpha), float(rld_beta)
        self.rld_temperature = float(rld_temperature)
        self.scd_temperature = None if scd_temperature is None else float(scd_temperature)

    def forward(self, student: Features[torch.Tensor], teacher: Features[torch.Tensor], batch: Batch,
                ctx: TermContext) -> dict[str, torch.Tensor]:
        return {"rld": F.rld(student.logits, teacher.logits, batch.labels, alpha=self.rld_alpha, beta=self.rld_beta,
                             temperature=self.rld_temperature, alpha_temperature=self.scd_temperature)}

    def extra_repr(self) -> str:
        return (f"alpha={self.rld_alpha}, beta={self.rld_beta}, T={self.rld_temperature}, "
                f"T_a={self.scd_temperature or self.rld_temperature}")
