"""KD-SVD (Lee et al., "Self-supervised Knowledge Distillation Using Singular Value Decomposition",
ECCV 2018).

Each stage map, reshaped to [B, H*W, C], is compressed to its leading right singular
vectors (over channels): ``k`` for the teacher, ``k + 3`` for the student, whose vectors
are then matched and sign-aligned to the teacher's. The knowledge transferred is the RBF
correlation between the vectors of consecutive stages, so student and teacher must have
the same channel count at every paired stage.
"""
from __future__ import annotations

import torch
import torch.nn.functional as TF

from common.errors import UserError
from datasets.batch import Batch
from distiller.features import STAGES, Features
from distiller.helpers import log_stage_pairing
from distiller.methods.base import METHODS, BuildContext, DistillMethod, TermContext


def _finite(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def leading_singular_vectors(feat: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` right singular vectors [B, C, n] (each L2-normalised) of ``feat`` viewed as
    [B, H*W, C], and the first ``n`` singular values [B, n] normalised to unit L2 norm."""
    b, c = feat.shape[:2]
    x = feat.reshape(b, c, -1).transpose(1, 2).float()
    if x.requires_grad:
        # Repeated singular values (e.g. all-zero positions after a ReLU) make the SVD backward
        # divide by zero; drop those non-finite gradient entries as the forward drops non-finite values.
        x.register_hook(_finite)
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    v = _finite(vh.transpose(1, 2))[:, :, :n]
    s = _finite(s)[:, :n]
    return TF.normalize(v, dim=1), TF.normalize(s, dim=1)


def align_to(v_s: torch.Tensor, v_t: torch.Tensor) -> torch.Tensor:
    """For each teacher vector, the student vector with the largest |cosine|, with the sign that makes it positive.

    ``v_s`` [B, C, m], ``v_t`` [B, C, k] -> [B, C, k]. Singular vectors are only defined up to
    sign and order; this picks the student's counterpart of each teacher vector.
    """
    cosine = v_s.transpose(1, 2) @ v_t  # [B, m, k]
    best = cosine.abs().amax(dim=1, keepdim=True)
    select = torch.where(cosine.abs() == best, torch.sign(cosine), torch.zeros_like(cosine))
    return v_s @ select


def rbf_correlation(v: torch.Tensor, v_prev: torch.Tensor) -> torch.Tensor:
    """``exp(-(a - b)^2 / 8)`` between every entry of two consecutive stages' vectors: [B, C_i, C_{i-1}, k]."""
    return torch.exp(-(v.unsqueeze(2) - v_prev.unsqueeze(1)).pow(2) / 8)


def kdsvd_loss(s_stages: list[torch.Tensor], t_stages: list[torch.Tensor], k: int = 1) -> torch.Tensor:
    """Sum over consecutive stage pairs of the squared RBF-correlation difference, divided by the batch size."""
    total = s_stages[0].new_zeros((), dtype=torch.float32)
    prev_s = prev_t = None
    for f_s, f_t in zip(s_stages, t_stages):
        v_t, s_t = leading_singular_vectors(f_t.detach(), k)
        v_s, _ = leading_singular_vectors(f_s, k + 3)
        v_s = align_to(v_s, v_t)
        # both scaled by the teacher's (normalised) singular values
        v_t = v_t * s_t.unsqueeze(1)
        v_s = v_s * s_t.unsqueeze(1)
        if prev_s is not None:
            diff = (rbf_correlation(v_s, prev_s) - rbf_correlation(v_t, prev_t)).pow(2)
            total = total + _finite(diff).sum()
        prev_s, prev_t = v_s, v_t
    return total / s_stages[0].shape[0]


@METHODS.register("kdsvd")
class KDSVD(DistillMethod):
    """KD-SVD (Lee et al., ECCV 2018): RBF correlations of leading singular vectors between consecutive stages.

    With different numbers of stages the last ``min(L_s, L_t)`` of each are paired. Every paired
    stage needs equal channel counts (the correlations are compared entry by entry) and at least
    ``k + 3`` singular vectors (``min(H*W, C) >= k + 3``).
    """

    student_features = frozenset({STAGES})
    teacher_features = frozenset({STAGES})

    def __init__(self, k: int = 1) -> None:
        super().__init__()
        if int(k) < 1:
            raise UserError(f"distill.k (singular vectors per stage) must be >= 1, got {k}")
        self.k = int(k)
        self.num_stages = 0

    def build(self, student: Features[torch.Size], teacher: Features[torch.Size], ctx: BuildContext) -> None:
        n = min(len(student.stages), len(teacher.stages))
        if n < 2:
            raise UserError("kdsvd correlates consecutive stages, so both networks need at least two stages")
        s_off, t_off = len(student.stages) - n, len(teacher.stages) - n
        log_stage_pairing("kdsvd", len(student.stages), len(teacher.stages))
        problems = []
        for j in range(n):
            s, t = student.stages[s_off + j], teacher.stages[t_off + j]
            where = f"student stage{s_off + j + 1} vs teacher stage{t_off + j + 1}"
            if s[1] != t[1]:
                problems.append(f"{where}: {s[1]} vs {t[1]} channels")
            if min(s[2] * s[3], s[1]) < self.k + 3:
                problems.append(f"{where}: the student map {tuple(s[1:])} has fewer than k+3={self.k + 3} "
                                "singular vectors")
        if problems:
            raise UserError("kdsvd cannot pair these networks: " + "; ".join(problems)
                            + ". Choose a same-width pair (e.g. resnet32x4->resnet8x4, vgg13->vgg8) or another method")
        self.num_stages = n

    def forward(self, student: Features[torch.Tensor], teacher: Features[torch.Tensor],
                batch: Batch, ctx: TermContext) -> dict[str, torch.Tensor]:
        n = self.num_stages
        s_stages = student.stages[len(student.stages) - n:]
        t_stages = teacher.stages[len(teacher.stages) - n:]
        # SVD needs float32 (no half/bf16 kernels); keep autocast out of it
        with torch.autocast(device_type=s_stages[0].device.type, enabled=False):
            return {"kdsvd": kdsvd_loss(s_stages, t_stages, self.k)}
