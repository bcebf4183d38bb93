"""Evaluation runs in fp32 by default even when training autocasts to bf16 (``trainer.eval_precision``).

The probe network's logits are a bias-free ``Linear(1, C)`` applied to a constant 1, so its logits
are its weights: exactly ``w`` in fp32, and ``w`` rounded to bf16 under bf16 autocast (a product
with 1 is exact, so the only rounding is the cast of ``w``, the same on every CPU). ``w[0]`` is
``2 + 2**-8``: exact in fp32, and 2.0 in bf16 (its spacing on [2, 4) is ``2**-6``). The expected
losses are computed here in float64 from those two sets of logits.
"""
from __future__ import annotations

import math

import pytest
import torch
from helpers import generator, random_splits
from torch import nn

from common.errors import UserError
from datasets.device_loader import DeviceLoader
from distiller.engine.evaluation import measure
from distiller.engine.runtime import Runtime, make_runtime, resolve_eval_precision

CPU = torch.device("cpu")
W_FP32 = [2.0 + 2.0 ** -8, 0.5, -1.0, 0.25]  # every value exact in fp32
W_BF16 = [2.0, 0.5, -1.0, 0.25]  # the same rounded to bf16 by hand: only w[0] moves


class ConstantLogits(nn.Module):
    """Logits = W applied to a constant 1: the weights themselves, in whatever precision the forward runs."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(1, len(W_FP32), bias=False)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor(W_FP32).reshape(-1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(images.new_ones(images.shape[0], 1))


def _loader(n: int = 40) -> tuple[DeviceLoader, list[int]]:
    labels = torch.arange(n) % len(W_FP32)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=generator(3))
    return DeviceLoader(images, labels, 16, CPU, train=False), labels.tolist()


def _expected(logits: list[float], labels: list[int]) -> dict[str, float]:
    """Mean cross-entropy and top-1 in float64, image by image."""
    lse = math.log(sum(math.exp(v) for v in logits))
    loss = sum(lse - logits[y] for y in labels) / len(labels)
    best = max(range(len(logits)), key=lambda c: logits[c])
    return {"test_loss": loss, "test_top1": 100.0 * sum(y == best for y in labels) / len(labels)}


def test_the_probe_really_differs_between_fp32_and_bf16():
    """The premise: bf16 rounding moves the probe's loss by about 1e-3, far beyond fp32's ~1e-7."""
    _, labels = _loader()
    gap = abs(_expected(W_FP32, labels)["test_loss"] - _expected(W_BF16, labels)["test_loss"])
    assert gap > 5e-4
    assert torch.tensor(W_FP32).bfloat16().float().tolist() == W_BF16


def test_bf16_training_evaluates_in_fp32_by_default():
    runtime = Runtime(CPU, "bf16", channels_last=False, compile=False)
    assert runtime.eval_precision == "fp32"
    loader, labels = _loader()
    result = measure(ConstantLogits(), loader, runtime)
    expected = _expected(W_FP32, labels)
    assert result["test_loss"] == pytest.approx(expected["test_loss"], rel=1e-6, abs=1e-6)
    assert result["test_top1"] == expected["test_top1"]


def test_eval_precision_same_runs_under_the_training_autocast():
    runtime = Runtime(CPU, "bf16", channels_last=False, compile=False, eval_precision="bf16")
    loader, labels = _loader()
    result = measure(ConstantLogits(), loader, runtime)
    expected = _expected(W_BF16, labels)
    assert result["test_loss"] == pytest.approx(expected["test_loss"], rel=1e-6, abs=1e-6)


def test_a_real_network_is_evaluated_as_its_fp32_forward():
    """resnet8 under a bf16-training runtime: loss and top-1 equal an fp32 forward of the same batches
    done here, scored image by image in float64."""
    from models import build_model

    torch.manual_seed(0)
    model = build_model("resnet8", num_classes=10)
    splits = random_splits(64, 10, 5, 64)
    loader = DeviceLoader(splits.test_images, splits.test_labels, 32, CPU, train=False)
    result = measure(model, loader, Runtime(CPU, "bf16", channels_last=False, compile=False))
    model.eval()
    losses, hits = [], []
    with torch.no_grad():
        for batch in loader.epoch(0):
            logits = model(batch.images)
            assert logits.dtype == torch.float32
            for row, label in zip(logits.double(), batch.labels.tolist()):
                losses.append(float(torch.logsumexp(row, 0) - row[label]))
                hits.append(int(row.argmax()) == label)
    assert result["test_loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-5)
    assert result["test_top1"] == pytest.approx(100.0 * sum(hits) / len(hits))


@pytest.mark.parametrize("value, training, device, resolved", [
    (None, "bf16", "cpu", "fp32"), ("fp32", "bf16", "cpu", "fp32"), ("same", "bf16", "cpu", "bf16"),
    ("same", "fp32", "cpu", "fp32"), ("bf16", "fp32", "cpu", "bf16"), ("fp16", "bf16", "cuda", "fp16"),
])
def test_resolve_eval_precision(value, training, device, resolved):
    assert resolve_eval_precision(value, training, torch.device(device)) == resolved


@pytest.mark.parametrize("value, words", [("fp16", "needs a CUDA device"), ("fp8", "fp32, same, bf16 or fp16")])
def test_resolve_eval_precision_refuses(value, words):
    with pytest.raises(UserError, match=words):
        resolve_eval_precision(value, "bf16", CPU)


def test_config_default_and_override(compose):
    """The composed trainer config: fp32 by default, ``same`` follows trainer.precision."""
    cfg = compose("train_teacher", ["trainer.device=cpu", "trainer.precision=bf16"])
    assert cfg.trainer.eval_precision == "fp32"
    assert make_runtime(cfg.trainer).eval_precision == "fp32"
    cfg = compose("train_teacher", ["trainer.device=cpu", "trainer.precision=bf16", "trainer.eval_precision=same"])
    assert make_runtime(cfg.trainer).eval_precision == "bf16"
