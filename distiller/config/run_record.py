"""Hydra's record of a run (``.hydra/`` and the job's log file), written only once the job takes its run directory.

Hydra writes ``<run dir>/.hydra/{config,hydra,overrides}.yaml`` and opens ``<run dir>/<job>.log`` before
the task function runs, so a command that the run directory then refuses (another run is there, or the
run is finished) would overwrite the record of the run that is there. The primary configs turn both off
(``hydra.output_subdir: null``; the log file opened only when first written); :func:`hold` keeps the
same record, and the log records, in memory when the task starts, and the job writes them
(:func:`write_held`) once it has taken the directory. A refused command writes nothing.

The run directory itself, until the job takes it: before Hydra makes it, :func:`check_run_dir` fails in
one line where it could not be created or written, and :func:`note_new_folders` notes which folders Hydra
is about to make; a job that stops before taking it removes them again (:func:`remove_untaken_run_dir`),
so a refused command leaves no empty folder behind.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.errors import UserError
from common.files import atomic_write

RECORD_DIR = ".hydra"  # where Hydra keeps it: the collector and users look there


class _Buffer(logging.Handler):
    """Keeps the records meant for the run's log file until the run directory is taken."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@dataclass
class _Held:
    files: dict[str, Any]  # file name in .hydra/ -> the config node Hydra would have saved there
    log_files: list[logging.FileHandler] = field(default_factory=list)  # detached from the root logger
    buffer: _Buffer = field(default_factory=_Buffer)


_held: _Held | None = None


def hold(task_cfg: Any) -> None:
    """At the start of a Hydra job: keep its ``.hydra/`` record and its log file's records in memory.

    The record is the job's config as Hydra hands it to the task (copied now: the job may change its
    own copy), Hydra's config and the command-line overrides, as Hydra would have saved them. Outside
    a Hydra job (a test calling a job function) there is nothing to hold.
    """
    global _held
    from hydra.core.hydra_config import HydraConfig

    release()
    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.instance().cfg
    files: dict[str, Any] = {}
    if hydra_cfg.hydra.output_subdir is None:  # else Hydra has written the record itself
        files = {"config.yaml": copy.deepcopy(task_cfg), "hydra.yaml": copy.deepcopy(hydra_cfg),
                 "overrides.yaml": copy.deepcopy(hydra_cfg.hydra.overrides.task)}
    output_dir = Path(hydra_cfg.hydra.runtime.output_dir).resolve()
    root = logging.getLogger()
    held = _Held(files)
    for handler in root.handlers[:]:
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).resolve().parent == output_dir:
            root.removeHandler(handler)
            held.log_files.append(handler)
    root.addHandler(held.buffer)
    _held = held


def write_held(run_dir: Path, write_files: bool = True) -> None:
    """The job has taken ``run_dir``: write the held ``.hydra/`` record there (``write_files``: this
    process writes the run's files) and send the held and all further log records to the log file."""
    global _held
    held, _held = _held, None
    if held is None:
        return
    if write_files:
        for name, node in held.files.items():
            atomic_write(node, run_dir / RECORD_DIR / name, "yaml")
    root = logging.getLogger()
    root.removeHandler(held.buffer)
    for handler in held.log_files:
        for record in held.buffer.records:
            if record.levelno >= handler.level:
                handler.handle(record)
        root.addHandler(handler)


def release() -> None:
    """At the end of a job: whatever is still held was refused; drop it (nothing reaches the run directory)."""
    global _held
    held, _held = _held, None
    if held is None:
        return
    logging.getLogger().removeHandler(held.buffer)
    for handler in held.log_files:
        handler.close()  # never opened (delayed), or opened before the job started: nothing is written


def check_run_dir(path: str | Path, key: str = "hydra.run.dir") -> None:
    """Fail now, in one line, where Hydra could not create the run directory or write into it (``key``: the
    setting that names it, ``hydra.run.dir`` or a sweep's ``hydra.sweep.dir``).

    An empty name is refused: Hydra would take the current folder and the run would write its checkpoints
    among the user's files. Permission bits do not tell (root passes them everywhere; ``/proc`` or a
    read-only mount only refuse when written), so the directory is really created and a file opened in it;
    whatever the check created is removed again, so it writes nothing either way.
    """
    if not str(path).strip():
        raise UserError(f"{key} is empty: give the folder the run writes to (e.g. {key}=runs/mine), or leave "
                        f"{key} out for the default")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{key}={path} is a file, not a directory; choose another {key}")
    existing = path if path.exists() else next(p for p in path.absolute().parents if p.exists())
    if not existing.is_dir():
        raise UserError(f"{key}={path} cannot be created: {existing} is a file; choose another {key}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{key}={path} cannot be created or written: {existing} is not writable; "
                        f"choose another {key}")
    created = [p for p in (path.absolute(), *path.absolute().parents) if not p.exists()]  # deepest first
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise UserError(f"{key}={path} cannot be created or written ({err.strerror or err}); "
                        f"choose another {key}") from None
    finally:
        for folder in created:
            with contextlib.suppress(OSError):
                folder.rmdir()


# the run directory of this command and those of its parents that did not exist before it (preflight)
_NEW_FOLDERS: list[Path] = []


def note_new_folders(run_dir: Path) -> None:
    """Before Hydra makes ``run_dir`` (the check before Hydra runs): it and the parents that do not exist yet,
    the run directory first."""
    new = []
    for folder in (run_dir.absolute(), *run_dir.absolute().parents):
        if folder.exists():
            break
        new.append(folder)
    _NEW_FOLDERS[:] = new


def remove_untaken_run_dir() -> None:
    """A job that stopped before it took its run directory leaves no empty folder: the one Hydra made
    for it goes, and the parents made for it: in a single run those this command made, in a sweep those
    below the sweep's folder that no other job uses (only an empty folder is removed)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    run_dir = Path(HydraConfig.get().runtime.output_dir).absolute()
    if in_multirun():  # the job's own folder, then its parents up to the sweep's folder, while they are empty
        sweep_dir = Path(str(HydraConfig.get().sweep.dir)).absolute()
        folders = [run_dir, *[p for p in run_dir.parents if sweep_dir in p.parents]]
    else:  # what preflight saw missing, if it is this run directory (not one that was there before)
        folders = _NEW_FOLDERS if _NEW_FOLDERS[:1] == [run_dir] else []
    for folder in folders:
        try:
            folder.rmdir()  # only an empty folder: anything the job wrote keeps it
        except OSError:
            return


def in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def forget_new_folders() -> None:
    """A new command line: no folder noted yet."""
    _NEW_FOLDERS.clear()
