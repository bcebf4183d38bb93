"""The config's own resolvers: ``${method_label:...}``, ``${if:FLAG,A,B}``, ``${teacher_folder:...}``, and
the two that name a run directory's data set and optimizer (``${dataset_folder:...}``, ``${optimizer_label:...}``).

Registered when this module is imported (every composition imports it, :mod:`distiller.config.compose`).
"""
from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import ValidationError
from omegaconf.nodes import BooleanNode

from datasets import teacher_folder
from models.external import network_label

LS_SUFFIX = "_ls"  # the label of a method with logit standardization on (configs/distill/*_ls.yaml are named so)


def method_label(name: str, combine: Any = None, standardize: Any = False) -> str:
    """Label of a run's objective: the method's name (``_ls`` added where ``distill.logit_standardize`` turns
    logit standardization on and the name does not say so: ``distill=kd distill.logit_standardize=true`` is
    ``kd_ls``, as ``distill=kd_ls`` is), plus ``+label`` for every combined method. The switch is read as the
    schema reads a boolean (:func:`is_on`: ``yes`` turns it on, as it does for the objective)."""
    name = str(name)
    if is_on(standardize) and not name.endswith(LS_SUFFIX):
        name += LS_SUFFIX
    return "+".join([name, *sorted(str(k) for k in (combine or {}))])


# Runs on CIFAR-100 with SGD keep the run directories they always had; another data set or optimizer is
# named in the path, so such a run never lands in (and is never refused by) the directory of a default run.
PLAIN_DATASET, PLAIN_OPTIMIZER = "cifar100", "sgd"


def dataset_folder(name: str, root: Any, num_classes: Any = None) -> str:
    """``${dataset_folder:NAME,ROOT[,CLASSES]}``: nothing on CIFAR-100, else the data set's folder and a ``/``,
    e.g. ``cifar10/``, ``synthetic10/`` or, for an image folder, ``imagefolder-flowers-1a2b3c4d/`` (named as
    its teachers' folder is: :func:`datasets.teacher_folder`)."""
    return "" if str(name) == PLAIN_DATASET else f"{teacher_folder(str(name), str(root), num_classes)}/"


def optimizer_label(label: str, optimizer: str) -> str:
    """``${optimizer_label:LABEL,OPTIMIZER}``: LABEL under SGD, else ``LABEL_<optimizer>`` on its first method
    (``kd_dot``, ``crd_dot+at``: how the result tables and ``experiment=new_methods_table_dot`` name such
    runs), never twice (``kd_dot`` stays ``kd_dot``)."""
    first, *combined = str(label).split("+")
    suffix = f"_{optimizer}"
    if str(optimizer) != PLAIN_OPTIMIZER and not first.endswith(suffix):
        first += suffix
    return "+".join([first, *combined])


def network_folder(source: Any, name: Any) -> str:
    """``${network_folder:SOURCE,NAME}``: a network's name in run directories, as in its files and messages
    (:func:`models.external.network_label`): ``resnet56`` from the zoo, ``torchvision-resnet18`` /
    ``timm-resnet18`` / ``module-pkg.Net`` from outside it, so two sources' networks of one name never share
    a run directory."""
    return network_label({"source": None if str(source) in ("", "None", "null") else source, "name": name})


def if_switch(flag: Any, then: Any, otherwise: Any) -> Any:
    """``${if:FLAG,A,B}``: A when FLAG is true, else B. A method default that follows a switch, e.g.
    KD's temperature under ``logit_standardize`` (the pair's LS value) and without it (4). FLAG is read
    as the schema reads a boolean (``yes``/``on``/``1`` are true); a value that is no boolean picks B,
    and the schema then reports it in one line."""
    return then if is_on(flag) else otherwise


def switch_value(flag: Any) -> bool | None:
    """A switch read as the schema reads a boolean (``true``/``yes``/``on``/``1``, ``false``/``no``/...); None for
    a value that is no boolean (validation reports it in one line)."""
    try:
        return BooleanNode(value=flag)._value()
    except ValidationError:
        return None


def is_on(flag: Any) -> bool:
    """Whether a switch is on (:func:`switch_value`); a value that is no boolean counts as off here."""
    return switch_value(flag) is True


def register_resolvers() -> None:
    """Register the resolvers (again: ``replace``, so a second call changes nothing)."""
    OmegaConf.register_new_resolver("method_label", method_label, replace=True)
    OmegaConf.register_new_resolver("if", if_switch, replace=True)
    # ``teacher_dir``'s default: checkpoints/teachers/<data set>, one folder per image folder (datasets.base)
    OmegaConf.register_new_resolver("teacher_folder", teacher_folder, replace=True)
    # run directories: the data set and the optimizer where they are not CIFAR-100 and SGD
    OmegaConf.register_new_resolver("dataset_folder", dataset_folder, replace=True)
    OmegaConf.register_new_resolver("optimizer_label", optimizer_label, replace=True)
    OmegaConf.register_new_resolver("network_folder", network_folder, replace=True)


register_resolvers()
