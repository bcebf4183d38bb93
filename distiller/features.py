"""Features of a network by forward hooks: where a model declares them, what a method gets.

A model lists ``feature_info`` (:class:`models.features.FeatureInfo`: stem,
stage1..stageL, pool_input, embedding, with channels, reduction, pre-activation tap and the
BatchNorm before it). :class:`FeatureHooks` puts forward hooks at the declared
modules; hooks keep references to tensors the forward pass produces anyway, so
tapping costs no compute and removing the hooks leaves the model as it was. A
method receives one :class:`Features` per network: the kinds it asked for
(:data:`STEM`, :data:`STAGES`, :data:`STAGES_PREACT`, :data:`EMBEDDING`, :data:`POOL_INPUT`, the map the
global pool averages into the embedding, and :data:`CLASSIFIER`, the weight and bias of the Linear the
embedding enters) plus logits.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from functools import partial
from typing import Generic, Iterable, Iterator, Sequence, TypeVar

import torch
from torch import nn

from common.errors import UserError
from models.features import FeatureInfo

T = TypeVar("T")

STEM, STAGES, STAGES_PREACT, EMBEDDING = "stem", "stages", "stages_preact", "embedding"
POOL_INPUT, CLASSIFIER = "pool_input", "classifier"
KINDS = (STEM, STAGES, STAGES_PREACT, EMBEDDING, POOL_INPUT, CLASSIFIER)


@dataclass
class Features(Generic[T]):
    """One network's features for a batch (tensors), or their shapes (``torch.Size``).

    ``stages`` holds stage1..stageL in order, taken before their final activation when
    the method asked for :data:`STAGES_PREACT`. Entries not asked for are ``None`` / empty.
    ``views`` holds the same network's logits on each extra view of the batch the method
    asked for (``DistillMethod.views``), each run as a batch of its own. ``classifier`` is the
    ``(weight, bias)`` of the network's classifier, the parameters themselves (the student's
    receive gradient through a method's terms); ``bias`` is None for a classifier without one.
    """

    logits: T | None = None
    stem: T | None = None
    stages: list[T] = field(default_factory=list)
    embedding: T | None = None
    views: dict[str, Features[T]] = field(default_factory=dict)
    pool_input: T | None = None
    classifier: tuple[T, T | None] | None = None

    def shapes(self) -> Features[torch.Size]:
        """The same structure with ``torch.Size`` in place of tensors."""
        size = lambda t: None if t is None else t.shape
        classifier = None if self.classifier is None else (size(self.classifier[0]), size(self.classifier[1]))
        return Features(size(self.logits), size(self.stem), [t.shape for t in self.stages], size(self.embedding),
                        pool_input=size(self.pool_input), classifier=classifier)


def feature_info(model: nn.Module) -> Sequence[FeatureInfo]:
    """The model's declared feature list; a clear error if it declares none."""
    infos = getattr(model, "feature_info", None)
    if not infos:
        raise UserError(f"{type(model).__name__} declares no feature_info, so its features cannot be tapped; "
                        "give it a feature_info list (see models/features.py)")
    return infos


def _check_kinds(kinds: Iterable[str], one_stage_kind: bool = True) -> frozenset[str]:
    """``kinds`` as a set; unknown kinds raise, and so do both stage kinds where one method asks."""
    kinds = frozenset(kinds)
    unknown = kinds - set(KINDS)
    if unknown:
        raise ValueError(f"unknown feature kind(s) {sorted(unknown)}; valid: {', '.join(KINDS)}")
    if one_stage_kind and STAGES in kinds and STAGES_PREACT in kinds:
        raise ValueError("ask for either stages or stages_preact, not both")
    return kinds


def classifier_of(model: nn.Module) -> nn.Linear:
    """The Linear the model's embedding enters (its classifier); a one-line error when the head is not one Linear."""
    info = next((i for i in feature_info(model) if i.name == EMBEDDING), None)
    if info is None:
        raise UserError(f"{type(model).__name__} declares no embedding, so its classifier is unknown")
    head = model.get_submodule(info.module)
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    if isinstance(head, nn.Linear):
        return head
    if len(linears) == 1 and all(not list(m.parameters(recurse=False)) for m in head.modules()
                                 if m is not linears[0]):
        return linears[0]  # a Sequential holding the Linear alone (MobileNetV2's classifier)
    raise UserError(f"{type(model).__name__}'s classifier '{info.module}' is not a single Linear layer, so a "
                    "method that reads the classifier's weights cannot use it; choose another network or method")


class FeatureHooks:
    """Forward hooks on ``model`` for the union of ``kinds`` (several methods' needs, so both
    stage kinds may be asked for); :meth:`select` hands out one method's :class:`Features`.

    Registered once for a whole run (or used as a context manager); every forward pass
    refills the store, and :meth:`pop` empties it so no tensor outlives its step.
    """

    def __init__(self, model: nn.Module, kinds: Iterable[str]) -> None:
        kinds = _check_kinds(kinds, one_stage_kind=False)
        self.model = model
        infos = feature_info(model) if kinds else []
        self.stage_names = [i.name for i in infos if i.is_stage]
        self.classifier = classifier_of(model) if CLASSIFIER in kinds else None
        self._store: dict[str, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        for info in infos:
            if info.name in (STEM, EMBEDDING, POOL_INPUT) and info.name in kinds:
                self._hook(info.name, info.module, info.module_input)
            if info.is_stage and STAGES in kinds:
                self._hook(info.name, info.module, info.module_input)
            if info.is_stage and STAGES_PREACT in kinds:
                if info.preact is None:
                    self._hook(f"{info.name}@pre", info.module, info.module_input)
                else:
                    self._hook(f"{info.name}@pre", info.preact, info.preact_input)

    def _hook(self, key: str, path: str, take_input: bool) -> None:
        try:
            module = self.model.get_submodule(path)
        except AttributeError:
            self.remove()
            raise UserError(f"{type(self.model).__name__} feature_info names module '{path}', "
                            "which the model does not have") from None
        if take_input:
            handle = module.register_forward_pre_hook(partial(self._store_input, key))
        else:
            handle = module.register_forward_hook(partial(self._store_output, key))
        self._handles.append(handle)

    def _store_input(self, key: str, module: nn.Module, args: tuple) -> None:
        self._store[key] = args[0]

    def _store_output(self, key: str, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self._store[key] = output

    def pop(self) -> dict[str, torch.Tensor]:
        """The raw store of the latest forward pass (emptied)."""
        store, self._store = self._store, {}
        return store

    def select(self, store: dict[str, torch.Tensor], logits: torch.Tensor | None,
               kinds: Iterable[str]) -> Features:
        """The :class:`Features` of one kind set, from one pass's store."""
        kinds = _check_kinds(kinds)
        if STAGES_PREACT in kinds:
            stages = [store[f"{n}@pre"] for n in self.stage_names]
        elif STAGES in kinds:
            stages = [store[n] for n in self.stage_names]
        else:
            stages = []
        classifier = None
        if CLASSIFIER in kinds:
            classifier = (self.classifier.weight, self.classifier.bias)
        return Features(logits=logits, stem=store.get(STEM) if STEM in kinds else None, stages=stages,
                        embedding=store.get(EMBEDDING) if EMBEDDING in kinds else None,
                        pool_input=store.get(POOL_INPUT) if POOL_INPUT in kinds else None, classifier=classifier)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._store = {}

    def __enter__(self) -> FeatureHooks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


@contextlib.contextmanager
def eval_mode(*models: nn.Module | None) -> Iterator[None]:
    """Every module of ``models`` in eval mode inside the block, each module's own mode restored after.

    Probes need it: BatchNorm in train mode updates running statistics even under ``no_grad``.
    """
    modes = {m: m.training for model in models if model is not None for m in model.modules()}
    for model in models:
        if model is not None:
            model.eval()
    try:
        yield
    finally:
        for module, mode in modes.items():
            module.training = mode


def probe(model: nn.Module, hooks: FeatureHooks, input_size: Sequence[int] = (2, 3, 32, 32),
          memory_format: torch.memory_format = torch.contiguous_format) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One dummy forward in eval mode without gradient: the hook store and the logits.

    ``input_size`` is the dummy batch [B, C, H, W]: feature shapes depend on the resolution, so the
    engine probes with the data set's images (``BuildContext.image_shape``), not CIFAR's 32 x 32.
    """
    device = next(model.parameters()).device
    with eval_mode(model), torch.no_grad():
        logits = model(torch.zeros(*input_size, device=device).contiguous(memory_format=memory_format))
        return hooks.pop(), logits


def forward_features(model: nn.Module, x: torch.Tensor,
                     preact: bool = False) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Run ``model`` once and return ``([stem, stage_1..stage_L, embedding], logits)``.

    With ``preact=True`` each stage output is taken before the stage's final ReLU.
    Hooks exist only during this call.
    """
    kinds = (STEM, STAGES_PREACT if preact else STAGES, EMBEDDING)
    with FeatureHooks(model, kinds) as hooks:
        logits = model(x)
        f = hooks.select(hooks.pop(), logits, kinds)
    return [f.stem, *f.stages, f.embedding], logits


def probe_shapes(model: nn.Module, preact: bool = False, input_size: Sequence[int] = (2, 3, 32, 32),
                 device: torch.device | str | None = None) -> list[torch.Size]:
    """Shapes of ``forward_features(model, zeros, preact)`` for one dummy batch, in eval mode."""
    if device is None:
        device = next(model.parameters()).device
    with eval_mode(model), torch.no_grad():
        feats, _ = forward_features(model, torch.zeros(*input_size, device=device), preact=preact)
    return [f.shape for f in feats]


def feature_extractor_parameters(model: nn.Module, input_size: Sequence[int] = (2, 3, 32, 32)) -> list[nn.Parameter]:
    """The parameters of every module that runs before the last stage's feature is complete.

    That is the older frameworks' ``get_feat_modules()``: the stem and the stages, without
    the head (a WRN's final BatchNorm, MobileNetV2's and ShuffleNetV2's last 1x1 conv, the
    classifier). Found from one probe's execution order, so any declared model has it.
    """
    last = [i for i in feature_info(model) if i.is_stage][-1]
    order: list[nn.Module] = []
    done: list[int] = []
    leaves = [m for m in model.modules() if next(m.parameters(recurse=False), None) is not None]
    handles = [m.register_forward_hook(lambda m, a, o: order.append(m)) for m in leaves]
    handles.append(model.get_submodule(last.module).register_forward_hook(lambda m, a, o: done.append(len(order))))
    first = next(model.parameters())
    try:
        with eval_mode(model), torch.no_grad():
            model(torch.zeros(*input_size, device=first.device, dtype=first.dtype))
    finally:
        for handle in handles:
            handle.remove()
    ran_before = {id(m) for m in order[:done[0]]}
    return [p for m in leaves if id(m) in ran_before for p in m.parameters(recurse=False)]
