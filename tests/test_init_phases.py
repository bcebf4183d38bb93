"""The two-stage and connector methods (ab, ft, fsp, ofd, reviewkd, kdsvd) on real zoo pairs.

Each method is built from probed shapes as the engine does. That each phase's loss can be
lowered is checked in float64 with BatchNorm fixed to the batch's statistics (a deterministic,
smooth function of the weights): its gradient is finite, non-zero, reaches the phase's helpers
and the student and nothing outside the phase, and one backtracked gradient step satisfies the
Armijo condition (``helpers.assert_gradient_step_descends``), so the check holds for a
mathematical reason on every CPU; the momentum-SGD training itself is checked, averaged over
seeds and many steps, by the slow tests in test_training_descent.py.
Expected values are computed independently: the AB and OFD
stage weighting by explicit loops over the published formulas, the OFD BatchNorms by
naming the module the reference (mdistiller's ``get_bn_before_relu``) uses, the trained
parameter sets from parameter names, the ReviewKD output shapes from the teacher's features.
The pure loss functions are tested in test_functional.py.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as TF
from helpers import assert_gradient_step_descends, distill_node, fix_batch_statistics, objective_of, seed, tiny_trainer
from torch import nn

from common.errors import UserError
from datasets.batch import Batch
from distiller import functional as F
from distiller.features import EMBEDDING, STAGES, STAGES_PREACT, STEM, Features, forward_features, probe_shapes
from distiller.methods import METHODS, TermContext
from distiller.methods.base import BuildContext, DistillMethod
from distiller.methods.ofd import find_preact_batchnorms
from models import build_model

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CROSS_FAMILY = [("resnet32x4", "resnet8x4"), ("wrn_40_2", "wrn_16_2"), ("vgg13", "MobileNetV2")]
SAME_WIDTH = [("resnet32x4", "resnet8x4"), ("resnet56", "resnet20"), ("vgg13", "vgg8")]
# RepDistiller's get_feat_modules() per family: what the AB/FSP initialisation phases train
FEAT_MODULES = {
    "resnet8x4": ("conv1", "bn1", "layer1", "layer2", "layer3"),
    "resnet20": ("conv1", "bn1", "layer1", "layer2", "layer3"),
    "ResNet18": ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4"),
    "wrn_16_2": ("conv1", "block1", "block2", "block3"),  # not the final bn1 (stage 3's pre-activation)
    "vgg8": ("block0", "block1", "block2", "block3", "block4"),
    "MobileNetV2": ("conv1", "blocks"),  # not conv2 (the 1x1 to 1280)
    "ShuffleV1": ("conv1", "bn1", "layer1", "layer2", "layer3"),
    "ShuffleV2": ("conv1", "bn1", "layer1", "layer2", "layer3"),  # not conv2/bn2
}
B = 4


# --------------------------------------------------------------------------- a small engine
_TEACHERS: dict[str, nn.Module] = {}


def _teacher(arch: str) -> nn.Module:
    """A frozen eval-mode teacher with random BN affine parameters (non-trivial OFD margins) and
    running statistics calibrated on random images, so its eval-mode features have a trained
    network's scale instead of the exploding activations of an uncalibrated deep ResNet."""
    if arch not in _TEACHERS:
        torch.manual_seed(seed(123))
        model = build_model(arch)
        bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        with torch.no_grad():
            for bn in bns:
                bn.weight.normal_(1.0, 0.3)
                bn.bias.normal_(0.0, 0.5)
                bn.reset_running_stats()
                bn.momentum = None  # cumulative average over the calibration batches
            model.train()
            for _ in range(2):
                model(torch.randn(8, 3, 32, 32))
        for bn in bns:
            bn.momentum = 0.1
        _TEACHERS[arch] = model.eval().requires_grad_(False)
    return _TEACHERS[arch]


def _features(model: nn.Module, x: torch.Tensor, kinds: frozenset) -> Features:
    """Only the kinds the method tapped (so a method reading an untapped feature fails here)."""
    feats, logits = forward_features(model, x, preact=STAGES_PREACT in kinds)
    return Features(logits=logits, stem=feats[0] if STEM in kinds else None,
                    stages=list(feats[1:-1]) if kinds & {STAGES, STAGES_PREACT} else [],
                    embedding=feats[-1] if EMBEDDING in kinds else None)


class Run:
    """Teacher, student and a built method for one pair, with a fixed batch."""

    def __init__(self, method: str, teacher: str, student: str, **kwargs) -> None:
        self.teacher = _teacher(teacher)
        torch.manual_seed(seed(0))
        self.student = build_model(student).train()
        self.method: DistillMethod = METHODS.get(method)(**kwargs)
        s_kinds, t_kinds = self.method.student_features, self.method.teacher_features
        s_shapes = probe_shapes(self.student, preact=STAGES_PREACT in s_kinds)
        t_shapes = probe_shapes(self.teacher, preact=STAGES_PREACT in t_kinds)
        as_features = lambda shapes, kinds: Features(
            logits=torch.Size([2, 100]), stem=shapes[0] if STEM in kinds else None,
            stages=list(shapes[1:-1]) if kinds & {STAGES, STAGES_PREACT} else [],
            embedding=shapes[-1] if EMBEDDING in kinds else None)
        ctx = BuildContext(num_classes=100, num_samples=B, train_labels=torch.arange(B), device=torch.device("cpu"),
                           student=self.student, teacher=self.teacher)
        self.method.build(as_features(s_shapes, s_kinds), as_features(t_shapes, t_kinds), ctx)
        self.method.train()
        self.batch = Batch(torch.randn(B, 3, 32, 32), torch.arange(B), torch.arange(B))
        with torch.no_grad():
            self.t = _features(self.teacher, self.batch.images, t_kinds)

    def s(self) -> Features:
        return _features(self.student, self.batch.images, self.method.student_features)

    def train_only(self, params: list[nn.Parameter]) -> None:
        """As the engine does per phase: gradients on for exactly ``params``."""
        wanted = {id(p) for p in params}
        for module in (self.student, self.method):
            for p in module.parameters():
                p.requires_grad_(id(p) in wanted)
        self.student.train()
        self.method.train()

    def sgd(self, params: list[nn.Parameter], loss_fn, steps: int, lr: float) -> list[float]:
        """``steps`` SGD steps on the fixed batch; the loss before each step, then after the last."""
        self.train_only(params)
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)
        losses = []
        for _ in range(steps):
            loss = loss_fn()
            losses.append(loss.item())
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            losses.append(loss_fn().item())
        return losses

    def double(self) -> Run:
        """Student, helpers, batch and teacher features in float64 (the teacher is not run again)."""
        self.student.double()
        self.method.double()
        self.batch = Batch(self.batch.images.double(), self.batch.labels, self.batch.indices)
        as64 = lambda x: None if x is None else x.double()
        self.t = Features(logits=as64(self.t.logits), stem=as64(self.t.stem),
                          stages=[x.double() for x in self.t.stages], embedding=as64(self.t.embedding))
        return self

    def descend(self, params: list[nn.Parameter], loss_fn, frozen_helpers: tuple[str, ...] = ()) -> tuple[float, float]:
        """The descent check of one phase (see the module docstring), on the float64 run.

        Gradients on for exactly ``params`` as the engine sets them; BatchNorm then fixed to
        this batch's statistics. Every helper (child module of the method with parameters) is
        in ``params`` and receives a gradient, except those named in ``frozen_helpers``, which
        are outside ``params`` and receive none; so does the student where ``params`` holds
        any of its parameters.
        """
        self.train_only(params)
        fix_batch_statistics([self.student, self.method], loss_fn)
        ids = {id(p) for p in params}
        reaches, frozen = {}, []
        student = [p for p in self.student.parameters() if id(p) in ids]
        if student:
            reaches["student"] = student
        for name, child in self.method.named_children():
            own = list(child.parameters())
            if not own:
                continue
            if name in frozen_helpers:
                assert not {id(p) for p in own} & ids, f"frozen helper {name} is trained"
                frozen += own
            else:
                assert {id(p) for p in own} <= ids, f"helper {name} is left out of the phase's parameters"
                reaches[name] = own
        assert set(frozen_helpers) <= {n for n, _ in self.method.named_children()}, frozen_helpers
        return assert_gradient_step_descends(loss_fn, params, frozen=frozen, reaches=reaches)

    def main_params(self) -> list[nn.Parameter]:
        return [*self.student.parameters(), *(p for p in self.method.parameters() if p.requires_grad)]

    def main_loss(self) -> torch.Tensor:
        return sum(self.method(self.s(), self.t, self.batch, TermContext(epoch=1)).values())

    def phase_loss(self, phase) -> torch.Tensor:
        s = self.s() if phase.student_forward else Features()
        return sum(phase.loss(s, self.t, self.batch).values())


# --------------------------------------------------------------------------- every method's loss can be lowered
@pytest.mark.parametrize("pair", CROSS_FAMILY, ids=lambda p: "-".join(p))
@pytest.mark.parametrize("method", ["ab", "ofd", "reviewkd"])
def test_loss_decreases_cross_family(method: str, pair: tuple[str, str]) -> None:
    run = Run(method, *pair).double()
    if method == "ab":  # the AB loss is trained by the init phase
        phase = run.method.phases()[0]
        run.descend(list(phase.parameters(run.student)), lambda: run.phase_loss(phase))
    else:
        run.descend(run.main_params(), run.main_loss)


@pytest.mark.parametrize("pair", CROSS_FAMILY, ids=lambda p: "-".join(p))
def test_ft_paraphraser_then_translator(pair: tuple[str, str]) -> None:
    run = Run("ft", *pair).double()
    phase = run.method.phases()[0]
    assert phase.student_forward is False and phase.lr == 0.01 and phase.epochs == 30
    main = run.main_params()  # the engine plans the main phase's parameters before the init phase runs
    paraphraser = list(run.method.paraphraser.parameters())
    assert {id(p) for p in phase.parameters(run.student)} == {id(p) for p in paraphraser}
    assert not {id(p) for p in paraphraser} & {id(p) for p in main}
    run.train_only(paraphraser)
    assert run.method.paraphraser.training  # trained in its phase
    run.descend(list(phase.parameters(run.student)), lambda: run.phase_loss(phase), frozen_helpers=("translator",))
    before = [p.detach().clone() for p in paraphraser]
    run.train_only(main)
    assert not run.method.paraphraser.training  # frozen outside its phase: eval mode, unchanged, no gradient
    run.descend(main, run.main_loss, frozen_helpers=("paraphraser",))
    assert all(torch.equal(a, p) for a, p in zip(before, paraphraser))
    assert all(p.grad is None for p in paraphraser)


@pytest.mark.parametrize("pair", SAME_WIDTH, ids=lambda p: "-".join(p))
def test_fsp_init_phase_lowers_its_loss(pair: tuple[str, str]) -> None:
    run = Run("fsp", *pair).double()
    phase = run.method.phases()[0]
    run.descend(list(phase.parameters(run.student)), lambda: run.phase_loss(phase))


@pytest.mark.parametrize("pair", [("resnet32x4", "resnet8x4"), ("wrn_40_2", "wrn_16_2"), ("vgg13", "vgg8")],
                         ids=lambda p: "-".join(p))
def test_kdsvd_loss_decreases(pair: tuple[str, str]) -> None:
    run = Run("kdsvd", *pair).double()
    run.descend(run.main_params(), run.main_loss)


# --------------------------------------------------------------------------- init phases train exactly their parameters
def _snapshot(*modules: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{i}.{k}": v.detach().clone() for i, m in enumerate(modules)
            for k, v in [*m.named_parameters(), *m.named_buffers()]}


@pytest.mark.parametrize("method,pair", [("ab", ("resnet32x4", "resnet8x4")), ("ab", ("vgg13", "MobileNetV2")),
                                         ("fsp", ("resnet32x4", "resnet8x4")), ("ft", ("resnet32x4", "resnet8x4"))])
def test_init_phase_trains_exactly_the_named_parameters(method: str, pair: tuple[str, str]) -> None:
    run = Run(method, *pair)
    phase = run.method.phases()[0]
    params = list(phase.parameters(run.student))
    feat = FEAT_MODULES[pair[1]]
    features = {f"s.{n}": p for n, p in run.student.named_parameters() if n.split(".")[0] in feat}
    helpers = dict(run.method.named_parameters())
    expected = {"ab": {**features, **helpers}, "fsp": features,
                "ft": {n: p for n, p in helpers.items() if n.startswith("paraphraser.")}}[method]
    assert {id(p) for p in params} == {id(p) for p in expected.values()} and len(params) == len(expected)
    if method == "ab" and pair[1] == "MobileNetV2":
        assert helpers  # connectors exist for this pair and are trained with the student's feature layers

    everything = {**{f"s.{n}": p for n, p in run.student.named_parameters()}, **helpers}
    before = {n: p.detach().clone() for n, p in everything.items()}
    teacher_before = _snapshot(run.teacher)
    run.sgd(params, lambda: run.phase_loss(phase), 2, 0.01)

    for name, p in everything.items():
        changed = not torch.equal(before[name], p.detach())
        assert changed == (name in expected), f"{method}: {name} changed={changed}"
    assert all(torch.equal(v, teacher_before[k]) for k, v in _snapshot(run.teacher).items())


def test_init_epochs_is_a_constructor_key() -> None:
    for name in ("ab", "ft", "fsp"):
        method = METHODS.get(name)(init_epochs=1)
        assert [p.epochs for p in method.phases()] == [1]
        assert METHODS.get(name)(init_epochs=0).phases() == []
    assert METHODS.get("abound") is METHODS.get("ab") and METHODS.get("factor") is METHODS.get("ft")


# --------------------------------------------------------------------------- AB
def _naive_ab(s: torch.Tensor, t: torch.Tensor, m: float) -> torch.Tensor:
    off = ((s > -m) & (t <= 0)).float() * (s + m) ** 2
    on = ((s <= m) & (t > 0)).float() * (s - m) ** 2
    return (off + on).sum()


def test_ab_weighting_and_connectors() -> None:
    run = Run("ab", "resnet32x4", "resnet8x4", margin=0.5)
    assert all(isinstance(c, nn.Identity) for c in run.method.connectors)  # equal shapes: no connector
    s = run.s()
    n = len(s.stages)
    expected = 0.0
    for i, (fs, ft) in enumerate(zip(s.stages, run.t.stages)):
        expected = expected + 2.0 ** (i - n + 1) * _naive_ab(fs, ft, 0.5)
    expected = expected / B * 3 / 1000
    got = run.method.phases()[0].loss(s, run.t, run.batch)["ab"]
    assert torch.allclose(got, expected, rtol=1e-5)
    assert torch.allclose(run.method(s, run.t, run.batch, TermContext(epoch=1))["ab"], expected, rtol=1e-5)

    cross = Run("ab", "vgg13", "MobileNetV2")
    # stages 16/8/4 px agree (1x1 conv), the student's last is 2 px against the teacher's 4 (transposed conv)
    kinds = [type(c.conv) for c in cross.method.connectors]
    assert kinds == [nn.Conv2d] * 3 + [nn.ConvTranspose2d]
    assert all(c.conv.kernel_size == (1, 1) for c in cross.method.connectors[:3])
    s = cross.s()
    for connector, fs, ft in zip(cross.method.connectors, s.stages, cross.t.stages):
        out = connector(fs)
        assert out.shape == ft.shape
        assert not isinstance(connector, nn.Identity) and (out < 0).any()  # no ReLU at the end


# --------------------------------------------------------------------------- FSP / KDSVD refuse unequal widths
@pytest.mark.parametrize("pair,position", [(("resnet32x4", "ShuffleV1"), "stage1"),
                                           (("wrn_40_2", "wrn_40_1"), "stage1")])
def test_fsp_rejects_unequal_channels_at_build(pair: tuple[str, str], position: str) -> None:
    with pytest.raises(UserError) as err:
        Run("fsp", *pair)
    message = str(err.value)
    assert position in message and "channels" in message
    t_c = probe_shapes(build_model(pair[0]))[1][1]
    s_c = probe_shapes(build_model(pair[1]))[1][1]
    assert str(t_c) in message and str(s_c) in message


def test_kdsvd_rejects_unequal_channels() -> None:
    with pytest.raises(UserError, match="channels"):
        Run("kdsvd", "vgg13", "MobileNetV2")


def test_kdsvd_is_zero_for_identical_features_and_ignores_signs() -> None:
    kdsvd = METHODS.get("kdsvd")()
    torch.manual_seed(seed(1))
    stages = [torch.randn(B, 8, 8, 8), torch.randn(B, 16, 4, 4), torch.randn(B, 32, 4, 4)]
    feats = Features(stages=stages)
    shapes = Features(stages=[f.shape for f in stages])
    ctx = BuildContext(100, B, torch.arange(B), torch.device("cpu"), nn.Identity(), nn.Identity())
    kdsvd.build(shapes, shapes, ctx)
    assert kdsvd(feats, feats, None, TermContext(epoch=1))["kdsvd"].item() == pytest.approx(0.0, abs=1e-6)
    # a global sign flip changes no singular subspace
    flipped = Features(stages=[-f for f in stages])
    assert kdsvd(flipped, feats, None, TermContext(epoch=1))["kdsvd"].item() == pytest.approx(0.0, abs=1e-5)
    other = Features(stages=[torch.randn_like(f) for f in stages])
    assert kdsvd(other, feats, None, TermContext(epoch=1))["kdsvd"].item() > 1e-4
    # degenerate spectra (all-zero positions after a ReLU) must not give non-finite gradients
    dead = [torch.zeros_like(f) for f in stages]
    for f, d in zip(stages, dead):
        d[:, : f.shape[1] // 4] = f[:, : f.shape[1] // 4].relu()
    dead = [d.requires_grad_() for d in dead]
    kdsvd(Features(stages=dead), feats, None, TermContext(epoch=1))["kdsvd"].backward()
    assert all(torch.isfinite(d.grad).all() for d in dead)


# --------------------------------------------------------------------------- OFD
def _reference_bns(arch: str, teacher: nn.Module) -> list[nn.BatchNorm2d]:
    """mdistiller's get_bn_before_relu, written out per architecture."""
    if arch.startswith("resnet"):
        return [teacher.layer1[-1].bn2, teacher.layer2[-1].bn2, teacher.layer3[-1].bn2]
    if arch.startswith("wrn"):
        return [teacher.block2.layer[0].bn1, teacher.block3.layer[0].bn1, teacher.bn1]
    if arch == "MobileNetV2":
        return [teacher.blocks[i][-1].conv[-1] for i in (1, 2, 4, 6)]
    raise KeyError(arch)


@pytest.mark.parametrize("pair", [("resnet32x4", "resnet8x4"), ("wrn_40_2", "wrn_16_2")], ids=lambda p: "-".join(p))
def test_ofd_margins_come_from_the_right_batchnorm(pair: tuple[str, str]) -> None:
    run = Run("ofd", *pair)
    assert type(run.method).teacher_bn_train is True
    bns = _reference_bns(pair[0], run.teacher)
    margins = run.method.margins()
    assert len(margins) == len(bns)
    for margin, bn in zip(margins, bns):
        assert torch.allclose(margin, F.ofd_margin(bn).float())
    assert "margin0" in dict(run.method.named_buffers())


def test_ofd_batchnorm_choice_with_shortcut_batchnorms() -> None:
    """Projection shortcuts (resnet8x4: one block per stage) and BN-output shortcuts (MobileNetV2):
    the residual branch's BN is taken, not the shortcut's."""
    for arch in ("resnet8x4", "MobileNetV2"):
        model = build_model(arch)
        found = [b.module for b in find_preact_batchnorms(model)]
        assert all(a is b for a, b in zip(found, _reference_bns(arch, model), strict=True)), arch
    with pytest.raises(UserError, match="BatchNorm"):
        find_preact_batchnorms(build_model("ShuffleV2"))  # half the channels skip the last BN


def test_ofd_loss_weighting() -> None:
    run = Run("ofd", "vgg13", "MobileNetV2")
    s = run.s()
    n = len(s.stages)
    expected = 0.0
    helpers = zip(run.method.connectors, run.method.margins())
    for i, ((connector, margin), fs, ft) in enumerate(zip(helpers, s.stages, run.t.stages)):
        src = connector(fs)
        tgt = TF.adaptive_avg_pool2d(ft, src.shape[-2:])
        tgt = torch.max(tgt, margin.view(1, -1, 1, 1))
        mask = ((src > tgt) | (tgt > 0)).float()
        expected = expected + ((src - tgt) ** 2 * mask).sum() / B / 2 ** (n - i - 1)
    assert torch.allclose(run.method(s, run.t, run.batch, TermContext(epoch=1))["ofd"], expected, rtol=1e-5)


# --------------------------------------------------------------------------- ReviewKD
@pytest.mark.parametrize("pair", CROSS_FAMILY + [("resnet32x4", "MobileNetV2")], ids=lambda p: "-".join(p))
def test_reviewkd_outputs_have_the_teachers_shapes(pair: tuple[str, str]) -> None:
    run = Run("reviewkd", *pair)
    fused = run.method.fused(run.s())
    n = min(len(run.s().stages), len(run.t.stages))
    expected = [f.shape for f in run.t.stages[len(run.t.stages) - n:]]
    expected.append(torch.Size([B, run.t.embedding.shape[1], 1, 1]))
    assert [f.shape for f in fused] == expected


# --------------------------------------------------------------------------- configs
@pytest.mark.parametrize("name,beta,warmup", [("ab", 0.0, 0), ("ft", 200.0, 0), ("fsp", 0.0, 0), ("ofd", 0.001, 0),
                                              ("reviewkd", 5.0, 20), ("kdsvd", 1.0, 0)])
def test_configs_hold_the_published_weights(name: str, beta: float, warmup: int) -> None:


    # resolved without a pair: the defaults (ReviewKD's beta is per pair, 5.0 where no pair sets it)
    node = distill_node(name)
    assert (node["name"], node["gamma"], node["alpha"], node["beta"], node["warmup_epochs"]) == (name, 1.0, 0.0, beta,
                                                                                                 warmup)
    entry = objective_of(node).entries[0]  # every other key is a constructor argument
    assert type(entry.method) is METHODS.get(name)
    if name in ("ab", "ft", "fsp"):
        assert [p.epochs for p in entry.method.phases()] == [30]


@pytest.mark.parametrize("student", sorted(FEAT_MODULES))
@pytest.mark.parametrize("method", ["ab", "fsp"])
def test_init_phase_trains_the_reference_feature_modules_and_keeps_the_rest_in_eval(method: str, student: str,
                                                                                    tmp_path: Path) -> None:
    """Per family: the phase trains exactly get_feat_modules() (plus AB's connectors); in the engine every
    other student module with parameters is in eval mode during the phase (a WRN's final BN keeps its
    statistics), as RepDistiller's init() does (model_s.eval(); init_modules.train())."""
    from helpers import random_splits


    teacher = student if method == "fsp" else "resnet32x4"  # FSP needs equal channels: self-pairs
    trainer = tiny_trainer(tmp_path, {"name": method, "gamma": 1.0, "alpha": 0.0, "beta": 0.0, "init_epochs": 1}, 1,
                           "dataset.batch_size=8", data=random_splits(16, 100, 3, test_n=8), student=student,
                           teacher=teacher)
    init = trainer.plan[0]
    assert not init.is_main
    trainer.prepare_phase(init)
    feat = FEAT_MODULES[student]
    trained = {id(p) for p in init.parameters}
    for name, p in trainer.student.named_parameters():
        assert (id(p) in trained) == (name.split(".")[0] in feat), name
    for name, m in trainer.student.named_modules():
        if list(m.parameters(recurse=False)):
            assert m.training == (name.split(".")[0] in feat), f"{name} training={m.training}"
    trainer.step.remove_hooks()
