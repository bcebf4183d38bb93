"""The training loop: phases, epochs, evaluation, checkpoints and resume.

One :class:`Trainer` trains teachers (cross-entropy only) and students (any objective). It
builds nothing: the job hands it what it runs (the step, the loaders, the phase plan, the
checkpointer, the run log, the runtime, the loop's settings and an optimizer factory) and the
trainer only runs them, never learning which distillation method is in the step.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict
from typing import Any, Callable

import torch
from torch import nn
from tqdm import tqdm

from common.errors import UserError
from datasets.batch import Batch
from datasets.loaders import BatchLoader
from distiller.engine.checkpoints import Checkpointer, RunState
from distiller.engine.evaluation import measure
from distiller.engine.meter import Meter, NonFiniteLossError
from distiller.engine.plan import Phase, lr_at
from distiller.engine.run_log import RunLogger
from distiller.engine.runtime import Runtime, all_reduce_sum, share_rank0_buffers
from distiller.engine.step import DistillStep, distribute, train_step
from distiller.objective import LossParts

log = logging.getLogger("distiller")

OptimizerFactory = Callable[[list[nn.Parameter], float], torch.optim.Optimizer]


class Trainer:
    """Runs the phase plan of one run, with checkpoints in the checkpointer's run directory and exact resume.

    ``settings``: the ``trainer`` config node (log_interval, checkpoint_every_steps, nonfinite_check,
    progress, find_unused_parameters); ``schedule``: the ``schedule`` node (milestones, gamma);
    ``optimizer(params, lr)`` makes each phase's optimizer. ``calibration_loader``: the training set
    in eval order, for the methods that calibrate on the teacher before training (None: none do).
    """

    def __init__(self, *, step: DistillStep, train_loader: BatchLoader, test_loader: BatchLoader, plan: list[Phase],
                 checkpointer: Checkpointer, logger: RunLogger, runtime: Runtime, settings: Any, schedule: Any,
                 optimizer: OptimizerFactory, calibration_loader: BatchLoader | None = None) -> None:
        self.step, self.plan, self.rt, self.s, self.schedule = step, plan, runtime, settings, schedule
        self.train_loader, self.test_loader, self.calibration_loader = train_loader, test_loader, calibration_loader
        self.checkpointer, self.logger, self.make_optimizer = checkpointer, logger, optimizer
        self.student, self.teacher, self.objective = step.student, step.teacher, step.objective
        self.state = RunState()
        self._step_call: nn.Module = step  # replaced by a DDP wrapper per phase when distributed

    # ---- the loop ---------------------------------------------------------------------------------
    def fit(self, resume_from: dict | None = None) -> RunState:
        optimizer_state, meter_state = None, None
        if resume_from is not None:
            self.state, optimizer_state, meter_state = self.checkpointer.restore(resume_from, self.rt.device)
            if not self.rt.is_main:  # the epoch's sums so far are all ranks', pooled in rank 0's (Meter.state)
                meter_state = None
            log.info("resuming at phase %s, epoch %d, step %d", self.plan[self.state.phase].name,
                     self.state.epoch + 1, self.state.step)
        try:
            while self.state.phase < len(self.plan) and not self.state.finished:
                phase = self.plan[self.state.phase]
                if phase.is_main and not self.state.calibrated:
                    self._calibrate()
                self._run_phase(phase, optimizer_state, meter_state)
                optimizer_state, meter_state = None, None
                if not phase.is_main:
                    self.state.phase += 1
                    self.state.epoch = self.state.step = 0
            self.state.finished = True
        finally:
            self.step.remove_hooks()
            self.logger.close()
        return self.state

    def _calibrate(self) -> None:
        """The methods' pass over the training set with the teacher (eval mode, no augmentation), once per run."""
        # active methods only: an inactive one (beta 0) may have had the teacher dropped from the step
        methods = [e.method for e in self.objective.active() if e.method.calibration_features is not None]
        if methods and self.calibration_loader is None:
            raise ValueError("a method calibrates on the teacher before training, but the trainer has no "
                             "calibration_loader (the training set in eval order)")
        if methods:
            hooks = self.step.teacher_hooks
            self.teacher.eval()

            def batches(kinds: frozenset[str]):
                for batch in self.calibration_loader.epoch(0):
                    with torch.no_grad(), self.rt.eval_autocast():
                        logits = self.teacher(batch.images)
                    yield hooks.select(hooks.pop(), logits, kinds), batch

            for method in methods:
                log.info("calibrating %s on the teacher over the training set", type(method).__name__)
                method.calibrate(batches(method.calibration_features))
        self.state.calibrated = True

    def _set_modes(self, phase: Phase) -> None:
        phase.set_modes(self.student, self.objective, self.teacher, self.objective.teacher_bn_train())

    def prepare_phase(self, phase: Phase) -> torch.optim.Optimizer:
        """Train exactly the phase's parameters (the rest frozen; DDP-wrapped when distributed), set
        train/eval modes, and make the phase's optimizer."""
        if not phase.parameters:
            raise UserError(f"phase '{phase.name}' has no parameters to train")
        wanted = {id(p) for p in phase.parameters}
        for module in (self.student, self.objective):
            for p in module.parameters():
                p.requires_grad_(id(p) in wanted)
        self.step.phase = phase
        self._step_call = (distribute(self.step, self.rt, self.s.find_unused_parameters) if self.rt.distributed
                           else self.step)
        self._set_modes(phase)
        return self.make_optimizer(phase.parameters, phase.lr)

    def train_step(self, batch: Batch, phase: Phase, epoch: int, optimizer: torch.optim.Optimizer) -> LossParts:
        """One optimisation step: teacher forward (no grad), student forward/backward, optimizer step."""
        grad_norm = phase.parameters if self.s.nonfinite_check == "grad" else None
        return train_step(self._step_call, batch, epoch, optimizer, self.rt, grad_norm)

    def _run_phase(self, phase: Phase, optimizer_state: dict | None,
                   meter_state: dict[str, torch.Tensor] | None) -> None:
        optimizer = self.prepare_phase(phase)
        if optimizer_state is not None:
            optimizer.load_state_dict(optimizer_state)
        while self.state.epoch < phase.epochs:
            epoch = self.state.epoch + 1
            lr = lr_at(phase.lr, epoch, self.schedule.milestones, self.schedule.gamma)
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

    def _run_epoch(self, phase: Phase, epoch: int, lr: float, optimizer: torch.optim.Optimizer,
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
                self.checkpointer.save_last(self.state, optimizer, meter.state(all_reduce_sum))
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
        share_rank0_buffers(self.student)  # the evaluated model is the saved one (DDP: rank 0's statistics)
        if phase.is_main:
            for entry in self.objective.entries:
                record.update({f"{entry.label}/{k}": float(v) for k, v in entry.method.scalars().items()})
            record.update(self.measure(self.student))
            log.info("epoch %d/%d  lr %.4g  train_loss %.4f  test_top1 %.2f  test_top5 %.2f",
                     epoch, phase.epochs, lr, record["train_loss"], record["test_top1"], record["test_top5"])
        else:
            log.info("%s epoch %d/%d  loss %.4f", phase.name, epoch, phase.epochs, record["train_loss"])
        self.logger.scalars({k: v for k, v in record.items() if isinstance(v, float) and k != "lr"}, epoch,
                            "epoch" if phase.is_main else f"init/{phase.name}/epoch")
        return record

    def _check_finite(self, meter: Meter, epoch: int, phase: Phase) -> None:
        """Stop the run, naming the term, at the first non-finite step (``last.pt`` stays as it was)."""
        if (bad := meter.first_nonfinite()) is not None:
            step, name = bad[0] + 1, bad[1]
            kept = "last.pt" if (self.checkpointer.run_dir / "last.pt").exists() else "no checkpoint"
            where = f"epoch {epoch}, step {step}"
            self.logger.metrics(asdict(self.state), "failed", {"error": f"non-finite {name} at {where}"})
            raise NonFiniteLossError(f"non-finite loss term '{name}' at {phase.name} {where}; "
                                     f"stopped, {kept} left as it was (lower optim.lr or check the inputs)")

    def measure(self, model: nn.Module) -> dict[str, float]:
        """Top-1/top-5 and loss of ``model`` (the student, the teacher or another network) on the test split."""
        hooks = {id(self.student): self.step.student_hooks, id(self.teacher): self.step.teacher_hooks}.get(id(model))
        return measure(model, self.test_loader, self.rt, hooks)
