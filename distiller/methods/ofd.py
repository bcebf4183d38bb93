"""OFD (Heo et al., "A Comprehensive Overhaul of Feature Distillation", ICCV 2019).

Student pre-activation stage maps go through a 1x1 conv + BN connector to the teacher's
width and are matched to the teacher's pre-activation maps with a partial L2 that ignores
the teacher's negative responses below a per-channel margin: the expected value of the
negative part of ``N(beta, gamma^2)``, read from the BatchNorm that produces the teacher's
pre-activation. The teacher's BatchNorm layers stay in train mode (as in the paper).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as TF
from torch import nn

from common.errors import UserError
from datasets.batch import Batch
from distiller import functional as F
from distiller.features import STAGES_PREACT, Features, feature_info
from distiller.helpers import log_stage_pairing, pair_stages
from distiller.methods.base import METHODS, BuildContext, DistillMethod, TermContext


@dataclass(frozen=True)
class PreactBatchNorm:
    """The BatchNorm that feeds one pre-activation stage map of a network."""

    stage: str
    name: str  # module path inside the network
    module: nn.BatchNorm2d


def find_preact_batchnorms(model: nn.Module) -> list[PreactBatchNorm]:
    """For every stage of ``model``, the BatchNorm2d its ``feature_info`` declares before the activation.

    That is the layer mdistiller's ``get_bn_before_relu`` names: ``bn2`` (``bn3`` for
    bottlenecks) of the stage's last block in ResNets, the next group's ``bn1`` (the final
    ``bn1`` for the last stage) in WRN, the last BN of each block in VGG, the last block's
    linear BN in MobileNetV2. Raises :class:`UserError` for a stage that declares none.
    """
    found = []
    for info in feature_info(model):
        if not info.is_stage:
            continue
        module = model.get_submodule(info.bn) if info.bn is not None else None
        if not isinstance(module, nn.BatchNorm2d):
            raise UserError(f"ofd: the pre-activation of {type(model).__name__} {info.name} is not the output "
                            "of a BatchNorm2d (or a residual sum with one), so no OFD margin can be derived; "
                            "use a teacher with BatchNorm before its stage activations (e.g. a ResNet, WRN or VGG)")
        found.append(PreactBatchNorm(info.name, info.bn, module))
    return found


class OFDConnector(nn.Sequential):
    """1x1 conv (no bias) + BN from the student's to the teacher's width, initialised as the reference."""

    def __init__(self, s_channels: int, t_channels: int) -> None:
        conv = nn.Conv2d(s_channels, t_channels, kernel_size=1, bias=False)
        bn = nn.BatchNorm2d(t_channels)
        # He-normal on fan-out (n = k*k*out), BN as identity: the reference initialisation
        nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / (conv.kernel_size[0] * conv.kernel_size[1] * t_channels)))
        nn.init.ones_(bn.weight)
        nn.init.zeros_(bn.bias)
        super().__init__(conv, bn)


@METHODS.register("ofd", aliases=("overhaul",))
class OFD(DistillMethod):
    """OFD (Heo et al., ICCV 2019): margin-ReLU partial L2 between connected student and teacher pre-activations.

    Stages are paired from the deepest up (last ``min(L_s, L_t)`` of each, as mdistiller);
    stage ``i`` of ``n`` is weighted ``1/2^(n-i-1)``; the teacher map is average-pooled to
    the student's size where they differ.
    """

    student_features = frozenset({STAGES_PREACT})
    teacher_features = frozenset({STAGES_PREACT})
    teacher_bn_train = True

    def __init__(self) -> None:
        super().__init__()
        self.connectors = nn.ModuleList()
        self.bn_names: list[str] = []  # teacher BatchNorms the margins came from (for logs and checks)

    def build(self, student: Features[torch.Size], teacher: Features[torch.Size], ctx: BuildContext) -> None:
        pairs = pair_stages(student.stages, teacher.stages, "ofd")
        log_stage_pairing("ofd", len(student.stages), len(teacher.stages))
        bns = find_preact_batchnorms(ctx.teacher)
        if len(bns) != len(teacher.stages):
            raise UserError(f"ofd: found {len(bns)} stage BatchNorms in the teacher but it has "
                            f"{len(teacher.stages)} stages; check its feature_info")
        for i, ((s_shape, t_shape), bn) in enumerate(zip(pairs, bns[len(bns) - len(pairs):])):
            if bn.module.num_features != t_shape[1]:
                raise UserError(f"ofd: teacher BatchNorm {bn.name} has {bn.module.num_features} channels "
                                f"but teacher {bn.stage} has {t_shape[1]}")
            self.connectors.append(OFDConnector(s_shape[1], t_shape[1]))
            margin = F.ofd_margin(bn.module).detach().to(device=ctx.device, dtype=torch.float32)
            self.register_buffer(f"margin{i}", margin)
            self.bn_names.append(bn.name)
        self.to(ctx.device)

    def margins(self) -> list[torch.Tensor]:
        """Per-stage margins [C_t], shallow to deep."""
        return [getattr(self, f"margin{i}") for i in range(len(self.connectors))]

    def forward(self, student: Features[torch.Tensor], teacher: Features[torch.Tensor],
                batch: Batch, ctx: TermContext) -> dict[str, torch.Tensor]:
        n = len(self.connectors)
        total = student.stages[-1].new_zeros((), dtype=torch.float32)
        pairs = pair_stages(student.stages, teacher.stages, "ofd")
        for i, (connector, margin, (f_s, f_t)) in enumerate(zip(self.connectors, self.margins(), pairs)):
            source = connector(f_s)
            if f_t.shape[-2:] != source.shape[-2:]:
                f_t = TF.adaptive_avg_pool2d(f_t, source.shape[-2:])
            total = total + F.ofd(source, f_t, margin) / 2 ** (n - i - 1)
        return {"ofd": total}
