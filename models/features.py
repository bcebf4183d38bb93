"""The feature contract between a model and the distillation code.

A model lists ``feature_info``: one :class:`FeatureInfo` per tap, ``stem``,
``stage1`` .. ``stageL`` and ``embedding``, saying where the feature is (a module
path), what it is (channels, reduction of the input resolution) and what lies
just before it (the pre-activation tap and the BatchNorm that produces it).
``distiller.features`` puts forward hooks there; models never return features from
``forward``. The declaration plays the part of timm's ``feature_info`` and of the
older frameworks' ``get_bn_before_relu``, so no method has to rediscover a fact.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FeatureInfo:
    """One tapped feature of a model.

    ``module`` is a dotted path as in ``model.get_submodule`` ("" is the model itself);
    the feature is that module's output, or its first input when ``module_input``.
    ``preact`` (same convention, flag ``preact_input``) is the feature before the
    stage's final activation; ``None`` means it equals the feature itself.
    ``bn`` is the BatchNorm whose output is the pre-activation map (or the residual
    branch added into it); ``None`` where there is no such layer.
    ``reduction`` is input size / map size; ``None`` for the pooled embedding vector.
    """

    name: str
    module: str
    channels: int
    reduction: int | None
    module_input: bool = False
    preact: str | None = None
    preact_input: bool = False
    bn: str | None = None

    @property
    def is_stage(self) -> bool:
        return self.name.startswith("stage")
