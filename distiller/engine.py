"""The training loop: phases, epochs, steps, evaluation, checkpoints and resume.

One :class:`Trainer` trains teachers (cross-entropy only) and students (any
objective). It never learns which distillation method it runs: methods declare
taps, helpers and initialisation phases, and the objective weighs their terms.
"""
from __future__ import annotations

import logging
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn
from tqdm import tqdm

from datasets import DataSplits
from datasets.batch import Batch
from datasets.device_loader import DeviceLoader
from distiller.checkpoint import atomic_save
from distiller.methods.base import BuildContext, Features
from distiller.objective import Objective
from distiller.run_log import RunLogger
from distiller.runtime import Runtime, all_reduce_sum, barrier, rng_state, set_rng_state
from distiller.taps import NetworkTaps, shapes_of
from common.errors import UserError

log = logging.getLogger("distiller")

CHECKPOINT_FORMAT = 1


class NonFiniteLossError(UserError):
    """A loss term (or gradient) became NaN/Inf; the last good checkpoint is kept."""


@dataclass
class RunState:
    """Where a run stands; saved in every checkpoint (plain types only)."""

    phase: int = 0  # index into the phase plan (init phases first, main last)
    epoch: int = 0  # completed epochs of the current phase
    step: int = 0  # completed steps of the current, unfinished epoch
    global_step: int = 0
    best_top1: float = -1.0
    best_epoch: int = 0
    history: list = field(default_factory=list)  # one record per main-phase epoch
    init_history: list = field(default_factory=list)  # one record per initialisation epoch
    finished: bool = False


@dataclass
class PlannedPhase:
    """A phase as the trainer runs it."""

    name: str
    epochs: int
    parameters: list[nn.Parameter]
    lr: float
    is_main: bool
    student_forward: bool = True
    owner: str | None = None  # label of the method whose phase this is
    needs_teacher: bool = True
    loss: Callable[..., dict[str, torch.Tensor]] | None = None


@dataclass
class TrainSettings:
    """Plain settings of the loop, resolved from config by the entry point."""

    epochs: int
    lr: float
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    optimizer_impl: str = "auto"
    milestones: tuple[int, ...] = (150, 180, 210)
    lr_decay: float = 0.1
    batch_size: int = 64
    eval_batch_size: int = 1024
    seed: int = 0
    log_interval: int = 50
    checkpoint_every_steps: int = 0
    nonfinite_check: str = "loss"
    progress: bool = True
    find_unused_parameters: bool = False


def lr_at(base_lr: float, epoch: int, milestones: Iterable[int], decay: float) -> float:
    """Step schedule of the published recipe: ``base * decay ** #(milestones < epoch)``, epochs from 1."""
    return base_lr * decay ** sum(1 for m in milestones if epoch > m)


def make_optimizer(params: list[nn.Parameter], lr: float, s: TrainSettings, device: torch.device) -> torch.optim.SGD:
    """SGD with the fused kernel on CUDA and the foreach kernel elsewhere (or as configured)."""
    impl = s.optimizer_impl
    if impl == "auto":
        impl = "fused" if device.type == "cuda" else "foreach"
    kwargs: dict[str, Any] = {"fused": True} if impl == "fused" else {"foreach": impl == "foreach"}
    return torch.optim.SGD(params, lr=lr, momentum=s.momentum, weight_decay=s.weight_decay,
                           nesterov=s.nesterov, **kwargs)


class _StepModule(nn.Module):
    """Student forward + loss of one step, as one module so DDP can wrap all trainable parts."""

    def __init__(self, student: nn.Module, objective: Objective, student_taps: NetworkTaps,
                 teacher_taps: NetworkTaps | None) -> None:
        super().__init__()
        self.student = student
        self.objective = objective
        self.student_taps = student_taps
        self.teacher_taps = teacher_taps
        self.phase: PlannedPhase | None = None

    def method_features(self, s_stores, s_logits, t_stores, t_logits) -> dict[str, tuple[Features, Features]]:
        per_method = {}
        for entry in self.objective.entries:
            taps = entry.method.taps
            s = (self.student_taps.features(s_stores, s_logits, taps.student, taps.student_preact)
                 if s_logits is not None else Features())
            t = (self.teacher_taps.features(t_stores, t_logits, taps.teacher, taps.teacher_preact)
                 if t_stores is not None else Features())
            per_method[entry.label] = (s, t)
        return per_method

    def forward(self, batch: Batch, t_logits: torch.Tensor | None, t_stores: Any, epoch: int):
        phase = self.phase
        if phase.student_forward:
            s_logits = self.student(batch.images)
            s_stores = self.student_taps.pop()
        else:
            s_logits, s_stores = None, ({}, {})
        per_method = self.method_features(s_stores, s_logits, t_stores, t_logits)
        if phase.is_main:
            teacher = Features(logits=t_logits) if t_logits is not None else None
            total, terms = self.objective(Features(logits=s_logits), teacher, batch, epoch, per_method)
        else:
            s_feats, t_feats = per_method[phase.owner]
            terms = phase.loss(s_feats, t_feats, batch)
            total = sum(v.float() for v in terms.values())
        return total, terms, s_logits


class Trainer:
    """Runs the phase plan of one run, with checkpoints in ``run_dir`` and exact resume."""

    def __init__(self, *, runtime: Runtime, settings: TrainSettings, run_dir: Path, data: DataSplits,
                 student: nn.Module, student_arch: str, objective: Objective,
                 teacher: nn.Module | None = None, teacher_arch: str | None = None,
                 config: dict[str, Any] | None = None, header: dict[str, Any] | None = None) -> None:
        self.rt, self.s, self.run_dir = runtime, settings, Path(run_dir)
        self.data = data
        self.student_arch, self.teacher_arch = student_arch, teacher_arch
        self.config = config or {}
        self.objective = objective
        self.state = RunState()
        self.logger = RunLogger(self.run_dir, runtime.is_main, header or {})
        device, fmt = runtime.device, runtime.memory_format()
        self.student = student.to(device=device, memory_format=fmt)
        self.teacher = None
        if teacher is not None and objective.needs_teacher():
            self.teacher = teacher.to(device=device, memory_format=fmt)
            self.teacher.eval()
            for p in self.teacher.parameters():
                p.requires_grad_(False)
        self.train_loader = DeviceLoader(data.train_images, data.train_labels, settings.batch_size, device,
                                         train=True, seed=settings.seed, rank=runtime.rank,
                                         world_size=runtime.world_size, channels_last=runtime.channels_last)
        self.test_loader = DeviceLoader(data.test_images, data.test_labels, settings.eval_batch_size, device,
                                        train=False, rank=runtime.rank, world_size=runtime.world_size,
                                        channels_last=runtime.channels_last)
        self.student_taps = NetworkTaps(self.student, [(t.student, t.student_preact) for t in objective.taps()])
        self.teacher_taps = (NetworkTaps(self.teacher, [(t.teacher, t.teacher_preact) for t in objective.taps()])
                             if self.teacher is not None else None)
        self._build_methods()
        from distiller.compile import compile_networks

        # trainer.compile: in place (names, identity and hooks kept), after the hooks and shape probes
        compile_networks(runtime, self.student, self.teacher)
        self.step_module = _StepModule(self.student, self.objective, self.student_taps, self.teacher_taps)
        self.plan = self._plan_phases()
        self._train_step = self.step_module  # replaced by a DDP wrapper per phase when distributed

    # ---- construction -----------------------------------------------------------------------------
    def _probe(self, model: nn.Module, taps: NetworkTaps) -> tuple[Any, torch.Tensor]:
        modes = {m: m.training for m in model.modules()}
        model.eval()
        try:
            with torch.no_grad():
                x = torch.zeros(2, 3, 32, 32, device=self.rt.device).contiguous(memory_format=self.rt.memory_format())
                logits = model(x)
                stores = taps.pop()
        finally:
            for module, mode in modes.items():
                module.training = mode
        return stores, logits

    def _build_methods(self) -> None:
        """Give each method the probed feature shapes of both networks, then move helpers to the device."""
        if not self.objective.entries:
            return
        s_stores, s_logits = self._probe(self.student, self.student_taps)
        t_stores, t_logits = (self._probe(self.teacher, self.teacher_taps) if self.teacher is not None
                              else (({}, {}), None))
        ctx = BuildContext(num_classes=self.data.num_classes, num_samples=len(self.data.train_labels),
                           train_labels=self.data.train_labels.to(self.rt.device), device=self.rt.device,
                           student=self.student, teacher=self.teacher, epochs=self.s.epochs)
        for entry in self.objective.entries:
            taps = entry.method.taps
            s = shapes_of(self.student_taps.features(s_stores, s_logits, taps.student, taps.student_preact))
            t = (shapes_of(self.teacher_taps.features(t_stores, t_logits, taps.teacher, taps.teacher_preact))
                 if self.teacher_taps is not None else Features())
            entry.method.build(s, t, ctx)
        self.objective.to(self.rt.device)

    def _plan_phases(self) -> list[PlannedPhase]:
        plan = []
        for entry in self.objective.entries:
            for phase in entry.method.phases():
                plan.append(PlannedPhase(
                    name=phase.name if phase.name not in {p.name for p in plan} else f"{entry.label}_{phase.name}",
                    epochs=int(phase.epochs), parameters=list(phase.parameters(self.student)),
                    lr=float(phase.lr if phase.lr is not None else self.s.lr), is_main=False,
                    student_forward=phase.student_forward, owner=entry.label, loss=phase.loss))
        main_params = list(self.student.parameters()) + self.objective.main_parameters()
        main_needs_teacher = self.objective.alpha > 0 or bool(self.objective.active())
        plan.append(PlannedPhase("main", self.s.epochs, main_params, self.s.lr, is_main=True,
                                 needs_teacher=main_needs_teacher))
        return plan

    # ---- checkpoints ------------------------------------------------------------------------------
    def _checkpoint(self, optimizer: torch.optim.Optimizer, accumulators: dict[str, torch.Tensor]) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "arch": self.student_arch,
            "num_classes": self.data.num_classes,
            "teacher_arch": self.teacher_arch,
            "model": self.student.state_dict(),
            "objective": self.objective.state_dict(),
            "optimizer": optimizer.state_dict(),
            "run": asdict(self.state),
            "accumulators": {k: v.detach().cpu() for k, v in accumulators.items()},
            "rng": rng_state(),
            "config": self.config,
        }

    def save_last(self, optimizer: torch.optim.Optimizer, accumulators: dict[str, torch.Tensor]) -> None:
        if self.rt.is_main:
            atomic_save(self._checkpoint(optimizer, accumulators), self.run_dir / "last.pt")
        barrier()

    def slim_checkpoint(self, top1: float | None) -> dict:
        """What a user of the trained network needs (loads like the older frameworks' files)."""
        return {"model": self.student.state_dict(), "arch": self.student_arch, "num_classes": self.data.num_classes,
                "epoch": len(self.state.history), "accuracy": top1, "config": self.config}

    def restore(self, checkpoint: dict) -> tuple[dict | None, dict[str, torch.Tensor]]:
        """Load a ``last.pt``: weights, helpers, run state, RNG. Returns (optimizer state, accumulators)."""
        if checkpoint.get("format") != CHECKPOINT_FORMAT or "run" not in checkpoint:
            raise UserError("last.pt was not written by this version of the trainer; "
                            "start afresh with trainer.resume=false trainer.force=true")
        self.student.load_state_dict(checkpoint["model"])
        self.objective.load_state_dict(checkpoint["objective"])
        self.state = RunState(**checkpoint["run"])
        set_rng_state(checkpoint["rng"])
        accumulators = {k: v.to(self.rt.device) for k, v in checkpoint.get("accumulators", {}).items()}
        return checkpoint.get("optimizer"), accumulators

    # ---- the loop ---------------------------------------------------------------------------------
    def fit(self, resume_from: dict | None = None) -> RunState:
        optimizer_state, accumulators = (None, {})
        if resume_from is not None:
            optimizer_state, accumulators = self.restore(resume_from)
            log.info("resuming at phase %s, epoch %d, step %d", self.plan[self.state.phase].name,
                     self.state.epoch + 1, self.state.step)
        try:
            while self.state.phase < len(self.plan) and not self.state.finished:
                phase = self.plan[self.state.phase]
                self._run_phase(phase, optimizer_state, accumulators)
                optimizer_state, accumulators = None, {}
                if not phase.is_main:
                    self.state.phase += 1
                    self.state.epoch = self.state.step = 0
            self.state.finished = True
        finally:
            self.student_taps.remove()
            if self.teacher_taps is not None:
                self.teacher_taps.remove()
            self.logger.close()
        return self.state

    def _set_modes(self, phase: PlannedPhase) -> None:
        self.student.train()
        self.objective.train()
        if self.teacher is not None:
            self.teacher.eval()
            if phase.is_main and self.objective.teacher_bn_train():
                for m in self.teacher.modules():
                    if isinstance(m, nn.modules.batchnorm._BatchNorm):
                        m.train()

    def _wrap(self, phase: PlannedPhase) -> None:
        """Train exactly the phase's parameters: freeze the rest, and wrap in DDP when distributed."""
        wanted = {id(p) for p in phase.parameters}
        for module in (self.student, self.objective):
            for p in module.parameters():
                p.requires_grad_(id(p) in wanted)
        self.step_module.phase = phase
        self._train_step = self.step_module
        if self.rt.distributed:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.rt.device.index] if self.rt.device.type == "cuda" else None
            with warnings.catch_warnings():
                # Buffers stay rank-local on purpose (CRD banks sync their own rows; BN statistics
                # are per rank unless trainer.sync_bn); the replacement flag still syncs at init.
                warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
                self._train_step = DistributedDataParallel(
                    self.step_module, device_ids=ids, broadcast_buffers=False,
                    find_unused_parameters=self.s.find_unused_parameters)

    def _run_phase(self, phase: PlannedPhase, optimizer_state: dict | None,
                   accumulators: dict[str, torch.Tensor]) -> None:
        if not phase.parameters:
            raise UserError(f"phase '{phase.name}' has no parameters to train")
        optimizer = self.prepare_phase(phase)
        if optimizer_state is not None:
            optimizer.load_state_dict(optimizer_state)
        while self.state.epoch < phase.epochs:
            epoch = self.state.epoch + 1
            lr = lr_at(phase.lr, epoch, self.s.milestones, self.s.lr_decay)
            for group in optimizer.param_groups:
                group["lr"] = lr
            record = self._run_epoch(phase, epoch, lr, optimizer, accumulators)
            accumulators = {}
            self.state.epoch, self.state.step = epoch, 0
            if phase.is_main:
                self.state.history.append(record)
                if record["test_top1"] > self.state.best_top1:
                    self.state.best_top1, self.state.best_epoch = record["test_top1"], epoch
                    if self.rt.is_main:
                        atomic_save(self.slim_checkpoint(record["test_top1"]), self.run_dir / "best.pt")
                if epoch == phase.epochs:
                    self.state.finished = True
            else:
                self.state.init_history.append(record)
            self.save_last(optimizer, {})
            self.logger.metrics(asdict(self.state), "finished" if self.state.finished else "running")
            self.logger.flush()

    def _new_accumulators(self) -> dict[str, torch.Tensor]:
        zero = lambda: torch.zeros((), device=self.rt.device, dtype=torch.float64)  # noqa: E731
        acc = {"loss": zero(), "correct": zero(), "count": zero(),
               "nonfinite_step": torch.full((), -1, device=self.rt.device, dtype=torch.int64)}
        return acc

    def _run_epoch(self, phase: PlannedPhase, epoch: int, lr: float, optimizer: torch.optim.Optimizer,
                   acc: dict[str, torch.Tensor]) -> dict[str, Any]:
        self._set_modes(phase)
        acc = acc or self._new_accumulators()
        term_names: list[str] = [k[len("term/"):] for k in acc if k.startswith("term/")]
        nonfinite_terms = acc.get("nonfinite_terms")
        steps = len(self.train_loader)
        start_step = self.state.step
        tag = "train" if phase.is_main else f"init/{phase.name}"
        bar = tqdm(total=steps, initial=start_step, leave=False, dynamic_ncols=True,
                   desc=f"{phase.name} {epoch}/{phase.epochs}", disable=not (self.s.progress and self.rt.is_main))
        started = time.perf_counter()
        for step, batch in enumerate(self.train_loader.epoch(epoch, start_step=start_step), start=start_step):
            total, terms, s_logits = self.train_step(batch, phase, epoch, optimizer)
            # bookkeeping on the device: no host synchronisation inside the step
            n = len(batch)
            if not term_names:
                term_names = list(terms)
                for name in term_names:
                    acc[f"term/{name}"] = torch.zeros((), device=self.rt.device, dtype=torch.float64)
                nonfinite_terms = torch.zeros(len(term_names) + 1, device=self.rt.device, dtype=torch.bool)
            acc["loss"] += total.detach().double() * n
            acc["count"] += n
            if s_logits is not None:
                acc["correct"] += (s_logits.detach().argmax(1) == batch.labels).sum()
            values = [terms[name].detach().float() for name in term_names]
            for name, value in zip(term_names, values):
                acc[f"term/{name}"] += value.double() * n
            if self.s.nonfinite_check != "off":
                finite = torch.isfinite(torch.stack(values + [total.detach().float()]))
                first_bad = (acc["nonfinite_step"] < 0) & ~finite.all()
                acc["nonfinite_step"] = torch.where(first_bad, step, acc["nonfinite_step"])
                nonfinite_terms = torch.where(first_bad, ~finite, nonfinite_terms)
                acc["nonfinite_terms"] = nonfinite_terms
            self.state.global_step += 1
            self.state.step = step + 1
            bar.update(1)
            last = step + 1 == steps
            if (step + 1) % self.s.log_interval == 0 or last:
                self._check_finite(acc, term_names, epoch, phase)
                count = max(acc["count"].item(), 1.0)
                shown = {"loss": acc["loss"].item() / count}
                if s_logits is not None:
                    shown["acc"] = 100.0 * acc["correct"].item() / count
                bar.set_postfix({k: f"{v:.3f}" for k, v in shown.items()})
                self.logger.scalars({**shown, "lr": lr}, self.state.global_step, tag)
            every = self.s.checkpoint_every_steps
            if every and (step + 1) % every == 0 and not last:
                self._check_finite(acc, term_names, epoch, phase)
                self.save_last(optimizer, acc)
        bar.close()
        elapsed = time.perf_counter() - started
        sums = torch.stack([acc["loss"], acc["correct"], acc["count"]] + [acc[f"term/{n}"] for n in term_names])
        sums = all_reduce_sum(sums.clone()).tolist()
        count = max(sums[2], 1.0)
        record: dict[str, Any] = {"epoch": epoch, "lr": lr, "train_loss": sums[0] / count}
        if phase.student_forward:
            record["train_top1"] = 100.0 * sums[1] / count
        for name, value in zip(term_names, sums[3:]):
            record[f"loss_{name}"] = value / count
        record["time_s"] = elapsed
        record["images_per_s"] = count / elapsed if elapsed > 0 and start_step == 0 else None
        if phase.is_main:
            record.update(self.evaluate(self.student))
            log.info("epoch %d/%d  lr %.4g  train_loss %.4f  test_top1 %.2f  test_top5 %.2f",
                     epoch, phase.epochs, lr, record["train_loss"], record["test_top1"], record["test_top5"])
        else:
            log.info("%s epoch %d/%d  loss %.4f", phase.name, epoch, phase.epochs, record["train_loss"])
        self.logger.scalars({k: v for k, v in record.items() if isinstance(v, float) and k != "lr"}, epoch,
                            "epoch" if phase.is_main else f"init/{phase.name}/epoch")
        return record

    def train_step(self, batch: Batch, phase: PlannedPhase, epoch: int,
                   optimizer: torch.optim.Optimizer) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None]:
        """One optimisation step: teacher forward (no grad), student forward/backward, optimizer step."""
        with self.rt.autocast():
            t_logits, t_stores = None, None
            if self.teacher is not None and phase.needs_teacher:
                with torch.no_grad():
                    t_logits = self.teacher(batch.images)
                t_stores = self.teacher_taps.pop()
            total, terms, s_logits = self._train_step(batch, t_logits, t_stores, epoch)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        if self.s.nonfinite_check == "grad":
            grads = [p.grad for p in phase.parameters if p.grad is not None]
            terms = {**terms, "grad_norm": torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))}
        optimizer.step()
        return total, terms, s_logits

    def prepare_phase(self, phase: PlannedPhase) -> torch.optim.Optimizer:
        """Freeze all but the phase's parameters, set train/eval modes, and make its optimizer."""
        self._wrap(phase)
        self._set_modes(phase)
        return make_optimizer(phase.parameters, phase.lr, self.s, self.rt.device)

    def _check_finite(self, acc: dict[str, torch.Tensor], term_names: list[str], epoch: int,
                      phase: PlannedPhase) -> None:
        if self.s.nonfinite_check == "off":
            return
        bad_step = int(acc["nonfinite_step"].item())
        if bad_step < 0:
            return
        flags = acc["nonfinite_terms"].tolist()
        names = [n for n, bad in zip(term_names + ["total"], flags) if bad] or ["total"]
        kept = "last.pt" if (self.run_dir / "last.pt").exists() else "no checkpoint"
        self.logger.metrics(asdict(self.state), "failed",
                            {"error": f"non-finite {names[0]} at epoch {epoch}, step {bad_step + 1}"})
        raise NonFiniteLossError(
            f"non-finite loss term '{names[0]}' at {phase.name} epoch {epoch}, step {bad_step + 1}; "
            f"stopped, {kept} left as it was (lower optim.lr or check the inputs)")

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Top-1/top-5 and loss on the test split with large batches (reduced over ranks)."""
        was_training = model.training
        model.eval()
        sums = torch.zeros(4, device=self.rt.device, dtype=torch.float64)
        for batch in self.test_loader.epoch(0):
            with self.rt.autocast():
                logits = model(batch.images)
            if model is self.student:
                self.student_taps.pop()
            elif self.teacher_taps is not None and model is self.teacher:
                self.teacher_taps.pop()
            logits = logits.float()
            top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hits = top5 == batch.labels[:, None]
            sums += torch.stack([
                torch.nn.functional.cross_entropy(logits, batch.labels, reduction="sum").double(),
                hits[:, 0].sum().double(), hits.any(1).sum().double(),
                torch.tensor(float(len(batch)), device=self.rt.device, dtype=torch.float64)])
        all_reduce_sum(sums)
        model.train(was_training)
        loss, top1, top5, count = sums.tolist()
        count = max(count, 1.0)
        return {"test_loss": loss / count, "test_top1": 100.0 * top1 / count, "test_top5": 100.0 * top5 / count}
