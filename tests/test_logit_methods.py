"""The post-DKD methods: DIST, WTTM, TTM, NKD, CTKD, and the objective's logit switches.

Each method is built from its real config file with ``Objective.from_config`` and called
without a trainer on a tiny batch of logits; its terms are compared with the pinned
functions of ``distiller.functional`` (themselves checked against loops in
test_functional_dist_ls_ctkd_mlkd_wttm_nkd.py). CTKD: its theta trains at beta 0, lambda follows the cosine
schedule, the KD term runs at the learned temperature and theta's gradient is reversed.
The generic seams (a supplied temperature for methods that take one, standardised logits
for methods that declare ``logit_terms``) are checked with toy methods registered for one
test, and with DKD where it opts in.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as nnf
from helpers import distill_node, generator, objective_of, random_splits, seed, tiny_trainer

from common.errors import UserError
from datasets.batch import Batch
from distiller import functional as F
from distiller.config.schema import OBJECTIVE_KEYS
from distiller.engine.runtime import seed_everything
from distiller.features import Features
from distiller.methods import METHODS, DistillMethod, TermContext
from distiller.objective import Objective

DISTILL_DIR = Path(__file__).resolve().parents[1] / "configs" / "distill"
SCHEMA_KEYS = ["name", "method", "gamma", "alpha", "beta", "temperature", "warmup_epochs"]
B, C = 6, 10

# Published settings (METHODS_NEW.md), written out independently of the YAML files:
# (gamma, alpha, beta, warmup_epochs), then the method's own keys.
PUBLISHED = {
    "dist": ((1.0, 0.0, 2.0, 0), {"inter_weight": 1.0, "intra_weight": 1.0, "dist_temperature": 4.0}),
    "wttm": ((1.0, 0.0, 4.0, 0), {"power": 0.2}),
    "ttm": ((1.0, 0.0, 45.0, 0), {"power": 0.1}),
    "nkd": ((1.0, 0.0, 1.0, 0), {"nkd_temperature": 1.0, "nontarget_weight": 1.5}),
    "ctkd": ((0.1, 0.9, 0.0, 0), {"lambda_min": 0.0, "lambda_max": 1.0, "ramp_epochs": 10, "t_min": 1.0,
                                  "t_range": 20.0}),
}


def node(name: str, **overrides) -> dict:
    return {**distill_node(name), **overrides}


def tiny(seed_base: int = 0, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, Batch]:
    g = generator(seed_base)
    zs = (torch.randn(B, C, generator=g) * 3).to(dtype).requires_grad_()
    zt = (torch.randn(B, C, generator=g) * 3).to(dtype)
    y = torch.randint(0, C, (B,), generator=g)
    batch = Batch(images=torch.zeros(B, 3, 4, 4), labels=y, indices=torch.arange(B))
    return zs, zt, batch


def call(objective: Objective, zs: torch.Tensor, zt: torch.Tensor, batch: Batch, epoch: int = 1):
    """One Trainer-free step of the objective on logits alone (every method here reads logits only)."""
    per_method = {e.label: (Features(logits=zs), Features(logits=zt)) for e in objective.entries}
    return objective(Features(logits=zs), Features(logits=zt), batch, epoch, per_method)


# --------------------------------------------------------------------------- configs

@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_config_schema_and_published_settings(name: str) -> None:
    cfg = node(name)
    assert list(cfg)[:len(SCHEMA_KEYS)] == SCHEMA_KEYS
    assert cfg["name"] == name and cfg["method"] == name and name in METHODS
    weights, own = PUBLISHED[name]
    assert (cfg["gamma"], cfg["alpha"], cfg["beta"], cfg["warmup_epochs"]) == weights
    assert cfg["logit_standardize"] is False  # the LS switch, off by default, in every logit method's file
    assert {k: v for k, v in cfg.items() if k not in SCHEMA_KEYS + ["logit_standardize"]} == own
    assert not set(own) & set(OBJECTIVE_KEYS)  # no clash with the objective's reserved keys


# --------------------------------------------------------------------------- terms

EXPECTED = {  # name -> (term name, the pinned function at the config's values)
    "dist": ("dist", lambda zs, zt, y: F.dist(zs, zt, beta=1.0, gamma=1.0, temperature=4.0)),
    "wttm": ("wttm", lambda zs, zt, y: F.wttm(zs, zt, gamma=0.2, weighted=True)),
    "ttm": ("ttm", lambda zs, zt, y: F.wttm(zs, zt, gamma=0.1, weighted=False)),
    "nkd": ("nkd", lambda zs, zt, y: F.nkd(zs, zt, y, temperature=1.0, gamma=1.5)),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logit_method_terms_equal_the_pinned_function_and_weights_add_up(name: str, dtype: torch.dtype) -> None:
    objective = objective_of(node(name))
    zs, zt, batch = tiny(1, dtype)
    out = call(objective, zs, zt, batch)
    term, fn = EXPECTED[name]
    assert set(out.terms) == {"ce", term}
    assert all(torch.isfinite(v) and v.dtype == torch.float32 for v in out.terms.values())
    torch.testing.assert_close(out.terms[term], fn(zs, zt, batch.labels), rtol=1e-6, atol=1e-7)
    beta = PUBLISHED[name][0][2]
    ce = nnf.cross_entropy(zs.float(), batch.labels)
    torch.testing.assert_close(out.total, ce + beta * out.terms[term], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.total, out.task + out.distill, rtol=1e-6, atol=1e-6)
    out.total.backward()
    assert zs.grad is not None and torch.isfinite(zs.grad.float()).all() and zs.grad.abs().sum() > 0


def test_ttm_is_wttm_unweighted_and_bad_settings_raise() -> None:
    assert issubclass(METHODS.get("ttm"), METHODS.get("wttm"))
    with pytest.raises(UserError, match="power"):
        objective_of(node("wttm", power=0.0))
    with pytest.raises(UserError, match="nkd_temperature"):
        objective_of(node("nkd", nkd_temperature=-1.0))
    with pytest.raises(UserError, match="ramp_epochs"):
        objective_of(node("ctkd", ramp_epochs=0))


# --------------------------------------------------------------------------- CTKD

@pytest.mark.parametrize("settings, says", [
    # a value that is no finite number is refused for every method key declared a float (methods/key_types.py)
    ({"lambda_max": math.inf}, r"distill.lambda_max=inf is not a finite number \(method 'ctkd'\)"),
    ({"lambda_min": math.nan}, r"distill.lambda_min=nan is not a finite number \(method 'ctkd'\)"),
    ({"lambda_min": 2.0, "lambda_max": 1.0}, r"method 'ctkd': distill.lambda_min=2.0 must not exceed "
                                             r"distill.lambda_max=1.0"),
])
def test_ctkd_refuses_an_unusable_lambda_range_when_built(settings: dict, says: str) -> None:
    """Refused at construction in one line naming the keys, not at the first step as a non-finite loss."""
    with pytest.raises(UserError, match=says) as err:
        objective_of(node("ctkd", **settings))
    assert "\n" not in str(err.value) and "optim.lr" not in str(err.value)
    objective_of(node("ctkd", lambda_min=0.5, lambda_max=0.5))  # a constant lambda is fine


def test_ctkd_theta_trains_at_beta_zero_and_starts_at_the_published_temperature() -> None:
    objective = objective_of(node("ctkd"))
    method = objective.methods["ctkd"]
    assert [e.label for e in objective.active()] == ["ctkd"] and objective.entries[0].beta == 0
    params = objective.main_parameters()
    assert len(params) == 1 and params[0] is method.theta and method.theta.item() == 1.0
    assert float(objective.temperature().detach()) == pytest.approx(1 + 20 / (1 + math.exp(-1)), rel=1e-6)


def test_ctkd_lambda_per_epoch_is_the_cosine_schedule_and_is_recorded() -> None:
    method = objective_of(node("ctkd")).methods["ctkd"]
    for epoch in range(1, 14):
        method.on_epoch_start(epoch)
        assert method.lambda_ == F.ctkd_lambda(epoch)
        recorded = method.scalars()
        assert recorded["lambda"] == F.ctkd_lambda(epoch)
        assert recorded["temperature"] == pytest.approx(1 + 20 / (1 + math.exp(-method.theta.item())), rel=1e-6)
    method.on_epoch_start(5)
    assert method.lambda_ == pytest.approx(0.5, rel=1e-15)


@pytest.mark.parametrize("epoch", [1, 5, 12])
def test_ctkd_kd_term_runs_at_the_learned_temperature_and_theta_ascends(epoch: int) -> None:
    """In float64 throughout: d(loss)/dT sums terms that nearly cancel, so float32 would leave ~1e-4
    relative rounding in theta's gradient, depending on the batch."""
    objective = objective_of(node("ctkd")).double()
    method = objective.methods["ctkd"]
    with torch.no_grad():
        method.theta.fill_(0.3)
    method.on_epoch_start(epoch)
    zs, zt, batch = tiny(2, dtype=torch.float64)
    out = call(objective, zs, zt, batch, epoch)
    t_value = 1 + 20 / (1 + math.exp(-0.3))
    assert set(out.terms) == {"ce", "kd"}
    torch.testing.assert_close(out.terms["kd"].detach(), F.kd(zs.detach(), zt, t_value), rtol=1e-10, atol=1e-12)
    out.total.backward()
    # independent: the same loss through an identity (no reversal)
    theta = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    plain = 0.9 * F.kd(zs.detach(), zt, 1 + 20 * torch.sigmoid(theta))
    (g_plain,) = torch.autograd.grad(plain, theta)
    lam = F.ctkd_lambda(epoch)
    assert method.theta.grad.item() == pytest.approx(-lam * g_plain.item(), rel=1e-9, abs=1e-12)
    assert torch.isfinite(zs.grad).all()


def test_ctkd_with_logit_standardization_runs_kd_ls_at_the_learned_temperature() -> None:
    objective = objective_of(node("ctkd", logit_standardize=True))
    zs, zt, batch = tiny(3)
    out = call(objective, zs, zt, batch)
    t_value = float(objective.temperature().detach())
    want = F.kd(F.logit_standardize(zs.detach()), F.logit_standardize(zt), t_value)
    torch.testing.assert_close(out.terms["kd"].detach(), want, rtol=1e-5, atol=1e-6)


def test_ctkd_trains_theta_and_records_temperature_and_lambda_each_epoch(tmp_path: Path) -> None:
    seed_everything(seed(0))
    trainer = tiny_trainer(tmp_path, node("ctkd"), 2, "optim.lr=0.05", data=random_splits(32, 10, 7, test_n=16))
    method = trainer.objective.methods["ctkd"]
    state = trainer.fit()
    assert [r["ctkd/lambda"] for r in state.history] == [F.ctkd_lambda(1), F.ctkd_lambda(2)]
    assert method.theta.item() != 1.0
    assert state.history[-1]["ctkd/temperature"] == pytest.approx(
        1 + 20 / (1 + math.exp(-method.theta.item())), rel=1e-6)
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert last["objective"]["methods.ctkd.theta"].item() == pytest.approx(method.theta.item(), rel=0, abs=0)


# --------------------------------------------------------------------------- generic seams

class TemperatureToy(DistillMethod):
    """Toy: a logit method that takes the supplied temperature (None when nobody supplies one)."""

    takes_temperature = True

    def forward(self, student: Features, teacher: Features, batch, ctx: TermContext) -> dict[str, torch.Tensor]:
        self.seen = ctx.supplied_temperature
        t = 4.0 if self.seen is None else self.seen
        return {"toy_kd": F.kd(student.logits, teacher.logits, t)}


class PlainToy(DistillMethod):
    """Toy: a logit method that takes no temperature and does not declare logit terms."""

    def forward(self, student: Features, teacher: Features, batch, ctx: TermContext) -> dict[str, torch.Tensor]:
        self.seen = (student.logits, teacher.logits)
        return {"plain": F.kd(student.logits, teacher.logits, 4.0)}


class LogitToy(PlainToy):
    """Toy: the same, declaring ``logit_terms``."""

    logit_terms = True


def test_a_supplied_temperature_reaches_methods_that_take_one(register) -> None:
    register(METHODS, "temperature_toy", TemperatureToy)
    register(METHODS, "plain_toy", PlainToy)
    toy = {"name": "temperature_toy", "beta": 1.0}
    plain = {"name": "plain_toy", "beta": 1.0}
    alone = objective_of(toy, combine={"plain": plain})
    zs, zt, batch = tiny(4)
    call(alone, zs, zt, batch)
    assert alone.methods["temperature_toy"].seen is None  # nobody supplies one: the method keeps its own
    with_ctkd = objective_of(node("ctkd"), combine={"toy": toy, "plain": plain})
    with_ctkd.methods["ctkd"].on_epoch_start(3)
    out = call(with_ctkd, zs, zt, batch, 3)
    seen = with_ctkd.methods["toy"].seen
    assert isinstance(seen, torch.Tensor) and seen.requires_grad
    assert seen.item() == pytest.approx(1 + 20 / (1 + math.exp(-1)), rel=1e-6)
    torch.testing.assert_close(out.terms["toy_kd"], F.kd(zs, zt, seen.item()), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.terms["plain"], F.kd(zs, zt, 4.0), rtol=1e-6, atol=1e-7)
    # one temperature per step: KD and the method share it, and theta gets both gradients
    out.distill.backward()
    assert with_ctkd.methods["ctkd"].theta.grad is not None


def test_logit_standardize_switch_reaches_kd_and_methods_that_declare_logit_terms(register) -> None:
    register(METHODS, "plain_toy", PlainToy)
    register(METHODS, "logit_toy", LogitToy)
    cfg = {"name": "logit_toy", "gamma": 0.1, "alpha": 0.9, "beta": 1.0, "temperature": 2.0,
           "logit_standardize": True}
    objective = objective_of(cfg, combine={"plain": {"name": "plain_toy", "beta": 1.0}})
    zs, zt, batch = tiny(5, torch.float64)
    out = call(objective, zs, zt, batch)

    def z(x: torch.Tensor) -> torch.Tensor:  # independent: per-row unbiased std, eps outside the root
        x = x.detach()
        return (x - x.mean(1, keepdim=True)) / (x.var(1, keepdim=True, unbiased=True).sqrt() + 1e-7)

    torch.testing.assert_close(out.terms["kd"], F.kd(z(zs), z(zt), 2.0), rtol=1e-10, atol=1e-12)
    s_seen, t_seen = objective.methods["logit_toy"].seen
    torch.testing.assert_close(s_seen.detach(), z(zs), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(t_seen, z(zt), rtol=1e-10, atol=1e-12)
    s_plain, t_plain = objective.methods["plain"].seen
    assert s_plain is zs and t_plain is zt  # a method that does not declare logit terms sees raw logits
    torch.testing.assert_close(out.terms["ce"], nnf.cross_entropy(zs.detach().float(), batch.labels))  # CE raw
    off = objective_of({**cfg, "logit_standardize": False})
    out_off = call(off, zs, zt, batch)
    torch.testing.assert_close(out_off.terms["kd"], F.kd(zs.detach(), zt, 2.0), rtol=1e-10, atol=1e-12)


def test_logit_standardize_is_an_objective_key_and_must_be_a_flag() -> None:
    assert "logit_standardize" in OBJECTIVE_KEYS
    assert objective_of(node("kd")).logit_standardize is False
    assert objective_of(node("kd", logit_standardize=True)).logit_standardize is True
    # the schema reads it as every boolean (yes/on/1 are true), in one place; what is no boolean is refused there
    assert objective_of(node("kd", logit_standardize="yes")).logit_standardize is True
    with pytest.raises(UserError, match="logit_standardize=maybe is not true or false"):
        objective_of(node("kd", logit_standardize="maybe"))


# --------------------------------------------------------------------------- DKD under CTKD and LS
# DKD opts into the seams (its forward takes ``temperature``; it declares ``logit_terms``).

def test_dkd_with_a_kd_term_uses_the_configured_temperature() -> None:
    """distill=dkd distill.alpha=0.5: the KD term runs at distill.temperature (a method attribute named
    ``temperature`` once shadowed the seam and crashed here)."""
    objective = objective_of(node("dkd", alpha=0.5, temperature=3.0, warmup_epochs=0))
    zs, zt, batch = tiny(6)
    out = call(objective, zs, zt, batch, 1)
    torch.testing.assert_close(out.terms["kd"].detach(), F.kd(zs.detach(), zt, 3.0), rtol=1e-5, atol=1e-6)


def test_ctkd_with_dkd_runs_dkd_at_the_learned_temperature() -> None:
    objective = objective_of(node("ctkd", gamma=1.0, alpha=0.0),
                                      combine={"dkd": node("dkd", nckd_weight=2.0, warmup_epochs=0)})
    objective.methods["ctkd"].on_epoch_start(4)
    zs, zt, batch = tiny(6)
    out = call(objective, zs, zt, batch, 4)
    t_value = float(objective.temperature().detach())
    assert t_value != 4.0
    both = out.terms["tckd"] + out.terms["nckd"]
    torch.testing.assert_close(both.detach(), F.dkd(zs.detach(), zt, batch.labels, 1.0, 2.0, t_value),
                               rtol=1e-5, atol=1e-6)
    out.total.backward()
    theta = objective.methods["ctkd"].theta
    assert theta.grad is not None and torch.isfinite(theta.grad) and theta.grad.abs() > 0


def test_dkd_with_logit_standardization_is_dkd_ls() -> None:
    objective = objective_of(node("dkd", logit_standardize=True, dkd_temperature=2.0))
    zs, zt, batch = tiny(7)
    out = call(objective, zs, zt, batch)
    z_s, z_t = F.logit_standardize(zs.detach()), F.logit_standardize(zt)
    torch.testing.assert_close((out.terms["tckd"] + out.terms["nckd"]).detach(),
                               F.dkd(z_s, z_t, batch.labels, 1.0, 8.0, 2.0), rtol=1e-5, atol=1e-6)
