"""Formatting shared by the measurements' reports: numbers for tables, values for JSON."""
from __future__ import annotations

import math
from typing import Any


def fmt(value: float | None, unit: str = "", scale: float = 1.0, digits: int = 1) -> str:
    """``value / scale`` with ``digits`` decimals and ``unit``; ``-`` for a figure that was not measured."""
    if value is None:
        return "-"
    return f"{value / scale:.{digits}f}{unit}"


def jsonable(value: Any) -> Any:
    """``value`` as strict JSON takes it: non-finite floats become null, tuples lists, other objects strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    return str(value)
