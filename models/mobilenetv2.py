"""MobileNetV2 (Sandler et al., 2018) for CIFAR at width 0.5 and expansion 6 (``mobile_half``).

Parameter names follow the widely shared CIFAR-100 checkpoints (``conv1.{0,1}``,
``blocks.{i}.{j}.conv.{0..7}``, ``conv2.{0,1}``, ``classifier.0``). Every inverted
residual ends in a linear BN (no ReLU), so each stage's preact feature is its output.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from models import MODELS
from models.features import FeatureInfo
from models.layers import GlobalAvgPool, init_normal_fan_out_, pool_input_feature

# (expansion t, output channels c, repeats n, first stride s) at width 1; t=None means "the model's T".
_SETTING: list[tuple[int | None, int, int, int]] = [
    (1, 16, 1, 1),
    (None, 24, 2, 1),
    (None, 32, 3, 2),
    (None, 64, 4, 2),
    (None, 96, 3, 1),
    (None, 160, 3, 2),
    (None, 320, 1, 1),
]


def _conv_bn_relu(inp: int, oup: int, kernel: int, stride: int, inplace: bool = True) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, oup, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(oup),
        nn.ReLU(inplace=inplace),
    )


class InvertedResidual(nn.Module):
    """1x1 expand-BN-ReLU, 3x3 depthwise-BN-ReLU, 1x1 project-BN (linear); identity added when shapes match."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = inp * expand_ratio
        self.use_res_connect = stride == 1 and inp == oup
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, 1, 0, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:
            return x + self.conv(x)  # not in place: x may be a tapped stage output
        return self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 for 32 px inputs: stride-2 stem, seven block groups, 1x1 conv to 1280, pool, classifier."""

    def __init__(self, expansion: int = 6, width_mult: float = 0.5, num_classes: int = 100) -> None:
        super().__init__()
        input_channel = input_stem = int(32 * width_mult)
        # The stem's output is tapped; it is the stem ReLU's own output, so in place would do, but
        # keeping tapped activations out of place is the rule that needs no case analysis.
        self.conv1 = _conv_bn_relu(3, input_channel, 3, 2, inplace=False)
        self.blocks = nn.ModuleList()
        for t, c, n, s in _SETTING:
            output_channel = int(c * width_mult)
            layers = []
            for i in range(n):
                layers.append(InvertedResidual(input_channel, output_channel, s if i == 0 else 1,
                                               expansion if t is None else t))
                input_channel = output_channel
            self.blocks.append(nn.Sequential(*layers))
        self.last_channel = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = _conv_bn_relu(input_channel, self.last_channel, 1, 1)
        self.pool = GlobalAvgPool()  # the reference's AvgPool2d(2, ceil_mode=True): global on 32 px inputs' 2x2 map
        self.classifier = nn.Sequential(nn.Linear(self.last_channel, num_classes))
        init_normal_fan_out_(self, linear_std=0.01)
        # block outputs end in a linear BatchNorm (``conv.7`` of the group's last block): preact == post
        reductions = [2 * math.prod(stride for *_, stride in _SETTING[:g + 1]) for g in range(len(_SETTING))]
        self.feature_info = [FeatureInfo("stem", "conv1", input_stem, 2)]
        for i, g in enumerate((1, 2, 4, 6), start=1):
            last = len(self.blocks[g]) - 1
            self.feature_info.append(FeatureInfo(f"stage{i}", f"blocks.{g}", int(_SETTING[g][1] * width_mult),
                                                 reductions[g], bn=f"blocks.{g}.{last}.conv.7"))
        self.feature_info.append(pool_input_feature("pool", self.last_channel, reductions[-1]))
        self.feature_info.append(FeatureInfo("embedding", "classifier", self.last_channel, None, module_input=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        for block in self.blocks:
            out = block(out)
        out = self.conv2(out)
        return self.classifier(self.pool(out).flatten(1))


@MODELS.register("MobileNetV2", aliases=("mobile_half",), lr=0.01)  # RECIPES.md: 0.01 for MobileNetV2 / ShuffleNets
def mobilenetv2(num_classes: int = 100) -> MobileNetV2:
    """MobileNetV2 at width 0.5 with expansion 6 (the CIFAR-100 distillation students' "mobile_half")."""
    return MobileNetV2(expansion=6, width_mult=0.5, num_classes=num_classes)
