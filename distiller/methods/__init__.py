"""Distillation methods: one module per method, each registers itself in :data:`METHODS` on import.

Importing this package imports every module in it, so ``METHODS.get(name)`` knows
them all: adding a method is adding its file here and its ``configs/distill/<name>.yaml``.
"""
from __future__ import annotations

import importlib
import pkgutil

from distiller.methods.base import METHODS, BuildContext, DistillMethod, Phase

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _module != "base":
        importlib.import_module(f"{__name__}.{_module}")

__all__ = ["METHODS", "BuildContext", "DistillMethod", "Phase"]
