"""The run directory of a job: start fresh, resume from ``last.pt``, or see that the run is finished.

A run directory holds one run: its resolved config (``config.yaml``), checkpoints and metrics. A
second command on the same directory resumes it when its config is the same (up to the keys that
may change between a run and its resumption, :data:`VOLATILE_KEYS`), and is refused otherwise,
unless ``trainer.force=true`` moves the old files aside first. A student resumes only with the
teacher file it started with (its sha256, recorded in ``last.pt``), and a finished one is reported only
for the file it was trained with: another one is refused the same way, before anything is written.
Hydra's record of the command (``.hydra/``, the job's log) is written only once the run starts here
(:func:`write_config`), so a command that is refused, or finds its run finished, changes nothing in the
directory.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from common.errors import UserError
from common.files import atomic_write
from common.lookup import dotted_get
from distiller.config import run_record
from distiller.config.schema import NETWORK_GROUPS, SCHEMAS, current_names
from distiller.engine.checkpoints import safe_load
from distiller.engine.runtime import Runtime, barrier
from distiller.jobs.teachers import resumed_teacher_change

log = logging.getLogger("distiller")

# keys that may change between a run and its resumption without making it a different run
VOLATILE_KEYS = ("trainer.resume", "trainer.auto_resume", "trainer.force", "trainer.progress",
                 "trainer.log_interval", "trainer.num_threads", "trainer.checkpoint_every_steps",
                 "trainer.device", "trainer.compile", "dataset.root", "teacher.ckpt", "teacher_dir",
                 "dataset.eval_batch_size", "teacher.verify", "logger",
                 "trainer.eval_precision",  # evaluation's precision never changes the training
                 "teacher.cache_dir")  # where the teacher cache lives, not what it holds (its key says that)
# keys added to configs after runs were made with them absent: at these values they change nothing,
# so a run directory written before they existed still resumes
NEUTRAL_DEFAULTS = {"distill.logit_standardize": False, "teacher.cache": False, "teacher.cache_dtype": "fp32",
                    **{f"{group}.features.pool_input": None for group in NETWORK_GROUPS}}
# tables only interpolations read (``pair``: the per-pair settings; a preset's own top-level table): what
# they gave the run is in the resolved keys it reads, so a pair file that gains a new method's settings
# does not turn the runs made before into different runs
INTERPOLATION_TABLES = ("pair",)


def run_identity(config: dict[str, Any]) -> dict[str, Any]:
    """The config without keys that may change between a run and its resumption."""
    known = {f.name for schema in SCHEMAS.values() for f in dataclasses.fields(schema)}
    kept = {key: value for key, value in config.items() if key in known and key not in INTERPOLATION_TABLES}
    for group in NETWORK_GROUPS:  # a node recorded by an earlier release, under today's key names: it resumes
        if isinstance(kept.get(group), dict):
            kept[group] = current_names(kept[group])
    identity = OmegaConf.create(kept)
    for key in (*VOLATILE_KEYS, *NEUTRAL_DEFAULTS):
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(identity, parent) if parent else identity
        if isinstance(node, DictConfig) and leaf in node and (key not in NEUTRAL_DEFAULTS
                                                              or node[leaf] == NEUTRAL_DEFAULTS[key]):
            del node[leaf]
    return OmegaConf.to_container(identity)


# volatile keys that change the numbers a run reports (not what it trains): a change is said when it resumes
REPORTED_KEYS = ("trainer.eval_precision",)


def _note_reported_changes(old: dict[str, Any], new: dict[str, Any], run_dir: Path) -> None:
    """Warn when this command changes a :data:`REPORTED_KEYS` key of the run it continues (``old``: the config
    its ``last.pt`` records; ``config.yaml`` keeps the value the run started with)."""
    for key in REPORTED_KEYS:
        before, after = dotted_get(old, key), dotted_get(new, key)
        if before is not None and before != after:
            log.warning("%s=%s, but the run in %s has been evaluated with %s so far (config.yaml keeps the value it "
                        "started with): its evaluations from here on use %s", key, after, run_dir, before, after)


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """``key old -> new`` per differing key; a key :func:`run_identity` dropped at its neutral default shows
    that default (``teacher.cache True -> False``), any other missing key ``<absent>``."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            missing = NEUTRAL_DEFAULTS.get(f"{prefix}{key}", "<absent>")
            out += _differences(old.get(key, missing), new.get(key, missing), f"{prefix}{key}.")
        return out
    return [] if old == new else [f"{prefix[:-1]} {old} -> {new}"]


def _other_job(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """``"teacher"`` or ``"student"`` where ``old`` (the directory's run) is the other job's run than ``new``."""
    kinds = ["student" if "distill" in config else "teacher" for config in (old, new)]
    return kinds[0] if kinds[0] != kinds[1] and "unreadable" not in old else None


def _move_aside(run_dir: Path, runtime: Runtime) -> None:
    """``trainer.force=true``: move every file of the previous run (``.hydra/`` and the log too: its record)
    into ``replaced-<date>/``; all ranks wait until it is done."""
    if runtime.is_main:
        aside = run_dir / f"replaced-{time.strftime('%Y%m%d-%H%M%S')}"
        aside.mkdir()
        for path in list(run_dir.iterdir()):
            if not path.name.startswith("replaced-") and path != aside:
                shutil.move(str(path), aside / path.name)
        log.warning("moved the previous run's files to %s", aside)
    barrier()


def prepare_run_dir(run_dir: Path, config: dict[str, Any], trainer: Any, runtime: Runtime,
                    teacher_file: Path | None = None) -> dict | None | str:
    """Decide how this run starts: fresh (None), from ``last.pt`` (its contents) or already ``"finished"``.

    ``config`` is the run's resolved config, ``trainer`` its ``trainer`` node (force, resume, auto_resume),
    ``teacher_file`` a student's teacher (a resumed run must find the file it started with).
    Never overwrites another run: a run directory holding a different config, or a run that started
    with another teacher file, is refused unless ``trainer.force=true``, which moves the old files aside first.
    """
    config_file = run_dir / "config.yaml"
    last = run_dir / "last.pt"
    if config_file.exists():
        try:
            old = OmegaConf.to_container(OmegaConf.load(config_file))
        except Exception:  # noqa: BLE001 - an unreadable config is treated as a different run
            old = {"unreadable": True}
        diff = _differences(run_identity(old), run_identity(config))
        other = _other_job(old, config)
        if other and not trainer.force:
            raise UserError(f"run directory {run_dir} holds a {other}'s run (train_{other}.py), not this job's; "
                            f"choose another hydra.run.dir")
        if diff:
            if not trainer.force:
                raise UserError(
                    f"run directory {run_dir} holds a different run ({'; '.join(diff[:3])}"
                    f"{'; ...' if len(diff) > 3 else ''}); choose another hydra.run.dir, or pass "
                    f"trainer.force=true to start afresh (the old files are moved aside, not deleted)")
            _move_aside(run_dir, runtime)
            return None
    if last.exists():
        if not (trainer.resume or trainer.auto_resume):
            raise UserError(f"run directory {run_dir} already holds this run (last.pt) and trainer.auto_resume=false: "
                            "pass trainer.resume=true to continue it, or another hydra.run.dir to start it over "
                            "(trainer.force=true starts afresh only over another run)")
        checkpoint = safe_load(last, "checkpoint")
        finished = bool(checkpoint.get("run", {}).get("finished"))
        # a finished run too: its result is not the answer to a command naming another teacher file
        changed = resumed_teacher_change(checkpoint, teacher_file, finished) if teacher_file is not None else None
        if changed is not None:
            if not trainer.force:
                raise UserError(changed)
            log.warning("trainer.force=true: the run %s with another teacher file than %s; starting it over",
                        "finished" if finished else "started", teacher_file)
            _move_aside(run_dir, runtime)
            return None
        if finished:
            return "finished"
        _note_reported_changes(checkpoint.get("config") or {}, config, run_dir)
        return checkpoint
    if trainer.resume:
        raise UserError(f"trainer.resume=true but {run_dir} holds no last.pt to resume from; "
                        f"drop trainer.resume to start this run")
    return None


def write_config(run_dir: Path, config: dict[str, Any], runtime: Runtime) -> None:
    """The run starts here: record the resolved config of a fresh run, and this command's Hydra record
    (``.hydra/``) and log file (:mod:`distiller.config.run_record`); all ranks wait until they are on disk."""
    barrier()
    if runtime.is_main and not (run_dir / "config.yaml").exists():
        atomic_write(config, run_dir / "config.yaml", "yaml")
    run_record.write_held(run_dir, write_files=runtime.is_main)
    barrier()


def report_finished(run_dir: Path) -> None:
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
        top1 = metrics.get("final_top1")
    except (OSError, ValueError):
        top1 = None
    log.info("run in %s is already finished (final top-1 %s); nothing to do", run_dir, top1)
    print(f"already finished: {run_dir} (final top-1 {top1})")
