"""Building the teacher cache: the frozen teacher's logits for every crop and flip of the training split.

The cache itself (key, row layout, files, reading) is :mod:`distiller.engine.teacher_cache`; building
it runs the teacher over the whole data set (162 forwards per CIFAR image), which is the work of a
job: ``scripts/teachers.py cache`` runs it alone, and a run with ``teacher.cache=true`` runs it on
first use (:mod:`distiller.jobs.run_cache`).

Crash safety: the rows go to ``.partial`` and a progress record names how many are on disk (fsynced
before the record says so), so a killed build resumes where it stopped, at the same batch boundaries.
Only when every row is there is the file renamed into place and then the header written (atomically):
a kill -9 at any moment leaves either no header (the cache is not used; the next build resumes or
finishes) or a complete cache. Concurrent runs of a sweep take the lock: one builds, the others wait
and then open what it built.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from common.errors import UserError
from common.files import atomic_write
from datasets.augment import padding_for
from datasets.base import DataSplits
from datasets.device_loader import fits_on_device
from distiller.engine.runtime import Runtime, resolve_device
from distiller.engine.teacher_cache import (
    CACHE_FORMAT,
    DTYPES,
    CacheFiles,
    CacheKey,
    TeacherCache,
    cache_key,
    cache_lock,
    open_cache,
    read_json,
    stored_key,
    variant_images,
)
from distiller.jobs.evaluate import load_on_data
from distiller.jobs.teachers import verify_teacher

log = logging.getLogger("distiller")

BUILD_BATCH = 256
RECORD_EVERY_S = 5.0  # seconds between progress records: each costs an fsync of the rows written since


def _teacher_precision(teacher: nn.Module, precision: str) -> torch.dtype:
    """The dtype the inputs take: the teacher's (float64 exactly when the build's precision is fp64)."""
    dtype = next(teacher.parameters()).dtype
    if (dtype == torch.float64) != (precision == "fp64"):
        raise ValueError(f"a {dtype} teacher cannot build at precision {precision} (fp64 needs a float64 teacher)")
    return dtype


@torch.inference_mode()
def forward_rows(teacher: nn.Module, images: torch.Tensor, rows: torch.Tensor, key: CacheKey) -> torch.Tensor:
    """The teacher's logits of ``rows``, in the stored dtype, on the CPU (the build's unit of work).

    ``teacher`` in eval mode on ``images``' device; bf16 autocast when the key's precision says so.
    """
    device = images.device
    inputs = variant_images(images, rows, key).to(_teacher_precision(teacher, key.precision))
    with Runtime(device, "bf16" if key.precision == "bf16" else "fp32", False, False).autocast():
        logits = teacher(inputs)
    stored = logits.to(DTYPES[key.dtype])
    if not bool(torch.isfinite(stored).all()):
        bad = int(rows[~torch.isfinite(stored).all(dim=1).cpu()][0])
        raise UserError(f"the teacher's logits at row {bad} are not finite in {key.dtype} (a broken teacher, or "
                        f"logits beyond the dtype's range): check the teacher, or store the cache as fp32")
    return stored.cpu()


def _write_record(files: CacheFiles, key: CacheKey, rows_done: int) -> None:
    atomic_write({"format": CACHE_FORMAT, "key": key.to_json(), "rows_done": rows_done}, files.record, "json")


def _resume_point(files: CacheFiles, key: CacheKey) -> int | None:
    """Rows already on disk for ``key`` (None: no usable progress; the build starts afresh)."""
    record = read_json(files.record)
    if record is None or record.get("format") != CACHE_FORMAT or stored_key(record) != key:
        return None
    done = record.get("rows_done")
    if not isinstance(done, int) or not 0 <= done <= key.rows:
        return None
    if files.partial.is_file() and files.partial.stat().st_size == key.nbytes:
        return done
    if done == key.rows and files.data.is_file() and files.data.stat().st_size == key.nbytes \
            and not files.partial.exists():
        return done  # killed after the rename, before the header: only the header is left to write
    return None


def _finish(files: CacheFiles, key: CacheKey, info: dict[str, Any]) -> None:
    """Put a complete ``.partial`` in place and write the header last (each step redone safely after a kill)."""
    if files.partial.exists():
        files.header.unlink(missing_ok=True)  # an older cache being replaced is unusable from here on
        os.replace(files.partial, files.data)
        dir_fd = os.open(files.data.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    atomic_write({"format": CACHE_FORMAT, "key": key.to_json(), **info}, files.header, "json")
    files.record.unlink(missing_ok=True)


def build_cache(teacher: nn.Module, images: torch.Tensor, key: CacheKey, files: CacheFiles, *,
                device: torch.device | str = "cpu", batch_size: int = BUILD_BATCH, progress: bool = True,
                record_every: float = RECORD_EVERY_S, teacher_file: str | Path | None = None) -> int:
    """Compute every row of ``key`` into ``files`` (resuming a killed build of the same key); returns the
    forwards run here. The caller holds the lock (:func:`ensure_cache` does).

    ``teacher``: the frozen network (no feature hooks), moved to ``device`` and run in eval mode;
    ``images``: the uint8 training split the key was made from. Batches of ``batch_size`` rows, in row
    order, so a resumed build runs the very batches an uninterrupted one would.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"the teacher-cache build batch must be a positive integer, got {batch_size!r}")
    device = torch.device(device)
    files.base.parent.mkdir(parents=True, exist_ok=True)
    for stale in files.base.parent.glob(f".{files.base.name}.*.tmp"):  # a killed builder's unfinished record
        stale.unlink(missing_ok=True)
    done = _resume_point(files, key)
    if done is None:
        files.partial.unlink(missing_ok=True)
        with open(files.partial, "wb") as f:
            f.truncate(key.nbytes)  # sparse until written
        _write_record(files, key, 0)
        done = 0
    elif done:
        log.info("resuming the teacher cache %s at row %d of %d", files.data, done, key.rows)
    start, started = done, time.perf_counter()
    if done < key.rows:
        was_training = teacher.training
        teacher.to(device).eval()
        resident = images.to(device) if fits_on_device(images.numel(), device) else images
        log.info("building the teacher cache %s: %d images x %d variants = %d forwards (%s, %s on %s, %.2f GB)",
                 files.data, key.size, key.variants, key.rows, key.dtype, key.precision, device, key.nbytes / 1e9)
        bar = tqdm(total=key.rows, initial=done, unit="fwd", unit_scale=True, dynamic_ncols=True,
                   desc="teacher cache", disable=not progress)
        last_record = time.monotonic()
        try:
            with open(files.partial, "r+b") as f:
                while done < key.rows:
                    rows = torch.arange(done, min(done + batch_size, key.rows))
                    if resident.device == device:
                        logits = forward_rows(teacher, resident, rows, key)
                    else:  # a set too large for the device: gather this batch's images on the CPU, then move
                        needed, where = torch.unique(rows // key.variants, return_inverse=True)
                        local = rows - needed[where] * key.variants + where * key.variants
                        logits = forward_rows(teacher, resident[needed].to(device), local, key)
                    os.pwrite(f.fileno(), logits.contiguous().view(torch.uint8).numpy().data,
                              done * key.row_bytes)
                    done += len(rows)
                    bar.update(len(rows))
                    if done == key.rows or time.monotonic() - last_record >= record_every:
                        os.fsync(f.fileno())  # the rows are on disk before the record says so
                        _write_record(files, key, done)
                        last_record = time.monotonic()
        finally:
            bar.close()
            teacher.train(was_training)
    seconds = time.perf_counter() - started
    _finish(files, key, {"teacher_file": None if teacher_file is None else str(teacher_file),
                         "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "device": str(device),
                         "forwards_per_s": (done - start) / seconds if done > start and seconds > 0 else None})
    log.info("teacher cache %s complete (%.2f GB)", files.data, key.nbytes / 1e9)
    return done - start


def ensure_cache(teacher: nn.Module, teacher_path: str | Path, data: DataSplits, dataset: str, *,
                 device: torch.device | str = "cpu", dtype: str = "fp32", precision: str = "fp32",
                 cache_dir: str | Path | None = None, batch_size: int = BUILD_BATCH, progress: bool = True,
                 rebuild: bool = False, record_every: float = RECORD_EVERY_S) -> TeacherCache:
    """The open cache of ``teacher`` (loaded from ``teacher_path``) on ``data``'s training split, built if missing.

    A complete cache with another key is refused in one line (never rebuilt behind the user's back)
    unless ``rebuild``. An fp16/bf16 cache is derived from a complete fp32 cache of the same forwards
    when there is one (:func:`derive_cache`: seconds, not a build). Processes that call this at once
    (a sweep) build it once: one holds the lock and builds, the others wait and open its result. The
    cache stays memory-mapped on the CPU; :meth:`TeacherCache.to` moves it to the training device when
    it fits there.
    """
    key = cache_key(teacher_path, data, dataset, dtype=dtype, precision=precision)
    files = CacheFiles.beside(teacher_path, dataset, key.size, dtype, cache_dir)
    if not rebuild and files.header.exists():
        with cache_lock(files, shared=True):
            return open_cache(files, key)
    with cache_lock(files):
        if not rebuild and files.header.exists():  # built by another process while this one waited
            log.info("using the teacher cache %s built by another process", files.data)
            return open_cache(files, key)
        source = _fp32_twin(teacher_path, data, key, cache_dir) if dtype != "fp32" else None
        if source is not None:  # the same forwards are on disk in fp32: rounding them is what a build would store
            derive_cache(source, key, files, teacher_file=teacher_path)
            computed = key.rows
        else:
            computed = build_cache(teacher, data.train_images, key, files, device=device, batch_size=batch_size,
                                   progress=progress, record_every=record_every, teacher_file=teacher_path)
        cache = open_cache(files, key)
    cache.built = computed > 0
    return cache


def _fp32_twin(teacher_path: str | Path, data: DataSplits, key: CacheKey,
               cache_dir: str | Path | None) -> TeacherCache | None:
    """The complete fp32 cache whose key differs from ``key`` in the stored dtype alone, if there is one."""
    files = CacheFiles.beside(teacher_path, key.dataset, key.size, "fp32", cache_dir)
    if not files.header.exists():
        return None
    with cache_lock(files, shared=True):
        try:
            return open_cache(files, replace(key, dtype="fp32"))
        except UserError:  # another teacher, other data, another build precision: not the same forwards
            return None


def derive_cache(source: TeacherCache, key: CacheKey, files: CacheFiles, *, teacher_file: str | Path | None = None,
                 chunk_rows: int = 1 << 16) -> None:
    """Write the cache of ``key`` by rounding each row of ``source``, an fp32 cache whose key differs in the dtype
    alone: the bytes a build of ``key`` stores (its forwards run in fp32 and are rounded once), without the
    forwards. Kill-safe as a build: the header comes last. The caller holds ``files``' lock."""
    if source.key.dtype != "fp32" or replace(source.key, dtype=key.dtype) != key:
        raise ValueError(f"{source.path} holds other forwards than the cache of {key}")
    log.info("deriving the teacher cache %s from %s (rounding %d rows to %s)", files.data, source.path, key.rows,
             key.dtype)
    files.record.unlink(missing_ok=True)
    with open(files.partial, "wb") as f:
        for start in range(0, key.rows, chunk_rows):
            rows = source.logits[start:start + chunk_rows].to(DTYPES[key.dtype])
            if not bool(torch.isfinite(rows).all()):
                raise UserError(f"the teacher's logits in {source.path} do not fit {key.dtype} (beyond its range): "
                                f"store the cache as fp32")
            f.write(rows.contiguous().view(torch.uint8).numpy().data)
        f.flush()
        os.fsync(f.fileno())
    _finish(files, key, {"teacher_file": None if teacher_file is None else str(teacher_file),
                         "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "derived_from": str(source.path)})


# ---- measuring (scripts/benchmark.py) ---------------------------------------------------------------------
def measure_build(teacher: nn.Module, *, image_size: Sequence[int] = (32, 32), num_classes: int = 100,
                  batch_size: int = BUILD_BATCH, precision: str = "fp32", device: torch.device | str = "cpu",
                  batches: int = 3, warmup: int = 1) -> dict[str, float]:
    """Build throughput: teacher forwards/s of the build's unit of work (:func:`forward_rows`) on random images.

    Also the extrapolated hours of a CIFAR-100 build (50,000 images x 162 variants) at that rate, and
    forwards per second of this process's CPU time (on a shared machine the wall-clock rate is what was
    left over; the CPU-time rate, times the threads, is what a quiet machine would approach).
    """
    device = torch.device(device)
    height, width = int(image_size[0]), int(image_size[1])
    n = max(1, -(-batch_size * (batches + warmup) // 162))
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, height, width), dtype=torch.uint8, generator=gen).to(device)
    key = CacheKey("", "random", n, "", padding_for(height, width), (height, width), (0.5,) * 3, (0.25,) * 3,
                   num_classes, "fp32", precision)
    teacher = teacher.to(device).eval()
    spans = [torch.arange(k * batch_size, (k + 1) * batch_size) % key.rows for k in range(warmup + batches)]
    for rows in spans[:warmup]:
        forward_rows(teacher, images, rows, key)
    started, cpu = time.perf_counter(), time.process_time()
    for rows in spans[warmup:]:
        forward_rows(teacher, images, rows, key)
    rate = batches * batch_size / (time.perf_counter() - started)
    cpu_rate = batches * batch_size / (time.process_time() - cpu)
    cifar = replace(key, size=50000, pad=4)
    return {"forwards_per_s": rate, "forwards_per_cpu_s": cpu_rate, "cifar100_forwards": float(cifar.rows),
            "cifar100_hours": cifar.rows / rate / 3600}


def cache_teacher_file(path: Path, overrides: list[str], dtype: str, precision: str, batch_size: int,
                       cache_dir: str | None, rebuild: bool) -> TeacherCache:
    """Build (or find) the cache of the teacher file ``path`` on the training split of ``dataset=`` (else the
    teacher's own): what ``scripts/teachers.py cache`` runs."""
    on_data = load_on_data(path, overrides, what="teacher file", reads=("model", "dataset", "trainer.device"),
                           command="scripts/teachers.py cache",
                           options={"teacher.cache_dtype": "--dtype", "teacher.cache_dir": "--cache-dir"})
    dataset, arch = str(on_data.cfg.dataset.name), on_data.loaded.arch
    verify_teacher(path, arch, dataset)  # a file changed since it was indexed is refused
    return ensure_cache(on_data.loaded.model, path, on_data.data, dataset,
                        device=resolve_device(str(on_data.cfg.trainer.device)), dtype=dtype, precision=precision,
                        cache_dir=cache_dir, batch_size=batch_size, rebuild=rebuild)
