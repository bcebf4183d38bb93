"""The engine's seams for methods that need more than one forward and one backward.

Each seam is used by a toy method or optimizer registered only here, and what it
receives is checked against an independent computation:

* split gradients (an optimizer with ``step_kd``): the recorded distillation gradient and
  the task gradient equal autograd's gradients of ``alpha*KD`` and ``gamma*CE`` alone;
* a second view of the batch: the method gets both networks' logits on it, and those equal
  the networks applied to the view the loader made (a separate batch, BN in train mode);
* a learnable scalar with its own schedule: it is in the optimizer (it moves), in the
  checkpoint, recorded per epoch, supplies the KD temperature, and its schedule sees every epoch.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as nnf
from helpers import tiny_trainer
from torch import nn

from distiller import functional as F
from distiller.features import Features
from distiller.methods import METHODS, DistillMethod, TermContext
from distiller.optim import OPTIMIZERS

pytestmark = pytest.mark.numeric

NUM_CLASSES = 10


def make_trainer(tmp: Path, distill: dict, epochs: int = 1, optimizer: str | None = None):
    return tiny_trainer(tmp, distill, epochs, optimizer=optimizer)


# ---- split gradients ------------------------------------------------------------------------------
class RecordingSplitSGD(torch.optim.SGD):
    """Plain SGD on the task gradient that also records what ``step_kd`` saw (the seam's protocol)."""

    def step_kd(self) -> None:
        self.recorded = {id(p): p.grad.detach().clone() for g in self.param_groups for p in g["params"]
                         if p.grad is not None}


def test_an_optimizer_with_step_kd_gets_the_distillation_and_task_gradients_apart(tmp_path: Path, register) -> None:
    register(OPTIMIZERS, "recording_split", lambda params, lr, optim, device: RecordingSplitSGD(params, lr=lr))
    trainer = make_trainer(tmp_path, {"name": "kd", "gamma": 0.1, "alpha": 0.9, "temperature": 4.0},
                           optimizer="recording_split")
    phase = trainer.plan[-1]
    optimizer = trainer.prepare_phase(phase)
    assert isinstance(optimizer, RecordingSplitSGD)
    batch = next(iter(trainer.train_loader.epoch(1)))
    # independent: both losses from a copy of the networks in the same state
    student, teacher = copy.deepcopy(trainer.student), copy.deepcopy(trainer.teacher)
    logits = student(batch.images)
    with torch.no_grad():
        t_logits = teacher(batch.images)
    params = list(student.parameters())
    g_task = torch.autograd.grad(0.1 * nnf.cross_entropy(logits, batch.labels), params, retain_graph=True)
    g_dist = torch.autograd.grad(0.9 * F.kd(logits, t_logits, 4.0), params)

    out = trainer.train_step(batch, phase, 1, optimizer)
    torch.testing.assert_close(out.total, out.task + out.distill, rtol=1e-6, atol=0)
    for p, want_task, want_dist in zip(trainer.student.parameters(), g_task, g_dist):
        torch.testing.assert_close(optimizer.recorded[id(p)], want_dist, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(p.grad, want_task, rtol=1e-4, atol=1e-7)
    trainer.step.remove_hooks()


# ---- a second view ----------------------------------------------------------------------------------
class TwoViewToy(DistillMethod):
    """Toy: KL between the networks on the extra view, and CE of the student on it (as MLKD needs)."""

    views = ("standard",)

    def forward(self, student: Features, teacher: Features, batch, ctx: TermContext) -> dict[str, torch.Tensor]:
        s, t = student.views["standard"], teacher.views["standard"]
        self.seen = (batch.views["standard"], s.logits.detach(), t.logits.detach())
        return {"view_kd": F.kd(s.logits, t.logits, 4.0), "view_ce": nnf.cross_entropy(s.logits, batch.labels)}


def test_a_method_gets_both_networks_on_a_second_view_as_a_separate_batch(tmp_path: Path, register) -> None:
    register(METHODS, "two_view_toy", TwoViewToy)
    trainer = make_trainer(tmp_path, {"name": "two_view_toy", "gamma": 1.0, "alpha": 0.0, "beta": 1.0})
    phase = trainer.plan[-1]
    optimizer = trainer.prepare_phase(phase)
    batch = next(iter(trainer.train_loader.epoch(1)))
    view = batch.views["standard"]
    assert view.shape == batch.images.shape and not torch.equal(view, batch.images)
    # the same step's view is rebuilt exactly (resume), from (seed, epoch, step) alone
    again = next(iter(trainer.train_loader.epoch(1))).views["standard"]
    assert torch.equal(view, again)
    student, teacher = copy.deepcopy(trainer.student), copy.deepcopy(trainer.teacher)
    student.train()
    student(batch.images)  # the main view runs first and moves BN statistics: replay it
    want_s = student(view)
    with torch.no_grad():
        want_t = teacher(view)
    out = trainer.train_step(batch, phase, 1, optimizer)
    method = trainer.objective.methods["two_view_toy"]
    got_view, got_s, got_t = method.seen
    assert torch.equal(got_view, view)
    torch.testing.assert_close(got_s, want_s.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_t, want_t, rtol=1e-5, atol=1e-6)
    assert set(out.terms) == {"ce", "view_kd", "view_ce"}
    trainer.step.remove_hooks()


# ---- a learnable scalar with its own schedule ---------------------------------------------------------
class LearnedTemperatureToy(DistillMethod):
    """Toy: a learnable scalar theta, T = 1 + 4 * sigmoid(theta) for every logit term; a per-epoch
    schedule value recorded beside it."""

    always_active = True

    def __init__(self) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.tensor(0.5))
        self.epochs_seen: list[int] = []

    def on_epoch_start(self, epoch: int) -> None:
        self.epochs_seen.append(epoch)

    def temperature(self) -> torch.Tensor:
        return 1.0 + 4.0 * torch.sigmoid(self.theta)

    def forward(self, student: Features, teacher: Features, batch, ctx: TermContext) -> dict[str, torch.Tensor]:
        return {}

    def scalars(self) -> dict[str, float]:
        return {"temperature": float(self.temperature().detach()), "schedule": float(self.epochs_seen[-1])}


def test_a_learnable_scalar_trains_supplies_the_temperature_and_is_checkpointed(tmp_path: Path, register) -> None:
    register(METHODS, "learned_t_toy", LearnedTemperatureToy)
    distill = {"name": "learned_t_toy", "gamma": 0.1, "alpha": 0.9, "beta": 0.0, "temperature": 4.0}
    trainer = make_trainer(tmp_path, distill, epochs=2)
    method = trainer.objective.methods["learned_t_toy"]
    main = trainer.plan[-1]
    assert any(p is method.theta for p in main.parameters)  # in the optimizer although beta = 0
    theta0 = method.theta.detach().clone()
    # the KD term runs at the supplied temperature (independent: F.kd at that T)
    phase_opt = trainer.prepare_phase(main)
    batch = next(iter(trainer.train_loader.epoch(1)))
    student, teacher = copy.deepcopy(trainer.student), copy.deepcopy(trainer.teacher)
    with torch.no_grad():
        want_kd = F.kd(student(batch.images), teacher(batch.images), float(1.0 + 4.0 * torch.sigmoid(theta0)))
    out = trainer.train_step(batch, main, 1, phase_opt)
    torch.testing.assert_close(out.terms["kd"].detach(), want_kd, rtol=1e-4, atol=1e-6)
    assert method.theta.grad is not None and method.theta.grad.abs() > 0

    fresh = make_trainer(tmp_path / "run", distill, epochs=2)
    state = fresh.fit()
    method = fresh.objective.methods["learned_t_toy"]
    assert method.epochs_seen == [1, 2]
    assert not torch.equal(method.theta.detach(), theta0)  # trained
    last = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    torch.testing.assert_close(last["objective"]["methods.learned_t_toy.theta"], method.theta.detach())
    recorded = [r["learned_t_toy/temperature"] for r in state.history]
    assert recorded[-1] == pytest.approx(float(1.0 + 4.0 * torch.sigmoid(method.theta.detach())), rel=1e-6)
    assert [r["learned_t_toy/schedule"] for r in state.history] == [1.0, 2.0]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [e["learned_t_toy/schedule"] for e in metrics["epochs"]] == [1.0, 2.0]


# ---- a method switched off ----------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["fitnet", "at"])
def test_a_feature_method_at_beta_0_builds_and_trains_on_cross_entropy_alone(tmp_path: Path, method: str) -> None:
    """beta=0 leaves the method built from both networks' shapes (it used to fail: 'the teacher has 0 stages'),
    the teacher never runs, and the step's loss is the student's cross-entropy, computed here apart."""
    trainer = make_trainer(tmp_path, {"name": method, "gamma": 1.0, "alpha": 0.0, "beta": 0.0})
    assert trainer.step.teacher is None
    phase = trainer.plan[-1]
    optimizer = trainer.prepare_phase(phase)
    batch = next(iter(trainer.train_loader.epoch(1)))
    want = nnf.cross_entropy(copy.deepcopy(trainer.student)(batch.images), batch.labels)
    out = trainer.train_step(batch, phase, 1, optimizer)
    torch.testing.assert_close(out.total, want, rtol=1e-5, atol=1e-6)
    trainer.step.remove_hooks()


def test_an_objective_with_no_positive_weight_is_refused_in_one_line() -> None:
    from helpers import objective_of

    from common.errors import UserError

    with pytest.raises(UserError, match="the objective has no term to train: distill.gamma=0"):
        objective_of({"name": "kd", "gamma": 0.0, "alpha": 0.0, "temperature": 4.0})
    objective_of({"name": "kd", "gamma": 0.0, "alpha": 0.5, "temperature": 4.0})  # KD alone trains
