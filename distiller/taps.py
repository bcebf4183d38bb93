"""Hooks on one network for everything the methods of a run read, and per-method :class:`Features`."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from distiller.features import FeatureHooks, feature_specs
from distiller.methods.base import EMBEDDING, STAGES, STEM, Features


class NetworkTaps:
    """Registers (once, for a whole run) the hooks that the union of ``needs`` asks for.

    ``needs`` is a list of ``(feature kinds, preact)`` pairs, one per method, with kinds
    from ``{"stem", "stages", "embedding"}``. Post-activation and pre-activation stage
    taps live in separate hook sets, so methods with different needs share one forward.
    """

    def __init__(self, model: nn.Module, needs: Iterable[tuple[frozenset[str], bool]]) -> None:
        needs = list(needs)
        names = [spec.name for spec in feature_specs(model)] if any(kinds for kinds, _ in needs) else []
        self.stage_names = [n for n in names if n.startswith("stage")]
        post: set[str] = set()
        pre = False
        for kinds, preact in needs:
            if STEM in kinds:
                post.add(STEM)
            if EMBEDDING in kinds:
                post.add(EMBEDDING)
            if STAGES in kinds:
                if preact:
                    pre = True
                else:
                    post.update(self.stage_names)
        self.post = FeatureHooks(model, sorted(post)) if post else None
        self.pre = FeatureHooks(model, self.stage_names, preact=True) if pre else None

    def pop(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The stores of the latest forward pass (post, pre)."""
        return (self.post.pop() if self.post else {}), (self.pre.pop() if self.pre else {})

    def features(self, stores: tuple[dict, dict], logits: torch.Tensor, kinds: frozenset[str],
                 preact: bool) -> Features:
        """The :class:`Features` one method asked for, from the stores of one forward pass."""
        post, pre = stores
        stage_store = pre if preact else post
        return Features(
            logits=logits,
            stem=post.get(STEM) if STEM in kinds else None,
            stages=[stage_store[n] for n in self.stage_names] if STAGES in kinds else [],
            embedding=post.get(EMBEDDING) if EMBEDDING in kinds else None,
        )

    def remove(self) -> None:
        for hooks in (self.post, self.pre):
            if hooks is not None:
                hooks.remove()


def shapes_of(features: Features) -> Features:
    """The same structure with ``torch.Size`` in place of tensors."""
    size = lambda t: None if t is None else t.shape  # noqa: E731
    return Features(logits=size(features.logits), stem=size(features.stem),
                    stages=[t.shape for t in features.stages], embedding=size(features.embedding))
