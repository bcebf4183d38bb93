"""What a distillation method is: a module that owns its helpers and returns named loss terms.

The engine builds a method from config, probes feature shapes once, calls
:meth:`DistillMethod.build`, adds the method's trainable parameters to the
student's optimizer, runs any initialisation :class:`Phase` the method declares,
and in every main-phase step calls the method with student and teacher
:class:`Features`. The engine never learns which method it runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable

import torch
from torch import nn

from common.registry import Registry
from datasets.batch import Batch
from distiller.features import Features


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
    image_shape: tuple[int, int, int] = (3, 32, 32)  # one input [C, H, W] of the data set: what shapes are probed on


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

    # Which features the method reads from each network: kinds of distiller.features
    # (stem, stages, stages_preact, embedding). Logits always come.
    student_features: ClassVar[frozenset[str]] = frozenset()
    teacher_features: ClassVar[frozenset[str]] = frozenset()
    # OFD keeps the teacher's BatchNorm layers in train mode; every other method keeps the teacher in eval.
    teacher_bn_train: ClassVar[bool] = False
    # Extra augmented views of each batch the method reads (names in datasets.views.VIEWS): both
    # networks run on each view as a separate batch; logits arrive in ``Features.views[name]``.
    views: ClassVar[tuple[str, ...]] = ()
    # A method that acts on the objective itself (e.g. supplies the logit terms' temperature) takes
    # part in the main phase, its helpers trained, even when its own weight beta is 0.
    always_active: ClassVar[bool] = False
    # A method whose terms compare the two networks' logits: it sees standardised logits under
    # distill.logit_standardize=true, and may take a supplied temperature as ``forward(..., temperature=)``.
    # One whose ``forward`` takes ``standardize=`` gets raw logits and the switch, to standardise only some terms.
    logit_terms: ClassVar[bool] = False

    def build(self, student: Features[torch.Size], teacher: Features[torch.Size], ctx: BuildContext) -> None:
        """Create trainable helpers from probed feature shapes. Default: nothing to build."""

    def forward(self, student: Features[torch.Tensor], teacher: Features[torch.Tensor],
                batch: Batch) -> dict[str, torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__} must implement forward")

    def on_epoch_start(self, epoch: int) -> None:
        """Called before every main-phase epoch (epochs count from 1): per-epoch schedules go here."""

    def temperature(self) -> torch.Tensor | None:
        """A temperature for every logit term of this step (KD and logit methods), or None for the config's."""
        return None

    def scalars(self) -> dict[str, float]:
        """Values to record each epoch (``metrics.json`` and TensorBoard as ``<label>/<name>``)."""
        return {}

    def phases(self) -> list[Phase]:
        """Initialisation phases to run before the main training (default: none)."""
        return []

    def extra_state_for_checkpoint(self) -> dict[str, Any]:
        """Non-tensor state to checkpoint beside ``state_dict`` (default: none)."""
        return {}

    def load_extra_state_from_checkpoint(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`extra_state_for_checkpoint` returned."""


METHODS: Registry[type[DistillMethod]] = Registry("method")
