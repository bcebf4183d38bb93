"""The step-speed benchmark (``scripts/benchmark.py``): our full distillation step against the older
frameworks' loop on the same images, with FLOPs, the share of the device's peak (MFU) and peak memory.

Ours: :mod:`distiller.bench.timed_step` (the run as ``train_student.py`` assembles it). Reference:
:mod:`distiller.bench.reference_loop`. Both are built first, then timed in alternating rounds of
``bench.steps`` back-to-back steps (``torch.utils.benchmark.Timer``); the best round of each counts,
so a burst of other load on a shared machine hits both alike. Method and figures: ``docs/benchmarks.md``.
"""
from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from distiller.bench.bench_settings import BenchSettings, bench_settings, random_data_set, use_settings_data
from distiller.bench.flops import count_step_flops, matmul_peak, nominal_peak
from distiller.bench.reference_loop import reference_loop
from distiller.bench.report import fmt
from distiller.bench.timed_step import BenchJob, build_engine_step, load_bench_job
from distiller.bench.timing import device_name, peak_rss_bytes, seconds_per_call, synchronize
from distiller.engine.runtime import Runtime, cpu_has_native_bf16, make_runtime
from models.external import network_label


def time_loops(bench_job: BenchJob, runtime: Runtime, bench: BenchSettings, tmp: Path) -> dict[str, Any]:
    """Build both loops and time them in alternating rounds; seconds per step of each round, memory, FLOPs."""
    device = runtime.device
    ours = build_engine_step(bench_job, runtime, bench.phase, tmp / "ours")
    started = time.perf_counter()
    for _ in range(bench.warmup):  # compilation, allocator, caches
        ours.next()
    synchronize(device)
    out = {"warmup_s": time.perf_counter() - started, "ours": [], "reference": [], "peak_memory": 0,
           "phase": ours.phase.name, "batch_size": ours.batch_size, "train_size": ours.train_size}
    ref_step = None
    with_reference = bench.reference_steps > 0 and ours.phase.is_main
    # Alternating rounds, best of each: on a shared machine, bursts of other load hit both loops alike.
    for round_ in range(bench.rounds):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        out["ours"].append(seconds_per_call(ours.next, bench.steps))
        if device.type == "cuda":
            out["peak_memory"] = max(out["peak_memory"], torch.cuda.max_memory_allocated(device))
        elif round_ == 0:
            out["peak_memory"] = peak_rss_bytes()  # before the reference loop exists
        if with_reference:
            if ref_step is None:
                fp32 = dataclasses.replace(runtime, precision="fp32", channels_last=False, compile=False)
                ref_step = reference_loop(build_engine_step(bench_job, fp32, "main", tmp / "reference"), device,
                                          bench.reference_workers)
                for _ in range(bench.reference_warmup):  # DataLoader worker start-up
                    ref_step()
            out["reference"].append(seconds_per_call(ref_step, bench.reference_steps))
    out["flops_step"] = count_step_flops(ours, next(ours.batches)) if bench.flops else None
    return out


def measure_step_speed(cfg: DictConfig) -> dict[str, Any]:
    """Time both loops of the composed benchmark config, count FLOPs and measure the matmul peak; the raw
    and derived figures (the JSON object ``scripts/benchmark.py`` prints)."""
    bench = bench_settings(cfg)
    use_settings_data(cfg, bench)
    with random_data_set(), tempfile.TemporaryDirectory(prefix="kd-benchmark-") as tmp:
        bench_job = load_bench_job(cfg)
        runtime = make_runtime(bench_job.job.trainer)
        timed = time_loops(bench_job, runtime, bench, Path(tmp))  # networks and loaders are gone on return
    job, device = bench_job.job, runtime.device
    ours_times, ref_times, batch_size = timed["ours"], timed["reference"], timed["batch_size"]
    flops_step = timed["flops_step"]
    ours_ms = 1e3 * min(ours_times)
    ours_ips = 1e3 * batch_size / ours_ms
    ref_ms = 1e3 * min(ref_times) if ref_times else None
    ref_ips = 1e3 * batch_size / ref_ms if ref_ms else None
    peak = size = None
    if bench.peak_matmul:
        peak, size = matmul_peak(device, runtime.precision)
    flops_image = flops_step / batch_size if flops_step is not None else None
    achieved = flops_image * ours_ips if flops_image is not None else None
    name = device_name(device)
    nominal = nominal_peak(name, runtime.precision)
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
        "teacher": network_label(job.teacher),
        "student": network_label(job.student),
        "method": job.method_label,
        "phase": timed["phase"],
        "batch_size": batch_size,
        "precision": runtime.precision,
        "channels_last": runtime.channels_last,
        "compile": runtime.compile,
        "steps": bench.steps,
        "warmup": bench.warmup,
        "warmup_s": timed["warmup_s"],
        "rounds": bench.rounds,
        "ms_per_step_rounds": [1e3 * t for t in ours_times],
        "reference_ms_per_step_rounds": [1e3 * t for t in ref_times],
        "reference_steps": bench.reference_steps if ref_times else 0,
        "reference_workers": bench.reference_workers,
        "data": bench.data,
        "train_size": timed["train_size"],
        "torch": torch.__version__,
    }


def step_speed_table(r: dict[str, Any]) -> str:
    """The human-readable report of :func:`measure_step_speed`'s figures."""
    peak_label = "peak RSS (process)" if r["peak_memory_kind"] == "cpu_peak_rss" else "peak CUDA memory allocated"
    lines = [
        f"{r['teacher']} -> {r['student']} [{r['method']}, phase {r['phase']}], batch {r['batch_size']}, "
        f"{r['device']} ({r['device_name']}), {r['threads']} threads, torch {r['torch']}",
        f"ours: precision {r['precision']}, channels_last {r['channels_last']}, compile {r['compile']}; "
        f"{r['steps']} timed steps after {r['warmup']} warm-up ({r['warmup_s']:.1f} s), best of {r['rounds']} round(s)",
        "",
        f"{'':28}{'ours':>14}{'reference':>14}",
        f"{'images/s':28}{fmt(r['images_per_sec']):>14}{fmt(r['reference_images_per_sec']):>14}",
        f"{'ms/step':28}{fmt(r['ms_per_step']):>14}{fmt(r['reference_ms_per_step']):>14}",
        f"{'speedup ours/reference':28}{fmt(r['speedup'], 'x', digits=2):>14}",
        f"{peak_label:28}{fmt(r['peak_memory_bytes'], ' MiB', 2**20):>14}",
        f"{'FLOPs/image (step)':28}{fmt(r['flops_per_image'], ' G', 1e9, 3):>14}",
        f"{'achieved FLOP/s':28}{fmt(r['achieved_flops'], ' G', 1e9):>14}",
        f"{'matmul peak (' + r['precision'] + ')':28}{fmt(r['peak_flops'], ' G', 1e9):>14}",
        f"{'MFU (of measured peak)':28}{fmt(None if r['mfu'] is None else 100 * r['mfu'], ' %'):>14}",
    ]
    if r["mfu_nominal"] is not None:
        lines.append(f"{'MFU (of data-sheet peak)':28}{fmt(100 * r['mfu_nominal'], ' %'):>14}")
    if r["reference_images_per_sec"] is not None:
        lines.append(f"reference: fp32, DataLoader with {r['reference_workers']} workers, PIL transforms, "
                     f"{r['reference_steps']} timed steps")
    if r["mfu"] is not None and r["mfu"] > 1:
        native = r["device"] != "cpu" or r["precision"] != "bf16" or cpu_has_native_bf16()
        why = ("the step's convolutions (oneDNN) run faster than torch.mm in this precision here" if native else
               "the matmul kernels of this precision are emulated here")
        lines.append(f"note: the step runs faster than this device's {r['precision']} matmuls (MFU > 100 %): {why}, "
                     "so the measured peak is no ceiling")
    if r["device"] == "cpu" and r["precision"] == "bf16" and not cpu_has_native_bf16():
        lines.append("note: this CPU has no native bf16 (no avx512_bf16 / amx_bf16): bf16 runs emulated, "
                     "far slower than fp32")
    return "\n".join(lines)
