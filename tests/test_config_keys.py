"""Keys that would be recorded and ignored are refused, and advice to add a key (``+KEY=VALUE``) is given only
where a constructor takes it: a method's parameter or an outside network's argument."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import yaml
from helpers import CONFIGS, run_cli
from omegaconf import OmegaConf

from common.errors import UserError
from datasets import DATASETS
from distiller.config.command_line import explain_config_error
from distiller.config.key_advice import unknown_key_message
from distiller.config.preflight import preflight
from distiller.config.schema import DatasetConfig
from distiller.config.validation import load_job, validate
from distiller.methods import METHODS, DistillMethod

EXIT_USER_ERROR = 2
# the keys DatasetConfig declares for some data sets only (schema.py: "keys of some data sets only")
DATASET_OPTIONS = ("download", "verify_checksums", "train_size", "test_size", "seed", "image_size", "stream",
                   "workers", "eval_resize")
VALUES = {"download": "false", "verify_checksums": "false", "train_size": "200", "test_size": "100", "seed": "1",
          "image_size": "32", "stream": "auto", "workers": "2", "eval_resize": "40"}
# eval_resize 40 goes with image_size 32 on imagenet, which refuses an eval_resize below its image_size


def preflight_line(capsys, name: str, overrides: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_:
        preflight(name, overrides)
    assert exit_.value.code == EXIT_USER_ERROR
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


# ---- keys of some data sets only ---------------------------------------------------------------------------
def readers(key: str) -> set[str]:
    return {name for name in DATASETS.names() if key in DATASETS.metadata(name).get("options", ())}


def test_every_data_set_option_is_a_schema_key_and_is_read_by_some_data_set():
    fields = {f.name for f in dataclasses.fields(DatasetConfig)}
    declared = {key for name in DATASETS.names() for key in DATASETS.metadata(name).get("options", ())}
    assert declared <= fields
    assert declared == set(DATASET_OPTIONS)


@pytest.mark.parametrize("name", ["cifar100", "cifar10", "synthetic", "imagefolder", "imagenet"])
def test_a_data_sets_own_file_sets_only_keys_it_declares(name):
    """configs/dataset/<name>.yaml, written for the data set, is a second statement of what it reads."""
    node = yaml.safe_load((CONFIGS / "dataset" / f"{name}.yaml").read_text())
    set_there = {k for k, v in node.items() if k in DATASET_OPTIONS and v is not None}
    assert set_there <= set(DATASETS.metadata(name).get("options", ())), name


@pytest.mark.parametrize("name", ["cifar100", "synthetic", "imagefolder", "imagenet"])
def test_a_key_of_another_data_set_is_refused_and_its_own_accepted(compose, name):
    base = compose("train_student", [f"dataset={name}", "dataset.root=/data/x"])
    OmegaConf.set_struct(base, False)  # as ++dataset.<key>=VALUE sets a key the file lacks
    for key in DATASET_OPTIONS:
        cfg = OmegaConf.merge(base, {"dataset": {key: yaml.safe_load(VALUES[key])}})
        if key == "eval_resize" and name == "imagenet":
            cfg = OmegaConf.merge(cfg, {"dataset": {"image_size": 32}})
        if name in readers(key):
            validate(cfg, "train_student")
            continue
        with pytest.raises(UserError) as err:
            validate(cfg, "train_student")
        message = str(err.value)
        assert f"dataset.{key}={VALUES[key]} is a key of" in message and f"not of dataset={name}" in message, message
        assert all(f"dataset={reader}" in message for reader in readers(key)), message


@pytest.mark.parametrize("overrides, words", [
    (["dataset=imagenet", "dataset.root=/data/x", "dataset.stream=false"], "dataset=imagenet always streams"),
    (["dataset=imagenet", "dataset.root=/data/x", "dataset.eval_resize=100"], "eval_resize=100 is smaller than"),
    (["dataset=synthetic", "dataset.num_classes=7"], "use 100 (the CIFAR-100 stand-in) or 10"),
    (["-m", "dataset=synthetic", "dataset.num_classes=10,7"], "num_classes=7; nothing was run"),
])
def test_a_data_sets_own_refusal_stops_the_command_before_it_runs(capsys, overrides, words):
    """A data set's refusal of its settings alone (``check=`` where it registers) is part of the config's
    check: a sweep stops before its first job, not when the job reaches its data."""
    assert words in preflight_line(capsys, "train_student", overrides)


@pytest.mark.parametrize("config, overrides", [
    ("train_student", ["logger.project=mine"]),  # the advice once was: add it with +logger.project
    ("train_student", ["+logger.project=mine"]),
    ("train_teacher", ["logger=none", "+logger.mode=online"]),
    ("train_student", ["logger=tensorboard", "+logger.tags=[a,b]"]),
])
def test_a_wandb_setting_without_the_wandb_backend_is_refused(capsys, config, overrides):
    """W&B's keys mean nothing to TensorBoard: refused, with the choice that reads them, not recorded."""
    line = preflight_line(capsys, config, overrides)
    assert "is read only by the wandb backend" in line and "add logger=wandb" in line and "+logger" not in line, line


def test_a_wandb_setting_with_the_wandb_backend_is_accepted(compose):
    job = load_job(compose("train_student", ["logger=wandb", "logger.project=mine", "logger.tags=[a]"]),
                   "train_student")
    assert (job.logger.project, job.logger.tags, "wandb" in job.logger.backends) == ("mine", ["a"], True)


def test_the_issues_train_size_on_cifar100_is_refused_both_ways(capsys):
    plain = preflight_line(capsys, "train_student", ["dataset.train_size=100"])
    added = preflight_line(capsys, "train_student", ["+dataset.train_size=100"])
    for line in (plain, added):
        assert "dataset.train_size" in line and "dataset=synthetic" in line and "not of dataset=cifar100" in line
        assert "+dataset" not in line  # no advice to add what would be ignored


def test_a_key_of_another_optimizer_is_refused_at_validation(compose):
    with pytest.raises(UserError, match=r"optim\.delta=0\.1 is a key of optim=dot, not of optim=sgd"):
        validate(compose("train_student", ["+optim.delta=0.1"]), "train_student")


def test_a_key_no_job_reads_is_refused_at_the_top_level(capsys):
    line = preflight_line(capsys, "train_student", ["+foo=1"])
    assert "'foo' does not exist in train_student's config" in line and "+" not in line.split("error:")[1], line
    assert "'model' does not exist" in preflight_line(capsys, "train_student", ["+model.width=2"])


# ---- advice on a key the config does not have ---------------------------------------------------------------
@pytest.mark.parametrize("overrides, words", [
    (["trainer.epoch=3"], ["trainer.epoch", "did you mean trainer.epochs?"]),
    (["distill.nce_k=5"], ["distill.nce_k", "method 'kd' takes no parameters of its own"]),
    (["distill=crd", "distill.nce_kk=5"], ["did you mean distill.nce_k?", "method 'crd' takes", "nce_k"]),
    (["distill.betta=1"], ["did you mean distill.beta?"]),
])
def test_no_plus_advice_where_a_plus_would_be_ignored_or_refused(capsys, overrides, words):
    line = preflight_line(capsys, "train_student", overrides)
    assert all(w in line for w in words) and "+" not in line, line


def test_a_renamed_key_names_its_new_name(capsys):
    """``taps`` (an outside network's feature paths) became ``features``: the old key says so."""
    line = preflight_line(capsys, "train_student", ["student=torchvision", "student.name=resnet18",
                                                    "student.taps.stem=conv1"])
    assert "'student.taps.stem' was renamed; use student.features.stem" in line, line
    nested = preflight_line(capsys, "train_student", ["student=torchvision", "student.name=resnet18",
                                                      "student.features.taps=[layer1]"])
    assert "renamed" not in nested and "student.features.taps" in nested, nested


def test_plus_advice_for_an_outside_networks_argument_and_following_it_takes_effect(capsys, compose):
    from models.external import build_network

    base = ["teacher=module", "teacher._target_=tests.external_nets.TinyNet"]
    line = preflight_line(capsys, "train_student", [*base, "teacher.width=4"])
    assert "add it with +teacher.width=VALUE" in line and "module network's constructor" in line, line
    job = load_job(compose("train_student", [*base, "+teacher.width=4"]), "train_student")
    narrow = build_network(job.teacher, 100, (32, 32), role="teacher")
    wide = build_network(load_job(compose("train_student", base), "train_student").teacher, 100, (32, 32),
                         role="teacher")
    assert (narrow.head.in_features, wide.head.in_features) == (4 * 4, 4 * 8)  # 4 x width; TinyNet's default 8


def test_plus_advice_for_a_method_parameter_its_config_does_not_list(register):
    class Probe(DistillMethod):
        def __init__(self, width: int = 4, scale: float = 1.0) -> None:
            super().__init__()

    register(METHODS, "probe_advice", Probe)
    message = unknown_key_message("train_student", ["distill.method=probe_advice", "distill.width=2"], "distill.width")
    assert "add it with +distill.width=VALUE (a parameter of method 'probe_advice')" in message, message
    refused = unknown_key_message("train_student", ["distill.method=probe_advice", "distill.depth=2"], "distill.depth")
    assert "+" not in refused and "takes width, scale" in refused, refused


def test_logit_standardize_is_offered_where_a_term_compares_logits_and_refused_elsewhere(capsys, compose):
    """The schema's switch, left out of the feature methods' files: the objective's own refusal where no
    term compares logits (Objective.check_logit_standardize), ``+`` advice where KD is part of it (crd_kd)."""
    from distiller.objective import Objective

    refused = preflight_line(capsys, "train_student", ["distill=fitnet", "distill.logit_standardize=true"])
    assert "has no effect here" in refused and "+" not in refused, refused
    # a logit method that keeps its authors' raw logits: refused too, with the methods that do take them
    raw = preflight_line(capsys, "train_student", ["distill=wkd_l", "distill.logit_standardize=true"])
    assert "no term of this objective (wkd_l, distill.alpha=0) takes standardised logits" in raw, raw
    assert "compares the networks' logits" not in raw and "kd, mlkd" in raw, raw
    assert "has no effect here" in preflight_line(capsys, "train_student",
                                                  ["distill=fitnet", "+distill.logit_standardize=true"])
    # set off, on a method it cannot apply to: no '+' advice (following it changed nothing), the key is named
    off = preflight_line(capsys, "train_student", ["distill=fitnet", "distill.logit_standardize=false"])
    assert "does not apply here, on or off: leave it out" in off and "add it with" not in off, off
    offered = preflight_line(capsys, "train_student", ["distill=crd_kd", "distill.logit_standardize=true"])
    assert "add it with +distill.logit_standardize=VALUE" in offered, offered
    job = load_job(compose("train_student", ["distill=crd_kd", "+distill.logit_standardize=true"]), "train_student")
    objective = Objective.from_config(job.distill, job.combine)
    assert objective.alpha > 0 and objective.logit_standardize  # the KD term is standardised: it has an effect


def test_without_the_composed_config_the_message_gives_no_plus_advice():
    class HydraLike(Exception):
        pass

    message = explain_config_error(HydraLike("Could not override 'distill.width'.\nTo append use +distill.width"))
    assert "distill.width" in message and "+" not in message, message


def test_the_advice_as_typed(tmp_path):
    result = run_cli("train_student.py", "dataset.train_size=100", f"hydra.run.dir={tmp_path / 'run'}")
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == EXIT_USER_ERROR and len(lines) == 1, result.stderr
    assert "dataset=synthetic" in lines[0] and not (tmp_path / "run").exists()


@pytest.mark.parametrize("override", ["teacher.cache_dtype=fp16", "teacher.cache_dir=/tmp/teacher-cache"])
def test_a_cache_setting_without_the_cache_is_refused(capsys, override):
    """Where and how the cache is kept means nothing without ``teacher.cache=true``: refused, not recorded."""
    line = preflight_line(capsys, "train_student", ["distill=kd", override])
    assert f"{override} is read only with teacher.cache=true" in line, line


@pytest.mark.parametrize("config, override, words", [
    ("train_student", "student.features.stem=conv1", "applies only to a network from outside the zoo (student="),
    ("train_student", "student.cifar_stem=true", "applies only to a network from outside the zoo (student="),
    ("train_student", "model=resnet8", "is read by train_teacher.py, not by this command"),
    ("train_teacher", "teacher.cache=true", "is read by train_student.py, not by this command"),
    ("train_teacher", "student=resnet8", "is read by train_student.py, not by this command"),
])
def test_a_rightly_spelt_key_of_another_context_says_where_it_applies(capsys, config, override, words):
    line = preflight_line(capsys, config, [override])
    assert words in line and "check the spelling" not in line and "did you mean" not in line, line


# ---- objective keys no term reads ------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, words", [
    (["distill=fitnet", "distill.temperature=8"], "distill.alpha=0 turns the KD term off"),
    (["distill=skd", "distill.temperature=8"], "or set distill.skd_temperature (the method's own)"),
    (["distill=dkd", "distill.dkd_temperature=2", "distill.temperature=3"], "or set distill.dkd_temperature"),
    (["distill=ctkd", "distill.temperature=8"], "CTKD's learned T"),
    (["distill=ctkd", "+distill@combine.dkd=dkd", "combine.dkd.dkd_temperature=3"], "it replaces dkd's own"),
    (["distill=dkd", "+distill@combine.ctkd=ctkd", "distill.dkd_temperature=3"], "it replaces dkd's own"),
    (["distill=kd", "+distill@combine.at=at", "combine.at.alpha=0.5"], "combine.at.alpha is not read"),
    (["distill=kd", "+distill@combine.at=at", "combine.at.temperature=2"], "combine.at.temperature is not read"),
    (["distill=kd", "+distill@combine.dkd=dkd", "combine.dkd.logit_standardize=true"],
     "combine.dkd.logit_standardize is not read: distill.logit_standardize standardises the logits of every logit"),
    (["-m", "distill=fitnet", "distill.temperature=2,4"], "nothing was run"),
    (["distill=kd", "distill.warmup_epochs=20"], "ramps the method's weight distill.beta, which is 0"),
    # a combined method at beta 0 adds nothing at all (its warm-up least of all): refused as such
    (["distill=kd", "+distill@combine.at=at", "combine.at.beta=0", "combine.at.warmup_epochs=5"],
     "combine.at adds nothing: its beta is 0"),
    # KD combined: its own beta is 0 (the KD term is distill.alpha's); 'at+kd' ran with no KD term
    (["distill=at", "+distill@combine.kd=kd"], "combine.kd adds nothing: its beta is 0"),
    (["distill=kd", "+distill@combine.kd2=kd"], "combine.kd2 adds nothing: its beta is 0"),
])
def test_an_objective_key_no_term_reads_is_refused(capsys, overrides, words):
    """A temperature nothing runs at (the KD term off, no method reading the objective's, or a supplied
    one), a combined method's objective weight, a warm-up of a zero weight: a sweep over it would run the
    same job twice."""
    line = preflight_line(capsys, "train_student", overrides)
    assert words in line, line


def _logits(classes: int = 10) -> tuple:
    from datasets.batch import Batch
    from distiller.features import Features

    g = torch.Generator().manual_seed(3)
    zs, zt = torch.randn(6, classes, generator=g) * 3, torch.randn(6, classes, generator=g) * 3
    labels = torch.randint(0, classes, (6,), generator=g)
    return zs, zt, Batch(images=torch.zeros(6, 3, 4, 4), labels=labels, indices=torch.arange(6)), Features


def _kd_by_loop(zs: torch.Tensor, zt: torch.Tensor, t: float) -> torch.Tensor:
    """Hinton's KD written out: T^2 times the batch mean of sum_c p_t log(p_t / p_s) at temperature t."""
    total = 0.0
    for s_row, t_row in zip(zs.double(), zt.double()):
        p_s, p_t = torch.softmax(s_row / t, 0), torch.softmax(t_row / t, 0)
        total += float((p_t * (p_t.log() - p_s.log())).sum())
    return torch.tensor(t * t * total / len(zs), dtype=torch.float64)


@pytest.mark.parametrize("overrides, term", [
    (["distill=kd", "distill.temperature=2"], "kd"),  # the objective's KD term
    (["distill=dist", "distill.alpha=0.5", "distill.temperature=2"], "kd"),  # a method at alpha 0 by default
    (["distill=kd", "distill.alpha=0", "distill.beta=1", "distill.temperature=2"], "kd"),  # KD as the method
])
def test_a_temperature_a_term_runs_at_is_accepted_and_reaches_it(compose, overrides, term):
    from distiller.objective import Objective

    preflight("train_student", overrides)  # accepted: no SystemExit
    job = load_job(compose("train_student", overrides), "train_student")
    objective = Objective.from_config(job.distill, job.combine)
    zs, zt, batch, features = _logits()
    per_method = {e.label: (features(logits=zs), features(logits=zt)) for e in objective.entries}
    out = objective(features(logits=zs), features(logits=zt), batch, 1, per_method)
    torch.testing.assert_close(out.terms[term].double(), _kd_by_loop(zs, zt, 2.0), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("overrides, key", [
    (["distill=dkd", "distill.temperature=2"], "distill.dkd_temperature"),
    (["distill=mlkd", "distill.temperature=2"], "distill.mlkd_temperature"),
    (["distill=kd", "+distill@combine.dkd=dkd", "combine.dkd.temperature=2"], "combine.dkd.dkd_temperature"),
    (["distill=kd", "+distill@combine.dkd=dkd", "combine.dkd.dkd_temperature=2"], "combine.dkd.dkd_temperature"),
])
def test_a_temperature_a_methods_own_key_follows_is_accepted(compose, overrides, key):
    """DKD's and MLKD's own temperature follow their node's ``temperature`` unless set (their files say so)."""
    preflight("train_student", overrides)
    assert OmegaConf.select(compose("train_student", overrides), key) == 2.0


def test_a_warm_up_of_a_weighted_method_is_accepted_and_ramps_its_weight(compose):
    """DKD's own warm-up (its file: 20 epochs) and one set on the command line for a combined method."""
    from distiller.objective import Objective

    overrides = ["distill=kd", "+distill@combine.at=at", "combine.at.warmup_epochs=5"]
    preflight("train_student", overrides)
    job = load_job(compose("train_student", overrides), "train_student")
    at = next(e for e in Objective.from_config(job.distill, job.combine).entries if e.label == "at")
    assert at.beta > 0
    assert [at.weight(epoch) for epoch in (1, 2, 5, 9)] == pytest.approx([at.beta * e / 5 for e in (1, 2, 5, 5)])


@pytest.mark.parametrize("config, overrides, words", [
    ("train_student", ["teacher.lr=0.3"], "teacher.lr is not read here"),
    ("train_student", ["optim.lr=0.1", "student.lr=0.3"], "student.lr has no effect here: optim.lr=0.1 sets"),
    ("train_teacher", ["optim.lr=0.1", "model.lr=0.3"], "model.lr has no effect here: optim.lr=0.1 sets"),
    # the teacher's checkpoint replaces every tensor library weights would have given it
    ("train_student", ["teacher=torchvision", "teacher.name=resnet18", "teacher.weights=/w/resnet18.pth"],
     "teacher.weights is not read here: a student run loads the whole teacher from teacher.ckpt"),
])
def test_a_learning_rate_optim_lr_does_not_follow_is_refused(capsys, config, overrides, words):
    assert words in preflight_line(capsys, config, overrides)


@pytest.mark.parametrize("config, overrides", [
    ("train_student", ["student.lr=0.3"]),
    ("train_student", ["optim=dot", "student.lr=0.3"]),
    ("train_teacher", ["model.lr=0.3"]),
])
def test_a_networks_learning_rate_is_the_optimizers_default(compose, config, overrides):
    preflight(config, overrides)
    assert load_job(compose(config, overrides), config).optim.lr == 0.3


@pytest.mark.parametrize("overrides, extra", [
    (["combine.foo.beta=1"], ""),
    (["+combine.foo.beta=1"], ""),  # Hydra makes the node: its method is then the missing value
    (["distill=kd", "+distill@combine.at=at", "combine.ta.beta=1"], "combined here: at; "),
])
def test_a_key_of_a_label_no_method_is_combined_under_says_how_to_combine_one(capsys, overrides, extra):
    label = overrides[-1].split(".")[1]
    line = preflight_line(capsys, "train_student", overrides)
    assert line == (f"error: no method is combined under the label '{label}' ({extra}add one with "
                    f"+distill@combine.{label}=METHOD; then combine.{label}.KEY=VALUE sets its keys)"), line


def test_a_combined_method_under_the_primary_methods_label_is_refused(capsys, compose):
    """Methods are kept by label (features, checkpoint keys): a second one under the same label replaced the
    first in the objective's modules, so its helpers were neither moved to the device nor checkpointed."""
    from distiller.objective import Objective

    line = preflight_line(capsys, "train_student", ["distill=crd", "+distill@combine.crd=crd"])
    assert "combine.crd has the primary method's label 'crd'" in line and "+distill@combine.crd_2=crd" in line
    overrides = ["distill=crd", "+distill@combine.crd_2=crd"]
    preflight("train_student", overrides)
    job = load_job(compose("train_student", overrides), "train_student")
    objective = Objective.from_config(job.distill, job.combine)
    assert [e.label for e in objective.entries] == list(objective.methods) == ["crd", "crd_2"]
    assert objective.methods["crd"] is not objective.methods["crd_2"]


def test_two_methods_supplying_the_temperature_are_refused(capsys):
    """The objective runs its logit terms at the first supplied temperature: a second learned T would train
    for nothing."""
    line = preflight_line(capsys, "train_student", ["distill=ctkd", "+distill@combine.ctkd_2=ctkd"])
    assert "ctkd and ctkd_2 each supply the temperature of every logit term" in line, line


@pytest.mark.parametrize("override, held", [("+distill@combine=at", "name=at"), ("+combine.x=1", "x=1")])
def test_a_method_combined_without_a_label_says_how_to_label_it(capsys, override, held):
    """``+distill@combine=at`` puts AT's own keys where labels go: one line, not OmegaConf's merge error."""
    line = preflight_line(capsys, "train_student", [override])
    assert line == (f"error: combine holds {held}, not a method under a label: combine a method with "
                    f"+distill@combine.<label>=METHOD"), line


@pytest.mark.parametrize("overrides, words", [
    # GROUP@PACKAGE without the + that adds it
    (["distill=crd", "distill@combine.at=at"], ["write +distill@combine.at=at"]),
    # a pair preset's own key without a pair preset: it exists only there
    (["teacher=resnet56", "student=resnet20", "distill=dkd", "pair.dkd_nckd_weight=3"],
     ["'pair.dkd_nckd_weight' exists only with a pair preset", "pair=TEACHER-STUDENT"]),
    (["pair.no_such_key=3"], ["'pair.no_such_key' does not exist; check the spelling"]),  # no pair sets it
])
def test_a_key_of_a_form_hydra_refuses_gets_the_form_that_works(capsys, overrides, words) -> None:
    line = preflight_line(capsys, "train_student", overrides)
    assert all(w in line for w in words), line


def test_a_pair_key_is_read_with_its_pair_preset(compose) -> None:
    preflight("train_student", ["pair=resnet56-resnet20", "distill=dkd", "pair.dkd_nckd_weight=3"])
