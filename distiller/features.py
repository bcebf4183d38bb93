"""Feature taps by forward hooks: the model's ``feature_info`` says where, hooks collect what.

A model lists ``feature_info`` = [stem, stage1..stageL, embedding] as
:class:`models.feature_spec.FeatureSpec` entries. Hooks store references to the
tensors the forward pass produces anyway, so tapping costs no extra compute;
removing the hooks leaves the model exactly as it was.
"""
from __future__ import annotations

from functools import partial
from typing import Iterable, Sequence

import torch
from torch import nn

from common.errors import UserError
from models.feature_spec import FeatureSpec, Tap


def feature_specs(model: nn.Module) -> Sequence[FeatureSpec]:
    """The model's declared feature list; a clear error if it declares none."""
    specs = getattr(model, "feature_info", None)
    if not specs:
        raise UserError(f"{type(model).__name__} declares no feature_info, so its features cannot be tapped; "
                        "give it a feature_info list (see models/feature_spec.py)")
    return specs


class FeatureHooks:
    """Forward hooks on ``model`` that store the named features of the latest forward pass.

    ``names`` selects entries of ``feature_info`` (default: all). With ``preact`` each
    stage is taken before its final activation. Use as a context manager, or keep it
    registered for a whole training run and call :meth:`remove` at the end.
    """

    def __init__(self, model: nn.Module, names: Iterable[str] | None = None, preact: bool = False) -> None:
        specs = feature_specs(model)
        wanted = None if names is None else set(names)
        self.names: list[str] = []
        self.features: dict[str, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        for spec in specs:
            if wanted is not None and spec.name not in wanted:
                continue
            tap: Tap = spec.pre if (preact and spec.pre is not None) else spec.post
            module = model.get_submodule(tap.module)
            if tap.take_input:
                handle = module.register_forward_pre_hook(partial(self._store_input, spec.name))
            else:
                handle = module.register_forward_hook(partial(self._store_output, spec.name))
            self._handles.append(handle)
            self.names.append(spec.name)
        if wanted is not None and wanted - set(self.names):
            self.remove()
            raise UserError(f"{type(model).__name__} has no feature(s) {sorted(wanted - set(self.names))}; "
                            f"it has {[s.name for s in specs]}")

    def _store_input(self, name: str, module: nn.Module, args: tuple) -> None:
        self.features[name] = args[0]

    def _store_output(self, name: str, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self.features[name] = output

    def pop(self) -> dict[str, torch.Tensor]:
        """The features of the latest forward pass; the store is emptied so no tensor outlives its step."""
        features, self.features = self.features, {}
        return features

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.features = {}

    def __enter__(self) -> "FeatureHooks":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def forward_features(model: nn.Module, x: torch.Tensor, preact: bool = False) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Run ``model`` once and return ``([stem, stage_1..stage_L, embedding], logits)``.

    With ``preact=True`` each stage output is taken before the stage's final ReLU.
    Hooks exist only during this call.
    """
    with FeatureHooks(model, preact=preact) as hooks:
        logits = model(x)
        store = hooks.pop()
    return [store[name] for name in hooks.names], logits


def probe_shapes(model: nn.Module, preact: bool = False, input_size: Sequence[int] = (2, 3, 32, 32),
                 device: torch.device | str | None = None) -> list[torch.Size]:
    """Feature shapes of ``model`` for one dummy batch, in eval mode and without gradient.

    Eval mode matters: BatchNorm in train mode updates its running statistics even
    under ``no_grad``. The model's train/eval modes are restored afterwards.
    """
    if device is None:
        device = next(model.parameters()).device
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            feats, _ = forward_features(model, torch.zeros(*input_size, device=device), preact=preact)
    finally:
        for module, mode in modes.items():
            module.training = mode
    return [f.shape for f in feats]
