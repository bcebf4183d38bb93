"""Speed of the full distillation step, and the same work done the way the older frameworks do it.

    python scripts/benchmark.py teacher=resnet32x4 student=resnet8x4 distill=kd
    python scripts/benchmark.py distill=crd trainer.device=cuda trainer.compile=false bench.steps=100 bench.rounds=3

Overrides are those of ``train_student.py`` (``teacher=``, ``student=``, ``distill=``,
``trainer.device=``, ``trainer.precision=``, ``trainer.channels_last=``, ``trainer.compile=``,
``dataset.batch_size=`` ...) plus the ``bench.*`` keys of ``configs/benchmark.yaml``
(``bench.steps``, ``bench.warmup``, ``bench.reference_steps``, ``bench.data`` ...): the
config is ``benchmark.yaml``, which includes ``train_student.yaml`` and adds ``bench``.
On a shared machine use ``bench.rounds=3``: both loops are timed in alternating rounds and
the best round of each counts. Results and method: ``docs/benchmarks.md``.

Ours: a :class:`distiller.engine.Trainer` built as ``distill()`` builds it (the teacher is
randomly initialised: speed does not depend on its weights), then
``Trainer.train_step`` on batches of ``trainer.train_loader`` (on-device augmentation
included): teacher forward, student forward/backward, method loss, optimizer step.

Reference: the loop of the older CIFAR distillation frameworks on the same images:
a Dataset returning PIL images (torchvision's CIFAR100 ``__getitem__``), a torchvision
DataLoader with RandomCrop(32, 4) / RandomHorizontalFlip / ToTensor / Normalize in
``os.cpu_count()`` workers, fp32, contiguous memory, forward hooks for features, teacher
under ``no_grad``, per-batch ``.item()`` of loss and accuracy, plain ``torch.optim.SGD``;
CRD draws its contrast indices in the Dataset with ``np.random.choice`` as RepDistiller's
``CIFAR100InstanceSample`` does. The loss itself is computed by a second, independent
instance of the same objective.

Printed: a table, then as the last line one JSON object (images_per_sec, ms_per_step,
reference_images_per_sec, speedup, flops_per_image, achieved_flops, peak_flops, mfu,
peak_memory_bytes, device, ...). FLOPs are counted with ``torch.utils.flop_counter`` over
one step (matmuls and convolutions, forward and backward); ``peak_flops`` is measured in
the same run with large matmuls in the run's precision, and ``mfu = achieved / peak``.
Peak memory: ``torch.cuda.max_memory_allocated`` on CUDA (over the timed steps), the
process's peak resident set size (``getrusage``) on the CPU.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig  # noqa: E402
from torch import nn  # noqa: E402

import distiller.cli  # noqa: E402,F401 - registers the method_label resolver the configs use
from datasets import load_dataset  # noqa: E402
from datasets.batch import Batch  # noqa: E402
from datasets.cifar100 import CIFAR100_MEAN, CIFAR100_STD, DataSplits  # noqa: E402
from distiller.cli import CONFIG_DIR, debug_mode, explain_config_error, fail  # noqa: E402
from distiller.compile import compile_networks, is_compiled  # noqa: E402
from distiller.engine import PlannedPhase, Trainer  # noqa: E402
from distiller.methods.base import EMBEDDING, STAGES, STEM, BuildContext, Features  # noqa: E402
from distiller.methods.crd import CONTRAST_IDX_KEY, CRD  # noqa: E402
from distiller.objective import Objective  # noqa: E402
from distiller.run import settings_from_config  # noqa: E402
from distiller.runtime import PRECISIONS, Runtime, cpu_has_native_bf16, make_runtime, seed_everything  # noqa: E402
from models import build_model  # noqa: E402
from common.errors import UserError  # noqa: E402

CONFIG_NAME = "benchmark"

# Dense tensor-core peaks from the vendors' data sheets (FLOP/s), for an MFU against the nominal
# peak beside the one against the measured matmul peak. Only where the name is unambiguous.
NOMINAL_PEAKS = {
    ("H100 80GB HBM3", "bf16"): 989.4e12, ("H100 80GB HBM3", "fp16"): 989.4e12,
    ("H200", "bf16"): 989.4e12, ("H200", "fp16"): 989.4e12,
    ("H100 PCIe", "bf16"): 756.0e12, ("H100 PCIe", "fp16"): 756.0e12,
    ("A100", "bf16"): 312.0e12, ("A100", "fp16"): 312.0e12,
}


# ---- configuration ----------------------------------------------------------------------------------
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
        "reference_workers": int(workers), "data": data, "train_size": _count(b, "train_size", 2),
        "phase": str(b.get("phase", "main")), "peak_matmul": bool(b.get("peak_matmul", True)),
        "flops": bool(b.get("flops", True)), "seed": int(b.get("seed", 0)),
    }


# ---- data -------------------------------------------------------------------------------------------
def random_splits(train_size: int, num_classes: int, seed: int, test_size: int = 256) -> DataSplits:
    """Uniform uint8 images with balanced, shuffled labels: the cost of a step does not depend on pixels."""
    gen = torch.Generator().manual_seed(seed)

    def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen)
        labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=gen)]
        return images, labels

    train_images, train_labels = split(train_size)
    test_images, test_labels = split(test_size)
    return DataSplits(train_images, train_labels, test_images, test_labels, num_classes,
                      [f"class_{i}" for i in range(num_classes)])


def batch_stream(trainer: Trainer) -> Iterator[Batch]:
    """Batches of the trainer's own loader, epoch after epoch."""
    epoch = 1
    while True:
        yield from trainer.train_loader.epoch(epoch)
        epoch += 1


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


def matmul_peak(device: torch.device, precision: str, budget_s: float = 1.5) -> tuple[float, int]:
    """Best FLOP/s of square matmuls in the run's precision, and the size used.

    The size doubles until one product takes a few milliseconds (GPU) or tens of
    milliseconds (CPU), so slow dtypes (bf16 without hardware support) stay cheap to
    measure; then the best of several timings counts (other processes only slow it down).
    """
    dtype = PRECISIONS[precision] or torch.float32
    cuda = device.type == "cuda"
    n, limit, enough = 256, (16384 if cuda else 4096), (2e-3 if cuda else 2e-2)
    while True:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        torch.mm(a, b)
        synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        once = time.perf_counter() - start
        if once >= enough or n >= limit:
            break
        n *= 2
    reps = int(min(max(budget_s / max(once, 1e-6), 3), 50))
    inner = 10 if cuda else 1  # back-to-back launches hide the launch latency on GPU
    best = once
    for _ in range(reps):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(inner):
            torch.mm(a, b)
        synchronize(device)
        best = min(best, (time.perf_counter() - start) / inner)
    return 2.0 * n ** 3 / best, n


def count_step_flops(trainer: Trainer, phase: PlannedPhase, optimizer: torch.optim.Optimizer, batch: Batch) -> int:
    """FLOPs of one full step (matmuls/convolutions forward and backward), counted by dispatch."""
    from torch.utils.flop_counter import FlopCounterMode

    compiled = is_compiled(trainer.student) or is_compiled(trainer.teacher)
    eager = torch.compiler.set_stance("force_eager") if compiled else contextlib.nullcontext()
    with eager, FlopCounterMode(display=False) as counter:
        trainer.train_step(batch, phase, 1, optimizer)
    return int(counter.get_total_flops())


def time_steps(step, batches: Iterator[Any], steps: int, device: torch.device) -> float:
    """Seconds for ``steps`` calls of ``step`` (the host reads the last loss once, then waits for the device)."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        out = step(next(batches))
    if isinstance(out, torch.Tensor):
        out.item()
    synchronize(device)
    return time.perf_counter() - start


def warm_up(step, batches: Iterator[Any], steps: int, device: torch.device) -> float:
    """Run ``steps`` untimed steps (compilation, allocator, caches, worker start-up); their seconds."""
    started = time.perf_counter()
    for _ in range(steps):
        step(next(batches))
    synchronize(device)
    return time.perf_counter() - started


# ---- the reference loop (older frameworks' style) ----------------------------------------------------
class ReferenceCIFAR(torch.utils.data.Dataset):
    """CIFAR stored as torchvision stores it (uint8 HWC numpy), read back as PIL images and transformed.

    With ``contrast`` the item also carries CRD's ``[1 + K]`` contrast indices drawn here, per
    sample, like RepDistiller's ``CIFAR100InstanceSample``.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, contrast: "ReferenceContrast | None") -> None:
        import torchvision.transforms as T

        self.data = images.permute(0, 2, 3, 1).contiguous().numpy()
        self.targets = labels.tolist()
        self.contrast = contrast
        self.transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                                    T.Normalize(CIFAR100_MEAN, CIFAR100_STD)])

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):  # noqa: ANN204 - the DataLoader's tuple
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


class ReferenceTaps:
    """Forward hooks on every declared feature (as ``is_feat=True`` returns them all); pre-activation on demand."""

    def __init__(self, model: nn.Module, preact: bool) -> None:
        self.post: dict[str, torch.Tensor] = {}
        self.pre: dict[str, torch.Tensor] = {}
        self.stage_names = [s.name for s in model.feature_info if s.name.startswith("stage")]
        for spec in model.feature_info:
            self._hook(model, spec.post, spec.name, self.post)
            if preact and spec.name in self.stage_names:
                self._hook(model, spec.pre or spec.post, spec.name, self.pre)

    @staticmethod
    def _hook(model: nn.Module, tap: Any, name: str, store: dict) -> None:
        module = model.get_submodule(tap.module)
        if tap.take_input:
            module.register_forward_pre_hook(lambda m, args, name=name: store.__setitem__(name, args[0]))
        else:
            module.register_forward_hook(lambda m, args, out, name=name: store.__setitem__(name, out))

    def features(self, logits: torch.Tensor, kinds: frozenset[str], preact: bool, detach: bool = False) -> Features:
        get = (lambda t: t.detach()) if detach else (lambda t: t)  # noqa: E731
        stages = self.pre if preact else self.post
        return Features(logits=logits,
                        stem=get(self.post["stem"]) if STEM in kinds else None,
                        stages=[get(stages[n]) for n in self.stage_names] if STAGES in kinds else [],
                        embedding=get(self.post["embedding"]) if EMBEDDING in kinds else None)


def reference_loop(cfg: DictConfig, data: DataSplits, teacher: nn.Module, student: nn.Module, device: torch.device,
                   batch_size: int, workers: int, lr: float, momentum: float, weight_decay: float):
    """(step function, batch iterator) of the older frameworks' training loop, ready to time."""
    objective = Objective.from_config(cfg.distill, cfg.get("combine"))
    use_teacher = objective.needs_teacher()
    preact_s = any(t.student_preact for t in objective.taps())
    preact_t = any(t.teacher_preact for t in objective.taps())
    student = student.to(device)
    teacher = teacher.to(device) if use_teacher else None
    taps_s = ReferenceTaps(student, preact_s)
    taps_t = ReferenceTaps(teacher, preact_t) if teacher is not None else None

    # build the methods' helpers from probed shapes, as every framework does once before training
    def probe(model: nn.Module) -> torch.Tensor:
        model.eval()
        with torch.no_grad():
            return model(torch.zeros(2, 3, 32, 32, device=device))

    s_logits = probe(student)
    t_logits = probe(teacher) if teacher is not None else None
    ctx = BuildContext(num_classes=data.num_classes, num_samples=len(data.train_labels),
                       train_labels=data.train_labels.to(device), device=device, student=student, teacher=teacher,
                       epochs=int(cfg.trainer.epochs))
    shape = lambda f: Features(  # noqa: E731
        logits=f.logits.shape, stem=None if f.stem is None else f.stem.shape,
        stages=[t.shape for t in f.stages], embedding=None if f.embedding is None else f.embedding.shape)
    for entry in objective.entries:
        taps = entry.method.taps
        s = shape(taps_s.features(s_logits, taps.student, taps.student_preact))
        t = (shape(taps_t.features(t_logits, taps.teacher, taps.teacher_preact)) if taps_t is not None
             else Features())
        entry.method.build(s, t, ctx)
    objective.to(device)

    student.train()
    objective.train()
    if teacher is not None:
        teacher.eval()
        if objective.teacher_bn_train():
            for m in teacher.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.train()
        for p in teacher.parameters():
            p.requires_grad_(False)
    params = list(student.parameters()) + objective.main_parameters()
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)

    crd = next((e.method for e in objective.active() if isinstance(e.method, CRD)), None)
    contrast = ReferenceContrast(data.train_labels, crd.nce_k, crd.mode) if crd is not None else None
    dataset = ReferenceCIFAR(data.train_images, data.train_labels, contrast)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                                         pin_memory=device.type == "cuda", drop_last=True,
                                         persistent_workers=workers > 0)
    meters = {"loss": 0.0, "top1": 0.0, "count": 0}

    def batches() -> Iterator[Any]:
        while True:
            yield from loader

    def step(item: Any) -> float:
        images, labels, index = item[0], item[1], item[2]
        images = images.to(device, non_blocking=True).float()
        labels = labels.to(device, non_blocking=True)
        extras = {CONTRAST_IDX_KEY: item[3].to(device, non_blocking=True)} if len(item) > 3 else {}
        batch = Batch(images, labels, index.to(device), extras)
        t_logits = None
        if teacher is not None:
            with torch.no_grad():
                t_logits = teacher(images)
        s_logits = student(images)
        per_method = {}
        for entry in objective.entries:
            taps = entry.method.taps
            s = taps_s.features(s_logits, taps.student, taps.student_preact)
            t = (taps_t.features(t_logits, taps.teacher, taps.teacher_preact, detach=True)
                 if taps_t is not None else Features())
            per_method[entry.label] = (s, t)
        loss, _ = objective(Features(logits=s_logits), Features(logits=t_logits) if t_logits is not None else None,
                            batch, 1, per_method)
        top1 = (s_logits.topk(5, 1).indices[:, 0] == labels).float().mean() * 100.0
        n = labels.shape[0]
        meters["loss"] += loss.item() * n  # the older loops' per-batch host reads
        meters["top1"] += top1.item() * n
        meters["count"] += n
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.item()

    return step, batches()


# ---- the benchmark ----------------------------------------------------------------------------------
def run(cfg: DictConfig) -> dict[str, Any]:
    bench = bench_settings(cfg)
    runtime: Runtime = make_runtime(cfg.trainer)
    device = runtime.device
    settings = settings_from_config(cfg, runtime)
    num_classes = int(cfg.dataset.get("num_classes", 100))
    if bench["data"] == "random":
        data = random_splits(bench["train_size"], num_classes, bench["seed"])
    else:
        data = load_dataset(cfg.dataset)
    if len(data.train_labels) < settings.batch_size:
        raise UserError(f"the training set has {len(data.train_labels)} images, fewer than one batch of "
                        f"dataset.batch_size={settings.batch_size}; raise bench.train_size or lower the batch size")
    teacher_arch, student_arch = str(cfg.teacher.name), str(cfg.student.name)
    objective = Objective.from_config(cfg.distill, cfg.get("combine"))
    seed_everything(settings.seed)
    teacher = build_model(teacher_arch, num_classes=data.num_classes)
    student = build_model(student_arch, num_classes=data.num_classes)
    ref_teacher, ref_student = copy.deepcopy(teacher), copy.deepcopy(student)  # same initial weights
    batch_size = settings.batch_size

    with tempfile.TemporaryDirectory(prefix="kd-benchmark-") as run_dir:
        trainer = Trainer(runtime=runtime, settings=settings, run_dir=Path(run_dir), data=data, student=student,
                          student_arch=student_arch, objective=objective, teacher=teacher,
                          teacher_arch=teacher_arch, config={}, header={})
        # No-op when the engine already compiled the networks (trainer.compile resolved true).
        compile_networks(runtime, trainer.student, trainer.teacher)
        names = [p.name for p in trainer.plan]
        if bench["phase"] not in names:
            raise UserError(f"bench.phase={bench['phase']} is not a phase of this run; its phases are: "
                            f"{', '.join(names)}")
        phase = trainer.plan[names.index(bench["phase"])]
        optimizer = trainer.prepare_phase(phase)
        stream = batch_stream(trainer)

        def our_step(batch: Batch) -> torch.Tensor:
            return trainer.train_step(batch, phase, 1, optimizer)[0]

        warmup_s = warm_up(our_step, stream, bench["warmup"], device)
        ours_times, ref_times = [], []
        peak_memory = 0
        ref_step = ref_batches = None
        with_reference = bench["reference_steps"] > 0 and phase.is_main
        # Alternating rounds, best of each: on a shared machine, bursts of other load hit both loops alike.
        for round_ in range(bench["rounds"]):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            ours_times.append(time_steps(our_step, stream, bench["steps"], device))
            if device.type == "cuda":
                peak_memory = max(peak_memory, torch.cuda.max_memory_allocated(device))
            elif round_ == 0:
                peak_memory = peak_rss_bytes()  # before the reference loop exists
            if with_reference:
                if ref_step is None:
                    seed_everything(settings.seed)
                    ref_step, ref_batches = reference_loop(
                        cfg, data, ref_teacher, ref_student, device, batch_size, bench["reference_workers"],
                        settings.lr, settings.momentum, settings.weight_decay)
                    warm_up(ref_step, ref_batches, bench["reference_warmup"], device)
                ref_times.append(time_steps(ref_step, ref_batches, bench["reference_steps"], device))
        memory_kind = "cuda_max_memory_allocated" if device.type == "cuda" else "cpu_peak_rss"
        flops_step = count_step_flops(trainer, phase, optimizer, next(stream)) if bench["flops"] else None
        trainer.student_taps.remove()
        if trainer.teacher_taps is not None:
            trainer.teacher_taps.remove()
        del trainer, optimizer, stream, ref_step, ref_batches

    ours_ms = 1e3 * min(ours_times) / bench["steps"]
    ours_ips = 1e3 * batch_size / ours_ms
    ref_ms = 1e3 * min(ref_times) / bench["reference_steps"] if ref_times else None
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
        "peak_memory_bytes": int(peak_memory),
        "peak_memory_kind": memory_kind,
        "device": device.type,
        "device_name": name,
        "threads": torch.get_num_threads(),
        "teacher": teacher_arch,
        "student": student_arch,
        "method": str(cfg.method_label),
        "phase": phase.name,
        "batch_size": batch_size,
        "precision": runtime.precision,
        "channels_last": runtime.channels_last,
        "compile": runtime.compile,
        "steps": bench["steps"],
        "warmup": bench["warmup"],
        "warmup_s": warmup_s,
        "rounds": bench["rounds"],
        "ms_per_step_rounds": [1e3 * t / bench["steps"] for t in ours_times],
        "reference_ms_per_step_rounds": [1e3 * t / bench["reference_steps"] for t in ref_times],
        "reference_steps": bench["reference_steps"] if ref_times else 0,
        "reference_workers": bench["reference_workers"],
        "data": bench["data"],
        "train_size": len(data.train_labels),
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


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    try:
        cfg = compose_config(argv)
        result = run(cfg)
    except UserError as err:
        if debug_mode():
            raise
        fail(str(err))
    print(table(result))
    print(json.dumps({k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in result.items()}),
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
