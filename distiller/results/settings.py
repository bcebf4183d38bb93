"""Whether a run was trained with the settings behind its cell's published number: the collector flags the
cells whose runs were not (a visible NOT_PUBLISHED_SETTINGS in the table and the CSV), as it tags numbers
from a secondary source SECONDARY.

Only what is known to differ is flagged. WTTM and TTM (Zheng & Yang, ICLR 2024) set gamma and beta per pair
in their paper's appendix A.4, which we could not read; their repository (zkxufo/TTM fe457b3) gives one
example per method, and the presets run those examples on every pair. So a WTTM or TTM run is flagged
unless it is the one cell whose published command we have (TTM vgg13 -> vgg8, README: ``--ttm_l 0.1 -b 45``)
with exactly those values.
"""
from __future__ import annotations

from typing import Any

from common.lookup import dotted_get

NOT_PUBLISHED_SETTINGS = "NOT_PUBLISHED_SETTINGS"

# method (a run's label, or one part of a combined label) -> {(teacher, student): {config key: value}}: the
# per-pair settings of the published runs that we know. A method listed here trains each pair with its own
# published settings; a pair missing from its mapping has settings we do not know, so no run of it can be
# claimed to match.
KNOWN_PER_PAIR: dict[str, dict[tuple[str, str], dict[str, float]]] = {
    # the TTM README's example command, for vgg13 -> vgg8: --ttm_l 0.1 (gamma), -b 45 (beta), -r 1 (CE), -a 0 (KD)
    "ttm": {("vgg13", "vgg8"): {"distill.power": 0.1, "distill.beta": 45.0, "distill.gamma": 1.0,
                                "distill.alpha": 0.0}},
    # the README's only WTTM example is WTTM+CRD (WTTM 4, gamma 0.2) with no pair named: no cell is known
    "wttm": {},
}
UNKNOWN_NOTE = "{method}: per-pair gamma/beta of the paper's appendix A.4 unknown, ran {values}"
DIFFERENT_NOTE = "{method}: ran {values}, published {published}"


def _values(config: dict[str, Any], keys: list[str]) -> str:
    return ", ".join(f"{key.split('.')[-1]} {dotted_get(config, key)}" for key in keys)


def unpublished_settings(method: str, teacher: str | None, student: str, config: dict[str, Any]) -> str | None:
    """Why a run of ``method`` on ``teacher`` -> ``student`` with ``config`` did not use the settings of the
    published number (one phrase), or None when nothing known departs from them."""
    notes = []
    for index, part in enumerate(method.split("+")):
        if part not in KNOWN_PER_PAIR:
            continue
        # the first part is distill.*, a combined method's parameters live under combine.<name>
        node = "distill" if index == 0 else f"combine.{part}"
        keys = [f"{node}.power", f"{node}.beta"]
        published = KNOWN_PER_PAIR[part].get((str(teacher), student))
        if published is None:
            notes.append(UNKNOWN_NOTE.format(method=part, values=_values(config, keys)))
            continue
        wanted = {key.replace("distill.", f"{node}.", 1): value for key, value in published.items()}
        if any(dotted_get(config, key) != value for key, value in wanted.items()):
            notes.append(DIFFERENT_NOTE.format(method=part, values=_values(config, list(wanted)),
                                               published=", ".join(f"{k.split('.')[-1]} {v:g}"
                                                                   for k, v in wanted.items())))
    return "; ".join(notes) or None
