"""What a job refuses in its config before it starts, in one line (:func:`check_before_start`): the check
before Hydra runs (:mod:`distiller.config.preflight`) and the advice on a missing key
(:mod:`distiller.config.key_advice`) ask it."""
from __future__ import annotations

from typing import Collection

from omegaconf import DictConfig

from distiller.config.key_scope import check_set_keys
from distiller.config.pairs import check_chosen_pair
from distiller.config.schema import StudentJob
from distiller.config.validation import load_job


def check_before_start(cfg: DictConfig | dict, job: str, set_keys: Collection[str] = ()) -> None:
    """What a job refuses in its config before it starts, in one :class:`UserError`: the schema (:func:`load_job`)
    and, for distillation, the objective's own checks (a method's parameters, ``logit_standardize`` where no
    term compares logits, ...: :meth:`distiller.objective.Objective.from_config`) and a ``pair=`` of another
    teacher or student (:func:`check_chosen_pair`); ``set_keys``: the keys the command line sets, each of which
    must be read (:func:`distiller.config.key_scope.check_set_keys`)."""
    from distiller.objective import Objective

    typed = load_job(cfg, job)
    objective = Objective.from_config(typed.distill, typed.combine) if isinstance(typed, StudentJob) else None
    if objective is not None and isinstance(cfg, DictConfig):
        check_chosen_pair(cfg)
    if set_keys and isinstance(cfg, DictConfig):
        check_set_keys(cfg, objective, set_keys)
