"""The GPU check's training steps: accuracy of the fast path and of bf16 alone against fp32 (same seeds, a few
epochs of the real jobs), and DDP with two ranks under ``torchrun``."""
from __future__ import annotations

import contextlib
import io
import json
import socket
import sys
import time
from pathlib import Path
from typing import Any

import torch

from distiller.bench.gpu_check.check_settings import BF16_PATH, FP32_PATH, Settings
from distiller.bench.gpu_check.cifar_subset import REPO
from distiller.bench.gpu_check.precision_compare import precision_comparison
from distiller.bench.gpu_check.rows import FAILED, OK, SKIPPED, Budget, Row, guarded, run_subprocess


def _metrics(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "metrics.json").read_text())


def _train_speed(metrics: dict[str, Any]) -> float | None:
    """Training images/s of the run's epochs (the engine's own per-epoch figure; the first epoch compiles)."""
    speeds = [e.get("images_per_s") for e in metrics.get("epochs", []) if e.get("images_per_s")]
    return max(speeds) if speeds else None


def _data_label(data: list[str]) -> str:
    return "CIFAR-100 subset" if "dataset=cifar100" in data else "synthetic data"


def run_job(entry: str, overrides: list[str], run_dir: Path, budget: Budget, in_process: bool) -> None:
    """Train as ``python <entry>.py overrides`` would (``train_teacher`` or ``train_student``) into ``run_dir``.

    ``in_process``: the same job function on the config composed here, its printed lines swallowed as a
    subprocess's would be; else the command line in a fresh process (nothing a run compiled or allocated
    carries over to the next one: what the timed comparison on a GPU needs).
    """
    if not in_process:
        run_subprocess([sys.executable, str(REPO / f"{entry}.py"), *overrides, f"hydra.run.dir={run_dir}"],
                       budget.timeout(), REPO)
        return
    from distiller.config.compose import compose
    from distiller.jobs.train import distill, train_network

    job = {"train_teacher": train_network, "train_student": distill}[entry]
    with contextlib.redirect_stdout(io.StringIO()):
        job(compose(entry, overrides), run_dir)


# ---- step: accuracy of the fast path (and of CPU bf16) -------------------------------------------------------
def accuracy_runs(variants: dict[str, list[str]], pair: tuple[str, str] | None, single: str | None,
                  epochs: tuple[int, int], data: list[str], batch: int, device: str, work: Path,
                  budget: Budget, seed: int = 0, in_process: bool = False) -> list[Row]:
    """Same seed, several precision variants. ``pair``: a teacher trained once (first variant's settings
    for the teacher are the fast path's), then KD into the student per variant. ``single``: that network
    trained with cross-entropy per variant. One row per variant, the top-1 pair in each row.
    ``in_process``: every run in this process (:func:`run_job`). The teacher and a variant's run of this
    seed already finished in ``work`` (an earlier call's) are read back, not trained again."""
    common = [*data, f"dataset.batch_size={batch}", f"trainer.device={device}", "trainer.progress=false",
              f"seed={seed}", f"teacher_dir={work / 'teachers'}", "dataset.eval_batch_size=500"]

    def schedule(n: int) -> list[str]:
        return [f"trainer.epochs={n}", f"schedule.milestones=[{max(1, (3 * n) // 4)}]"]

    if pair is not None:
        teacher, student = pair
        if not _finished(work / "teacher"):
            run_job("train_teacher", [f"model={teacher}", *common, *schedule(epochs[0])], work / "teacher", budget,
                    in_process)
        teacher_top1 = _metrics(work / "teacher")["final_top1"]
    results: dict[str, dict[str, Any]] = {}
    rows: list[Row] = []
    for label, overrides in variants.items():
        run_dir = work / f"{label}-seed{seed}"
        if pair is not None:
            entry, args = "train_student", [f"teacher={pair[0]}", f"student={pair[1]}", "distill=kd"]
        else:
            entry, args = "train_teacher", [f"model={single}", "save_teacher=false"]
        args += [*common, *schedule(epochs[1]), *overrides]

        def one(entry: str = entry, args: list[str] = args, label: str = label, run_dir: Path = run_dir) -> list[Row]:
            started = time.perf_counter()
            if not _finished(run_dir):
                run_job(entry, args, run_dir, budget, in_process)
            m = _metrics(run_dir)
            results[label] = {"final_top1": m["final_top1"], "best_top1": m["best_top1"],
                              "train_images_per_s": _train_speed(m), "wall_s": time.perf_counter() - started,
                              "label": label, "seed": seed}
            return []

        guarded("accuracy", label, rows, budget, one)
    if results:
        pair_text = " / ".join(f"{k} {v['final_top1']:.2f}" for k, v in results.items())
        base = next(iter(results.values()))
        what = f"{pair[0]}->{pair[1]} KD" if pair is not None else f"{single} CE"
        for label, r in results.items():
            r.update(case=what, epochs=epochs[1], data=_data_label(data))  # what precision_comparison names
            ratio = (r["train_images_per_s"] / base["train_images_per_s"]
                     if r["train_images_per_s"] and base["train_images_per_s"] else None)
            rows.append(Row("accuracy", f"{what} {label}, {epochs[1]} epochs, seed {seed}, {_data_label(data)}", OK,
                            images_per_sec=r["train_images_per_s"], speedup=ratio, accuracy=pair_text,
                            detail=(f"teacher {teacher_top1:.2f}; " if pair is not None else "")
                            + f"best {r['best_top1']:.2f}; {r['wall_s']:.0f} s", extra=r))
    return rows


def step_accuracy(s: Settings, budget: Budget, work: Path) -> list[Row]:
    """fp32 against the fast path on the first seed (top-1 and speed), then fp32 against bf16 alone (autocast,
    nothing else changed) on every seed of ``s.accuracy_seeds``, one teacher for all, and their comparison
    row: the evidence for training the table presets in fp32 and ordinary runs in bf16."""
    def runs(variants: dict[str, list[str]], seed: int) -> list[Row]:
        return accuracy_runs(variants, s.accuracy_pair, None, s.accuracy_epochs, s.accuracy_data, s.accuracy_batch,
                             s.device, work / "accuracy", budget, seed, s.jobs_in_process)

    first = s.accuracy_seeds[0]
    rows = runs({"fp32": FP32_PATH, "fast": s.paths["fast"]}, first)
    compared = [r for seed in s.accuracy_seeds for r in runs({"fp32": FP32_PATH, "bf16": BF16_PATH}, seed)]
    # the first seed's fp32 run is the one above, read back: its row is shown once
    shown = [r for r in compared if (r.extra.get("label"), r.extra.get("seed")) != ("fp32", first)]
    return rows + shown + [precision_comparison(compared)]


def _finished(run_dir: Path) -> bool:
    return (run_dir / "metrics.json").is_file() and _metrics(run_dir).get("status") == "finished"


# ---- step: DDP -----------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def step_ddp(s: Settings, budget: Budget, work: Path) -> list[Row]:
    """``train_teacher.py`` under ``torchrun`` with two ranks (NCCL on two GPUs, gloo in the CPU rehearsal)."""
    gpus = torch.cuda.device_count() if s.device == "cuda" else 0
    if s.device == "cuda" and gpus < 2:
        return [Row("ddp", "torchrun 2 ranks, nccl", SKIPPED, detail=f"{gpus} GPU: NCCL DDP needs two or more")]
    backend = "nccl" if s.device == "cuda" else "gloo"
    run_dir = work / "ddp"
    started = time.perf_counter()
    run_subprocess([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port",
                    str(_free_port()), str(REPO / "train_teacher.py"), *s.ddp_overrides, "save_teacher=false",
                    "trainer.progress=false", f"hydra.run.dir={run_dir}"], budget.timeout(), REPO,
                   env={"OMP_NUM_THREADS": "1"})
    m = _metrics(run_dir)
    ok = m.get("status") == "finished"
    return [Row("ddp", f"torchrun 2 ranks, {backend}, train_teacher.py {s.ddp_overrides[0]}", OK if ok else FAILED,
                images_per_sec=_train_speed(m), detail=f"status {m.get('status')}, top-1 {m.get('final_top1')}; "
                f"{time.perf_counter() - started:.0f} s", extra={"metrics_status": m.get("status")})]
