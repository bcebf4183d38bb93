"""The contract of every registered distillation method, parametrised over the registry itself.

Each name in :data:`distiller.methods.METHODS` has its ``configs/distill/<name>.yaml``; composed, that node names
the method, its own keys are constructor arguments that never clash with the objective's keys, a method that
weights its own terms has ``beta`` 1, and the objective it makes builds on a zoo pair through the engine's
seam (:func:`distiller.engine.step.build_step`: teacher frozen, the features it declares hooked on both
networks, shapes probed, helpers built). A new method file is checked here without being listed anywhere.
"""
from __future__ import annotations

import pytest
import torch
from helpers import CONFIGS, random_splits, seed
from omegaconf import OmegaConf

from distiller.config.schema import OBJECTIVE_KEYS
from distiller.config.validation import method_config
from distiller.engine.runtime import Runtime
from distiller.engine.step import build_step
from distiller.features import KINDS
from distiller.methods import METHODS
from distiller.objective import Objective
from models import build_model

TINY = {"nce_k": 16}  # what keeps a method valid on 32 images (CRD's negatives)


@pytest.fixture(scope="module")
def data():
    return random_splits(32, 10, seed(50), test_n=8)


@pytest.mark.parametrize("name", sorted(METHODS.names()))
def test_registered_method_composes_from_its_yaml_and_builds_on_a_zoo_pair(name: str, compose, data) -> None:
    assert (CONFIGS / "distill" / f"{name}.yaml").is_file(), f"method '{name}' has no configs/distill/{name}.yaml"
    node = OmegaConf.to_container(compose("train_student", [f"distill={name}"]).distill, resolve=True)
    assert METHODS.canonical(node["method"]) == name
    node.update({k: v for k, v in TINY.items() if k in node})
    typed = method_config(node)
    cls = METHODS.get(name)
    assert not set(typed.extra) & set(OBJECTIVE_KEYS)
    assert cls.student_features <= set(KINDS) and cls.teacher_features <= set(KINDS)
    assert cls.calibration_features is None or cls.calibration_features <= set(KINDS)
    if cls.weights_own_terms:
        assert typed.beta == 1.0, f"{name} weights its own terms, so its config's beta must be 1"
    objective = Objective.from_config(typed)
    torch.manual_seed(seed(51))
    student, teacher = build_model("resnet8", num_classes=10), build_model("resnet8", num_classes=10)
    step = build_step(student, teacher, objective, data, Runtime(torch.device("cpu"), "fp32", False, compile=False),
                      epochs=2)
    try:
        assert step.teacher is teacher and not any(p.requires_grad for p in teacher.parameters())
        assert not teacher.training
        (method,) = objective.methods.values()
        assert isinstance(method, cls)
    finally:
        step.remove_hooks()
