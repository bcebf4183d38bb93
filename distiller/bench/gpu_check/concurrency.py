"""Several KD runs at once on one device: the aggregate images/s of 1, 2, 4, 8 processes started together,
and the largest per-run memory footprint (which ``hydra/launcher=local_gpus`` reads to pack runs per GPU).

Each run is a process of its own (``python -m distiller.bench.gpu_check.concurrency SPEC``): it builds and
warms up its step, says it is ready, waits for the common go signal, times its steps and writes a result.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from distiller.bench.bench_settings import bench_settings, compose_benchmark, random_data_set, use_settings_data
from distiller.bench.gpu_check.check_settings import Settings
from distiller.bench.gpu_check.cifar_subset import REPO
from distiller.bench.gpu_check.rows import OK, Budget, Row, guarded, one_line
from distiller.bench.timed_step import build_engine_step, load_bench_job
from distiller.bench.timing import peak_rss_bytes, synchronize
from distiller.engine.runtime import make_runtime

CONTEXT_MIB = 512  # CUDA context and kernels, outside the caching allocator, when nvidia-smi cannot say


def concurrency_worker(spec_path: Path) -> int:
    """One of the concurrent KD runs: build, warm up, say ready, wait for go, time its steps, report."""
    spec = json.loads(Path(spec_path).read_text())
    cfg = compose_benchmark(spec["overrides"])
    use_settings_data(cfg, bench_settings(cfg))
    with random_data_set(), tempfile.TemporaryDirectory(prefix="kd-gpu-check-") as tmp:
        bench_job = load_bench_job(cfg)
        runtime = make_runtime(bench_job.job.trainer)
        device = runtime.device
        built = build_engine_step(bench_job, runtime, "main", Path(tmp))
        for _ in range(spec["warmup"]):
            built.next()
        synchronize(device)
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
            built.next()
        synchronize(device)
        end = time.time()
        reserved = torch.cuda.max_memory_reserved(device) if device.type == "cuda" else peak_rss_bytes()
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


def _run_together(s: Settings, n: int, folder: Path, budget: Budget) -> list[dict]:
    """Start ``n`` workers, give the go once all are ready, wait for them; their results."""
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
        procs.append(subprocess.Popen([sys.executable, "-m", __name__, str(folder / f"spec{i}.json")], cwd=REPO,
                                      env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    try:
        while not all((folder / f"ready{i}").exists() for i in range(n)):
            dead = [p for p in procs if p.poll() not in (None, 0)]
            if dead:
                raise RuntimeError(f"a run exited with {dead[0].returncode}: "
                                   f"{one_line((dead[0].stderr.read() or '').strip()[-400:])}")
            if budget.spent():
                raise RuntimeError("time budget spent while the runs were starting")
            time.sleep(0.05)
        go.write_text("go")
        for p in procs:
            p.wait(timeout=budget.timeout() + 60)
            if p.returncode != 0:
                raise RuntimeError(f"a run exited with {p.returncode}: "
                                   f"{one_line((p.stderr.read() or '').strip()[-400:])}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [json.loads((folder / f"result{i}.json").read_text()) for i in range(n)]


def step_concurrency(s: Settings, budget: Budget, work: Path) -> list[Row]:
    rows: list[Row] = []
    single = None
    for n in s.concurrency:
        def one(n: int = n) -> Row:
            nonlocal single
            folder = work / "concurrency" / f"n{n}"
            folder.mkdir(parents=True, exist_ok=True)
            results = _run_together(s, n, folder, budget)
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


if __name__ == "__main__":
    sys.exit(concurrency_worker(Path(sys.argv[1])))
