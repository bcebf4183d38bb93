"""ImageNet-style ResNet18/ResNet50 adapted to CIFAR (3x3 stride-1 stem, no max-pool), four stages.

Parameter names follow the widely shared CIFAR-100 checkpoints (``conv1``, ``bn1``,
``layer{i}.{j}.conv*/bn*/shortcut``, ``linear``), so they load with strict=True.
"""
from __future__ import annotations

import torch
from torch import nn

from models import MODELS
from models.layers import conv3x3, init_kaiming_fan_out_, residual_stage_features


def _shortcut(in_planes: int, out_planes: int, stride: int) -> nn.Sequential:
    """Identity (empty Sequential) or 1x1 projection + BN when the shape changes."""
    if stride == 1 and in_planes == out_planes:
        return nn.Sequential()
    return nn.Sequential(nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False),
                         nn.BatchNorm2d(out_planes))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN, shortcut added, then ``relu_out`` (its input is the preact tap)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, is_last: bool = False) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(in_planes, planes * self.expansion, stride)
        self.relu_out = nn.ReLU(inplace=not is_last)  # the last block's sum is tapped

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return self.relu_out(out)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand x4, shortcut added, then ``relu_out``."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1, is_last: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.shortcut = _shortcut(in_planes, planes * self.expansion, stride)
        self.relu_out = nn.ReLU(inplace=not is_last)  # the last block's sum is tapped

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += self.shortcut(x)
        return self.relu_out(out)


class ResNet(nn.Module):
    """Stem conv-BN-ReLU (64), four stages (64, 128, 256, 512 x expansion), global pool, ``linear``."""

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], num_blocks: list[int],
                 num_classes: int = 100) -> None:
        super().__init__()
        self.in_planes = 64
        self.conv1 = conv3x3(3, 64)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.layer1 = self._make_layer(block, 64, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(block, 128, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(block, 256, num_blocks[2], stride=2)
        self.layer4 = self._make_layer(block, 512, num_blocks[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.linear = nn.Linear(512 * block.expansion, num_classes)
        init_kaiming_fan_out_(self)
        widths = [w * block.expansion for w in (64, 128, 256, 512)]
        self.feature_info = residual_stage_features(
            ("relu", 64), [f"layer{i}" for i in range(1, 5)],
            [f"layer{i}.{num_blocks[i - 1] - 1}" for i in range(1, 5)], widths, [1, 2, 4, 8],
            "bn3" if block is Bottleneck else "bn2", "linear", widths[-1], pool="avgpool")

    def _make_layer(self, block: type[BasicBlock] | type[Bottleneck], planes: int, num_blocks: int,
                    stride: int) -> nn.Sequential:
        layers = []
        for i in range(num_blocks):
            layers.append(block(self.in_planes, planes, stride if i == 0 else 1, is_last=i == num_blocks - 1))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(self.avgpool(out).flatten(1))


@MODELS.register("ResNet18")
def resnet18(num_classes: int = 100) -> ResNet:
    """ResNet-18 (basic blocks 2-2-2-2) for 32 px inputs."""
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes)


@MODELS.register("ResNet50")
def resnet50(num_classes: int = 100) -> ResNet:
    """ResNet-50 (bottlenecks 3-4-6-3) for 32 px inputs."""
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes)
