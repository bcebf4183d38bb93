"""The two jobs, from a composed config to a finished run directory.

``train_teacher.py`` and ``train_student.py`` are thin Hydra wrappers around
:func:`train_network` and :func:`distill`. Both validate the config (against the
schema of :mod:`distiller.config.schema`), prepare the
run directory (resume, finished-run detection, refusing to mix two runs), build
the objects and hand them to :class:`distiller.engine.Trainer`.
"""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from common.errors import UserError
from common.files import atomic_write
from datasets import load_dataset
from distiller.config.messages import describe_error
from distiller.config.pairs import apply_pair_settings
from distiller.config.schema import logger_settings
from distiller.config.validation import validate
from distiller.engine.checkpoints import safe_load
from distiller.engine.loop import Trainer, TrainSettings
from distiller.engine.runtime import Runtime, barrier, make_runtime, seed_everything
from distiller.jobs.teachers import load_teacher_weights, prepare_store, published_check, store_teacher
from distiller.objective import Objective
from distiller.optim import check_optimizer, optimizer_options
from models.external import build_network, network_label
from models.taps import check_taps

log = logging.getLogger("distiller")

# keys that may change between a run and its resumption without making it a different run
VOLATILE_KEYS = ("trainer.resume", "trainer.auto_resume", "trainer.force", "trainer.progress",
                 "trainer.log_interval", "trainer.num_threads", "trainer.checkpoint_every_steps",
                 "trainer.device", "trainer.compile", "dataset.root", "teacher.ckpt", "teacher_dir",
                 "dataset.eval_batch_size", "teacher.verify", "logger",
                 "trainer.eval_precision")  # evaluation's precision never changes the training
# keys added to configs after runs were made with them absent: at these values they change nothing,
# so a run directory written before they existed still resumes
NEUTRAL_DEFAULTS = {"distill.logit_standardize": False}


# ---- validation -----------------------------------------------------------------------------------
def settings_from_config(cfg: DictConfig, runtime: Runtime) -> TrainSettings:
    """Collect the numeric knobs of a run for the trainer (``cfg`` is validated first)."""
    job = validate(cfg)
    lr = job.optim.lr
    if job.optim.scale_lr_with_batch:
        lr = lr * job.dataset.batch_size * runtime.world_size / 64
    impl = job.optim.implementation
    if impl == "fused" and runtime.device.type != "cuda":
        impl = "foreach"
    settings = TrainSettings(
        epochs=job.trainer.epochs, lr=lr, momentum=job.optim.momentum, weight_decay=job.optim.weight_decay,
        nesterov=job.optim.nesterov, optimizer_impl=impl, milestones=tuple(job.schedule.milestones),
        lr_decay=job.schedule.gamma, batch_size=job.dataset.batch_size, eval_batch_size=job.dataset.eval_batch_size,
        seed=job.seed, log_interval=job.trainer.log_interval,
        checkpoint_every_steps=job.trainer.checkpoint_every_steps, nonfinite_check=job.trainer.nonfinite_check,
        progress=job.trainer.progress, find_unused_parameters=job.trainer.find_unused_parameters,
        optimizer=job.optim.name, optimizer_options=optimizer_options(job.optim.name, job.optim),
    )
    check_optimizer(settings, runtime.device)  # a bad optimizer option fails now, not after an init phase
    return settings


# ---- the run directory ----------------------------------------------------------------------------
def run_identity(config: dict[str, Any]) -> dict[str, Any]:
    """The config without keys that may change between a run and its resumption."""
    identity = OmegaConf.create(config)
    for key in (*VOLATILE_KEYS, *NEUTRAL_DEFAULTS):
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(identity, parent) if parent else identity
        if isinstance(node, DictConfig) and leaf in node and (key not in NEUTRAL_DEFAULTS
                                                              or node[leaf] == NEUTRAL_DEFAULTS[key]):
            del node[leaf]
    return OmegaConf.to_container(identity)


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            out += _differences(old.get(key, "<absent>"), new.get(key, "<absent>"), f"{prefix}{key}.")
        return out
    return [] if old == new else [f"{prefix[:-1]} {old} -> {new}"]


def prepare_run_dir(run_dir: Path, config: dict[str, Any], cfg: DictConfig, runtime: Runtime) -> dict | None | str:
    """Decide how this run starts: fresh (None), from ``last.pt`` (its contents) or already ``"finished"``.

    Never overwrites another run: a run directory holding a different config is
    refused unless ``trainer.force=true``, which moves the old files aside first.
    """
    config_file = run_dir / "config.yaml"
    last = run_dir / "last.pt"
    if config_file.exists():
        try:
            old = OmegaConf.to_container(OmegaConf.load(config_file))
        except Exception:  # noqa: BLE001 - an unreadable config is treated as a different run
            old = {"unreadable": True}
        diff = _differences(run_identity(old), run_identity(config))
        if diff:
            if not cfg.trainer.force:
                raise UserError(
                    f"run directory {run_dir} holds a different run ({'; '.join(diff[:3])}"
                    f"{'; ...' if len(diff) > 3 else ''}); choose another hydra.run.dir, or pass "
                    f"trainer.force=true to start afresh (the old files are moved aside, not deleted)")
            if runtime.is_main:
                aside = run_dir / f"replaced-{time.strftime('%Y%m%d-%H%M%S')}"
                aside.mkdir()
                for path in list(run_dir.iterdir()):
                    if path.name != ".hydra" and not path.name.startswith("replaced-") and path != aside:
                        shutil.move(str(path), aside / path.name)
                log.warning("moved the previous run's files to %s", aside)
            barrier()
            return None
    if last.exists():
        if not (cfg.trainer.resume or cfg.trainer.auto_resume):
            raise UserError(f"run directory {run_dir} already holds a run (last.pt); pass trainer.resume=true "
                            f"to continue it, or trainer.force=true to start afresh")
        checkpoint = safe_load(last, "checkpoint")
        if checkpoint.get("run", {}).get("finished"):
            return "finished"
        return checkpoint
    if cfg.trainer.resume:
        raise UserError(f"trainer.resume=true but {run_dir} holds no last.pt to resume from; "
                        f"drop trainer.resume to start this run")
    return None


def _write_config(run_dir: Path, config: dict[str, Any], runtime: Runtime) -> None:
    """Record the resolved config of a fresh run (all ranks wait until it is on disk)."""
    barrier()
    if runtime.is_main and not (run_dir / "config.yaml").exists():
        atomic_write(config, run_dir / "config.yaml", "yaml")
    barrier()


def _report_finished(run_dir: Path) -> None:
    import json

    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
        top1 = metrics.get("final_top1")
    except (OSError, ValueError):
        top1 = None
    log.info("run in %s is already finished (final top-1 %s); nothing to do", run_dir, top1)
    print(f"already finished: {run_dir} (final top-1 {top1})")


def _resolve(cfg: DictConfig) -> dict[str, Any]:
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as err:  # interpolation errors are config mistakes
        raise UserError(describe_error(err)) from None


# ---- jobs -----------------------------------------------------------------------------------------
def train_network(cfg: DictConfig, run_dir: Path) -> dict[str, Any] | None:
    """Train ``cfg.model`` with cross-entropy; store the result where ``teacher=<arch>`` finds it."""
    job = validate(cfg, "train_teacher")
    config = _resolve(cfg)
    runtime = make_runtime(cfg.trainer)
    settings = settings_from_config(job, runtime)
    start = prepare_run_dir(run_dir, config, cfg, runtime)
    if job.save_teacher:  # teacher_dir usable before training; "finished" means stored and indexed (teachers.py)
        prepare_store(Path(str(cfg.teacher_dir)), run_dir, network_label(cfg.model), str(cfg.dataset.name), config,
                      finished=start == "finished" and runtime.is_main)
    if start == "finished":
        _report_finished(run_dir)
        return None
    seed_everything(settings.seed)
    data = load_dataset(cfg.dataset)
    arch = network_label(cfg.model)  # resnet56, torchvision-resnet18, ...
    model = build_network(cfg.model, data.num_classes, data.image_size, role="model")
    header = {"kind": "teacher", "arch": arch, "student": arch, "teacher": None, "method": "ce",
              "seed": settings.seed, "dataset": str(cfg.dataset.name)}
    trainer = Trainer(runtime=runtime, settings=settings, run_dir=run_dir, data=data, student=model,
                      student_arch=arch, objective=Objective.from_config(None), config=config, header=header,
                      logger_settings=logger_settings(config.get("logger")))
    _write_config(run_dir, config, runtime)
    state = trainer.fit(resume_from=start)
    final = state.history[-1]
    if runtime.is_main:
        slim = trainer.checkpointer.slim(len(state.history), final["test_top1"])
        atomic_write(slim, run_dir / "final.pt")
        if job.save_teacher:  # <teacher_dir>/<arch>.pt, indexed (distiller/teachers.py); a previous file -> .bak
            store_teacher(run_dir / "final.pt", Path(str(cfg.teacher_dir)), arch, str(cfg.dataset.name), final,
                          config, run_dir)
    if runtime.is_main:
        print(f"{arch}: final test top-1 {final['test_top1']:.2f}  best {state.best_top1:.2f}  ({run_dir})")
    return final


def distill(cfg: DictConfig, run_dir: Path) -> dict[str, Any] | None:
    """Distill ``cfg.teacher`` into ``cfg.student`` with the objective of ``cfg.distill`` (+ ``cfg.combine``)."""
    applied = apply_pair_settings(cfg)
    job = validate(cfg, "train_student")
    config = _resolve(cfg)
    runtime = make_runtime(cfg.trainer)
    settings = settings_from_config(job, runtime)
    objective = Objective.from_config(cfg.distill, cfg.get("combine"))
    start = prepare_run_dir(run_dir, config, cfg, runtime)
    if start == "finished":
        _report_finished(run_dir)
        return None
    trainer, teacher = build_distillation(cfg, run_dir, runtime, settings, objective, config)
    teacher_arch, student_arch = trainer.teacher_arch, trainer.student_arch
    if applied and runtime.is_main:
        print(f"published settings of the pair {teacher_arch}-{student_arch}: {', '.join(applied)}")
    if trainer.teacher is not None:
        teacher_eval = trainer.evaluate(trainer.teacher)
    else:  # a plain-CE objective never runs the teacher; still measure it for the record
        teacher_eval = trainer.evaluate(teacher.to(runtime.device))
    trainer.logger.header["teacher_top1"] = teacher_eval["test_top1"]
    log.info("teacher %s: test top-1 %.2f", teacher_arch, teacher_eval["test_top1"])
    if runtime.is_main:
        print(f"teacher {teacher_arch}: test top-1 {teacher_eval['test_top1']:.2f}")
        _warn_below_published(cfg, teacher_arch, len(trainer.data.test_labels), teacher_eval["test_top1"])
    state = trainer.fit(resume_from=start)
    final = state.history[-1]
    if runtime.is_main:
        atomic_write(trainer.checkpointer.slim(len(state.history), final["test_top1"]), run_dir / "final.pt")
        print(f"{student_arch} <- {teacher_arch} [{cfg.method_label}]: final test top-1 {final['test_top1']:.2f}  "
              f"best {state.best_top1:.2f}  ({run_dir})")
    return final


def _warn_below_published(cfg: DictConfig, teacher_arch: str, num_test: int, measured: float) -> None:
    """Say so when the teacher is clearly weaker than the shared pretrained one of its architecture."""
    published = cfg.teacher.get("published_top1")
    check = published_check(teacher_arch, str(cfg.dataset.name), num_test, measured,
                            None if published is None else float(published))
    if check is not None and not check["ok"]:
        print(f"warning: teacher {teacher_arch} scores {measured:.2f}, {-check['difference']:.2f} points below the "
              f"published {check['published_top1']:.2f}; check teacher.ckpt (a wrong or under-trained file?)")


def build_distillation(cfg: DictConfig, run_dir: Path, runtime: Runtime, settings: TrainSettings,
                       objective: Objective, config: dict[str, Any],
                       load_teacher: bool = True) -> tuple[Trainer, torch.nn.Module]:
    """Seed, load the data, build teacher (with its weights) and student, and the trainer around them.

    ``load_teacher=False`` keeps the teacher randomly initialised (benchmarks, tests).
    """
    seed_everything(settings.seed)
    data = load_dataset(cfg.dataset)
    teacher_arch, student_arch = network_label(cfg.teacher), network_label(cfg.student)
    needs = lambda role: {e.label: getattr(e.method, f"{role}_features") for e in objective.entries}
    teacher = build_network(cfg.teacher, data.num_classes, data.image_size, role="teacher")
    check_taps(teacher, "teacher", teacher_arch, needs("teacher"))  # a tap the methods need exists (before any I/O)
    if load_teacher:  # checked against the teacher index of its folder first (teacher.verify)
        load_teacher_weights(teacher, Path(str(cfg.teacher.ckpt)), teacher_arch, dataset=str(cfg.dataset.name),
                             verify=bool(cfg.teacher.get("verify", True)))
    student = build_network(cfg.student, data.num_classes, data.image_size, role="student")
    check_taps(student, "student", student_arch, needs("student"))
    header = {"kind": "student", "arch": student_arch, "student": student_arch, "teacher": teacher_arch,
              "method": str(cfg.get("method_label", cfg.distill.name)), "seed": settings.seed,
              "dataset": str(cfg.dataset.name)}
    trainer = Trainer(runtime=runtime, settings=settings, run_dir=run_dir, data=data, student=student,
                      student_arch=student_arch, objective=objective, teacher=teacher,
                      teacher_arch=teacher_arch, config=config, header=header,
                      logger_settings=logger_settings(config.get("logger")))
    # only now, with every method built for this pair: a run that cannot start leaves no trace
    _write_config(run_dir, config, runtime)
    return trainer, teacher


def run_dir_of_job() -> Path:
    """The Hydra run directory of the current job (never the working directory)."""
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)

