"""The types of a method's config keys, declared on its constructor's parameters: a number type and its range.

:func:`distiller.methods.make_method` checks each value against its parameter's annotation before the run
starts, so ``distill.dkd_temperature=-1`` is one line naming the key and the range, not a run that trains
on a negative temperature. ``bool``, ``int`` and ``float`` alone check the type; these add the range.
"""
from __future__ import annotations

import math
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any


@dataclass(frozen=True)
class AtLeast:
    """A lower bound: ``value >= low``, or ``value > low`` when ``strict``."""

    low: float
    strict: bool = False

    def holds(self, value: float) -> bool:
        return value > self.low if self.strict else value >= self.low

    def __str__(self) -> str:
        return f"{'>' if self.strict else '>='} {self.low:g}"


Positive = Annotated[float, AtLeast(0, strict=True)]  # temperatures, scales, epsilons, learning rates
NonNegative = Annotated[float, AtLeast(0)]  # loss weights and margins (0 switches a term off)
Count = Annotated[int, AtLeast(1)]  # sizes, iterations, grid cells
Epochs = Annotated[int, AtLeast(0)]  # epoch counts and epoch numbers


def _parts(hint: Any) -> tuple[set[Any], AtLeast | None]:
    """The types a hint allows (``None``'s type for ``| None``) and its bound, if it declares one."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    allowed, bound = set(), None
    for part in typing.get_args(hint) if union else (hint,):
        if typing.get_origin(part) is Annotated:
            bound = next((m for m in part.__metadata__ if isinstance(m, AtLeast)), bound)
            part = typing.get_args(part)[0]
        allowed.add(part)
    return allowed, bound


def refusal(value: Any, hint: Any) -> str | None:
    """Why ``value`` does not fit a parameter annotated ``hint`` (``"must be > 0"``, ``"is not a whole
    number"``), or None when it fits or the parameter may be of another type (``int | str``, lists: the
    method checks those)."""
    allowed, bound = _parts(hint)
    if not allowed <= {bool, int, float, type(None)}:  # a name or a list allowed too: the method checks
        return None
    if value is None:
        return None if type(None) in allowed else "must have a value (null is not allowed here)"
    if bool in allowed:
        return None if isinstance(value, bool) else "is not a boolean (true or false)"
    if int in allowed and float not in allowed:
        if not isinstance(value, int) or isinstance(value, bool):
            return "is not a whole number"
    elif float in allowed:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return "is not a finite number"
    return None if bound is None or bound.holds(value) else f"must be {bound}"


def key_hints(cls: type) -> dict[str, Any]:
    """The constructor's annotations with their ranges (none where they cannot be resolved: nothing checked)."""
    try:
        return typing.get_type_hints(cls.__init__, include_extras=True)
    except (NameError, TypeError):
        return {}
