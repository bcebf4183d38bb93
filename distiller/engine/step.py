"""One training step, top to bottom: teacher forward, student forward, loss, backward, update.

:class:`DistillStep` is the forward half as one module (so DDP can wrap everything
trainable in one piece); :func:`train_step` adds backward and the optimizer update.
Features come from :class:`distiller.features.FeatureHooks` on each network, as the
methods of the objective asked for them.

Seams for methods that need more than one forward and one backward:

* extra views (``DistillMethod.views``): both networks run on each view of the batch
  as a separate batch; the logits reach the method in ``Features.views[name]``;
* split gradients: an optimizer that defines ``step_kd()`` (see
  :class:`SplitGradientOptimizer`) gets the distillation part's gradient first
  (recorded by ``step_kd``), then the task part's (applied by ``step``), from one
  shared forward.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from datasets.batch import Batch
from distiller.engine.plan import PlannedPhase
from distiller.engine.runtime import Runtime
from distiller.features import FeatureHooks, Features
from distiller.objective import Objective


@dataclass
class StepOutput:
    """What one step produced: the minimised total, its task and distillation parts, the unweighted
    named terms and the student's logits on the main view (None in a phase without student forward)."""

    total: torch.Tensor
    terms: dict[str, torch.Tensor]
    logits: torch.Tensor | None
    task: torch.Tensor | None = None
    distill: torch.Tensor | None = None


@runtime_checkable
class SplitGradientOptimizer(Protocol):
    """An optimizer that treats the task and the distillation gradients apart (e.g. two momenta).

    Per step: ``zero_grad``; the distillation loss's backward; ``step_kd()`` records the gradients;
    ``zero_grad``; the task loss's backward; ``step()`` updates with both.
    """

    def step_kd(self) -> None: ...

    def step(self) -> None: ...


class DistillStep(nn.Module):
    """Teacher (no grad) and student forwards of one step and the phase's loss.

    The teacher is held outside the module's parameters (a plain attribute), so DDP
    wraps only what trains: student and objective (the methods' helpers).
    """

    def __init__(self, student: nn.Module, objective: Objective, student_hooks: FeatureHooks,
                 teacher: nn.Module | None = None, teacher_hooks: FeatureHooks | None = None) -> None:
        super().__init__()
        self.student = student
        self.objective = objective
        self.student_hooks = student_hooks
        self.__dict__["teacher"] = teacher  # not a submodule: frozen, never wrapped, never in state_dict
        self.teacher_hooks = teacher_hooks
        self.phase: PlannedPhase | None = None

    def _teacher(self, images: torch.Tensor) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """The teacher's logits and hook store, without gradient (None when the phase needs no teacher)."""
        if self.teacher is None or not self.phase.needs_teacher:
            return None, {}
        with torch.no_grad():
            logits = self.teacher(images)
        return logits, self.teacher_hooks.pop()

    def _student(self, images: torch.Tensor) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        if not self.phase.student_forward:
            return None, {}
        logits = self.student(images)
        return logits, self.student_hooks.pop()

    def _views(self, batch: Batch) -> dict[str, tuple[Features, Features]]:
        """Logits of both networks on every extra view of the batch, each view a batch of its own."""
        out = {}
        for name, images in batch.views.items():
            t_logits, _ = self._teacher(images)
            s_logits, _ = self._student(images)
            out[name] = (Features(logits=s_logits), Features(logits=t_logits))
        return out

    def forward(self, batch: Batch, epoch: int) -> StepOutput:
        phase = self.phase
        t_logits, t_store = self._teacher(batch.images)
        s_logits, s_store = self._student(batch.images)
        views = self._views(batch) if phase.is_main else {}
        per_method: dict[str, tuple[Features, Features]] = {}
        for entry in self.objective.entries:
            method = entry.method
            s = (self.student_hooks.select(s_store, s_logits, method.student_features)
                 if s_logits is not None else Features())
            t = (self.teacher_hooks.select(t_store, t_logits, method.teacher_features)
                 if t_logits is not None else Features())
            for name in method.views:
                s.views[name], t.views[name] = views[name]
            per_method[entry.label] = (s, t)
        if phase.is_main:
            teacher = Features(logits=t_logits) if t_logits is not None else None
            parts = self.objective(Features(logits=s_logits), teacher, batch, epoch, per_method)
            return StepOutput(parts.total, parts.terms, s_logits, parts.task, parts.distill)
        s_feats, t_feats = per_method[phase.owner]
        terms = phase.loss(s_feats, t_feats, batch)
        total = sum(v.float() for v in terms.values())
        return StepOutput(total, terms, s_logits)


def distribute(step: DistillStep, runtime: Runtime, find_unused_parameters: bool = False) -> nn.Module:
    """``step`` wrapped in DDP: gradients of everything trainable are all-reduced in each backward."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [runtime.device.index] if runtime.device.type == "cuda" else None
    with warnings.catch_warnings():
        # Buffers stay rank-local on purpose (CRD banks sync their own rows; BN statistics
        # are per rank unless trainer.sync_bn); the replacement flag still syncs at init.
        warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
        return DistributedDataParallel(step, device_ids=ids, broadcast_buffers=False,
                                       find_unused_parameters=find_unused_parameters)


def _backward_and_update(out: StepOutput, optimizer: torch.optim.Optimizer) -> None:
    if isinstance(optimizer, SplitGradientOptimizer) and out.task is not None:
        # a part that is a constant (no CE with gamma 0; no distillation when training a teacher) has no graph
        optimizer.zero_grad(set_to_none=True)
        if out.distill.requires_grad:
            out.distill.backward(retain_graph=out.task.requires_grad)
        optimizer.step_kd()
        optimizer.zero_grad(set_to_none=True)
        if out.task.requires_grad:
            out.task.backward()
    else:
        optimizer.zero_grad(set_to_none=True)
        out.total.backward()


def train_step(step: nn.Module, batch: Batch, epoch: int, optimizer: torch.optim.Optimizer,
               runtime: Runtime, phase: PlannedPhase, grad_norm: bool = False) -> StepOutput:
    """Forward (under autocast) through ``step`` (a :class:`DistillStep`, maybe DDP-wrapped), backward, update.

    ``grad_norm`` adds the global gradient norm of the phase's parameters as a term
    (``trainer.nonfinite_check=grad``).
    """
    with runtime.autocast():
        out = step(batch, epoch)
    _backward_and_update(out, optimizer)
    if grad_norm:
        grads = [p.grad for p in phase.parameters if p.grad is not None]
        out.terms = {**out.terms, "grad_norm": torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))}
    optimizer.step()
    return out
