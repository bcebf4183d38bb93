"""Distillation methods: one module per method, each registers itself in :data:`METHODS` on import.

Importing this package imports every module in it, so ``METHODS.get(name)`` knows
them all: adding a method is adding its file here and its ``configs/distill/<name>.yaml``.
"""
from __future__ import annotations

import importlib
import inspect
import math
import pkgutil
import types
import typing
from typing import Any, Mapping

from common.errors import UserError
from distiller.methods.base import METHODS, BuildContext, DistillMethod, InitPhase, TermContext

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _module != "base":
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
    for param, value in params.items():
        wrong = _wrong_type(value, _hints(cls).get(param))
        if wrong:
            raise UserError(f"{key}.{param}={value} is not {wrong} (method '{name}')")
    try:
        return cls(**params)
    except (TypeError, ValueError) as err:
        raise UserError(f"method '{name}': {err}") from None


def _hints(cls: type) -> dict[str, Any]:
    """The constructor's annotations, resolved (none where one cannot be: nothing is checked then)."""
    try:
        return typing.get_type_hints(cls.__init__)
    except (NameError, TypeError):
        return {}


def _wrong_type(value: Any, hint: Any) -> str | None:
    """What ``value`` should have been for a ``bool``, ``int`` or ``float`` parameter (optionally ``| None``);
    None when it fits, or when the parameter is of another type (lists, strings: the method checks them).
    A switch must be a boolean: ``cam_normalize=maybe`` would be truthy, and silently on."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    allowed = set(typing.get_args(hint)) if union else {hint}
    if value is None:
        return None if type(None) in allowed or hint is None else "a value (null is not allowed here)"
    if bool in allowed:
        return None if isinstance(value, bool) else "a boolean (true or false)"
    if int in allowed and float not in allowed:
        return None if isinstance(value, int) and not isinstance(value, bool) else "a whole number"
    if float in allowed:
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        return None if number and math.isfinite(value) else "a finite number"
    return None
