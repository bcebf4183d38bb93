"""The config's own resolvers: ``${method_label:...}``, ``${if:FLAG,A,B}`` and ``${teacher_folder:...}``.

Registered when this module is imported (every composition imports it, :mod:`distiller.config.compose`).
"""
from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import ValidationError
from omegaconf.nodes import BooleanNode

from datasets import teacher_folder


def method_label(name: str, combine: Any = None) -> str:
    """Label of a run's objective: the method's name, plus ``+label`` for every combined method."""
    return "+".join([str(name), *sorted(str(k) for k in (combine or {}))])


def if_switch(flag: Any, then: Any, otherwise: Any) -> Any:
    """``${if:FLAG,A,B}``: A when FLAG is true, else B. A method default that follows a switch, e.g.
    KD's temperature under ``logit_standardize`` (the pair's LS value) and without it (4). FLAG is read
    as the schema reads a boolean (``yes``/``on``/``1`` are true); a value that is no boolean picks B,
    and the schema then reports it in one line."""
    try:
        on = BooleanNode(value=flag)._value() is True
    except ValidationError:
        on = False
    return then if on else otherwise


def register_resolvers() -> None:
    """Register the resolvers (again: ``replace``, so a second call changes nothing)."""
    OmegaConf.register_new_resolver("method_label", method_label, replace=True)
    OmegaConf.register_new_resolver("if", if_switch, replace=True)
    # ``teacher_dir``'s default: checkpoints/teachers/<data set>, one folder per image folder (datasets.base)
    OmegaConf.register_new_resolver("teacher_folder", teacher_folder, replace=True)


register_resolvers()
