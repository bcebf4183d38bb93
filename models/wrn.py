"""Wide ResNets (Zagoruyko & Komodakis, 2016), pre-activation blocks, depth 6n+4, width k.

Parameter names follow the widely shared CIFAR-100 checkpoints (``conv1``,
``block{g}.layer.{j}.bn1/conv1/bn2/conv2/convShortcut``, ``bn1``, ``fc``).

Features: the stem is the first conv's raw output and each stage is the raw residual
sum of its group (pre-activation nets have no ReLU at a group's end). A stage's
preact feature is the BatchNorm that the forward applies to it next: the next
group's first ``bn1``, and the final ``bn1`` for the last group. Those BN outputs
are tapped as the forward produces them, so their ReLUs must not run in place.
"""
from __future__ import annotations

import torch
from torch import nn

from models import MODELS
from models.features import FeatureInfo
from models.layers import GlobalAvgPool, conv3x3, init_normal_fan_out_, pool_input_feature


class BasicBlock(nn.Module):
    """BN-ReLU-conv-BN-ReLU-conv plus shortcut; a 1x1 ``convShortcut`` on the activated input when widths differ."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, bn1_tapped: bool = False) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        # bn1's output may be a preact tap; an in-place ReLU would overwrite it.
        self.relu1 = nn.ReLU(inplace=not bn1_tapped)
        self.conv1 = conv3x3(in_planes, out_planes, stride)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(out_planes, out_planes)
        self.convShortcut = None  # the checkpoints' parameter name
        if in_planes != out_planes:
            self.convShortcut = nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.relu1(self.bn1(x))
        # Equal widths: identity on the raw input; otherwise the projection sees the activated input.
        shortcut = x if self.convShortcut is None else self.convShortcut(act)
        out = self.conv2(self.relu2(self.bn2(self.conv1(act))))
        out += shortcut
        return out


class NetworkBlock(nn.Module):
    """A group of ``nb_layers`` blocks; only the first changes width/stride."""

    def __init__(self, nb_layers: int, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.layer = nn.Sequential(*[
            BasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, bn1_tapped=i == 0)
            for i in range(nb_layers)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-k for 32x32 inputs: conv stem, three groups (16k, 32k, 64k), BN-ReLU, global pool, ``fc``."""

    def __init__(self, depth: int, widen_factor: int, num_classes: int = 100) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        channels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, channels[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, channels[0], channels[1], 1)
        self.block2 = NetworkBlock(n, channels[1], channels[2], 2)
        self.block3 = NetworkBlock(n, channels[2], channels[3], 2)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.relu = nn.ReLU()  # not in place: bn1's output is the last stage's preact tap
        self.pool = GlobalAvgPool()  # the reference's 8x8 pool at 32 px, global at any size
        self.fc = nn.Linear(channels[3], num_classes)
        init_normal_fan_out_(self, linear_std=None)
        # the pre-activation of a stage is the next BatchNorm the forward already runs on it
        next_bn = ["block2.layer.0.bn1", "block3.layer.0.bn1", "bn1"]
        self.feature_info = [FeatureInfo("stem", "conv1", channels[0], 1)]
        self.feature_info += [FeatureInfo(f"stage{i}", f"block{i}", channels[i], 2 ** (i - 1), preact=bn, bn=bn)
                              for i, bn in enumerate(next_bn, start=1)]
        self.feature_info.append(pool_input_feature("pool", channels[3], 4))
        self.feature_info.append(FeatureInfo("embedding", "fc", channels[3], None, module_input=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = self.relu(self.bn1(out))
        return self.fc(self.pool(out).flatten(1))


@MODELS.register("wrn_16_1")
def wrn_16_1(num_classes: int = 100) -> WideResNet:
    """WRN-16-1."""
    return WideResNet(16, 1, num_classes)


@MODELS.register("wrn_16_2")
def wrn_16_2(num_classes: int = 100) -> WideResNet:
    """WRN-16-2."""
    return WideResNet(16, 2, num_classes)


@MODELS.register("wrn_40_1")
def wrn_40_1(num_classes: int = 100) -> WideResNet:
    """WRN-40-1."""
    return WideResNet(40, 1, num_classes)


@MODELS.register("wrn_40_2")
def wrn_40_2(num_classes: int = 100) -> WideResNet:
    """WRN-40-2."""
    return WideResNet(40, 2, num_classes)
