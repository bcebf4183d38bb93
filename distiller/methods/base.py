"""What a distillation method is: a module that owns its helpers and returns named loss terms.

The engine builds a method from config, probes feature shapes once, calls
:meth:`DistillMethod.build`, adds the method's trainable parameters to the
student's optimizer, runs any :class:`InitPhase` the method declares, and in every
main-phase step the objective calls the method with student and teacher
:class:`Features`, the batch and a :class:`TermContext`. The engine never learns which
method it runs: what a method needs or does is declared by class-level flags, never
found by inspecting its code.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
from torch import nn

from common.errors import UserError
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


@dataclass(frozen=True)
class TermContext:
    """What a method's terms may depend on besides the features and the batch, for one step.

    ``temperature`` is the temperature of the step's logit terms: the one a method supplies
    (CTKD's learned T) when one does, else the objective's ``distill.temperature``;
    ``supplied_temperature`` is that supplied one alone (None when no method supplies one), for
    methods with a temperature of their own that a supplied one replaces (``takes_temperature``).
    ``standardize`` is the LS switch (``distill.logit_standardize``), for the methods that
    standardise only some of their terms themselves (``standardizes_itself``).
    """

    epoch: int
    temperature: float | torch.Tensor = 4.0
    supplied_temperature: torch.Tensor | None = None
    standardize: bool = False


@dataclass
class InitPhase:
    """An initialisation phase a method runs before the main training (AB, FT, FSP).

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


def init_phase(epochs: int, lr: float | None, parameters: Callable[[nn.Module], Iterable[nn.Parameter]],
               loss: Callable[[Features, Features, Batch], dict[str, torch.Tensor]],
               student_forward: bool = True) -> list[InitPhase]:
    """The one initialisation phase of a method (AB, FT, FSP): ``[]`` when its ``init_epochs`` is 0."""
    if epochs == 0:
        return []
    return [InitPhase("init", epochs, parameters, loss, lr, student_forward)]


class DistillMethod(nn.Module):
    """Base class of all methods. Subclasses set what they read and implement ``build`` and ``forward``.

    Constructor keyword arguments are the method's own config keys (``distill.<key>``).
    ``forward`` returns named terms that the objective multiplies by ``beta`` (ramped over
    ``warmup_epochs``, times :meth:`weight_factor`); they are unweighted unless the method
    declares ``weights_own_terms``.
    """

    # Which features the method reads from each network: kinds of distiller.features
    # (stem, stages, stages_preact, embedding, pool_input, classifier). Logits always come.
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
    # Its terms compare the two networks' logits: under distill.logit_standardize=true the objective
    # hands it both networks' logits standardised per sample (LS); the switch does not apply otherwise.
    logit_terms: ClassVar[bool] = False
    # ... except that it standardises itself, where its terms need it: it gets raw logits and
    # ``ctx.standardize`` (MLKD: inside its KD terms only).
    standardizes_itself: ClassVar[bool] = False
    # A temperature another method supplies (``ctx.supplied_temperature``) replaces its own (DKD's).
    takes_temperature: ClassVar[bool] = False
    # Its terms run at the objective's temperature, ``ctx.temperature`` (``distill.temperature``, or the
    # one a method supplies), as KD's does: with it, distill.temperature is read even at alpha=0.
    reads_temperature: ClassVar[bool] = False
    # Its terms carry their own weights (DKD's tckd/nckd weights, MLKD's), so its config's beta is 1.
    weights_own_terms: ClassVar[bool] = False
    # Teacher features it reads in a pass over the training set before training (``calibrate``);
    # None: no such pass. What it computes there lives in buffers, so checkpoints keep it.
    calibration_features: ClassVar[frozenset[str] | None] = None

    def __init__(self) -> None:  # no keys of its own (KD); nn.Module's own would take and ignore any
        super().__init__()

    def build(self, student: Features[torch.Size], teacher: Features[torch.Size], ctx: BuildContext) -> None:
        """Create trainable helpers from probed feature shapes. Default: nothing to build."""

    def forward(self, student: Features[torch.Tensor], teacher: Features[torch.Tensor], batch: Batch,
                ctx: TermContext) -> dict[str, torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__} must implement forward")

    def calibrate(self, batches: Iterable[tuple[Features[torch.Tensor], Batch]]) -> None:
        """Compute constants from the teacher once, before training (``calibration_features``).

        ``batches``: the teacher's features on this process's shard of the training set (a contiguous
        run of it, in data-set order), in eval mode, without augmentation. Under DDP combine the ranks
        once, after the loop (ranks may hold one batch more or less), e.g. with
        :func:`distiller.gather.gather_batch`, so every rank computes the same constant.
        """

    def on_epoch_start(self, epoch: int) -> None:
        """Called before every main-phase epoch (epochs count from 1): per-epoch schedules go here."""

    def weight_factor(self, epoch: int) -> float:
        """A per-epoch factor on ``beta`` (after the warm-up): e.g. a decay late in training. Default 1."""
        return 1.0

    def temperature(self) -> torch.Tensor | None:
        """A temperature for every logit term of this step (KD and logit methods), or None for the config's."""
        return None

    def scalars(self) -> dict[str, float]:
        """Values to record each epoch (``metrics.json`` and TensorBoard as ``<label>/<name>``)."""
        return {}

    def phases(self) -> list[InitPhase]:
        """Initialisation phases to run before the main training (default: none)."""
        return []


METHODS: Registry[type[DistillMethod]] = Registry("method")


def check_classifier_on_map(method: str, role: str, features: Features[torch.Size]) -> None:
    """A method that applies a network's classifier to each cell of its pre-pool map (SDD, CAT-KD) needs that map
    [B, D, H, W] with D the classifier's inputs; else one line naming both and what to declare."""
    pool, weight = features.pool_input, features.classifier[0] if features.classifier else None
    if pool is None or len(pool) != 4:
        raise UserError(f"{method} needs the {role}'s pre-pool feature map [B, D, H, W]; its pool_input is "
                        f"{None if pool is None else list(pool)}")
    if weight is not None and weight[1] != pool[1]:
        raise UserError(f"{method}: the {role}'s classifier takes {weight[1]} inputs but its pre-pool map has "
                        f"{pool[1]} channels (a layer between them, such as a conv head), so the classifier cannot be "
                        f"applied to its regions: declare {role}.features.pool_input=PATH at a map of {weight[1]} "
                        "channels that the global pool averages, or choose another method")
