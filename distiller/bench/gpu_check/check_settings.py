"""What the GPU check runs and at which sizes: :func:`full_settings` for the GPU, :func:`dry_settings` for the
CPU rehearsal of every step (tiny sizes: its figures only show that each step runs and reports)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from distiller.bench.gpu_check.cifar_subset import SUBSET_DIR, find_cifar_folder

STEPS = ("tests", "benchmark", "compile", "concurrency", "accuracy", "ddp")  # order = priority under the budget
FP32_PATH = ["trainer.precision=fp32", "trainer.channels_last=false", "trainer.compile=false"]
# bf16 autocast and nothing else changed from FP32_PATH: the precision alone, as the table presets choose it
BF16_PATH = ["trainer.precision=bf16", "trainer.channels_last=false", "trainer.compile=false"]


@dataclasses.dataclass
class Settings:
    """Sizes of every step; :func:`full_settings` for the GPU, :func:`dry_settings` for a CPU rehearsal."""

    device: str
    bench_cases: list[tuple[str, str, str]]  # (teacher, student, method)
    bench_overrides: list[str]
    paths: dict[str, list[str]]  # label -> trainer overrides: "fp32" and "fast"
    compile_arch: tuple[str, str]  # (teacher, student) of the equality check
    compile_steps: int
    compile_batch: int
    compile_backend: str
    accuracy_pair: tuple[str, str]
    accuracy_epochs: tuple[int, int]  # (teacher, student)
    accuracy_data: list[str]  # dataset overrides (subset or synthetic)
    accuracy_batch: int
    accuracy_seeds: tuple[int, ...]  # fp32 and bf16 are compared on each (the fast path on the first)
    ddp_overrides: list[str]
    concurrency: tuple[int, ...]
    concurrency_overrides: list[str]
    concurrency_steps: int
    threads_per_process: int | None
    # accuracy's training runs in this process (the rehearsal: no interpreter start per run) or each in a
    # fresh one (the GPU: nothing compiled or allocated by one run carries over to the speed of the next)
    jobs_in_process: bool


def subset_data_overrides(root: Path = SUBSET_DIR) -> list[str] | None:
    """Dataset overrides for the real-data subset, or None when it has not been written."""
    if find_cifar_folder(root) is None:
        return None
    return ["dataset=cifar100", f"dataset.root={root}", "dataset.download=false", "dataset.verify_checksums=false"]


def synthetic_data_overrides(root: Path, train: int, test: int) -> list[str]:
    return ["dataset=synthetic", f"dataset.root={root}", f"dataset.train_size={train}", f"dataset.test_size={test}"]


def full_settings(work: Path) -> Settings:
    data = subset_data_overrides() or synthetic_data_overrides(work / "data", 14000, 5000)
    return Settings(
        device="cuda",
        bench_cases=[("resnet32x4", "resnet8x4", "kd"), ("resnet32x4", "resnet8x4", "crd"),
                     ("resnet32x4", "resnet8x4", "dkd"), ("wrn_40_2", "wrn_16_2", "kd"),
                     ("vgg13", "MobileNetV2", "kd")],
        bench_overrides=["dataset.batch_size=64", "bench.steps=100", "bench.warmup=20", "bench.reference_steps=40",
                         "bench.reference_warmup=5", "bench.rounds=1"],
        paths={"fp32": FP32_PATH, "fast": []},
        compile_arch=("resnet8x4", "resnet8x4"), compile_steps=5, compile_batch=64, compile_backend="inductor",
        accuracy_pair=("resnet8x4", "resnet8"), accuracy_epochs=(6, 6), accuracy_data=data, accuracy_batch=64,
        accuracy_seeds=(0, 1),
        ddp_overrides=["model=resnet8x4", "trainer.epochs=1", *synthetic_data_overrides(work / "data", 4096, 1000)],
        concurrency=(1, 2, 4, 8),
        concurrency_overrides=["teacher=resnet32x4", "student=resnet8x4", "distill=kd", "dataset.batch_size=64",
                               "bench.train_size=50000"],
        concurrency_steps=150, threads_per_process=2, jobs_in_process=False,
    )


def dry_settings(work: Path) -> Settings:
    data = synthetic_data_overrides(work / "data", 200, 100)
    return Settings(
        device="cpu",
        bench_cases=[("resnet8", "resnet8", "kd")],
        bench_overrides=["trainer.device=cpu", "dataset.batch_size=8", "bench.steps=2", "bench.warmup=1",
                         "bench.reference_steps=2", "bench.reference_warmup=1", "bench.reference_workers=0",
                         "bench.train_size=128", "bench.peak_matmul=false"],
        # the CPU's "fast path" (auto) is fp32 eager; channels-last makes the rehearsal take another code path
        paths={"fp32": FP32_PATH, "fast": ["trainer.channels_last=true"]},
        compile_arch=("resnet8", "resnet8"), compile_steps=2, compile_batch=8, compile_backend="aot_eager",
        accuracy_pair=("resnet8", "resnet8"), accuracy_epochs=(1, 1), accuracy_data=data, accuracy_batch=32,
        accuracy_seeds=(0, 1),
        ddp_overrides=["model=resnet8", "trainer.epochs=1", "trainer.device=cpu", "dataset.batch_size=16", *data],
        concurrency=(1, 2),
        concurrency_overrides=["teacher=resnet8", "student=resnet8", "distill=kd", "trainer.device=cpu",
                               "dataset.batch_size=8", "bench.train_size=128"],
        concurrency_steps=3, threads_per_process=1, jobs_in_process=True,
    )
