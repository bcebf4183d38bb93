"""Networks from outside the zoo: torchvision and timm models by name, a module of our own by path.

Each network is built through the config path (``models.external.build_network``) and used as
teacher and as student against the zoo's resnet8 for kd, fitnet, at, crd, dkd and FT (two-stage):
on one fixed batch, in float64 with BatchNorm fixed to the batch's statistics, one backtracked
gradient step lowers the method's loss (``helpers.assert_gradient_step_descends``). The hooked
features are compared with the modules' outputs computed by calling the modules one by one in
the test; the features of the zoo's resnet56, written out as a config declaration, give exactly its
built-in ``feature_info``. Every bad declaration ends in one line naming the key. CPU, no network,
no downloads (torchvision models are built with ``weights=None``, timm's with ``pretrained=False``).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import re
import sys
from pathlib import Path

import pytest
import torch
from helpers import (
    MIN_DECREASE,
    assert_gradient_step_descends,
    distill_node,
    fix_batch_statistics,
    run_cli,
    seed,
    tiny_overrides,
)
from torch import nn

from common.errors import UserError
from datasets.batch import Batch
from distiller import functional as F
from distiller.config.command_line import explain_config_error
from distiller.config.pairs import apply_pair_settings
from distiller.config.schema import ExternalTeacherConfig
from distiller.config.validation import method_config, validate
from distiller.features import EMBEDDING, STAGES, STAGES_PREACT, STEM, Features, forward_features
from distiller.methods import METHODS, BuildContext, TermContext, make_method
from distiller.methods.crd import CONTRAST_IDX_KEY
from models import build_model
from models.external import CONFIG_KEYS, build_network, command_line_choice, label_choice, network_label
from models.features import check_features

ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES, N_DATA, TEST_K, B = 8, 128, 64, 4
TRAIN_LABELS = torch.arange(N_DATA) % NUM_CLASSES
TINY = "tests.external_nets.TinyNet"
TINY_FEATURES = {"stem": "stem", "stages": ["stage1", "stage2", "stage3"], "embedding": "head@in",
             "preact": ["stage1.act@in", "stage2.act@in", "stage3.act@in"],
             "bn": ["stage1.bn", "stage2.bn", "stage3.bn"]}
NETWORKS = {
    "tv_resnet18": {"source": "torchvision", "name": "resnet18", "cifar_stem": True},
    "tv_mobilenet_v3_small": {"source": "torchvision", "name": "mobilenet_v3_small", "cifar_stem": True},
    "tinynet": {"source": "module", "name": TINY, "_target_": TINY, "features": TINY_FEATURES},
}
METHOD_NAMES = ["kd", "fitnet", "at", "crd", "dkd", "ft"]
ZOO = "resnet8"


def method_node(name: str) -> dict:
    node = distill_node(name)
    if name == "crd":
        node["nce_k"] = TEST_K
    return node


_BUILT: dict[str, nn.Module] = {}


def network(key: str) -> nn.Module:
    """A fresh copy of the external network ``key`` (built once: the build probes it)."""
    if key not in _BUILT:
        torch.manual_seed(seed(10))
        _BUILT[key] = build_network(NETWORKS[key], NUM_CLASSES, role="teacher")
    return copy.deepcopy(_BUILT[key])


def features(model: nn.Module, x: torch.Tensor, kinds: frozenset) -> Features:
    feats, logits = forward_features(model, x, preact=STAGES_PREACT in kinds)
    return Features(logits=logits, stem=feats[0] if STEM in kinds else None,
                    stages=list(feats[1:-1]) if kinds & {STAGES, STAGES_PREACT} else [],
                    embedding=feats[-1] if EMBEDDING in kinds else None)


def shapes(model: nn.Module, kinds: frozenset) -> Features:
    with torch.no_grad():
        was = model.training
        f = features(model.eval(), torch.zeros(2, 3, 32, 32, dtype=next(model.parameters()).dtype), kinds)
        model.train(was)
    size = lambda t: None if t is None else t.shape
    return Features(size(f.logits), size(f.stem), [t.shape for t in f.stages], size(f.embedding))


# --------------------------------------------------------------------------- config and schema
def test_every_schema_key_of_an_external_node_is_kept_from_the_constructor() -> None:
    assert {f.name for f in dataclasses.fields(ExternalTeacherConfig)} <= CONFIG_KEYS


def test_pinned_command_lines_compose_and_validate(compose, tmp_path: Path) -> None:
    tiny = tiny_overrides(tmp_path)
    cfg = compose("train_student", ["teacher=torchvision", "teacher.name=resnet18", "teacher.cifar_stem=true",
                                    "student=timm", "student.name=resnet10t", "distill=crd", *tiny])
    job = validate(cfg)
    assert (job.teacher.source, job.teacher.name, job.teacher.cifar_stem) == ("torchvision", "resnet18", True)
    assert (job.student.source, job.student.name, job.student.lr) == ("timm", "resnet10t", 0.05)
    # train_teacher.py model=torchvision model.name=resnet18 stores where teacher=torchvision looks
    trained = compose("train_teacher", ["model=torchvision", "model.name=resnet18", *tiny])
    assert job.teacher.ckpt == str(tmp_path / "teachers" / f"{network_label(trained.model)}.pt")
    assert job.teacher.ckpt.endswith("torchvision-resnet18.pt")
    own = validate(compose("train_student", ["teacher=module", f"teacher._target_={TINY}", "+teacher.width=4",
                                             "teacher.features.stem=stem", "teacher.features.stages=[stage1,stage2]",
                                             "teacher.features.embedding=head@in", *tiny]))
    assert own.teacher.name == TINY and own.teacher.width == 4
    assert list(own.teacher.features.stages) == ["stage1", "stage2"]
    zoo = validate(compose("train_student", ["teacher=resnet56", *tiny]))
    assert set(zoo.teacher.keys()) == {"name", "lr", "ckpt", "published_top1", "verify", "cache", "cache_dir",
                                       "cache_dtype"}  # zoo nodes take no constructor arguments


def test_a_pool_input_declared_on_the_command_line_replaces_the_inferred_one(compose, tmp_path: Path) -> None:
    """TinyNet's global pool (``pool``) is found by itself; ``features.pool_input`` names another module."""
    base = ["student=module", f"student._target_={TINY}", *tiny_overrides(tmp_path)]
    pool_of = lambda overrides: next(i for i in build_network(validate(compose("train_student", overrides)).student,
                                                               NUM_CLASSES, role="student").feature_info
                                     if i.name == "pool_input")
    inferred = pool_of(base)
    declared = pool_of([*base, "student.features.pool_input=stage3.act"])
    assert (inferred.module, inferred.module_input) == ("pool", True)
    assert (declared.module, declared.module_input, declared.channels) == ("stage3.act", False, 32)


@pytest.mark.parametrize("overrides, message", [
    (["teacher=torchvision"], "teacher=torchvision needs teacher.name="),
    (["student=module"], "student=module needs student._target_="),
    (["teacher=resnet56", "+teacher.width=2"], "config key 'teacher.width' does not exist"),  # zoo nodes stay strict
    (["teacher=torchvision", "teacher.name=resnet18", "+teacher.features.stemm=conv1"], "teacher.features.stemm"),
    (["teacher=torchvision", "teacher.name=resnet18", "teacher.cifar_stem=maybe"], "teacher.cifar_stem"),
    (["student=torchvision", "student.name=resnet18", f"student._target_={TINY}"],
     "student._target_ is read only with student=module"),  # else silently ignored
])
def test_bad_external_nodes_are_one_line_errors(compose, tmp_path: Path, overrides: list, message: str) -> None:
    """As the entry points' preflight reports them: a composition error or the schema's check, in one line."""
    try:
        validate(compose("train_student", [*overrides, *tiny_overrides(tmp_path)]))
    except Exception as err:  # noqa: BLE001 - whatever composing raises, the user sees explain_config_error's line
        line = explain_config_error(err)
    else:
        pytest.fail(f"{overrides} was accepted")
    assert message in line and "\n" not in line


def test_an_external_network_never_takes_a_zoo_pairs_settings(compose, tmp_path: Path) -> None:
    """timm's resnet50 is not the zoo's CIFAR ResNet50, so the ResNet50-vgg8 settings must not apply."""
    zoo = compose("train_student", ["teacher=ResNet50", "student=vgg8", "distill=ft", *tiny_overrides(tmp_path)])
    assert apply_pair_settings(zoo)  # the published pair changes FT's init lr
    timm_cfg = compose("train_student", ["teacher=timm", "teacher.name=resnet50", "student=vgg8", "distill=ft",
                                         *tiny_overrides(tmp_path)])
    assert apply_pair_settings(timm_cfg) == []


# --------------------------------------------------------------------------- features
def test_declared_features_of_a_zoo_model_give_its_feature_info() -> None:
    """resnet56's features written out by module path (the CIFAR ResNet's facts) on a copy that declares none."""
    declared = {"stem": "relu", "stages": ["layer1", "layer2", "layer3"], "embedding": "fc@in", "pool_input": "pool@in",
                "preact": ["layer1.8.relu_out@in", "layer2.8.relu_out@in", "layer3.8.relu_out@in"],
                "bn": ["layer1.8.bn2", "layer2.8.bn2", "layer3.8.bn2"], "reductions": [1, 2, 4]}
    built = build_network({"source": "module", "name": "bare", "_target_": "tests.external_nets.bare_resnet56",
                           "features": declared}, 100)
    assert built.feature_info == build_model("resnet56").feature_info
    assert built.undeclared_features == {}


def _direct_resnet18(m: nn.Module, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """torchvision ResNet's forward written out: conv-BN-ReLU stem, (max-pool), layer1..4, pool, fc; the
    pre-activation of a stage is its last BasicBlock's ``bn2(conv2(relu(bn1(conv1(y))))) + identity``."""
    stem = m.relu(m.bn1(m.conv1(x)))
    stages, pre, y = [], [], m.maxpool(stem)
    for layer in (m.layer1, m.layer2, m.layer3, m.layer4):
        *first, last = list(layer)
        for block in first:
            y = block(y)
        identity = y if last.downsample is None else last.downsample(y)
        pre.append(last.bn2(last.conv2(torch.relu(last.bn1(last.conv1(y))))) + identity)
        y = torch.relu(pre[-1])
        stages.append(y)
    return [stem, *stages, torch.flatten(m.avgpool(y), 1)], pre


def _direct_mobilenet_v3_small(m: nn.Module, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """MobileNetV3-Small's features one by one; its blocks change resolution at 1, 2, 4 and 9 (Howard et al.,
    Table 2), so with a stride-1 stem the stage ends are blocks 1, 3, 8 and 11; the 1x1 conv (12) is the head."""
    outs, y = [], x
    for block in m.features:
        y = block(y)
        outs.append(y)
    return [outs[0], outs[1], outs[3], outs[8], outs[11], torch.flatten(m.avgpool(outs[12]), 1)], \
        [outs[1], outs[3], outs[8], outs[11]]  # linear block outputs: each map is its own pre-activation


def _direct_tinynet(m: nn.Module, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    stem = m.stem(x)
    y, stages, pre = stem, [], []
    for stage in (m.stage1, m.stage2, m.stage3):
        pre.append(stage.bn(stage.conv(y)))
        y = stage(y)
        stages.append(y)
    return [stem, *stages, torch.flatten(m.pool(y), 1)], pre


DIRECT = {"tv_resnet18": _direct_resnet18, "tv_mobilenet_v3_small": _direct_mobilenet_v3_small,
          "tinynet": _direct_tinynet}


@pytest.mark.parametrize("key", list(NETWORKS))
def test_hooked_features_equal_the_modules_outputs(key: str) -> None:
    """The same modules called one by one on the same input in eval mode: the same kernels on the same
    tensors, so the values agree exactly."""
    model = network(key).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        feats, logits = forward_features(model, x)
        pre_feats, _ = forward_features(model, x, preact=True)
        direct, direct_pre = DIRECT[key](model, x)
        reference_logits = model(x)
    assert len(feats) == len(direct)
    for got, want in zip(feats, direct):
        assert got.shape == want.shape and torch.equal(got, want)
    assert torch.equal(logits, reference_logits)
    assert len(pre_feats) == len(feats) and len(direct_pre) == len(feats) - 2
    for got, want in zip(pre_feats[1:-1], direct_pre):
        assert torch.equal(got, want)
    stage_infos = [i for i in model.feature_info if i.is_stage]
    assert [i.channels for i in stage_infos] == [f.shape[1] for f in direct[1:-1]]
    assert [i.reduction for i in stage_infos] == [32 // f.shape[-1] for f in direct[1:-1]]


@pytest.mark.parametrize("declared, message", [
    ({"stages": ["stage1", "stage9", "stage3"]}, r"student.features.stages\[1\]='stage9' is not a module of"),
    ({"stages": ["stage2", "stage1", "stage3"]}, r"stages must be in forward order .* stages\[1\]='stage1'"),
    ({"stages": ["stage1", "stage2", "stage3"], "reductions": [1, 1, 4]},
     r"student.features.reductions\[1\]=1 but stages\[1\]='stage2' reduces the resolution by 2"),
    ({"embedding": "pool"},
     r"student.features.embedding='pool' gives a \[2, 32, 1, 1\] tensor .* not a \[B, D\] vector"),
    ({"stages": ["stage1", "stage2"], "preact": ["stage1.act@in"]}, r"student.features.preact has 1 entries"),
    ({"stages": ["stage1"], "bn": ["stage1.conv"]},
     r"student.features.bn\[0\]='stage1.conv' is a Conv2d, not a BatchNorm"),
    ({"stemm": "stem"}, r"student.features.stemm is not a features key"),
])
def test_bad_feature_declarations_are_one_line_errors(declared: dict, message: str) -> None:
    node = {"source": "module", "name": TINY, "_target_": TINY, "features": declared}
    with pytest.raises(UserError, match=message) as err:
        build_network(node, NUM_CLASSES, role="student")
    assert "\n" not in str(err.value)


def test_a_shared_or_in_place_activation_cannot_be_a_feature() -> None:
    """torchvision's BasicBlock calls one in-place ReLU twice (the first block of a stage keeps it; the last
    gets its own final ReLU): its input is no pre-activation map."""
    node = {**NETWORKS["tv_resnet18"], "features": {"preact": [f"layer{i}.0.relu@in" for i in (1, 2, 3, 4)]}}
    with pytest.raises(UserError, match=r"teacher.features.preact\[0\]='layer1.0.relu@in' runs 2 times"):
        build_network(node, NUM_CLASSES, role="teacher")


def test_a_method_needing_a_feature_the_network_lacks_names_both(compose, tmp_path: Path) -> None:
    from distiller.jobs.train import distill

    cfg = compose("train_student", ["teacher=module", f"teacher._target_={TINY}", "teacher.features.stem=stem",
                                    "teacher.features.stages=[stage1,stage2,stage3]",
                                    "teacher.features.embedding=head@in",
                                    "student=resnet8", "distill=ab", *tiny_overrides(tmp_path)])
    with pytest.raises(UserError, match=r"method 'ab' needs the teacher's stages_preact features, but teacher "
                                        rf"module-{TINY} has none .*teacher.features.preact="):
        distill(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "config.yaml").exists()
    tiny = build_network({"source": "module", "name": TINY, "_target_": TINY}, NUM_CLASSES)  # no features declared
    with pytest.raises(UserError, match=r"'fitnet' needs the student's stages features.*student.features.stages="):
        check_features(tiny, "student", "module-TinyNet", {"fitnet": METHODS.get("fitnet").student_features})
    check_features(tiny, "student", "module-TinyNet", {"kd": frozenset(), "crd": frozenset({EMBEDDING})})


def test_other_bad_networks_are_one_line_errors(monkeypatch) -> None:
    cases = [
        ({"source": "torchvision", "name": "resnet181"}, r"teacher.name='resnet181' is not a torchvision .*"
                                                         r"Did you mean 'resnet18'"),
        ({"source": "module", "name": "x", "_target_": "tests.no_such_module.Net"}, r"teacher._target_="),
        ({"source": "module", "name": "x", "_target_": "tests.external_nets.NoSuchNet"}, r"has no attribute"),
        ({"source": "module", "name": TINY, "_target_": TINY, "width": "wide"}, r"building .*TinyNet failed"),
        ({"source": "module", "name": "x", "_target_": "torch.nn.Identity"}, r"outputs \[2, 3, 32, 32\] .* 8 classes"),
        ({"source": "module", "name": TINY, "_target_": TINY, "features": {"stages": "stage1"}},
         r"teacher.features.stages must be a list"),
    ]
    for node, message in cases:
        with pytest.raises(UserError, match=message) as err:
            build_network(node, NUM_CLASSES, role="teacher")
        assert "\n" not in str(err.value)
    monkeypatch.setitem(sys.modules, "timm", None)  # as if timm were not installed
    with pytest.raises(UserError, match=r"needs the package timm.*pip install timm"):
        build_network({"source": "timm", "name": "resnet18"}, NUM_CLASSES, role="student")


USER_NETS = """
from torch import nn


class NeedsGPU(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        raise RuntimeError("this network needs a GPU")


class Needs224(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.fc = nn.Linear(3, num_classes)

    def forward(self, x):
        assert x.shape[-1] == 224, f"Input width ({x.shape[-1]}) doesn't match model (224)."
        return self.fc(x.mean((2, 3)))
"""


def test_a_network_whose_own_code_raises_is_one_line_naming_where(tmp_path: Path, monkeypatch) -> None:
    """Whatever a user's constructor or module raises (not only TypeError/ValueError) is one line with its place."""
    (tmp_path / "user_nets.py").write_text(USER_NETS)
    (tmp_path / "user_broken.py").write_text("import torch\nscale = 1 / 0\n")
    (tmp_path / "user_typo.py").write_text("def f(:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cases = [
        ("user_nets.NeedsGPU", rf"building user_nets.NeedsGPU failed \(RuntimeError: this network needs a GPU, "
                               rf"raised at {re.escape(str(tmp_path / 'user_nets.py'))}:8\)"),
        ("user_broken.Net", rf"importing user_broken failed \(ZeroDivisionError: division by zero, raised at "
                            rf"{re.escape(str(tmp_path / 'user_broken.py'))}:2\)"),
        ("user_typo.Net", rf"importing user_typo failed \(SyntaxError: .*, at "
                          rf"{re.escape(str(tmp_path / 'user_typo.py'))}:1\)"),
    ]
    # its forward's own size check (as timm's ViTs assert their image size) on the data's 32 px images
    cases.append(("user_nets.Needs224", r"Needs224 cannot run on 32x32 images \(Input width \(32\) doesn't match "
                                        r"model \(224\).\); check its arguments"))
    for target, message in cases:
        with pytest.raises(UserError, match=message) as err:
            build_network({"source": "module", "name": target, "_target_": target}, NUM_CLASSES, role="teacher")
        assert "\n" not in str(err.value)


def test_a_text_file_as_library_weights_is_one_line(tmp_path: Path) -> None:
    notes = tmp_path / "resnet18.pth"
    notes.write_text("weights: see the shared drive\n")
    node = {"source": "torchvision", "name": "resnet18", "weights": str(notes)}
    with pytest.raises(UserError, match=r"model.weights=.* is not a torch file \(it is a text file, beginning "
                                        r"'weights: see the shared drive'\)"):
        build_network(node, 10, role="model")


def test_library_weights_load_and_the_classifier_is_adapted(tmp_path: Path) -> None:
    """A torchvision-style file (a bare state_dict for 1000 classes) into a 10-class CIFAR-stem network."""
    import torchvision

    torch.manual_seed(seed(3))
    source = torchvision.models.mobilenet_v3_small(weights=None)
    path = tmp_path / "mobilenet_v3_small-imagenet.pth"
    torch.save(source.state_dict(), path)
    node = {"source": "torchvision", "name": "mobilenet_v3_small", "cifar_stem": True, "weights": str(path)}
    loaded = build_network(node, 10, role="model").state_dict()
    saved = source.state_dict()
    classifier = {"classifier.3.weight", "classifier.3.bias"}
    assert all(torch.equal(loaded[k], v) for k, v in saved.items() if k not in classifier)
    assert loaded["classifier.3.weight"].shape == (10, 1024)  # a fresh 10-class classifier
    wrong = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), wrong)
    with pytest.raises(UserError, match=r"model.weights=.*does not fit this network"):
        build_network({**node, "weights": str(wrong)}, 10, role="model")


# --------------------------------------------------------------------------- every method on external pairs
def _pair(key: str, external_role: str) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed(1))
    zoo = build_model(ZOO, num_classes=NUM_CLASSES)
    return (network(key), zoo) if external_role == "teacher" else (zoo, network(key))


# every method of the issue on every network; AB and OFD (pre-activation maps) on torchvision's ResNet
METHOD_CASES = [(n, k) for n in METHOD_NAMES for k in NETWORKS] + [("ab", "tv_resnet18"), ("ofd", "tv_resnet18")]


@pytest.mark.parametrize("external_role", ["teacher", "student"])
@pytest.mark.parametrize(("name", "key"), METHOD_CASES)
def test_method_step_lowers_the_loss(name: str, key: str, external_role: str) -> None:
    teacher, student = _pair(key, external_role)
    teacher.eval().requires_grad_(False)
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    node = method_config(method_node(name))
    method = make_method(node.method, node.extra)
    s_kinds, t_kinds = method.student_features, method.teacher_features
    ctx = BuildContext(num_classes=NUM_CLASSES, num_samples=N_DATA, train_labels=TRAIN_LABELS,
                       device=torch.device("cpu"), student=student, teacher=teacher)
    method.build(shapes(student, s_kinds), shapes(teacher, t_kinds), ctx)
    images = torch.randn(B, 3, 32, 32, generator=torch.Generator().manual_seed(seed(2)))
    indices = torch.tensor([3, 12, 21, 30])
    with torch.no_grad():
        t = features(teacher, images, t_kinds)
    as64 = lambda v: None if v is None else v.double()
    t = Features(as64(t.logits), as64(t.stem), [v.double() for v in t.stages], as64(t.embedding))
    student.double()
    method.double()
    min_decrease = MIN_DECREASE
    if name == "crd":  # CRD's memory scores in float32 (see test_methods.py): a decrease above its rounding
        method.memory.float()
        min_decrease = 2.0 ** -10
    extras = {CONTRAST_IDX_KEY: method.sampler(indices)} if name == "crd" else {}
    batch = Batch(images.double(), TRAIN_LABELS[indices], indices, extras)

    def loss() -> torch.Tensor:
        s = features(student, batch.images, s_kinds)
        terms = method(s, t, batch, TermContext(epoch=1))
        if name == "kd":  # the term at the step's temperature (the config's, 4)
            torch.testing.assert_close(terms["kd"], F.kd(s.logits, t.logits, 4.0))
        return sum(terms.values())

    main = {id(p) for p in [*student.parameters(), *method.parameters()] if p.requires_grad}
    for phase in method.phases():  # FT's paraphraser phase (teacher's map only), AB's initialisation phase
        own = {id(p) for p in phase.parameters(student)}
        for p in [*student.parameters(), *method.parameters()]:
            p.requires_grad_(id(p) in own)
        phase_loss = lambda phase=phase: sum(phase.loss(features(student, batch.images, s_kinds), t, batch).values())
        fix_batch_statistics([student, method], phase_loss)
        assert_gradient_step_descends(phase_loss, list(phase.parameters(student)))
        for p in [*student.parameters(), *method.parameters()]:
            p.requires_grad_(id(p) in main)  # as the engine sets the main phase: the paraphraser stays frozen
    params = list(student.parameters()) + [p for p in method.parameters() if p.requires_grad]
    fix_batch_statistics([student, method], loss)
    helpers = {n: list(c.parameters()) for n, c in method.named_children()
               if any(p.requires_grad for p in c.parameters())}
    assert_gradient_step_descends(loss, params, reaches={"student": list(student.parameters()), **helpers},
                                  min_decrease=min_decrease)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_state.items())


# --------------------------------------------------------------------------- timm (optional)
def test_timm_network_features_follow_its_feature_info() -> None:
    """timm's resnet10t with a CIFAR stem: stem, four stages and the embedding equal timm's own
    forward_features / forward_head(pre_logits=True), which compute them without our hooks."""
    pytest.importorskip("timm")
    torch.manual_seed(seed(4))
    model = build_network({"source": "timm", "name": "resnet10t", "cifar_stem": True}, NUM_CLASSES).eval()
    assert [i.name for i in model.feature_info] == ["stem", "stage1", "stage2", "stage3", "stage4", "pool_input",
                                                    "embedding"]
    assert [i.reduction for i in model.feature_info if i.is_stage] == [1, 2, 4, 8]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats, logits = forward_features(model, x)
        last = model.forward_features(x)
        embedding = model.forward_head(last, pre_logits=True)
    assert torch.equal(feats[-2], last) and torch.equal(feats[-1], embedding)
    assert torch.equal(logits, model.forward_head(last))


def test_a_timm_vision_transformer_is_a_student_for_the_methods_that_read_no_maps() -> None:
    """A ViT's feature_info names its blocks, which give [B, N, C] token sequences: they are not taken as
    stages (KD, which reads only logits, and CRD, which reads the embedding, accept the network; AT, which
    reads stage maps, is refused in one line that says why); its embedding is timm's pre-logits vector."""
    pytest.importorskip("timm")
    from models.features import check_features

    torch.manual_seed(seed(4))
    node = {"source": "timm", "name": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8, "depth": 2}
    model = build_network(node, NUM_CLASSES, role="student").eval()
    assert [i.name for i in model.feature_info] == ["embedding"]
    check_features(model, "student", "timm-vit", {"kd": set(), "crd": {EMBEDDING}})
    with pytest.raises(UserError, match=r"method 'at' needs the student's stages features, but student timm-vit "
                                        r"has none \(timm's feature_info of VisionTransformer gives \[B, N, C\] token "
                                        r"sequences, not \[B, C, H, W\] maps\)"):
        check_features(model, "student", "timm-vit", {"at": {STAGES}})
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats, logits = forward_features(model, x)
        embedding = model.forward_head(model.forward_features(x), pre_logits=True)
    assert torch.equal(feats[-1], embedding) and torch.equal(logits, model(x))
    # a CIFAR stem would change the number of patches its position embedding is made for
    with pytest.raises(UserError, match=r"^cifar_stem does not apply to timm-vit_tiny_patch16_224: its first "
                                        r"convolution embeds patches"):
        build_network({**node, "cifar_stem": True}, NUM_CLASSES, role="student")


# --------------------------------------------------------------------------- the command line
def test_cli_distils_a_torchvision_teacher_into_a_zoo_student(tmp_path: Path) -> None:
    """The issue's command line, with a saved random resnet18 as the teacher checkpoint (speed does not
    depend on the weights) and a tiny synthetic data set."""
    node = {"source": "torchvision", "name": "resnet18", "cifar_stem": True}
    torch.manual_seed(seed(5))
    teacher = build_network(node, 100, role="teacher")
    ckpt = tmp_path / "teacher.pt"
    torch.save({"model": teacher.state_dict()}, ckpt)
    run_dir = tmp_path / "run"
    result = run_cli("train_student.py", "teacher=torchvision", "teacher.name=resnet18", "teacher.cifar_stem=true",
                     f"teacher.ckpt={ckpt}", "student=resnet8", "distill=crd", "distill.nce_k=64",
                     *tiny_overrides(tmp_path, train_size=100, test_size=16), "dataset.batch_size=16",
                     "dataset.eval_batch_size=16", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert "final_top1" in metrics and len(metrics["epochs"]) == 1
    assert "resnet8 <- torchvision-resnet18 [crd]" in result.stdout


def test_the_stored_teacher_message_gives_the_command_line_that_uses_it() -> None:
    assert command_line_choice({"name": "resnet56"}) == "teacher=resnet56"
    assert command_line_choice({"source": "torchvision", "name": "resnet18", "cifar_stem": True}) == \
        "teacher=torchvision teacher.name=resnet18 teacher.cifar_stem=true"
    assert command_line_choice({"source": "timm", "name": "resnet10t", "cifar_stem": False}, "student") == \
        "student=timm student.name=resnet10t"
    assert command_line_choice({"source": "module", "name": "pkg.nets.Net", "_target_": "pkg.nets.Net"}) == \
        "teacher=module teacher._target_=pkg.nets.Net"
    # constructor arguments, beside the declared keys or kept in a converted node's extra: without them the
    # suggested command builds another network than the stored one
    assert command_line_choice({"source": "module", "name": "pkg.Net", "_target_": "pkg.Net", "width": 2,
                                "lr": 0.05, "weights": None, "features": {"stem": None}}) == \
        "teacher=module teacher._target_=pkg.Net +teacher.width=2"
    assert command_line_choice({"source": "timm", "name": "vit_tiny_patch16_224", "cifar_stem": False,
                                "extra": {"img_size": 32, "patch_size": 4, "dynamic": True, "sizes": [1, 2]}}) == \
        ("teacher=timm teacher.name=vit_tiny_patch16_224 +teacher.dynamic=true +teacher.img_size=32 "
         "+teacher.patch_size=4 +teacher.sizes=[1,2]")
    # from the name in files and messages, where the CIFAR stem is not recorded
    assert label_choice("torchvision-resnet18", "model") == "model=torchvision model.name=resnet18"
    assert label_choice("module-pkg.nets.Net") == "teacher=module teacher._target_=pkg.nets.Net"
    assert label_choice("resnet56", "model") == "model=resnet56"


def test_a_file_of_the_same_network_built_otherwise_names_the_build_not_two_equal_names(tmp_path: Path) -> None:
    """A CIFAR-stem torchvision-resnet18 file loaded into the ImageNet-stem one: both go by one name, so the
    line said 'holds a torchvision-resnet18 model, not torchvision-resnet18'. The stem alone differs: the line
    names it; a constructor argument (TinyNet's width) changes many shapes: the line names the build."""
    from distiller.engine.checkpoints import load_weights
    from models.external import network_label

    stem = {"source": "torchvision", "name": "resnet18", "cifar_stem": True}
    trained = build_network(stem, NUM_CLASSES, role="teacher")
    assert network_label(stem) == network_label({**stem, "cifar_stem": False})  # one name for both builds
    torch.save({"model": trained.state_dict(), "arch": network_label(stem)}, tmp_path / "t.pt")
    plain = build_network({**stem, "cifar_stem": False}, NUM_CLASSES, role="teacher")
    with pytest.raises(UserError, match=r"holds a torchvision-resnet18 whose first convolution \(conv1.weight\) is "
                                        r"3x3 where this build's is 7x7: .* set cifar_stem=true") as err:
        load_weights(plain, tmp_path / "t.pt", network_label(stem), what="teacher checkpoint")
    assert "not torchvision-resnet18" not in str(err.value)
    wide = {"source": "module", "name": TINY, "_target_": TINY, "width": 4}
    torch.save({"model": build_network(wide, NUM_CLASSES).state_dict(), "arch": network_label(wide)},
               tmp_path / "w.pt")
    with pytest.raises(UserError, match=rf"holds a module-{TINY} built with other settings than this one "
                                        r"\(its parameter shapes differ, e.g. cifar_stem") as err:
        load_weights(build_network({**wide, "width": 8}, NUM_CLASSES), tmp_path / "w.pt", network_label(wide),
                     what="teacher checkpoint")
    assert f"not module-{TINY}" not in str(err.value)


def test_a_missing_teacher_of_its_own_build_is_trained_by_the_command_the_message_gives(tmp_path: Path) -> None:
    """The teacher's constructor arguments are part of the command that trains it: without +model.width=4 it
    would store a network of other shapes, which the student then refuses."""
    result = run_cli("train_student.py", "teacher=module", f"teacher._target_={TINY}", "+teacher.width=4",
                     "student=resnet8", f"hydra.run.dir={tmp_path / 'run'}", *tiny_overrides(tmp_path))
    assert result.returncode == 2
    assert (f"Train it with `python train_teacher.py model=module model._target_={TINY} +model.width=4 "
            "dataset=synthetic") in result.stderr, result.stderr


@pytest.mark.parametrize("saved_stem, built_stem, says", [
    (True, False, "is 3x3 where this build's is 7x7: it was trained with a CIFAR stem; set cifar_stem=true"),
    (False, True, "is 7x7 where this build's is 3x3: it was trained without a CIFAR stem; set cifar_stem=false"),
])
def test_a_file_of_the_same_network_with_the_other_stem_names_cifar_stem(tmp_path: Path, saved_stem: bool,
                                                                        built_stem: bool, says: str) -> None:
    """A bare state dict of torchvision's resnet18 trained with (or without) the CIFAR stem, loaded into the other
    build: not 'another architecture', but the one switch that differs."""
    from distiller.engine.checkpoints import load_weights

    node = {"source": "torchvision", "name": "resnet18"}
    torch.save(build_network({**node, "cifar_stem": saved_stem}, NUM_CLASSES).state_dict(), tmp_path / "sd.pth")
    with pytest.raises(UserError) as err:
        load_weights(build_network({**node, "cifar_stem": built_stem}, NUM_CLASSES), tmp_path / "sd.pth",
                     "torchvision-resnet18", "teacher checkpoint")
    assert str(err.value).startswith(f"teacher checkpoint {tmp_path / 'sd.pth'} holds a torchvision-resnet18 whose "
                                     "first convolution (conv1.weight) ") and says in str(err.value)
