"""torchvision's ResNet blocks with a final ReLU of their own, so the pre-activation sum can be tapped.

torchvision's ``BasicBlock`` and ``Bottleneck`` call one in-place ``relu`` for every activation of
the block, the last one on ``bn(conv(...)) + identity``: no hook can tell that call from the
others, and the in-place ReLU overwrites the sum. AB and OFD need exactly that sum (the zoo's
CIFAR ResNets expose it as ``relu_out@in``). :func:`make_tappable` gives the *last* block of a
stage a forward that computes the same values, ending in a separate, out-of-place ``relu_out``.
The parameters and buffers are unchanged (a ReLU has none), so torchvision's weights and our
checkpoints load as before. Imported only when a torchvision ResNet is built (importing
torchvision costs seconds).
"""
from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck


class TappableBasicBlock(BasicBlock):
    """torchvision's ``BasicBlock`` whose final activation is ``relu_out`` (its input: the pre-activation sum)."""

    relu_out: nn.ReLU

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu_out(out + identity)


class TappableBottleneck(Bottleneck):
    """torchvision's ``Bottleneck`` whose final activation is ``relu_out`` (its input: the pre-activation sum)."""

    relu_out: nn.ReLU

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu_out(out + identity)


# torchvision's block class -> (its tappable twin, the BatchNorm that ends the residual branch)
TAPPABLE = {BasicBlock: (TappableBasicBlock, "bn2"), Bottleneck: (TappableBottleneck, "bn3")}


def make_tappable(block: nn.Module) -> str | None:
    """Turn ``block`` (in place) into its tappable twin; returns the name of the BatchNorm before the sum.

    None when ``block`` is not exactly torchvision's ``BasicBlock``/``Bottleneck`` (a subclass may
    compute something else, so it is left alone). Calling it again on a converted block is harmless.
    """
    for plain, (twin, bn) in TAPPABLE.items():
        if type(block) is twin:
            return bn
        if type(block) is plain:
            block.__class__ = twin
            block.relu_out = nn.ReLU(inplace=False)  # out of place: the hooked sum stays as it was
            return bn
    return None
