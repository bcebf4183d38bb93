"""Measuring the teacher cache (``scripts/benchmark.py --teacher-cache``, docs/benchmarks.md): the step with and
without it, the build's rate (:func:`distiller.jobs.cache_build.measure_build`) and the cost of a lookup.

:func:`measure_cached_step` times the full distillation step of the job's own assembly twice in one
process, on the same batches: the live teacher, and the cache the job would hand the step. A real
cache of a whole data set is hours of CPU, and the step's time does not depend on which rows exist,
so the cache here holds the live teacher's logits for exactly the rows the timed steps draw (computed
first, one teacher forward per image) in a memory-mapped file laid out as a full cache of the
random training split: the lookups read real rows through the real path, and the two variants
compute the same losses.
"""
from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from common.errors import UserError
from datasets.base import DataSplits
from distiller.bench.bench_settings import bench_settings, compose_benchmark
from distiller.bench.report import fmt
from distiller.config.compose import compose
from distiller.config.overrides import override_key
from distiller.engine.runtime import make_runtime, seed_everything
from distiller.engine.teacher_cache import DTYPES, CacheKey, TeacherCache, row_index
from distiller.jobs.cache_build import measure_build
from distiller.jobs.train import assemble, compose_job
from distiller.objective import Objective
from models.external import build_network, network_label

# the pairs of the cache's table when no teacher=/student= is given: the teacher's share of the step's FLOPs
# is about two thirds in the first and about half in the others (issue 23's measurements)
CACHE_PAIRS = (("resnet32x4", "resnet8x4"), ("resnet56", "resnet20"), ("wrn_40_2", "wrn_16_2"))
# the keys --teacher-cache reads itself; every other override goes to the run as given
OWN_KEYS = ("teacher", "student", "distill", "dataset.batch_size", "teacher.cache_dtype")


def _random_splits(n: int, num_classes: int, seed: int = 0) -> DataSplits:
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen)
    labels = torch.arange(n) % num_classes
    return DataSplits(images, labels, images[:64].clone(), labels[:64].clone(), num_classes,
                      [str(c) for c in range(num_classes)])


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_cached_step(teacher: str, student: str, distill: str = "kd", *, batch_size: int = 64, steps: int = 8,
                        warmup: int = 2, rounds: int = 3, num_classes: int = 100,
                        overrides: Sequence[str] = ("trainer.device=cpu", "trainer.precision=fp32"),
                        cache_dtype: str = "fp32") -> dict[str, Any]:
    """Images/s of the distillation step with the live teacher and with the teacher cache: ``rounds``
    alternating rounds of ``warmup + steps`` steps each (the best round of each counts: on a shared machine
    the others were slowed by someone else), batches from the run's own loader (augmentation included).

    ``teacher`` / ``student`` / ``distill``: as on the command line; ``overrides``: further ``train_student``
    overrides (device, precision, ...). Returns images/s of both (wall clock, and per second of this
    process's CPU time), their ratio, the setting, and the teacher's build rate (``build``: :func:`measure_build`).
    """
    per_round = warmup + steps
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose("train_student", [f"teacher={teacher}", f"student={student}", f"distill={distill}",
                                        f"dataset.batch_size={batch_size}", "trainer.progress=false", "logger=none",
                                        "dataset=synthetic", *overrides])
        job, record, _ = compose_job(cfg, "train_student")
        runtime = make_runtime(job.trainer)
        data = _random_splits(batch_size * per_round, num_classes)
        header = {"kind": "student", "arch": student, "student": student, "teacher": teacher, "method": distill,
                  "seed": job.seed, "dataset": "random"}

        def trainer(cache: TeacherCache | None, run: str):
            seed_everything(job.seed)
            objective = Objective.from_config(job.distill, job.combine)
            t = build_network(job.teacher, num_classes, data.image_size, role="teacher")
            s = build_network(job.student, num_classes, data.image_size, role="student")
            return assemble(job, Path(tmp) / run, record, runtime, data, s, t, objective, header, cache)

        live = trainer(None, "live")
        key = CacheKey("random", "random", len(data.train_labels), "random", 4, data.image_size,
                       tuple(data.mean), tuple(data.std), num_classes, cache_dtype, "fp32")
        path = Path(tmp) / "cache.logits"
        with open(path, "wb") as f:
            f.truncate(key.nbytes)  # sparse: only the rows the timed steps draw are written
        logits = torch.from_file(str(path), shared=True, size=key.rows * num_classes, dtype=DTYPES[cache_dtype])
        logits = logits.view(key.rows, num_classes)
        with torch.no_grad():  # the live teacher's logits of the timed batches, at their rows
            for batch in live.train_loader.epoch(1):
                rows = row_index(batch.indices, batch.offsets, batch.flips, key.pad).cpu()
                logits[rows] = live.teacher(batch.images).float().cpu().to(logits.dtype)
        mapped = torch.from_file(str(path), shared=False, size=key.rows * num_classes, dtype=DTYPES[cache_dtype])
        cached = trainer(TeacherCache(path, key, mapped.view(key.rows, num_classes)).to(runtime.device), "cached")

        timings: dict[str, list[tuple[float, float]]] = {"live": [], "cached": []}
        runs = {"live": live, "cached": cached}
        prepared = {name: (t, t.plan[-1], t.prepare_phase(t.plan[-1])) for name, t in runs.items()}
        for _ in range(rounds):
            for name, (t, phase, optimizer) in prepared.items():
                batches = t.train_loader.epoch(1)
                for _, batch in zip(range(warmup), batches):
                    t.train_step(batch, phase, 1, optimizer)
                _synchronize(runtime.device)
                wall, cpu = time.perf_counter(), time.process_time()
                for batch in batches:
                    t.train_step(batch, phase, 1, optimizer)
                _synchronize(runtime.device)
                timings[name].append((time.perf_counter() - wall, time.process_time() - cpu))
        for t in runs.values():
            t.step.remove_hooks()
        # the same teacher network, on the same device and in the same precision, in the build's own batches
        build = measure_build(live.teacher, image_size=data.image_size, num_classes=num_classes,
                              device=runtime.device, precision=runtime.precision)
    images = steps * batch_size
    best = {name: (min(w for w, _ in rows), min(c for _, c in rows)) for name, rows in timings.items()}
    out: dict[str, Any] = {"pair": f"{network_label(job.teacher)}->{network_label(job.student)}", "method": distill,
                           "batch_size": batch_size, "steps": steps, "rounds": rounds, "device": str(runtime.device),
                           "precision": runtime.precision, "threads": torch.get_num_threads(),
                           "cache_dtype": cache_dtype}
    for name, (wall, cpu) in best.items():
        out[f"{name}_images_per_s"] = images / wall
        out[f"{name}_images_per_cpu_s"] = images / cpu
    out["speedup"] = out["cached_images_per_s"] / out["live_images_per_s"]
    out["speedup_cpu_time"] = out["cached_images_per_cpu_s"] / out["live_images_per_cpu_s"]
    out["build"] = build
    return out


def measure_lookup(cache: TeacherCache, *, batch_size: int = 64, steps: int = 200, seed: int = 0) -> dict[str, float]:
    """Seconds per :meth:`TeacherCache.lookup_at` of ``batch_size`` random (image, offset, flip) triples.

    Whether the rows come from the page cache or the disk depends on what was read before: call it
    right after dropping the file's pages (``os.posix_fadvise(..., POSIX_FADV_DONTNEED)``) for cold reads.
    """
    gen = torch.Generator().manual_seed(seed)
    key = cache.key
    draws = [(torch.randint(0, key.size, (batch_size,), generator=gen),
              torch.randint(0, key.side, (batch_size, 2), generator=gen),
              torch.rand(batch_size, generator=gen) < 0.5) for _ in range(steps)]
    started = time.perf_counter()
    for indices, offsets, flips in draws:
        cache.lookup_at(indices, offsets, flips)
    seconds = (time.perf_counter() - started) / steps
    return {"seconds_per_lookup": seconds, "rows_per_s": batch_size / seconds}


def measure_cache_speed(argv: list[str]) -> list[dict[str, Any]]:
    """``scripts/benchmark.py --teacher-cache``: for each pair (``teacher=``/``student=`` of ``argv``, else
    :data:`CACHE_PAIRS`), the step with the live teacher and with the cache (:func:`measure_cached_step`;
    ``bench.steps``/``warmup``/``rounds`` of ``argv``) and the teacher's build rate on the same device."""
    bench = bench_settings(compose_benchmark(argv))  # checks every override once, in one line
    given = {override_key(a): a.split("=", 1)[1] for a in argv if "=" in a}
    if ("teacher" in given) != ("student" in given):
        raise UserError("--teacher-cache times the pairs of its table, or the one pair given: "
                        "pass both teacher= and student=, or neither")
    pairs = [(given["teacher"], given["student"])] if "teacher" in given else list(CACHE_PAIRS)
    overrides = [a for a in argv if override_key(a) not in OWN_KEYS
                 and not a.split("=", 1)[0].startswith("bench.")]
    overrides = [o for o in ("trainer.device=cpu", "trainer.precision=fp32")
                 if o.split("=", 1)[0] not in given] + overrides
    rows = []
    for teacher, student in pairs:
        row = measure_cached_step(teacher, student, given.get("distill", "kd"),
                                  batch_size=int(given.get("dataset.batch_size", 64)), steps=bench.steps,
                                  warmup=bench.warmup, rounds=bench.rounds, overrides=overrides,
                                  cache_dtype=given.get("teacher.cache_dtype", "fp32"))
        rows.append(row)
    return rows


def cache_speed_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of :func:`measure_cache_speed` rows."""
    first = rows[0]
    lines = [f"{first['method']}, batch {first['batch_size']}, {first['device']}, {first['threads']} threads, "
             f"precision {first['precision']}, cache {first['cache_dtype']}, {first['steps']} timed steps per round, "
             f"best of {first['rounds']} alternating round(s)", "",
             "| pair | live teacher, images/s | cache, images/s | speed-up | speed-up (CPU time) "
             "| build, forwards/s | CIFAR-100 build, hours |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['pair']} | {fmt(r['live_images_per_s'])} | {fmt(r['cached_images_per_s'])} | "
                     f"{fmt(r['speedup'], 'x', digits=2)} | {fmt(r['speedup_cpu_time'], 'x', digits=2)} | "
                     f"{fmt(r['build']['forwards_per_s'])} | {fmt(r['build']['cifar100_hours'], digits=1)} |")
    return "\n".join(lines)
