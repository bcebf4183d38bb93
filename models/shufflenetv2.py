"""ShuffleNet V2 1x (Ma et al., 2018) for CIFAR: stages of 116/232/464 channels, 1x1 conv to 1024.

Parameter names follow the widely shared CIFAR-100 checkpoints (``conv1``, ``bn1``,
``layer{i}.0.conv1..5/bn1..5`` for the down-sampling unit, ``layer{i}.{j}.conv1..3/bn1..3``,
``conv2``, ``bn2``, ``linear``). The stem is a 1x1 conv without pooling.

Preact features: a basic unit keeps half its input (``x1``) and ends with
``shuffle(cat([x1, relu(branch)]))``. ``x1`` is already >= 0 (every unit's output is) and
ReLU commutes with concatenation and with the channel permutation, so the unit is computed
as ``relu_out(shuffle(cat([x1, branch])))``: the same values and weights, with the whole
pre-activation map available as ``relu_out``'s input. That preact is in the output's
(shuffled) channel order, so ``relu(preact) == output`` channel by channel.
"""
from __future__ import annotations

import torch
from torch import nn

from models import MODELS
from models.features import FeatureInfo
from models.layers import ChannelShuffle, GlobalAvgPool, pool_input_feature


class BasicBlock(nn.Module):
    """Channel split; the second half goes through 1x1-BN-ReLU, 3x3 dw-BN, 1x1-BN; concat, shuffle, ReLU."""

    def __init__(self, in_channels: int, is_last: bool = False) -> None:
        super().__init__()
        half = in_channels // 2
        self.conv1 = nn.Conv2d(half, half, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(half)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(half, half, kernel_size=3, stride=1, padding=1, groups=half, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = nn.Conv2d(half, half, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(half)
        self.shuffle = ChannelShuffle(2)
        # Harmless on the passthrough half (>= 0); not in place where its input is the stage's preact tap.
        self.relu_out = nn.ReLU(inplace=not is_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1] // 2
        x1, x2 = x[:, :c], x[:, c:]
        branch = self.relu1(self.bn1(self.conv1(x2)))
        branch = self.bn3(self.conv3(self.bn2(self.conv2(branch))))
        return self.relu_out(self.shuffle(torch.cat([x1, branch], 1)))


class DownBlock(nn.Module):
    """Stride-2 unit: both halves are computed from the full input (left: dw-BN, 1x1-BN-ReLU;
    right: 1x1-BN-ReLU, dw-BN, 1x1-BN-ReLU), concatenated and shuffled."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        mid = out_channels // 2
        self.conv1 = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=1, groups=in_channels,
                               bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.relu3 = nn.ReLU(inplace=True)
        self.conv4 = nn.Conv2d(mid, mid, kernel_size=3, stride=2, padding=1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, kernel_size=1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)
        self.relu5 = nn.ReLU(inplace=True)
        self.shuffle = ChannelShuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = self.relu2(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = self.relu3(self.bn3(self.conv3(x)))
        right = self.relu5(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return self.shuffle(torch.cat([left, right], 1))


class ShuffleNetV2(nn.Module):
    """1x1 conv stem (24), three stages (a DownBlock then basic units), 1x1 conv-BN-ReLU, 4x4 pool, ``linear``."""

    def __init__(self, out_channels: list[int], num_blocks: list[int], num_classes: int = 100) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.relu1 = nn.ReLU()
        self.in_channels = 24
        self.layer1 = self._make_layer(out_channels[0], num_blocks[0])
        self.layer2 = self._make_layer(out_channels[1], num_blocks[1])
        self.layer3 = self._make_layer(out_channels[2], num_blocks[2])
        self.conv2 = nn.Conv2d(out_channels[2], out_channels[3], kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels[3])
        self.relu2 = nn.ReLU(inplace=True)
        self.pool = GlobalAvgPool()  # the reference's 4x4 pool at 32 px, global at any size
        self.linear = nn.Linear(out_channels[3], num_classes)
        # layer{i} holds the DownBlock at index 0, so its last basic unit is at index num_blocks.
        # No BatchNorm before the stage activation: half the channels of the pre-activation skip it.
        self.feature_info = [FeatureInfo("stem", "relu1", 24, 1)]
        self.feature_info += [
            FeatureInfo(f"stage{i}", f"layer{i}", out_channels[i - 1], 2 ** i,
                        preact=f"layer{i}.{num_blocks[i - 1]}.relu_out", preact_input=True)
            for i in (1, 2, 3)
        ]
        self.feature_info.append(pool_input_feature("pool", out_channels[3], 8))
        self.feature_info.append(FeatureInfo("embedding", "linear", out_channels[3], None, module_input=True))

    def _make_layer(self, out_channels: int, num_blocks: int) -> nn.Sequential:
        layers: list[nn.Module] = [DownBlock(self.in_channels, out_channels)]
        layers += [BasicBlock(out_channels, is_last=i == num_blocks - 1) for i in range(num_blocks)]
        self.in_channels = out_channels
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = self.relu2(self.bn2(self.conv2(out)))
        return self.linear(self.pool(out).flatten(1))


@MODELS.register("ShuffleV2", lr=0.01)  # RECIPES.md: 0.01 for MobileNetV2 / ShuffleNets
def shufflev2(num_classes: int = 100) -> ShuffleNetV2:
    """ShuffleNet V2 1x (116/232/464 channels, 3/7/3 basic units, 1024-d head)."""
    return ShuffleNetV2([116, 232, 464, 1024], [3, 7, 3], num_classes)
