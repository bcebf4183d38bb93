"""The CIFAR-100 model zoo: every architecture of the older distillation frameworks, by reference name.

``build_model("resnet32x4")`` returns a fresh model whose ``state_dict`` names and shapes
match the widely shared pretrained checkpoints, and whose ``feature_info`` says where
its stem, stages and embedding are (see :mod:`models.features`).
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from torch import nn

from common.errors import UserError
from common.registry import Registry

# Defined before the family modules are imported: they register into it with decorators.
MODELS: Registry = Registry("model", case_insensitive=True)

# Every module of this package is imported (in name order), so a new model file registers itself:
# adding an architecture is adding its file. Modules that register nothing and import a heavy library
# are left to the code that needs them (torchvision costs seconds to import).
ON_DEMAND = frozenset({"torchvision_blocks"})
for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _module not in ON_DEMAND:
        importlib.import_module(f"{__name__}.{_module}")

__all__ = ["MODELS", "build_model", "list_models", "model_metadata"]

# What a model file may declare in ``@MODELS.register(name, **metadata)``, and the value when it does not.
MODEL_METADATA_DEFAULTS: dict[str, Any] = {
    "lr": 0.05,  # SGD learning rate when this architecture is the trained network (RECIPES.md)
}


def build_model(name: str, num_classes: int = 100) -> nn.Module:
    """A freshly initialised model ``name`` (reference name, any case) with ``num_classes`` outputs."""
    builder = MODELS.get(name)  # unknown names raise UserError listing the valid ones
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise UserError(f"num_classes must be a positive integer, got {num_classes!r}")
    return builder(num_classes=num_classes)


def list_models() -> list[str]:
    """Reference names of all registered architectures, in registration order."""
    return MODELS.names()


def model_metadata(name: str) -> dict[str, Any]:
    """What the model file declares about ``name`` (e.g. its recommended ``lr``), defaults filled in."""
    return {**MODEL_METADATA_DEFAULTS, **MODELS.metadata(name)}
