"""The training objective: gamma * CE + alpha * KD + sum over methods of beta * (method terms).

Built from the ``distill`` config node (plus any ``combine.<label>`` nodes), so any
method combines with KD and with further methods without code knowing their names.

Two things reach the logit terms generically. A temperature supplied by a method
(``DistillMethod.temperature()``, e.g. a learned one) replaces the config's in the KD term
and is passed to every method whose ``forward`` takes a ``temperature`` keyword (None when no
method supplies one, so the method keeps its own). With ``logit_standardize: true`` the KD
term and every method that declares ``logit_terms = True`` see both networks' logits
standardised per sample (:func:`distiller.functional.logit_standardize`); a logit method whose
``forward`` takes a ``standardize`` keyword gets the raw logits and the switch instead, and
standardises only where its terms need it (MLKD: inside its KD terms, not its other levels).
"""
from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as nnf
from torch import nn

from common.errors import UserError
from datasets.batch import Batch
from distiller import functional as F
from distiller.features import FeatureHooks, Features, probe
from distiller.methods import METHODS
from distiller.methods.base import BuildContext, DistillMethod, Phase

# keys of a distill/<name>.yaml node that belong to the objective, not to the method's constructor
OBJECTIVE_KEYS = ("name", "method", "gamma", "alpha", "beta", "temperature", "warmup_epochs", "logit_standardize")


@dataclass
class LossParts:
    """One step's loss: the minimised total, its task (``gamma * CE``) and distillation parts, the terms."""

    total: torch.Tensor
    task: torch.Tensor
    distill: torch.Tensor
    terms: dict[str, torch.Tensor]


@dataclass
class WeightedMethod:
    """One method in the objective, with its weight and warm-up."""

    label: str
    method: DistillMethod
    beta: float
    warmup_epochs: int

    def weight(self, epoch: int) -> float:
        """beta, ramped linearly over the first ``warmup_epochs`` epochs (epochs count from 1)."""
        if self.warmup_epochs > 0:
            return self.beta * min(epoch / self.warmup_epochs, 1.0)
        return self.beta


def build_method(node: Mapping[str, Any]) -> DistillMethod:
    """Instantiate the registered method of a distill config node with its own keyword arguments."""
    method_name = node.get("method", node.get("name"))
    cls = METHODS.get(str(method_name))
    kwargs = {k: v for k, v in node.items() if k not in OBJECTIVE_KEYS}
    params = inspect.signature(cls.__init__).parameters
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    unknown = [k for k in kwargs if k not in params] if not accepts_any else []
    if unknown:
        valid = [p for p in params if p != "self"]
        raise UserError(f"distill.{unknown[0]} is not a parameter of method '{method_name}'; "
                        f"its parameters are: {', '.join(valid) or 'none'}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise UserError(f"method '{method_name}': {err}") from None


def _takes_temperature(method: DistillMethod) -> bool:
    """Whether the method's ``forward`` declares a ``temperature`` keyword (it then gets the supplied one)."""
    return "temperature" in inspect.signature(method.forward).parameters


def _standardizes_itself(method: DistillMethod) -> bool:
    """Whether the method's ``forward`` declares a ``standardize`` keyword (it then gets raw logits and the switch)."""
    return "standardize" in inspect.signature(method.forward).parameters


def _standardized(features: Features) -> Features:
    """The same features with the logits (also on extra views) standardised per sample."""
    if features.logits is None:
        return features
    views = {name: _standardized(view) for name, view in features.views.items()}
    return dataclasses.replace(features, logits=F.logit_standardize(features.logits), views=views)


def _check_flag(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise UserError(f"{key}={value!r} must be true or false")
    return value


def _check_weight(value: Any, key: str) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{key}={value} is not a number") from None
    if value < 0 or value != value:
        raise UserError(f"{key}={value} must be a non-negative number")
    return value


class Objective(nn.Module):
    """Weighted sum of cross-entropy, KD and the methods' terms; owns the methods (and their helpers)."""

    def __init__(self, gamma: float = 1.0, alpha: float = 0.0, temperature: float = 4.0,
                 methods: list[WeightedMethod] | None = None, logit_standardize: bool = False) -> None:
        super().__init__()
        self.gamma, self.alpha, self.temperature_ = gamma, alpha, temperature
        self.logit_standardize = logit_standardize
        self.entries = methods or []
        self.methods = nn.ModuleDict({m.label: m.method for m in self.entries})
        self._takes_temperature = {m.label for m in self.entries if _takes_temperature(m.method)}
        self._standardizes_itself = {m.label for m in self.entries if _standardizes_itself(m.method)}

    @classmethod
    def from_config(cls, distill: Mapping[str, Any] | None, combine: Mapping[str, Any] | None = None) -> Objective:
        """``distill`` is the primary method node; each ``combine.<label>`` node adds one more method."""
        if distill is None:  # plain training (teachers, baselines)
            return cls(gamma=1.0, alpha=0.0)
        gamma = _check_weight(distill.get("gamma", 1.0), "distill.gamma")
        alpha = _check_weight(distill.get("alpha", 0.0), "distill.alpha")
        temperature = float(distill.get("temperature", 4.0))
        if temperature <= 0:
            raise UserError(f"distill.temperature={temperature} must be > 0")
        standardize = _check_flag(distill.get("logit_standardize", False), "distill.logit_standardize")
        entries = []
        nodes = [("distill", distill)] + [(f"combine.{k}", v) for k, v in (combine or {}).items()]
        for key, node in nodes:
            label = str(node.get("name", node.get("method"))) if key == "distill" else key.split(".", 1)[1]
            beta = _check_weight(node.get("beta", 0.0), f"{key}.beta")
            warmup = int(node.get("warmup_epochs", 0) or 0)
            if warmup < 0:
                raise UserError(f"{key}.warmup_epochs={warmup} must be >= 0")
            entries.append(WeightedMethod(label, build_method(node), beta, warmup))
        return cls(gamma, alpha, temperature, entries, logit_standardize=standardize)

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

    def phases(self) -> list[Phase]:
        return [phase for m in self.entries for phase in m.method.phases()]

    def main_parameters(self) -> list[nn.Parameter]:
        """Trainable helper parameters of the active methods (frozen ones excluded)."""
        return [p for m in self.active() for p in m.method.parameters() if p.requires_grad]

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
                per_method: Mapping[str, tuple[Features, Features]]) -> LossParts:
        """The total loss, its task and distillation parts, and the unweighted named terms.

        ``task`` is ``gamma * CE``; ``distill`` is everything else (``alpha * KD + beta * method
        terms``); ``total`` sums the terms in one fixed order (the value that is minimised).
        """
        logits = student.logits
        active = self.active()
        # one temperature per step, shared by every logit term (a learned one is computed once)
        needs_supplied = self.alpha > 0 and teacher is not None or any(
            m.label in self._takes_temperature for m in active)
        supplied = self.supplied_temperature() if needs_supplied else None
        terms: dict[str, torch.Tensor] = {}
        total = logits.new_zeros((), dtype=torch.float32)
        task = logits.new_zeros((), dtype=torch.float32)
        distill = logits.new_zeros((), dtype=torch.float32)
        if self.gamma > 0:
            terms["ce"] = nnf.cross_entropy(logits.float(), batch.labels)
            total = total + self.gamma * terms["ce"]
            task = task + self.gamma * terms["ce"]
        if self.alpha > 0 and teacher is not None:
            z_s, z_t = logits, teacher.logits
            if self.logit_standardize:
                z_s, z_t = F.logit_standardize(z_s), F.logit_standardize(z_t)
            terms["kd"] = F.kd(z_s, z_t, self.temperature_ if supplied is None else supplied)
            total = total + self.alpha * terms["kd"]
            distill = distill + self.alpha * terms["kd"]
        for entry in active:
            s_feats, t_feats = per_method[entry.label]
            kwargs = {"temperature": supplied} if entry.label in self._takes_temperature else {}
            if entry.label in self._standardizes_itself:
                kwargs["standardize"] = self.logit_standardize and entry.method.logit_terms
            elif self.logit_standardize and entry.method.logit_terms:
                s_feats, t_feats = _standardized(s_feats), _standardized(t_feats)
            weight = entry.weight(epoch)
            for name, value in entry.method(s_feats, t_feats, batch, **kwargs).items():
                key = name if name not in terms else f"{entry.label}.{name}"
                terms[key] = value
                total = total + weight * value.float()
                distill = distill + weight * value.float()
        return LossParts(total, task, distill, terms)
