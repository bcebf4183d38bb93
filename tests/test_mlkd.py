"""MLKD: its config, its terms through the objective, the engine's second view, LS, training, resume.

The expected values are recomputed independently: MLKD's distillation term by the explicit
loops of test_functional_dist_ls_ctkd_mlkd_wttm_nkd.py (``mlkd_ref``, float64 Python lists), the cross-entropies by
``torch.nn.functional`` on logits from our own forwards of copies of the networks. Three
teacher/student pairs of different families check that the loss falls along its gradient and
that only the student receives gradient. A one-epoch CLI run writes metrics; a run killed in
the middle of an epoch resumes bitwise to the uninterrupted result, for MLKD (its strong view is
rebuilt from seed, epoch and step) and for CTKD (its learned theta is checkpointed).
"""
from __future__ import annotations

import copy
import json
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as nnf
from helpers import (
    REPO,
    assert_gradient_step_descends,
    assert_same_weights,
    comparable_metrics,
    distill_node,
    fix_batch_statistics,
    generator,
    kill_when,
    objective_of,
    random_splits,
    run_cli,
    seed,
    start_command,
    tiny_overrides,
    tiny_trainer,
    train_tiny_teacher,
)
from naive_refs import rows
from omegaconf import OmegaConf
from test_functional_dist_ls_ctkd_mlkd_wttm_nkd import mlkd_ref

from common.errors import UserError
from datasets.batch import Batch
from datasets.randaugment import strong_view
from distiller import functional as F
from distiller.config.schema import OBJECTIVE_KEYS
from distiller.engine.runtime import seed_everything
from distiller.features import Features
from distiller.methods import METHODS
from distiller.objective import Objective
from models import build_model

DISTILL_DIR = REPO / "configs" / "distill"
SCHEMA_KEYS = ["name", "method", "gamma", "alpha", "beta", "temperature", "warmup_epochs"]
PAIRS = [("resnet32x4", "resnet8x4"), ("vgg13", "MobileNetV2"), ("wrn_40_2", "ShuffleV1")]
MEAN = torch.tensor([0.5071, 0.4865, 0.4409]).view(1, 3, 1, 1)
STD = torch.tensor([0.2673, 0.2564, 0.2762]).view(1, 3, 1, 1)


def node(**overrides) -> dict:
    """The composed distill=mlkd node with ``overrides`` applied before its interpolations resolve."""
    return distill_node("mlkd", **overrides)


def logits_features(zs_w, zt_w, zs_s, zt_s) -> tuple[Features, Features]:
    s, t = Features(logits=zs_w), Features(logits=zt_w)
    s.views["strong"], t.views["strong"] = Features(logits=zs_s), Features(logits=zt_s)
    return s, t


def call(objective: Objective, s: Features, t: Features, batch: Batch):
    return objective(s, t, batch, 1, {"mlkd": (s, t)})


def tiny_logits(n: int = 6, c: int = 10, seed_base: int = 0, dtype: torch.dtype = torch.float64):
    g = generator(seed_base)
    z = [(torch.randn(n, c, generator=g, dtype=dtype) * 3) for _ in range(4)]
    z[0].requires_grad_()
    z[2].requires_grad_()
    y = torch.randint(0, c, (n,), generator=g)
    return z, Batch(images=torch.zeros(n, 3, 4, 4), labels=y, indices=torch.arange(n))


# --------------------------------------------------------------------------- config and terms

def test_config_has_the_published_settings() -> None:
    cfg = node()
    assert list(cfg)[:len(SCHEMA_KEYS)] == SCHEMA_KEYS
    assert (cfg["gamma"], cfg["alpha"], cfg["beta"], cfg["warmup_epochs"]) == (0.1, 0.0, 1.0, 0)
    own = {k: v for k, v in cfg.items() if k not in SCHEMA_KEYS + ["logit_standardize"]}
    assert own == {"kd_weight": 0.9, "strong_ce_weight": 0.1, "mlkd_temperature": 4.0}
    assert cfg["logit_standardize"] is False and not set(own) & set(OBJECTIVE_KEYS)
    method = METHODS.get("mlkd")
    assert method.views == ("strong",) and method.logit_terms
    # MLKD+LS without a pair: the LS authors' defaults w 9, T_b 2 (METHODS_NEW.md section 2)
    ls = node(logit_standardize=True)
    assert (ls["kd_weight"], ls["mlkd_temperature"], ls["strong_ce_weight"]) == (9.0, 2.0, 0.1)


def test_bad_settings_are_user_errors() -> None:
    with pytest.raises(UserError, match="mlkd_temperature"):
        objective_of(node(mlkd_temperature=0.0))
    with pytest.raises(UserError, match="kd_weight"):
        objective_of(node(kd_weight=-1.0))


@pytest.mark.parametrize("standardize", [False, True])
def test_total_is_ce_on_both_views_plus_weighted_mlkd(standardize: bool) -> None:
    """0.1 CE(weak) + 0.1 CE(strong) + kd_w * MLKD, MLKD from the loops; LS only inside MLKD's KD terms."""
    cfg = node(logit_standardize=standardize)
    objective = objective_of(cfg).double()
    (zs_w, zt_w, zs_s, zt_s), batch = tiny_logits(seed_base=1)
    out = call(objective, *logits_features(zs_w, zt_w, zs_s, zt_s), batch)
    assert set(out.terms) == {"ce", "mlkd", "ce_strong"}
    kd_w, t0 = (9.0, 2.0) if standardize else (0.9, 4.0)
    want_mlkd = kd_w * mlkd_ref(rows(zs_w), rows(zt_w), rows(zs_s), rows(zt_s), t0, standardize)
    ce_w = nnf.cross_entropy(zs_w.detach(), batch.labels).item()
    ce_s = nnf.cross_entropy(zs_s.detach(), batch.labels).item()
    assert out.terms["mlkd"].item() == pytest.approx(want_mlkd, rel=1e-6)  # float32 of a float64 value
    assert out.terms["ce_strong"].item() == pytest.approx(0.1 * ce_s, rel=1e-6)
    assert out.total.item() == pytest.approx(0.1 * ce_w + 0.1 * ce_s + want_mlkd, rel=1e-6)
    assert out.task.item() == pytest.approx(0.1 * ce_w, rel=1e-6)  # gamma: the weak view's CE only
    if standardize:  # not standardised twice, and the batch/class levels and masks see raw logits
        z = [F.logit_standardize(x.detach()) for x in (zs_w, zt_w, zs_s, zt_s)]
        wrong = kd_w * mlkd_ref(*(rows(x) for x in z), t0, False)
        assert abs(out.terms["mlkd"].item() - wrong) > 1e-3 * abs(wrong)
    out.total.backward()
    assert zs_w.grad.abs().sum() > 0 and zs_s.grad.abs().sum() > 0


def test_gamma_scales_the_strong_view_ce_too() -> None:
    cfg = node(gamma=0.3)
    assert cfg["strong_ce_weight"] == 0.3
    cfg = node(gamma=0.3, strong_ce_weight=0.2)
    assert cfg["strong_ce_weight"] == 0.2


# --------------------------------------------------------------------------- three pairs

def make_views(n: int, seed_base: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A weak (the raw images) and a strong view, normalised as the loader does, in float64."""
    raw = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=generator(seed_base))
    norm = lambda x: ((x.double() / 255 - MEAN.double()) / STD.double())
    return norm(raw), norm(strong_view(raw, generator(seed_base + 1)))


@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: f"{p[0]}-{p[1]}")
def test_loss_falls_along_its_gradient_and_only_the_student_learns(pair) -> None:
    teacher_name, student_name = pair
    torch.manual_seed(seed(0))
    teacher = build_model(teacher_name).double().eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = build_model(student_name).double()
    weak, strong = make_views(4, 20)
    labels = torch.tensor([3, 17, 42, 99])
    batch = Batch(images=weak, labels=labels, indices=torch.arange(4), views={"strong": strong})
    with torch.no_grad():
        t_w, t_s = teacher(weak), teacher(strong)
    objective = objective_of(node()).double()
    fix_batch_statistics([student], lambda: student(torch.cat([weak, strong])))
    teacher_before = [p.clone() for p in teacher.parameters()]

    def loss() -> torch.Tensor:
        s, t = logits_features(student(weak), t_w, student(strong), t_s)
        return call(objective, s, t, batch).total

    out = call(objective, *logits_features(student(weak), t_w, student(strong), t_s), batch)
    assert set(out.terms) == {"ce", "mlkd", "ce_strong"} and all(torch.isfinite(v) for v in out.terms.values())
    assert_gradient_step_descends(loss, list(student.parameters()), frozen=list(teacher.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(teacher_before, teacher.parameters()))


# --------------------------------------------------------------------------- through the engine

def test_engine_step_runs_four_forwards_and_the_total_matches(tmp_path: Path) -> None:
    """The loader adds the strong view, the step runs both networks on it as a batch of its own; the
    total equals 0.1 CE(weak) + 0.1 CE(strong) + 0.9 MLKD from our own four forwards."""
    seed_everything(seed(0))
    trainer = tiny_trainer(tmp_path, node(), 1, data=random_splits(48, 10, 7, test_n=16))
    phase = trainer.plan[-1]
    optimizer = trainer.prepare_phase(phase)
    batch = next(iter(trainer.train_loader.epoch(1)))
    assert set(batch.views) == {"strong"} and batch.views["strong"].shape == batch.images.shape
    student, teacher = copy.deepcopy(trainer.student), copy.deepcopy(trainer.teacher)
    student.train()
    s_w, s_s = student(batch.images), student(batch.views["strong"])  # two batches: BN sees each alone
    with torch.no_grad():
        t_w, t_s = teacher(batch.images), teacher(batch.views["strong"])
    want = (0.1 * nnf.cross_entropy(s_w, batch.labels) + 0.1 * nnf.cross_entropy(s_s, batch.labels)
            + 0.9 * mlkd_ref(*(rows(x.detach().double()) for x in (s_w, t_w, s_s, t_s)), 4.0, False))
    out = trainer.train_step(batch, phase, 1, optimizer)
    assert out.total.item() == pytest.approx(want.item(), rel=1e-4)
    assert out.terms["ce_strong"].item() == pytest.approx(0.1 * nnf.cross_entropy(s_s, batch.labels).item(),
                                                          rel=1e-4)
    trainer.step.remove_hooks()


# --------------------------------------------------------------------------- command line and resume

@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("mlkd")
    train_tiny_teacher(tmp)
    return tmp


def test_one_epoch_cli_run_writes_metrics(teacher: Path) -> None:
    run = teacher / "mlkd_cli"
    result = run_cli("train_student.py", "teacher=resnet8", "student=resnet8", "distill=mlkd",
                     f"hydra.run.dir={run}", *tiny_overrides(teacher))
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "finished" and metrics["method"] == "mlkd"
    (record,) = metrics["epochs"]
    for key in ("train_loss", "loss_ce", "loss_mlkd", "loss_ce_strong", "test_top1"):
        assert np.isfinite(record[key]), key
    assert record["loss_ce_strong"] > 0 and record["loss_mlkd"] > 0


def resume_overrides(tmp: Path, run: str, *extra: str) -> list[str]:
    return ["teacher=resnet8", "student=resnet8", f"hydra.run.dir={tmp / run}",
            *tiny_overrides(tmp, train_size=320), "trainer.epochs=2", "trainer.checkpoint_every_steps=1",
            "trainer.log_interval=5", *extra]


@pytest.mark.numeric
@pytest.mark.slow  # a process killed and relaunched (~20 s): CI runs it with the other numeric tests
@pytest.mark.parametrize("method", ["mlkd", "ctkd"])
def test_sigkill_mid_epoch_then_resume_is_bitwise(teacher: Path, method: str) -> None:
    """Killed in the middle of the second epoch (CTKD: after its lambda and theta moved), resumed: the same bits."""
    extra = (f"distill={method}",)
    reference = run_cli("train_student.py", *resume_overrides(teacher, f"{method}_ref", *extra))
    assert reference.returncode == 0, reference.stderr[-3000:]
    victim = start_command("train_student.py", *resume_overrides(teacher, f"{method}_killed", *extra))
    state = kill_when(victim, teacher / f"{method}_killed" / "last.pt",
                      lambda s: s["phase"] == 0 and s["epoch"] == 1 and s["step"] >= 3)
    assert victim.returncode == -signal.SIGKILL and not state["finished"]
    resumed = run_cli("train_student.py", *resume_overrides(teacher, f"{method}_killed", *extra))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for name in ("final.pt", "last.pt"):
        assert_same_weights(teacher / f"{method}_ref" / name, teacher / f"{method}_killed" / name)
    assert comparable_metrics(teacher / f"{method}_ref") == comparable_metrics(teacher / f"{method}_killed")
    ref_obj = torch.load(teacher / f"{method}_ref" / "last.pt", weights_only=True)["objective"]
    got_obj = torch.load(teacher / f"{method}_killed" / "last.pt", weights_only=True)["objective"]
    assert ref_obj.keys() == got_obj.keys() and all(torch.equal(ref_obj[k], got_obj[k]) for k in ref_obj)
    if method == "ctkd":
        assert ref_obj["methods.ctkd.theta"].item() != 1.0  # the learned state moved and was restored


# --------------------------------------------------------------------------- presets

# METHODS_NEW.md section 4 "Recipe and presets" (and section 2 for MLKD+LS's lr), written out here:
# (preset, pair, distill) -> (lr, epochs)
PRESET_CELLS = {
    ("mlkd_paper", "resnet32x4-resnet8x4", "mlkd"): (0.025, 480),
    ("mlkd_paper", "wrn_40_2-wrn_40_1", "mlkd"): (0.025, 480),
    ("mlkd_paper", "vgg13-vgg8", "mlkd"): (0.025, 480),
    ("mlkd_paper", "vgg13-vgg8", "mlkd_ls"): (0.01, 480),
    ("mlkd_paper", "ResNet50-MobileNetV2", "mlkd"): (0.01, 480),
    ("mlkd_paper", "wrn_40_2-MobileNetV2", "mlkd_ls"): (0.005, 480),
    ("mlkd_paper", "wrn_40_2-MobileNetV2", "mlkd"): (0.005, 480),  # logit-standardization-KD's config
    ("mlkd_paper", "wrn_40_2-ShuffleV1", "mlkd"): (0.01, 480),
    ("mlkd_paper", "resnet32x4-ShuffleV1", "mlkd"): (0.01, 960),
    ("mlkd_paper", "resnet32x4-ShuffleV2", "mlkd_ls"): (0.01, 960),
    ("mlkd_standard", "resnet32x4-resnet8x4", "mlkd"): (0.05, 240),
    ("mlkd_standard", "vgg13-vgg8", "mlkd_ls"): (0.05, 240),
    ("mlkd_standard", "resnet32x4-ShuffleV2", "mlkd"): (0.01, 240),
}


def test_the_paper_and_standard_presets_never_share_a_run_directory(compose) -> None:
    """The same cell under the two recipes (lr, epochs differ) is two runs: the second was refused as 'a different
    run' in the first's directory. The paper's runs go under runs/paper/, as the other paper presets'."""
    dirs = {}
    for preset in ("mlkd_standard", "mlkd_paper"):
        cfg = compose("train_student", [f"experiment={preset}", "pair=resnet56-resnet20", "distill=mlkd"],
                      return_hydra_config=True)
        dirs[preset] = (cfg.hydra.run.dir, cfg.hydra.sweep.dir)
    assert dirs["mlkd_standard"][0] != dirs["mlkd_paper"][0] and dirs["mlkd_standard"][1] != dirs["mlkd_paper"][1]
    assert dirs["mlkd_paper"] == ("runs/paper/resnet56-resnet20/mlkd/seed0", "runs/paper")


def test_presets_resolve_the_published_recipe_per_pair(compose) -> None:
    for (preset, pair, method), (lr, epochs) in PRESET_CELLS.items():
        cfg = OmegaConf.to_container(compose("train_student", [f"experiment={preset}", f"pair={pair}",
                                                                f"distill={method}"]), resolve=True)
        where = f"{preset} {pair} {method}"
        assert (cfg["optim"]["lr"], cfg["trainer"]["epochs"]) == (lr, epochs), where
        assert cfg["schedule"]["milestones"] == [150, 180, 210], where  # whatever the epoch count
        assert (cfg["dataset"]["batch_size"], cfg["optim"]["momentum"], cfg["optim"]["weight_decay"]) == (64, 0.9, 5e-4)
        distill = cfg["distill"]
        assert distill["method"] == "mlkd" and distill["logit_standardize"] == (method == "mlkd_ls"), where
        if method == "mlkd":
            assert (distill["gamma"], distill["kd_weight"], distill["mlkd_temperature"]) == (0.1, 0.9, 4.0), where
    # MLKD+LS takes the pair's T_b and w: vgg13 -> vgg8 ran with w 6, T_b 2 (METHODS_NEW.md section 2)
    ls = compose("train_student", ["experiment=mlkd_paper", "pair=vgg13-vgg8", "distill=mlkd_ls"]).distill
    assert (ls.kd_weight, ls.mlkd_temperature) == (6.0, 2.0)
    single = compose("train_student", ["experiment=mlkd_paper"])  # no -m: MLKD itself
    assert single.distill.name == "mlkd"


@pytest.mark.parametrize("preset", ["mlkd_paper", "mlkd_standard"])
def test_presets_sweep_the_published_pairs(compose, preset: str) -> None:
    params = compose("train_student", [f"experiment={preset}"], return_hydra_config=True).hydra.sweeper.params
    published = {"resnet32x4-resnet8x4", "vgg13-vgg8", "wrn_40_2-wrn_40_1", "wrn_40_2-wrn_16_2", "resnet56-resnet20",
                 "resnet110-resnet32", "resnet110-resnet20", "resnet32x4-ShuffleV2", "resnet32x4-wrn_16_2",
                 "resnet32x4-wrn_40_2", "wrn_40_2-resnet8x4", "wrn_40_2-MobileNetV2", "vgg13-MobileNetV2",
                 "ResNet50-MobileNetV2"}
    pairs = set(params["pair"].split(","))
    assert published <= pairs and pairs - published == {"resnet32x4-ShuffleV1", "wrn_40_2-ShuffleV1"}
    assert params["distill"] == "mlkd,mlkd_ls" and params["seed"] == "0,1,2,3,4"
