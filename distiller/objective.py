"""The training objective: gamma * CE + alpha * KD + sum over methods of beta * (method terms).

Built from the typed ``distill`` config node (plus any ``combine.<label>`` nodes), so any
method combines with KD and with further methods without code knowing their names.

What reaches the methods is declared by each method (:class:`distiller.methods.base.DistillMethod`),
never found by inspecting its code. A temperature supplied by a method (``temperature()``, e.g. a
learned one) replaces the config's in every logit term of the step: the KD term and the methods'
``ctx.temperature``, and ``ctx.supplied_temperature`` for methods whose own temperature it replaces.
With ``logit_standardize: true`` the KD term and every method that declares ``logit_terms`` see
both networks' logits standardised per sample (:func:`distiller.functional.logit_standardize`);
a method that declares ``standardizes_itself`` gets the raw logits and ``ctx.standardize`` instead,
and standardises only where its terms need it (MLKD: inside its KD terms, not its other levels).

Initialisation phases (AB, FT, FSP) go through :meth:`Objective.forward` too, with their phase:
one loss path for every step.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as nnf
from torch import nn

from common.errors import UserError
from datasets.batch import Batch
from distiller import functional as F
from distiller.features import FeatureHooks, Features, probe
from distiller.methods import METHODS, BuildContext, DistillMethod, InitPhase, TermContext, make_method
from distiller.methods.kd import KD


@dataclass
class LossParts:
    """One step's loss: the minimised total, its task (``gamma * CE``) and distillation parts (None in an
    initialisation phase: it is one loss), the named terms, and the student's logits (None in a phase that
    skips the student)."""

    total: torch.Tensor
    task: torch.Tensor | None
    distill: torch.Tensor | None
    terms: dict[str, torch.Tensor]
    logits: torch.Tensor | None = None


@dataclass
class WeightedMethod:
    """One method in the objective, with its weight and warm-up."""

    label: str
    method: DistillMethod
    beta: float
    warmup_epochs: int

    def weight(self, epoch: int) -> float:
        """beta, ramped linearly over the first ``warmup_epochs`` epochs (epochs count from 1), times the
        method's own per-epoch factor."""
        ramp = min(epoch / self.warmup_epochs, 1.0) if self.warmup_epochs > 0 else 1.0
        return self.beta * ramp * self.method.weight_factor(epoch)


def _standardized(features: Features) -> Features:
    """The same features with the logits (also on extra views) standardised per sample."""
    if features.logits is None:
        return features
    views = {name: _standardized(view) for name, view in features.views.items()}
    return dataclasses.replace(features, logits=F.logit_standardize(features.logits), views=views)


class Objective(nn.Module):
    """Weighted sum of cross-entropy, KD and the methods' terms; owns the methods (and their helpers)."""

    def __init__(self, gamma: float, alpha: float, temperature: float, methods: list[WeightedMethod],
                 logit_standardize: bool = False) -> None:
        super().__init__()
        self.gamma, self.alpha, self.temperature_ = gamma, alpha, temperature
        self.logit_standardize = logit_standardize
        self.entries = methods
        self.methods = nn.ModuleDict({m.label: m.method for m in self.entries})
        self.kd = KD()  # the alpha term: KD with any method (no state, so no checkpoint keys)

    @classmethod
    def plain(cls) -> Objective:
        """Cross-entropy alone: training a teacher or a student baseline."""
        return cls(gamma=1.0, alpha=0.0, temperature=1.0, methods=[])

    @classmethod
    def from_config(cls, distill: Any, combine: Mapping[str, Any] | None = None) -> Objective:
        """``distill``: the typed primary method node (``name``, ``method``, the weights, ``extra``: the
        method's own keys); each ``combine.<label>`` node adds one more method with its own ``beta``."""
        nodes = [(str(distill.name), distill)] + [(str(k), v) for k, v in (combine or {}).items()]
        if str(distill.name) in (combine or {}):  # one label, one method: its features and checkpoint keys
            raise UserError(f"combine.{distill.name} has the primary method's label '{distill.name}'; give the "
                            f"combined method another label, e.g. +distill@combine.{distill.name}_2="
                            f"{combine[str(distill.name)].method}")
        entries = [WeightedMethod(label, make_method(node.method, node.extra, key),
                                  float(node.beta), int(node.warmup_epochs))
                   for (label, node), key in zip(nodes, ["distill"] + [f"combine.{k}" for k in combine or {}])]
        objective = cls(float(distill.gamma), float(distill.alpha), float(distill.temperature), entries,
                        logit_standardize=bool(distill.logit_standardize))
        suppliers = [m.label for m in objective.active() if m.method.temperature() is not None]
        if len(suppliers) > 1:  # the first one's would be used and the others' trained for nothing
            raise UserError(f"{' and '.join(suppliers)} each supply the temperature of every logit term; one "
                            f"temperature applies to a step: keep one of them")
        objective.check_logit_standardize()
        objective.check_something_trains()
        objective.check_combined_methods_add_a_term()
        return objective

    def check_combined_methods_add_a_term(self) -> None:
        """A combined method (every entry after the primary) with ``beta`` 0 and no phase of its own adds nothing:
        one line (``+distill@combine.kd=kd`` ran as ``at+kd`` with no KD term, KD's own ``beta`` being 0)."""
        active = self.active()
        for m in self.entries[1:]:
            if m not in active and not m.method.phases():
                raise UserError(f"combine.{m.label} adds nothing: its beta is 0 and it has no phase of its own (a "
                                f"combined method is weighted by its beta; the KD term by distill.alpha); give it a "
                                f"weight with combine.{m.label}.beta=W, or drop it")

    def check_something_trains(self) -> None:
        """At least one term with a positive weight in the main phase (else the loss has no gradient: one line)."""
        if self.gamma > 0 or self.alpha > 0 or self.active():
            return
        methods = ", ".join(f"{m.label} beta {m.beta:g}" for m in self.entries) or "none"
        raise UserError(f"the objective has no term to train: distill.gamma=0 (cross-entropy), distill.alpha=0 (KD) "
                        f"and no method with beta > 0 ({methods}); give one of them a positive weight")

    def check_logit_standardize(self) -> None:
        """``logit_standardize`` only where a term compares logits: the KD term or a method's (else one line)."""
        if not self.logit_standardize or self.alpha > 0:
            return
        if not any(m.method.logit_terms for m in self.active()):
            names = ", ".join(m.label for m in self.entries) or "cross-entropy alone"
            takers = ", ".join(sorted(n for n in METHODS.names() if METHODS.get(n).logit_terms))
            raise UserError(f"distill.logit_standardize=true has no effect here: no term of this objective ({names}, "
                            f"distill.alpha=0) takes standardised logits (the KD term is off and no method here "
                            f"takes them); drop it, or use a method that does ({takers})")

    def build(self, student_hooks: FeatureHooks, teacher_hooks: FeatureHooks | None, ctx: BuildContext,
              memory_format: torch.memory_format = torch.contiguous_format) -> None:
        """Give each method the probed feature shapes of both networks, then move helpers to the device.

        One dummy forward per network (eval mode, no gradient) through the hooks the run trains with.
        """
        size = (2, *ctx.image_shape)  # the data set's images: feature shapes depend on the resolution
        s_store, s_logits = probe(ctx.student, student_hooks, input_size=size, memory_format=memory_format)
        t_store, t_logits = (probe(ctx.teacher, teacher_hooks, input_size=size, memory_format=memory_format)
                             if teacher_hooks is not None else ({}, None))
        for entry in self.entries:
            method = entry.method
            s = student_hooks.select(s_store, s_logits, method.student_features).shapes()
            t = (teacher_hooks.select(t_store, t_logits, method.teacher_features).shapes()
                 if teacher_hooks is not None else Features())
            method.build(s, t, ctx)
        self.to(ctx.device)

    # ---- what the engine needs to know ---------------------------------------------------------
    def active(self) -> list[WeightedMethod]:
        """Methods that take part in the main phase: beta > 0, or acting on the objective itself."""
        return [m for m in self.entries if m.beta > 0 or m.method.always_active]

    def needs_teacher(self) -> bool:
        return self.alpha > 0 or bool(self.active()) or any(m.method.phases() for m in self.entries)

    def teacher_bn_train(self) -> bool:
        return any(m.method.teacher_bn_train for m in self.active())

    def views(self) -> list[str]:
        """The extra augmented views of each batch the active methods read (both networks run on each)."""
        return sorted({view for m in self.active() for view in m.method.views})

    def phases(self) -> list[InitPhase]:
        return [phase for m in self.entries for phase in m.method.phases()]

    def main_parameters(self) -> list[nn.Parameter]:
        """Trainable helper parameters of the active methods (frozen ones excluded)."""
        return [p for m in self.active() for p in m.method.parameters() if p.requires_grad]

    def reads_temperature(self) -> bool:
        """Whether a term runs at the config's temperature: the KD term (``alpha`` > 0) or a method that
        reads ``ctx.temperature``, and no method supplies a temperature of its own (CTKD's)."""
        readers = self.alpha > 0 or any(m.method.reads_temperature for m in self.active())
        return readers and self.supplied_temperature() is None

    # ---- the loss -------------------------------------------------------------------------------
    def supplied_temperature(self) -> torch.Tensor | None:
        """The temperature of the first active method that supplies one (e.g. a learned T), else None."""
        for entry in self.active():
            supplied = entry.method.temperature()
            if supplied is not None:
                return supplied
        return None

    def temperature(self) -> float | torch.Tensor:
        """The logit terms' temperature: the first method that supplies one (e.g. a learned T), else the config's."""
        supplied = self.supplied_temperature()
        return self.temperature_ if supplied is None else supplied

    def forward(self, student: Features, teacher: Features | None, batch: Batch, epoch: int,
                per_method: Mapping[str, tuple[Features, Features]], phase: InitPhase | None = None) -> LossParts:
        """The total loss, its task and distillation parts, and the unweighted named terms.

        Main phase (``phase`` None): ``task`` is ``gamma * CE``; ``distill`` is everything else
        (``alpha * KD + beta * method terms``); ``total`` sums the terms in one fixed order (the value
        that is minimised). An initialisation phase: its own terms (already weighted), all of them
        distillation; ``per_method`` then holds the phase's method's features under its label.
        """
        if phase is not None:
            s_feats, t_feats = next(iter(per_method.values()))
            terms = phase.loss(s_feats, t_feats, batch)
            total = sum(v.float() for v in terms.values())
            return LossParts(total, None, None, terms, student.logits)
        logits = student.logits
        active = self.active()
        supplied = self.supplied_temperature()
        ctx = TermContext(epoch=epoch, temperature=self.temperature_ if supplied is None else supplied,
                          supplied_temperature=supplied, standardize=self.logit_standardize)
        terms: dict[str, torch.Tensor] = {}
        zero = logits.new_zeros((), dtype=torch.float32)
        total, task, distill = zero, zero, zero
        if self.gamma > 0:
            terms["ce"] = nnf.cross_entropy(logits.float(), batch.labels)
            total = total + self.gamma * terms["ce"]
            task = task + self.gamma * terms["ce"]
        weighted: list[tuple[str, DistillMethod, float, Features, Features]] = []
        if self.alpha > 0 and teacher is not None:
            weighted.append(("", self.kd, self.alpha, student, teacher))
        weighted += [(entry.label, entry.method, entry.weight(epoch), *per_method[entry.label]) for entry in active]
        for label, method, weight, s_feats, t_feats in weighted:
            if self.logit_standardize and method.logit_terms and not method.standardizes_itself:
                s_feats, t_feats = _standardized(s_feats), _standardized(t_feats)
            for name, value in method(s_feats, t_feats, batch, ctx).items():
                key = name if name not in terms else f"{label}.{name}"
                terms[key] = value
                if value.dtype in (torch.float16, torch.bfloat16):  # sums in float32 at least
                    value = value.float()
                total = total + weight * value
                distill = distill + weight * value
        return LossParts(total, task, distill, terms, logits)
