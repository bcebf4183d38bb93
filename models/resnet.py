"""CIFAR ResNets of He et al. (2016): 3 stages of basic blocks, depth 6n+2.

Parameter names follow the widely shared CIFAR-100 checkpoints (``conv1``, ``bn1``,
``layer{i}.{j}.conv1/bn1/conv2/bn2/downsample``, ``fc``), so they load with strict=True.
``resnet8x4``/``resnet32x4`` are the 4x wider variants (stem 32, stages 64/128/256).
"""
from __future__ import annotations

import torch
from torch import nn

from models import MODELS
from models.layers import GlobalAvgPool, conv3x3, init_kaiming_fan_out_, residual_stage_features


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus shortcut, then ReLU (``relu_out``, whose input is the preact tap)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 is_last: bool = False) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        # The last block's sum is tapped as the stage's preact feature: no in-place ReLU there.
        self.relu_out = nn.ReLU(inplace=not is_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x if self.downsample is None else self.downsample(x)
        return self.relu_out(out)


class ResNet(nn.Module):
    """CIFAR ResNet: conv-BN-ReLU stem, three stages of ``(depth-2)/6`` blocks, global pool, ``fc``."""

    def __init__(self, depth: int, num_filters: list[int], num_classes: int = 100) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.inplanes = num_filters[0]
        self.conv1 = nn.Conv2d(3, num_filters[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(num_filters[0])
        self.relu = nn.ReLU()
        self.layer1 = self._make_layer(num_filters[1], n, stride=1)
        self.layer2 = self._make_layer(num_filters[2], n, stride=2)
        self.layer3 = self._make_layer(num_filters[3], n, stride=2)
        self.pool = GlobalAvgPool()  # the reference's AvgPool2d(8) at 32 px, global at any size
        self.fc = nn.Linear(num_filters[3] * BasicBlock.expansion, num_classes)
        init_kaiming_fan_out_(self)
        last = n - 1
        self.feature_info = residual_stage_features(
            ("relu", num_filters[0]), ["layer1", "layer2", "layer3"], [f"layer{i}.{last}" for i in (1, 2, 3)],
            num_filters[1:4], [1, 2, 4], "bn2", "fc", num_filters[3])

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * BasicBlock.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * BasicBlock.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * BasicBlock.expansion),
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample, is_last=blocks == 1)]
        self.inplanes = planes * BasicBlock.expansion
        layers += [BasicBlock(self.inplanes, planes, is_last=i == blocks - 1) for i in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.pool(x).flatten(1))


@MODELS.register("resnet8")
def resnet8(num_classes: int = 100) -> ResNet:
    """ResNet-8 (1 block per stage, 16/16/32/64 filters)."""
    return ResNet(8, [16, 16, 32, 64], num_classes)


@MODELS.register("resnet14")
def resnet14(num_classes: int = 100) -> ResNet:
    """ResNet-14 (2 blocks per stage)."""
    return ResNet(14, [16, 16, 32, 64], num_classes)


@MODELS.register("resnet20")
def resnet20(num_classes: int = 100) -> ResNet:
    """ResNet-20 (3 blocks per stage)."""
    return ResNet(20, [16, 16, 32, 64], num_classes)


@MODELS.register("resnet32")
def resnet32(num_classes: int = 100) -> ResNet:
    """ResNet-32 (5 blocks per stage)."""
    return ResNet(32, [16, 16, 32, 64], num_classes)


@MODELS.register("resnet44")
def resnet44(num_classes: int = 100) -> ResNet:
    """ResNet-44 (7 blocks per stage)."""
    return ResNet(44, [16, 16, 32, 64], num_classes)


@MODELS.register("resnet56")
def resnet56(num_classes: int = 100) -> ResNet:
    """ResNet-56 (9 blocks per stage)."""
    return ResNet(56, [16, 16, 32, 64], num_classes)


@MODELS.register("resnet110")
def resnet110(num_classes: int = 100) -> ResNet:
    """ResNet-110 (18 blocks per stage)."""
    return ResNet(110, [16, 16, 32, 64], num_classes)


@MODELS.register("resnet8x4")
def resnet8x4(num_classes: int = 100) -> ResNet:
    """ResNet-8, 4x wider (32/64/128/256 filters)."""
    return ResNet(8, [32, 64, 128, 256], num_classes)


@MODELS.register("resnet32x4")
def resnet32x4(num_classes: int = 100) -> ResNet:
    """ResNet-32, 4x wider (32/64/128/256 filters)."""
    return ResNet(32, [32, 64, 128, 256], num_classes)
