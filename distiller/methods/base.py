"""What a distillation method is: a module that owns its helpers and returns named loss terms.

The engine builds a method from config, probes feature shapes once, calls
:meth:`DistillMethod.build`, adds the method's trainable parameters to the
student's optimizer, runs any initialisation :class:`Phase` the method declares,
and in every main-phase step calls the method with student and teacher
:class:`Features`. The engine never learns which method it runs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Generic, Iterable, TypeVar

import torch
from torch import nn

from datasets.batch import Batch
from common.registry import Registry

T = TypeVar("T")

STEM, STAGES, EMBEDDING = "stem", "stages", "embedding"


@dataclass
class Features(Generic[T]):
    """One network's features for a batch (tensors), or their shapes (``torch.Size``).

    ``stages`` holds stage1..stageL in order; with pre-activation taps the stages
    are taken before their final activation. Untapped entries are ``None`` / empty.
    """

    logits: T | None = None
    stem: T | None = None
    stages: list[T] = field(default_factory=list)
    embedding: T | None = None


@dataclass(frozen=True)
class Taps:
    """Which features a method reads from each network, and whether stages are pre-activation."""

    student: frozenset[str] = frozenset()
    teacher: frozenset[str] = frozenset()
    student_preact: bool = False
    teacher_preact: bool = False

    @staticmethod
    def of(student: Iterable[str] = (), teacher: Iterable[str] = (), student_preact: bool = False,
           teacher_preact: bool = False) -> "Taps":
        return Taps(frozenset(student), frozenset(teacher), student_preact, teacher_preact)

    def __or__(self, other: "Taps") -> "Taps":
        return Taps(self.student | other.student, self.teacher | other.teacher,
                    self.student_preact or other.student_preact, self.teacher_preact or other.teacher_preact)


@dataclass
class BuildContext:
    """Facts a method may use while building its helpers (never stored as submodules).

    ``student`` and ``teacher`` are given for reading (e.g. the teacher's BatchNorm
    for OFD margins, the student's feature layers for an initialisation phase).
    """

    num_classes: int
    num_samples: int  # training-set size (CRD memory banks)
    train_labels: torch.Tensor  # [num_samples] int64 on ``device`` (CRD negative sampling)
    device: torch.device
    student: nn.Module
    teacher: nn.Module
    epochs: int = 240


@dataclass
class Phase:
    """An initialisation phase run before the main training (AB, FT, FSP).

    ``parameters(student)`` returns what this phase trains (the method's own helpers
    included, by closure); everything else stays fixed. ``loss`` returns named,
    already-weighted terms whose sum is minimised. ``lr``: None uses ``optim.lr``.
    ``student_forward=False`` skips the student (a phase that trains teacher-side helpers).
    """

    name: str
    epochs: int
    parameters: Callable[[nn.Module], Iterable[nn.Parameter]]
    loss: Callable[[Features, Features, Batch], dict[str, torch.Tensor]]
    lr: float | None = None
    student_forward: bool = True


class DistillMethod(nn.Module):
    """Base class of all methods. Subclasses set ``taps`` and implement ``build`` and ``forward``.

    Constructor keyword arguments are the method's own config keys (``distill.<key>``).
    ``forward`` returns unweighted named terms; the objective multiplies them by ``beta``.
    """

    taps: ClassVar[Taps] = Taps()
    # OFD keeps the teacher's BatchNorm layers in train mode; every other method keeps the teacher in eval.
    teacher_bn_train: ClassVar[bool] = False

    def build(self, student: Features[torch.Size], teacher: Features[torch.Size], ctx: BuildContext) -> None:
        """Create trainable helpers from probed feature shapes. Default: nothing to build."""

    def forward(self, student: Features[torch.Tensor], teacher: Features[torch.Tensor],
                batch: Batch) -> dict[str, torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__} must implement forward")

    def phases(self) -> list[Phase]:
        """Initialisation phases to run before the main training (default: none)."""
        return []

    def extra_state_for_checkpoint(self) -> dict[str, Any]:
        """Non-tensor state to checkpoint beside ``state_dict`` (default: none)."""
        return {}

    def load_extra_state_from_checkpoint(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`extra_state_for_checkpoint` returned."""


METHODS: Registry[type[DistillMethod]] = Registry("method")
