"""Hydra's record of a run (``.hydra/`` and the job's log file), written only once the job takes its run directory.

Hydra writes ``<run dir>/.hydra/{config,hydra,overrides}.yaml`` and opens ``<run dir>/<job>.log`` before
the task function runs, so a command that the run directory then refuses (another run is there, or the
run is finished) would overwrite the record of the run that is there. The primary configs turn both off
(``hydra.output_subdir: null``; the log file opened only when first written); :func:`hold` keeps the
same record, and the log records, in memory when the task starts, and the job writes them
(:func:`write_held`) once it has taken the directory. A refused command writes nothing.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
