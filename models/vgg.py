"""VGG with BatchNorm for CIFAR (Simonyan & Zisserman, 2015), without the large FC layers.

Five conv blocks (``block0..block4``, each conv-BN-ReLU ... conv-BN) and one ``classifier``
Linear, as in the widely shared CIFAR-100 checkpoints (there "vgg8" means the BN variant).
Each block's closing ReLU is its own module (``relu0..relu4``), outside the block, so the
block's output is the preact feature and the ReLU's output the post-activation one.
Max-pools between blocks 0-1, 1-2, 2-3; the pool between blocks 3 and 4 only runs on 64 px
inputs, so on CIFAR blocks 3 and 4 both work at 4x4.
"""
from __future__ import annotations

import torch
from torch import nn

from models import MODELS
from models.features import FeatureInfo
from models.layers import init_normal_fan_out_, pool_input_feature

_CFG: dict[str, list[list[int]]] = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "vgg19": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}


def _make_block(widths: list[int], in_channels: int) -> nn.Sequential:
    """conv-BN-ReLU repeated, the last ReLU left out (the model applies it as its own module)."""
    layers: list[nn.Module] = []
    for v in widths:
        layers += [nn.Conv2d(in_channels, v, kernel_size=3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
        in_channels = v
    return nn.Sequential(*layers[:-1])


class VGG(nn.Module):
    """VGG-BN for CIFAR: five blocks, global average pool, one Linear ``classifier``."""

    def __init__(self, cfg: list[list[int]], num_classes: int = 100) -> None:
        super().__init__()
        in_channels = [3] + [widths[-1] for widths in cfg[:-1]]
        self.block0 = _make_block(cfg[0], in_channels[0])
        self.block1 = _make_block(cfg[1], in_channels[1])
        self.block2 = _make_block(cfg[2], in_channels[2])
        self.block3 = _make_block(cfg[3], in_channels[3])
        self.block4 = _make_block(cfg[4], in_channels[4])
        # Stage-final activations are tapped: separate modules, not in place.
        self.relu0, self.relu1, self.relu2, self.relu3, self.relu4 = (nn.ReLU() for _ in range(5))
        self.pool0 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool1 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool2 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool3 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool4 = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Linear(cfg[4][-1], num_classes)
        init_normal_fan_out_(self, linear_std=0.01)
        # stage i is block i's ReLU; its pre-activation is the block's output, its last module a BatchNorm
        self.feature_info = [FeatureInfo("stem", "relu0", cfg[0][-1], 1)]
        self.feature_info += [
            FeatureInfo(f"stage{i}", f"relu{i}", cfg[i][-1], min(2 ** i, 8), preact=f"block{i}",
                        bn=f"block{i}.{len(getattr(self, f'block{i}')) - 1}")
            for i in range(1, 5)]
        self.feature_info.append(pool_input_feature("pool4", cfg[4][-1], 8))
        self.feature_info.append(FeatureInfo("embedding", "classifier", cfg[4][-1], None, module_input=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.shape[2]
        x = self.pool0(self.relu0(self.block0(x)))
        x = self.pool1(self.relu1(self.block1(x)))
        x = self.pool2(self.relu2(self.block2(x)))
        x = self.relu3(self.block3(x))
        if h == 64:  # as the reference: the 4th pool only for 64 px inputs
            x = self.pool3(x)
        x = self.relu4(self.block4(x))
        x = self.pool4(x)
        return self.classifier(x.flatten(1))


@MODELS.register("vgg8")
def vgg8(num_classes: int = 100) -> VGG:
    """VGG-8 with BatchNorm (one conv per block)."""
    return VGG(_CFG["vgg8"], num_classes)


@MODELS.register("vgg11")
def vgg11(num_classes: int = 100) -> VGG:
    """VGG-11 with BatchNorm."""
    return VGG(_CFG["vgg11"], num_classes)


@MODELS.register("vgg13")
def vgg13(num_classes: int = 100) -> VGG:
    """VGG-13 with BatchNorm."""
    return VGG(_CFG["vgg13"], num_classes)


@MODELS.register("vgg16")
def vgg16(num_classes: int = 100) -> VGG:
    """VGG-16 with BatchNorm."""
    return VGG(_CFG["vgg16"], num_classes)


@MODELS.register("vgg19")
def vgg19(num_classes: int = 100) -> VGG:
    """VGG-19 with BatchNorm."""
    return VGG(_CFG["vgg19"], num_classes)
