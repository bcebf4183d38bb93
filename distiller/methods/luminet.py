"""LumiNet: Perception-Driven Knowledge Distillation via Statistical Logit Calibration (Hossain et al., TMLR 2025)."""
from __future__ import annotations

import torch

from datasets.batch import Batch
from distiller import functional as F
from distiller.features import Features
from distiller.gather import gather_batch
from distiller.methods.base import METHODS, DistillMethod, TermContext
from distiller.methods.key_types import NonNegative


@METHODS.register("luminet")
class LumiNet(DistillMethod):
    """LumiNet (Hossain et al., arXiv 2310.03669, TMLR 2025), as the authors released it.

    One term, ``luminet``: ``luminet_alpha ** 2 * luminet(z_s, z_t, luminet_temperature)``
    (:func:`distiller.functional.luminet`: each class standardised over the batch, then KL at T, no
    ``T^2``), already weighted (the config's ``beta`` is 1; the 20-epoch warm-up is the generic
    ``warmup_epochs``; the CE weight is the config's ``gamma``, 2 or 1 per pair). Labels are not used.

    The per-class statistics couple the samples of a batch: under DDP both networks' logits are
    gathered over the ranks (:func:`distiller.gather.gather_batch`), so loss and gradient are those
    of one process with the global batch. The last, smaller batch of an epoch changes the statistics,
    as in the authors' code.
    """

    weights_own_terms = True

    def __init__(self, luminet_alpha: NonNegative = 31.0, luminet_temperature: float = 4.0) -> None:
        super().__init__()
        if not luminet_temperature > 0:
            raise ValueError(f"luminet_temperature={luminet_temperature} must be > 0")
        self.luminet_alpha = float(luminet_alpha)
        self.luminet_temperature = float(luminet_temperature)

    def forward(self, student: Features[torch.Tensor], teacher: Features[torch.Tensor], batch: Batch,
                ctx: TermContext) -> dict[str, torch.Tensor]:
        z_s, z_t = gather_batch(student.logits), gather_batch(teacher.logits)
        return {"luminet": self.luminet_alpha ** 2 * F.luminet(z_s, z_t, temperature=self.luminet_temperature)}

    def extra_repr(self) -> str:
        return f"alpha={self.luminet_alpha} (weight {self.luminet_alpha ** 2:g}), T={self.luminet_temperature}"
