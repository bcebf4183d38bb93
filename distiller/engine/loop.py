"""The training loop: phases, epochs, evaluation, checkpoints and resume.

One :class:`Trainer` trains teachers (cross-entropy only) and students (any
objective). It never learns which distillation method it runs: methods declare the
features they read, build their helpers from probed shapes, may declare
initialisation phases, and the objective weighs their terms. The pieces it holds:
the phase plan (:mod:`distiller.engine.plan`), the step (:mod:`distiller.engine.step`), the
meter (:mod:`distiller.engine.meter`) and the checkpointer (:mod:`distiller.engine.checkpoints`).
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from common.errors import UserError
from datasets import DataSplits
from datasets.batch import Batch
from datasets.loaders import make_loader
from distiller.engine.checkpoints import Checkpointer, RunState
from distiller.engine.evaluation import evaluate
from distiller.engine.meter import Meter, NonFiniteLossError
from distiller.engine.plan import PlannedPhase, TrainSettings, lr_at, plan_phases
from distiller.engine.run_log import RunLogger
from distiller.engine.runtime import Runtime, all_reduce_sum
from distiller.engine.step import DistillStep, StepOutput, distribute, train_step
from distiller.features import FeatureHooks
from distiller.methods.base import BuildContext
from distiller.objective import Objective
from distiller.optim import make_optimizer

log = logging.getLogger("distiller")

__all__ = ["Trainer", "TrainSettings", "PlannedPhase", "RunState", "NonFiniteLossError", "lr_at", "make_optimizer"]


class Trainer:
    """Runs the phase plan of one run, with checkpoints in ``run_dir`` and exact resume."""

    def __init__(self, *, runtime: Runtime, settings: TrainSettings, run_dir: Path, data: DataSplits,
                 student: nn.Module, student_arch: str, objective: Objective,
                 teacher: nn.Module | None = None, teacher_arch: str | None = None,
                 config: dict[str, Any] | None = None, header: dict[str, Any] | None = None,
                 logger_settings: Any = None) -> None:
        self.rt, self.s, self.run_dir = runtime, settings, Path(run_dir)
        self.data = data
        self.student_arch, self.teacher_arch = student_arch, teacher_arch
        self.objective = objective
        self.state = RunState()
        self.logger = RunLogger(self.run_dir, runtime.is_main, header or {}, config, logger_settings)
        device, fmt = runtime.device, runtime.memory_format()
        self.student = student.to(device=device, memory_format=fmt)
        self.teacher = None
        if teacher is not None and objective.needs_teacher():
            self.teacher = teacher.to(device=device, memory_format=fmt)
            self.teacher.eval()
            for p in self.teacher.parameters():
                p.requires_grad_(False)
        # normalised with the data set's own statistics (augmentation scales with its image size)
        loader = dict(rank=runtime.rank, world_size=runtime.world_size, channels_last=runtime.channels_last)
        views = sorted({v for entry in objective.active() for v in entry.method.views})
        self.train_loader = make_loader(data, "train", settings.batch_size, device, train=True, seed=settings.seed,
                                        views=views, **loader)
        self.test_loader = make_loader(data, "test", settings.eval_batch_size, device, train=False, **loader)
        methods = [entry.method for entry in objective.entries]
        self.student_hooks = FeatureHooks(self.student, {k for m in methods for k in m.student_features})
        self.teacher_hooks = (FeatureHooks(self.teacher, {k for m in methods for k in m.teacher_features})
                              if self.teacher is not None else None)
        if objective.entries:
            ctx = BuildContext(num_classes=data.num_classes, num_samples=len(data.train_labels),
                               train_labels=data.train_labels.to(device), device=device,
                               student=self.student, teacher=self.teacher, epochs=settings.epochs,
                               image_shape=data.image_shape)
            objective.build(self.student_hooks, self.teacher_hooks, ctx, fmt)
        from distiller.engine.compile import compile_networks

        # trainer.compile: in place (names, identity and hooks kept), after the hooks and shape probes
        compile_networks(runtime, self.student, self.teacher)
        self.step = DistillStep(self.student, objective, self.student_hooks, self.teacher, self.teacher_hooks)
        self._step_call: nn.Module = self.step  # replaced by a DDP wrapper per phase when distributed
        self.plan = plan_phases(objective, self.student, settings)
        self.checkpointer = Checkpointer(self.run_dir, runtime.is_main, self.student, objective, student_arch,
                                         teacher_arch, data.num_classes, config or {})

    # ---- construction -----------------------------------------------------------------------------
    def remove_hooks(self) -> None:
        """Take the feature hooks off both networks (the trainer cannot train afterwards)."""
        self.student_hooks.remove()
        if self.teacher_hooks is not None:
            self.teacher_hooks.remove()

    # ---- the loop ---------------------------------------------------------------------------------
    def fit(self, resume_from: dict | None = None) -> RunState:
        optimizer_state, meter_state = None, None
        if resume_from is not None:
            self.state, optimizer_state, meter_state = self.checkpointer.restore(resume_from, self.rt.device)
            log.info("resuming at phase %s, epoch %d, step %d", self.plan[self.state.phase].name,
                     self.state.epoch + 1, self.state.step)
        try:
            while self.state.phase < len(self.plan) and not self.state.finished:
                phase = self.plan[self.state.phase]
                self._run_phase(phase, optimizer_state, meter_state)
                optimizer_state, meter_state = None, None
                if not phase.is_main:
                    self.state.phase += 1
                    self.state.epoch = self.state.step = 0
            self.state.finished = True
        finally:
            self.remove_hooks()
            self.logger.close()
        return self.state

    def _set_modes(self, phase: PlannedPhase) -> None:
        phase.set_modes(self.student, self.objective, self.teacher, self.objective.teacher_bn_train())

    def _wrap(self, phase: PlannedPhase) -> None:
        """Train exactly the phase's parameters: freeze the rest, and wrap in DDP when distributed."""
        wanted = {id(p) for p in phase.parameters}
        for module in (self.student, self.objective):
            for p in module.parameters():
                p.requires_grad_(id(p) in wanted)
        self.step.phase = phase
        self._step_call = (distribute(self.step, self.rt, self.s.find_unused_parameters) if self.rt.distributed
                           else self.step)

    def prepare_phase(self, phase: PlannedPhase) -> torch.optim.Optimizer:
        """Freeze all but the phase's parameters, set train/eval modes, and make its optimizer."""
        if not phase.parameters:
            raise UserError(f"phase '{phase.name}' has no parameters to train")
        self._wrap(phase)
        self._set_modes(phase)
        return make_optimizer(phase.parameters, phase.lr, self.s, self.rt.device)

    def train_step(self, batch: Batch, phase: PlannedPhase, epoch: int,
                   optimizer: torch.optim.Optimizer) -> StepOutput:
        """One optimisation step: teacher forward (no grad), student forward/backward, optimizer step."""
        return train_step(self._step_call, batch, epoch, optimizer, self.rt, phase,
                          grad_norm=self.s.nonfinite_check == "grad")

    def _run_phase(self, phase: PlannedPhase, optimizer_state: dict | None,
                   meter_state: dict[str, torch.Tensor] | None) -> None:
        optimizer = self.prepare_phase(phase)
        if optimizer_state is not None:
            optimizer.load_state_dict(optimizer_state)
        while self.state.epoch < phase.epochs:
            epoch = self.state.epoch + 1
            lr = lr_at(phase.lr, epoch, self.s.milestones, self.s.lr_decay)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if phase.is_main:
                for entry in self.objective.entries:
                    entry.method.on_epoch_start(epoch)
            meter = Meter(self.rt.device, self.s.nonfinite_check != "off", meter_state or None)
            meter_state = None
            record = self._run_epoch(phase, epoch, lr, optimizer, meter)
            self.state.epoch, self.state.step = epoch, 0
            if phase.is_main:
                self.state.history.append(record)
                if record["test_top1"] > self.state.best_top1:
                    self.state.best_top1, self.state.best_epoch = record["test_top1"], epoch
                    self.checkpointer.save_best(len(self.state.history), record["test_top1"])
                if epoch == phase.epochs:
                    self.state.finished = True
            else:
                self.state.init_history.append(record)
            self.checkpointer.save_last(self.state, optimizer, {})
            self.logger.metrics(asdict(self.state), "finished" if self.state.finished else "running")
            self.logger.flush()

    def _run_epoch(self, phase: PlannedPhase, epoch: int, lr: float, optimizer: torch.optim.Optimizer,
                   meter: Meter) -> dict[str, Any]:
        self._set_modes(phase)
        steps = len(self.train_loader)
        start_step = self.state.step
        bar = tqdm(total=steps, initial=start_step, leave=False, dynamic_ncols=True,
                   desc=f"{phase.name} {epoch}/{phase.epochs}", disable=not (self.s.progress and self.rt.is_main))
        started = time.perf_counter()
        for step, batch in enumerate(self.train_loader.epoch(epoch, start_step=start_step), start=start_step):
            out = self.train_step(batch, phase, epoch, optimizer)
            meter.add(step, out.total, out.terms, len(batch), out.logits, batch.labels)  # on the device: no sync
            self.state.global_step += 1
            self.state.step = step + 1
            bar.update(1)
            last = step + 1 == steps
            if (step + 1) % self.s.log_interval == 0 or last:
                self._check_finite(meter, epoch, phase)
                shown = meter.shown(with_accuracy=out.logits is not None, with_terms=True)
                bar.set_postfix({k: f"{shown[k]:.3f}" for k in ("loss", "acc") if k in shown})
                self.logger.scalars({**shown, "lr": lr}, self.state.global_step, phase.tag)
            every = self.s.checkpoint_every_steps
            if every and (step + 1) % every == 0 and not last:
                self._check_finite(meter, epoch, phase)
                self.checkpointer.save_last(self.state, optimizer, meter.state())
        bar.close()
        elapsed = time.perf_counter() - started
        loss, correct, count, terms = meter.totals(all_reduce_sum)
        count = max(count, 1.0)
        record: dict[str, Any] = {"epoch": epoch, "lr": lr, "train_loss": loss / count}
        if phase.student_forward:
            record["train_top1"] = 100.0 * correct / count
        for name, value in terms.items():
            record[f"loss_{name}"] = value / count
        record["time_s"] = elapsed
        record["images_per_s"] = count / elapsed if elapsed > 0 and start_step == 0 else None
        if phase.is_main:
            for entry in self.objective.entries:
                record.update({f"{entry.label}/{k}": float(v) for k, v in entry.method.scalars().items()})
            record.update(self.evaluate(self.student))
            log.info("epoch %d/%d  lr %.4g  train_loss %.4f  test_top1 %.2f  test_top5 %.2f",
                     epoch, phase.epochs, lr, record["train_loss"], record["test_top1"], record["test_top5"])
        else:
            log.info("%s epoch %d/%d  loss %.4f", phase.name, epoch, phase.epochs, record["train_loss"])
        self.logger.scalars({k: v for k, v in record.items() if isinstance(v, float) and k != "lr"}, epoch,
                            "epoch" if phase.is_main else f"init/{phase.name}/epoch")
        return record

    def _check_finite(self, meter: Meter, epoch: int, phase: PlannedPhase) -> None:
        """Stop the run, naming the term, at the first non-finite step (``last.pt`` stays as it was)."""
        if (bad := meter.first_nonfinite()) is not None:
            step, name = bad[0] + 1, bad[1]
            kept = "last.pt" if (self.run_dir / "last.pt").exists() else "no checkpoint"
            where = f"epoch {epoch}, step {step}"
            self.logger.metrics(asdict(self.state), "failed", {"error": f"non-finite {name} at {where}"})
            raise NonFiniteLossError(f"non-finite loss term '{name}' at {phase.name} {where}; "
                                     f"stopped, {kept} left as it was (lower optim.lr or check the inputs)")

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Top-1/top-5 and loss of ``model`` (the student, the teacher or another network) on the test split."""
        hooks = {id(self.student): self.student_hooks, id(self.teacher): self.teacher_hooks}.get(id(model))
        return evaluate(model, self.test_loader, self.rt, hooks)
