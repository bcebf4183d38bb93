"""ShuffleNet V1 (Zhang et al., 2018) for CIFAR, 3 groups, stages of 240/480/960 channels.

Parameter names follow the widely shared CIFAR-100 checkpoints (``conv1``, ``bn1``,
``layer{i}.{j}.conv1..3/bn1..3``, ``linear``). The stem is a 1x1 conv without pooling.
"""
from __future__ import annotations

import torch
from torch import nn

from models import MODELS
from models.layers import ChannelShuffle, GlobalAvgPool, residual_stage_features


class Bottleneck(nn.Module):
    """Grouped 1x1 - shuffle - 3x3 depthwise - grouped 1x1 unit.

    Stride 1 adds the input; stride 2 concatenates a 3x3 average-pooled input
    (so the branch only makes ``out_planes`` minus the input channels). ``relu_out``
    closes the unit; its input is the preact feature of the stage's last unit.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int, first_groups: int,
                 is_last: bool = False) -> None:
        super().__init__()
        self.stride = stride
        mid_planes = out_planes // 4
        self.conv1 = nn.Conv2d(in_planes, mid_planes, kernel_size=1, groups=first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.shuffle1 = ChannelShuffle(first_groups)
        self.conv2 = nn.Conv2d(mid_planes, mid_planes, kernel_size=3, stride=stride, padding=1, groups=mid_planes,
                               bias=False)
        self.bn2 = nn.BatchNorm2d(mid_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(mid_planes, out_planes, kernel_size=1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.AvgPool2d(3, stride=2, padding=1) if stride == 2 else None
        self.relu_out = nn.ReLU(inplace=not is_last)  # the last unit's sum is tapped

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.shuffle1(self.relu1(self.bn1(self.conv1(x))))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.shortcut is not None:
            out = torch.cat([out, self.shortcut(x)], 1)
        else:
            out += x
        return self.relu_out(out)


class ShuffleNetV1(nn.Module):
    """1x1 conv stem (24), three stages whose first unit has stride 2, 4x4 average pool, ``linear``."""

    def __init__(self, out_planes: list[int], num_blocks: list[int], groups: int, num_classes: int = 100) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.relu = nn.ReLU()
        self.in_planes = 24
        self.layer1 = self._make_layer(out_planes[0], num_blocks[0], groups, first_groups=1)
        self.layer2 = self._make_layer(out_planes[1], num_blocks[1], groups)
        self.layer3 = self._make_layer(out_planes[2], num_blocks[2], groups)
        self.pool = GlobalAvgPool()  # the reference's 4x4 pool at 32 px, global at any size
        self.linear = nn.Linear(out_planes[2], num_classes)
        self.feature_info = residual_stage_features(
            ("relu", 24), ["layer1", "layer2", "layer3"], [f"layer{i}.{num_blocks[i - 1] - 1}" for i in (1, 2, 3)],
            out_planes, [2, 4, 8], "bn3", "linear", out_planes[2])

    def _make_layer(self, out_planes: int, num_blocks: int, groups: int,
                    first_groups: int | None = None) -> nn.Sequential:
        """``first_groups``: groups of the first unit's 1x1 conv (1 on the 24-channel stem, too few to split)."""
        layers = []
        for i in range(num_blocks):
            stride = 2 if i == 0 else 1
            cat_planes = self.in_planes if i == 0 else 0  # the pooled input fills the rest of the channels
            g = first_groups if (i == 0 and first_groups is not None) else groups
            layers.append(Bottleneck(self.in_planes, out_planes - cat_planes, stride, groups, g,
                                     is_last=i == num_blocks - 1))
            self.in_planes = out_planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.linear(self.pool(out).flatten(1))


@MODELS.register("ShuffleV1", lr=0.01)  # RECIPES.md: 0.01 for MobileNetV2 / ShuffleNets
def shufflev1(num_classes: int = 100) -> ShuffleNetV1:
    """ShuffleNet V1 with 3 groups (240/480/960 channels, 4/8/4 units)."""
    return ShuffleNetV1([240, 480, 960], [4, 8, 4], groups=3, num_classes=num_classes)
