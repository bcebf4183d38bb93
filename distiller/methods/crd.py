"""Contrastive Representation Distillation (Tian, Krishnan and Isola, ICLR 2020)."""
from __future__ import annotations

import torch

from common.errors import UserError
from datasets.batch import Batch
from distiller import functional as F
from distiller.contrast import MODES, ContrastMemory, ContrastSampler
from distiller.features import EMBEDDING, Features
from distiller.helpers import Embed, flat_dim
from distiller.methods.base import METHODS, BuildContext, DistillMethod, TermContext
from distiller.methods.key_types import Count

# Optional side data: a data pipeline that samples its own contrast indices [B, 1 + K]
# (column 0 the positive) may pass them under this key; otherwise they are drawn here, on the device.
CONTRAST_IDX_KEY = "crd_contrast_idx"


@METHODS.register("crd")
class CRD(DistillMethod):
    """Contrastive Representation Distillation (Tian et al., ICLR 2020).

    Student and teacher embeddings go through ``Linear(D, feat_dim)`` + L2
    normalisation; each is scored against ``1 + nce_k`` rows (the positive, then
    negatives drawn per ``mode``, see :mod:`distiller.contrast`) of the *other*
    network's memory bank with ``exp(<., .> / nce_t) / Z``; the term is the NCE loss of
    both sides. In training mode, after the scores are taken, both banks are
    momentum-updated (``nce_m``) at the batch's data-set indices ``batch.indices``.
    Banks and Z are buffers, so they are saved in and restored from checkpoints.
    """

    student_features = frozenset({EMBEDDING})
    teacher_features = frozenset({EMBEDDING})

    def __init__(self, feat_dim: Count = 128, nce_k: int = 16384, nce_t: float = 0.07, nce_m: float = 0.5,
                 mode: str = "exact") -> None:
        super().__init__()
        if mode not in MODES:
            raise UserError(f"unknown CRD mode '{mode}'; use distill.mode= one of {', '.join(MODES)}")
        if not 0.0 <= float(nce_m) < 1.0:
            raise UserError(f"distill.nce_m={nce_m} must be in [0, 1) (the memory momentum, published 0.5)")
        if float(nce_t) <= 0:
            raise UserError(f"distill.nce_t={nce_t} must be > 0 (the NCE temperature, published 0.07)")
        self.feat_dim = int(feat_dim)
        self.nce_k = int(nce_k)
        self.nce_t = float(nce_t)
        self.nce_m = float(nce_m)
        self.mode = mode

    def build(self, student: Features[torch.Size], teacher: Features[torch.Size], ctx: BuildContext) -> None:
        labels = ctx.train_labels.reshape(-1)
        if labels.numel() != ctx.num_samples:
            raise UserError(f"CRD needs one training label per sample: got {labels.numel()} labels for "
                            f"{ctx.num_samples} samples; check the data set")
        self.num_samples = int(ctx.num_samples)
        self.embed_s = Embed(flat_dim(student.embedding), self.feat_dim, normalize=True)
        self.embed_t = Embed(flat_dim(teacher.embedding), self.feat_dim, normalize=True)
        self.sampler = ContrastSampler(labels, self.nce_k, self.mode)
        self.memory = ContrastMemory(self.num_samples, self.feat_dim, self.nce_t, self.nce_m)
        self.to(ctx.device)

    def forward(self, student: Features[torch.Tensor], teacher: Features[torch.Tensor],
                batch: Batch, ctx: TermContext) -> dict[str, torch.Tensor]:
        v_s = self.embed_s(student.embedding)
        v_t = self.embed_t(teacher.embedding)
        idx = batch.indices.reshape(-1).to(v_s.device).long()
        contrast_idx = batch.extras.get(CONTRAST_IDX_KEY)
        if contrast_idx is None:
            contrast_idx = self.sampler(idx)
        out_s, out_t = self.memory(v_s, v_t, contrast_idx)
        loss = F.crd_nce(out_s, self.num_samples) + F.crd_nce(out_t, self.num_samples)
        if self.training:
            self.memory.update(idx, v_s, v_t)
        return {"crd": loss}

    def extra_repr(self) -> str:
        return (f"feat_dim={self.feat_dim}, nce_k={self.nce_k}, nce_t={self.nce_t}, nce_m={self.nce_m}, "
                f"mode={self.mode}")
