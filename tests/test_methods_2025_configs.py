"""The configs of the methods of 2023-2026 hold the published settings, per method and per teacher/student pair.

Every expected value is typed here from METHODS_2025_LOGIT.md and METHODS_2025_FEATURE.md (the authors'
configs), never read from the YAML files. A pair's settings reach a method's node as a run gets them:
``configs/pair/<teacher>-<student>.yaml`` as the ``pair`` node (:func:`distiller.config.pairs.pair_settings`,
what ``apply_pair_settings`` puts there for the chosen teacher and student).
"""
from __future__ import annotations

import copy

import pytest
from helpers import compose_config
from omegaconf import OmegaConf, open_dict

from distiller.config.pairs import apply_pair_settings, pair_settings
from distiller.config.schema import OBJECTIVE_KEYS

OBJECTIVE = ["name", "method", "gamma", "alpha", "beta", "temperature", "warmup_epochs"]
# name: ((gamma, alpha, beta, warmup_epochs), the method's own keys) where no pair setting applies
DEFAULTS = {
    "rld": ((1.0, 0.0, 1.0, 20), {"rld_alpha": 1.0, "rld_beta": 8.0, "rld_temperature": 4.0, "scd_temperature": None,
                                  "logit_standardize": False}),
    "luminet": ((2.0, 0.0, 1.0, 20), {"luminet_alpha": 31.0, "luminet_temperature": 4.0}),
    "skd": ((0.1, 0.0, 0.9, 0), {"skd_temperature": 4.0, "tikhonov": 0.1}),
    "abkd": ((1.0, 0.0, 32.0, 0), {"ab_alpha": 0.8, "ab_beta": 0.3, "abkd_temperature": 4.0,
                                   "logit_standardize": False}),
    "eakd": ((0.1, 0.0, 0.9, 0), {"ea_temperature": 4.0, "entropy_temperature": 3.0, "h_ub": 100.0}),
    "eakd_dkd": ((1.0, 0.0, 1.0, 20), {"tckd_weight": 1.0, "nckd_weight": 8.0, "ea_temperature": 4.0,
                                       "entropy_temperature": 3.0, "h_ub": 100.0}),
    "normkd": ((0.1, 0.0, 0.9, 0), {"t_norm": 2.0}),
    "normkd_dkd": ((1.0, 0.0, 1.0, 20), {"tckd_weight": 1.0, "nckd_weight": 8.0, "t_norm": 2.0}),
    "wkd_l": ((1.0, 0.0, 1.0, 0), {"wkd_weight": 600.0, "wkd_temperature": 8.0, "sinkhorn_lambda": 0.05,
                                   "sinkhorn_iter": 10, "cost_matrix": None, "cost_sharpen": 1.0,
                                   "cosine_decay_epoch": 150}),
    "wkd_f": ((1.0, 0.0, 0.08, 0), {"mean_cov_ratio": 4.0, "spatial_grid": 1, "cosine_decay_epoch": 150}),
    "sdd_kd": ((0.1, 0.0, 0.9, 0), {"sdd_scales": [1, 2, 4], "sdd_temperature": 4.0}),
    "sdd_dkd": ((1.0, 0.0, 1.0, 20), {"tckd_weight": 1.0, "nckd_weight": 8.0, "sdd_scales": [1, 2, 4],
                                      "sdd_temperature": 4.0}),
    "sdd_nkd": ((1.0, 0.0, 1.0, 20), {"nontarget_weight": 8.0, "sdd_scales": [1, 2, 4], "sdd_temperature": 4.0}),
    "cat_kd": ((1.0, 0.0, 15.0, 0), {"cam_resolution": 2, "cam_normalize": False, "cam_student_no_bias": False}),
}
_COMPOSED: dict[str, object] = {}


def node(name: str, teacher: str | None = None, student: str | None = None, **overrides) -> dict:
    """The composed ``distill=<name>`` node with the pair's settings (if it has a file) and ``overrides``."""
    if name not in _COMPOSED:
        _COMPOSED[name] = compose_config("train_student", [f"distill={name}"])
    cfg = copy.deepcopy(_COMPOSED[name])
    with open_dict(cfg):
        cfg.pair = pair_settings(teacher, student) if teacher else None
        for key, value in overrides.items():
            cfg.distill[key] = value
    return OmegaConf.to_container(cfg.distill, resolve=True)


@pytest.mark.parametrize("name", sorted(DEFAULTS))
def test_config_holds_the_published_defaults(name: str) -> None:
    cfg = node(name)
    assert list(cfg)[:len(OBJECTIVE)] == OBJECTIVE and cfg["name"] == cfg["method"] == name
    weights, own = DEFAULTS[name]
    assert (cfg["gamma"], cfg["alpha"], cfg["beta"], cfg["warmup_epochs"]) == weights
    assert {k: v for k, v in cfg.items() if k not in OBJECTIVE} == own
    assert not (set(own) - {"logit_standardize"}) & set(OBJECTIVE_KEYS)  # the LS switch is the objective's own


def own(cfg: dict, *keys: str) -> tuple:
    return tuple(cfg[k] for k in keys)


LUMINET = {  # (teacher, student): (ALPHA, T, CE_WEIGHT)
    ("resnet32x4", "resnet8x4"): (33.0, 4.0, 2.0), ("vgg13", "vgg8"): (70.0, 8.0, 1.0),
    ("wrn_40_2", "wrn_40_1"): (75.0, 8.0, 1.0), ("wrn_40_2", "ShuffleV1"): (35.0, 4.0, 1.0),
    ("vgg13", "MobileNetV2"): (70.0, 8.0, 2.0), ("ResNet50", "MobileNetV2"): (70.0, 8.0, 2.0),
}
NORMKD_DKD = {  # (teacher, student): (alpha, beta)
    ("resnet56", "resnet20"): (7.0, 2.0), ("resnet110", "resnet32"): (5.0, 4.0),
    ("resnet32x4", "resnet8x4"): (4.0, 5.0), ("wrn_40_2", "wrn_16_2"): (4.0, 5.0), ("wrn_40_2", "wrn_40_1"): (3.0, 6.0),
    ("vgg13", "vgg8"): (2.0, 7.0), ("resnet32x4", "ShuffleV1"): (0.5, 8.5), ("resnet32x4", "ShuffleV2"): (4.0, 5.0),
    ("wrn_40_2", "ShuffleV1"): (4.0, 5.0), ("vgg13", "MobileNetV2"): (3.0, 6.0),
    ("ResNet50", "MobileNetV2"): (2.0, 7.0),
}
CAT_KD = {  # (teacher, student): (beta, resolution, normalize)
    ("resnet32x4", "resnet8x4"): (15.0, 2, False), ("resnet56", "resnet20"): (0.7, 2, False),
    ("resnet110", "resnet32"): (1.8, 2, False), ("vgg13", "vgg8"): (4.5, 2, False),
    ("wrn_40_2", "wrn_16_2"): (12.0, 2, False), ("wrn_40_2", "wrn_40_1"): (1.5, 2, False),
    ("resnet32x4", "ShuffleV1"): (600.0, 4, True), ("resnet32x4", "ShuffleV2"): (600.0, 4, True),
    ("wrn_40_2", "ShuffleV1"): (80.0, 4, True), ("ResNet50", "MobileNetV2"): (40.0, 2, True),
    ("vgg13", "MobileNetV2"): (15.0, 2, True),
}
SDD_BETA = {("resnet56", "resnet20"): 2.0, ("resnet110", "resnet32"): 2.0, ("vgg13", "vgg8"): 6.0,
            ("vgg13", "MobileNetV2"): 6.0, ("wrn_40_2", "wrn_16_2"): 6.0, ("wrn_40_2", "wrn_40_1"): 6.0,
            ("wrn_40_2", "MobileNetV2"): 6.0, ("resnet32x4", "ShuffleV1"): 8.0, ("ResNet50", "vgg8"): 8.0}
SDD_SCALES = {("resnet32x4", "resnet8x4"): [1, 2], ("vgg13", "vgg8"): [1, 2], ("resnet32x4", "ShuffleV1"): [1, 2, 4],
              ("wrn_40_2", "ShuffleV1"): [1, 2, 4], ("ResNet50", "MobileNetV2"): [1, 2, 4]}
SDD_NKD_SCALES = {("ResNet50", "vgg8"): [1, 2], ("vgg13", "MobileNetV2"): [1, 2],
                  ("resnet32x4", "ShuffleV2"): [1, 2, 4]}


@pytest.mark.parametrize("pair", sorted(LUMINET))
def test_luminet_per_pair_alpha_temperature_and_ce_weight(pair: tuple[str, str]) -> None:
    cfg = node("luminet", *pair)
    assert (cfg["luminet_alpha"], cfg["luminet_temperature"], cfg["gamma"]) == LUMINET[pair]
    assert (cfg["beta"], cfg["warmup_epochs"]) == (1.0, 20)


@pytest.mark.parametrize("pair", sorted(NORMKD_DKD))
def test_normkd_dkd_per_pair_alpha_and_beta(pair: tuple[str, str]) -> None:
    assert own(node("normkd_dkd", *pair), "tckd_weight", "nckd_weight", "t_norm") == (*NORMKD_DKD[pair], 2.0)
    assert node("normkd", *pair)["t_norm"] == 2.0  # no config overrides TEMPERATURE_NORM


@pytest.mark.parametrize("pair", sorted(CAT_KD))
def test_cat_kd_per_pair_weight_resolution_and_normalisation(pair: tuple[str, str]) -> None:
    cfg = node("cat_kd", *pair)
    assert (cfg["beta"], cfg["cam_resolution"], cfg["cam_normalize"]) == CAT_KD[pair]
    assert cfg["cam_student_no_bias"] is False


@pytest.mark.parametrize("pair", sorted(set(SDD_BETA) | set(SDD_SCALES) | set(SDD_NKD_SCALES)))
def test_sdd_per_pair_scales_and_dkd_beta(pair: tuple[str, str]) -> None:
    beta, scales = SDD_BETA.get(pair, 8.0), SDD_SCALES.get(pair, [1, 2, 4])
    assert own(node("sdd_kd", *pair), "sdd_scales", "sdd_temperature") == (scales, 4.0)
    assert own(node("sdd_dkd", *pair), "tckd_weight", "nckd_weight", "sdd_scales") == (1.0, beta, scales)
    assert own(node("sdd_nkd", *pair), "nontarget_weight", "sdd_scales") == (beta, SDD_NKD_SCALES.get(pair, scales))


def test_wkd_skd_and_eakd_per_pair_settings() -> None:
    l8, l1 = node("wkd_l", "resnet32x4", "resnet8x4"), node("wkd_l", "wrn_40_2", "ShuffleV1")
    assert own(l8, "wkd_weight", "wkd_temperature") == (600.0, 8.0) and own(l1, "wkd_weight", "wkd_temperature") == (
        200.0, 6.0)
    f8, f1 = node("wkd_f", "resnet32x4", "resnet8x4"), node("wkd_f", "wrn_40_2", "ShuffleV1")
    assert own(f8, "beta", "mean_cov_ratio", "spatial_grid") == (0.08, 4.0, 1)
    assert own(f1, "beta", "mean_cov_ratio", "spatial_grid") == (0.3, 3.0, 4)
    assert own(node("skd", "resnet32x4", "resnet8x4"), "gamma", "beta") == (0.5, 0.5)
    assert own(node("skd", "vgg13", "vgg8"), "gamma", "beta") == (0.1, 0.9)  # no other pair is published
    # EA-DKD: no per-pair EA setting; the other pairs reuse DKD's NCKD weight
    assert node("eakd_dkd", "resnet56", "resnet20")["nckd_weight"] == 2.0
    assert node("eakd_dkd", "resnet32x4", "resnet8x4")["nckd_weight"] == 8.0


def test_the_pair_reaches_a_run_from_teacher_and_student_alone(compose) -> None:
    """End to end: the pair's file is found from the chosen teacher and student, and the run prints what it set."""
    cfg = compose("train_student", ["teacher=vgg13", "student=vgg8", "distill=luminet"])
    assert apply_pair_settings(cfg) == ["distill.gamma=1.0", "distill.luminet_alpha=70.0",
                                        "distill.luminet_temperature=8.0"]
    cfg = compose("train_student", ["teacher=wrn_40_2", "student=ShuffleV1", "distill=cat_kd"])
    assert apply_pair_settings(cfg) == ["distill.beta=80.0", "distill.cam_resolution=4", "distill.cam_normalize=True"]


def test_logit_standardization_variants() -> None:
    """RLD+LS: alpha 1*w, beta 8*w, T = T_a = T_b (w 9, T_b 2); ABLSD: -r 0.1 -b 9 --kd_T 2, alpha 0.9, beta 0.3."""
    rld = node("rld", logit_standardize=True)
    assert own(rld, "rld_alpha", "rld_beta", "rld_temperature", "scd_temperature") == (9.0, 72.0, 2.0, None)
    ab = node("abkd", logit_standardize=True)
    assert own(ab, "gamma", "beta", "ab_alpha", "ab_beta", "abkd_temperature") == (0.1, 9.0, 0.9, 0.3, 2.0)


def test_presets_set_what_the_published_recipes_change(compose) -> None:
    standard = compose("train_student", ["experiment=methods_2025_standard", "pair=resnet32x4-resnet8x4"],
                       return_hydra_config=True)
    assert (standard.optim.lr, standard.optim.nesterov, standard.trainer.epochs) == (0.05, False, 240)
    assert list(standard.schedule.milestones) == [150, 180, 210] and standard.hydra.sweep.dir == "runs/student"
    skd = compose("train_student", ["experiment=methods_2025_skd_paper", "pair=wrn_40_2-wrn_40_1"],
                  return_hydra_config=True)
    assert (skd.distill.name, skd.optim.lr, skd.optim.nesterov) == ("skd", 0.1, False)
    wkd = compose("train_student", ["experiment=methods_2025_wkd_paper", "pair=wrn_40_2-ShuffleV1"],
                  return_hydra_config=True)
    assert (wkd.distill.name, wkd.optim.lr, wkd.optim.nesterov) == ("wkd_l", 0.01, True)
    both = compose("train_student", ["experiment=methods_2025_wkd_lf_paper", "pair=resnet32x4-resnet8x4"],
                   return_hydra_config=True)
    assert (both.method_label, both.optim.nesterov, both.combine.wkd_f.beta) == ("wkd_l+wkd_f", True, 0.08)
    for cfg in (skd, wkd, both):  # paper runs never share a run directory with the standard recipe's
        assert cfg.hydra.sweep.dir == "runs/paper" and cfg.hydra.run.dir.startswith("runs/paper/")
