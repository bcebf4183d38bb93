"""Small building blocks and initialisers shared by the CIFAR model zoo."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.features import FeatureInfo


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding 1 and no bias (a BatchNorm follows it)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class ChannelShuffle(nn.Module):
    """ShuffleNet channel shuffle: [N, g*k, H, W] -> view [N, g, k] -> transpose -> [N, k*g, H, W].

    A fixed permutation of the channels, so it commutes with element-wise activations.
    """

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        g = self.groups
        return x.view(n, g, c // g, h, w).transpose(1, 2).reshape(n, c, h, w)

    def extra_repr(self) -> str:
        return f"groups={self.groups}"


class GlobalAvgPool(nn.Module):
    """Average over the whole map: [N, C, H, W] -> [N, C, 1, 1].

    The reference models pool with a fixed window that is global at 32 px (``AvgPool2d(8)`` and the
    like); as a module of its own, its input (the map the embedding averages, ``pool_input``) can be
    tapped, and at any resolution it stays global. The same op, so the same values.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, x.shape[-2:])


def pool_input_feature(module: str, channels: int, reduction: int) -> FeatureInfo:
    """The ``pool_input`` feature: the input of the global pool ``module`` (SDD's and CAT-KD's map)."""
    return FeatureInfo("pool_input", module, channels, reduction, module_input=True)


def residual_stage_features(stem: tuple[str, int], stages: list[str], last_units: list[str],
                            channels: list[int], reductions: list[int], bn: str, classifier: str,
                            embedding_channels: int, pool: str = "pool") -> list[FeatureInfo]:
    """Feature list of a network whose stages end in ``act(bn(...) + shortcut)``.

    ``stem`` is the stem's activation module and its channels, ``stages`` the stage
    containers (their outputs are the post-activation features), ``last_units`` the last
    unit of each stage: the input of its ``relu_out`` is the pre-activation feature and
    its ``bn`` (e.g. ``bn2``) the BatchNorm of the residual branch; ``classifier`` is the
    Linear whose input is the embedding, ``pool`` the global pool whose input is the last stage's map.
    """
    infos = [FeatureInfo("stem", stem[0], stem[1], 1)]
    for i, (stage, unit, c, r) in enumerate(zip(stages, last_units, channels, reductions), start=1):
        infos.append(FeatureInfo(f"stage{i}", stage, c, r, preact=f"{unit}.relu_out", preact_input=True,
                                 bn=f"{unit}.{bn}"))
    infos.append(pool_input_feature(pool, channels[-1], reductions[-1]))
    infos.append(FeatureInfo("embedding", classifier, embedding_channels, None, module_input=True))
    return infos

def init_kaiming_fan_out_(model: nn.Module) -> None:
    """He-normal (fan-out) convolutions and unit/zero BatchNorm, the ResNet families' initialisation."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def init_normal_fan_out_(model: nn.Module, linear_std: float | None = 0.01) -> None:
    """N(0, 2/(k*k*out)) convolutions, unit/zero BatchNorm, zero biases.

    ``linear_std``: std of the classifier weights (VGG, MobileNetV2 use 0.01); ``None``
    keeps PyTorch's default Linear weights (WRN only zeroes the bias).
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if linear_std is not None:
                nn.init.normal_(m.weight, 0.0, linear_std)
            nn.init.zeros_(m.bias)
