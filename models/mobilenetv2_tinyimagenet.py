"""MobileNet-V2 at full width for 64 px images: the student of DOT's ResNet18 -> MobileNet-V2 Tiny-ImageNet table.

The network mdistiller trains on Tiny-ImageNet (its ``mobilenetv2_tinyimagenet``), with its parameter names, so
its checkpoints load as they are. ``pre`` is the stem: a 1x1 convolution that keeps a padding of 1 (a 64 px image
gives 66 px maps), BN, ReLU6. ``stage1`` .. ``stage7`` are inverted residuals (1x1 expand-BN-ReLU6, 3x3
depthwise-BN-ReLU6, 1x1 project-BN, every convolution with a bias) widening 32 -> 320; a one-block stage is that
block itself, a longer one a Sequential. ``conv1`` is 1x1 conv-BN-ReLU6 to 1280, then a global pool and ``conv2``,
the classifier. It is not the zoo's CIFAR ``MobileNetV2`` (width 0.5, a strided 3x3 stem, ``blocks.*`` names).

Features where mdistiller returns them: the stem; the outputs of ``stage2``, ``stage3`` and ``stage4`` (24, 32
and 64 channels; they end in a linear BN, so each is its own pre-activation) and of ``conv1`` (1280 channels, the
map the pool averages; its pre-activation is the output of the BatchNorm ``conv1.1``, before the ReLU6).
Reductions count the strides; with the stem's 2 extra pixels a map is ceil((size + 2) / reduction) px wide.

mdistiller's ``conv2`` is a 1x1 convolution of the pooled 1x1 map, which computes a Linear of the pooled vector.
Here it is that Linear (:class:`PointwiseLinear`), so the embedding is the [N, 1280] vector and the methods that
read a classifier's weight (SDD, CAT-KD) work; it is saved and loaded as the convolution, weight
[classes, 1280, 1, 1]. Initialisation: PyTorch's defaults, as in mdistiller (a Linear's default draws from the
same distribution as the 1x1 convolution's: both have fan-in 1280).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from models import MODELS
from models.features import FeatureInfo
from models.layers import GlobalAvgPool, pool_input_feature

STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
# (expansion t, output channels, blocks, stride of the first block) of stage1 .. stage7
STAGES: list[tuple[int, int, int, int]] = [
    (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 1), (6, 320, 1, 1),
]
TAPPED_STAGES = (2, 3, 4)  # mdistiller's f1, f2, f3; f4 is conv1's output


class LinearBottleneck(nn.Module):
    """``residual``: 1x1 expand-BN-ReLU6, 3x3 depthwise (strided)-BN-ReLU6, 1x1 project-BN (linear);
    the input is added when the block keeps the shape (stride 1 and as many channels out as in)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        self.residual = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, out_channels, 1),
            nn.BatchNorm2d(out_channels),
        )
        self.identity = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.residual(x)
        return out + x if self.identity else out  # not in place: x may be a tapped stage output

    def extra_repr(self) -> str:
        return f"identity={self.identity}"


class PointwiseLinear(nn.Linear):
    """A Linear whose state-dict form is the equal 1x1 convolution's (weight [out, in, 1, 1]).

    A 1x1 convolution of a pooled 1x1 map and this Linear of the pooled vector compute the same sums;
    keeping the convolution's form in checkpoints lets mdistiller's files load, while the weight stays the
    2-D matrix every classifier-reading method expects.
    """

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        weight = destination[prefix + "weight"]
        destination[prefix + "weight"] = weight.view(*weight.shape, 1, 1)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        key = prefix + "weight"
        weight = state_dict.get(key)
        if isinstance(weight, torch.Tensor) and weight.dim() == 4 and weight.shape[2:] == (1, 1):
            state_dict[key] = weight.flatten(1)  # load_state_dict hands each module its own copy of the dict
        super()._load_from_state_dict(state_dict, prefix, *args)


class MobileNetV2TinyImageNet(nn.Module):
    """``pre`` (1x1 conv, padding 1), seven inverted-residual stages, ``conv1`` to 1280, global pool, ``conv2``."""

    def __init__(self, num_classes: int = 200) -> None:
        super().__init__()
        # Tapped activations are out of place: the stem's output is a tap, conv1's BN output the last preact tap.
        self.pre = nn.Sequential(nn.Conv2d(3, STEM_CHANNELS, 1, padding=1), nn.BatchNorm2d(STEM_CHANNELS), nn.ReLU6())
        channels, reduction, reductions = STEM_CHANNELS, 1, {}
        for k, (t, out, blocks, stride) in enumerate(STAGES, start=1):
            units = [LinearBottleneck(channels if i == 0 else out, out, stride if i == 0 else 1, t)
                     for i in range(blocks)]
            self.add_module(f"stage{k}", units[0] if blocks == 1 else nn.Sequential(*units))
            channels, reduction = out, reduction * stride
            reductions[k] = reduction
        self.conv1 = nn.Sequential(nn.Conv2d(channels, HEAD_CHANNELS, 1), nn.BatchNorm2d(HEAD_CHANNELS), nn.ReLU6())
        self.pool = GlobalAvgPool()  # mdistiller's adaptive_avg_pool2d(x, 1): the same average
        self.conv2 = PointwiseLinear(HEAD_CHANNELS, num_classes)
        self.feature_info = [FeatureInfo("stem", "pre", STEM_CHANNELS, 1)]
        for i, k in enumerate(TAPPED_STAGES, start=1):
            _, out, blocks, _ = STAGES[k - 1]
            self.feature_info.append(FeatureInfo(f"stage{i}", f"stage{k}", out, reductions[k],
                                                 bn=f"stage{k}.{blocks - 1}.residual.7"))
        self.feature_info.append(FeatureInfo(f"stage{len(TAPPED_STAGES) + 1}", "conv1", HEAD_CHANNELS, reduction,
                                             preact="conv1.2", preact_input=True, bn="conv1.1"))
        self.feature_info.append(pool_input_feature("pool", HEAD_CHANNELS, reduction))
        self.feature_info.append(FeatureInfo("embedding", "conv2", HEAD_CHANNELS, None, module_input=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.pre(x)
        for stage in (self.stage1, self.stage2, self.stage3, self.stage4, self.stage5, self.stage6, self.stage7):
            out = stage(out)
        return self.conv2(self.pool(self.conv1(out)).flatten(1))


@MODELS.register("mobilenetv2_tinyimagenet")
def mobilenetv2_tinyimagenet(num_classes: int = 200) -> MobileNetV2TinyImageNet:
    """mdistiller's Tiny-ImageNet MobileNet-V2 (full width, 66 px maps from 64 px images, 1280-d head)."""
    return MobileNetV2TinyImageNet(num_classes=num_classes)
