"""The GPU check's first steps: the ``gpu``-marked tests, the step-speed benchmark of several pairs and
methods in fp32 and on the fast path, and ``torch.compile`` / CUDA graphs against eager on the same steps."""
from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from distiller.bench.bench_settings import compose_benchmark
from distiller.bench.gpu_check.check_settings import Settings
from distiller.bench.gpu_check.cifar_subset import REPO
from distiller.bench.gpu_check.rows import FAILED, OK, SKIPPED, Budget, Row, guarded, one_line
from distiller.bench.step_speed import measure_step_speed


# ---- step: gpu-marked tests ---------------------------------------------------------------------------------
def gpu_test_files() -> list[Path]:
    """Test files that carry a ``gpu`` mark (so the run collects only those)."""
    return sorted(p for p in (REPO / "tests").glob("test_*.py") if "mark.gpu" in p.read_text())


def step_tests(s: Settings, budget: Budget, work: Path) -> list[Row]:
    """``pytest -m gpu`` on the files that carry the mark, in a subprocess (a test session of its own)."""
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
    return [Row("tests", f"pytest -m gpu ({len(files)} files)", status, detail=one_line(summary.strip("= ")),
                extra={"counts": counts, "returncode": result.returncode})]


# ---- step: the benchmark against the reference loop ----------------------------------------------------------
def step_benchmark(s: Settings, budget: Budget, work: Path) -> list[Row]:
    """:func:`~distiller.bench.step_speed.measure_step_speed` per case and path (fp32, fast), in this process."""
    rows: list[Row] = []
    for teacher, student, method in s.bench_cases:
        for label, path in s.paths.items():
            config = f"{teacher}->{student} {method} {label}"
            argv = [f"teacher={teacher}", f"student={student}", f"distill={method}", *s.bench_overrides, *path]

            def one(argv: list[str] = argv, config: str = config) -> Row:
                r = measure_step_speed(compose_benchmark(argv))
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
    """Largest ``|a - b| / |a|`` over the parameters (norms per tensor): one normalised figure for the whole net."""
    worst = 0.0
    for pa, pb in zip(a.parameters(), b.parameters()):
        gap = (pa.detach().double() - pb.detach().double()).norm() / (pa.detach().double().norm() + 1e-12)
        worst = max(worst, float(gap))
    return worst


def step_compile(s: Settings, budget: Budget, work: Path) -> list[Row]:
    """The same KD steps eager, compiled, and as CUDA graphs, fp32 with TF32 off: the largest relative gaps."""
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
