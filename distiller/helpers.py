"""Trainable helpers shared by distillation methods: regressors, embeddings, stage pairing.

Every helper is built from probed feature shapes (``torch.Size``), never from
channel counts written in config, so the same method works for any teacher/student pair.
"""
from __future__ import annotations

import logging
from typing import Sequence, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import UserError

log = logging.getLogger(__name__)

T = TypeVar("T")


def _hw(shape: Sequence[int]) -> tuple[int, int]:
    return int(shape[-2]), int(shape[-1])


class Resize(nn.Module):
    """Resize a map to a fixed H x W: adaptive average pooling when shrinking in both
    dimensions (it averages every input pixel, like the "pool to match" of the losses),
    bilinear interpolation otherwise (pooling cannot enlarge)."""

    def __init__(self, size: tuple[int, int]) -> None:
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if (h, w) == self.size:
            return x
        if h >= self.size[0] and w >= self.size[1]:
            return F.adaptive_avg_pool2d(x, self.size)
        return F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)

    def extra_repr(self) -> str:
        return f"size={self.size}"


class ConvRegressor(nn.Module):
    """Map a student feature map [B, C_s, H_s, W_s] to the teacher's [B, C_t, H_t, W_t] (FitNets).

    The spatial part depends on the two probed sizes (as RepDistiller's ``ConvReg`` for
    the first three cases; conv, BatchNorm, then ReLU unless ``use_relu=False``):

    * student twice the teacher (both dims): 3x3 conv, stride 2, padding 1;
    * student half the teacher (both dims): 4x4 transposed conv, stride 2, padding 1;
    * student at least as large otherwise (equal size included): a valid conv with kernel
      ``(1+H_s-H_t, 1+W_s-W_t)``, i.e. 1x1 for equal sizes, as RepDistiller (the published
      FitNet numbers were made with it);
    * student smaller by another factor (RepDistiller fails here): bilinear :class:`Resize`
      to the teacher's H x W, then a 1x1 conv.
    """

    def __init__(self, s_shape: Sequence[int], t_shape: Sequence[int], use_relu: bool = True) -> None:
        super().__init__()
        if len(s_shape) != 4 or len(t_shape) != 4:
            raise UserError(f"ConvRegressor needs 4-d feature maps [B, C, H, W], got student {tuple(s_shape)} "
                            f"and teacher {tuple(t_shape)}; tap a stage (or the stem), not the embedding")
        s_c, t_c = int(s_shape[1]), int(t_shape[1])
        (s_h, s_w), (t_h, t_w) = _hw(s_shape), _hw(t_shape)
        self.resize: nn.Module = nn.Identity()
        if (s_h, s_w) == (2 * t_h, 2 * t_w):
            self.relation = "student 2x teacher"
            self.conv: nn.Module = nn.Conv2d(s_c, t_c, kernel_size=3, stride=2, padding=1)
        elif (2 * s_h, 2 * s_w) == (t_h, t_w):
            self.relation = "student 1/2x teacher"
            self.conv = nn.ConvTranspose2d(s_c, t_c, kernel_size=4, stride=2, padding=1)
        elif s_h >= t_h and s_w >= t_w:
            self.relation = "equal" if (s_h, s_w) == (t_h, t_w) else f"valid conv {s_h}x{s_w} -> {t_h}x{t_w}"
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=(1 + s_h - t_h, 1 + s_w - t_w))
        else:
            self.relation = f"resized {s_h}x{s_w} -> {t_h}x{t_w}"
            self.resize = Resize((t_h, t_w))
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=1)
        self.bn = nn.BatchNorm2d(t_c)
        self.relu: nn.Module = nn.ReLU() if use_relu else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(self.resize(x))))


class Embed(nn.Module):
    """Flatten, ``Linear(dim_in, dim_out)``, and optionally L2-normalise each row.

    CRD uses the normalised form (its scores are cosine similarities / temperature);
    CC uses the plain linear embedding.
    """

    def __init__(self, dim_in: int, dim_out: int = 128, normalize: bool = True) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)
        self.normalize = normalize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x.reshape(x.shape[0], -1))
        if self.normalize:
            # In float32: the CRD scores exp(<v, m> / 0.07) amplify any rounding of v.
            x = F.normalize(x.float(), p=2, dim=1)
        return x


def flat_dim(shape: Sequence[int]) -> int:
    """Number of features per sample of a probed shape [B, ...]."""
    n = 1
    for d in shape[1:]:
        n *= int(d)
    return n


def pair_stages(student: Sequence[T], teacher: Sequence[T], method: str = "method") -> list[tuple[T, T]]:
    """Pair student and teacher stages for the stage-list methods (AT, VID, NST).

    Equal numbers of stages pair positionally (stage i with stage i, as RepDistiller's
    ``feat[1:-1]``). When they differ (e.g. ResNet50's 4 stages against resnet8x4's 3),
    the LAST ``min(L_s, L_t)`` stages of each are paired, so the deepest stages, which
    carry the most class information and feed the classifier, always meet; the extra
    early stages of the deeper network are not distilled. Works on shapes and tensors alike.
    """
    n_s, n_t = len(student), len(teacher)
    if n_s == 0 or n_t == 0:
        raise UserError(f"{method} needs stage features from both networks, got {n_s} student and {n_t} "
                        "teacher stages; check the models' feature_info lists stage1..stageL")
    n = min(n_s, n_t)
    return list(zip(list(student)[n_s - n:], list(teacher)[n_t - n:]))


def log_stage_pairing(method: str, n_student: int, n_teacher: int) -> None:
    """Say once, at build time, which stages meet when the counts differ."""
    if n_student != n_teacher:
        n = min(n_student, n_teacher)
        log.info("%s: student has %d stages, teacher %d; pairing the last %d of each "
                 "(student stage%d..%d with teacher stage%d..%d)", method, n_student, n_teacher, n,
                 n_student - n + 1, n_student, n_teacher - n + 1, n_teacher)
