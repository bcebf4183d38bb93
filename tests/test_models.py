"""The model zoo against the reference checkpoints' facts (shared fixture) and the feature contract.

Two parameter lists: the fixture's 23 reference models for the comparisons with their recorded
facts (parameter names/shapes, parameter counts, feature shapes), and every model in the
registry for the contract any model must keep (taps fire once and are never changed in place,
the declared channels, reductions and BatchNorms are what the forward produces, the embedding
is the classifier's input, gradients flow, 64 px inputs work). Adding a model file is enough
for its contract to be tested. Expected values come from ``model_keys.json`` or are recomputed
independently (ReLU of the preact tap, the next BatchNorm for WRN, the classifier on the embedding).
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from common.errors import UserError
from distiller.features import forward_features
from models import MODELS, build_model, list_models

REPO = Path(__file__).resolve().parents[1]
_CANDIDATES = [REPO / "tests" / "fixtures" / "model_keys.json", REPO.parent / "shared" / "fixtures" / "model_keys.json"]
FIXTURE_PATH = next((p for p in _CANDIDATES if p.is_file()), _CANDIDATES[-1])
FIXTURE = json.loads(FIXTURE_PATH.read_text())["models"]
FIXTURE_ARCHS = sorted(FIXTURE)  # compared with the reference models' recorded facts
ARCHS = list_models()  # every registered model: the contract


def _family(arch: str) -> str:
    if arch.startswith("wrn_"):
        return "wrn"
    if arch == "MobileNetV2":
        return "mobilenetv2"
    if arch == "ShuffleV2":
        return "shufflev2"
    if arch == "mobilenetv2_tinyimagenet":
        return "relu6_head"  # stages 1-3 end in a linear BN; stage 4 is the 1280-channel head, BN then ReLU6
    if arch in FIXTURE:
        return "relu_after_sum"  # resnet*, ResNet18/50, vgg*, ShuffleV1: stage = ReLU(preact)
    return "declared"  # a model outside the fixture: stage = ReLU(preact), or preact = stage (a linear end)


# mobilenetv2_tinyimagenet's 1x1 stem convolution keeps a padding of 1 (mdistiller's), so its maps are 2 px wider than
# the input before any stride, and each stride-2 3x3 convolution (padding 1) after it rounds the size up.
STEM_PADDING = {"mobilenetv2_tinyimagenet": 1}


def _reduces(arch: str, size: int, reduction: int, side: int) -> bool:
    """Whether a ``side`` px map is a ``size`` px input reduced ``reduction`` times (exactly: side * reduction ==
    size; with a padded stem, side == ceil((size + 2 * padding) / reduction))."""
    pad = STEM_PADDING.get(arch)
    if pad is None:
        return side * reduction == size
    return side == -(-(size + 2 * pad) // reduction)


def _randomise_bn_(model: nn.Module) -> None:
    """Non-trivial BN statistics and affine parameters, so eval-mode BN and the state round trip matter."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_(0.0, 0.2)


class Bundle:
    """One eval-mode model and everything the per-model tests read from it (built once per arch)."""

    def __init__(self, arch: str) -> None:
        torch.manual_seed(0)
        self.arch = arch
        self.model = build_model(arch).eval()
        _randomise_bn_(self.model)
        self.x = torch.randn(2, 3, 32, 32)
        self.declared = [spec.name for spec in self.model.feature_info]
        self.names = [name for name in self.declared if name != "pool_input"]  # forward_features' list
        with torch.no_grad():
            self.logits = self.model(self.x)
            self.post, self.post_logits = forward_features(self.model, self.x, preact=False)
            self.pre, self.pre_logits = forward_features(self.model, self.x, preact=True)

    def feature(self, name: str, preact: bool) -> torch.Tensor:
        return (self.pre if preact else self.post)[self.names.index(name)]


@pytest.fixture(scope="module")
def bundle(request: pytest.FixtureRequest) -> Bundle:
    """Built once per architecture; tests choose the list with ``@over(ARCHS)`` or ``@over(FIXTURE_ARCHS)``."""
    return Bundle(request.param)


def over(archs: list[str]):
    return pytest.mark.parametrize("bundle", archs, indirect=True)


# ---------------------------------------------------------------- registry


def test_the_registry_holds_the_reference_zoo() -> None:
    names = list_models()
    assert len(set(names)) == len(names)
    assert set(FIXTURE) <= set(names)


def test_names_are_case_insensitive() -> None:
    for arch in ARCHS:
        assert MODELS.canonical(arch.upper()) == arch
        assert MODELS.canonical(arch.lower()) == arch
    model = build_model("RESNET8")
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == dict(
        (name, shape) for name, shape in FIXTURE["resnet8"]["state_dict"])
    assert type(build_model("mobilenetv2")) is type(build_model("MobileNetV2"))


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(UserError) as info:
        build_model("resnet9000")
    message = str(info.value)
    assert "resnet9000" in message
    for arch in ARCHS:
        assert arch in message


@pytest.mark.parametrize("bad", [0, -3, 2.5, "100", True])
def test_bad_num_classes_is_a_user_error(bad: object) -> None:
    with pytest.raises(UserError, match="num_classes"):
        build_model("resnet8", num_classes=bad)  # type: ignore[arg-type]


def test_num_classes_sets_the_classifier_width() -> None:
    model = build_model("wrn_16_1", num_classes=10).eval()
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


# ---------------------------------------------------------------- per architecture: checkpoint facts


@over(ARCHS)
def test_logits_shape(bundle: Bundle) -> None:
    assert list(bundle.logits.shape) == [2, 100]
    assert torch.isfinite(bundle.logits).all()


@over(FIXTURE_ARCHS)
def test_parameter_count(bundle: Bundle) -> None:
    assert sum(p.numel() for p in bundle.model.parameters()) == FIXTURE[bundle.arch]["n_params"]


@over(FIXTURE_ARCHS)
def test_state_dict_names_and_shapes(bundle: Bundle) -> None:
    ours = {name: list(t.shape) for name, t in bundle.model.state_dict().items()}
    reference = {name: shape for name, shape in FIXTURE[bundle.arch]["state_dict"]}
    assert sorted(set(reference) - set(ours)) == [], "missing"
    assert sorted(set(ours) - set(reference)) == [], "unexpected"
    assert ours == reference


@over(ARCHS)
def test_state_dict_round_trip_strict(bundle: Bundle) -> None:
    buffer = io.BytesIO()
    torch.save(bundle.model.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    torch.manual_seed(1)
    fresh = build_model(bundle.arch).eval()
    with torch.no_grad():
        assert not torch.equal(fresh(bundle.x), bundle.logits)  # otherwise the check below proves nothing
        fresh.load_state_dict(state, strict=True)
        assert torch.equal(fresh(bundle.x), bundle.logits)


# ---------------------------------------------------------------- per architecture: features


@over(FIXTURE_ARCHS)
@pytest.mark.parametrize("preact", [False, True])
def test_feature_shapes(bundle: Bundle, preact: bool) -> None:
    feats = bundle.pre if preact else bundle.post
    key = "feat_shapes_preact" if preact else "feat_shapes"
    assert [list(f.shape) for f in feats] == FIXTURE[bundle.arch][key]


@over(ARCHS)
def test_features_are_stem_stages_and_embedding(bundle: Bundle) -> None:
    num_stages = len(bundle.post) - 2
    assert num_stages >= 1
    assert bundle.declared == ["stem", *[f"stage{i}" for i in range(1, num_stages + 1)], "pool_input", "embedding"]
    assert [f.shape for f in bundle.pre] == [f.shape for f in bundle.post]


@over(ARCHS)
def test_tapping_does_not_change_logits(bundle: Bundle) -> None:
    assert torch.equal(bundle.post_logits, bundle.logits)
    assert torch.equal(bundle.pre_logits, bundle.logits)


@over(ARCHS)
def test_embedding_is_the_classifier_input(bundle: Bundle) -> None:
    spec = bundle.model.feature_info[-1]
    assert spec.name == "embedding" and spec.module_input
    classifier = bundle.model.get_submodule(spec.module)
    embedding = bundle.feature("embedding", preact=False)
    assert embedding.dim() == 2
    with torch.no_grad():
        torch.testing.assert_close(classifier(embedding), bundle.logits, rtol=0, atol=0)


@over(ARCHS)
def test_pool_input_is_the_map_the_embedding_averages(bundle: Bundle) -> None:
    """The declared pool input, hooked on its own, averaged over its map is the embedding (and has the declared
    channels and reduction); the classifier the embedding enters is a Linear whose weight matches them."""
    from distiller.features import CLASSIFIER, POOL_INPUT, FeatureHooks

    with FeatureHooks(bundle.model, {POOL_INPUT, CLASSIFIER}) as hooks, torch.no_grad():
        logits = bundle.model(bundle.x)
        got = hooks.select(hooks.pop(), logits, {POOL_INPUT, CLASSIFIER})
    info = next(i for i in bundle.model.feature_info if i.name == "pool_input")
    assert got.pool_input.dim() == 4 and got.pool_input.shape[1] == info.channels
    assert _reduces(bundle.arch, 32, info.reduction, got.pool_input.shape[-1])
    embedding = bundle.feature("embedding", preact=False)
    torch.testing.assert_close(got.pool_input.double().mean((2, 3)), embedding.double(), rtol=1e-5, atol=1e-6)
    weight, bias = got.classifier
    torch.testing.assert_close(embedding @ weight.T + bias, logits, rtol=1e-5, atol=1e-5)


@over(ARCHS)
def test_no_hooks_remain(bundle: Bundle) -> None:
    for name, module in bundle.model.named_modules():
        assert not module._forward_hooks, name
        assert not module._forward_pre_hooks, name


@over(ARCHS)
def test_stem_and_embedding_have_no_separate_preact(bundle: Bundle) -> None:
    for name in ("stem", "embedding"):
        assert torch.equal(bundle.feature(name, preact=True), bundle.feature(name, preact=False))


@over(ARCHS)
def test_preact_relation(bundle: Bundle) -> None:
    """Each stage's preact tap against an independent computation of the family's semantics."""
    model, family = bundle.model, _family(bundle.arch)
    stages = [n for n in bundle.names if n.startswith("stage")]
    for i, name in enumerate(stages, start=1):
        pre, post = bundle.feature(name, preact=True), bundle.feature(name, preact=False)
        if (family == "mobilenetv2" or family == "declared" and torch.equal(pre, post)
                or family == "relu6_head" and i < len(stages)):
            assert torch.equal(pre, post)  # blocks end in a linear BN: no activation to strip
            continue
        assert (pre < 0).any(), f"{name}: preact has no negative values (overwritten in place?)"
        if family == "wrn":
            # stage i is a raw residual sum; its preact is the BN the forward applies next.
            bn = model.bn1 if i == len(stages) else model.get_submodule(f"block{i + 1}.layer.0.bn1")
            with torch.no_grad():
                torch.testing.assert_close(pre, bn(post))
            assert (post < 0).any()  # pre-activation WRN: stage outputs are not ReLU'd
        elif family == "relu6_head":
            assert torch.equal(pre.clamp(0.0, 6.0), post)
        else:  # ShuffleV2 too: its preact is kept in the output's (shuffled) channel order
            assert torch.equal(torch.relu(pre), post)


@over(ARCHS)
@pytest.mark.parametrize("preact", [False, True])
def test_taps_fire_once_and_are_never_modified_in_place(bundle: Bundle, preact: bool) -> None:
    """Own hooks (not distiller.features): each tap module runs once, and its tensor's version counter
    does not move between the hook and the end of the forward (no in-place op touches it)."""
    seen: dict[str, list[tuple[torch.Tensor, int]]] = {}
    handles = []

    def record(name: str, tensor: torch.Tensor) -> None:
        seen.setdefault(name, []).append((tensor, tensor._version))

    for spec in bundle.model.feature_info:
        path, take_input = ((spec.preact, spec.preact_input) if (preact and spec.preact is not None)
                            else (spec.module, spec.module_input))
        module = bundle.model.get_submodule(path)
        if take_input:
            handles.append(module.register_forward_pre_hook(lambda m, args, n=spec.name: record(n, args[0])))
        else:
            handles.append(module.register_forward_hook(lambda m, args, out, n=spec.name: record(n, out)))
    try:
        with torch.no_grad():
            bundle.model(bundle.x)
    finally:
        for handle in handles:
            handle.remove()
    assert sorted(seen) == sorted(bundle.declared)
    for name, calls in seen.items():
        assert len(calls) == 1, f"{name}: tap module ran {len(calls)} times"
        tensor, version = calls[0]
        assert tensor._version == version, f"{name}: modified in place after it was tapped"


@over(ARCHS)
def test_train_mode_backward_through_taps(bundle: Bundle) -> None:
    """Gradients flow through every tapped feature in train mode (in-place ops stay autograd-safe)."""
    torch.manual_seed(2)
    model = build_model(bundle.arch).train()
    feats, logits = forward_features(model, bundle.x, preact=True)
    loss = logits.sum() + sum(f.float().pow(2).mean() for f in feats)
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


# mdistiller's get_bn_before_relu (the BatchNorm before each stage's final ReLU), per family:
# ResNet: the last block's bn2 (bn3 in bottlenecks); WRN: the next group's first bn1, the final bn1
# for the last stage; VGG: each block's last BN; MobileNetV2: the group's last block's linear BN.
BN_BEFORE_RELU = {
    "resnet8": ["layer1.0.bn2", "layer2.0.bn2", "layer3.0.bn2"],
    "resnet56": ["layer1.8.bn2", "layer2.8.bn2", "layer3.8.bn2"],
    "resnet110": ["layer1.17.bn2", "layer2.17.bn2", "layer3.17.bn2"],
    "resnet32x4": ["layer1.4.bn2", "layer2.4.bn2", "layer3.4.bn2"],
    "ResNet18": ["layer1.1.bn2", "layer2.1.bn2", "layer3.1.bn2", "layer4.1.bn2"],
    "ResNet50": ["layer1.2.bn3", "layer2.3.bn3", "layer3.5.bn3", "layer4.2.bn3"],
    "wrn_40_2": ["block2.layer.0.bn1", "block3.layer.0.bn1", "bn1"],
    "vgg8": ["block1.1", "block2.1", "block3.1", "block4.1"],
    "vgg13": ["block1.4", "block2.4", "block3.4", "block4.4"],
    "MobileNetV2": ["blocks.1.1.conv.7", "blocks.2.2.conv.7", "blocks.4.2.conv.7", "blocks.6.0.conv.7"],
    "ShuffleV1": ["layer1.3.bn3", "layer2.7.bn3", "layer3.3.bn3"],
}


@over(ARCHS)
def test_declared_channels_and_reduction_match_the_forward(bundle: Bundle) -> None:
    """feature_info's channels and reduction are what a real 32 px forward produces."""
    infos = [i for i in bundle.model.feature_info if i.name != "pool_input"]  # forward_features' list
    for info, feat in zip(infos, bundle.post, strict=True):
        assert feat.shape[1] == info.channels, info.name
        if info.reduction is None:
            assert feat.dim() == 2, info.name
        else:
            assert _reduces(bundle.arch, 32, info.reduction, feat.shape[-1]), info.name
            assert _reduces(bundle.arch, 32, info.reduction, feat.shape[-2]), info.name


@over(ARCHS)
def test_declared_batchnorm_produces_the_preactivation(bundle: Bundle) -> None:
    """The declared BN is a BatchNorm2d of the stage's width, and its output is the pre-activation map
    (or the residual branch added into it): hooking it sees the same shape, and for WRN and VGG,
    whose pre-activation *is* that BN's output, the very same tensor values."""
    stages = [i for i in bundle.model.feature_info if i.is_stage]
    if bundle.arch == "ShuffleV2":  # half the pre-activation channels bypass every BN
        assert all(i.bn is None for i in stages)
        return
    outputs = {}
    handles = [bundle.model.get_submodule(i.bn).register_forward_hook(
        lambda m, a, out, n=i.name: outputs.__setitem__(n, out.detach().clone())) for i in stages]
    try:
        with torch.no_grad():
            bundle.model(bundle.x)
    finally:
        for h in handles:
            h.remove()
    for i in stages:
        bn = bundle.model.get_submodule(i.bn)
        assert isinstance(bn, torch.nn.BatchNorm2d) and bn.num_features == i.channels
        pre = bundle.feature(i.name, preact=True)
        assert outputs[i.name].shape == pre.shape
        if bundle.arch.startswith(("wrn", "vgg")):
            assert torch.equal(outputs[i.name], pre), i.name
    if bundle.arch in BN_BEFORE_RELU:
        assert [i.bn for i in stages] == BN_BEFORE_RELU[bundle.arch]



@pytest.mark.parametrize("arch", list_models())
def test_runs_at_64_px_with_a_global_pool(arch: str) -> None:
    """At 64x64 (an image folder such as Tiny-ImageNet) the final pool still covers the whole map: the
    embedding has the same width as at 32 px, and the maps shrink stage by stage. (The declared
    reductions hold at 32 px; VGG, like its reference, pools once more at 64 px.)"""
    model = build_model(arch, num_classes=10).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        feats64, logits64 = forward_features(model, torch.randn(2, 3, 64, 64, generator=gen))
        feats32, _ = forward_features(model, torch.randn(2, 3, 32, 32, generator=gen))
    assert logits64.shape == (2, 10)
    assert feats64[-1].shape == feats32[-1].shape and feats64[-1].dim() == 2
    sizes = [feat.shape[-1] for feat in feats64[:-1]]
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] >= feats32[-2].shape[-1]
