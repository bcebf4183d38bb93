"""The zoo's ``mobilenetv2_tinyimagenet`` against mdistiller's layout, and as the student of a Tiny-ImageNet run.

Independent facts, typed from mdistiller's ``mobilenetv2_tinyimagenet`` (mdistiller/models/cifar/mv2_tinyimagenet.py
at a08d46f): its constructor's stage table, from which a loop writes the parameter names and shapes and sums the
parameters by hand; map sizes worked out by hand (a 1x1 stem conv with padding 1: 64 -> 66 px, then each stride-2
3x3 conv with padding 1 rounds up: 33, 17, 9); the identity added exactly where a block keeps its shape (seen by
zeroing each block's last BatchNorm); ReLU6 (a clamp at 0 and 6) between the head's BatchNorm and its output; the
classifier as the 1x1 convolution its saved weight describes.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import generator, random_teacher_file, randomize_batchnorm, write_image_folder
from torch import nn

from datasets import DataSplits
from distiller.engine.checkpoints import load_weights
from distiller.features import classifier_of, forward_features
from distiller.jobs.train import distill
from models import MODELS, build_model, model_metadata

ARCH = "mobilenetv2_tinyimagenet"
# stage -> (blocks, in channels, out channels, stride of the first block, expansion): mdistiller's constructor
STAGES = {1: (1, 32, 16, 1, 1), 2: (2, 16, 24, 2, 6), 3: (3, 24, 32, 2, 6), 4: (4, 32, 64, 2, 6),
          5: (3, 64, 96, 1, 6), 6: (3, 96, 160, 1, 6), 7: (1, 160, 320, 1, 6)}


def blocks() -> list[tuple[str, int, int, int, int]]:
    """(path, in, out, stride, expansion) of every block; a one-block stage is the block itself (``stage1``)."""
    out = []
    for k, (n, inp, width, stride, t) in STAGES.items():
        for i in range(n):
            out.append((f"stage{k}" if n == 1 else f"stage{k}.{i}", inp if i == 0 else width, width,
                        stride if i == 0 else 1, t))
    return out


def mdistiller_state(num_classes: int) -> dict[str, list[int]]:
    """mdistiller's state dict, names and shapes; every convolution has a bias (PyTorch's Conv2d default)."""
    def conv(prefix: str, out: int, per_group: int, k: int) -> dict[str, list[int]]:
        return {f"{prefix}.weight": [out, per_group, k, k], f"{prefix}.bias": [out]}

    def bn(prefix: str, c: int) -> dict[str, list[int]]:
        return {f"{prefix}.weight": [c], f"{prefix}.bias": [c], f"{prefix}.running_mean": [c],
                f"{prefix}.running_var": [c], f"{prefix}.num_batches_tracked": []}

    names = {**conv("pre.0", 32, 3, 1), **bn("pre.1", 32)}
    for path, inp, out, _, t in blocks():
        hidden = inp * t
        names.update({**conv(f"{path}.residual.0", hidden, inp, 1), **bn(f"{path}.residual.1", hidden),
                      **conv(f"{path}.residual.3", hidden, 1, 3), **bn(f"{path}.residual.4", hidden),
                      **conv(f"{path}.residual.6", out, hidden, 1), **bn(f"{path}.residual.7", out)})
    return {**names, **conv("conv1.0", 1280, 320, 1), **bn("conv1.1", 1280), **conv("conv2", num_classes, 1280, 1)}


def by_hand_parameters(num_classes: int) -> int:
    """Weights and biases layer by layer: stem conv + BN, each block's three convs + BNs, head conv + BN, classifier."""
    total = (3 * 32 + 32) + 2 * 32
    for _, inp, out, _, t in blocks():
        h = inp * t
        total += (inp * h + h) + 2 * h + (9 * h + h) + 2 * h + (h * out + out) + 2 * out
    return total + (320 * 1280 + 1280) + 2 * 1280 + (1280 * num_classes + num_classes)


@pytest.fixture(scope="module")
def net() -> nn.Module:
    torch.manual_seed(0)
    model = build_model(ARCH, num_classes=200).eval()
    randomize_batchnorm(model)  # non-trivial BN statistics, so eval-mode BN matters
    return model


def test_registered_by_mdistillers_name() -> None:
    assert MODELS.canonical("MobileNetV2_TinyImageNet") == ARCH
    assert model_metadata(ARCH)["lr"] == 0.05  # the zoo's default; the Tiny-ImageNet recipe sets its own
    assert type(build_model(ARCH)) is not type(build_model("MobileNetV2"))  # not the CIFAR network


def test_state_dict_has_mdistillers_names_and_shapes(net: nn.Module) -> None:
    assert {k: list(v.shape) for k, v in net.state_dict().items()} == mdistiller_state(200)
    assert {k: list(v.shape) for k, v in build_model(ARCH, num_classes=7).state_dict().items()} == mdistiller_state(7)


def test_parameter_count_by_hand(net: nn.Module) -> None:
    assert sum(p.numel() for p in net.parameters()) == by_hand_parameters(200) == 2_497_480
    assert sum(p.numel() for p in build_model(ARCH, num_classes=100).parameters()) == by_hand_parameters(100)


def test_a_checkpoint_in_mdistillers_form_loads_as_it_is(net: nn.Module, tmp_path: Path) -> None:
    gen = generator(3)
    state = {k: torch.randn(shape, generator=gen) if shape else torch.tensor(5)
             for k, shape in mdistiller_state(200).items()}
    state = {k: v.abs() + 0.5 if k.endswith("running_var") else v for k, v in state.items()}
    torch.save({"model": state, "epoch": 200}, tmp_path / "student_best")
    model = build_model(ARCH, num_classes=200)
    load_weights(model, tmp_path / "student_best", ARCH)  # strict, after comparing names and shapes
    saved = model.state_dict()
    assert saved.keys() == state.keys() and all(torch.equal(saved[k], state[k]) for k in state)
    assert list(model.conv2.weight.shape) == [200, 1280]  # a Linear's weight, for the methods that read it


@pytest.mark.parametrize("classes", [200, 100, 7])
def test_a_file_without_an_architecture_is_recognised_at_any_class_count(classes: int) -> None:
    """Its classifier is saved as a 1x1 convolution: the class count comes from there (mdistiller's names and
    shapes, built by hand)."""
    from distiller.engine.checkpoints import guess_architecture

    state = {k: torch.zeros(shape) for k, shape in mdistiller_state(classes).items()}
    assert guess_architecture(state) == ARCH


def test_shapes_at_64_px(net: nn.Module) -> None:
    x = torch.randn(2, 3, 64, 64, generator=generator(1))
    with torch.no_grad():
        post, logits = forward_features(net, x)
        pre, _ = forward_features(net, x, preact=True)
    assert logits.shape == (2, 200)
    expected = [(2, 32, 66, 66), (2, 24, 33, 33), (2, 32, 17, 17), (2, 64, 9, 9), (2, 1280, 9, 9), (2, 1280)]
    assert [tuple(f.shape) for f in post] == [tuple(f.shape) for f in pre] == expected
    assert [info.name for info in net.feature_info] == ["stem", "stage1", "stage2", "stage3", "stage4", "pool_input",
                                                        "embedding"]
    assert [info.module for info in net.feature_info] == ["pre", "stage2", "stage3", "stage4", "conv1", "pool", "conv2"]
    assert [info.reduction for info in net.feature_info] == [1, 2, 4, 8, 8, 8, None]


def test_identity_is_added_exactly_where_a_block_keeps_its_shape(net: nn.Module) -> None:
    """With its last BatchNorm zeroed, a block's branch gives 0: the block returns its input where the identity is
    added (stride 1 and as many channels out as in), zeros elsewhere."""
    model = build_model(ARCH, num_classes=200).eval()
    kept = 0
    for path, inp, out, stride, _ in blocks():
        block = model.get_submodule(path)
        with torch.no_grad():
            block.residual[7].weight.zero_()
            block.residual[7].bias.zero_()
            x = torch.randn(2, inp, 6, 6, generator=generator(2))
            y = block(x)
        assert y.shape == (2, out, 6 // stride, 6 // stride)
        if stride == 1 and inp == out:
            kept += 1
            assert torch.equal(y, x), path
        else:
            assert not y.any(), path
    assert kept == 1 + 2 + 3 + 2 + 2  # every block after a stage's first; stage5.0 and stage6.0 widen at stride 1


def test_stage4_is_the_head_after_relu6_and_the_others_end_linear(net: nn.Module) -> None:
    model = build_model(ARCH, num_classes=200).eval()
    with torch.no_grad():
        model.conv1[1].weight.fill_(50.0)  # a wide BN output, so values above 6 occur and ReLU6 differs from ReLU
        x = torch.randn(2, 3, 32, 32, generator=generator(4))
        seen = {}
        handle = model.conv1[1].register_forward_hook(lambda m, a, out: seen.setdefault("bn", out.clone()))
        post, _ = forward_features(model, x)
        handle.remove()
        pre, _ = forward_features(model, x, preact=True)
    assert (pre[4] > 6).any() and (pre[4] < 0).any()
    assert torch.equal(pre[4], seen["bn"]) and torch.equal(post[4], pre[4].clamp(0.0, 6.0))
    for k in range(4):  # the stem (after ReLU6) and stages 1-3 (a linear BN, plus the identity): no separate preact
        assert torch.equal(pre[k], post[k])
    assert [info.bn for info in model.feature_info if info.is_stage] == [
        "stage2.1.residual.7", "stage3.2.residual.7", "stage4.3.residual.7", "conv1.1"]


def test_the_classifier_is_the_1x1_convolution_it_saves(net: nn.Module) -> None:
    x = torch.randn(2, 3, 64, 64, generator=generator(5))
    state = net.state_dict()
    with torch.no_grad():
        feats, logits = forward_features(net, x)
        head = F.adaptive_avg_pool2d(feats[4], 1)  # mdistiller's pool, then its conv2
        theirs = F.conv2d(head.double(), state["conv2.weight"].double(), state["conv2.bias"].double()).flatten(1)
    torch.testing.assert_close(logits.double(), theirs, rtol=1e-5, atol=1e-5)
    assert classifier_of(net) is net.conv2  # a Linear: the embedding is the pooled vector
    torch.testing.assert_close(feats[-1], head.flatten(1))


def test_one_epoch_as_the_student_of_the_tiny_imagenet_preset(compose, tmp_path: Path) -> None:
    """experiment=tiny_imagenet/r18_mv2/dot, composed and run by the job in process on a 3-class image folder, one
    epoch (32 px images keep it fast; the network runs at any size, 64 px above)."""
    gen = generator(6)
    images = torch.randint(0, 256, (9, 3, 32, 32), dtype=torch.uint8, generator=gen)
    labels = torch.arange(9) % 3
    write_image_folder(tmp_path / "images", DataSplits(images[:6], labels[:6], images[6:], labels[6:], 3,
                                                       ["0", "1", "2"]))
    _, teacher = random_teacher_file(tmp_path / "teachers", 3, name="ResNet18.pt", arch="ResNet18")
    run = tmp_path / "run"
    cfg = compose("train_student", ["experiment=tiny_imagenet/r18_mv2/dot", f"dataset.root={tmp_path / 'images'}",
                                    f"teacher.ckpt={teacher}", "trainer.epochs=1", "trainer.device=cpu",
                                    "trainer.progress=false", "trainer.eval_precision=fp32", "logger=none",
                                    "dataset.batch_size=2", "dataset.eval_batch_size=3"])
    distill(cfg, run)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "finished" and len(metrics["epochs"]) == 1
    record = metrics["epochs"][0]
    assert torch.isfinite(torch.tensor(record["train_loss"])) and record["loss_kd"] > 0
    final = torch.load(run / "final.pt", weights_only=True)
    assert final["num_classes"] == 3
    build_model(ARCH, num_classes=3).load_state_dict(final["model"], strict=True)
    assert list(final["model"]["conv2.weight"].shape) == [3, 1280, 1, 1]
    # 6 training images in batches of 2: every BatchNorm counted 3 batches
    assert {int(v) for k, v in final["model"].items() if k.endswith("num_batches_tracked")} == {3}
    config = (run / "config.yaml").read_text()
    assert f"name: {ARCH}" in config and "precision: fp32" in config and "name: dot" in config
