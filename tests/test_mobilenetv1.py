"""MobileNet-V1 in the zoo against the published figures and mdistiller's layout, and its feature contract.

Independent facts: the parameter count summed layer by layer by hand (and the paper's 4.2 M,
Howard et al. 2017, Table 8, "1.0 MobileNet-224"), mdistiller's parameter names and stage
shapes at 224 px, ReLU of each preact tap, the declared BatchNorm's output, the classifier
on the embedding.
"""
from __future__ import annotations

import pytest
import torch
from helpers import randomize_batchnorm
from torch import nn

from distiller.features import forward_features
from models import MODELS, build_model, model_metadata

WIDTHS = [(32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1), (256, 512, 2),
          *[(512, 512, 1)] * 5, (512, 1024, 2), (1024, 1024, 1)]  # (in, out, stride) of blocks 1..13


def by_hand_parameters(num_classes: int) -> int:
    """Stem conv + BN, each block's depthwise 3x3 + BN and pointwise 1x1 + BN, then fc: weights and biases."""
    total = 3 * 32 * 9 + 2 * 32
    for inp, out, _ in WIDTHS:
        total += inp * 9 + 2 * inp + inp * out + 2 * out
    return total + 1024 * num_classes + num_classes


def mdistiller_names() -> dict[str, list[int]]:
    """mdistiller's MobileNetV1 state dict (model.{i}.{j}, fc) with shapes, written out from its layout."""
    def bn(prefix: str, c: int) -> dict[str, list[int]]:
        return {f"{prefix}.weight": [c], f"{prefix}.bias": [c], f"{prefix}.running_mean": [c],
                f"{prefix}.running_var": [c], f"{prefix}.num_batches_tracked": []}

    names = {"model.0.0.weight": [32, 3, 3, 3], **bn("model.0.1", 32)}
    for i, (inp, out, _) in enumerate(WIDTHS, start=1):
        names.update({f"model.{i}.0.weight": [inp, 1, 3, 3], **bn(f"model.{i}.1", inp),
                      f"model.{i}.3.weight": [out, inp, 1, 1], **bn(f"model.{i}.4", out)})
    return {**names, "fc.weight": [1000, 1024], "fc.bias": [1000]}


@pytest.fixture(scope="module")
def net() -> nn.Module:
    torch.manual_seed(0)
    model = build_model("MobileNetV1", num_classes=1000).eval()
    randomize_batchnorm(model)  # non-trivial BN statistics, so eval-mode BN matters
    return model


@pytest.fixture(scope="module")
def run(net: nn.Module) -> dict:
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = net(x)
        post, _ = forward_features(net, x, preact=False)
        pre, _ = forward_features(net, x, preact=True)
    return {"x": x, "logits": logits, "post": post, "pre": pre}


def test_registered_by_its_reference_name() -> None:
    assert MODELS.canonical("mobilenetv1") == "MobileNetV1"
    assert model_metadata("MobileNetV1")["lr"] == 0.05  # the zoo's default; ImageNet recipes set their own


def test_parameter_count_is_the_published_one(net: nn.Module) -> None:
    count = sum(p.numel() for p in net.parameters())
    assert count == by_hand_parameters(1000)
    assert round(count / 1e6, 1) == 4.2  # Howard et al. 2017, Table 8
    assert sum(p.numel() for p in build_model("MobileNetV1", num_classes=100).parameters()) == by_hand_parameters(100)


def test_state_dict_has_mdistillers_names_and_shapes(net: nn.Module) -> None:
    assert {k: list(v.shape) for k, v in net.state_dict().items()} == mdistiller_names()


def test_shapes_at_224_px(run: dict) -> None:
    assert run["logits"].shape == (1, 1000)
    shapes = [tuple(f.shape) for f in run["post"]]
    assert shapes == [(1, 32, 112, 112), (1, 128, 56, 56), (1, 256, 28, 28), (1, 512, 14, 14), (1, 1024, 7, 7),
                      (1, 1024)]
    assert [tuple(f.shape) for f in run["pre"]] == shapes


def test_declared_channels_and_reductions(net: nn.Module, run: dict) -> None:
    names = [info.name for info in net.feature_info]
    assert names == ["stem", "stage1", "stage2", "stage3", "stage4", "pool_input", "embedding"]
    for info, feature in zip([i for i in net.feature_info if i.name != "pool_input"], run["post"], strict=True):
        assert feature.shape[1] == info.channels
        if info.reduction is None:
            assert feature.dim() == 2
        else:
            assert feature.shape[-1] * info.reduction == 224


def test_preact_is_the_batchnorm_output_before_the_stage_relu(net: nn.Module, run: dict) -> None:
    outputs = {}
    stages = [info for info in net.feature_info if info.is_stage]
    handles = [net.get_submodule(info.bn).register_forward_hook(
        lambda m, a, out, n=info.name: outputs.__setitem__(n, out.clone())) for info in stages]
    try:
        with torch.no_grad():
            net(run["x"])
    finally:
        for handle in handles:
            handle.remove()
    assert [info.bn for info in stages] == ["model.3.4", "model.5.4", "model.11.4", "model.13.4"]  # mdistiller's
    for k, info in enumerate(stages, start=1):
        pre, post = run["pre"][k], run["post"][k]
        assert (pre < 0).any(), info.name  # not overwritten by an in-place ReLU
        assert torch.equal(torch.relu(pre), post)
        assert torch.equal(outputs[info.name], pre)
    assert torch.equal(run["pre"][0], run["post"][0])  # the stem has no separate preact


def test_taps_fire_once_and_are_never_modified_in_place(net: nn.Module, run: dict) -> None:
    seen: dict[str, list[tuple[torch.Tensor, int]]] = {}
    handles = []
    for preact in (False, True):
        for info in net.feature_info:
            if preact and info.preact is None:
                continue  # the stem and the embedding: the post tap is the only one
            use_pre = preact
            path = info.preact if use_pre else info.module
            take_input = info.preact_input if use_pre else info.module_input
            key = f"{info.name}{'/pre' if use_pre else ''}"
            module = net.get_submodule(path)
            if take_input:
                handles.append(module.register_forward_pre_hook(
                    lambda m, args, k=key: seen.setdefault(k, []).append((args[0], args[0]._version))))
            else:
                handles.append(module.register_forward_hook(
                    lambda m, args, out, k=key: seen.setdefault(k, []).append((out, out._version))))
    try:
        with torch.no_grad():
            net(run["x"][:, :, :64, :64])
    finally:
        for handle in handles:
            handle.remove()
    assert len(seen) == 7 + 4  # stem, 4 stages, the pool input, the embedding; 4 pre-activation maps
    for key, calls in seen.items():
        assert len(calls) == 1, key
        tensor, version = calls[0]
        assert tensor._version == version, f"{key}: modified in place after it was tapped"


def test_embedding_is_the_classifier_input(net: nn.Module, run: dict) -> None:
    with torch.no_grad():
        assert torch.equal(net.fc(run["post"][-1]), run["logits"])


def test_any_resolution_and_class_count_train_backward() -> None:
    model = build_model("MobileNetV1", num_classes=10).train()
    feats, logits = forward_features(model, torch.randn(2, 3, 32, 32), preact=True)
    assert logits.shape == (2, 10) and feats[-2].shape == (2, 1024, 1, 1)
    (logits.sum() + sum(f.pow(2).mean() for f in feats)).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
