"""scripts/benchmark.py: runs as a user types it and reports a complete, self-consistent JSON line.

Speed itself is never asserted (tests run on shared CPUs); what is checked is that the
script runs both loops end to end on tiny settings, that its FLOP count equals a count
derived by hand from the layer shapes, and that the derived figures follow from the raw ones.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import run_cli
from torch import nn

from distiller.bench import method_speed
from distiller.bench.reference_loop import ReferenceContrast
from models import build_model

REQUIRED = ("images_per_sec", "ms_per_step", "reference_images_per_sec", "speedup", "flops_per_image",
            "achieved_flops", "peak_flops", "mfu", "peak_memory_bytes", "device")
BATCH = 8


def forward_flops_per_image(arch: str, num_classes: int = 100) -> tuple[int, int]:
    """(forward FLOPs of one image, FLOPs of the first conv), 2 * multiply-adds of every conv and linear layer."""
    model = build_model(arch, num_classes=num_classes)
    counts: list[int] = []

    def conv(m: nn.Conv2d, args: tuple, out: torch.Tensor) -> None:
        k = m.kernel_size[0] * m.kernel_size[1]
        counts.append(2 * (m.in_channels // m.groups) * m.out_channels * k * out.shape[2] * out.shape[3])

    def linear(m: nn.Linear, args: tuple, out: torch.Tensor) -> None:
        counts.append(2 * m.in_features * m.out_features)

    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_hook(conv)
        elif isinstance(m, nn.Linear):
            m.register_forward_hook(linear)
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 3, 32, 32))
    return sum(counts), counts[0]


def test_benchmark_runs_and_reports_json(tmp_path) -> None:
    result = run_cli("scripts/benchmark.py", "teacher=resnet8", "student=resnet8", "distill=kd",
                     "trainer.device=cpu", f"dataset.batch_size={BATCH}", "bench.steps=2", "bench.warmup=1",
                     "bench.reference_steps=2", "bench.reference_warmup=1", "bench.train_size=128", cwd=tmp_path,
                     timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    report = json.loads(lines[-1])
    for key in REQUIRED:
        assert report.get(key) is not None, key
    assert report["device"] == "cpu" and report["method"] == "kd" and report["batch_size"] == BATCH
    assert report["peak_memory_kind"] == "cpu_peak_rss" and report["peak_memory_bytes"] > 0
    for key in ("images_per_sec", "reference_images_per_sec", "peak_flops"):
        assert report[key] > 0, key

    # FLOPs of one KD step: teacher forward + student forward + student backward, where the
    # backward of every layer costs two forwards (input and weight gradients) except the first
    # conv, whose input (the images) needs no gradient.
    forward, first_conv = forward_flops_per_image("resnet8")
    assert report["flops_per_image"] == forward + forward + (2 * forward - first_conv)

    # derived figures follow from the measured ones
    assert report["ms_per_step"] == pytest.approx(1e3 * BATCH / report["images_per_sec"], rel=1e-9)
    assert report["speedup"] == pytest.approx(report["images_per_sec"] / report["reference_images_per_sec"])
    assert report["achieved_flops"] == pytest.approx(report["flops_per_image"] * report["images_per_sec"])
    assert report["mfu"] == pytest.approx(report["achieved_flops"] / report["peak_flops"])
    assert "images/s" in result.stdout and "speedup" in result.stdout  # the human-readable table


@pytest.mark.parametrize("override, words", [
    ("bench.steps=0", "bench.steps"),
    ("bench.data=imagenet", "bench.data"),
    ("bench.train_size=50", "bench.train_size"),  # the dataset schema's minimum (every class can appear)
    ("distill=kdd", "distill"),
    ("bench.phase=init", "phase"),
    ("steps", "unexpected argument"),
    ("--method", "the options are --methods SET and --teacher-cache"),  # a misspelt option is named with the right one
    ("model=resnet8", "choose its networks with teacher=NAME student=NAME"),  # 'does not exist; check the spelling'
    # the generated images replaced a chosen data set in silence
    ("dataset=synthetic", "dataset=synthetic is not read with bench.data=random"),
    # a key of another data set: named as such (it said 'read by train_teacher.py, not by this command')
    ("dataset.train_size=200", "dataset.train_size is a key of dataset=synthetic, not of dataset=cifar100"),
])
def test_benchmark_user_errors_are_one_line(override: str, words: str) -> None:
    tiny = ["teacher=resnet8", "student=resnet8", "trainer.device=cpu", "bench.train_size=128",
            "bench.reference_steps=0", "bench.peak_matmul=false", "bench.flops=false", "bench.steps=1"]
    result = run_cli("scripts/benchmark.py", *tiny, override)
    assert result.returncode == 2
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1 and words in err


@pytest.mark.parametrize("mode", ["exact", "relax"])
def test_reference_contrast_sampling_follows_the_published_sampler(mode: str) -> None:
    """Column 0 is the positive (the sample itself, or one of its class for relax), negatives other classes."""
    labels = torch.arange(60) % 6
    sampler = ReferenceContrast(labels, k=20, mode=mode)
    np.random.seed(0)
    for index in (0, 7, 59):
        target = int(labels[index])
        row = sampler.sample(index, target)
        assert row.shape == (21,) and row.dtype == np.int64
        if mode == "exact":
            assert row[0] == index
        else:
            assert labels[row[0]] == target
        assert all(labels[j] != target for j in row[1:])
        assert len(set(row[1:].tolist())) == 20  # K < pool size: drawn without replacement, as published


def test_methods_preset_times_each_method_next_to_kd(monkeypatch) -> None:
    """--methods: one row per method, images/s and the ratio to KD's; a method without a config is listed
    as unavailable and does not stop the others."""
    monkeypatch.setitem(method_speed.METHOD_SETS, "tiny", {
        "kd": ["distill=kd"], "nkd": ["distill=nkd"], "kd+ls": ["distill=kd", "distill.logit_standardize=true"],
        "ghost": ["distill=ghost_method"]})
    result = run_cli("scripts/benchmark.py", "--methods", "tiny", "teacher=resnet8", "student=resnet8",
                     "trainer.device=cpu", f"dataset.batch_size={BATCH}", "bench.steps=1", "bench.warmup=1",
                     "bench.train_size=128", "bench.peak_matmul=false", "bench.flops=false")
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout.strip().splitlines()
    rows = {r["label"]: r for r in json.loads(out[-1])["methods"]}
    assert list(rows) == ["kd", "nkd", "kd+ls", "ghost"]
    assert rows["ghost"]["status"] == "unavailable" and "ghost_method.yaml" in rows["ghost"]["error"]
    for label in ("kd", "nkd", "kd+ls"):
        r = rows[label]
        assert r["status"] == "ok" and r["images_per_sec"] > 0 and r["reference_images_per_sec"] is None
        assert r["vs_kd"] == pytest.approx(r["images_per_sec"] / rows["kd"]["images_per_sec"], rel=1e-12)
        assert (r["teacher"], r["student"], r["batch_size"]) == ("resnet8", "resnet8", BATCH)
    assert rows["nkd"]["method"] == "nkd"
    assert any(line.startswith("| nkd |") for line in out) and any("| ghost | unavailable" in line for line in out)


def test_methods_preset_errors_are_one_line() -> None:
    result = run_cli("scripts/benchmark.py", "--methods", "nosuchset", "trainer.device=cpu")
    assert result.returncode == 2
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1 and "nosuchset" in err and "new" in err
    result = run_cli("scripts/benchmark.py", "--methods", "new", "distill=kd")
    assert result.returncode == 2
    assert "distill=" in result.stderr
    assert "mlkd" in method_speed.METHOD_SETS["new"] and "kd+dot" in method_speed.METHOD_SETS["new"]


def test_teacher_cache_timing_reports_both_steps_and_the_build_rate() -> None:
    """--teacher-cache: one row for the pair given, the live and the cached step timed, ratios that follow
    from the raw figures, and a CIFAR-100 build time that follows from the build rate (162 crops x 50,000)."""
    result = run_cli("scripts/benchmark.py", "--teacher-cache", "teacher=resnet8", "student=resnet8",
                     f"dataset.batch_size={BATCH}", "bench.steps=1", "bench.warmup=1", "bench.rounds=1")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(result.stdout.strip().splitlines()[-1])["teacher_cache"]
    assert len(rows) == 1 and rows[0]["pair"] == "resnet8->resnet8" and rows[0]["batch_size"] == BATCH
    row = rows[0]
    assert row["speedup"] == pytest.approx(row["cached_images_per_s"] / row["live_images_per_s"])
    assert row["build"]["cifar100_forwards"] == 50_000 * 9 * 9 * 2
    assert row["build"]["cifar100_hours"] == pytest.approx(50_000 * 162 / row["build"]["forwards_per_s"] / 3600)
    assert "| resnet8->resnet8 |" in result.stdout


def test_teacher_cache_timing_needs_both_networks_of_a_pair() -> None:
    result = run_cli("scripts/benchmark.py", "--teacher-cache", "teacher=resnet8", "bench.steps=1")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "teacher= and student=" in result.stderr


@pytest.mark.parametrize("native, says", [(True, "convolutions (oneDNN) run faster than torch.mm"),
                                          (False, "matmul kernels of this precision are emulated here")])
def test_an_mfu_over_100_percent_is_explained_by_what_this_cpu_has(monkeypatch, native: bool, says: str) -> None:
    """bf16 on a CPU with native bf16 is not emulated: there the convolutions outrun torch.mm's measured peak."""
    from distiller.bench import step_speed

    monkeypatch.setattr(step_speed, "cpu_has_native_bf16", lambda: native)
    report = {"teacher": "resnet32x4", "student": "resnet8x4", "method": "kd", "phase": "main", "batch_size": 64,
              "device": "cpu", "device_name": "cpu", "threads": 2, "torch": torch.__version__, "precision": "bf16",
              "channels_last": False, "compile": False, "steps": 3, "warmup": 1, "warmup_s": 0.1, "rounds": 1,
              "images_per_sec": 100.0, "reference_images_per_sec": None, "ms_per_step": 640.0,
              "reference_ms_per_step": None, "speedup": None, "peak_memory_kind": "cpu_peak_rss",
              "peak_memory_bytes": 2**30, "flops_per_image": 2e9, "achieved_flops": 2e11, "peak_flops": 1.5e11,
              "mfu": 2e11 / 1.5e11, "mfu_nominal": None}
    notes = [line for line in step_speed.step_speed_table(report).splitlines() if line.startswith("note:")]
    assert len([n for n in notes if "MFU > 100 %" in n]) == 1 and says in notes[0]
    assert any("no native bf16" in n for n in notes) is not native
