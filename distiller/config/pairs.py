"""Published per-pair settings that follow the chosen teacher and student.

The paper tables tuned a few settings per teacher/student pair (DKD's NCKD weight, FT's
paraphraser lr, ReviewKD's loss weight, ...). They live in ``configs/pair/<teacher>-<student>.yaml``
as a ``pair`` node that method configs read by interpolation (``${oc.select:pair.x,default}``).
With ``pair=...`` on the command line that node is chosen explicitly; otherwise
:func:`apply_pair_settings` fills it from the file of the chosen teacher and student, so
``teacher=resnet56 student=resnet20 distill=dkd`` runs with the published NCKD weight 2.0.
A value given explicitly (``distill.nckd_weight=8``) is no interpolation and still wins.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from common.errors import UserError
from models import MODELS
from models.external import network_label

PAIR_DIR = Path(__file__).resolve().parents[2] / "configs" / "pair"
log = logging.getLogger("distiller")


def pair_settings(teacher: str, student: str) -> dict[str, Any] | None:
    """The published settings of a pair (the ``pair`` node of its file), or None when it has none."""
    if teacher not in MODELS or student not in MODELS:
        return None
    path = PAIR_DIR / f"{MODELS.canonical(teacher)}-{MODELS.canonical(student)}.yaml"
    if not path.is_file():
        return None
    return OmegaConf.to_container(OmegaConf.load(path).get("pair") or {})


def _method_nodes(cfg: DictConfig) -> dict[str, Any]:
    nodes = {"distill": cfg.distill}
    nodes.update({f"combine.{k}": v for k, v in (cfg.get("combine") or {}).items()})
    return {key: OmegaConf.to_container(node, resolve=True) for key, node in nodes.items()}


def _pair_name(teacher: str, student: str) -> str:
    """The name a pair file of ``teacher`` -> ``student`` has (``configs/pair/<name>.yaml``)."""
    canonical = [MODELS.canonical(arch) if arch in MODELS else arch for arch in (teacher, student)]
    return "-".join(canonical)


def check_chosen_pair(cfg: DictConfig) -> None:
    """A ``pair=`` chosen on the command line is the run's teacher and student: ``pair=vgg13-vgg8
    teacher=resnet8`` would give resnet8 -> vgg8 the settings published for vgg13 -> vgg8, so it is refused."""
    name = (cfg.get("pair") or {}).get("name")
    teacher, student = network_label(cfg.teacher), network_label(cfg.student)
    if name is None or str(name) == _pair_name(teacher, student):
        return
    raise UserError(f"pair={name} carries the settings published for its own teacher and student, but this run "
                    f"distills {teacher} -> {student} (teacher= or student= replaced the pair's): drop pair= (the "
                    f"per-pair settings then follow teacher= and student=), or drop the teacher=/student= override")


def apply_pair_settings(cfg: DictConfig) -> list[str]:
    """Fill ``cfg.pair`` from the teacher/student pair unless one was chosen; return what it changed.

    The result names each method key whose value the pair's settings changed, e.g.
    ``distill.nckd_weight=2.0``; empty when nothing changed. A chosen pair must be the run's
    teacher and student (:func:`check_chosen_pair`).
    """
    chosen = cfg.get("pair")
    if chosen is not None:
        check_chosen_pair(cfg)
        with open_dict(cfg):
            cfg.pair = None
        before = _method_nodes(cfg)
        with open_dict(cfg):
            cfg.pair = chosen
        return _changed(before, _method_nodes(cfg))
    # an external network (teacher=timm teacher.name=resnet50) is not the zoo architecture of the same name
    settings = pair_settings(network_label(cfg.teacher), network_label(cfg.student))
    if not settings:
        return []
    before = _method_nodes(cfg)
    with open_dict(cfg):
        cfg.pair = settings
    changed = _changed(before, _method_nodes(cfg))
    if not changed:  # nothing this objective reads: leave the config as the user composed it
        with open_dict(cfg):
            cfg.pair = None
    return changed


def _changed(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """``key.name=value`` for each method key whose value differs between two :func:`_method_nodes`."""
    return [f"{key}.{name}={value}" for key, node in after.items() for name, value in node.items()
            if before[key].get(name) != value]
