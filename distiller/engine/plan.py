"""The phase plan of a run and the plain settings of its loop.

A run is a list of phases: each method's initialisation phases (AB, FT, FSP) first,
then the main phase. Each phase says what it trains, for how long, at which lr,
and whether it needs the student's forward and the teacher.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn

from distiller.objective import Objective


@dataclass
class PlannedPhase:
    """A phase as the trainer runs it."""

    name: str
    epochs: int
    parameters: list[nn.Parameter]
    lr: float
    is_main: bool
    student_forward: bool = True
    owner: str | None = None  # label of the method whose phase this is
    needs_teacher: bool = True
    loss: Callable[..., dict[str, torch.Tensor]] | None = None

    def set_modes(self, student: nn.Module, helpers: nn.Module, teacher: nn.Module | None,
                  teacher_bn_train: bool = False) -> None:
        """Train/eval modes for this phase.

        Main phase: student and helpers in train mode, the teacher in eval (its BatchNorms in
        train mode when a method asks, as OFD). Initialisation phase: as the older frameworks,
        the student in eval mode except the modules whose parameters the phase trains, so its
        BatchNorms outside the trained set keep their statistics.
        """
        student.train(self.is_main)
        if not self.is_main:
            wanted = {id(p) for p in self.parameters}
            for m in student.modules():
                own = list(m.parameters(recurse=False))
                if own and all(id(p) in wanted for p in own):
                    m.train()
        helpers.train()
        if teacher is not None:
            teacher.eval()
            if self.is_main and teacher_bn_train:
                for m in teacher.modules():
                    if isinstance(m, nn.modules.batchnorm._BatchNorm):
                        m.train()

    @property
    def tag(self) -> str:
        """TensorBoard prefix of the phase's scalars."""
        return "train" if self.is_main else f"init/{self.name}"


def plan_phases(objective: Objective, student: nn.Module, settings: TrainSettings) -> list[PlannedPhase]:
    """``[*each method's initialisation phases, main]``; phase names made unique by the method label."""
    plan: list[PlannedPhase] = []
    for entry in objective.entries:
        for phase in entry.method.phases():
            plan.append(PlannedPhase(
                name=phase.name if phase.name not in {p.name for p in plan} else f"{entry.label}_{phase.name}",
                epochs=int(phase.epochs), parameters=list(phase.parameters(student)),
                lr=float(phase.lr if phase.lr is not None else settings.lr), is_main=False,
                student_forward=phase.student_forward, owner=entry.label, loss=phase.loss))
    main_params = list(student.parameters()) + objective.main_parameters()
    main_needs_teacher = objective.alpha > 0 or bool(objective.active())
    plan.append(PlannedPhase("main", settings.epochs, main_params, settings.lr, is_main=True,
                             needs_teacher=main_needs_teacher))
    return plan


def lr_at(base_lr: float, epoch: int, milestones: Iterable[int], decay: float) -> float:
    """Step schedule of the published recipe: ``base * decay ** #(milestones < epoch)``, epochs from 1."""
    return base_lr * decay ** sum(1 for m in milestones if epoch > m)


@dataclass
class TrainSettings:
    """Plain settings of the loop, resolved from config by the entry point."""

    epochs: int
    lr: float
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    optimizer_impl: str = "auto"
    milestones: tuple[int, ...] = (150, 180, 210)
    lr_decay: float = 0.1
    batch_size: int = 64
    eval_batch_size: int = 1024
    seed: int = 0
    log_interval: int = 50
    checkpoint_every_steps: int = 0
    nonfinite_check: str = "loss"
    progress: bool = True
    find_unused_parameters: bool = False
    optimizer: str = "sgd"  # a name in OPTIMIZERS (config: optim.name)
    optimizer_options: dict[str, Any] = field(default_factory=dict)  # its own keys (e.g. DOT's delta)
