"""The GPU proof in one command: tests, speed, accuracy, compile equality, DDP and packing on one machine.

    python scripts/gpu_check.py                  # on a CUDA machine; about 8 minutes on one H100/H200
    python scripts/gpu_check.py --dry-run        # every step with tiny settings on the CPU (~80 s of CPU)
    python scripts/gpu_check.py --write-subset   # once: the CIFAR-100 subset the accuracy step trains on
    python scripts/gpu_check.py --cpu-precision-check   # fp32 vs bf16 on this CPU, same seed, subset

Steps, in this order, most important first (``--only a,b`` runs some of them):

``tests``        the ``gpu``-marked tests (``pytest -m gpu``, in a subprocess).
``benchmark``    ``scripts/benchmark.py``'s measurement (imported, not copied) for resnet32x4->resnet8x4
                 (kd, crd, dkd), wrn_40_2->wrn_16_2 (kd) and vgg13->MobileNetV2 (kd), each in fp32
                 (fp32, contiguous, eager) and in the default fast path (trainer.* on ``auto``: bf16,
                 channels-last, torch.compile), each against the older frameworks' reference loop.
``compile``      a few KD steps eager vs ``torch.compile`` vs CUDA graphs (compile's ``reduce-overhead``
                 mode), fp32 with TF32 off: the largest relative difference of the losses and weights.
``concurrency``  aggregate images/s of 1, 2, 4 and 8 KD runs started together on one GPU (processes),
                 and the largest per-run memory footprint, which ``hydra/launcher=local_gpus`` reads
                 (``jobs_per_gpu: auto``) from the JSON file written here.
``accuracy``     fp32 vs the fast path, same seed: a small teacher (resnet8x4) trained a few epochs
                 (fast path), then KD into resnet8 in both precisions; on the CIFAR-100 subset of
                 ``--write-subset`` when it exists (``data/cifar100-subset``), else on synthetic data
                 (then the top-1 pair only shows that both paths train alike).
``ddp``          ``torchrun`` with two ranks (NCCL) when two or more GPUs are present.

A step that fails is reported in the table and the others still run; the exit status is 1 when any
failed, 2 when no CUDA device is present (without ``--dry-run``). The steps share a time budget
(``--budget-s``, 450 s of work after start-up); what would start past it is reported as skipped.
Output: one Markdown table (date, GPU, torch/CUDA versions, command; per row images/s, ms/step,
MFU, peak memory, speedup, accuracy pair) and a JSON file of the same figures, under
``runs/gpu_check/`` (``--out``), paths printed at the end. The table goes into docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as `python scripts/gpu_check.py`: make `scripts` importable
    sys.path.insert(0, str(REPO))

from common.errors import UserError  # noqa: E402
from common.files import atomic_write  # noqa: E402
from datasets import cifar  # noqa: E402
from datasets.cifar100 import CIFAR100, read_cifar_folder  # noqa: E402

EXIT_USER_ERROR = 2


def find_cifar_folder(root: Path) -> Path | None:
    """``<root>/cifar-100-python`` (or ``root`` itself) when it holds train, test and meta."""
    return cifar.find_folder(Path(root), CIFAR100)


load_pickle = cifar.load_pickle  # the reader's restricted unpickler (numpy arrays only)
SUBSET_DIR = REPO / "data" / "cifar100-subset"  # git-ignored (/data/)
SUBSET_PER_CLASS = (140, 50)  # 14,000 train / 5,000 test images: 58.4 MB, under the ~60 MB a GPU machine receives
STEPS = ("tests", "benchmark", "compile", "concurrency", "accuracy", "ddp")  # order = priority under the budget
FAILED, SKIPPED, OK = "failed", "skipped", "ok"


# ---- settings: the real check and its dry run -------------------------------------------------------------
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
    ddp_overrides: list[str]
    concurrency: tuple[int, ...]
    concurrency_overrides: list[str]
    concurrency_steps: int
    threads_per_process: int | None


FP32_PATH = ["trainer.precision=fp32", "trainer.channels_last=false", "trainer.compile=false"]


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
        ddp_overrides=["model=resnet8x4", "trainer.epochs=1", *synthetic_data_overrides(work / "data", 4096, 1000)],
        concurrency=(1, 2, 4, 8),
        concurrency_overrides=["teacher=resnet32x4", "student=resnet8x4", "distill=kd", "dataset.batch_size=64",
                               "bench.train_size=50000"],
        concurrency_steps=150, threads_per_process=2,
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
        ddp_overrides=["model=resnet8", "trainer.epochs=1", "trainer.device=cpu", "dataset.batch_size=16", *data],
        concurrency=(1, 2),
        concurrency_overrides=["teacher=resnet8", "student=resnet8", "distill=kd", "trainer.device=cpu",
                               "dataset.batch_size=8", "bench.train_size=128"],
        concurrency_steps=3, threads_per_process=1,
    )


# ---- rows of the report --------------------------------------------------------------------------------------
@dataclasses.dataclass
class Row:
    """One line of the table; the JSON file holds the same fields plus ``extra``."""

    step: str
    config: str
    status: str = OK
    images_per_sec: float | None = None
    ms_per_step: float | None = None
    mfu: float | None = None
    peak_memory_bytes: int | None = None
    speedup: float | None = None
    accuracy: str | None = None
    detail: str = ""
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


def _one_line(text: str, limit: int = 300) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


class Budget:
    """The steps' shared time budget: work that would start after it is reported as skipped."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def timeout(self) -> float:
        """What is left, as a subprocess timeout (at least a second, at most a day)."""
        return min(max(1.0, self.left()), 86400.0)

    def spent(self) -> bool:
        return self.left() <= 0


def guarded(step: str, config: str, rows: list[Row], budget: Budget, fn: Callable[[], list[Row] | Row]) -> None:
    """Run one item of a step; a failure (or the spent budget) becomes a row and the check goes on."""
    if budget.spent():
        rows.append(Row(step, config, SKIPPED, detail="time budget spent"))
        return
    try:
        out = fn()
    except Exception as err:  # noqa: BLE001 - one failing item is reported, the others still run
        rows.append(Row(step, config, FAILED, detail=_one_line(f"{type(err).__name__}: {err}")))
        if os.environ.get("KD_DEBUG"):
            traceback.print_exc()
        return
    rows.extend(out if isinstance(out, list) else [out])


def run_subprocess(cmd: list[str], timeout: float, env: dict[str, str] | None = None,
                   cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run ``cmd``; a non-zero status raises with the last lines of its output (one row's detail)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    result = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"exit {result.returncode}: {' | '.join(tail)}")
    return result


# ---- step: gpu-marked tests ---------------------------------------------------------------------------------
def gpu_test_files() -> list[Path]:
    """Test files that carry a ``gpu`` mark (so the run collects only those)."""
    return sorted(p for p in (REPO / "tests").glob("test_*.py") if "mark.gpu" in p.read_text())


def step_tests(s: Settings, budget: Budget, work: Path) -> list[Row]:
    files = gpu_test_files()
    if not files:
        return [Row("tests", "pytest -m gpu", SKIPPED, detail="no gpu-marked tests")]
    cmd = [sys.executable, "-m", "pytest", "-q", "-n", "0", "-m", "gpu", "-p", "no:cacheprovider",
           *[str(f.relative_to(REPO)) for f in files]]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=budget.timeout(),
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    summary = next((line for line in reversed(result.stdout.splitlines()) if re.search(r"\d+ (passed|skipped|failed|"
                                                                                      r"error)", line)), "")
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|skipped|failed|errors?|deselected)", summary)}
    status = OK if result.returncode in (0, 5) else FAILED  # 5: nothing collected
    return [Row("tests", f"pytest -m gpu ({len(files)} files)", status, detail=_one_line(summary.strip("= ")),
                extra={"counts": counts, "returncode": result.returncode})]


# ---- step: the benchmark against the reference loop ----------------------------------------------------------
def step_benchmark(s: Settings, budget: Budget, work: Path) -> list[Row]:
    from scripts import benchmark

    rows: list[Row] = []
    for teacher, student, method in s.bench_cases:
        for label, path in s.paths.items():
            config = f"{teacher}->{student} {method} {label}"
            argv = [f"teacher={teacher}", f"student={student}", f"distill={method}", *s.bench_overrides, *path]

            def one(argv: list[str] = argv, config: str = config) -> Row:
                try:
                    r = benchmark.run(benchmark.compose_config(argv))
                finally:
                    if benchmark.RANDOM_DATASET in benchmark.DATASETS:
                        benchmark.DATASETS.remove(benchmark.RANDOM_DATASET)
                return Row("benchmark", f"{config} ({r['precision']}, channels_last {r['channels_last']}, "
                           f"compile {r['compile']})", OK, r["images_per_sec"], r["ms_per_step"], r["mfu"],
                           r["peak_memory_bytes"], r["speedup"],
                           detail=f"reference {r['reference_images_per_sec']:.1f} img/s; warm-up {r['warmup_s']:.0f} s"
                           if r["reference_images_per_sec"] else "", extra=r)

            guarded("benchmark", config, rows, budget, one)
    return rows


# ---- step: compile and CUDA graphs against eager -------------------------------------------------------------
def kd_steps(student: torch.nn.Module, teacher: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]],
             lr: float = 0.05) -> tuple[list[float], torch.nn.Module]:
    """A few plain KD steps (CE + KD at T=4, SGD with momentum); the losses, and the trained student."""
    import torch.nn.functional as F

    optimizer = torch.optim.SGD(student.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    losses = []
    for images, labels in batches:
        with torch.no_grad():
            t_logits = teacher(images)
        s_logits = student(images)
        kd = F.kl_div(F.log_softmax(s_logits / 4, 1), F.softmax(t_logits / 4, 1), reduction="batchmean") * 16
        loss = F.cross_entropy(s_logits, labels) + kd
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses, student


def max_relative_difference(a: torch.nn.Module, b: torch.nn.Module) -> float:
    """Largest ``|a - b| / (|a| + 1e-6)``-style gap over all parameters, as one normalised figure per tensor."""
    worst = 0.0
    for pa, pb in zip(a.parameters(), b.parameters()):
        gap = (pa.detach().double() - pb.detach().double()).norm() / (pa.detach().double().norm() + 1e-12)
        worst = max(worst, float(gap))
    return worst


def step_compile(s: Settings, budget: Budget, work: Path) -> list[Row]:
    from distiller.engine.compile import compile_module
    from models import build_model

    device = torch.device(s.device)
    teacher_arch, student_arch = s.compile_arch
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(s.compile_batch, 3, 32, 32, generator=gen).to(device),
                torch.randint(0, 100, (s.compile_batch,), generator=gen).to(device)) for _ in range(s.compile_steps)]
    torch.manual_seed(0)
    teacher = build_model(teacher_arch, num_classes=100).to(device).eval()
    base = build_model(student_arch, num_classes=100).to(device).train()
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # compare fp32 with fp32
    rows: list[Row] = []
    try:
        eager_losses, eager = kd_steps(copy.deepcopy(base), teacher, batches)
        variants = {"torch.compile": None, "CUDA graphs (reduce-overhead)": "reduce-overhead"}
        for label, mode in variants.items():
            def one(label: str = label, mode: str | None = mode) -> Row:
                if device.type != "cuda" and mode is not None:
                    return Row("compile", label, SKIPPED, detail="CUDA graphs need a CUDA device")
                student = compile_module(copy.deepcopy(base), device_type=device.type, backend=s.compile_backend,
                                         mode=mode)
                t_copy = compile_module(copy.deepcopy(teacher), device_type=device.type, backend=s.compile_backend,
                                        mode=mode)
                started = time.perf_counter()
                losses, trained = kd_steps(student, t_copy, batches)
                loss_gap = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(eager_losses, losses))
                weight_gap = max_relative_difference(eager, trained)
                # Few fp32 steps: only the order of reductions differs (1e-6 per op), amplified by a few steps
                # of SGD; 1e-3 relative separates that from a wrong graph (which is off by O(1)).
                status = OK if loss_gap < 1e-3 and weight_gap < 1e-3 else FAILED
                return Row("compile", f"{label} vs eager, {student_arch} KD, {s.compile_steps} steps, fp32"
                           f"{'' if device.type == 'cuda' else ', backend ' + s.compile_backend}", status,
                           detail=f"max relative gap: loss {loss_gap:.1e}, weights {weight_gap:.1e}; "
                           f"{time.perf_counter() - started:.0f} s incl. compilation",
                           extra={"loss_gap": loss_gap, "weight_gap": weight_gap, "eager_losses": eager_losses,
                                  "losses": losses})

            guarded("compile", label, rows, budget, one)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    return rows


# ---- step: accuracy of the fast path (and of CPU bf16) -------------------------------------------------------
def _metrics(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "metrics.json").read_text())


def _train_speed(metrics: dict[str, Any]) -> float | None:
    """Training images/s of the run's epochs (the engine's own per-epoch figure; the first epoch compiles)."""
    speeds = [e.get("images_per_s") for e in metrics.get("epochs", []) if e.get("images_per_s")]
    return max(speeds) if speeds else None


def accuracy_runs(variants: dict[str, list[str]], pair: tuple[str, str] | None, single: str | None,
                  epochs: tuple[int, int], data: list[str], batch: int, device: str, work: Path,
                  budget: Budget, seed: int = 0) -> list[Row]:
    """Same seed, several precision variants. ``pair``: a teacher trained once (first variant's settings
    for the teacher are the fast path's), then KD into the student per variant. ``single``: that network
    trained with cross-entropy per variant. One row per variant, the top-1 pair in each row."""
    common = [*data, f"dataset.batch_size={batch}", f"trainer.device={device}", "trainer.progress=false",
              f"seed={seed}", f"teacher_dir={work / 'teachers'}", "dataset.eval_batch_size=500"]

    def schedule(n: int) -> list[str]:
        return [f"trainer.epochs={n}", f"schedule.milestones=[{max(1, (3 * n) // 4)}]"]

    if pair is not None:
        teacher, student = pair
        run_subprocess([sys.executable, str(REPO / "train_teacher.py"), f"model={teacher}", *common,
                        *schedule(epochs[0]), f"hydra.run.dir={work / 'teacher'}"], timeout=budget.timeout())
        teacher_top1 = _metrics(work / "teacher")["final_top1"]
    results: dict[str, dict[str, Any]] = {}
    rows: list[Row] = []
    for label, overrides in variants.items():
        run_dir = work / label
        if pair is not None:
            cmd = [str(REPO / "train_student.py"), f"teacher={pair[0]}", f"student={pair[1]}", "distill=kd",
                   *common, *schedule(epochs[1]), *overrides, f"hydra.run.dir={run_dir}"]
        else:
            cmd = [str(REPO / "train_teacher.py"), f"model={single}", "save_teacher=false", *common,
                   *schedule(epochs[1]), *overrides, f"hydra.run.dir={run_dir}"]

        def one(cmd: list[str] = cmd, label: str = label, run_dir: Path = run_dir) -> list[Row]:
            started = time.perf_counter()
            run_subprocess([sys.executable, *cmd], timeout=budget.timeout())
            m = _metrics(run_dir)
            results[label] = {"final_top1": m["final_top1"], "best_top1": m["best_top1"],
                              "train_images_per_s": _train_speed(m), "wall_s": time.perf_counter() - started}
            return []

        guarded("accuracy", label, rows, budget, one)
    if results:
        pair_text = " / ".join(f"{k} {v['final_top1']:.2f}" for k, v in results.items())
        base = next(iter(results.values()))
        what = f"{pair[0]}->{pair[1]} KD" if pair is not None else f"{single} CE"
        for label, r in results.items():
            ratio = (r["train_images_per_s"] / base["train_images_per_s"]
                     if r["train_images_per_s"] and base["train_images_per_s"] else None)
            rows.append(Row("accuracy", f"{what} {label}, {epochs[1]} epochs, seed {seed}, {_data_label(data)}", OK,
                            images_per_sec=r["train_images_per_s"], speedup=ratio, accuracy=pair_text,
                            detail=(f"teacher {teacher_top1:.2f}; " if pair is not None else "")
                            + f"best {r['best_top1']:.2f}; {r['wall_s']:.0f} s", extra=r))
    return rows


def _data_label(data: list[str]) -> str:
    return "CIFAR-100 subset" if "dataset=cifar100" in data else "synthetic data"


def step_accuracy(s: Settings, budget: Budget, work: Path) -> list[Row]:
    variants = {"fp32": FP32_PATH, "fast": s.paths["fast"]}
    return accuracy_runs(variants, s.accuracy_pair, None, s.accuracy_epochs, s.accuracy_data, s.accuracy_batch,
                         s.device, work / "accuracy", budget)


# ---- step: DDP -----------------------------------------------------------------------------------------------
def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def step_ddp(s: Settings, budget: Budget, work: Path) -> list[Row]:
    gpus = torch.cuda.device_count() if s.device == "cuda" else 0
    if s.device == "cuda" and gpus < 2:
        return [Row("ddp", "torchrun 2 ranks, nccl", SKIPPED, detail=f"{gpus} GPU: NCCL DDP needs two or more")]
    backend = "nccl" if s.device == "cuda" else "gloo"
    run_dir = work / "ddp"
    started = time.perf_counter()
    run_subprocess([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port",
                    str(_free_port()), str(REPO / "train_teacher.py"), *s.ddp_overrides, "save_teacher=false",
                    "trainer.progress=false", f"hydra.run.dir={run_dir}"], timeout=budget.timeout(),
                   env={"OMP_NUM_THREADS": "1"})
    m = _metrics(run_dir)
    ok = m.get("status") == "finished"
    return [Row("ddp", f"torchrun 2 ranks, {backend}, train_teacher.py {s.ddp_overrides[0]}", OK if ok else FAILED,
                images_per_sec=_train_speed(m), detail=f"status {m.get('status')}, top-1 {m.get('final_top1')}; "
                f"{time.perf_counter() - started:.0f} s", extra={"metrics_status": m.get("status")})]


# ---- step: several runs on one GPU ---------------------------------------------------------------------------
def concurrency_worker(spec_path: Path) -> int:
    """One of the concurrent KD runs: build, warm up, say ready, wait for go, time its steps, report."""
    from scripts import benchmark

    spec = json.loads(spec_path.read_text())
    cfg = benchmark.compose_config(spec["overrides"])
    bench = benchmark.bench_settings(cfg)
    benchmark.use_random_data(cfg, bench)
    from distiller.engine.runtime import make_runtime

    runtime = make_runtime(cfg.trainer)
    device = runtime.device
    with tempfile.TemporaryDirectory(prefix="kd-gpu-check-") as tmp:
        built = benchmark.build_engine_step(cfg, runtime, "main", Path(tmp))
        for _ in range(spec["warmup"]):
            built.step(next(built.batches))
        benchmark.synchronize(device)
        Path(spec["ready"]).write_text("ready")
        deadline = time.monotonic() + spec["wait_s"]
        while not Path(spec["go"]).exists():
            if time.monotonic() > deadline:
                raise RuntimeError("no go signal")
            time.sleep(0.01)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.time()
        for _ in range(spec["steps"]):
            built.step(next(built.batches))
        benchmark.synchronize(device)
        end = time.time()
        reserved = torch.cuda.max_memory_reserved(device) if device.type == "cuda" else benchmark.peak_rss_bytes()
    Path(spec["result"]).write_text(json.dumps({"images": spec["steps"] * built.batch_size, "start": start,
                                                "end": end, "peak_reserved_bytes": int(reserved),
                                                "process_memory_mib": _process_memory_mib(os.getpid())}))
    return 0


def _process_memory_mib(pid: int) -> int | None:
    """Device memory ``nvidia-smi`` charges to this process (context included), when it can tell."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0] == str(pid) and parts[1].isdigit():
            return int(parts[1])
    return None


CONTEXT_MIB = 512  # CUDA context and kernels, outside the caching allocator, when nvidia-smi cannot say


def step_concurrency(s: Settings, budget: Budget, work: Path) -> list[Row]:
    rows: list[Row] = []
    single = None
    for n in s.concurrency:
        def one(n: int = n) -> Row:
            nonlocal single
            folder = work / "concurrency" / f"n{n}"
            folder.mkdir(parents=True, exist_ok=True)
            go = folder / "go"
            procs = []
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            if s.threads_per_process:
                env.update(OMP_NUM_THREADS=str(s.threads_per_process), MKL_NUM_THREADS=str(s.threads_per_process))
            for i in range(n):
                spec = {"overrides": [*s.concurrency_overrides, "trainer.progress=false", f"seed={i}"],
                        "warmup": 3 if s.device == "cpu" else 10, "steps": s.concurrency_steps,
                        "ready": str(folder / f"ready{i}"), "go": str(go), "result": str(folder / f"result{i}.json"),
                        "wait_s": max(30.0, budget.timeout())}
                (folder / f"spec{i}.json").write_text(json.dumps(spec))
                procs.append(subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker",
                                               str(folder / f"spec{i}.json")], cwd=REPO, env=env,
                                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
            try:
                while not all((folder / f"ready{i}").exists() for i in range(n)):
                    dead = [p for p in procs if p.poll() not in (None, 0)]
                    if dead:
                        raise RuntimeError(f"a run exited with {dead[0].returncode}: "
                                           f"{_one_line((dead[0].stderr.read() or '').strip()[-400:])}")
                    if budget.spent():
                        raise RuntimeError("time budget spent while the runs were starting")
                    time.sleep(0.05)
                go.write_text("go")
                for p in procs:
                    p.wait(timeout=budget.timeout() + 60)
                    if p.returncode != 0:
                        raise RuntimeError(f"a run exited with {p.returncode}: "
                                           f"{_one_line((p.stderr.read() or '').strip()[-400:])}")
            finally:
                for p in procs:
                    if p.poll() is None:
                        p.kill()
                        p.wait()
            results = [json.loads((folder / f"result{i}.json").read_text()) for i in range(n)]
            span = max(r["end"] for r in results) - min(r["start"] for r in results)
            total = sum(r["images"] for r in results) / span
            if n == 1:
                single = total
            footprint = max((r["process_memory_mib"] or (r["peak_reserved_bytes"] >> 20) + CONTEXT_MIB)
                            for r in results) if s.device == "cuda" else None
            return Row("concurrency", f"{n} KD run(s) at once, one {s.device.upper()}", OK, images_per_sec=total,
                       ms_per_step=1e3 * span / s.concurrency_steps,
                       peak_memory_bytes=max(r["peak_reserved_bytes"] for r in results),
                       speedup=total / single if single else None,
                       detail=f"aggregate of {n} processes; per run {total / n:.0f} img/s",
                       extra={"runs": results, "footprint_mib": footprint})

        guarded("concurrency", f"{n} runs", rows, budget, one)
    return rows


STEP_FUNCTIONS: dict[str, Callable[[Settings, Budget, Path], list[Row]]] = {
    "tests": step_tests, "benchmark": step_benchmark, "compile": step_compile, "accuracy": step_accuracy,
    "ddp": step_ddp, "concurrency": step_concurrency,
}


# ---- the CIFAR-100 subset ----------------------------------------------------------------------------------
def default_source() -> Path:
    return Path(os.environ.get("KD_DATA_ROOT") or REPO.parent / "shared" / "data")


def write_cifar_subset(source: Path, dest: Path = SUBSET_DIR, per_class: tuple[int, int] = SUBSET_PER_CLASS,
                       seed: int = 0, force: bool = False) -> Path:
    """Write ``per_class`` (train, test) images of every class of the CIFAR-100 under ``source`` into
    ``dest/cifar-100-python/`` in the official pickle format (same keys; ``meta`` copied), once.

    The images of each class are a seeded random choice, kept in the source's order. Returns the folder.
    """
    folder = find_cifar_folder(Path(source))
    if folder is None:
        raise UserError(f"no CIFAR-100 (cifar-100-python/ with train, test, meta) under {source}; pass --source "
                        "PATH or set KD_DATA_ROOT")
    out = Path(dest) / CIFAR100.base_folder
    if find_cifar_folder(Path(dest)) is not None and not force:
        return out
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, n in zip(("train", "test"), per_class):
        entry = load_pickle(folder / split)
        labels = np.asarray(entry["fine_labels"], dtype=np.int64)
        keep = []
        for c in range(int(labels.max()) + 1):
            members = np.flatnonzero(labels == c)
            if len(members) < n:
                raise UserError(f"{folder / split} has {len(members)} images of class {c}, fewer than {n} per class")
            keep.append(rng.choice(members, size=n, replace=False))
        index = np.sort(np.concatenate(keep))
        subset = {"data": np.ascontiguousarray(entry["data"][index]),
                  "fine_labels": labels[index].tolist(),
                  "coarse_labels": (np.asarray(entry["coarse_labels"])[index].tolist()
                                    if "coarse_labels" in entry else [0] * len(index)),
                  "filenames": ([entry["filenames"][i] for i in index] if "filenames" in entry
                                else [f"{split}_{i}.png" for i in index]),
                  "batch_label": f"{split} subset: {n} per class, seed {seed}"}
        atomic_write(subset, out / split, "pickle")
    atomic_write(load_pickle(folder / "meta"), out / "meta", "pickle")
    read_cifar_folder(out)  # fails here, not on the GPU machine, if anything is off
    return out


# ---- the report ----------------------------------------------------------------------------------------------
def environment(s: Settings, argv: list[str]) -> dict[str, Any]:
    from scripts.benchmark import device_name

    device = torch.device(s.device)
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device_name(device),
        "gpus": torch.cuda.device_count() if s.device == "cuda" else 0,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "python": platform.python_version(),
        "command": " ".join(["python scripts/gpu_check.py", *map(shlex.quote, argv)]),
        "dry_run": s.device == "cpu",
    }


def _f(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def markdown(env: dict[str, Any], rows: list[Row]) -> str:
    head = [
        f"GPU check, {env['date']}: {env['device']}" + (f" x {env['gpus']}" if env["gpus"] else "")
        + f"; torch {env['torch']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}, Python {env['python']}"
        + ("; DRY RUN on the CPU (tiny settings: the figures only show that every step runs)"
           if env["dry_run"] else ""),
        "",
        f"Command: `{env['command']}`",
        "",
        "| step | config | images/s | ms/step | MFU | peak memory | speedup | accuracy (top-1) | status |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mem = None if r.peak_memory_bytes is None else r.peak_memory_bytes / 2**20
        status = r.status + (f": {r.detail}" if r.detail else "")
        head.append(f"| {r.step} | {r.config} | {_f(r.images_per_sec, '.0f')} | {_f(r.ms_per_step, '.2f')} | "
                    f"{'-' if r.mfu is None else f'{100 * r.mfu:.1f} %'} | {_f(mem, '.0f')}"
                    f"{'' if mem is None else ' MiB'} | {_f(r.speedup, '.2f')}{'' if r.speedup is None else 'x'} | "
                    f"{r.accuracy or '-'} | {status.replace('|', '/')} |")
    return "\n".join(head) + "\n"


def _jsonable(value: Any) -> Any:
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    return str(value)


def run_check(s: Settings, steps: list[str], out: Path, argv: list[str], budget_s: float) -> int:
    """Run ``steps``, write the table and the JSON file; 0 when no step failed, else 1."""
    out.mkdir(parents=True, exist_ok=True)
    env = environment(s, argv)
    budget = Budget(budget_s)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="kd-gpu-check-") as tmp:
        for name in steps:
            print(f"[gpu_check] {name} ({max(0.0, budget.left()):.0f} s of budget left)", flush=True)
            before = len(rows)
            guarded(name, "(step)", rows, budget, lambda name=name: STEP_FUNCTIONS[name](s, budget, Path(tmp)))
            for r in rows[before:]:
                print(f"[gpu_check]   {r.step} | {r.config} | {r.status} {r.detail}", flush=True)
    footprints = [r.extra.get("footprint_mib") for r in rows if r.extra.get("footprint_mib")]
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    table = markdown(env, rows)
    data = {**env, "rows": [dataclasses.asdict(r) for r in rows],
            "footprint_mib": max(footprints) if footprints else None}
    md_path, json_path = out / f"gpu_check-{stamp}.md", out / f"gpu_check-{stamp}.json"
    md_path.write_text(table)
    atomic_write(_jsonable(data), json_path, "json")
    if not env["dry_run"]:  # the latest real figures, where hydra/launcher=local_gpus looks for the footprint
        atomic_write(_jsonable(data), out / "gpu_check.json", "json")
    print(table)
    print(f"table: {md_path}\njson:  {json_path}", flush=True)
    return 1 if any(r.status == FAILED for r in rows) else 0


def cpu_precision_check(args: argparse.Namespace, argv: list[str]) -> int:
    """fp32 vs bf16 on this CPU, same seed: the evidence ``trainer.precision=auto`` needs before bf16."""
    from distiller.engine.runtime import cpu_has_native_bf16

    data = subset_data_overrides(Path(args.subset_dir))
    if data is None:
        raise UserError(f"no CIFAR-100 subset under {args.subset_dir}; write it first: python scripts/gpu_check.py "
                        "--write-subset (with the same --subset-dir)")
    native = cpu_has_native_bf16()
    s = dry_settings(Path(args.out))
    s.device = "cpu"
    env = environment(s, argv)
    env["dry_run"] = False
    env["device"] += f" (bf16 {'native' if native else 'EMULATED: no avx512_bf16/amx_bf16'})"
    budget = Budget(1e9)
    with tempfile.TemporaryDirectory(prefix="kd-precision-") as tmp:
        rows = accuracy_runs({"fp32": ["trainer.precision=fp32"], "bf16": ["trainer.precision=bf16"]}, None,
                             args.model, (args.epochs, args.epochs), data, 64, "cpu", Path(tmp), budget, args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(env, rows)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    (out / f"cpu_precision-{stamp}.md").write_text(table)
    atomic_write(_jsonable({**env, "native_bf16": native, "rows": [dataclasses.asdict(r) for r in rows]}),
                 out / f"cpu_precision-{stamp}.json", "json")
    print(table)
    print(f"table: {out / f'cpu_precision-{stamp}.md'}\njson:  {out / f'cpu_precision-{stamp}.json'}", flush=True)
    return 1 if any(r.status == FAILED for r in rows) else 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/gpu_check.py", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--dry-run", action="store_true", help="every step with tiny settings on the CPU")
    p.add_argument("--only", default=",".join(STEPS), help=f"comma-separated steps (default: all of {','.join(STEPS)})")
    p.add_argument("--out", default=str(REPO / "runs" / "gpu_check"), help="folder of the table and JSON file")
    p.add_argument("--budget-s", type=float, default=None, help="time budget of the steps (default 450; dry run 3600)")
    p.add_argument("--write-subset", action="store_true", help="write the CIFAR-100 subset and exit")
    p.add_argument("--source", default=None, help="CIFAR-100 to take the subset from (default ../shared/data)")
    p.add_argument("--subset-dir", default=str(SUBSET_DIR), help="where the subset goes")
    p.add_argument("--per-class", default=f"{SUBSET_PER_CLASS[0]},{SUBSET_PER_CLASS[1]}",
                   help="train,test images per class of the subset")
    p.add_argument("--force", action="store_true", help="rewrite the subset even when it exists")
    p.add_argument("--cpu-precision-check", action="store_true",
                   help="fp32 vs bf16 on this CPU, same seed, on the subset (--model, --epochs)")
    p.add_argument("--model", default="resnet8", help="network of --cpu-precision-check")
    p.add_argument("--epochs", type=int, default=3, help="epochs of --cpu-precision-check")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _fail(message: str) -> int:
    sys.stderr.write(f"error: {' '.join(message.split())}\n")
    return EXIT_USER_ERROR


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.worker:
        return concurrency_worker(Path(args.worker))
    try:
        if args.write_subset:
            per_class = tuple(int(x) for x in args.per_class.split(","))
            if len(per_class) != 2 or min(per_class) < 1:
                raise UserError(f"--per-class {args.per_class}: give train,test images per class, e.g. 140,50")
            folder = write_cifar_subset(Path(args.source) if args.source else default_source(), Path(args.subset_dir),
                                        per_class, args.seed, args.force)
            size = sum(f.stat().st_size for f in folder.iterdir())
            print(f"CIFAR-100 subset: {folder} ({size / 1e6:.1f} MB)")
            return 0
        if args.cpu_precision_check:
            return cpu_precision_check(args, argv)
        steps = [x.strip() for x in args.only.split(",") if x.strip()]
        unknown = [x for x in steps if x not in STEP_FUNCTIONS]
        if unknown:
            raise UserError(f"--only {unknown[0]} is not a step; the steps are {','.join(STEPS)}")
        if not args.dry_run and not torch.cuda.is_available():
            raise UserError("no CUDA device is present: scripts/gpu_check.py measures the GPU; run it on a CUDA "
                            "machine, or pass --dry-run to rehearse every step on the CPU")
    except UserError as err:
        return _fail(str(err))
    with tempfile.TemporaryDirectory(prefix="kd-gpu-check-settings-") as work:
        s = dry_settings(Path(work)) if args.dry_run else full_settings(Path(work))
        # the dry run rehearses every step, however slow a shared CPU is; the GPU check must fit its slot
        budget = args.budget_s if args.budget_s is not None else (3600.0 if args.dry_run else 450.0)
        return run_check(s, steps, Path(args.out), argv, budget)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
