"""The fast path computes the same training as the plain fp32 path (CPU, a few steps, same init and batches).

Fast-path switches: bf16 autocast, channels_last memory format, torch.compile of the
networks (``distiller.engine.compile``). Each run builds a Trainer from the same seed (same
weights, helpers, memory banks and CRD negatives) on the same generated images, takes
a few optimisation steps, and is compared with the plain path (fp32, contiguous, eager):
the total loss of every step, and the parameter update ``theta_end - theta_start``.
Comparing updates rather than parameters matters: parameters are dominated by their
initial values, which both runs share, so they would agree even if the steps did not.
"""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from helpers import distill_node, random_splits, seed, tiny_trainer

from datasets.cifar100 import DataSplits
from distiller.contrast import ContrastMemory
from distiller.engine.compile import compile_module, compile_networks, is_compiled
from distiller.engine.loop import Trainer
from distiller.engine.runtime import Runtime, seed_everything
from models import build_model

NUM_CLASSES = 10
STEPS = 3
BATCH = 16
# 0.01 (the published lr of the MobileNetV2 / ShuffleNet students): at 0.05, AT's first step on
# random weights moves conv1 by a third of its norm, and what is compared after that is mostly
# how chaotic that regime is, not whether the fast path computes the same step.
LR = 0.01


def tiny_data(n: int = 64) -> DataSplits:
    return random_splits(n, NUM_CLASSES, 123, test_n=8)


def method_config(name: str) -> dict:
    """The published config of a method; CRD with few negatives so 64 images suffice."""
    node = distill_node(name)
    if name == "crd":
        node["nce_k"] = 16
    return node


def make_trainer(method: str, runtime: Runtime, tmp: Path, data: DataSplits):
    return tiny_trainer(tmp, method_config(method), 1, f"optim.lr={LR}", f"dataset.batch_size={BATCH}", data=data,
                        runtime=runtime)


def train_steps(trainer: Trainer, steps: int = STEPS) -> tuple[list[float], list[torch.Tensor]]:
    """Per-step total losses and the update of every main-phase parameter (fp32, contiguous)."""
    phase = trainer.plan[-1]
    optimizer = trainer.prepare_phase(phase)
    start = [p.detach().float().clone() for p in phase.parameters]
    seed_everything(seed(1))  # CRD draws its negatives from the global generator: same draws in both runs
    losses = []
    for batch, _ in zip(trainer.train_loader.epoch(1), range(steps)):
        total = trainer.train_step(batch, phase, 1, optimizer).total
        losses.append(float(total.detach()))
    updates = [p.detach().float().contiguous() - s for p, s in zip(phase.parameters, start)]
    return losses, updates


def relative_error(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """||a - b|| / ||b|| over all tensors together."""
    diff = torch.sqrt(sum(((x - y) ** 2).sum() for x, y in zip(a, b)))
    return float(diff / torch.sqrt(sum((y ** 2).sum() for y in b)))


def run(method: str, tmp: Path, precision: str = "fp32", channels_last: bool = False,
        backend: str | None = None, float64: bool = False) -> tuple[list[float], list[torch.Tensor]]:
    runtime = Runtime(torch.device("cpu"), precision, channels_last, compile=False)
    trainer = make_trainer(method, runtime, tmp, tiny_data())
    if float64:  # networks, helpers and batches in double precision (test instrumentation only)
        for module in (trainer.student, trainer.teacher, trainer.objective):
            module.double()
        for module in trainer.objective.modules():
            if isinstance(module, ContrastMemory):
                # CRD scores in float32 whatever its inputs' dtype: keep its banks float32 too. Two
                # float64 runs that agree to ~1e-16 round to the same float32 embedding except
                # where a value lies within 1e-16 of a float32 rounding boundary (~1e-9 per value)
                module.float()
        normalise = trainer.train_loader._normalise
        trainer.train_loader._normalise = lambda images: normalise(images).double()
    if backend is not None:  # in place, after the hooks and probes, as build_step does under trainer.compile
        compiling = Runtime(torch.device("cpu"), precision, channels_last, compile=True)
        compile_networks(compiling, trainer.student, trainer.teacher, backend=backend)
    try:
        return train_steps(trainer)
    finally:
        trainer.step.remove_hooks()


@pytest.mark.parametrize("method", ["kd", "at", "crd"])
def test_channels_last_matches_contiguous(method: str, tmp_path: Path) -> None:
    """channels_last changes only memory layout: the same steps, to rounding.

    Compared in float64. In fp32 the two layouts take different kernels (oneDNN or ATen,
    blocked by the CPU's vector width), whose rounding differs by machine: the channels_last
    BatchNorm kernel loses more precision when a channel's mean is large against its spread,
    and three steps of AT (beta = 1000) amplify a unit roundoff ~2e4-fold, to ~1e-3 of the
    update in fp32. In float64 the same amplification of 1.1e-16 is ~2e-12, so 1e-9 (and 1e-10
    on the losses) is far above rounding on every CPU, while a layout bug (a wrong permutation,
    a feature from the wrong place) is O(1).
    """
    ref_losses, ref_updates = run(method, tmp_path / "ref", float64=True)
    losses, updates = run(method, tmp_path / "cl", channels_last=True, float64=True)
    assert losses == pytest.approx(ref_losses, rel=1e-10)
    assert relative_error(updates, ref_updates) < 1e-9


@pytest.mark.parametrize("method", ["kd", "at", "crd"])
def test_bf16_channels_last_matches_fp32(method: str, tmp_path: Path) -> None:
    """The fast path (bf16 autocast + channels_last) trains like fp32 within bf16 rounding."""
    ref_losses, ref_updates = run(method, tmp_path / "ref")
    losses, updates = run(method, tmp_path / "fast", precision="bf16", channels_last=True)
    # bf16 keeps 8 significant bits: every conv/linear operand is rounded by up to 2^-9 (0.2 %),
    # products are accumulated in fp32. Losses are reduced in fp32 from logits / features that
    # carry ~0.1 % error (measured <= 7e-4 relative over these steps), hence 5e-3. The backward
    # pass also runs its convolutions in bf16 and BatchNorm's backward subtracts nearly equal
    # terms, so gradients differ by a few % (measured 1.5 % KD, 5 % CRD, 7 % AT against fp32 and
    # float64 alike); 15 % on the updates stays above that and far below what a wrong cast, a
    # lost feature or a dropped term produces (order one).
    assert losses == pytest.approx(ref_losses, rel=5e-3)
    assert relative_error(updates, ref_updates) < 0.15


@pytest.mark.parametrize("method", ["kd", "at"])
def test_compiled_capture_matches_eager(method: str, tmp_path: Path) -> None:
    """Networks compiled in place, with feature hooks feeding the loss, give eager's losses and updates.

    ``aot_eager`` is the inductor pipeline (Dynamo capture with the hooks inlined,
    AOTAutograd's joint forward/backward with BatchNorm decomposed into primitive ops) with
    the final graph run by eager kernels: it checks the capture in seconds; the inductor run
    is the slow test below. Compared in float64: the decomposed BatchNorm rounds differently
    from ATen's kernel (in fp32 that reaches ~1e-4 of the update), while a wrong graph would
    be off by far more than float64 rounding.
    """
    ref_losses, ref_updates = run(method, tmp_path / "ref", float64=True)
    losses, updates = run(method, tmp_path / "aot", backend="aot_eager", float64=True)
    assert losses == pytest.approx(ref_losses, rel=1e-10)
    assert relative_error(updates, ref_updates) < 1e-9


@pytest.mark.slow
@pytest.mark.parametrize("method", ["kd", "at"])
def test_inductor_matches_eager(method: str, tmp_path: Path) -> None:
    """TorchInductor (generated C++ kernels) computes eager's steps; slow: ~40 s of compilation.

    Compared in float64, where reordered sums differ by ~1e-16, so a disagreement can only
    be a wrong graph. (In fp32, inductor's fused BatchNorm reductions round differently and
    AT's beta = 1000 amplifies that to ~5e-3 of the update, as channels_last does.)
    """
    ref_losses, ref_updates = run(method, tmp_path / "ref", float64=True)
    losses, updates = run(method, tmp_path / "inductor", backend="inductor", float64=True)
    assert losses == pytest.approx(ref_losses, rel=1e-10)
    assert relative_error(updates, ref_updates) < 1e-9


def test_compiled_networks_of_one_class_keep_their_own_hooks() -> None:
    """Compiled graphs are shared by instances of a class; hooks must still be each instance's own.

    A first network of the class runs without hooks, then a second one with hooks: without
    hook guards the second would reuse the first's graph and return no features at all.
    """
    from distiller.features import EMBEDDING, STAGES, STEM, FeatureHooks, forward_features

    torch.manual_seed(seed(0))
    plain, hooked = build_model("resnet8", num_classes=NUM_CLASSES), build_model("resnet8", num_classes=NUM_CLASSES)
    plain.eval()
    hooked.eval()  # batch statistics would differ between calls; eval keeps every call comparable
    x = torch.randn(2, 3, 32, 32)
    expected, expected_logits = forward_features(copy.deepcopy(hooked), x)
    for model in (plain, hooked):
        compile_module(model, device_type="cpu", backend="eager")
    plain(x)
    kinds = (STEM, STAGES, EMBEDDING)
    hooks = FeatureHooks(hooked, kinds)  # registered after compiling: the hook guards force a recompile
    logits = hooked(x)
    f = hooks.select(hooks.pop(), logits, kinds)
    hooks.remove()
    feats = [f.stem, *f.stages, f.embedding]
    assert all(t is not None for t in feats) and len(feats) == len(expected)
    for value, want in zip(feats, expected):
        torch.testing.assert_close(value, want, rtol=0, atol=0)
    torch.testing.assert_close(logits, expected_logits, rtol=0, atol=0)


def test_compile_in_place_keeps_names_identity_and_is_idempotent() -> None:
    """Compiled networks keep their state_dict keys (checkpoint compatibility) and their identity."""
    model = build_model("resnet8", num_classes=NUM_CLASSES)
    keys = list(model.state_dict())
    same = compile_module(model, device_type="cpu", backend="aot_eager")
    assert same is model and is_compiled(model)
    assert list(model.state_dict()) == keys
    impl = model._compiled_call_impl
    compile_module(model, device_type="cpu", backend="aot_eager")
    assert model._compiled_call_impl is impl  # a second call (engine, then benchmark) changes nothing


def test_compile_networks_respects_the_switch() -> None:
    model = build_model("resnet8", num_classes=NUM_CLASSES)
    compile_networks(Runtime(torch.device("cpu"), "fp32", False, compile=False), model, None)
    assert not is_compiled(model)
    other = copy.deepcopy(model)
    compile_networks(Runtime(torch.device("cpu"), "fp32", False, compile=True), other, None, backend="aot_eager")
    assert is_compiled(other) and not is_compiled(model)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["kd", "crd"])
def test_step_has_no_host_sync_on_cuda(method: str, tmp_path: Path) -> None:
    """After the first step (CRD fixes its normaliser there), a training step never waits for the GPU."""
    runtime = Runtime(torch.device("cuda"), "bf16", True, compile=False)
    trainer = make_trainer(method, runtime, tmp_path, tiny_data())
    phase = trainer.plan[-1]
    optimizer = trainer.prepare_phase(phase)
    batches = list(zip(trainer.train_loader.epoch(1), range(STEPS)))
    trainer.train_step(batches[0][0], phase, 1, optimizer)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for batch, _ in batches[1:]:
            trainer.train_step(batch, phase, 1, optimizer)
    finally:
        torch.cuda.set_sync_debug_mode("default")
