"""Distillation methods: one module per method, each registers itself in :data:`METHODS` on import.

Importing this package imports every module in it, so ``METHODS.get(name)`` knows
them all: adding a method is adding its file here and its ``configs/distill/<name>.yaml``.
"""
from __future__ import annotations

import importlib
import inspect
import pkgutil
from typing import Any, Mapping

from common.errors import UserError
from distiller.methods.base import METHODS, BuildContext, DistillMethod, InitPhase, TermContext
from distiller.methods.key_types import key_hints, refusal

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _module not in ("base", "key_types"):
        importlib.import_module(f"{__name__}.{_module}")

__all__ = ["METHODS", "BuildContext", "DistillMethod", "InitPhase", "TermContext", "make_method"]


def make_method(name: str, params: Mapping[str, Any], key: str = "distill") -> DistillMethod:
    """The registered method ``name`` built with its own config keys ``params`` (``key``: where they are set).

    A key the method's constructor does not take, or a value it refuses, is one :class:`UserError`.
    """
    cls = METHODS.get(str(name))
    accepted = inspect.signature(cls.__init__).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()):
        unknown = [k for k in params if k not in accepted]
        if unknown:
            valid = [p for p in accepted if p != "self"]
            raise UserError(f"{key}.{unknown[0]} is not a parameter of method '{name}'; "
                            f"its parameters are: {', '.join(valid) or 'none'}")
    hints = key_hints(cls)
    for param, value in params.items():
        why = refusal(value, hints.get(param))
        if why:
            raise UserError(f"{key}.{param}={value} {why} (method '{name}')")
    try:
        return cls(**params)
    except (TypeError, ValueError) as err:
        raise UserError(f"method '{name}': {err}") from None
