"""MobileNet-V1 (Howard et al., 2017) at width 1.0, 224 px: the ImageNet student of the ResNet50 -> MobileNet-V1 tables.

The architecture mdistiller trains on ImageNet, with its parameter names (``model.{i}.{j}``,
``fc``), so its checkpoints load: ``model.0`` is the stem (3x3 conv, stride 2, 32 channels,
BN, ReLU); ``model.1`` .. ``model.13`` are depthwise-separable blocks (3x3 depthwise conv-BN-ReLU,
then 1x1 conv-BN-ReLU) widening 32 -> 1024 with stride 2 at blocks 2, 4, 6 and 12; ``model.14``
pools; ``fc`` classifies. 4.2 M parameters with 1000 classes, as published.

Stages as mdistiller taps them: the outputs of blocks 3, 5, 11 and 13 (128, 256, 512 and 1024
channels at 1/4 .. 1/32 of the input); each block's pre-activation map is the input of its
final ReLU (index 5, out of place in those four blocks), produced by its BatchNorm at index 4
(mdistiller's ``get_bn_before_relu``). The pool is global (mdistiller's ``AvgPool2d(7)`` is
global at 224 px), so the network runs at any resolution. Initialisation: PyTorch's defaults,
as in mdistiller.
"""
from __future__ import annotations

import torch
from torch import nn

from models import MODELS
from models.features import FeatureInfo
from models.layers import pool_input_feature

# (output channels, stride) of the 13 depthwise-separable blocks
_BLOCKS: list[tuple[int, int]] = [
    (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
    (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1),
]
STEM_CHANNELS = 32
STAGE_ENDS = (3, 5, 11, 13)  # indices in ``model`` of the blocks whose outputs are the stages


def _stem(out: int, tapped: bool) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, out, 3, 2, 1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=not tapped))


def _separable(inp: int, out: int, stride: int, tapped: bool) -> nn.Sequential:
    """3x3 depthwise conv-BN-ReLU, 1x1 pointwise conv-BN-ReLU; the last ReLU is out of place at a stage end."""
    return nn.Sequential(
        nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False),
        nn.BatchNorm2d(inp),
        nn.ReLU(inplace=True),
        nn.Conv2d(inp, out, 1, 1, 0, bias=False),
        nn.BatchNorm2d(out),
        nn.ReLU(inplace=not tapped),
    )


class MobileNetV1(nn.Module):
    """Stem, 13 depthwise-separable blocks, global average pool, ``fc``."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        layers: list[nn.Module] = [_stem(STEM_CHANNELS, tapped=True)]
        channels, reduction, reductions = STEM_CHANNELS, 2, {0: 2}
        for i, (out, stride) in enumerate(_BLOCKS, start=1):
            layers.append(_separable(channels, out, stride, tapped=i in STAGE_ENDS))
            channels, reduction = out, reduction * stride
            reductions[i] = reduction
        layers.append(nn.AdaptiveAvgPool2d(1))
        self.model = nn.Sequential(*layers)
        self.fc = nn.Linear(channels, num_classes)
        self.feature_info = [FeatureInfo("stem", "model.0", STEM_CHANNELS, reductions[0])]
        self.feature_info += [
            FeatureInfo(f"stage{s}", f"model.{b}", _BLOCKS[b - 1][0], reductions[b], preact=f"model.{b}.5",
                        preact_input=True, bn=f"model.{b}.4")
            for s, b in enumerate(STAGE_ENDS, start=1)
        ]
        self.feature_info.append(pool_input_feature(f"model.{len(layers) - 1}", channels, reduction))
        self.feature_info.append(FeatureInfo("embedding", "fc", channels, None, module_input=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.model(x).flatten(1))


@MODELS.register("MobileNetV1")
def mobilenetv1(num_classes: int = 1000) -> MobileNetV1:
    """MobileNet-V1 1.0 (mdistiller's ImageNet student)."""
    return MobileNetV1(num_classes=num_classes)
