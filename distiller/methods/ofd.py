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
from functools import partial
from itertools import count
from typing import Sequence

import torch
import torch.nn.functional as TF
from torch import nn

from datasets.batch import Batch
from distiller import functional as F
from distiller.features import feature_specs
from distiller.helpers import log_stage_pairing, pair_stages
from distiller.methods.base import STAGES, METHODS, BuildContext, DistillMethod, Features, Taps
from common.errors import UserError

# Autograd nodes that pass a BatchNorm's output on unchanged or add it into a residual sum:
# the pre-activation of a residual block is ``bn(conv(x)) + shortcut``, still "that BN's" map.
_PASS_THROUGH = {"AddBackward", "CloneBackward", "ViewBackward", "UnsafeViewBackward", "AliasBackward",
                 "ReshapeAliasBackward", "ToCopyBackward"}


def _graph_depth(node: object, memo: dict[object, int]) -> int:
    """Length of the longest autograd path from ``node`` down to a leaf (iterative: graphs are deep)."""
    stack = [(node, False)]
    while stack:
        current, expanded = stack.pop()
        if current in memo:
            continue
        children = [c for c, _ in current.next_functions if c is not None]
        if expanded:
            memo[current] = 1 + max((memo[c] for c in children), default=0)
        else:
            stack.append((current, True))
            stack.extend((c, False) for c in children if c not in memo)
    return memo[node]


@dataclass(frozen=True)
class PreactBatchNorm:
    """The BatchNorm that feeds one pre-activation stage map of a network."""

    stage: str
    name: str  # module path inside the network
    module: nn.BatchNorm2d


def find_preact_batchnorms(model: nn.Module, input_size: Sequence[int] = (2, 3, 32, 32),
                           device: torch.device | str | None = None) -> list[PreactBatchNorm]:
    """For every stage of ``model``, the BatchNorm2d whose output is its pre-activation map.

    Found generically with one probe forward (eval mode, no statistics touched): forward
    hooks record the autograd node each BatchNorm2d output came from, and from the node of
    each pre-activation tap the graph is walked back through additions (residual sums)
    and views only. The BatchNorms reached that way with the tap's shape are candidates.
    For plain nets and WRN, whose stage pre-activation *is* a BN output, there is one. For
    a residual sum there can be two, the residual branch's last BN and a BN on the shortcut
    (a projection shortcut's BN, or the previous block's linear BN in MobileNetV2); the
    residual branch is the longer path, so the candidate deepest in the graph is taken.
    That is the layer mdistiller's ``get_bn_before_relu`` names: ``bn2`` (``bn3`` for
    bottlenecks) of the stage's last block in ResNets, the next group's ``bn1`` (the final
    ``bn1`` for the last stage) in WRN, the last BN of each block in VGG, the last block's
    linear BN in MobileNetV2.
    Raises :class:`UserError` for a stage whose pre-activation is not such a map.
    """
    if device is None:
        device = next(model.parameters()).device
    specs = [s for s in feature_specs(model) if s.name not in ("stem", "embedding")]
    order = count()
    bn_nodes: dict[object, tuple[int, str, nn.BatchNorm2d, torch.Size, object]] = {}
    taps: dict[str, tuple[object, torch.Size]] = {}

    def on_bn(name: str, module: nn.BatchNorm2d, args: tuple, out: torch.Tensor) -> None:
        # keep the node now: a later in-place op (``out += shortcut``, an in-place ReLU) rebinds out.grad_fn
        if out.grad_fn is not None:
            bn_nodes[out.grad_fn] = (next(order), name, module, out.shape, out.grad_fn)

    def on_tap(stage: str, tensor: torch.Tensor) -> None:
        taps[stage] = (tensor.grad_fn, tensor.shape)

    handles = [m.register_forward_hook(partial(on_bn, n)) for n, m in model.named_modules()
               if isinstance(m, nn.BatchNorm2d)]
    for spec in specs:
        tap = spec.pre if spec.pre is not None else spec.post
        module = model.get_submodule(tap.module)
        if tap.take_input:
            handles.append(module.register_forward_pre_hook(
                lambda m, args, stage=spec.name: on_tap(stage, args[0])))
        else:
            handles.append(module.register_forward_hook(
                lambda m, args, out, stage=spec.name: on_tap(stage, out)))
    modes = {m: m.training for m in model.modules()}
    model.eval()  # eval: the probe must not move any running statistics
    try:
        with torch.enable_grad():
            # a leaf that requires grad gives every activation an autograd node, frozen weights or not;
            # only the graph's structure is read, so a constant input does (and leaves the RNG alone)
            x = torch.zeros(*input_size, device=device, requires_grad=True)
            model(x)
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in modes.items():
            module.training = mode

    found = []
    depths: dict[object, int] = {}
    for spec in specs:
        node, shape = taps.get(spec.name, (None, None))
        candidates = []
        stack, seen = [node], set()
        while stack:
            current = stack.pop()
            if current is None or current in seen:
                continue
            seen.add(current)
            if current in bn_nodes:
                if bn_nodes[current][3] == shape:
                    candidates.append(bn_nodes[current])
                continue
            if type(current).__name__.rstrip("0123456789") in _PASS_THROUGH:
                stack.extend(nxt for nxt, _ in current.next_functions)
        if not candidates:
            raise UserError(f"ofd: the pre-activation of {type(model).__name__} {spec.name} is not the output "
                            "of a BatchNorm2d (or a residual sum with one), so no OFD margin can be derived; "
                            "use a teacher with BatchNorm before its stage activations (e.g. a ResNet, WRN or VGG)")
        _, name, module, _, _ = max(candidates, key=lambda c: (_graph_depth(c[4], depths), -c[0]))
        found.append(PreactBatchNorm(spec.name, name, module))
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

    taps = Taps.of(student={STAGES}, teacher={STAGES}, student_preact=True, teacher_preact=True)
    teacher_bn_train = True

    def __init__(self) -> None:
        super().__init__()
        self.connectors = nn.ModuleList()
        self.bn_names: list[str] = []  # teacher BatchNorms the margins came from (for logs and checks)

    def build(self, student: Features[torch.Size], teacher: Features[torch.Size], ctx: BuildContext) -> None:
        pairs = pair_stages(student.stages, teacher.stages, "ofd")
        log_stage_pairing("ofd", len(student.stages), len(teacher.stages))
        bns = find_preact_batchnorms(ctx.teacher, device=ctx.device)
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
                batch: Batch) -> dict[str, torch.Tensor]:
        n = len(self.connectors)
        total = student.stages[-1].new_zeros((), dtype=torch.float32)
        pairs = pair_stages(student.stages, teacher.stages, "ofd")
        for i, (connector, margin, (f_s, f_t)) in enumerate(zip(self.connectors, self.margins(), pairs)):
            source = connector(f_s)
            if f_t.shape[-2:] != source.shape[-2:]:
                f_t = TF.adaptive_avg_pool2d(f_t, source.shape[-2:])
            total = total + F.ofd(source, f_t, margin) / 2 ** (n - i - 1)
        return {"ofd": total}
