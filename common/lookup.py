"""Reading one value of a nested plain config (a resolved run's ``config.yaml``) by its dotted key."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def dotted_get(config: Mapping[str, Any], dotted: str) -> Any:
    """``config["a"]["b"]`` for ``"a.b"``; None where any part is missing (older runs lack newer keys)."""
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node
