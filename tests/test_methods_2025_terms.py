"""The methods of 2023-2026 through the real objective: each term equals its pinned function called with the
published weights, and the objective weighs it as specified (CE weight, warm-up, per-epoch weights).

Every objective is built from the method's composed config (``Objective.from_config``) and called on fixed
tensors, as a step calls it. The references call :mod:`distiller.functional` directly with the weights
typed here from METHODS_2025_LOGIT.md / METHODS_2025_FEATURE.md, never read from a YAML file or a method.
Float64 inputs: the terms must equal the references to the last bits of float64 rounding.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as nnf
from helpers import distill_node, generator, objective_of, tiny_trainer
from torch import nn

from common.errors import UserError
from datasets.batch import Batch
from distiller import functional as F
from distiller.features import Features, classifier_of
from distiller.methods import BuildContext
from distiller.objective import LossParts, Objective
from models import build_model

B, C, D = 8, 10, 6
Z = F.logit_standardize


def close(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def logits(base: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = generator(base)
    z_s = (3 * torch.randn(B, C, generator=g, dtype=torch.float64)).requires_grad_()
    z_t = (3 * torch.randn(B, C, generator=g, dtype=torch.float64)).requires_grad_()  # must get no gradient
    return z_s, z_t, torch.randint(0, C, (B,), generator=g)


def step(objective: Objective, s: Features, t: Features, y: torch.Tensor, epoch: int) -> LossParts:
    """One call of the objective as a step makes it: CE on the student's logits, each method on its features."""
    batch = Batch(images=torch.zeros(B, 3, 4, 4), labels=y, indices=torch.arange(B))
    return objective(s, t, batch, epoch, {e.label: (s, t) for e in objective.entries})


def context(epochs: int = 240) -> BuildContext:
    return BuildContext(num_classes=C, num_samples=B, train_labels=torch.arange(B) % C, device=torch.device("cpu"),
                        student=nn.Module(), teacher=nn.Module(), epochs=epochs)


# name: (overrides of the distill node, gamma, beta, warm-up epochs, reference term on (z_s, z_t, y))
LOGIT_METHODS = {
    "rld": ({}, 1.0, 1.0, 20, lambda s, t, y: F.rld(s, t, y, alpha=1.0, beta=8.0, temperature=4.0)),
    "rld_ls": ({"logit_standardize": True}, 1.0, 1.0, 20,
               lambda s, t, y: F.rld(Z(s), Z(t), y, alpha=9.0, beta=72.0, temperature=2.0, alpha_temperature=2.0)),
    "rld_bare_config": ({"scd_temperature": 1.0}, 1.0, 1.0, 20,
                        lambda s, t, y: F.rld(s, t, y, alpha=1.0, beta=8.0, temperature=4.0, alpha_temperature=1.0)),
    "luminet": ({}, 2.0, 1.0, 20, lambda s, t, y: 31.0 ** 2 * F.luminet(s, t, temperature=4.0)),
    "skd": ({}, 0.1, 0.9, 0, lambda s, t, y: F.skd(s, t, temperature=4.0, tikhonov=0.1)),
    "abkd": ({}, 1.0, 32.0, 0, lambda s, t, y: F.abkd(s, t, alpha=0.8, beta=0.3, temperature=4.0)),
    "abkd_ls": ({"logit_standardize": True}, 0.1, 9.0, 0,  # ABLSD: T^2 * abkd(Z(z_s), Z(z_t)), T 2
                lambda s, t, y: 2.0 ** 2 * F.abkd(Z(s), Z(t), alpha=0.9, beta=0.3, temperature=2.0)),
    "eakd": ({}, 0.1, 0.9, 0, lambda s, t, y: F.eakd_kd(s, t, temperature=4.0, entropy_temperature=3.0, h_ub=100.0)),
    "eakd_dkd": ({}, 1.0, 1.0, 20, lambda s, t, y: F.eakd_dkd(s, t, y, alpha=1.0, beta=8.0, temperature=4.0,
                                                              entropy_temperature=3.0, h_ub=100.0)),
    "normkd": ({}, 0.1, 0.9, 0, lambda s, t, y: F.normkd(s, t, t_norm=2.0)),
    "normkd_dkd": ({}, 1.0, 1.0, 20, lambda s, t, y: F.normkd_dkd(s, t, y, alpha=1.0, beta=8.0, t_norm=2.0)),
}


@pytest.mark.parametrize("case", sorted(LOGIT_METHODS))
def test_logit_method_term_is_the_pinned_function_weighted_as_published(case: str) -> None:
    overrides, gamma, beta, warmup, reference = LOGIT_METHODS[case]
    name = case.removesuffix("_ls").removesuffix("_bare_config")
    objective = objective_of(distill_node(name, **overrides))
    z_s, z_t, y = logits()
    for epoch in (1, 10, 20, 240):
        out = step(objective, Features(logits=z_s), Features(logits=z_t), y, epoch)
        term = reference(z_s, z_t, y)
        close(out.terms[name], term)
        ramp = min(epoch / warmup, 1.0) if warmup else 1.0  # DKD's linear warm-up, epochs from 1
        assert objective.entries[0].weight(epoch) == pytest.approx(beta * ramp, rel=1e-15)
        ce = nnf.cross_entropy(z_s.float(), y)
        torch.testing.assert_close(out.total.double(), gamma * ce.double() + beta * ramp * term, rtol=1e-6, atol=0)
    out.total.backward()
    assert z_s.grad is not None and z_s.grad.abs().sum() > 0
    assert z_t.grad is None  # the teacher's logits carry no gradient


# ---- features: SDD and CAT-KD read the pre-pool map and the classifier of both networks -------------------

def network_features(base: int, hw: int = 4, requires_grad: bool = True) -> Features:
    """A network's pre-pool map [B, D, hw, hw], classifier (weight, bias) and its logits (pool, then Linear)."""
    g = generator(base)
    a = torch.randn(B, D, hw, hw, generator=g, dtype=torch.float64).relu().requires_grad_(requires_grad)
    w = nn.Parameter(torch.randn(C, D, generator=g, dtype=torch.float64), requires_grad=requires_grad)
    b = nn.Parameter(torch.randn(C, generator=g, dtype=torch.float64), requires_grad=requires_grad)
    return Features(logits=nnf.linear(a.mean(dim=(2, 3)), w, b), pool_input=a, classifier=(w, b))


def regions(f: Features, scales: tuple[int, ...]) -> torch.Tensor:
    return F.sdd_region_logits(f.pool_input, *f.classifier, scales=scales)


FEATURE_METHODS = {  # name: (pair, gamma, beta, warm-up, reference term on (student, teacher, y))
    "sdd_kd": (None, 0.1, 0.9, 0, lambda s, t, y: F.sdd_kd(regions(s, (1, 2, 4)), regions(t, (1, 2, 4)), y, 4.0)),
    "sdd_dkd": (None, 1.0, 1.0, 20, lambda s, t, y: F.sdd_dkd(regions(s, (1, 2, 4)), regions(t, (1, 2, 4)), y,
                                                              alpha=1.0, beta=8.0, temperature=4.0)),
    "sdd_nkd": (None, 1.0, 1.0, 20, lambda s, t, y: F.sdd_nkd(regions(s, (1, 2, 4)), regions(t, (1, 2, 4)), y,
                                                              temperature=4.0, gamma=8.0)),
    # vgg13 -> vgg8: scales [1, 2], DKD.BETA 6 (the SDD authors' configs)
    "sdd_dkd@vgg13-vgg8": (("vgg13", "vgg8"), 1.0, 1.0, 20, lambda s, t, y: F.sdd_dkd(
        regions(s, (1, 2)), regions(t, (1, 2)), y, alpha=1.0, beta=6.0, temperature=4.0)),
    "cat_kd": (None, 1.0, 15.0, 0, lambda s, t, y: F.cat_kd(F.class_activation_maps(s.pool_input, s.classifier[0]),
                                                            F.class_activation_maps(t.pool_input, t.classifier[0]),
                                                            resolution=2, normalize=False)),
    # resnet32x4 -> ShuffleV1: weight 600, r 4, normalised
    "cat_kd@resnet32x4-ShuffleV1": (("resnet32x4", "ShuffleV1"), 1.0, 600.0, 0, lambda s, t, y: F.cat_kd(
        F.class_activation_maps(s.pool_input, s.classifier[0]),
        F.class_activation_maps(t.pool_input, t.classifier[0]), resolution=4, normalize=True)),
}


def node_for(name: str, pair: tuple[str, str] | None) -> dict:
    """The composed ``distill=<name>`` node, with the settings of ``pair`` in place where one is given (what
    :func:`distiller.config.pairs.apply_pair_settings` does for a run with that teacher and student)."""
    import copy

    from omegaconf import OmegaConf, open_dict

    from distiller.config.compose import compose
    from distiller.config.pairs import pair_settings

    if pair is None:
        return distill_node(name)
    cfg = copy.deepcopy(compose("train_student", [f"distill={name}"]))
    with open_dict(cfg):
        cfg.pair = pair_settings(*pair)
    return OmegaConf.to_container(cfg.distill, resolve=True)


@pytest.mark.parametrize("case", sorted(FEATURE_METHODS))
def test_feature_method_term_is_the_pinned_function_on_both_networks_maps(case: str) -> None:
    name = case.split("@")[0]
    pair, gamma, beta, warmup, reference = FEATURE_METHODS[case]
    objective = objective_of(node_for(name, pair))
    s, t = network_features(1, hw=8), network_features(2, hw=4, requires_grad=False)
    t.pool_input.requires_grad_()  # only to prove that no gradient reaches the teacher's map
    y = torch.randint(0, C, (B,), generator=generator(3))
    out = step(objective, s, t, y, epoch=10)
    close(out.terms[name], reference(s, t, y))
    ramp = min(10 / warmup, 1.0) if warmup else 1.0
    assert objective.entries[0].weight(10) == pytest.approx(beta * ramp, rel=1e-15)
    ce = nnf.cross_entropy(s.logits.float(), y).double()
    torch.testing.assert_close(out.total.double(), gamma * ce + beta * ramp * out.terms[name], rtol=1e-6, atol=0)
    torch.autograd.backward(out.terms[name])
    weight, bias = s.classifier
    assert weight.grad.abs().sum() > 0 and s.pool_input.grad.abs().sum() > 0
    # SDD's regions carry the bias (gradient reaches it); CAT-KD's maps do not use it
    assert (bias.grad is None) == (name == "cat_kd")
    assert t.pool_input.grad is None


def test_cat_kd_can_train_the_student_with_a_zero_frozen_classifier_bias(tmp_path) -> None:
    """``cam_student_no_bias``: the bias is zero, left out of the main phase, and stays zero after a step;
    the checkpointed layout is the model's usual one (the bias is still a parameter)."""
    trainer = tiny_trainer(tmp_path, distill_node("cat_kd", cam_student_no_bias=True))
    fc = classifier_of(trainer.student)
    phase = trainer.plan[-1]
    assert torch.count_nonzero(fc.bias) == 0 and not fc.bias.requires_grad
    assert id(fc.bias) not in {id(p) for p in phase.parameters} and id(fc.weight) in {id(p) for p in phase.parameters}
    before = fc.weight.detach().clone()
    optimizer = trainer.prepare_phase(phase)
    batch = next(iter(trainer.train_loader.epoch(1)))
    out = trainer.train_step(batch, phase, 1, optimizer)
    assert torch.isfinite(out.terms["cat_kd"]) and out.terms["cat_kd"] > 0
    assert torch.count_nonzero(fc.bias) == 0 and not torch.equal(fc.weight, before)
    assert any(v.data_ptr() == fc.bias.data_ptr() for v in trainer.student.state_dict().values())
    trainer.step.remove_hooks()
    # off by default: the student keeps its bias, and it trains
    student = build_model("resnet8", num_classes=C)
    bias = classifier_of(student).bias.detach().clone()
    (method,) = objective_of(distill_node("cat_kd")).methods.values()
    shapes = Features(pool_input=torch.Size([2, 64, 8, 8]), classifier=(torch.Size([C, 64]), torch.Size([C])))
    method.build(shapes, shapes, dataclasses.replace(context(), student=student))
    assert classifier_of(student).bias.requires_grad and torch.equal(classifier_of(student).bias, bias)


# ---- WKD: the per-epoch weights and the cost matrix ------------------------------------------------------

def wkd_decay(epoch: int, start: int = 150, epochs: int = 240) -> float:
    """METHODS_2025: 1 up to epoch 150, then 0.5 (1 + cos(pi (e - 150) / (240 - 150))), epochs from 1."""
    return 1.0 if epoch <= start else 0.5 * (1.0 + math.cos(math.pi * (epoch - start) / (epochs - start)))


def test_wkd_l_term_weights_only_the_wasserstein_part_by_the_cosine_decay() -> None:
    objective = objective_of(distill_node("wkd_l"))
    (method,) = objective.methods.values()
    method.build(Features(), Features(), context())
    g = generator(4)
    dist = torch.rand(C, C, generator=g, dtype=torch.float64)
    method.cost.copy_(1.0 - torch.exp(-((dist + dist.t()) / 2).fill_diagonal_(0)))
    cost = method.cost.clone()
    z_s, z_t, y = logits(5)
    for epoch, want_gamma in ((1, 600.0), (150, 600.0), (151, 600.0 * wkd_decay(151)), (195, 300.0), (240, 0.0)):
        out = step(objective, Features(logits=z_s), Features(logits=z_t), y, epoch)
        assert objective.entries[0].weight(epoch) == 1.0  # the decay is inside the term, on the WD part alone
        close(out.terms["wkd_l"], F.wkd_logit(z_s, z_t, y, cost, temperature=8.0, gamma=want_gamma,
                                              sinkhorn_lambda=0.05, sinkhorn_iter=10))
    # at the last epoch only the target term is left, with weight 1: -mean_i p_t[y_i] log p_s[y_i]
    target = -(z_t.softmax(1).gather(1, y[:, None]) * z_s.log_softmax(1).gather(1, y[:, None])).mean()
    close(out.terms["wkd_l"], target)
    out.total.backward()
    assert z_t.grad is None
    method.on_epoch_start(195)
    assert method.scalars() == {"wd_weight": pytest.approx(300.0)}


@pytest.mark.parametrize("grid, side, fix", [
    (2, 2, "lower distill.spatial_grid"),  # a 2x2 grid of a 2x2 map: 1 pixel per cell; grid 1 fits
    (1, 1, "no grid fits: give the teacher larger maps"),  # grid 1 already: lowering it is no advice
])
def test_wkd_f_on_a_teacher_map_too_small_says_what_can_fix_it(grid: int, side: int, fix: str) -> None:
    method = objective_of({**distill_node("wkd_f"), "spatial_grid": grid}).entries[0].method
    with pytest.raises(UserError, match=f"the teacher's last map is {side}x{side}, too small for a {grid}x{grid} "
                                        f"grid .*; {fix}"):
        method.build(Features(stages=[torch.Size([B, 4, 8, 8])]), Features(stages=[torch.Size([B, 5, side, side])]),
                     context(epochs=240))


def test_wkd_f_weight_decays_by_a_cosine_after_epoch_150_and_the_term_is_the_pinned_function() -> None:
    objective = objective_of(distill_node("wkd_f"))
    (method,) = objective.methods.values()
    s_map = torch.randn(B, 4, 8, 8, generator=generator(6), dtype=torch.float64).requires_grad_()
    t_map = torch.randn(B, 5, 4, 4, generator=generator(7), dtype=torch.float64)
    method.build(Features(stages=[s_map.shape]), Features(stages=[t_map.shape]), context(epochs=240))
    method.double()
    for epoch in (1, 150, 151, 200, 240):
        assert objective.entries[0].weight(epoch) == pytest.approx(0.08 * wkd_decay(epoch), abs=1e-15)
    z_s, z_t, y = logits(8)
    out = step(objective, Features(logits=z_s, stages=[s_map]), Features(logits=z_t, stages=[t_map]), y, 160)
    # the student's map through the method's projector (conv 3x3 stride 2, BN, ReLU), then the pinned function
    close(out.terms["wkd_f"], F.wkd_feature(method.regressor(s_map), t_map, mean_cov_ratio=4.0, grid=1))
    torch.testing.assert_close(out.total.double(), nnf.cross_entropy(z_s.float(), y).double()
                               + 0.08 * wkd_decay(160) * out.terms["wkd_f"], rtol=1e-6, atol=0)
    # a run shorter than the decay's start never decays
    short = objective_of(distill_node("wkd_f"))
    short.entries[0].method.build(Features(stages=[s_map.shape]), Features(stages=[t_map.shape]), context(epochs=2))
    assert short.entries[0].weight(2) == 0.08


@pytest.mark.parametrize("name, label", [("sdd_kd", "SDDKD"), ("cat_kd", "cat_kd")])
def test_a_classifier_that_does_not_take_the_pre_pool_map_is_one_line_naming_both(name: str, label: str) -> None:
    """timm's MobileNetV3 pools 288 channels into a 1x1 conv head of 1024 before its classifier: its regions cannot
    be classified; SDD and CAT-KD give the same line, which says which key to declare."""
    method = objective_of(distill_node(name)).entries[0].method
    good = Features(pool_input=torch.Size([B, 16, 4, 4]), classifier=(torch.Size([100, 16]), torch.Size([100])))
    bad = Features(pool_input=torch.Size([B, 288, 1, 1]), classifier=(torch.Size([100, 1024]), torch.Size([100])))
    with pytest.raises(UserError) as err:
        method.build(bad, good, context())
    assert str(err.value) == (
        f"{label}: the student's classifier takes 1024 inputs but its pre-pool map has 288 channels (a layer between "
        "them, such as a conv head), so the classifier cannot be applied to its regions: declare "
        "student.features.pool_input=PATH at a map of 1024 channels that the global pool averages, or choose "
        "another method")
