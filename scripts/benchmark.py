"""Speed of the full distillation step, and the same work done the way the older frameworks do it.

    python scripts/benchmark.py teacher=resnet32x4 student=resnet8x4 distill=kd
    python scripts/benchmark.py distill=crd trainer.device=cuda trainer.compile=false bench.steps=100 bench.rounds=3
    python scripts/benchmark.py --methods new trainer.device=cpu bench.steps=6 bench.rounds=2

``--methods SET`` times each method of a preset (:data:`METHOD_SETS`; ``new``: the 2022-2024
methods next to KD) on the same pair (resnet32x4 -> resnet8x4 unless ``teacher=``/``student=``
say otherwise) in this process, all built first and then timed in interleaved rounds
(``bench.rounds``), and prints a table with each method's images/s and its ratio to KD's,
then one JSON object (``{"methods": [...]}``). The reference
loop is off there (``bench.reference_steps=0``) unless given; a method whose config does not
exist yet is listed as unavailable, one that fails is reported and the others still run (exit 1).

Overrides are those of ``train_student.py`` (``teacher=``, ``student=``, ``distill=``,
``trainer.device=``, ``trainer.precision=``, ``trainer.channels_last=``, ``trainer.compile=``,
``dataset.batch_size=`` ...) plus the ``bench.*`` keys of ``configs/benchmark.yaml``
(``bench.steps``, ``bench.warmup``, ``bench.reference_steps``, ``bench.data`` ...): the
config is ``benchmark.yaml``, which includes ``train_student.yaml`` and adds ``bench``.
On a shared machine use ``bench.rounds=3``: both loops are timed in alternating rounds and
the best round of each counts. Results and method: ``docs/benchmarks.md``.

Ours: the trainer built by the engine's own builder (``distiller.run.build_distillation``,
as ``train_student.py`` builds it, the teacher randomly initialised: speed does not depend
on its weights), then ``Trainer.train_step`` on batches of its on-device loader
(augmentation included): teacher forward, student forward/backward, method loss,
optimizer step. Only :func:`build_engine_step` knows these engine names.

Reference: the loop of the older CIFAR distillation frameworks on the same images (its own
section below): a Dataset returning PIL images (torchvision's CIFAR100 ``__getitem__``), a
torchvision DataLoader with RandomCrop(32, 4) / RandomHorizontalFlip / ToTensor / Normalize
in ``os.cpu_count()`` workers, fp32, contiguous memory, forward hooks on every declared
feature, teacher under ``no_grad``, per-batch ``.item()`` of loss and accuracy, plain
``torch.optim.SGD``; CRD draws its contrast indices in the Dataset with ``np.random.choice``
as RepDistiller's ``CIFAR100InstanceSample`` does. Its networks and loss come from a second,
independent engine build in fp32 (same seed, so the same initial weights).

Timing: ``torch.utils.benchmark.Timer`` (which synchronises the accelerator around each timed
block and runs two untimed calls before it) over ``bench.steps`` back-to-back steps per round.
Printed: a table, then as the last line one JSON object (images_per_sec, ms_per_step,
reference_images_per_sec, speedup, flops_per_image, achieved_flops, peak_flops, mfu,
peak_memory_bytes, device, ...). FLOPs are counted with ``torch.utils.flop_counter`` over
one step (matmuls and convolutions, forward and backward); ``peak_flops`` is measured in
the same run with large matmuls in the run's precision (``Timer.blocked_autorange``), and
``mfu = achieved / peak``. Peak memory: ``torch.cuda.max_memory_allocated`` on CUDA (over
the timed steps), the process's peak resident set size (``getrusage``) on the CPU.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from omegaconf import DictConfig, open_dict
from torch import nn
from torch.utils import benchmark

import distiller.config.command_line  # noqa: F401 - registers the method_label resolver the configs use
from common.errors import UserError
from datasets import DATASETS, DataSplits
from datasets.augment import padding_for
from datasets.batch import Batch
from datasets.cifar100 import CIFAR100_MEAN, CIFAR100_STD
from distiller.config.command_line import CONFIG_DIR, debug_mode, explain_config_error, fail
from distiller.engine.runtime import PRECISIONS, Runtime, cpu_has_native_bf16, make_runtime
from distiller.features import EMBEDDING, STAGES, STAGES_PREACT, STEM, FeatureHooks, Features
from distiller.methods.crd import CONTRAST_IDX_KEY, CRD
from distiller.objective import Objective
from models.external import network_label

CONFIG_NAME = "benchmark"
# ``--methods`` presets: label -> the overrides that select the method. KD first: the ratios' base.
METHOD_SETS: dict[str, dict[str, list[str]]] = {
    "new": {
        "kd": ["distill=kd"],
        "dist": ["distill=dist"],
        "ctkd": ["distill=ctkd"],
        "mlkd": ["distill=mlkd"],
        "wttm": ["distill=wttm"],
        "ttm": ["distill=ttm"],
        "nkd": ["distill=nkd"],
        "kd+ls": ["distill=kd", "distill.logit_standardize=true"],
        "kd+dot": ["distill=kd", "optim=dot"],
    },
}
METHODS_PAIR = ("teacher=resnet32x4", "student=resnet8x4")
METHODS_DEFAULTS = ("bench.reference_steps=0",)  # methods are compared with KD, not with the older loop
RANDOM_DATASET = "benchmark_random"  # bench.data=random: generated images, registered as a data set on first use

# Dense tensor-core peaks from the vendors' data sheets (FLOP/s), for an MFU against the nominal
# peak beside the one against the measured matmul peak. Only where the name is unambiguous.
NOMINAL_PEAKS = {
    ("H100 80GB HBM3", "bf16"): 989.4e12, ("H100 80GB HBM3", "fp16"): 989.4e12,
    ("H200", "bf16"): 989.4e12, ("H200", "fp16"): 989.4e12,
    ("H100 PCIe", "bf16"): 756.0e12, ("H100 PCIe", "fp16"): 756.0e12,
    ("A100", "bf16"): 312.0e12, ("A100", "fp16"): 312.0e12,
}


# ---- configuration and data ----------------------------------------------------------------------------------
def compose_config(argv: list[str]) -> DictConfig:
    """``configs/benchmark.yaml`` with the command-line overrides (one clear line on a mistake)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    stray = [a for a in argv if "=" not in a]
    if stray:
        raise UserError(f"unexpected argument '{stray[0]}': pass Hydra-style overrides key=value, "
                        "e.g. distill=crd bench.steps=50 (see python scripts/benchmark.py --help)")
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            return compose(config_name=CONFIG_NAME, overrides=list(argv))
    except Exception as err:  # noqa: BLE001 - every composition failure is a user error here
        raise UserError(explain_config_error(err)) from None
    finally:
        GlobalHydra.instance().clear()


def _count(bench: DictConfig, key: str, minimum: int) -> int:
    value = bench.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(f"bench.{key}={value} must be a whole number >= {minimum}")
    return value


def bench_settings(cfg: DictConfig) -> dict[str, Any]:
    """Validated ``bench.*`` keys."""
    b = cfg.bench
    data = str(b.get("data", "random"))
    if data not in ("random", "dataset"):
        raise UserError(f"bench.data={data} is not valid; use random (generated uint8 images) or dataset "
                        "(the dataset= group, e.g. dataset=synthetic)")
    workers = b.get("reference_workers", "auto")
    if workers == "auto":
        workers = os.cpu_count() or 1
    elif isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise UserError(f"bench.reference_workers={workers} must be auto or a whole number >= 0")
    return {
        "steps": _count(b, "steps", 1), "warmup": _count(b, "warmup", 0),
        "reference_steps": _count(b, "reference_steps", 0), "reference_warmup": _count(b, "reference_warmup", 0),
        "rounds": _count(b, "rounds", 1),
        "reference_workers": int(workers), "data": data, "train_size": _count(b, "train_size", 100),
        "phase": str(b.get("phase", "main")), "peak_matmul": bool(b.get("peak_matmul", True)),
        "flops": bool(b.get("flops", True)), "seed": int(b.get("seed", 0)),
    }


def random_splits(cfg: Mapping[str, Any]) -> DataSplits:
    """Uniform uint8 images with balanced, shuffled labels: the cost of a step does not depend on pixels."""
    num_classes = int(cfg["num_classes"])
    gen = torch.Generator().manual_seed(int(cfg["seed"]))

    def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen)
        labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=gen)]
        return images, labels

    train_images, train_labels = split(int(cfg["train_size"]))
    test_images, test_labels = split(int(cfg["test_size"]))
    return DataSplits(train_images, train_labels, test_images, test_labels, num_classes,
                      [f"class_{i}" for i in range(num_classes)])


def use_random_data(cfg: DictConfig, bench: dict[str, Any]) -> None:
    """Point ``cfg.dataset`` at :func:`random_splits` (``bench.data=random``); its other keys stay as they are."""
    if RANDOM_DATASET not in DATASETS.names():
        DATASETS.add(RANDOM_DATASET, random_splits)
    with open_dict(cfg):
        cfg.dataset.merge_with({"name": RANDOM_DATASET, "train_size": bench["train_size"], "test_size": 256,
                                "seed": bench["seed"]})


# ---- the engine's step ------------------------------------------------------------------------------
@dataclasses.dataclass
class EngineStep:
    """One training step of the engine, ready to call, and what it was built from."""

    step: Callable[[Batch], torch.Tensor]  # one optimisation step on a batch; returns the loss
    batches: Iterator[Batch]  # the trainer's own on-device loader, epoch after epoch
    phase: str
    is_main: bool
    data: DataSplits
    student: nn.Module
    teacher: nn.Module | None  # None when the objective never runs it
    objective: Objective
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float


def build_engine_step(cfg: DictConfig, runtime: Runtime, phase_name: str, run_dir: Path) -> EngineStep:
    """The engine's step of phase ``phase_name``, built as ``train_student.py`` builds it (random teacher).

    The one function here that knows the engine's names: re-point it when they move.
    """
    from distiller.jobs.train import build_distillation, settings_from_config

    settings = settings_from_config(cfg, runtime)
    objective = Objective.from_config(cfg.distill, cfg.get("combine"))
    trainer, teacher = build_distillation(cfg, run_dir, runtime, settings, objective, {}, load_teacher=False)
    phases = {p.name: p for p in trainer.plan}  # the main phase is trainer.plan[-1]
    if phase_name not in phases:
        raise UserError(f"bench.phase={phase_name} is not a phase of this run; its phases are: {', '.join(phases)}")
    phase = phases[phase_name]
    optimizer = trainer.prepare_phase(phase)

    def batches() -> Iterator[Batch]:
        for epoch in itertools.count(1):
            yield from trainer.train_loader.epoch(epoch)

    return EngineStep(
        step=lambda batch: trainer.train_step(batch, phase, 1, optimizer).total, batches=batches(), phase=phase.name,
        is_main=phase.is_main, data=trainer.data, student=trainer.student,
        teacher=teacher if objective.needs_teacher() else None, objective=objective,
        batch_size=settings.batch_size, lr=settings.lr, momentum=settings.momentum,
        weight_decay=settings.weight_decay)


# ---- measurements -----------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _timer(fn: Callable[[], Any]) -> benchmark.Timer:
    # torch.utils.benchmark defaults to one thread; time with the threads the run uses
    return benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())


def seconds_per_call(fn: Callable[[], Any], calls: int) -> float:
    """Mean seconds of one call over ``calls`` back-to-back calls (after the Timer's two untimed ones)."""
    return _timer(fn).timeit(calls).mean


def matmul_peak(device: torch.device, precision: str, budget_s: float = 1.5) -> tuple[float, int]:
    """Best FLOP/s of square matmuls in the run's precision, and the size used.

    The size doubles until one product takes a few milliseconds (GPU) or tens of
    milliseconds (CPU), so slow dtypes (bf16 without hardware support) stay cheap to
    measure; then the fastest block of ``blocked_autorange`` counts (other processes only slow it down).
    """
    dtype = PRECISIONS[precision] or torch.float32
    cuda = device.type == "cuda"
    n, limit, enough = 256, (16384 if cuda else 4096), (2e-3 if cuda else 2e-2)
    while True:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        timer = _timer(lambda a=a, b=b: torch.mm(a, b))
        if timer.timeit(1).mean >= enough or n >= limit:
            break
        n *= 2
    best = min(timer.blocked_autorange(min_run_time=budget_s).times)
    return 2.0 * n ** 3 / best, n


def count_step_flops(step: Callable[[Batch], Any], batch: Batch) -> int:
    """FLOPs of one full step (matmuls/convolutions forward and backward), counted by dispatch, run eagerly."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.compiler.set_stance("force_eager"), FlopCounterMode(display=False) as counter:
        step(batch)
    return int(counter.get_total_flops())


# ---- the reference loop (older frameworks' style) ----------------------------------------------------
class ReferenceCIFAR(torch.utils.data.Dataset):
    """CIFAR stored as torchvision stores it (uint8 HWC numpy), read back as PIL images and transformed.

    With ``contrast`` the item also carries CRD's ``[1 + K]`` contrast indices drawn here, per
    sample, like RepDistiller's ``CIFAR100InstanceSample``.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, contrast: ReferenceContrast | None,
                 mean: Sequence[float] = CIFAR100_MEAN, std: Sequence[float] = CIFAR100_STD) -> None:
        import torchvision.transforms as T

        self.data = images.permute(0, 2, 3, 1).contiguous().numpy()
        self.targets = labels.tolist()
        self.contrast = contrast
        h, w = images.shape[2:]  # RandomCrop(32, padding=4) at CIFAR's size, scaled like the engine's crop
        self.transform = T.Compose([T.RandomCrop((h, w), padding=padding_for(h, w)), T.RandomHorizontalFlip(),
                                    T.ToTensor(), T.Normalize(mean, std)])

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):  # the DataLoader's tuple
        from PIL import Image

        img, target = self.data[index], self.targets[index]
        img = self.transform(Image.fromarray(img))
        if self.contrast is None:
            return img, target, index
        return img, target, index, self.contrast.sample(index, target)


class ReferenceContrast:
    """RepDistiller's per-sample CRD sampling: ``np.random.choice`` over the other classes' samples."""

    def __init__(self, labels: torch.Tensor, k: int, mode: str) -> None:
        labels = labels.numpy()
        self.k, self.mode, self.n = k, mode, len(labels)
        classes = range(int(labels.max()) + 1)
        self.positive = [np.where(labels == c)[0] for c in classes]
        self.negative = [np.where(labels != c)[0] for c in classes]

    def sample(self, index: int, target: int) -> np.ndarray:
        if self.mode == "uniform":
            neg = np.random.randint(0, self.n, self.k)
        else:
            pool = self.negative[target]
            neg = np.random.choice(pool, self.k, replace=self.k > len(pool))
        pos = np.random.choice(self.positive[target], 1)[0] if self.mode == "relax" else index
        return np.hstack((np.asarray([pos]), neg)).astype(np.int64)


def reference_loop(built: EngineStep, device: torch.device, workers: int) -> Callable[[], float]:
    """One step of the older frameworks' loop on the networks and loss of ``built`` (an fp32 build), ready to time."""
    student, teacher, objective = built.student, built.teacher, built.objective
    every_feature = (STEM, STAGES, STAGES_PREACT, EMBEDDING)  # as `is_feat=True` returns them all
    s_hooks = FeatureHooks(student, every_feature)
    t_hooks = FeatureHooks(teacher, every_feature) if teacher is not None else None
    student.train()
    objective.train()
    if teacher is not None:
        teacher.eval()
        if objective.teacher_bn_train():
            for m in teacher.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.train()
    optimizer = torch.optim.SGD(list(student.parameters()) + objective.main_parameters(), lr=built.lr,
                                momentum=built.momentum, weight_decay=built.weight_decay)

    data = built.data
    crd = next((e.method for e in objective.active() if isinstance(e.method, CRD)), None)
    contrast = ReferenceContrast(data.train_labels, crd.nce_k, crd.mode) if crd is not None else None
    loader = torch.utils.data.DataLoader(ReferenceCIFAR(data.train_images, data.train_labels, contrast,
                                                        data.mean, data.std),
                                         batch_size=built.batch_size, shuffle=True, num_workers=workers,
                                         pin_memory=device.type == "cuda", drop_last=True,
                                         persistent_workers=workers > 0)
    items = (item for _ in itertools.count() for item in loader)
    meters = {"loss": 0.0, "top1": 0.0, "count": 0}

    def step() -> float:
        item = next(items)
        images, labels, index = (t.to(device, non_blocking=True) for t in item[:3])
        extras = {CONTRAST_IDX_KEY: item[3].to(device, non_blocking=True)} if len(item) > 3 else {}
        batch = Batch(images.float(), labels, index, extras)
        t_logits, t_store = None, {}
        if teacher is not None:
            with torch.no_grad():
                t_logits = teacher(batch.images)
            t_store = t_hooks.pop()
        s_logits = student(batch.images)
        s_store = s_hooks.pop()
        per_method = {
            e.label: (s_hooks.select(s_store, s_logits, e.method.student_features),
                      t_hooks.select(t_store, t_logits, e.method.teacher_features) if t_hooks else Features())
            for e in objective.entries}
        loss = objective(Features(logits=s_logits), Features(logits=t_logits) if t_logits is not None else None,
                         batch, 1, per_method).total
        top1 = (s_logits.topk(5, 1).indices[:, 0] == labels).float().mean() * 100.0
        n = labels.shape[0]
        meters["loss"] += loss.item() * n  # the older loops' per-batch host reads
        meters["top1"] += top1.item() * n
        meters["count"] += n
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


# ---- the benchmark ----------------------------------------------------------------------------------
def time_loops(cfg: DictConfig, runtime: Runtime, bench: dict[str, Any], tmp: Path) -> dict[str, Any]:
    """Build both loops and time them in alternating rounds; seconds per step of each round, memory, FLOPs."""
    device = runtime.device
    ours = build_engine_step(cfg, runtime, bench["phase"], tmp / "ours")
    if len(ours.data.train_labels) < ours.batch_size:
        raise UserError(f"the training set has {len(ours.data.train_labels)} images, fewer than one batch of "
                        f"dataset.batch_size={ours.batch_size}; raise bench.train_size or lower the batch size")

    def our_step() -> torch.Tensor:
        return ours.step(next(ours.batches))

    started = time.perf_counter()
    for _ in range(bench["warmup"]):  # compilation, allocator, caches
        our_step()
    synchronize(device)
    out = {"warmup_s": time.perf_counter() - started, "ours": [], "reference": [], "peak_memory": 0,
           "phase": ours.phase, "batch_size": ours.batch_size, "train_size": len(ours.data.train_labels)}
    ref_step = None
    with_reference = bench["reference_steps"] > 0 and ours.is_main
    # Alternating rounds, best of each: on a shared machine, bursts of other load hit both loops alike.
    for round_ in range(bench["rounds"]):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        out["ours"].append(seconds_per_call(our_step, bench["steps"]))
        if device.type == "cuda":
            out["peak_memory"] = max(out["peak_memory"], torch.cuda.max_memory_allocated(device))
        elif round_ == 0:
            out["peak_memory"] = peak_rss_bytes()  # before the reference loop exists
        if with_reference:
            if ref_step is None:
                fp32 = dataclasses.replace(runtime, precision="fp32", channels_last=False, compile=False)
                ref_step = reference_loop(build_engine_step(cfg, fp32, "main", tmp / "reference"), device,
                                          bench["reference_workers"])
                for _ in range(bench["reference_warmup"]):  # DataLoader worker start-up
                    ref_step()
            out["reference"].append(seconds_per_call(ref_step, bench["reference_steps"]))
    out["flops_step"] = count_step_flops(ours.step, next(ours.batches)) if bench["flops"] else None
    return out


def run(cfg: DictConfig) -> dict[str, Any]:
    """Time both loops, count FLOPs and measure the matmul peak; the raw and derived figures."""
    bench = bench_settings(cfg)
    if bench["data"] == "random":
        use_random_data(cfg, bench)
    runtime = make_runtime(cfg.trainer)
    device = runtime.device
    with tempfile.TemporaryDirectory(prefix="kd-benchmark-") as tmp:
        timed = time_loops(cfg, runtime, bench, Path(tmp))  # networks and loaders are gone on return
    ours_times, ref_times, batch_size = timed["ours"], timed["reference"], timed["batch_size"]
    flops_step = timed["flops_step"]
    ours_ms = 1e3 * min(ours_times)
    ours_ips = 1e3 * batch_size / ours_ms
    ref_ms = 1e3 * min(ref_times) if ref_times else None
    ref_ips = 1e3 * batch_size / ref_ms if ref_ms else None
    peak = size = None
    if bench["peak_matmul"]:
        peak, size = matmul_peak(device, runtime.precision)
    flops_image = flops_step / batch_size if flops_step is not None else None
    achieved = flops_image * ours_ips if flops_image is not None else None
    name = device_name(device)
    nominal = next((v for (key, prec), v in NOMINAL_PEAKS.items() if key in name and prec == runtime.precision), None)
    return {
        "images_per_sec": ours_ips,
        "ms_per_step": ours_ms,
        "reference_images_per_sec": ref_ips,
        "reference_ms_per_step": ref_ms,
        "speedup": ours_ips / ref_ips if ref_ips else None,
        "flops_per_image": flops_image,
        "flops_per_step": flops_step,
        "achieved_flops": achieved,
        "peak_flops": peak,
        "peak_matmul_size": size,
        "mfu": achieved / peak if achieved is not None and peak else None,
        "nominal_peak_flops": nominal,
        "mfu_nominal": achieved / nominal if achieved is not None and nominal else None,
        "peak_memory_bytes": int(timed["peak_memory"]),
        "peak_memory_kind": "cuda_max_memory_allocated" if device.type == "cuda" else "cpu_peak_rss",
        "device": device.type,
        "device_name": name,
        "threads": torch.get_num_threads(),
        "teacher": network_label(cfg.teacher),
        "student": network_label(cfg.student),
        "method": str(cfg.method_label),
        "phase": timed["phase"],
        "batch_size": batch_size,
        "precision": runtime.precision,
        "channels_last": runtime.channels_last,
        "compile": runtime.compile,
        "steps": bench["steps"],
        "warmup": bench["warmup"],
        "warmup_s": timed["warmup_s"],
        "rounds": bench["rounds"],
        "ms_per_step_rounds": [1e3 * t for t in ours_times],
        "reference_ms_per_step_rounds": [1e3 * t for t in ref_times],
        "reference_steps": bench["reference_steps"] if ref_times else 0,
        "reference_workers": bench["reference_workers"],
        "data": bench["data"],
        "train_size": timed["train_size"],
        "torch": torch.__version__,
    }


def _fmt(value: float | None, unit: str = "", scale: float = 1.0, digits: int = 1) -> str:
    if value is None:
        return "-"
    return f"{value / scale:.{digits}f}{unit}"


def table(r: dict[str, Any]) -> str:
    """The human-readable report."""
    peak_label = "peak RSS (process)" if r["peak_memory_kind"] == "cpu_peak_rss" else "peak CUDA memory allocated"
    lines = [
        f"{r['teacher']} -> {r['student']} [{r['method']}, phase {r['phase']}], batch {r['batch_size']}, "
        f"{r['device']} ({r['device_name']}), {r['threads']} threads, torch {r['torch']}",
        f"ours: precision {r['precision']}, channels_last {r['channels_last']}, compile {r['compile']}; "
        f"{r['steps']} timed steps after {r['warmup']} warm-up ({r['warmup_s']:.1f} s), best of {r['rounds']} round(s)",
        "",
        f"{'':28}{'ours':>14}{'reference':>14}",
        f"{'images/s':28}{_fmt(r['images_per_sec']):>14}{_fmt(r['reference_images_per_sec']):>14}",
        f"{'ms/step':28}{_fmt(r['ms_per_step']):>14}{_fmt(r['reference_ms_per_step']):>14}",
        f"{'speedup ours/reference':28}{_fmt(r['speedup'], 'x', digits=2):>14}",
        f"{peak_label:28}{_fmt(r['peak_memory_bytes'], ' MiB', 2**20):>14}",
        f"{'FLOPs/image (step)':28}{_fmt(r['flops_per_image'], ' G', 1e9, 3):>14}",
        f"{'achieved FLOP/s':28}{_fmt(r['achieved_flops'], ' G', 1e9):>14}",
        f"{'matmul peak (' + r['precision'] + ')':28}{_fmt(r['peak_flops'], ' G', 1e9):>14}",
        f"{'MFU (of measured peak)':28}{_fmt(None if r['mfu'] is None else 100 * r['mfu'], ' %'):>14}",
    ]
    if r["mfu_nominal"] is not None:
        lines.append(f"{'MFU (of data-sheet peak)':28}{_fmt(100 * r['mfu_nominal'], ' %'):>14}")
    if r["reference_images_per_sec"] is not None:
        lines.append(f"reference: fp32, DataLoader with {r['reference_workers']} workers, PIL transforms, "
                     f"{r['reference_steps']} timed steps")
    if r["mfu"] is not None and r["mfu"] > 1:
        lines.append(f"note: the step runs faster than this device's {r['precision']} matmuls (MFU > 100 %): the "
                     "matmul kernels of this precision are emulated here, so the peak is no ceiling")
    if r["device"] == "cpu" and r["precision"] == "bf16" and not cpu_has_native_bf16():
        lines.append("note: this CPU has no native bf16 (no avx512_bf16 / amx_bf16): bf16 runs emulated, "
                     "far slower than fp32")
    return "\n".join(lines)


# ---- several methods side by side ---------------------------------------------------------------------
def _with_defaults(argv: list[str], defaults: tuple[str, ...]) -> list[str]:
    """``defaults`` for the keys ``argv`` leaves unset (Hydra rejects a key given twice), then ``argv``."""
    given = {a.split("=", 1)[0].lstrip("+~") for a in argv}
    return [d for d in defaults if d.split("=", 1)[0] not in given] + list(argv)


def method_available(overrides: list[str]) -> str | None:
    """None when every ``distill=``/``optim=`` group option of ``overrides`` has its config file, else why not."""
    for override in overrides:
        key, _, value = override.partition("=")
        if key in ("distill", "optim") and not (CONFIG_DIR / key / f"{value}.yaml").is_file():
            return f"configs/{key}/{value}.yaml does not exist yet"
    return None


@dataclasses.dataclass
class _MethodRun:
    label: str
    built: EngineStep
    device: torch.device
    runtime: Runtime
    cfg: DictConfig
    warmup_s: float
    flops_step: int | None
    times: list[float] = dataclasses.field(default_factory=list)


def run_methods(set_name: str, argv: list[str]) -> list[dict[str, Any]]:
    """Time every method of ``METHOD_SETS[set_name]`` with the common overrides ``argv``; one row per method.

    Every method's step is built and warmed up first; then ``bench.rounds`` rounds each time
    ``bench.steps`` steps of every method in turn, and the best round of each counts: on a
    shared machine a burst of load hits all methods of a round alike, instead of whichever
    method happened to run then. A row is ``label``, ``status`` (``ok``, ``unavailable`` or
    ``failed``) and, when ok, the figures (``images_per_sec``, ``ms_per_step``, ``vs_kd`` ...).
    """
    if set_name not in METHOD_SETS:
        raise UserError(f"--methods {set_name} is not a method set; use one of: {', '.join(METHOD_SETS)}")
    if any(a.split("=", 1)[0] in ("distill", "optim") for a in argv):
        raise UserError("--methods chooses distill= and optim= itself; leave them out of the overrides")
    common = _with_defaults(argv, METHODS_PAIR + METHODS_DEFAULTS)
    rows: dict[str, dict[str, Any]] = {}
    runs: list[_MethodRun] = []
    bench = bench_settings(compose_config(common + ["distill=kd"]))
    with tempfile.TemporaryDirectory(prefix="kd-benchmark-") as tmp:
        for label, overrides in METHOD_SETS[set_name].items():
            why = method_available(overrides)
            if why is not None:
                rows[label] = {"label": label, "status": "unavailable", "error": why}
                continue
            try:
                cfg = compose_config(common + overrides)
                if bench["data"] == "random":
                    use_random_data(cfg, bench)
                runtime = make_runtime(cfg.trainer)
                built = build_engine_step(cfg, runtime, bench["phase"], Path(tmp) / f"m{len(runs)}")
                started = time.perf_counter()
                for _ in range(bench["warmup"]):
                    built.step(next(built.batches))
                synchronize(runtime.device)
                warmup_s = time.perf_counter() - started
                flops = count_step_flops(built.step, next(built.batches)) if bench["flops"] else None
                runs.append(_MethodRun(label, built, runtime.device, runtime, cfg, warmup_s, flops))
                rows[label] = {"label": label, "status": "ok"}
            except Exception as err:  # noqa: BLE001 - one method's failure must not hide the others' figures
                message = str(err) if isinstance(err, UserError) else f"{type(err).__name__}: {err}"
                rows[label] = {"label": label, "status": "failed", "error": message}
            finally:
                if RANDOM_DATASET in DATASETS:  # the data is loaded: the registration is no longer needed
                    DATASETS.remove(RANDOM_DATASET)
        for _ in range(bench["rounds"]):
            for run_ in list(runs):
                try:
                    run_.times.append(seconds_per_call(lambda r=run_: r.built.step(next(r.built.batches)),
                                                       bench["steps"]))
                except Exception as err:  # noqa: BLE001 - as above
                    rows[run_.label] = {"label": run_.label, "status": "failed",
                                        "error": f"{type(err).__name__}: {err}"}
                    runs.remove(run_)
    for run_ in runs:
        ms = 1e3 * min(run_.times)
        ips = 1e3 * run_.built.batch_size / ms
        rows[run_.label].update({
            "images_per_sec": ips, "ms_per_step": ms, "ms_per_step_rounds": [1e3 * t for t in run_.times],
            "reference_images_per_sec": None, "flops_per_step": run_.flops_step,
            "flops_per_image": run_.flops_step / run_.built.batch_size if run_.flops_step is not None else None,
            "device": run_.device.type, "device_name": device_name(run_.device), "threads": torch.get_num_threads(),
            "teacher": network_label(run_.cfg.teacher), "student": network_label(run_.cfg.student),
            "method": str(run_.cfg.method_label), "batch_size": run_.built.batch_size,
            "precision": run_.runtime.precision, "channels_last": run_.runtime.channels_last,
            "compile": run_.runtime.compile, "steps": bench["steps"], "warmup": bench["warmup"],
            "warmup_s": run_.warmup_s, "rounds": bench["rounds"], "data": bench["data"], "torch": torch.__version__})
        print(f"[benchmark] {run_.label}: {ips:.1f} images/s", file=sys.stderr, flush=True)
    base = rows.get("kd") if rows.get("kd", {}).get("status") == "ok" else None
    for r in rows.values():
        if r["status"] == "ok" and base is not None:
            r["vs_kd"] = r["images_per_sec"] / base["images_per_sec"]
    return list(rows.values())


def methods_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of :func:`run_methods` rows."""
    first = next((r for r in rows if r["status"] == "ok"), None)
    lines = []
    if first is not None:
        lines.append(f"{first['teacher']} -> {first['student']}, batch {first['batch_size']}, {first['device']} "
                     f"({first['device_name']}), {first['threads']} threads, precision {first['precision']}, "
                     f"compile {first['compile']}, {first['steps']} timed steps per round, best of "
                     f"{first['rounds']} interleaved round(s), torch {first['torch']}")
        lines.append("")
    lines += ["| method | images/s | ms/step | vs KD | FLOPs/image |", "|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['label']} | {r['status']}: {r['error']} | | | |")
            continue
        lines.append(f"| {r['label']} | {_fmt(r['images_per_sec'])} | {_fmt(r['ms_per_step'])} | "
                     f"{_fmt(r.get('vs_kd'), 'x', digits=2)} | {_fmt(r['flops_per_image'], ' G', 1e9, 3)} |")
    return "\n".join(lines)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    if "--methods" in argv:
        at = argv.index("--methods")
        if at + 1 >= len(argv):
            fail(f"--methods needs a set name: {', '.join(METHOD_SETS)}")
        set_name, rest = argv[at + 1], argv[:at] + argv[at + 2:]
        try:
            rows = run_methods(set_name, rest)
        except UserError as err:
            if debug_mode():
                raise
            fail(str(err))
        print(methods_table(rows))
        print(json.dumps(_finite({"methods": rows})), flush=True)
        return 0 if all(r["status"] != "failed" for r in rows) else 1
    try:
        cfg = compose_config(argv)
        result = run(cfg)
    except UserError as err:
        if debug_mode():
            raise
        fail(str(err))
    finally:
        if RANDOM_DATASET in DATASETS:  # registered for this call only: the registry stays as it was
            DATASETS.remove(RANDOM_DATASET)
    print(table(result))
    print(json.dumps(_finite(result)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
