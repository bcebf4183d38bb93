"""The two training jobs, from a composed config to a finished run directory: the composition root.

``train_teacher.py`` and ``train_student.py`` are thin Hydra wrappers around :func:`train_network`
and :func:`distill`. Each reads top to bottom: the config is validated and converted once
(:func:`compose_job`), the run directory decides how the run starts (:mod:`distiller.jobs.run_dir`),
then everything is built here, in one place (data, networks, objective, the step, loaders, plan,
checkpointer, run log: :func:`assemble`), and handed to :class:`distiller.engine.loop.Trainer`, which
only runs it.
"""
from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch import nn

from common.files import atomic_write, file_sha256
from datasets import load_dataset
from datasets.base import teachers_data_root
from datasets.loaders import make_loader
from distiller.config.overrides import override_key
from distiller.config.pairs import apply_pair_settings
from distiller.config.validation import check_job
from distiller.engine.checkpoints import Checkpointer
from distiller.engine.loop import Trainer
from distiller.engine.plan import plan_phases, unreached_milestones
from distiller.engine.run_log import RunLogger
from distiller.engine.runtime import Runtime, make_runtime, seed_everything
from distiller.engine.step import build_step
from distiller.engine.teacher_cache import TeacherCache
from distiller.jobs.run_cache import open_run_cache
from distiller.jobs.run_dir import prepare_run_dir, report_finished, write_config
from distiller.jobs.teacher_accuracy import published_check
from distiller.jobs.teacher_store import prepare_store, store_teacher
from distiller.jobs.teachers import load_teacher_weights
from distiller.objective import Objective
from distiller.optim import check_optimizer, make_optimizer
from models.external import build_network, command_line_choice, network_label
from models.features import check_features

log = logging.getLogger("distiller")


def compose_job(cfg: DictConfig, name: str) -> tuple[Any, dict[str, Any], list[str]]:
    """The composed config of job ``name`` checked and converted once (the typed job every part reads), the
    resolved config the run records (``config.yaml``), and what the pair's published settings changed.

    The jobs below do the same in their first lines, where the raw config ends: past the conversion only
    the typed job travels."""
    applied = apply_pair_settings(cfg) if name == "train_student" else []
    job = OmegaConf.to_object(check_job(cfg, name))
    record = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k != "hydra"}
    return job, record, applied


def recorded_config(cfg: DictConfig, name: str) -> dict[str, Any]:
    """The resolved config a run of job ``name`` records in ``config.yaml``."""
    return compose_job(cfg, name)[1]


def base_lr(job: Any, runtime: Runtime) -> float:
    """``optim.lr``, times the global batch / 64 under ``optim.scale_lr_with_batch``; its optimizer checked now."""
    check_optimizer(job.optim, runtime.device)  # a bad optimizer option fails now, not after an init phase
    scale = job.dataset.batch_size * runtime.world_size / 64 if job.optim.scale_lr_with_batch else 1.0
    return job.optim.lr * scale


def assemble(job: Any, run_dir: Path, record: dict[str, Any], runtime: Runtime, data: Any, student: nn.Module,
             teacher: nn.Module | None, objective: Objective, header: dict[str, Any],
             teacher_cache: TeacherCache | None = None) -> Trainer:
    """Everything a run executes, built from the typed job: the step, the loaders, the plan, the
    checkpointer and the run log, handed to a :class:`Trainer`. ``teacher_cache``: the teacher's logits
    the step reads instead of its forward (:mod:`distiller.jobs.run_cache`)."""
    if runtime.is_main and (late := unreached_milestones(job.schedule.milestones, job.trainer.epochs)):
        log.warning(late)
    step = build_step(student, teacher, objective, data, runtime, job.trainer.epochs, teacher_cache)
    views = objective.views()
    shard = dict(device=runtime.device, rank=runtime.rank, world_size=runtime.world_size,
                 channels_last=runtime.channels_last)
    calibrates = any(e.method.calibration_features is not None for e in objective.entries)
    return Trainer(
        step=step, runtime=runtime, settings=job.trainer, schedule=job.schedule,
        train_loader=make_loader(data, "train", job.dataset.batch_size, train=True, seed=job.seed, views=views,
                                 **shard),
        test_loader=make_loader(data, "test", job.dataset.eval_batch_size, train=False, **shard),
        calibration_loader=(make_loader(data, "train", job.dataset.eval_batch_size, train=False, **shard)
                            if calibrates else None),
        plan=plan_phases(objective, step.student, job.trainer.epochs, base_lr(job, runtime)),
        checkpointer=Checkpointer(run_dir, runtime.is_main, step.student, objective, header["arch"],
                                  header["teacher"], data.num_classes, record, header.get("teacher_sha256")),
        logger=RunLogger(run_dir, runtime.is_main, header, record, job.logger),
        optimizer=partial(make_optimizer, optim=job.optim, device=runtime.device))


# ---- the teacher job --------------------------------------------------------------------------------
def train_network(cfg: DictConfig, run_dir: Path) -> dict[str, Any] | None:
    """Train ``model`` with cross-entropy; store the result where ``teacher=<arch>`` finds it."""
    job = OmegaConf.to_object(check_job(cfg, "train_teacher"))  # the one conversion: the schema's dataclasses
    record = OmegaConf.to_container(cfg, resolve=True)  # what the run records (checked: it resolves)
    runtime = make_runtime(job.trainer)
    base_lr(job, runtime)
    start = prepare_run_dir(run_dir, record, job.trainer, runtime)
    arch = network_label(job.model)  # resnet56, torchvision-resnet18, ...
    if job.save_teacher:  # teacher_dir usable before training; "finished" means stored and indexed (teachers.py)
        prepare_store(Path(job.teacher_dir), run_dir, arch, job.dataset.name, record,
                      finished=start == "finished" and runtime.is_main)
    if start == "finished":
        report_finished(run_dir)
        return None
    seed_everything(job.seed)
    data = load_dataset(job.dataset)
    model = build_network(job.model, data.num_classes, data.image_size, role="model")
    header = {"kind": "teacher", "arch": arch, "student": arch, "teacher": None, "method": "ce", "seed": job.seed,
              "dataset": job.dataset.name}
    trainer = assemble(job, run_dir, record, runtime, data, model, None, Objective.plain(), header)
    write_config(run_dir, record, runtime)
    state = trainer.fit(resume_from=start)
    final = state.history[-1]
    if runtime.is_main:
        atomic_write(trainer.checkpointer.slim(len(state.history), final["test_top1"]), run_dir / "final.pt")
        if job.save_teacher:  # <teacher_dir>/<arch>.pt, indexed (jobs/teachers.py); a previous file -> .bak
            store_teacher(run_dir / "final.pt", Path(job.teacher_dir), arch, job.dataset.name, final, record, run_dir,
                          image_size=data.image_size)
        print(f"{arch}: final test top-1 {final['test_top1']:.2f}  best {state.best_top1:.2f}  ({run_dir})")
    return final


# ---- the student job --------------------------------------------------------------------------------
def distill(cfg: DictConfig, run_dir: Path) -> dict[str, Any] | None:
    """Distill ``teacher`` into ``student`` with the objective of ``distill`` (+ ``combine``)."""
    applied = apply_pair_settings(cfg)
    job = OmegaConf.to_object(check_job(cfg, "train_student"))  # the one conversion: the schema's dataclasses
    record = OmegaConf.to_container(cfg, resolve=True)  # what the run records (checked: it resolves)
    runtime = make_runtime(job.trainer)
    base_lr(job, runtime)
    objective = Objective.from_config(job.distill, job.combine)  # a bad method setting fails before any I/O
    # resumed only with the teacher file the run started with (its sha256 in last.pt)
    start = prepare_run_dir(run_dir, record, job.trainer, runtime, teacher_file=Path(job.teacher.ckpt))
    if start == "finished":
        report_finished(run_dir)
        return None
    trainer, teacher = assemble_distillation(job, run_dir, record, runtime, objective=objective)
    teacher_arch, student_arch = network_label(job.teacher), network_label(job.student)
    if applied and runtime.is_main:
        print(f"published settings of the pair {teacher_arch}-{student_arch}: {', '.join(applied)}")
    # a plain-CE objective never runs the teacher, which the step then leaves out; still measure it for the record
    teacher_eval = trainer.measure(trainer.teacher or teacher.to(runtime.device))
    trainer.logger.header["teacher_top1"] = teacher_eval["test_top1"]
    log.info("teacher %s: test top-1 %.2f", teacher_arch, teacher_eval["test_top1"])
    if runtime.is_main:
        print(f"teacher {teacher_arch}: test top-1 {teacher_eval['test_top1']:.2f}")
        _warn_below_published(job, teacher_arch, trainer.test_loader.dataset_size, teacher_eval["test_top1"])
    state = trainer.fit(resume_from=start)
    final = state.history[-1]
    if runtime.is_main:
        atomic_write(trainer.checkpointer.slim(len(state.history), final["test_top1"]), run_dir / "final.pt")
        print(f"{student_arch} <- {teacher_arch} [{job.method_label}]: final test top-1 {final['test_top1']:.2f}  "
              f"best {state.best_top1:.2f}  ({run_dir})")
    return final


def assemble_distillation(job: Any, run_dir: Path, record: dict[str, Any], runtime: Runtime,
                          load_teacher: bool = True, objective: Objective | None = None) -> tuple[Trainer, nn.Module]:
    """Seed, load the data, build the objective, teacher (with its weights) and student, and assemble the run;
    the config is recorded only now, so a run that cannot start leaves no trace. Returns the trainer and the
    teacher (kept apart: the step drops a teacher the objective never reads).

    ``load_teacher=False`` keeps the teacher randomly initialised (benchmarks, tests); ``objective``: one
    already built from ``job`` (else it is built here).
    """
    objective = Objective.from_config(job.distill, job.combine) if objective is None else objective
    seed_everything(job.seed)
    data = load_dataset(job.dataset)
    teacher_arch, student_arch = network_label(job.teacher), network_label(job.student)
    needs = lambda role: {e.label: getattr(e.method, f"{role}_features") for e in objective.entries}
    teacher = build_network(job.teacher, data.num_classes, data.image_size, role="teacher")
    # every feature the methods need exists (checked before any I/O)
    check_features(teacher, "teacher", teacher_arch, needs("teacher"))
    teacher_sha256 = None
    if load_teacher:  # checked against the teacher index of its folder first (teacher.verify)
        teacher_file = Path(job.teacher.ckpt)
        entry = load_teacher_weights(teacher, teacher_file, teacher_arch, dataset=job.dataset.name,
                                     verify=job.teacher.verify, train_overrides=_same_data_overrides(job),
                                     teacher_dir=job.teacher_dir,
                                     data_root=teachers_data_root(job.dataset.name, str(job.dataset.root)),
                                     data_facts={"image_size": list(data.image_size), "data_seed": job.dataset.seed},
                                     model_choice=command_line_choice(vars(job.teacher), "model"))
        # recorded in the checkpoints and metrics.json: a resumed run must find the same file
        teacher_sha256 = entry["sha256"] if entry is not None else file_sha256(teacher_file)
    student = build_network(job.student, data.num_classes, data.image_size, role="student")
    check_features(student, "student", student_arch, needs("student"))
    header = {"kind": "student", "arch": student_arch, "student": student_arch, "teacher": teacher_arch,
              "method": job.method_label, "seed": job.seed, "dataset": job.dataset.name,
              **({"teacher_file": job.teacher.ckpt, "teacher_sha256": teacher_sha256} if load_teacher else {})}
    # teacher.cache=true: the teacher's logits from the cache (built now if missing), or one line and live
    cache = open_run_cache(job.teacher, objective, data, teacher, Path(job.teacher.ckpt) if load_teacher else None,
                           job.dataset.name, runtime, progress=job.trainer.progress)
    trainer = assemble(job, run_dir, record, runtime, data, student, teacher, objective, header, cache)
    write_config(run_dir, record, runtime)
    return trainer, teacher


def _same_data_overrides(job: Any) -> list[str]:
    """What a ``train_teacher.py`` command needs to store its teacher where this run looks: the data set
    and teacher folder as this command line gave them (else the data set's name)."""
    from hydra.core.hydra_config import HydraConfig

    typed = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    same = [o for o in typed if override_key(o) in ("dataset", "teacher_dir")
            or override_key(o).startswith("dataset.")]
    return same if any(override_key(o) == "dataset" for o in same) else [f"dataset={job.dataset.name}", *same]


def _warn_below_published(job: Any, teacher_arch: str, num_test: int, measured: float) -> None:
    """Say so when the teacher is clearly weaker than the shared pretrained one of its architecture."""
    check = published_check(teacher_arch, job.dataset.name, num_test, measured, job.teacher.published_top1)
    if check is not None and not check["ok"]:
        print(f"warning: teacher {teacher_arch} scores {measured:.2f}, {-check['difference']:.2f} points below the "
              f"published {check['published_top1']:.2f}; check teacher.ckpt (a wrong or under-trained file?)")


def run_dir_of_job() -> Path:
    """The Hydra run directory of the current job (never the working directory)."""
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)
