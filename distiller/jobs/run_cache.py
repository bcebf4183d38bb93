"""The teacher cache of a run (``teacher.cache=true``): whether it can stand in for the teacher, and opening it.

The cache (:mod:`distiller.engine.teacher_cache`) holds one thing: the eval-mode teacher's logits on
each input the training augmentation can make. It replaces the teacher's forward on the batch's own
images exactly when nothing else of that forward is read. What a method reads is declared on its
class (:class:`distiller.methods.base.DistillMethod`), so the test is on those declarations, never on
method names; the cache applies when, for every method of the objective:

* ``teacher_features`` is empty (no stage maps, embedding, pool input or classifier: logits only);
* ``teacher_bn_train`` is false (the teacher in eval mode, as the cache was built);
* ``calibration_features`` is None (no pass over the teacher's features before training);
* it declares no initialisation phase (they train teacher-side helpers on its features).

Extra views (``views``, MLKD's strong view) are drawn afresh each step from RandAugment, which has no
finite set of inputs: the teacher runs live on them while the batch's own (weak) images still take
their logits from the cache, which saves one of MLKD's two teacher forwards per step.

Where the cache cannot apply, one line says why and the run goes on with the live teacher: an
objective as above that reads more than logits, a streamed data set (the cache covers sets decoded into
memory; ImageNet's random resized crops are not even enumerable), a teacher that is not a stored file
(its sha256 is part of the key). A cache whose key
differs from the run's (the teacher retrained, the data changed) stops the run in one line that says
how to rebuild it: it is never silently replaced, nor silently ignored.

The cache is built on first use, under a lock: concurrent runs of a sweep and the ranks of a DDP run
build it once (:func:`distiller.jobs.cache_build.ensure_cache`). It then lives on the training device
when it fits there (as the data set does), else memory-mapped in CPU memory. The job's evaluation of
the teacher at the start of a run still runs the live teacher (once, for the record).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch import nn

from datasets.base import DataSplits
from datasets.sample_transforms import InceptionCrop
from distiller.config.schema import TeacherConfig
from distiller.engine.runtime import Runtime
from distiller.engine.teacher_cache import TeacherCache
from distiller.jobs.cache_build import ensure_cache
from distiller.objective import Objective

log = logging.getLogger("distiller")

BUILD_PRECISION = "fp32"  # a run's cache is built in float32: the live teacher's own forward, to rounding


def cache_refusal(objective: Objective, data: Any, teacher_file: Path | None) -> str | None:
    """Why the cache cannot stand in for this run's teacher forward (a phrase for one line), or None when it can."""
    if not objective.needs_teacher():
        return "the objective never runs the teacher (cross-entropy alone): there is nothing to cache"
    for entry in objective.entries:
        method, label = entry.method, entry.label
        if method.teacher_features:
            return f"{label} reads the teacher's {', '.join(sorted(method.teacher_features))}, not only its logits"
        if method.teacher_bn_train:
            return f"{label} runs the teacher with its BatchNorm in train mode, not as the cache was built"
        if method.calibration_features is not None:
            return f"{label} calibrates on the teacher's features before training"
        if method.phases():
            return f"{label} has an initialisation phase that trains on the teacher's features"
    if not isinstance(data, DataSplits):
        if isinstance(getattr(data, "transform", None), InceptionCrop):
            return ("the data set is streamed from files and its training augmentation (random resized crops) has "
                    "no finite set of inputs to cache")
        return ("the data set is streamed from files, and the cache is built over a data set decoded into memory: "
                "dataset.stream=false decodes it (if it fits)")
    if teacher_file is None or not teacher_file.is_file():
        return "the teacher is not loaded from a stored file (the file's sha256 keys the cache)"
    return None


def open_run_cache(settings: TeacherConfig, objective: Objective, data: Any, teacher: nn.Module,
                   teacher_file: Path | None, dataset: str, runtime: Runtime,
                   progress: bool = True) -> TeacherCache | None:
    """The cache a run's step reads the teacher's logits from, or None (``teacher.cache`` false, or it cannot apply).

    ``settings``: the typed ``teacher`` node (``cache``, ``cache_dir``, ``cache_dtype``); ``teacher``: the
    loaded network (no feature hooks yet), which builds the cache here when it is missing; ``teacher_file``:
    the file it was loaded from (None: not loaded from a file); ``dataset``: the data set's name.
    """
    if not settings.cache:
        return None
    refusal = cache_refusal(objective, data, teacher_file)
    if refusal is not None:
        log.warning("teacher.cache=true does not apply: %s; the teacher runs live", refusal)
        return None
    cache = ensure_cache(teacher, teacher_file, data, dataset, device=runtime.device, dtype=settings.cache_dtype,
                         precision=BUILD_PRECISION, cache_dir=settings.cache_dir, progress=progress)
    cache = cache.to(runtime.device)
    views = objective.views()  # drawn at random each step: the teacher runs live on them
    log.info("teacher logits from the cache %s (%s, %s, on %s)%s", cache.path,
             "built now" if cache.built else "found", cache.key.dtype, cache.logits.device,
             f"; the teacher runs live on the random {', '.join(views)} view(s)" if views else "")
    return cache
