"""The phase plan of a run: each method's initialisation phases (AB, FT, FSP) first, then the main phase.

Each phase says what it trains, for how long, at which lr, and whether it needs the student's
forward and the teacher; the schedule steps its lr down at the milestones.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from torch import nn

from distiller.methods import InitPhase
from distiller.objective import Objective


@dataclass
class Phase:
    """A phase as the loop runs it: the main phase (``init`` None) or a method's initialisation phase."""

    name: str
    epochs: int
    parameters: list[nn.Parameter]
    lr: float
    init: InitPhase | None = None  # what the method declared, for an initialisation phase
    owner: str | None = None  # label of the method whose initialisation phase this is
    needs_teacher: bool = True

    @property
    def is_main(self) -> bool:
        return self.init is None

    @property
    def student_forward(self) -> bool:
        return self.init is None or self.init.student_forward

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


def plan_phases(objective: Objective, student: nn.Module, epochs: int, lr: float) -> list[Phase]:
    """``[*each method's initialisation phases, main]``; phase names made unique by the method label.

    The main phase trains the student's trainable parameters (a method may have frozen some, e.g. a
    classifier bias) and the active methods' helpers, for ``epochs`` at ``lr``.
    """
    plan: list[Phase] = []
    for entry in objective.entries:
        for init in entry.method.phases():
            plan.append(Phase(
                name=init.name if init.name not in {p.name for p in plan} else f"{entry.label}_{init.name}",
                epochs=int(init.epochs), parameters=list(init.parameters(student)),
                lr=float(init.lr if init.lr is not None else lr), init=init, owner=entry.label))
    main_params = [p for p in student.parameters() if p.requires_grad] + objective.main_parameters()
    plan.append(Phase("main", epochs, main_params, lr, needs_teacher=objective.alpha > 0 or bool(objective.active())))
    return plan


def lr_at(base_lr: float, epoch: int, milestones: Iterable[int], decay: float) -> float:
    """Step schedule of the published recipe: ``base * decay ** #(milestones < epoch)``, epochs from 1."""
    return base_lr * decay ** sum(1 for m in milestones if epoch > m)


PUBLISHED_SHAPE = (0.625, 0.75, 0.875)  # the published recipe drops the lr after epochs 150/180/210 of 240


def published_milestones(epochs: int) -> list[int]:
    """The published schedule's shape for a run of ``epochs`` epochs (drops after 150/180/210 of 240)."""
    return sorted({max(1, int(epochs * share)) for share in PUBLISHED_SHAPE})


def unreached_milestones(milestones: Iterable[int], epochs: int) -> str | None:
    """Why some lr drops of the schedule never happen (a milestone at or past the last epoch), or None.

    The classic trap: ``trainer.epochs=100`` with the 240-epoch milestones trains at the first lr throughout.
    """
    milestones = list(milestones)
    late = [m for m in milestones if m >= epochs]
    if not late:
        return None
    effect = ("the lr never drops" if len(late) == len(milestones)
              else f"the drop after epoch {', '.join(str(m) for m in late)} never happens")
    hint = (f"; for the published shape over {epochs} epochs use schedule.milestones="
            f"[{','.join(str(m) for m in published_milestones(epochs))}]" if epochs >= 8 else "")
    return (f"schedule.milestones=[{','.join(str(m) for m in milestones)}] with trainer.epochs={epochs}: {effect} "
            f"(a drop applies from the epoch after its milestone){hint}")
