"""The step the benchmarks time: one optimisation step of a run assembled exactly as ``train_student.py``
assembles it (:func:`distiller.jobs.train.assemble_distillation`, the teacher randomly initialised: speed
does not depend on its weights), on batches of the run's own on-device loader (augmentation included).

This module is the one place of :mod:`distiller.bench` that knows how a run is assembled and stepped.
"""
from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import Any, Iterator

import torch
from omegaconf import DictConfig

from common.errors import UserError
from datasets.batch import Batch
from distiller.config.schema import StudentJob
from distiller.engine.loop import Trainer
from distiller.engine.plan import Phase
from distiller.engine.runtime import Runtime
from distiller.jobs.train import assemble_distillation, compose_job


@dataclasses.dataclass
class BenchJob:
    """A composed benchmark config as the student job reads it: the typed job and the config it records."""

    job: StudentJob
    record: dict[str, Any]


def load_bench_job(cfg: DictConfig) -> BenchJob:
    """Validate and convert the composed config once (``train_student``'s job; ``bench`` rides along untyped)."""
    job, record, _ = compose_job(cfg, "train_student")
    return BenchJob(job, record)


@dataclasses.dataclass
class EngineStep:
    """One training step of an assembled run, ready to call, and the run it belongs to."""

    trainer: Trainer
    job: StudentJob
    phase: Phase
    optimizer: torch.optim.Optimizer
    batches: Iterator[Batch]  # the run's own training loader, epoch after epoch

    def __call__(self, batch: Batch) -> torch.Tensor:
        """One optimisation step on ``batch``; the loss, left on the device (no host sync)."""
        return self.trainer.train_step(batch, self.phase, 1, self.optimizer).total

    def next(self) -> torch.Tensor:
        """One step on the loader's next batch."""
        return self(next(self.batches))

    @property
    def batch_size(self) -> int:
        return self.job.dataset.batch_size

    @property
    def train_size(self) -> int:
        return self.trainer.train_loader.dataset_size


def build_engine_step(bench_job: BenchJob, runtime: Runtime, phase_name: str, run_dir: Path) -> EngineStep:
    """The step of phase ``phase_name`` of the run ``bench_job`` describes, assembled in ``run_dir``
    (the teacher randomly initialised)."""
    job = bench_job.job
    trainer, _ = assemble_distillation(job, run_dir, bench_job.record, runtime, load_teacher=False)
    phases = {p.name: p for p in trainer.plan}  # the main phase is trainer.plan[-1]
    if phase_name not in phases:
        raise UserError(f"bench.phase={phase_name} is not a phase of this run; its phases are: {', '.join(phases)}")
    batch_size = job.dataset.batch_size
    if trainer.train_loader.dataset_size < batch_size:
        raise UserError(f"the training set has {trainer.train_loader.dataset_size} images, fewer than one batch of "
                        f"dataset.batch_size={batch_size}; raise bench.train_size or lower the batch size")
    phase = phases[phase_name]
    optimizer = trainer.prepare_phase(phase)

    def batches() -> Iterator[Batch]:
        for epoch in itertools.count(1):
            yield from trainer.train_loader.epoch(epoch)

    return EngineStep(trainer, job, phase, optimizer, batches())
