"""The config schema: every bad value is one line naming the key, before anything is written.

Most checks compose the real config and validate it in process (the path of in-process callers
and multirun jobs) or run :func:`distiller.config.preflight.preflight` in process (the path of the command
line); a handful run the entry points as a user types them.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import sys

import pytest
from helpers import CONFIGS, run_cli, tiny_overrides
from omegaconf import MISSING, DictConfig, OmegaConf

from common.errors import UserError
from distiller.config import before_start, schema, validation
from distiller.config.preflight import canonical_model_choices, preflight
from models import list_models, model_metadata

EXIT_USER_ERROR = 2

# (entry point, overrides, words the one line must hold)
BAD_VALUES = [
    ("train_teacher", ["seed=abc"], ["seed=abc", "whole number"]),
    ("train_teacher", ["optim.momentum=1.5"], ["optim.momentum=1.5", "< 1"]),
    ("train_student", ["optim.momentum=1"], ["optim.momentum=1", "< 1"]),
    ("train_teacher", ["seed=-1"], ["seed=-1", ">= 0"]),
    ("train_teacher", ["schedule.milestones=[abc]"], ["schedule.milestones[0]=abc", "whole number"]),
    ("train_teacher", ["schedule.milestones=5"], ["schedule.milestones=5", "list"]),
    ("train_teacher", ["schedule.milestones=[-1,10]"], ["schedule.milestones[0]=-1", ">= 0"]),
    ("train_teacher", ["schedule.gamma=0"], ["schedule.gamma=0", "> 0"]),
    ("train_teacher", ["trainer.epochs=0"], ["trainer.epochs=0", "> 0"]),
    ("train_teacher", ["trainer.epochs=2.5"], ["trainer.epochs=2.5", "whole number"]),
    ("train_teacher", ["trainer.device=gpu"], ["trainer.device=gpu", "auto, cpu, cuda or cuda:N"]),
    ("train_teacher", ["trainer.precision=fp8"], ["trainer.precision=fp8", "auto, fp32, bf16 or fp16"]),
    ("train_teacher", ["trainer.channels_last=maybe"], ["trainer.channels_last=maybe", "auto, true or false"]),
    ("train_teacher", ["trainer.compile=1"], ["trainer.compile=1", "auto, true or false"]),
    ("train_teacher", ["trainer.nonfinite_check=nan"], ["trainer.nonfinite_check=nan", "loss, grad or off"]),
    ("train_teacher", ["trainer.log_interval=0"], ["trainer.log_interval=0", "> 0"]),
    ("train_teacher", ["trainer.checkpoint_every_steps=-5"], ["trainer.checkpoint_every_steps=-5", ">= 0"]),
    ("train_teacher", ["trainer.num_threads=0"], ["trainer.num_threads=0", "> 0"]),
    ("train_teacher", ["trainer.resume=perhaps"], ["trainer.resume=perhaps", "true or false"]),
    ("train_teacher", ["optim.lr=-0.1"], ["optim.lr=-0.1", "> 0"]),
    ("train_teacher", ["optim.lr=abc"], ["optim.lr=abc", "a number"]),
    ("train_teacher", ["optim.lr=nan"], ["optim.lr=nan", "not a number"]),
    ("train_teacher", ["optim.momentum=-0.9"], ["optim.momentum=-0.9", ">= 0"]),
    ("train_teacher", ["optim.weight_decay=-1"], ["optim.weight_decay=-1", ">= 0"]),
    ("train_teacher", ["optim.implementation=fast"], ["optim.implementation=fast", "auto, fused, foreach or loop"]),
    ("train_teacher", ["dataset.batch_size=0"], ["dataset.batch_size=0", "> 0"]),
    ("train_teacher", ["dataset.eval_batch_size=x"], ["dataset.eval_batch_size=x", "whole number"]),
    ("train_teacher", ["dataset=synthetic", "dataset.train_size=5"], ["dataset.train_size=5", ">= 10"]),
    ("train_teacher", ["save_teacher=maybe"], ["save_teacher=maybe", "true or false"]),
    ("train_teacher", ["model.lr=0"], ["model.lr=0", "> 0"]),
    ("train_teacher", ["+trainer.epoch=3"], ["trainer.epoch", "does not exist", "epochs"]),
    ("train_student", ["distill.beta=-1"], ["distill.beta=-1", ">= 0"]),
    ("train_student", ["distill.gamma=abc"], ["distill.gamma=abc", "a number"]),
    ("train_student", ["distill.temperature=0"], ["distill.temperature=0", "> 0"]),
    ("train_student", ["distill.warmup_epochs=-1"], ["distill.warmup_epochs=-1", ">= 0"]),
    ("train_student", ["+distill@combine.at=at", "combine.at.beta=-500"], ["combine.at.beta=-500", ">= 0"]),
    ("train_student", ["student.lr=-1"], ["student.lr=-1", "> 0"]),
    ("train_student", ["optim.lr=${nope}"], ["optim.lr", "nope"]),
]


def _compose(compose, entry: str, overrides: list[str]):
    try:
        return compose(entry, overrides)
    except Exception as err:  # noqa: BLE001 - a typed node refuses some values while composing
        from distiller.config.command_line import explain_config_error

        raise UserError(explain_config_error(err)) from None


@pytest.mark.parametrize("entry, overrides, words", BAD_VALUES, ids=[" ".join(o) for _, o, _ in BAD_VALUES])
def test_bad_value_is_one_line_naming_the_key(compose, entry, overrides, words):
    with pytest.raises(UserError) as caught:
        validation.validate(_compose(compose, entry, overrides), entry)
    message = str(caught.value)
    assert "\n" not in message
    for word in words:
        assert word in message, (word, message)


@pytest.mark.parametrize("overrides, words", [
    # a method without a constructor of its own takes no keys (nn.Module's would swallow any)
    (["distill=kd", "+distill.foo=1"], ["distill.foo", "not a parameter of method 'kd'", "its parameters are: none"]),
    (["distill=dkd", "+distill.foo=1"], ["distill.foo", "not a parameter of method 'dkd'", "tckd_weight"]),
    # a method's own keys have the type its constructor declares: a switch that is no boolean would be
    # truthy (silently on), a fraction where a count goes would be truncated, inf would train on nan
    (["distill=cat_kd", "distill.cam_normalize=maybe"], ["distill.cam_normalize=maybe", "a boolean (true or false)"]),
    (["distill=cat_kd", "distill.cam_student_no_bias=1"], ["distill.cam_student_no_bias=1", "a boolean"]),
    (["distill=cat_kd", "distill.cam_resolution=2.5"], ["distill.cam_resolution=2.5", "a whole number"]),
    (["distill=wkd_l", "distill.sinkhorn_iter=true"], ["distill.sinkhorn_iter=True", "a whole number"]),
    (["distill=skd", "distill.tikhonov=inf"], ["distill.tikhonov=inf", "a finite number"]),
    (["distill=luminet", "distill.luminet_alpha=abc"], ["distill.luminet_alpha=abc", "a finite number"]),
    (["distill=luminet", "distill.luminet_alpha=-33"], ["distill.luminet_alpha=-33 must be >= 0 (method 'luminet')"]),
    (["distill=wkd_f", "distill.mean_cov_ratio=-1"], ["distill.mean_cov_ratio=-1 must be >= 0"]),
    (["distill=dkd", "distill.dkd_temperature=-1"], ["distill.dkd_temperature=-1 must be > 0 (method 'dkd')"]),
    (["distill=dist", "distill.dist_temperature=0"], ["distill.dist_temperature=0 must be > 0"]),
    (["distill=rkd", "distill.angle_weight=-50"], ["distill.angle_weight=-50 must be >= 0"]),
    (["distill=ft", "distill.init_lr=0"], ["distill.init_lr=0 must be > 0"]),
    (["distill=cc", "distill.feat_dim=0"], ["distill.feat_dim=0 must be >= 1"]),
    # a key that may also be a name (FitNet's hint layer: 2 or 'stage2') is left to the method's own check
    (["distill=fitnet", "distill.hint_layer=abc"], ["distill.hint_layer='abc' is not a feature name"]),
    (["distill=wkd_l", "distill.cosine_decay_epoch=-1"], ["distill.cosine_decay_epoch=-1 must be >= 0"]),
    (["distill=eakd", "distill.h_ub=null", "distill.ea_temperature=null"], ["distill.ea_temperature=None",
                                                                           "null is not allowed"]),
])
def test_a_method_key_it_does_not_take_or_of_another_type_is_refused_before_the_start(compose, overrides, words):
    with pytest.raises(UserError) as caught:
        before_start.check_before_start(compose("train_student", overrides), "train_student")
    message = str(caught.value)
    assert "\n" not in message
    for word in words:
        assert word in message, (word, message)


@pytest.mark.parametrize("overrides, words", [
    (["teacher.lr=abc"], ["teacher.lr=abc", "a number"]),
    (["teacher.published_top1=high"], ["teacher.published_top1=high", "a number"]),
    (["model=resnet8"], None),
])
def test_typed_model_nodes_refuse_wrong_types_while_composing(compose, overrides, words):
    entry = "train_teacher" if overrides[0].startswith("model") else "train_student"
    if words is None:
        validation.validate(compose(entry, overrides), entry)
        return
    with pytest.raises(UserError) as caught:
        _compose(compose, entry, overrides)
    for word in words:
        assert word in str(caught.value)


@pytest.mark.parametrize("entry", ["train_teacher", "train_student"])
def test_the_default_configs_and_every_preset_are_valid(compose, entry):
    presets = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))
    for preset in [None, *presets]:
        if preset and preset.startswith("table_") != (entry == "train_teacher"):
            continue
        typed = validation.validate(compose(entry, [f"experiment={preset}"] if preset else []), entry)
        assert typed.seed == 0


def test_defaults_live_once(compose):
    """A key with a default in the schema is set by no YAML file (and the other way round). The objective keys
    of a method reach its node from the schema itself (the ``_objective`` base every distill YAML pulls in), so
    a method's YAML states only the ones that differ."""
    for entry, job in schema.SCHEMAS.items():
        cfg = compose(entry, ["dataset=synthetic"] if entry == "train_teacher" else [])
        for path, declared in _fields(job):
            if declared.default is dataclasses.MISSING or declared.default in (MISSING, None):
                continue  # set by the YAML, or an optional key (null: absent)
            if path.startswith("distill."):
                continue  # checked on the YAML files below

            parent, _, name = path.rpartition(".")
            node = OmegaConf.select(cfg, parent) if parent else cfg
            if isinstance(node, DictConfig) and dataclasses.is_dataclass(OmegaConf.get_type(node)):
                continue  # a node the ConfigStore made from the schema's dataclass (teacher=<arch>): no YAML
            assert node is None or name not in node, f"{path} has a default in the schema and in the YAML"


def test_a_method_yaml_states_only_the_objective_keys_that_differ(compose):
    """Every configs/distill/*.yaml pulls the schema's objective defaults in first and restates none of them at
    its default value; composed, every method node starts with the objective keys in the schema's order."""
    defaults = schema.objective_defaults()
    for path in sorted((CONFIGS / "distill").glob("*.yaml")):
        raw = OmegaConf.load(path)
        chain = [c for c in raw.get("defaults", []) if c != "_self_"]
        assert chain == ["_objective"] or chain and "_objective" not in chain, path  # itself, or through its base
        for key in schema.OBJECTIVE_DEFAULTS:
            if key in raw:
                assert raw._get_node(key)._value() != defaults[key], f"{path.name} restates {key}={defaults[key]}"
        node = compose("train_student", [f"distill={path.stem}"]).distill
        assert list(node)[:7] == ["name", "method", *schema.OBJECTIVE_DEFAULTS], path.name


def _fields(job: type, prefix: str = ""):
    import typing

    hints = typing.get_type_hints(job)
    for f in dataclasses.fields(job):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            yield from _fields(kind, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f


def test_validated_view_is_typed_and_config_keeps_its_keys(compose):
    cfg = compose("train_student", ["trainer.epochs=3", "optim.lr=1"])
    typed = validation.validate(cfg)
    assert typed.trainer.epochs == 3 and isinstance(typed.optim.lr, float)
    assert typed.trainer.find_unused_parameters is False  # the schema's default; no YAML sets it
    assert "find_unused_parameters" not in cfg.trainer and "pair" not in cfg  # the composed config is unchanged
    assert validation.validate(typed) is typed
    assert OmegaConf.to_container(cfg, resolve=True)["optim"]["lr"] == 1


# ---- the model groups come from the registry ----------------------------------------------------------
def test_every_model_has_its_model_teacher_and_student_node(compose):
    for arch in list_models():
        lr = 0.01 if arch in ("MobileNetV2", "ShuffleV1", "ShuffleV2") else 0.05
        assert model_metadata(arch)["lr"] == lr
        teacher = compose("train_teacher", [f"model={arch}"])
        assert (teacher.model.name, teacher.optim.lr) == (arch, lr)
        student = compose("train_student", [f"teacher={arch}", f"student={arch}", "teacher_dir=/t"])
        assert (student.student.name, student.optim.lr) == (arch, lr)
        assert student.teacher.name == arch and student.teacher.ckpt == f"/t/{arch}.pt"
        assert student.teacher.published_top1 == schema.PUBLISHED_TEACHER_TOP1.get(arch)
    assert schema.PUBLISHED_TEACHER_TOP1 == {"wrn_40_2": 75.61, "resnet56": 72.34, "resnet110": 74.31,
                                             "resnet32x4": 79.42, "vgg13": 74.64, "ResNet50": 79.34}


def test_composing_shares_the_store_and_leaves_its_nodes_as_they_were(compose):
    """Hydra deep-copies its repository, which holds the ConfigStore, at every composition; ours is shared
    instead of copied (``store.share_store_on_copy``): a composition that sets a node's keys must still leave
    the stored node, and so the next composition, as they were."""
    import copy

    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    store = ConfigStore.instance()
    assert copy.deepcopy(store) is store and copy.deepcopy({"s": store})["s"] is store
    stored = lambda: OmegaConf.to_container(store.repo["teacher"]["resnet8.yaml"].node)
    before = stored()
    assert before["lr"] == 0.05 and before["ckpt"] == "${teacher_dir}/resnet8.pt"
    changed = compose("train_student", ["teacher=resnet8", "student=resnet8", "teacher.lr=0.7", "teacher.ckpt=/q.pt",
                                        "teacher_dir=/shared-store-test"])
    assert (changed.teacher.lr, changed.teacher.ckpt) == (0.7, "/q.pt")
    assert stored() == before
    again = compose("train_student", ["teacher=resnet8", "student=resnet8", "teacher_dir=/shared-store-test"])
    assert (again.teacher.lr, again.teacher.ckpt) == (0.05, "/shared-store-test/resnet8.pt")


def test_the_method_aliases_of_the_readme_choose_their_method(compose):
    """The README's methods table gives aliases (``hint`` for FitNet, ``attention`` for AT, ...); Hydra only knows
    ``configs/distill/<name>.yaml``, so the command line spells an alias as its method's config."""
    readme = {"hint": "fitnet", "attention": "at", "similarity": "sp", "correlation": "cc", "abound": "ab",
              "factor": "ft"}  # the README's methods table
    for alias, method in readme.items():
        (override,) = canonical_model_choices([f"distill={alias}"])
        assert compose("train_student", [override]).distill.method == method
    assert canonical_model_choices(["distill=hint,kd", "+distill@combine.at=attention", "distill=crd_kd",
                                    "distill=nope"]) == ["distill=fitnet,kd", "+distill@combine.at=at",
                                                         "distill=crd_kd", "distill=nope"]
    # in any case, as network names: distill=KD was 'unknown distill' with no hint
    assert canonical_model_choices(["distill=KD,CRD_KD,Hint", "+distill@combine.at=AT"]) == [
        "distill=kd,crd_kd,fitnet", "+distill@combine.at=at"]


def test_model_names_any_case(compose):
    cfg = compose("train_student", ["teacher=mobilenetv2", "student=mobile_half", "teacher.ckpt=/x.pt"])
    assert cfg.teacher.name == cfg.student.name == "MobileNetV2" and cfg.teacher.ckpt == "/x.pt"
    assert canonical_model_choices(["model=RESNET8X4", "teacher=shufflev1,VGG13", "seed=1", "model=nope"]) == [
        "model=resnet8x4", "teacher=ShuffleV1,vgg13", "seed=1", "model=nope"]


# ---- the command-line path (preflight, in process) ---------------------------------------------------
def _preflight(capsys, entry: str, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as caught:
        preflight(entry, argv)
    assert caught.value.code == EXIT_USER_ERROR
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


@pytest.mark.parametrize("argv, words", [
    (["seed=abc"], ["seed=abc"]),
    (["schedule.milestones=[abc]"], ["schedule.milestones[0]=abc"]),
    (["schedule.milestones=5"], ["schedule.milestones=5"]),
    (["trainer.device=tpu"], ["trainer.device=tpu", "auto, cpu, cuda or cuda:N"]),
    (["model.lr=abc"], ["model.lr=abc"]),
    (["model=resnet9"], ["unknown model 'resnet9'", "Did you mean 'resnet8'", "wrn_40_2", "MobileNetV2"]),
])
def test_preflight_reports_one_line(capsys, tmp_path, argv, words):
    line = _preflight(capsys, "train_teacher", [*argv, f"hydra.run.dir={tmp_path / 'run'}"])
    for word in words:
        assert word in line, (word, line)
    assert not (tmp_path / "run").exists()


def test_preflight_refuses_a_run_dir_that_is_a_file_or_below_one(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    line = _preflight(capsys, "train_teacher", [f"hydra.run.dir={blocker}"])
    assert f"hydra.run.dir={blocker}" in line and "is a file" in line
    line = _preflight(capsys, "train_teacher", [f"hydra.run.dir={blocker / 'sub' / 'run'}"])
    assert "cannot be created" in line and str(blocker) in line
    assert blocker.read_text() == "keep me"


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write anywhere")
def test_preflight_refuses_a_run_dir_in_a_read_only_folder(capsys, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        line = _preflight(capsys, "train_student", [f"hydra.run.dir={locked / 'run'}"])
        assert "not writable" in line and str(locked) in line
    finally:
        locked.chmod(0o700)


# ---- inside the job (in-process callers, multirun jobs) ----------------------------------------------
@pytest.mark.parametrize("entry, overrides", [
    ("train_teacher", ["seed=abc"]),
    ("train_teacher", ["trainer.precision=fp8"]),
    ("train_student", ["schedule.milestones=5"]),
    ("train_student", ["distill.alpha=-1"]),
])
def test_the_job_raises_before_writing(compose, tmp_path, entry, overrides):
    from distiller.jobs.train import distill, train_network

    cfg = compose(entry, [*tiny_overrides(tmp_path), *overrides])
    job = train_network if entry == "train_teacher" else distill
    with pytest.raises(UserError, match=overrides[0].split("=")[0].replace(".", r"\.")):
        job(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()


# ---- as typed --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("script, overrides, words", [
    ("train_teacher.py", ["seed=abc"], ["seed=abc"]),
    ("train_student.py", ["schedule.milestones=[abc]"], ["schedule.milestones[0]=abc"]),
    ("train_teacher.py", ["model=RESNET8", "trainer.device=gpu"], ["trainer.device=gpu", "cuda:N"]),
])
def test_command_line(tmp_path, script, overrides, words):
    result = run_cli(script, f"hydra.run.dir={tmp_path / 'run'}", *tiny_overrides(tmp_path), *overrides)
    assert result.returncode == EXIT_USER_ERROR, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr, lines
    for word in words:
        assert word in lines[0]
    assert not (tmp_path / "run").exists()


def test_command_line_run_dir_that_is_a_file(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    result = run_cli("train_teacher.py", "model=resnet8", f"hydra.run.dir={blocker}", *tiny_overrides(tmp_path))
    assert result.returncode == EXIT_USER_ERROR and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert [line for line in result.stderr.splitlines() if line.strip()] == [
        f"error: hydra.run.dir={blocker} is a file, not a directory; choose another hydra.run.dir"]
    assert blocker.read_text() == "keep me"


def test_logit_standardize_is_a_plain_override_and_old_runs_still_resume(compose) -> None:
    """distill.logit_standardize=true needs no '+', and a run written before the key existed is the same
    run as one with it at false (resume compares configs), but not as one with it at true."""
    from distiller.jobs.run_dir import run_identity

    on = compose("train_student", ["distill=kd", "distill.logit_standardize=true"])
    assert on.distill.logit_standardize is True
    new = OmegaConf.to_container(compose("train_student", ["distill=kd"]), resolve=True)
    old = OmegaConf.to_container(compose("train_student", ["distill=kd"]), resolve=True)
    del old["distill"]["logit_standardize"]
    assert run_identity(old) == run_identity(new)
    assert run_identity(old) != run_identity(OmegaConf.to_container(on, resolve=True))


def test_a_run_of_an_outside_network_made_before_taps_became_features_still_resumes(compose) -> None:
    """Its record names ``taps`` (without ``pool_input``): the same run as today's ``features``; a declared
    feature that differs makes it another run."""
    from distiller.jobs.run_dir import run_identity

    command = ["student=torchvision", "student.name=resnet18", "student.features.stem=relu"]
    new = OmegaConf.to_container(compose("train_student", command), resolve=True)
    old = copy.deepcopy(new)
    old["student"]["taps"] = old["student"].pop("features")
    del old["student"]["taps"]["pool_input"]
    assert run_identity(old) == run_identity(new)
    old["student"]["taps"]["stem"] = "conv1"
    assert run_identity(old) != run_identity(new)


def test_a_pair_file_that_gains_another_methods_settings_does_not_change_its_runs(compose) -> None:
    """The ``pair`` table reaches a run only through the keys it resolves into (here DKD's NCKD weight): a
    run recorded before the pair file gained settings of other methods is the same run; one whose resolved
    weight differs is not. A preset's own top-level table (read by interpolation) is left out alike."""
    from distiller.jobs.run_dir import run_identity

    new = OmegaConf.to_container(compose("train_student", ["pair=resnet32x4-resnet8x4", "distill=dkd"]), resolve=True)
    assert new["pair"] and new["distill"]["nckd_weight"] == 8.0  # the DKD paper's value for this pair
    old = {**new, "pair": {k: v for k, v in new["pair"].items() if k.startswith("dkd")}, "mlkd_paper": {"x": 1}}
    assert run_identity(old) == run_identity(new)
    changed = {**new, "distill": {**new["distill"], "nckd_weight": 6.0}}
    assert run_identity(changed) != run_identity(new)


def test_a_registered_data_set_without_its_yaml_says_the_file_is_missing(capsys, monkeypatch, tmp_path):
    """A data set registered in datasets/ (the README's mydata.py) is a choice of dataset= only with its
    configs/dataset/<name>.yaml; without it the line says so instead of listing the choices."""
    from datasets import DATASETS

    monkeypatch.setattr(sys, "argv", ["train_teacher.py"])
    DATASETS.add("mydata_probe", lambda cfg: None)
    try:
        line = _preflight(capsys, "train_teacher", ["dataset=mydata_probe", f"hydra.run.dir={tmp_path / 'run'}"])
    finally:
        DATASETS.remove("mydata_probe")
    assert line == ("error: dataset=mydata_probe is registered (dataset 'mydata_probe') but has no "
                    "configs/dataset/mydata_probe.yaml, which makes it a choice of dataset=: add that file with its "
                    "keys (see configs/dataset/ for examples; README: Adding a data set, docs/extending.md)")
    assert "unknown dataset 'nothing_here'" in _preflight(capsys, "train_teacher", ["dataset=nothing_here"])
