"""Command-line overrides read as Hydra will read them, before Hydra does; one line for one it cannot read.

Hydra's grammar reads an unquoted value only when it is made of ASCII letters, digits and a few
symbols, so a path with ``~``, an apostrophe or a non-ASCII letter fails with a bare
``LexerNoViableAltException``. Such a value is handed to Hydra quoted instead (a leading ``~`` first
expanded to the home folder, as the shell would have done had the key been a variable name), so
``dataset.root=~/données`` or ``hydra.run.dir=/runs/l'été`` just work. In a sweep (``-m``) each
comma-separated value is quoted alone. What Hydra cannot read even quoted (a list or a quote left
open, a word without ``=``) is one line saying what to write.
"""
from __future__ import annotations

import os
import re
from typing import Any, Mapping, Sequence

from common.errors import UserError

_STRUCTURED = ("[", "{", "(", "'", '"')  # a value opening Hydra's own syntax: a mistake there is reported, not quoted


def _parser() -> Any:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create()


def _readable(arg: str) -> bool:
    from hydra.errors import OverrideParseException

    try:
        _parser().parse_overrides([arg])
    except OverrideParseException:
        return False
    return True


def hydra_quoted(value: str) -> str:
    """``value`` as one single-quoted string of Hydra's grammar that Hydra reads back exactly (any path)."""
    # inside single quotes Hydra unescapes \' and a backslash run that precedes a quote or the end
    return "'" + re.sub(r"(\\*)('|$)", lambda m: m.group(1) * 2 + ("\\'" if m.group(2) else ""), value) + "'"


def _home(value: str) -> str:
    """A leading ``~`` as the shell reads it in a variable assignment: the home folder."""
    return os.path.expanduser(value) if value == "~" or value.startswith("~/") else value


def readable_overrides(args: list[str], multirun: bool) -> list[str]:
    """``args`` with every override Hydra cannot read as typed rewritten so it can (quoted); one
    :class:`UserError` for an override that cannot be read even so."""
    return [_readable_override(arg, multirun) for arg in args]


def _readable_override(arg: str, multirun: bool) -> str:
    if _readable(arg):
        return arg
    key, equals, value = arg.partition("=")
    if not equals:
        raise UserError(f"'{arg}' is not an override: write KEY=VALUE (e.g. seed=1)")
    if value and not value.startswith(_STRUCTURED):
        pieces = value.split(",") if multirun else [value]
        quoted = f"{key}={','.join(hydra_quoted(_home(p)) for p in pieces)}"
        if _readable(quoted):
            return quoted
    raise UserError(f"cannot read the override '{arg}' ({_hydra_reason(arg)}); write KEY=VALUE and put a value "
                    f"with special characters in quotes, e.g. \"{key}='...'\" (Hydra's override grammar)")


def _hydra_reason(arg: str) -> str:
    from hydra.errors import OverrideParseException

    try:
        _parser().parse_overrides([arg])
    except OverrideParseException as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        useful = [line for line in lines if not line.startswith(("Error parsing override", "See ", "^"))]
        return (useful or lines or ["unreadable"])[0]
    return "unreadable"


def sweep_axes(args: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """The plain overrides of a multirun command line, and each swept key with its values (Hydra's
    spelling, ``key=value`` ready). Sweeps Hydra's basic sweeper cannot enumerate (``interval``) are left out."""
    plain, axes = [], {}
    for override in _parser().parse_overrides(list(args)):
        if not override.is_sweep_override():
            plain.append(override.input_line)
        elif override.is_discrete_sweep():
            axes[override.get_key_element()] = list(override.sweep_string_iterator())
    return plain, axes


def added_top_level_keys(args: list[str], groups: set[str]) -> list[str]:
    """The top-level keys that ``+KEY=...`` / ``++KEY=...`` overrides add (``+distill@combine.at=at``: combine);
    a group choice (``+experiment=...``, a name in ``groups``) adds no key of its own."""
    keys = []
    for override in _parser().parse_overrides(list(args)):
        if not (override.is_add() or override.is_force_add()):
            continue
        if override.package is None and override.key_or_group in groups:
            continue
        keys.append((override.package or override.key_or_group).split(".")[0])
    return keys


def override_key(override: str) -> str:
    """The key an override names as typed (``+distill.q=3`` -> ``distill.q``), without Hydra's parser."""
    return override.split("=", 1)[0].lstrip("+~")


def refuse_unread(overrides: Sequence[str], reads: Sequence[str], command: str,
                  options: Mapping[str, str] | None = None) -> None:
    """One line for the first override ``command`` does not read: ``reads`` are keys (``trainer.device``) and
    groups (``dataset``: the choice and every ``dataset.*`` key). A training key given to a command that only
    measures (``optim.lr=0.3`` to evaluate.py) would otherwise be accepted and ignored. ``options``: keys the
    command takes as an option of its own instead (``teacher.cache_dtype`` -> ``--dtype``), named in the line."""
    for override in overrides:
        key = override_key(override)
        if (options or {}).get(key):
            raise UserError(f"config key '{key}' is not read by {command}: its option {options[key]} sets it; "
                            f"replace {override} with {options[key]} VALUE")
        if not any(key == read or key.startswith(f"{read}.") for read in reads):
            shown = ", ".join(f"{read}=, {read}.*" if "." not in read else read for read in reads)
            raise UserError(f"config key '{key}' is not read by {command}: it reads {shown}; drop {override}")


def set_keys(args: list[str]) -> set[str]:
    """The config keys that ``args`` set (``key=v``, ``+key=v``, ``++key=v``; a sweep's too); a group choice
    (``distill=kd``) comes out as the group's name, one into a package (``+distill@combine.at=at``) and a
    deletion (``~key``) not at all."""
    keys = set()
    for override in _parser().parse_overrides(list(args)):
        if override.is_delete() or override.package is not None:
            continue
        keys.add(override.get_key_element())
    return keys
