"""ReviewKD (Chen et al., "Distilling Knowledge via Knowledge Review", CVPR 2021).

Each student level is fused with everything deeper than it by attention-based fusion
(ABF) modules, from the embedding up, and the fused maps are matched to the teacher's
pre-activation stage maps and embedding with the hierarchical context loss ``F.hcl``.
All widths and sizes come from the probed shapes of the pair, never from config.
"""
from __future__ import annotations

import torch
import torch.nn.functional as TF
from torch import nn

from common.errors import UserError
from datasets.batch import Batch
from distiller import functional as F
from distiller.features import EMBEDDING, STAGES, STAGES_PREACT, Features
from distiller.helpers import log_stage_pairing
from distiller.methods.base import METHODS, BuildContext, DistillMethod, TermContext
from distiller.methods.key_types import Count


class ABF(nn.Module):
    """Attention-based fusion: 1x1 conv+BN to ``mid`` channels, fuse with the deeper level, 3x3 conv+BN out.

    The deeper level's residual is resized (nearest) to this level's size; a 1x1 conv on
    the concatenation gives two sigmoid maps weighting this level and the residual. The
    fused map is resized to the teacher's size before the output conv and is passed on,
    as the residual, to the next (shallower) level.
    """

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, mid_channels, kernel_size=1, bias=False),
                                   nn.BatchNorm2d(mid_channels))
        self.conv2 = nn.Sequential(nn.Conv2d(mid_channels, out_channels, kernel_size=3, padding=1, bias=False),
                                   nn.BatchNorm2d(out_channels))
        self.att_conv = (nn.Sequential(nn.Conv2d(2 * mid_channels, 2, kernel_size=1), nn.Sigmoid())
                         if fuse else None)
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)  # reference initialisation
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None,
                out_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (output at the teacher's shape, fused map to pass to the next level)."""
        x = self.conv1(x)
        if self.att_conv is not None:
            residual = TF.interpolate(residual, size=x.shape[-2:], mode="nearest")
            weights = self.att_conv(torch.cat([x, residual], dim=1))
            x = x * weights[:, 0:1] + residual * weights[:, 1:2]
        if tuple(x.shape[-2:]) != tuple(out_size):
            x = TF.interpolate(x, size=out_size, mode="nearest")
        return self.conv2(x), x


def _as_map(embedding: torch.Tensor) -> torch.Tensor:
    """The pooled vector [B, D] as a 1x1 map [B, D, 1, 1], the deepest ReviewKD level."""
    return embedding.reshape(embedding.shape[0], -1, 1, 1)


@METHODS.register("reviewkd", aliases=("review",))
class ReviewKD(DistillMethod):
    """ReviewKD (Chen et al., CVPR 2021): ABF-fused student levels vs teacher pre-activations, HCL loss.

    Levels are ``[stage1..stageL, embedding]``. The embeddings always pair; when the networks
    have different numbers of stages, the last ``min(L_s, L_t)`` stages of each are paired
    (the deepest ones). ``mid`` width = ``min(max_mid_channels, student embedding width)``.
    """

    student_features = frozenset({STAGES, EMBEDDING})
    teacher_features = frozenset({STAGES_PREACT, EMBEDDING})

    def __init__(self, max_mid_channels: Count = 512) -> None:
        super().__init__()
        self.max_mid_channels = int(max_mid_channels)
        self.abfs = nn.ModuleList()  # deepest (embedding) first
        self.out_sizes: list[tuple[int, int]] = []  # teacher sizes, deepest first
        self.num_stages = 0

    def _levels(self, features: Features) -> list:
        """Paired levels, deepest first: embedding, stageL, ..., stage(L-n+1)."""
        n = self.num_stages
        stages = features.stages[len(features.stages) - n:]
        embedding = features.embedding
        if isinstance(embedding, torch.Tensor):
            embedding = _as_map(embedding)
        else:
            embedding = torch.Size([embedding[0], int(torch.Size(embedding[1:]).numel()), 1, 1])
        return [embedding, *reversed(stages)]

    def build(self, student: Features[torch.Size], teacher: Features[torch.Size], ctx: BuildContext) -> None:
        if student.embedding is None or teacher.embedding is None:
            raise UserError("reviewkd needs the embedding of both networks")
        self.num_stages = min(len(student.stages), len(teacher.stages))
        log_stage_pairing("reviewkd", len(student.stages), len(teacher.stages))
        s_levels, t_levels = self._levels(student), self._levels(teacher)
        mid = min(self.max_mid_channels, s_levels[0][1])
        for i, (s_shape, t_shape) in enumerate(zip(s_levels, t_levels)):
            # the deepest level has nothing deeper to fuse with
            self.abfs.append(ABF(s_shape[1], mid, t_shape[1], fuse=i > 0))
            self.out_sizes.append((int(t_shape[2]), int(t_shape[3])))
        self.to(ctx.device)

    def fused(self, student: Features[torch.Tensor]) -> list[torch.Tensor]:
        """The ABF outputs, shallow to deep (same order and shapes as the teacher's paired levels)."""
        outputs, residual = [], None
        for abf, x, out_size in zip(self.abfs, self._levels(student), self.out_sizes):
            out, residual = abf(x, residual, out_size)
            outputs.append(out)
        return outputs[::-1]

    def forward(self, student: Features[torch.Tensor], teacher: Features[torch.Tensor],
                batch: Batch, ctx: TermContext) -> dict[str, torch.Tensor]:
        return {"reviewkd": F.hcl(self.fused(student), self._levels(teacher)[::-1])}
