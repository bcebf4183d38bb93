"""The feature contract between a model and the distillation code.

A model lists where its features are, as module paths; ``distiller.features``
puts forward hooks there. Models never return features from ``forward``.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Tap:
    """A tensor seen by a forward hook: the output of ``module`` or, with ``take_input``, its first input."""

    module: str  # dotted path as in ``model.get_submodule``; "" is the model itself
    take_input: bool = False


@dataclass(frozen=True)
class FeatureSpec:
    """One entry of a model's feature list.

    ``name`` is ``stem``, ``stage1`` .. ``stageL`` or ``embedding``. ``post`` is the
    feature as the older frameworks' ``is_feat=True`` returned it; ``pre`` is the
    same feature before the stage's final activation (``None``: identical to ``post``).
    """

    name: str
    post: Tap
    pre: Tap | None = None
