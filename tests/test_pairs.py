"""Published per-pair settings follow teacher and student without pair=..., and explicit values still win."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import run_cli, tiny_overrides

import distiller.config.pairs as pairs
from distiller.config.pairs import apply_pair_settings
from distiller.jobs.train import distill
from models import build_model

# The published values (RECIPES.md DKD per pair; ReviewKD: the ReviewKD authors' CIFAR-100/script/reviewKD.sh)
DKD_NCKD = {("resnet56", "resnet20"): 2.0, ("resnet110", "resnet32"): 2.0, ("resnet32x4", "resnet8x4"): 8.0,
            ("wrn_40_2", "wrn_16_2"): 6.0, ("wrn_40_2", "wrn_40_1"): 6.0, ("vgg13", "vgg8"): 6.0,
            ("vgg13", "MobileNetV2"): 6.0, ("ResNet50", "MobileNetV2"): 8.0, ("resnet32x4", "ShuffleV1"): 8.0,
            ("resnet32x4", "ShuffleV2"): 8.0, ("wrn_40_2", "ShuffleV1"): 8.0}
REVIEWKD_WEIGHT = {("resnet56", "resnet20"): 0.6, ("resnet110", "resnet32"): 1.0, ("resnet32x4", "ShuffleV2"): 8.0,
                   ("resnet32x4", "resnet8x4"): 5.0, ("vgg13", "vgg8"): 5.0}


@pytest.mark.parametrize(("teacher", "student"), list(DKD_NCKD))
def test_dkd_takes_the_published_nckd_weight_of_the_pair(compose, teacher: str, student: str) -> None:
    cfg = compose("train_student", [f"teacher={teacher}", f"student={student}", "distill=dkd"])
    changed = apply_pair_settings(cfg)
    assert cfg.distill.nckd_weight == DKD_NCKD[(teacher, student)]
    expected_change = DKD_NCKD[(teacher, student)] != 8.0  # 8.0 is the config's own default
    assert changed == ([f"distill.nckd_weight={DKD_NCKD[(teacher, student)]}"] if expected_change else [])
    explicit = compose("train_student", [f"pair={teacher}-{student}", "distill=dkd"])
    assert apply_pair_settings(explicit) == changed  # pair= chosen: the run reports what it changed the same way
    assert explicit.distill.nckd_weight == DKD_NCKD[(teacher, student)]


@pytest.mark.parametrize(("teacher", "student"), list(REVIEWKD_WEIGHT))
def test_reviewkd_takes_the_published_loss_weight_of_the_pair(compose, teacher: str, student: str) -> None:
    cfg = compose("train_student", [f"teacher={teacher}", f"student={student}", "distill=reviewkd"])
    apply_pair_settings(cfg)
    assert cfg.distill.beta == REVIEWKD_WEIGHT[(teacher, student)]
    explicit = compose("train_student", [f"pair={teacher}-{student}", "distill=reviewkd"])
    assert explicit.distill.beta == REVIEWKD_WEIGHT[(teacher, student)]  # the table presets agree


def test_an_explicit_value_wins_and_unrelated_methods_are_untouched(compose) -> None:
    cfg = compose("train_student", ["teacher=resnet56", "student=resnet20", "distill=dkd", "distill.nckd_weight=8"])
    assert apply_pair_settings(cfg) == [] and cfg.distill.nckd_weight == 8.0
    kd = compose("train_student", ["teacher=resnet56", "student=resnet20", "distill=kd"])
    assert apply_pair_settings(kd) == [] and kd.pair is None  # KD reads no pair setting: config unchanged
    unknown = compose("train_student", ["teacher=resnet8", "student=resnet8", "distill=dkd"])
    assert apply_pair_settings(unknown) == [] and unknown.distill.nckd_weight == 8.0  # no published pair


def test_the_run_prints_and_records_what_the_pair_changed(compose, tmp_path: Path, monkeypatch, capsys) -> None:
    (tmp_path / "pairs").mkdir()
    (tmp_path / "pairs" / "resnet8-resnet8.yaml").write_text("pair:\n  name: resnet8-resnet8\n  dkd_nckd_weight: 3.0\n")
    monkeypatch.setattr(pairs, "PAIR_DIR", tmp_path / "pairs")
    teacher = tmp_path / "teacher.pt"
    torch.save({"model": build_model("resnet8").state_dict()}, teacher)
    cfg = compose("train_student", ["teacher=resnet8", "student=resnet8", "distill=dkd", f"teacher.ckpt={teacher}",
                                    *tiny_overrides(tmp_path)])
    distill(cfg, tmp_path / "run")
    assert "published settings of the pair resnet8-resnet8: distill.nckd_weight=3.0" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "finished"
    assert "nckd_weight: 3.0" in (tmp_path / "run" / "config.yaml").read_text()


def test_every_pair_file_is_found_from_its_teacher_and_student(compose) -> None:
    """Each configs/pair/<teacher>-<student>.yaml applies to exactly that teacher and student, by name."""
    files = sorted(pairs.PAIR_DIR.glob("*.yaml"))
    assert len(files) >= len(DKD_NCKD)
    for path in files:
        teacher, student = path.stem.split("-")
        settings = pairs.pair_settings(teacher.lower(), student.lower())  # names are case-insensitive
        assert settings is not None and settings["name"] == path.stem


# ---- the post-DKD methods: logit standardization's per-pair settings, TTM's example -------------
# Typed from METHODS_NEW.md section 2 (the LS-KD logs' names: T_b, w[, BETA]), never read from the YAML files.
LS_KD = {  # (teacher, student): (T_b, w) of KD+LS
    ("resnet32x4", "resnet8x4"): (2.0, 9.0), ("vgg13", "vgg8"): (3.0, 9.0), ("wrn_40_2", "wrn_40_1"): (2.0, 9.0),
    ("wrn_40_2", "wrn_16_2"): (2.0, 9.0), ("resnet56", "resnet20"): (2.0, 9.0), ("resnet110", "resnet32"): (2.0, 9.0),
    ("resnet110", "resnet20"): (4.0, 12.0), ("resnet32x4", "ShuffleV2"): (2.0, 9.0),
    ("resnet32x4", "wrn_16_2"): (3.0, 9.0), ("resnet32x4", "wrn_40_2"): (3.0, 9.0),
    ("wrn_40_2", "resnet8x4"): (2.0, 9.0), ("wrn_40_2", "MobileNetV2"): (3.0, 9.0),
    ("vgg13", "MobileNetV2"): (3.0, 9.0), ("ResNet50", "MobileNetV2"): (3.0, 1.0),
}
LS_DKD = {  # (teacher, student): (T_b, w, BETA) of DKD+LS; alpha = w, beta = BETA * w
    ("resnet32x4", "resnet8x4"): (2.0, 9.0, 8.0), ("vgg13", "vgg8"): (2.0, 15.0, 2.0),
    ("wrn_40_2", "wrn_40_1"): (2.0, 12.0, 2.0), ("wrn_40_2", "wrn_16_2"): (2.0, 12.0, 2.0),
    ("resnet56", "resnet20"): (3.0, 18.0, 2.0), ("resnet110", "resnet32"): (2.0, 15.0, 2.0),
    ("resnet110", "resnet20"): (2.0, 15.0, 2.0), ("resnet32x4", "ShuffleV2"): (2.0, 9.0, 8.0),
    ("resnet32x4", "wrn_16_2"): (2.0, 9.0, 2.0), ("resnet32x4", "wrn_40_2"): (2.0, 9.0, 8.0),
    ("wrn_40_2", "resnet8x4"): (2.0, 18.0, 2.0), ("wrn_40_2", "MobileNetV2"): (2.0, 15.0, 2.0),
    ("vgg13", "MobileNetV2"): (3.0, 9.0, 2.0), ("ResNet50", "MobileNetV2"): (2.0, 15.0, 2.0),
}
LS_MLKD = {  # (teacher, student): (T_b, w) of MLKD+LS; resnet56 -> resnet20 and wrn_40_2 -> MobileNetV2 have no log
    ("resnet32x4", "resnet8x4"): (2.0, 9.0), ("vgg13", "vgg8"): (2.0, 6.0), ("wrn_40_2", "wrn_40_1"): (2.0, 9.0),
    ("wrn_40_2", "wrn_16_2"): (2.0, 9.0), ("resnet110", "resnet32"): (2.0, 9.0), ("resnet110", "resnet20"): (2.0, 9.0),
    ("resnet32x4", "ShuffleV2"): (2.0, 6.0), ("resnet32x4", "wrn_16_2"): (2.0, 9.0),
    ("resnet32x4", "wrn_40_2"): (2.0, 9.0), ("wrn_40_2", "resnet8x4"): (2.0, 9.0),
    ("vgg13", "MobileNetV2"): (2.0, 6.0), ("ResNet50", "MobileNetV2"): (2.0, 9.0),
}
# Pairs of the CRD/DKD tables that the LS paper did not run: LS falls back to its authors' defaults
# (KD: T_b 2, w 9; DKD: T_b 2, w 9, BETA 8, i.e. alpha 9, beta 72; config of 2024-03-10).
NO_LS = [("ResNet50", "vgg8"), ("resnet32x4", "ShuffleV1"), ("wrn_40_2", "ShuffleV1")]
LS_DEFAULT_KD, LS_DEFAULT_DKD = (2.0, 9.0), (2.0, 9.0, 8.0)
EVERY_PAIR = sorted(set(LS_KD) | set(DKD_NCKD) | set(NO_LS))
LS_ON = "distill.logit_standardize=true"


def test_every_pair_file_is_covered_by_the_published_tables_below() -> None:
    """The tests below walk every file of configs/pair/ (a new file needs its published values here)."""
    on_disk = {tuple(p.stem.split("-")) for p in pairs.PAIR_DIR.glob("*.yaml")}
    assert on_disk == set(EVERY_PAIR)
    assert set(LS_KD) == set(LS_DKD) and set(LS_MLKD) < set(LS_KD)


@pytest.mark.parametrize(("teacher", "student"), EVERY_PAIR)
def test_kd_with_ls_takes_the_published_temperature_and_weight_of_the_pair(compose, teacher: str,
                                                                            student: str) -> None:
    cfg = compose("train_student", [f"teacher={teacher}", f"student={student}", "distill=kd", LS_ON])
    changed = apply_pair_settings(cfg)
    t_b, w = LS_KD.get((teacher, student), LS_DEFAULT_KD)
    assert (cfg.distill.temperature, cfg.distill.alpha, cfg.distill.gamma) == (t_b, w, 0.1)
    expected = [f"distill.alpha={w}"] * (w != 9.0) + [f"distill.temperature={t_b}"] * (t_b != 2.0)
    assert changed == expected  # what the run prints: only what differs from the LS defaults (T_b 2, w 9)
    plain = compose("train_student", [f"teacher={teacher}", f"student={student}", "distill=kd"])
    assert apply_pair_settings(plain) == [] and (plain.distill.temperature, plain.distill.alpha) == (4.0, 0.9)


@pytest.mark.parametrize(("teacher", "student"), EVERY_PAIR)
def test_dkd_with_ls_takes_the_published_weights_and_temperature_of_the_pair(compose, teacher: str,
                                                                              student: str) -> None:
    cfg = compose("train_student", [f"teacher={teacher}", f"student={student}", "distill=dkd", LS_ON])
    apply_pair_settings(cfg)
    t_b, w, big_beta = LS_DKD.get((teacher, student), LS_DEFAULT_DKD)
    d = cfg.distill
    assert (d.dkd_temperature, d.tckd_weight, d.nckd_weight) == (t_b, w, big_beta * w)
    assert (d.gamma, d.alpha, d.beta, d.warmup_epochs) == (1.0, 0.0, 1.0, 20)  # DKD+LS keeps CE 1 and the warm-up
    plain = compose("train_student", [f"teacher={teacher}", f"student={student}", "distill=dkd"])
    apply_pair_settings(plain)  # without the switch: DKD's own per-pair NCKD weight, T 4
    assert (plain.distill.dkd_temperature, plain.distill.tckd_weight, plain.distill.nckd_weight) == (
        4.0, 1.0, DKD_NCKD.get((teacher, student), 8.0))


@pytest.mark.parametrize(("teacher", "student"), [("resnet32x4", "resnet8x4"), ("vgg13", "MobileNetV2"),
                                                  ("wrn_40_2", "ShuffleV1")])
def test_ctkd_with_ls_weights_kd_nine_on_every_pair(compose, teacher: str, student: str) -> None:
    """All CTKD+LS logs use CE 0.1 and KD 9 (T_b is ignored: CTKD learns T); CTKD alone: CE 0.1, KD 0.9."""
    on = compose("train_student", [f"teacher={teacher}", f"student={student}", "distill=ctkd", LS_ON])
    assert apply_pair_settings(on) == [] and (on.distill.gamma, on.distill.alpha) == (0.1, 9.0)
    off = compose("train_student", [f"teacher={teacher}", f"student={student}", "distill=ctkd"])
    assert (off.distill.gamma, off.distill.alpha) == (0.1, 0.9)


@pytest.mark.parametrize(("teacher", "student"), EVERY_PAIR)
def test_mlkd_ls_values_of_the_pair(teacher: str, student: str) -> None:
    """MLKD+LS's T_b and w ride in the pair files (``ls_mlkd_temperature``, ``ls_mlkd_weight``) for
    distill/mlkd.yaml to read under the switch; pairs without a published log carry none."""
    settings = pairs.pair_settings(teacher, student)
    got = (settings.get("ls_mlkd_temperature"), settings.get("ls_mlkd_weight"))
    assert got == LS_MLKD.get((teacher, student), (None, None))


def test_an_explicit_value_wins_over_the_ls_settings_of_the_pair(compose) -> None:
    base = ["teacher=ResNet50", "student=MobileNetV2", LS_ON]
    kd = compose("train_student", base + ["distill=kd", "distill.temperature=5", "distill.alpha=0.9"])
    assert apply_pair_settings(kd) == [] and (kd.distill.temperature, kd.distill.alpha) == (5.0, 0.9)
    kd_t = compose("train_student", base + ["distill=kd", "distill.temperature=5"])
    assert apply_pair_settings(kd_t) == ["distill.alpha=1.0"] and kd_t.distill.temperature == 5.0
    dkd = compose("train_student", base + ["distill=dkd", "distill.nckd_weight=8", "distill.dkd_temperature=4"])
    apply_pair_settings(dkd)
    assert (dkd.distill.tckd_weight, dkd.distill.nckd_weight, dkd.distill.dkd_temperature) == (15.0, 8.0, 4.0)
    ctkd = compose("train_student", base + ["distill=ctkd", "distill.alpha=0.9"])
    assert ctkd.distill.alpha == 0.9


def test_the_explicit_pair_preset_agrees_with_the_teacher_and_student(compose) -> None:
    implicit = compose("train_student", ["teacher=resnet110", "student=resnet20", "distill=kd", LS_ON])
    changed = apply_pair_settings(implicit)
    explicit = compose("train_student", ["pair=resnet110-resnet20", "distill=kd", LS_ON])
    # chosen explicitly: nothing left to fill, and the same report of what the pair's settings changed
    assert apply_pair_settings(explicit) == changed == ["distill.alpha=12.0", "distill.temperature=4.0"]
    assert (implicit.distill.temperature, implicit.distill.alpha) == (explicit.distill.temperature,
                                                                      explicit.distill.alpha) == (4.0, 12.0)


@pytest.mark.parametrize("override", ["teacher=resnet8", "student=resnet8"])
def test_a_chosen_pair_whose_teacher_or_student_was_replaced_is_refused_in_one_line(override: str, tmp_path: Path,
                                                                                     compose) -> None:
    """pair=vgg13-vgg8 with another teacher would give that pair the settings published for vgg13 -> vgg8
    (DKD's NCKD weight 6, LS's temperature 3, ...): refused before anything starts, and nothing written."""
    from common.errors import UserError
    from distiller.config.before_start import check_before_start

    cfg = compose("train_student", ["pair=vgg13-vgg8", override, "distill=dkd"])
    with pytest.raises(UserError, match="pair=vgg13-vgg8 carries the settings published"):
        check_before_start(cfg, "train_student")
    with pytest.raises(UserError, match="drop pair="):
        apply_pair_settings(cfg)
    result = run_cli("train_student.py", "pair=vgg13-vgg8", override, "distill=dkd", *tiny_overrides(tmp_path),
                     cwd=tmp_path)
    (line,) = [x for x in result.stderr.splitlines() if x.strip()]
    arch = override.split("=")[1]
    pair = f"{arch} -> vgg8" if override.startswith("teacher") else f"vgg13 -> {arch}"
    assert result.returncode == 2 and line.startswith("error: pair=vgg13-vgg8") and f"distills {pair}" in line, line
    assert not (tmp_path / "runs").exists()
    # the pair's own teacher and student, named again, are its pair
    check_before_start(compose("train_student", ["pair=vgg13-vgg8", "teacher=vgg13", "distill=dkd"]), "train_student")


def test_ttm_takes_the_readme_example_on_its_pair(compose) -> None:
    """TTM's one published per-pair setting (its README): vgg13 -> vgg8 with gamma 0.1 and beta 45."""
    cfg = compose("train_student", ["teacher=vgg13", "student=vgg8", "distill=ttm"])
    apply_pair_settings(cfg)
    assert (cfg.distill.power, cfg.distill.beta) == (0.1, 45.0)
    assert pairs.pair_settings("vgg13", "vgg8")["ttm_power"] == 0.1


def test_a_switch_that_is_not_a_boolean_is_a_one_line_error(compose) -> None:
    from common.errors import UserError
    from distiller.config.validation import validate

    # the switch reads a boolean as the schema does: "yes" is true for both
    cfg = compose("train_student", ["teacher=vgg13", "student=vgg8", "distill=kd", "distill.logit_standardize=yes"])
    apply_pair_settings(cfg)
    assert (cfg.distill.temperature, cfg.distill.alpha) == (3.0, 9.0)
    assert validate(cfg, "train_student").distill.logit_standardize is True
    bad = compose("train_student", ["teacher=vgg13", "student=vgg8", "distill=kd", "distill.logit_standardize=abc"])
    assert (bad.distill.temperature, bad.distill.alpha) == (4.0, 0.9)  # no boolean: the plain KD values ...
    with pytest.raises(UserError, match="logit_standardize"):  # ... and the schema's one-line error
        validate(bad, "train_student")


def test_the_run_prints_the_ls_settings_it_applied(compose, tmp_path: Path, monkeypatch, capsys) -> None:
    (tmp_path / "pairs").mkdir()
    (tmp_path / "pairs" / "resnet8-resnet8.yaml").write_text(
        "pair:\n  name: resnet8-resnet8\n  ls_kd_temperature: 3.0\n  ls_kd_weight: 9.0\n")
    monkeypatch.setattr(pairs, "PAIR_DIR", tmp_path / "pairs")
    teacher = tmp_path / "teacher.pt"
    torch.save({"model": build_model("resnet8").state_dict()}, teacher)
    cfg = compose("train_student", ["teacher=resnet8", "student=resnet8", "distill=kd", LS_ON,
                                    f"teacher.ckpt={teacher}", *tiny_overrides(tmp_path)])
    distill(cfg, tmp_path / "run")
    assert "published settings of the pair resnet8-resnet8: distill.temperature=3.0" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "finished"
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert "temperature: 3.0" in config and "alpha: 9.0" in config and "logit_standardize: true" in config


@pytest.mark.parametrize(("teacher", "student"), EVERY_PAIR)
def test_mlkd_with_ls_takes_the_published_temperature_and_weight_of_the_pair(compose, teacher: str,
                                                                              student: str) -> None:
    """Composed through distill/mlkd.yaml: T0 and kd_w become the pair's T_b and w under the switch
    (the LS authors' defaults 2 and 9 where no log exists), MLKD's own 4 and 0.9 without it."""
    on = compose("train_student", [f"teacher={teacher}", f"student={student}", "distill=mlkd", LS_ON])
    apply_pair_settings(on)
    assert (on.distill.mlkd_temperature, on.distill.kd_weight) == LS_MLKD.get((teacher, student), (2.0, 9.0))
    off = compose("train_student", [f"teacher={teacher}", f"student={student}", "distill=mlkd"])
    assert apply_pair_settings(off) == [] and (off.distill.mlkd_temperature, off.distill.kd_weight) == (4.0, 0.9)


def test_the_new_methods_table_sweeps_the_post_dkd_methods_over_the_crd_and_dkd_pairs(compose) -> None:
    """experiment=new_methods_table (9 methods) and new_methods_table_dot (KD with DOT): 13 pairs x 5 seeds,
    each cell with its pair's published settings (the pair is chosen explicitly there)."""
    from scripts import sweep_table

    jobs = sweep_table.expand_preset("new_methods_table")
    assert len(jobs) == 13 * 9 * 5
    assert {j["pair"] for j in jobs} == {f"{t}-{s}" for t, s in DKD_NCKD} | {"resnet110-resnet20", "ResNet50-vgg8"}
    assert {j["distill"] for j in jobs} == {"dist", "kd_ls", "dkd_ls", "ctkd", "ctkd_ls", "mlkd", "wttm", "ttm",
                                            "nkd"}
    dot_jobs = sweep_table.expand_preset("new_methods_table_dot")
    assert len(dot_jobs) == 13 * 5 and {j["distill"] for j in dot_jobs} == {"kd"}
    assert sweep_table.TABLES["new_methods"][1] == ("new_methods_table", "new_methods_table_dot")

    kd_ls = compose("train_student", ["experiment=new_methods_table", "pair=ResNet50-MobileNetV2", "distill=kd_ls"])
    assert (kd_ls.distill.method, kd_ls.distill.logit_standardize) == ("kd", True)
    assert (kd_ls.distill.temperature, kd_ls.distill.alpha, kd_ls.method_label) == (3.0, 1.0, "kd_ls")
    dkd_ls = compose("train_student", ["experiment=new_methods_table", "pair=resnet56-resnet20", "distill=dkd_ls"])
    assert (dkd_ls.distill.dkd_temperature, dkd_ls.distill.tckd_weight, dkd_ls.distill.nckd_weight) == (3.0, 18.0,
                                                                                                         36.0)
    # CTKD+LS (the LS paper's logs): CTKD's learned T on z-scored logits, CE 0.1 and KD 9 on every pair
    ctkd_ls = compose("train_student", ["experiment=new_methods_table", "pair=vgg13-vgg8", "distill=ctkd_ls"])
    assert (ctkd_ls.distill.method, ctkd_ls.distill.logit_standardize, ctkd_ls.method_label) == ("ctkd", True,
                                                                                                 "ctkd_ls")
    assert (ctkd_ls.distill.gamma, ctkd_ls.distill.alpha, ctkd_ls.distill.ramp_epochs) == (0.1, 9.0, 10)
    dot = compose("train_student", ["experiment=new_methods_table_dot", "pair=vgg13-vgg8", "distill=kd"])
    assert (dot.optim.name, dot.optim.momentum, dot.optim.delta) == ("dot", 0.9, 0.075)
    assert (dot.distill.method, dot.method_label, dot.distill.temperature, dot.distill.alpha) == ("kd", "kd_dot",
                                                                                                  4.0, 0.9)
