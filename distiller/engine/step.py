"""One training step, top to bottom: teacher forward, student forward, loss, backward, update.

This is the engine's public seam. :func:`build_step` turns a student, a teacher, an objective and
the data's facts into a ready :class:`DistillStep` (teacher frozen, feature hooks set, shapes probed,
the methods' helpers built, networks compiled when asked); :func:`train_step` runs one optimisation
step through it. The loop, the benchmark and the tests all use these two, so one step can run
anywhere with one import::

    step = build_step(student, teacher, objective, data, runtime)
    step.phase = plan_phases(objective, step.student, epochs, lr)[-1]
    out = train_step(step, batch, epoch, optimizer, runtime)

:class:`DistillStep` is the forward half as one module (so DDP can wrap everything trainable in one
piece). Features come from :class:`distiller.features.FeatureHooks` on each network, as the methods
of the objective asked for them; the objective computes every phase's loss.

Seams for methods that need more than one forward and one backward:

* extra views (``DistillMethod.views``): both networks run on each view of the batch
  as a separate batch; the logits reach the method in ``Features.views[name]``;
* a teacher-output cache (:class:`~distiller.engine.teacher_cache.TeacherCache`, ``teacher.cache``):
  the teacher's logits on the batch's own images are read at the (image, crop, flip) the loader
  drew instead of computed (extra views still run the teacher); the job gives one only when no
  method reads more of that forward than its logits;
* split gradients: an optimizer that defines ``step_kd()`` (see
  :class:`SplitGradientOptimizer`) gets the distillation part's gradient first
  (recorded by ``step_kd``), then the task part's (applied by ``step``), from one
  shared forward.
"""
from __future__ import annotations

import warnings
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from datasets.batch import Batch
from distiller.engine.compile import compile_networks
from distiller.engine.plan import Phase
from distiller.engine.runtime import Runtime
from distiller.engine.teacher_cache import TeacherCache
from distiller.features import FeatureHooks, Features
from distiller.methods import BuildContext
from distiller.objective import LossParts, Objective


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
                 teacher: nn.Module | None = None, teacher_hooks: FeatureHooks | None = None,
                 teacher_cache: TeacherCache | None = None) -> None:
        super().__init__()
        self.student = student
        self.objective = objective
        self.student_hooks = student_hooks
        self.__dict__["teacher"] = teacher  # not a submodule: frozen, never wrapped, never in state_dict
        self.teacher_hooks = teacher_hooks
        self.teacher_cache = teacher_cache  # a plain object: no parameters, no buffers, nothing for DDP to sync
        self.phase: Phase | None = None

    def _teacher(self, images: torch.Tensor, batch: Batch | None = None
                 ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """The teacher's logits and hook store, without gradient (None when the phase needs no teacher).

        ``batch``: ``images`` are the batch's own (not an extra view), so a cache may stand in for the forward.
        """
        if self.teacher is None or not self.phase.needs_teacher:
            return None, {}
        if batch is not None and self.teacher_cache is not None:
            return self.teacher_cache.lookup(batch), {}  # the rows of this rank's (image, crop, flip) triples
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

    def remove_hooks(self) -> None:
        """Take the feature hooks off both networks (the step cannot run afterwards)."""
        self.student_hooks.remove()
        if self.teacher_hooks is not None:
            self.teacher_hooks.remove()

    def forward(self, batch: Batch, epoch: int) -> LossParts:
        phase = self.phase
        t_logits, t_store = self._teacher(batch.images, batch)
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
        teacher = Features(logits=t_logits) if t_logits is not None else None
        if not phase.is_main:
            per_method = {phase.owner: per_method[phase.owner]}
        return self.objective(Features(logits=s_logits), teacher, batch, epoch, per_method, phase.init)


def build_step(student: nn.Module, teacher: nn.Module | None, objective: Objective, data: Any, runtime: Runtime,
               epochs: int = 240, teacher_cache: TeacherCache | None = None) -> DistillStep:
    """A ready step: networks on the device in the runtime's memory format, the teacher frozen in eval mode
    (dropped when the objective never reads it), feature hooks for what the methods read, feature shapes
    probed at the data's resolution, the methods' helpers built from them and moved to the device, and
    both networks compiled when ``runtime.compile`` is set (after hooks and probes, which it keeps).

    ``data``: the loaded splits, for their facts (``num_classes``, ``train_labels``, ``image_shape``);
    ``epochs``: the main phase's length, for methods whose helpers depend on it; ``teacher_cache``: the
    teacher's logits on every training input, read instead of its forward (the job gives one only to an
    objective that reads nothing else of that forward).
    """
    device, fmt = runtime.device, runtime.memory_format()
    student = student.to(device=device, memory_format=fmt)
    reads_teacher = teacher is not None and objective.needs_teacher()
    # a method switched off (beta 0) is still built from both networks' feature shapes, as when it is on
    if teacher is not None and (reads_teacher or objective.entries):
        teacher = teacher.to(device=device, memory_format=fmt).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    else:
        teacher = None
    methods = [entry.method for entry in objective.entries]
    student_hooks = FeatureHooks(student, {k for m in methods for k in m.student_features})
    teacher_kinds = {k for m in methods for k in (*m.teacher_features, *(m.calibration_features or ()))}
    teacher_hooks = FeatureHooks(teacher, teacher_kinds) if teacher else None
    if objective.entries:
        ctx = BuildContext(num_classes=data.num_classes, num_samples=len(data.train_labels),
                           train_labels=data.train_labels.to(device), device=device, student=student,
                           teacher=teacher, epochs=epochs, image_shape=data.image_shape)
        objective.build(student_hooks, teacher_hooks, ctx, fmt)
    if not reads_teacher:  # probed for the shapes only: no step runs it
        teacher = None
    compile_networks(runtime, student, teacher)  # in place: names, identity and hooks kept
    return DistillStep(student, objective, student_hooks, teacher, teacher_hooks,
                       teacher_cache if teacher is not None else None)


def distribute(step: DistillStep, runtime: Runtime, find_unused_parameters: bool = False) -> nn.Module:
    """``step`` wrapped in DDP: gradients of everything trainable are all-reduced in each backward."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [runtime.device.index] if runtime.device.type == "cuda" else None
    with warnings.catch_warnings():
        # Buffers stay rank-local on purpose (CRD banks sync their own rows; BN statistics are per rank during
        # an epoch, and rank 0's are given to all before evaluating: runtime.share_rank0_buffers); the
        # replacement flag still syncs at init.
        warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
        return DistributedDataParallel(step, device_ids=ids, broadcast_buffers=False,
                                       find_unused_parameters=find_unused_parameters)


def _backward_and_update(out: LossParts, optimizer: torch.optim.Optimizer) -> None:
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
               runtime: Runtime, grad_norm: list[nn.Parameter] | None = None) -> LossParts:
    """Forward (under autocast) through ``step`` (a :class:`DistillStep`, maybe DDP-wrapped), backward, update.

    ``grad_norm``: parameters whose global gradient norm is added as a term (``trainer.nonfinite_check=grad``).
    """
    with runtime.autocast():
        out = step(batch, epoch)
    _backward_and_update(out, optimizer)
    if grad_norm is not None:
        grads = [p.grad for p in grad_norm if p.grad is not None]
        out.terms = {**out.terms, "grad_norm": torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))}
    optimizer.step()
    return out
