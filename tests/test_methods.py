"""Distillation methods: registration, configs, helpers, training steps, and CRD's memory.

Every method is built from probed shapes of real zoo models for three teacher/student
pairs of different families; on one fixed batch, in float64 with BatchNorm fixed to the
batch's statistics, the gradient of its own term must reach the student and every helper
(and nothing outside the optimizer), and one backtracked gradient step must lower the term
(Armijo condition, ``helpers.assert_gradient_step_descends``), while the teacher stays
untouched. Many-step momentum-SGD training, averaged over seeds, is in test_training_descent.py.
CRD's sampling, scores, normalisers, bank updates, checkpointing and multi-process bank
sync are checked against naive per-sample computations. CPU only, tiny batches.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from helpers import (
    MIN_DECREASE,
    assert_gradient_step_descends,
    distill_node,
    fix_batch_statistics,
    generator,
    objective_of,
    run_ranks,
    seed,
)
from torch import nn

from common.errors import UserError
from datasets.batch import Batch
from distiller import functional as F
from distiller.contrast import ContrastMemory, ContrastSampler, momentum_update
from distiller.engine.plan import plan_phases
from distiller.engine.runtime import Runtime
from distiller.engine.step import build_step
from distiller.features import Features, forward_features, probe_shapes
from distiller.helpers import ConvRegressor, pair_stages
from distiller.methods import METHODS, BuildContext, TermContext
from distiller.methods.crd import CONTRAST_IDX_KEY
from models import build_model

ROOT = Path(__file__).resolve().parents[1]
DISTILL_DIR = ROOT / "configs" / "distill"
SCHEMA_KEYS = ["name", "method", "gamma", "alpha", "beta", "temperature", "warmup_epochs"]
OPTIONAL_OBJECTIVE_KEYS = ["logit_standardize"]  # the objective's too, present in the logit methods' files
PAIRS = [("resnet32x4", "resnet8x4"), ("wrn_40_2", "wrn_16_2"), ("vgg13", "MobileNetV2")]

# Training-set stand-in for CRD: N samples of 8 classes, small K.
N_DATA, N_CLASSES, TEST_K = 128, 8, 64
TRAIN_LABELS = torch.arange(N_DATA) % N_CLASSES
CPU = Runtime(torch.device("cpu"), "fp32", channels_last=False, compile=False)
CTX = TermContext(epoch=1)  # what the objective hands every method with a step (the config's temperature 4)

# Published weights (RECIPES.md), written out independently of the YAML files.
PUBLISHED = {  # name: (gamma, alpha, beta, warmup_epochs)
    "kd": (0.1, 0.9, 0.0, 0), "fitnet": (1.0, 0.0, 100.0, 0), "at": (1.0, 0.0, 1000.0, 0),
    "sp": (1.0, 0.0, 3000.0, 0), "cc": (1.0, 0.0, 0.02, 0), "vid": (1.0, 0.0, 1.0, 0),
    "rkd": (1.0, 0.0, 1.0, 0), "pkt": (1.0, 0.0, 30000.0, 0), "nst": (1.0, 0.0, 50.0, 0),
    "crd": (1.0, 0.0, 0.8, 0), "crd_kd": (1.0, 1.0, 0.8, 0), "dkd": (1.0, 0.0, 1.0, 20),
}
# the methods of that table (crd_kd is a preset of crd); the later ones have tables and files of their own
# (test_logit_methods, test_methods_2025_*, test_init_phases), and every registered method meets the
# registry's contract in test_method_registry
RECIPE_METHODS = [name for name in PUBLISHED if name in METHODS.names()]


# --------------------------------------------------------------------------- helpers

def as_features(feats: list[torch.Tensor], logits: torch.Tensor | None = None) -> Features:
    """``forward_features`` output ``[stem, stage1..L, embedding]`` as a :class:`Features`."""
    return Features(logits=logits, stem=feats[0], stages=list(feats[1:-1]), embedding=feats[-1])


def shapes_of(model: nn.Module) -> Features:
    return as_features(probe_shapes(model, input_size=(2, 3, 32, 32)))


def method_kwargs(name: str, **overrides) -> tuple[dict, dict]:
    """(full resolved config, constructor kwargs) of ``configs/distill/<name>.yaml``."""
    cfg = distill_node(name)
    kwargs = {k: v for k, v in cfg.items() if k not in SCHEMA_KEYS + OPTIONAL_OBJECTIVE_KEYS}
    kwargs.update(overrides)
    return cfg, kwargs


def make_ctx(student: nn.Module, teacher: nn.Module, labels: torch.Tensor = TRAIN_LABELS) -> BuildContext:
    return BuildContext(num_classes=100, num_samples=labels.numel(), train_labels=labels,
                        device=torch.device("cpu"), student=student, teacher=teacher, epochs=240)


def features_double(f: Features) -> Features:
    as64 = lambda x: None if x is None else x.double()
    return Features(logits=as64(f.logits), stem=as64(f.stem), stages=[x.double() for x in f.stages],
                    embedding=as64(f.embedding))


@pytest.fixture(scope="module", params=PAIRS, ids=lambda p: f"{p[0]}-{p[1]}")
def pair(request):
    """A frozen random teacher, a fixed batch, and the teacher's features and shapes."""
    teacher_name, student_name = request.param
    torch.manual_seed(seed(0))
    teacher = build_model(teacher_name).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    images = torch.randn(4, 3, 32, 32)
    indices = torch.tensor([3, 12, 21, 30])
    batch = Batch(images=images, labels=TRAIN_LABELS[indices], indices=indices)
    with torch.no_grad():
        feats, logits = forward_features(teacher, images)
    return dict(teacher=teacher, student_name=student_name, batch=batch, t_feats=as_features(feats, logits),
                t_shapes=shapes_of(teacher))


# --------------------------------------------------------------------------- registry and configs

def test_registry_has_every_method_and_old_cli_aliases():
    for name in RECIPE_METHODS:
        assert name in METHODS
    assert METHODS.canonical("hint") == "fitnet"
    assert METHODS.canonical("attention") == "at"
    assert METHODS.canonical("similarity") == "sp"
    assert METHODS.canonical("correlation") == "cc"
    with pytest.raises(UserError):
        METHODS.get("fitnets_typo")


@pytest.mark.parametrize("name", RECIPE_METHODS)
def test_config_file_schema_and_published_weights(name):
    cfg, kwargs = method_kwargs(name)
    assert list(cfg)[:len(SCHEMA_KEYS)] == SCHEMA_KEYS
    assert cfg["name"] == name and cfg["method"] == name
    assert (cfg["gamma"], cfg["alpha"], cfg["beta"], cfg["warmup_epochs"]) == PUBLISHED[name]
    assert cfg["temperature"] == 4.0
    METHODS.get(cfg["method"])(**kwargs)  # every non-schema key is a constructor argument


def test_method_specific_published_defaults():
    assert method_kwargs("fitnet")[1] == {"hint_layer": 2}
    assert method_kwargs("at")[1] == {"p": 2.0}
    assert method_kwargs("rkd")[1] == {"distance_weight": 25.0, "angle_weight": 50.0}
    assert method_kwargs("vid")[1] == {"init_pred_var": 5.0, "eps": 1e-5}
    assert method_kwargs("cc")[1]["feat_dim"] == 128 and method_kwargs("cc")[1]["variant"] == "benchmark"
    assert method_kwargs("crd")[1] == {"feat_dim": 128, "nce_k": 16384, "nce_t": 0.07, "nce_m": 0.5,
                                       "mode": "exact"}
    assert method_kwargs("dkd")[1] == {"tckd_weight": 1.0, "nckd_weight": 8.0, "dkd_temperature": 4.0}


def test_dkd_temperature_follows_the_kd_temperature_key():
    assert distill_node("dkd", temperature=2.0)["dkd_temperature"] == 2.0


def test_crd_kd_preset_composes_to_crd_with_kd():
    crd, crd_kd = distill_node("crd"), distill_node("crd_kd")
    assert crd_kd["method"] == "crd" and crd_kd["name"] == "crd_kd"
    assert (crd_kd["gamma"], crd_kd["alpha"], crd_kd["beta"]) == PUBLISHED["crd_kd"][:3]
    assert {k: v for k, v in crd_kd.items() if k not in ("name", "alpha")} == \
        {k: v for k, v in crd.items() if k not in ("name", "alpha")}


def test_no_code_hardcodes_cuda():
    """Devices come from the runtime: no ``.cuda(`` in the package, the models, the data sets or the scripts."""
    folders = ("distiller", "models", "datasets", "common", "scripts")
    files = [p for folder in folders for p in (ROOT / folder).rglob("*.py")]
    assert (ROOT / "distiller" / "methods" / "crd.py") in files and (ROOT / "models" / "resnet.py") in files
    assert not [str(p.relative_to(ROOT)) for p in files if ".cuda(" in p.read_text()]


# --------------------------------------------------------------------------- training on real pairs

@pytest.mark.parametrize("name", RECIPE_METHODS)
def test_method_term_decreases_and_teacher_is_untouched(name, pair):
    """Through the public builder (build_step) as a run builds it: the method's own term alone
    (gamma 0, alpha 0, beta 1), a step of it lowers the term, its gradient reaches the student and
    every helper and nothing else, and the teacher is untouched."""
    torch.manual_seed(seed(1))
    teacher = copy.deepcopy(pair["teacher"])  # the step runs it in float64 below: keep the module's own
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    node = {**method_kwargs(name)[0], "gamma": 0.0, "alpha": 0.0, "beta": 1.0, "warmup_epochs": 0}
    if name == "crd":
        node["nce_k"] = TEST_K
    objective = objective_of(node)
    facts = SimpleNamespace(num_classes=100, train_labels=TRAIN_LABELS, image_shape=(3, 32, 32))
    step = build_step(build_model(pair["student_name"]), teacher, objective, facts, CPU)
    step.phase = plan_phases(objective, step.student, epochs=1, lr=0.1)[-1]
    method = objective.methods[name]
    # float64 and BatchNorm fixed to the batch (eval mode: CRD's bank is not updated) make the
    # loss a deterministic function of the weights, well above rounding
    for module in (step.student, objective, teacher):
        module.double()
    min_decrease = MIN_DECREASE
    if name == "crd":
        # CRD's memory scores in float32 whatever the input dtype: exp(<bank, v> / T) with 16-d unit
        # vectors carries up to 16 * 2^-24 / 0.07 = 1.4e-5 relative error, so the step must lower
        # the loss by more than that: 2^-10 (1e-3) of it
        method.memory.float()
        min_decrease = 2.0 ** -10
    batch = pair["batch"]
    extras = {CONTRAST_IDX_KEY: method.sampler(batch.indices)} if name == "crd" else {}  # fixed negatives
    batch = Batch(batch.images.double(), batch.labels, batch.indices, extras)

    def loss() -> torch.Tensor:
        out = step(batch, 1)
        assert out.terms and all(t.dim() == 0 and torch.isfinite(t) for t in out.terms.values())
        if name == "kd":  # the term at the step's temperature (the config's, 4)
            with torch.no_grad():
                t_logits = teacher(batch.images)
            torch.testing.assert_close(out.terms["kd"], F.kd(out.logits, t_logits, node["temperature"]))
        return out.total

    params = list(step.student.parameters()) + list(method.parameters())
    fix_batch_statistics([step.student, objective], loss)
    helpers = {n: list(c.parameters()) for n, c in method.named_children() if list(c.parameters())}
    assert_gradient_step_descends(loss, params, reaches={"student": list(step.student.parameters()), **helpers},
                                  min_decrease=min_decrease)
    step.remove_hooks()
    assert all(torch.equal(v, teacher.state_dict()[k].float()) for k, v in teacher_state.items()
               if v.is_floating_point())
    assert all(p.grad is None for p in teacher.parameters())


# --------------------------------------------------------------------------- FitNet regressor

@pytest.mark.parametrize("s_hw, t_hw, layer", [
    ((8, 8), (8, 8), nn.Conv2d),            # equal
    ((16, 16), (8, 8), nn.Conv2d),          # student 2x teacher: stride 2
    ((4, 4), (8, 8), nn.ConvTranspose2d),   # student 1/2x teacher: transposed, stride 2
    ((16, 16), (4, 4), nn.Conv2d),          # other ratio, larger: valid 13x13 conv (RepDistiller)
    ((3, 3), (8, 8), nn.Conv2d),            # other ratio, smaller: interpolate then conv
    ((8, 6), (4, 3), nn.Conv2d),            # non-square 2x
])
def test_conv_regressor_maps_to_teacher_shape_and_learns(s_hw, t_hw, layer):
    torch.manual_seed(seed(0))
    s_shape, t_shape = torch.Size([2, 6, *s_hw]), torch.Size([2, 10, *t_hw])
    reg = ConvRegressor(s_shape, t_shape)
    assert type(reg.conv) is layer and isinstance(reg.bn, nn.BatchNorm2d) and isinstance(reg.relu, nn.ReLU)
    if s_hw == (16, 16) and t_hw == (8, 8):
        assert reg.conv.stride == (2, 2) and reg.conv.kernel_size == (3, 3)
    if s_hw == t_hw:
        assert reg.conv.kernel_size == (1, 1)  # RepDistiller's ConvReg: kernel 1 + H_s - H_t
    if s_hw == (16, 16) and t_hw == (4, 4):
        assert reg.conv.kernel_size == (13, 13)
    if layer is nn.ConvTranspose2d:
        assert reg.conv.stride == (2, 2) and reg.conv.kernel_size == (4, 4)
    x, target = torch.randn(4, 6, *s_hw), torch.rand(4, 10, *t_hw)
    assert reg(x).shape == (4, 10, *t_hw)
    reg.double()
    x, target = x.double(), target.double()
    loss = lambda: F.hint(reg(x), target)
    fix_batch_statistics([reg], loss)
    assert_gradient_step_descends(loss, list(reg.parameters()), reaches={"conv": list(reg.conv.parameters()),
                                                                         "bn": list(reg.bn.parameters())})


def test_fitnet_hint_layer_choices():
    s = Features(stem=torch.Size([2, 8, 32, 32]), stages=[torch.Size([2, 16, 32, 32]), torch.Size([2, 32, 16, 16])],
                 embedding=torch.Size([2, 32]))
    t = Features(stem=torch.Size([2, 4, 32, 32]), stages=[torch.Size([2, 24, 16, 16]), torch.Size([2, 48, 8, 8])],
                 embedding=torch.Size([2, 48]))
    ctx = make_ctx(nn.Identity(), nn.Identity())
    m = METHODS.get("hint")(hint_layer="stage2")
    m.build(s, t, ctx)
    assert m.hint_index == 2 and m.regressor.conv.out_channels == 48 and m.regressor.relation == "student 2x teacher"
    m0 = METHODS.get("fitnet")(hint_layer=0)
    m0.build(s, t, ctx)
    out = m0(Features(stem=torch.randn(2, 8, 32, 32), stages=[]), Features(stem=torch.randn(2, 4, 32, 32)), None, CTX)
    assert set(out) == {"fitnet"}
    with pytest.raises(UserError):
        METHODS.get("fitnet")(hint_layer=3).build(s, t, ctx)
    with pytest.raises(UserError):
        METHODS.get("fitnet")(hint_layer="pool")


# --------------------------------------------------------------------------- stage pairing

def test_pair_stages_equal_counts_pair_positionally_unequal_pair_the_last():
    assert pair_stages([1, 2, 3], ["a", "b", "c"]) == [(1, "a"), (2, "b"), (3, "c")]
    assert pair_stages([1, 2, 3], ["a", "b", "c", "d"]) == [(1, "b"), (2, "c"), (3, "d")]
    assert pair_stages([1, 2, 3, 4], ["a", "b"]) == [(3, "a"), (4, "b")]
    with pytest.raises(UserError):
        pair_stages([], ["a"])


def test_stage_methods_with_unequal_stage_counts():
    """ResNet50-like teacher (4 stages) and resnet8x4-like student (3): the last three meet."""
    torch.manual_seed(seed(0))
    s_maps = [torch.randn(2, 8, 32, 32), torch.randn(2, 16, 16, 16), torch.randn(2, 32, 8, 8)]
    t_maps = [torch.randn(2, 12, 32, 32), torch.randn(2, 24, 16, 16), torch.randn(2, 48, 8, 8),
              torch.randn(2, 96, 4, 4)]
    s = Features(stages=s_maps, embedding=torch.randn(2, 32))
    t = Features(stages=t_maps, embedding=torch.randn(2, 96))
    shapes = lambda f: Features(stages=[m.shape for m in f.stages], embedding=f.embedding.shape)
    ctx = make_ctx(nn.Identity(), nn.Identity())
    expected_pairs = [(s_maps[0], t_maps[1]), (s_maps[1], t_maps[2]), (s_maps[2], t_maps[3])]

    at = METHODS.get("at")()
    at.build(shapes(s), shapes(t), ctx)
    assert torch.allclose(at(s, t, None, CTX)["at"], sum(F.attention(a, b, 2) for a, b in expected_pairs))
    nst = METHODS.get("nst")()
    nst.build(shapes(s), shapes(t), ctx)
    assert torch.allclose(nst(s, t, None, CTX)["nst"], sum(F.nst(a, b) for a, b in expected_pairs))
    vid = METHODS.get("vid")()
    vid.build(shapes(s), shapes(t), ctx)
    assert [(r.regressor[0].in_channels, r.regressor[-1].out_channels) for r in vid.regressors] == \
        [(8, 24), (16, 48), (32, 96)]
    assert torch.isfinite(vid(s, t, None, CTX)["vid"])


def _synthetic_pair() -> tuple[Features, Features]:
    torch.manual_seed(seed(0))
    s = Features(logits=torch.randn(4, 10), stem=torch.randn(4, 4, 32, 32),
                 stages=[torch.randn(4, 8, 32, 32), torch.randn(4, 16, 16, 16), torch.randn(4, 32, 8, 8)],
                 embedding=torch.randn(4, 32))
    t = Features(logits=torch.randn(4, 10), stem=torch.randn(4, 6, 32, 32),
                 stages=[torch.randn(4, 12, 32, 32), torch.randn(4, 24, 16, 16), torch.randn(4, 48, 8, 8)],
                 embedding=torch.randn(4, 48))
    return s, t


def _shapes(f: Features) -> Features:
    return Features(stem=f.stem.shape, stages=[m.shape for m in f.stages], embedding=f.embedding.shape)


@pytest.mark.parametrize("name", ["fitnet", "at", "sp", "rkd", "pkt", "nst", "cc-benchmark", "cc-gram", "cc-rbf"])
def test_method_reads_the_documented_features(name):
    """Each method's term equals the functional core applied to the features METHODS.md names."""
    s, t = _synthetic_pair()
    name, _, variant = name.partition("-")
    method = METHODS.get(name)(**({"variant": variant} if variant else {}))
    method.build(_shapes(s), _shapes(t), make_ctx(nn.Identity(), nn.Identity()))
    lin = lambda layer, x: x @ layer.linear.weight.t() + layer.linear.bias
    if name == "fitnet":  # hint layer 2 = stage2 of each
        expected = F.hint(method.regressor(s.stages[1]), t.stages[1])
        assert method.regressor.conv.in_channels == 16 and method.regressor.conv.out_channels == 24
    elif name == "at":
        expected = sum(F.attention(a, b, 2) for a, b in zip(s.stages, t.stages))
    elif name == "nst":
        expected = sum(F.nst(a, b) for a, b in zip(s.stages, t.stages))
    elif name == "sp":
        expected = F.similarity(s.stages[-1], t.stages[-1])
    elif name == "rkd":
        expected = F.rkd(s.embedding, t.embedding, 25.0, 50.0)
    elif name == "pkt":
        expected = F.pkt(s.embedding, t.embedding, 1e-7)
    else:
        assert method.embed_s.linear.out_features == 128 and method.embed_t.linear.in_features == 48
        fn = {"benchmark": F.correlation, "gram": F.correlation_gram, "rbf": F.correlation_rbf}[variant]
        expected = fn(lin(method.embed_s, s.embedding), lin(method.embed_t, t.embedding))
    terms = method(s, t, Batch(torch.empty(4), torch.zeros(4), torch.arange(4)), TermContext(epoch=1))
    assert list(terms) == [name]
    assert torch.allclose(terms[name], expected, rtol=1e-5, atol=1e-8)


def test_vid_regressor_structure_and_initial_variance():
    vid = METHODS.get("vid")(init_pred_var=5.0, eps=1e-5)
    vid.build(Features(stages=[torch.Size([2, 8, 8, 8])]), Features(stages=[torch.Size([2, 12, 4, 4])]),
              make_ctx(nn.Identity(), nn.Identity()))
    reg = vid.regressors[0]
    convs = [m for m in reg.regressor if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.bias) for c in convs] == \
        [(8, 12, (1, 1), None), (12, 12, (1, 1), None), (12, 12, (1, 1), None)]
    assert [type(m) for m in reg.regressor] == [nn.Conv2d, nn.ReLU, nn.Conv2d, nn.ReLU, nn.Conv2d]
    var = torch.log1p(torch.exp(reg.log_scale.double())) + 1e-5
    assert torch.allclose(var, torch.full_like(var, 5.0))
    # The 8x8 student map is pooled to the teacher's 4x4 before regression.
    torch.manual_seed(seed(0))
    f_s, f_t = torch.randn(2, 8, 8, 8), torch.randn(2, 12, 4, 4)
    mu = reg.regressor(torch.nn.functional.adaptive_avg_pool2d(f_s, 4))
    naive = (0.5 * ((mu - f_t) ** 2 / 5.0 + math.log(5.0))).mean()
    assert torch.allclose(vid(Features(stages=[f_s]), Features(stages=[f_t]), None, CTX)["vid"], naive, rtol=1e-5)


# --------------------------------------------------------------------------- logits methods

def test_kd_reads_no_features_and_its_term_is_kd_at_the_step_temperature():
    kd = METHODS.get("kd")()
    assert not kd.student_features and not kd.teacher_features and kd.logit_terms
    z_s, z_t = torch.randn(2, 5, generator=generator(3)), torch.randn(2, 5, generator=generator(4))
    terms = kd(Features(logits=z_s), Features(logits=z_t), None, TermContext(epoch=1, temperature=3.0))
    assert set(terms) == {"kd"} and torch.equal(terms["kd"], F.kd(z_s, z_t, 3.0))


def test_dkd_terms_add_up_to_dkd():
    torch.manual_seed(seed(0))
    z_s, z_t, y = torch.randn(6, 10), torch.randn(6, 10), torch.randint(0, 10, (6,))
    dkd = METHODS.get("dkd")(tckd_weight=1.5, nckd_weight=6.0, dkd_temperature=2.0)
    terms = dkd(Features(logits=z_s), Features(logits=z_t), Batch(torch.empty(6), y, torch.arange(6)), CTX)
    assert set(terms) == {"tckd", "nckd"}
    assert torch.allclose(terms["tckd"] + terms["nckd"], F.dkd(z_s, z_t, y, 1.5, 6.0, 2.0))
    assert torch.allclose(terms["nckd"], F.dkd(z_s, z_t, y, 0.0, 6.0, 2.0))


# --------------------------------------------------------------------------- CRD

def make_crd(labels: torch.Tensor, k: int = 8, mode: str = "exact", d_s: int = 12, d_t: int = 20,
             feat_dim: int = 16, nce_m: float = 0.5):
    crd = METHODS.get("crd")(feat_dim=feat_dim, nce_k=k, nce_t=0.07, nce_m=nce_m, mode=mode)
    crd.build(Features(embedding=torch.Size([2, d_s])), Features(embedding=torch.Size([2, d_t])),
              make_ctx(nn.Identity(), nn.Identity(), labels))
    return crd


# Unequal class sizes (5, 10, 15, 20, 10) in shuffled order, so class blocks are not contiguous.
def crd_labels() -> torch.Tensor:
    g = generator(0)
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate([5, 10, 15, 20, 10])])
    return labels[torch.randperm(labels.numel(), generator=g)]


def test_crd_exact_negatives_are_other_classes_uniformly():
    torch.manual_seed(seed(0))
    labels = crd_labels()
    n = labels.numel()
    sampler = ContrastSampler(labels, k=40, mode="exact")  # 40 = N - largest class
    idx = torch.arange(n).repeat(20)
    out = sampler(idx)
    assert out.shape == (idx.numel(), 41)
    assert torch.equal(out[:, 0], idx)
    neg = out[:, 1:]
    assert (labels[neg] != labels[idx].unsqueeze(1)).all()
    # Uniform over the N - n_c other-class samples: one sample of the largest class.
    anchor = int((labels == 3).nonzero()[0])
    draws = ContrastSampler(labels, k=40, mode="exact")(torch.full((2000,), anchor))[:, 1:].reshape(-1)
    counts = torch.bincount(draws, minlength=n).double()
    allowed = labels != 3
    assert (counts[~allowed] == 0).all()
    expected = draws.numel() / int(allowed.sum())  # 2000
    assert (counts[allowed] - expected).abs().max() < 0.15 * expected


def test_crd_relax_positive_is_same_class_and_negatives_other_classes():
    torch.manual_seed(seed(0))
    labels = crd_labels()
    sampler = ContrastSampler(labels, k=16, mode="relax")
    idx = torch.arange(labels.numel()).repeat(50)
    out = sampler(idx)
    assert (labels[out[:, 0]] == labels[idx]).all()
    assert (labels[out[:, 1:]] != labels[idx].unsqueeze(1)).all()
    # Positives cover the whole class, the sample itself included.
    anchor = int((labels == 1).nonzero()[0])
    pos = sampler(torch.full((1000,), anchor))[:, 0]
    assert set(pos.tolist()) == set((labels == 1).nonzero().flatten().tolist())


def test_crd_uniform_negatives_cover_every_sample():
    torch.manual_seed(seed(0))
    labels = crd_labels()
    out = ContrastSampler(labels, k=30, mode="uniform")(torch.zeros(400, dtype=torch.long))
    assert torch.equal(out[:, 0], torch.zeros(400, dtype=torch.long))
    assert set(out[:, 1:].flatten().tolist()) == set(range(labels.numel()))


def test_crd_too_many_negatives_or_bad_settings_raise():
    labels = crd_labels()  # N = 60, largest class 20
    make_crd(labels, k=40)  # the limit itself is fine
    for mode in ("exact", "relax"):
        with pytest.raises(UserError, match="nce_k"):
            make_crd(labels, k=41, mode=mode)
    with pytest.raises(UserError, match="nce_k"):
        make_crd(labels, k=60, mode="uniform")
    with pytest.raises(UserError, match="mode"):
        METHODS.get("crd")(mode="strict")
    with pytest.raises(UserError, match="mode=uniform"):
        make_crd(torch.zeros(10, dtype=torch.long), k=4)
    crd = METHODS.get("crd")(nce_k=4)
    with pytest.raises(UserError, match="label"):
        crd.build(Features(embedding=torch.Size([2, 4])), Features(embedding=torch.Size([2, 4])),
                  BuildContext(100, 50, torch.zeros(49, dtype=torch.long), torch.device("cpu"),
                               nn.Identity(), nn.Identity()))


def naive_crd(crd, e_s, e_t, contrast_idx, mem_s, mem_t, z_s, z_t):
    """Loss from per-entry loops: scores exp(<bank row, v> / T) / Z, then the NCE formula."""
    v_s = crd.embed_s(e_s).double()
    v_t = crd.embed_t(e_t).double()
    n, t = crd.num_samples, crd.nce_t
    b, k1 = contrast_idx.shape
    total = 0.0
    for side_v, bank, z in ((v_s, mem_t, z_s), (v_t, mem_s, z_t)):
        loss = 0.0
        for i in range(b):
            for j in range(k1):
                x = math.exp(float(bank[contrast_idx[i, j]].double() @ side_v[i]) / t) / z
                pn = (k1 - 1) / n
                loss += math.log(x / (x + pn + 1e-7)) if j == 0 else math.log(pn / (x + pn + 1e-7))
        total += -loss / b
    return total


@pytest.mark.parametrize("k", [8, 24])  # 3 x 9 < N = 60 rows: gathered rows; 3 x 25 >= 60: whole-bank scores
def test_crd_scores_loss_normalisers_and_bank_update_match_naive(k):
    torch.manual_seed(seed(0))
    labels = crd_labels()
    crd = make_crd(labels, k=k, nce_m=0.5).train()
    assert crd.memory.norm_s.item() == -1 and crd.memory.norm_t.item() == -1
    # Banks initialised uniformly in [-1/sqrt(d/3), 1/sqrt(d/3)], d = 16.
    bound = 1 / math.sqrt(16 / 3)
    for bank in (crd.memory.memory_s, crd.memory.memory_t):
        assert bank.shape == (60, 16) and bank.abs().max() <= bound and bank.abs().max() > 0.9 * bound

    idx = torch.tensor([4, 17, 33])
    e_s, e_t = torch.randn(3, 12), torch.randn(3, 20)
    contrast_idx = crd.sampler(idx)
    batch = Batch(torch.empty(3), labels[idx], idx, {CONTRAST_IDX_KEY: contrast_idx})
    mem_s, mem_t = crd.memory.memory_s.clone(), crd.memory.memory_t.clone()

    loss = crd(Features(embedding=e_s), Features(embedding=e_t), batch, CTX)["crd"]

    # Z on the first batch: mean of the un-normalised scores times N (positive column included).
    with torch.no_grad():
        v_s, v_t = crd.embed_s(e_s), crd.embed_t(e_t)
    raw_s = [[math.exp(float(mem_t[j] @ v_s[i]) / 0.07) for j in contrast_idx[i]] for i in range(3)]
    raw_t = [[math.exp(float(mem_s[j] @ v_t[i]) / 0.07) for j in contrast_idx[i]] for i in range(3)]
    z_s = sum(map(sum, raw_s)) / (3 * (k + 1)) * 60
    z_t = sum(map(sum, raw_t)) / (3 * (k + 1)) * 60
    # The code scores in float32: a 16-term dot product is off by at most 16 * 2^-24 * |row| |v|
    # (rows of norm <= 4 * bound, unit v), which exp(x / T) turns into a relative error of that / T;
    # Z, a mean of such scores, inherits it (plus a few roundings of the sum, 1e-6).
    z_rel = 16 * 2.0 ** -24 * 4 * bound / 0.07 + 1e-6  # 2.5e-5
    assert crd.memory.norm_s.item() == pytest.approx(z_s, rel=z_rel)
    assert crd.memory.norm_t.item() == pytest.approx(z_t, rel=z_rel)
    with torch.no_grad():
        assert loss.item() == pytest.approx(naive_crd(crd, e_s, e_t, contrast_idx, mem_s, mem_t, z_s, z_t),
                                            rel=1e-4)

    # Momentum update of the batch's own rows, one row at a time; other rows untouched.
    for bank, old, v in ((crd.memory.memory_s, mem_s, v_s), (crd.memory.memory_t, mem_t, v_t)):
        for r in range(60):
            if r in idx.tolist():
                i = idx.tolist().index(r)
                row = 0.5 * old[r] + 0.5 * v[i]
                assert torch.allclose(bank[r], row / row.norm(), atol=1e-6)
            else:
                assert torch.equal(bank[r], old[r])

    # Z stays fixed on later batches; eval mode leaves the banks alone.
    crd(Features(embedding=torch.randn(3, 12) * 5), Features(embedding=torch.randn(3, 20)),
        Batch(torch.empty(3), labels[idx], idx), CTX)
    assert crd.memory.norm_s.item() == pytest.approx(z_s, rel=z_rel)
    assert crd.memory.norm_t.item() == pytest.approx(z_t, rel=z_rel)
    crd.eval()
    frozen = crd.memory.memory_s.clone()
    crd(Features(embedding=e_s), Features(embedding=e_t), batch, CTX)
    assert torch.equal(crd.memory.memory_s, frozen)


def test_crd_gradient_reaches_both_embeddings_only():
    torch.manual_seed(seed(0))
    crd = make_crd(crd_labels()).train()
    e_s = torch.randn(3, 12, requires_grad=True)
    loss = crd(Features(embedding=e_s), Features(embedding=torch.randn(3, 20)),
               Batch(torch.empty(3), torch.zeros(3), torch.tensor([0, 1, 2])), CTX)["crd"]
    loss.backward()
    assert e_s.grad is not None and e_s.grad.abs().sum() > 0
    assert all(p.grad is not None for p in crd.embed_s.parameters())
    assert all(p.grad is not None for p in crd.embed_t.parameters())
    assert all(not b.requires_grad for b in crd.buffers())


def test_momentum_update_matches_naive_rows():
    torch.manual_seed(seed(0))
    bank = torch.randn(10, 4)
    old = bank.clone()
    idx, v = torch.tensor([7, 2, 5]), torch.randn(3, 4)
    momentum_update(bank, idx, v, 0.3)
    for i, r in enumerate(idx.tolist()):
        row = 0.3 * old[r] + 0.7 * v[i]
        assert torch.allclose(bank[r], row / row.norm())
    assert torch.equal(bank[[0, 1, 3, 4, 6, 8, 9]], old[[0, 1, 3, 4, 6, 8, 9]])


def test_crd_checkpoint_round_trip_of_banks_and_normalisers():
    torch.manual_seed(seed(0))
    labels = crd_labels()
    crd = make_crd(labels).train()
    for _ in range(3):
        idx = torch.randint(0, 60, (4,))
        crd(Features(embedding=torch.randn(4, 12)), Features(embedding=torch.randn(4, 20)),
            Batch(torch.empty(4), labels[idx], idx), CTX)
    state = crd.state_dict()
    for key in ("memory.memory_s", "memory.memory_t", "memory.norm_s", "memory.norm_t"):
        assert key in state
    assert not any(k.startswith("sampler.") for k in state)  # rebuilt from the data set's labels

    torch.manual_seed(seed(123))
    fresh = make_crd(labels).train()
    assert not torch.equal(fresh.memory.memory_s, crd.memory.memory_s)
    fresh(Features(embedding=torch.randn(4, 12)), Features(embedding=torch.randn(4, 20)),
          Batch(torch.empty(4), labels[:4], torch.arange(4)), CTX)  # sets fresh's own Z first
    fresh.load_state_dict(state)
    for key, value in state.items():
        assert torch.equal(fresh.state_dict()[key], value), key

    # Same inputs and contrast indices: same loss; the loaded Z is kept, not re-estimated.
    idx = torch.tensor([1, 2, 3])
    e_s, e_t = torch.randn(3, 12), torch.randn(3, 20)
    batch = Batch(torch.empty(3), labels[idx], idx, {CONTRAST_IDX_KEY: crd.sampler(idx)})
    crd.eval(), fresh.eval()
    assert torch.equal(crd(Features(embedding=e_s), Features(embedding=e_t), batch, CTX)["crd"],
                       fresh(Features(embedding=e_s), Features(embedding=e_t), batch, CTX)["crd"])
    assert torch.equal(fresh.memory.norm_s, state["memory.norm_s"])

    # A checkpoint from before the first batch (Z unset) loaded into a used instance: Z is estimated anew.
    unset = make_crd(labels).state_dict()
    assert unset["memory.norm_s"].item() == -1
    fresh.load_state_dict(unset)
    fresh(Features(embedding=e_s), Features(embedding=e_t), batch, CTX)
    assert fresh.memory.norm_s.item() > 0 and fresh.memory.norm_t.item() > 0


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(seed(0))  # identical banks on both ranks
        memory = ContrastMemory(20, 4, temperature=0.5, momentum=0.25)
        # Unequal batch sizes and one index (5) on both ranks: the first (rank 0) row wins.
        idx = torch.tensor([1, 5, 9]) if rank == 0 else torch.tensor([5, 14])
        g = generator(100 + rank)
        v_s = torch.nn.functional.normalize(torch.randn(idx.numel(), 4, generator=g), dim=1)
        v_t = torch.nn.functional.normalize(torch.randn(idx.numel(), 4, generator=g), dim=1)
        memory(v_s, v_t, torch.stack([idx, idx], 1))  # sets Z: averaged over ranks
        memory.update(idx, v_s, v_t)
        torch.save({"idx": idx, "v_s": v_s, "v_t": v_t, "memory_s": memory.memory_s,
                    "memory_t": memory.memory_t, "norm_s": memory.norm_s}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_crd_banks_stay_identical_across_processes(tmp_path):
    run_ranks(_ddp_worker, 2, str(tmp_path / "pg"), str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert torch.equal(r0["memory_s"], r1["memory_s"]) and torch.equal(r0["memory_t"], r1["memory_t"])
    assert torch.equal(r0["norm_s"], r1["norm_s"])
    torch.manual_seed(seed(0))
    expected = ContrastMemory(20, 4, temperature=0.5, momentum=0.25)
    for name, v_key in (("memory_s", "v_s"), ("memory_t", "v_t")):
        bank = getattr(expected, name).clone()
        seen = set()
        for r in (r0, r1):  # rank order, first occurrence of an index wins
            for i, row in enumerate(r["idx"].tolist()):
                if row in seen:
                    continue
                seen.add(row)
                new = 0.25 * bank[row] + 0.75 * r[v_key][i]
                bank[row] = new / new.norm()
        assert torch.allclose(r0[name], bank, atol=1e-6), name
