"""DOT (distiller.optim.DOT, ``optim=dot``) against independent computations.

* the update table, written out by hand in float64, over several steps in which every parameter
  goes through every case (both gradients, task only, distillation only, none), with two
  parameter groups of their own lr and weight decay and an lr change mid-run;
* with ``delta = 0`` and task gradients only, DOT is ``torch.optim.SGD`` step for step;
* a ``state_dict`` saved mid-run continues identically;
* one step of the real Trainer moves every parameter by ``-lr (g_task + wd θ) - lr g_dist``, the
  gradients computed by autograd on a copy;
* ``optim=dot`` composes into settings with delta 0.075, and a bad delta is a one-line UserError.
"""
from __future__ import annotations

import copy
import io
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as nnf
from helpers import generator, random_splits, tiny_overrides, tiny_trainer
from torch import nn

from common.errors import UserError
from distiller import functional as F
from distiller.config.validation import load_job
from distiller.engine.runtime import Runtime
from distiller.jobs.train import base_lr, distill
from distiller.optim import DOT, OPTIMIZERS, make_optimizer
from models import build_model

CASES = ("both", "task", "dist", "none")
SHAPES = [(3, 4), (5,), (2, 3, 3), (4,), (6, 2), (1,)]
GROUPS = [  # (parameter indices, lr, weight decay)
    ((0, 1, 2), 0.1, 5e-4),
    ((3, 4, 5), 0.03, 1e-2),
]
MOMENTUM, DELTA = 0.9, 0.075


def case_of(i: int, step: int) -> str:
    """Every parameter passes through every case, from its own first case, in one order or the reverse."""
    return CASES[(i + step * (1 + 2 * (i % 2))) % 4]


def random_grads(step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = generator(100 + step)
    return [(torch.randn(s, generator=gen, dtype=torch.float64), torch.randn(s, generator=gen, dtype=torch.float64))
            for s in SHAPES]


def initial_params() -> list[torch.Tensor]:
    gen = generator(7)
    return [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]


def make_dot(params: list[nn.Parameter], delta: float = DELTA) -> DOT:
    return DOT([{"params": [params[i] for i in idx], "lr": lr, "weight_decay": wd} for idx, lr, wd in GROUPS],
               lr=0.5, momentum=MOMENTUM, delta=delta, weight_decay=0.0)


def drive(opt: DOT, params: list[nn.Parameter], step: int, cases=case_of) -> None:
    """One iteration of the protocol: distillation gradients, step_kd, task gradients, step."""
    grads = random_grads(step)
    opt.zero_grad(set_to_none=True)
    for i, (p, (_, g_dist)) in enumerate(zip(params, grads)):
        if cases(i, step) in ("both", "dist"):
            p.grad = g_dist.clone()
    opt.step_kd()
    opt.zero_grad(set_to_none=True)
    for i, (p, (g_task, _)) in enumerate(zip(params, grads)):
        if cases(i, step) in ("both", "task"):
            p.grad = g_task.clone()
    opt.step()


# ---- (a) the update table, by hand ----------------------------------------------------------------
def test_dot_follows_the_update_table_in_every_case_and_group() -> None:
    steps = 9
    theta = initial_params()
    v_task: list[torch.Tensor | None] = [None] * len(SHAPES)
    v_dist: list[torch.Tensor | None] = [None] * len(SHAPES)
    params = [nn.Parameter(t.clone()) for t in theta]
    opt = make_dot(params)
    lr_of = {i: lr for idx, lr, _ in GROUPS for i in idx}
    wd_of = {i: wd for idx, _, wd in GROUPS for i in idx}
    seen: dict[int, set[str]] = {i: set() for i in range(len(SHAPES))}
    for step in range(steps):
        if step == 5:  # a scheduler: every group's lr drops tenfold
            for group in opt.param_groups:
                group["lr"] *= 0.1
            lr_of = {i: lr * 0.1 for i, lr in lr_of.items()}
        grads = random_grads(step)
        for i in range(len(SHAPES)):
            case, (g_t, g_d), lr, wd, th = case_of(i, step), grads[i], lr_of[i], wd_of[i], theta[i]
            seen[i].add(case)
            if case == "both":
                v_task[i] = g_t + wd * th if v_task[i] is None else (MOMENTUM - DELTA) * v_task[i] + g_t + wd * th
                v_dist[i] = g_d if v_dist[i] is None else (MOMENTUM + DELTA) * v_dist[i] + g_d
                theta[i] = th - lr * v_task[i] - lr * v_dist[i]
            elif case == "task":
                v_task[i] = g_t + wd * th if v_task[i] is None else MOMENTUM * v_task[i] + g_t + wd * th
                theta[i] = th - lr * v_task[i]
            elif case == "dist":  # weight decay from the first step (the authors' code skips it there)
                v_dist[i] = g_d + wd * th if v_dist[i] is None else MOMENTUM * v_dist[i] + g_d + wd * th
                theta[i] = th - lr * v_dist[i]
        drive(opt, params, step)
        for i, p in enumerate(params):
            torch.testing.assert_close(p.detach(), theta[i], rtol=1e-13, atol=1e-15, msg=f"step {step} param {i}")
            state = opt.state[p]
            for key, want in (("momentum_buffer", v_task[i]), ("momentum_kd_buffer", v_dist[i])):
                if want is None:
                    assert key not in state, (step, i, key)
                else:
                    torch.testing.assert_close(state[key], want, rtol=1e-13, atol=1e-15)
    assert all(cases == set(CASES) for cases in seen.values()), seen


def test_a_distillation_only_parameter_is_decayed_from_its_first_step() -> None:
    p = nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    opt = DOT([p], lr=0.1, weight_decay=0.01)
    p.grad = torch.tensor([0.5, 0.25], dtype=torch.float64)
    opt.step_kd()
    p.grad = None
    opt.step()
    want = torch.tensor([1.0 - 0.1 * (0.5 + 0.01), -2.0 - 0.1 * (0.25 - 0.02)], dtype=torch.float64)
    torch.testing.assert_close(p.detach(), want, rtol=1e-15, atol=0)
    assert "momentum_buffer" not in opt.state[p]


def test_recorded_gradients_are_forgotten_after_a_step() -> None:
    p = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt = DOT([p], lr=1.0, weight_decay=0.0)
    p.grad = torch.ones(3, dtype=torch.float64)
    opt.step_kd()
    opt.zero_grad(set_to_none=False)  # zeroing in place must not reach the recorded copy
    opt.step()
    torch.testing.assert_close(p.detach(), -torch.ones(3, dtype=torch.float64))
    opt.zero_grad(set_to_none=True)
    opt.step()  # nothing recorded, no gradient: untouched
    torch.testing.assert_close(p.detach(), -torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize("kwargs", [{"delta": -0.1}, {"delta": 0.95}, {"lr": -1.0}, {"weight_decay": -1.0}])
def test_bad_arguments_are_refused(kwargs) -> None:
    with pytest.raises(ValueError):
        DOT([nn.Parameter(torch.zeros(1))], **{"lr": 0.1, **kwargs})


# ---- (b) delta = 0, task gradients only: SGD ------------------------------------------------------
def test_with_delta_zero_and_task_gradients_only_dot_is_sgd() -> None:
    dot_params = [nn.Parameter(t) for t in initial_params()]
    sgd_params = [nn.Parameter(t) for t in initial_params()]
    dot = make_dot(dot_params, delta=0.0)
    sgd = torch.optim.SGD([{"params": [sgd_params[i] for i in idx], "lr": lr, "weight_decay": wd}
                           for idx, lr, wd in GROUPS], lr=0.5, momentum=MOMENTUM, foreach=False)
    for step in range(6):
        drive(dot, dot_params, step, cases=lambda i, step: "task")
        for p, (g_task, _) in zip(sgd_params, random_grads(step)):
            p.grad = g_task.clone()
        sgd.step()
        for a, b in zip(dot_params, sgd_params):
            torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-14, atol=1e-16)
            torch.testing.assert_close(dot.state[a]["momentum_buffer"], sgd.state[b]["momentum_buffer"],
                                       rtol=1e-14, atol=1e-16)


# ---- (c) state_dict round trip ------------------------------------------------------------------------
def test_a_state_dict_saved_mid_run_continues_identically() -> None:
    params = [nn.Parameter(t) for t in initial_params()]
    opt = make_dot(params)
    for step in range(4):
        drive(opt, params, step)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    saved = opt.state_dict()["state"]
    assert all({"momentum_buffer", "momentum_kd_buffer"} <= set(s) for s in saved.values())
    resumed_params = [nn.Parameter(p.detach().clone()) for p in params]
    resumed = make_dot(resumed_params, delta=0.0)  # hyperparameters come back with the state
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert [g["delta"] for g in resumed.param_groups] == [DELTA, DELTA]
    for step in range(4, 8):
        drive(opt, params, step)
        drive(resumed, resumed_params, step)
    for a, b in zip(params, resumed_params):
        assert torch.equal(a, b)
        for key in ("momentum_buffer", "momentum_kd_buffer"):
            assert torch.equal(opt.state[a][key], resumed.state[b][key])


# ---- (d) one step of the Trainer --------------------------------------------------------------------
NUM_CLASSES = 10


def make_trainer(tmp: Path):
    return tiny_trainer(tmp, {"name": "kd", "gamma": 0.1, "alpha": 0.9, "temperature": 4.0}, 1, "optim=dot",
                        f"optim.delta={DELTA}", "optim.weight_decay=5e-4",
                        data=random_splits(48, NUM_CLASSES, 7, 16))


def test_one_trainer_step_with_dot_moves_by_both_gradients(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path)
    phase = trainer.plan[-1]
    optimizer = trainer.prepare_phase(phase)
    assert isinstance(optimizer, DOT) and optimizer.param_groups[0]["delta"] == DELTA
    batch = next(iter(trainer.train_loader.epoch(1)))
    student, teacher = copy.deepcopy(trainer.student), copy.deepcopy(trainer.teacher)
    logits = student(batch.images)
    with torch.no_grad():
        t_logits = teacher(batch.images)
    before = [p.detach().clone() for p in student.parameters()]
    g_task = torch.autograd.grad(0.1 * nnf.cross_entropy(logits, batch.labels), list(student.parameters()),
                                 retain_graph=True)
    g_dist = torch.autograd.grad(0.9 * F.kd(logits, t_logits, 4.0), list(student.parameters()))

    trainer.train_step(batch, phase, 1, optimizer)
    lr, wd = 0.01, 5e-4
    for p, theta, gt, gd in zip(trainer.student.parameters(), before, g_task, g_dist):
        # first step: both buffers start at their gradients
        torch.testing.assert_close(optimizer.state[p]["momentum_buffer"], gt + wd * theta, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(optimizer.state[p]["momentum_kd_buffer"], gd, rtol=1e-4, atol=1e-7)
        # atol: the float32 rounding of parameters of size about 1 (the buffers above check wd * theta sharply)
        torch.testing.assert_close(p.detach() - theta, -lr * (gt + wd * theta) - lr * gd, rtol=1e-4, atol=1.5e-7)
    trainer.step.remove_hooks()


# ---- (e) the config path ----------------------------------------------------------------------------
CPU = Runtime(torch.device("cpu"), "fp32", False, compile=False)


def optimizer_of(compose, overrides: list[str]) -> torch.optim.Optimizer:
    """The optimizer a run of the composed config makes (its options checked first, as the job does)."""
    job = load_job(compose("train_student", overrides), "train_student")
    return make_optimizer([nn.Parameter(torch.zeros(2))], base_lr(job, CPU), job.optim, CPU.device)


def test_optim_dot_composes_into_dot(compose) -> None:
    dot = optimizer_of(compose, ["optim=dot"])
    assert isinstance(dot, DOT)
    group = dot.param_groups[0]
    assert (group["delta"], group["momentum"], group["weight_decay"], group["lr"]) == (0.075, 0.9, 5e-4, 0.05)
    assert "dot" in OPTIMIZERS.names()
    plain = optimizer_of(compose, [])
    assert type(plain) is torch.optim.SGD and not plain.param_groups[0]["nesterov"]


@pytest.mark.parametrize("overrides, words", [
    (["optim=dot", "optim.delta=-1"], ["optim.delta=-1", ">= 0"]),
    (["optim=dot", "optim.delta=0.95"], ["optim.delta=0.95", "optim.momentum=0.9"]),
    (["optim=dot", "optim.nesterov=true"], ["optim.nesterov=true", "optim=dot"]),
    (["optim=dot", "optim.implementation=foreach"], ["optim.implementation=foreach", "auto or loop"]),
    (["+optim.delta=0.1"], ["optim.delta", "optim=dot", "optim=sgd"]),
])
def test_a_bad_dot_setting_is_a_one_line_user_error(compose, overrides, words) -> None:
    with pytest.raises(UserError) as err:
        optimizer_of(compose, overrides)
    message = str(err.value)
    assert "\n" not in message and all(w in message for w in words), message


def test_a_tiny_distillation_run_with_optim_dot(tmp_path: Path, compose) -> None:
    """In process, as ``train_student.py distill=fitnet optim=dot`` runs it: the regressor gets only
    distillation gradients, the student both; both buffers reach the checkpoint."""
    teachers = tmp_path / "teachers"
    teachers.mkdir()
    torch.save({"arch": "resnet8", "model": build_model("resnet8").state_dict()}, teachers / "resnet8.pt")
    overrides = ["teacher=resnet8", "student=resnet8", "distill=fitnet", "optim=dot",
                 *tiny_overrides(tmp_path, train_size=100, test_size=100)]
    final = distill(compose("train_student", overrides), tmp_path / "run")
    assert final is not None and final["train_loss"] == final["train_loss"]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "finished"
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["optimizer"]["state"]
    keys = [set(s) for s in state.values()]
    assert {"momentum_buffer", "momentum_kd_buffer"} in keys  # the student's parameters
    assert {"momentum_kd_buffer"} in keys  # the regressor's


def test_teacher_training_with_optim_dot_has_only_task_gradients(tmp_path: Path, compose) -> None:
    """CE alone: the distillation part is a constant with no graph, so DOT gets task gradients only
    and every parameter keeps one buffer (it ran SGD with momentum 0.9)."""
    from distiller.jobs.train import train_network

    overrides = ["model=resnet8", "optim=dot", *tiny_overrides(tmp_path, train_size=100, test_size=100)]
    final = train_network(compose("train_teacher", overrides), tmp_path / "run")
    assert final is not None and final["train_loss"] == final["train_loss"]
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["optimizer"]["state"]
    assert state and all(set(s) == {"momentum_buffer"} for s in state.values())
