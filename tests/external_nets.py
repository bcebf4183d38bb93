"""A network of the tests' own, built by import path (``teacher=module teacher._target_=tests.external_nets.TinyNet``).

It declares no ``feature_info``: its features come from the config, as a user's network's would. Every
activation is its own module, and the stage-final ones are not in place, so the pre-activation
maps (the input of ``act``) can be tapped too.
"""
from __future__ import annotations

import torch
from torch import nn


class TinyBlock(nn.Module):
    """conv(stride)-BN, then a ReLU of its own (``act``; its input is the pre-activation map)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class TinyNet(nn.Module):
    """Stem conv-BN-ReLU and three stages (stride 1, 2, 2) of ``width``, ``2*width``, ``4*width`` channels."""

    def __init__(self, num_classes: int = 10, width: int = 8) -> None:
        super().__init__()
        self.stem = TinyBlock(3, width, 1)
        self.stage1 = TinyBlock(width, width, 1)
        self.stage2 = TinyBlock(width, 2 * width, 2)
        self.stage3 = TinyBlock(2 * width, 4 * width, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage3(self.stage2(self.stage1(self.stem(x))))
        return self.head(self.pool(x).flatten(1))


# the features of TinyNet written as a config's ``features`` node
TINY_FEATURES = {"stem": "stem", "stages": ["stage1", "stage2", "stage3"], "embedding": "head@in",
                 "preact": ["stage1.act@in", "stage2.act@in", "stage3.act@in"],
                 "bn": ["stage1.bn", "stage2.bn", "stage3.bn"]}


def bare_resnet56(num_classes: int = 100) -> nn.Module:
    """The zoo's resnet56 without its ``feature_info``: every feature then has to come from the config."""
    from models import build_model

    model = build_model("resnet56", num_classes=num_classes)
    del model.feature_info
    return model
