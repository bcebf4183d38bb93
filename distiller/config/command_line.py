"""Entry-point plumbing: one-line errors instead of tracebacks, for the Hydra jobs, their sweeps and the scripts.

Hydra prints a traceback for any exception escaping the task function and a
multi-line report for a bad override. Users get one line on stderr and a non-zero
exit instead; ``HYDRA_FULL_ERROR=1`` (or ``KD_DEBUG=1``) shows the full traceback. The jobs of a sweep
that stop on a user error are reported in one line when the sweep ends (:class:`SweepReport`). The check
before Hydra runs lives in :mod:`distiller.config.preflight`.
Importing it also fills Hydra's ConfigStore and registers the resolvers (:mod:`distiller.config.compose`).
"""
from __future__ import annotations

import argparse
import difflib
import functools
import json
import logging
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, NoReturn, Sequence

from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import CompactHydraException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from common.errors import UserError
from common.files import atomic_write
from datasets import DATASETS
from distiller.config import run_record
from distiller.config.compose import CONFIG_DIR
from distiller.config.key_advice import unknown_key_message
from distiller.config.store import group_options
from distiller.config.validation import describe_error
from distiller.methods import METHODS
from models import MODELS

EXIT_USER_ERROR = 2


class SweepJobError(CompactHydraException):
    """A job of a sweep stopped on a user error: :class:`SweepReport` (or Hydra) reports it when the sweep ends."""


class SweepReport(Callback):
    """The user errors of a sweep's jobs, in one line at its end (status 2), instead of Hydra's four-line report.

    A job that stops on a user error does not stop the sweep: the others run, and the sweep ends with
    ``error: 1 of 4 jobs of the sweep failed (#0 distill=kd): <why>``, naming each failed job by its
    number and the swept values that differ between jobs. Each job, in whatever process its launcher
    runs it (this one, ``local_gpus``' workers, a SLURM node), leaves a small record in a hidden folder
    of the sweep directory; the launching process reads them when the sweep ends and removes the
    folder. Other exceptions (bugs) keep Hydra's report.
    """

    def __init__(self) -> None:
        self._records: Path | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # set before the launcher hands this callback to its jobs (pickled for worker processes)
        sweep_dir = Path(str(config.hydra.sweep.dir))
        self._records = sweep_dir / f".job_reports-{os.getpid()}-{time.time_ns()}"
        for stale in sweep_dir.glob(".job_reports-*"):  # left by a sweep that stopped on a bug or was killed
            if not _process_alive(stale.name.split("-")[1]):
                shutil.rmtree(stale, ignore_errors=True)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if self._records is None:  # a single run
            return
        error = job_return._return_value
        failed = job_return.status is JobStatus.FAILED and isinstance(error, SweepJobError)
        record = {"overrides": list(job_return.overrides or []),
                  "error": str(error).removeprefix("error: ") if failed else None}
        self._records.mkdir(parents=True, exist_ok=True)
        atomic_write(record, self._records / f"{int(config.hydra.job.num)}.json", fmt="json")
        if failed:  # reported when the sweep ends, so Hydra does not stop at it
            job_return.status, job_return.return_value = JobStatus.COMPLETED, None

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self._records is None or not self._records.is_dir():
            return
        records = {int(f.stem): json.loads(f.read_text()) for f in self._records.glob("*.json")}
        shutil.rmtree(self._records, ignore_errors=True)
        failed = {n: r["error"] for n, r in sorted(records.items()) if r["error"]}
        if not failed:
            return
        label = _swept_values({n: r["overrides"] for n, r in records.items()})
        reasons: dict[str, list[int]] = {}
        for number, reason in failed.items():
            reasons.setdefault(reason, []).append(number)
        parts = [f"({', '.join(f'#{n} {label[n]}'.strip() for n in numbers)}): {reason}"
                 for reason, numbers in reasons.items()]
        done = len(records) - len(failed)
        after = (f"the other {done} finished, and the same command again runs only the jobs that did not" if done
                 else "the same command again reruns them")
        fail(f"{len(failed)} of {len(records)} jobs of the sweep failed {'; '.join(parts)}; {after}")


def _process_alive(pid: str) -> bool:
    """Whether process ``pid`` (of this machine) still runs; a name that is not a pid counts as running."""
    try:
        os.kill(int(pid), 0)
    except ValueError:
        return True
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _swept_values(jobs: dict[int, list[str]]) -> dict[int, str]:
    """Each job's overrides whose values differ between the jobs (``distill=kd seed=1``): what names it."""
    settings = {n: dict(o.split("=", 1) if "=" in o else (o, "") for o in overrides) for n, overrides in jobs.items()}
    keys = {k for values in settings.values() for k in values}
    swept = [k for k in sorted(keys) if len({values.get(k) for values in settings.values()}) > 1]
    return {n: " ".join(f"{k}={values[k]}" for k in swept if k in values) for n, values in settings.items()}


def debug_mode() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1" or os.environ.get("KD_DEBUG") == "1"


def fail(message: str) -> None:
    """Print one line on stderr and exit with the user-error status."""
    line = " ".join(str(message).split())
    sys.stderr.write(f"error: {line}\n")
    sys.stderr.flush()
    sys.exit(EXIT_USER_ERROR)


class OneLineParser(argparse.ArgumentParser):
    """argparse for the scripts: a mistake is one line and status 2, and the Hydra overrides a script takes
    (an ``overrides`` positional) may stand anywhere among its options (``evaluate.py F --json trainer.device=cpu``)."""

    def error(self, message: str) -> NoReturn:
        fail(f"{message} (see --help)")

    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:  # type: ignore[override]
        parsed, extra = self.parse_known_args(args, namespace)
        if any(a.startswith("-") for a in extra) or (extra and not hasattr(parsed, "overrides")):
            self.error(f"unrecognized arguments: {' '.join(extra)}")
        if extra:
            parsed.overrides = [*parsed.overrides, *extra]
        return parsed


def _bounded_number(convert: Callable[[str], Any], kind: str, ok: Callable[[Any], bool],
                    outside: str) -> Callable[[str], Any]:
    """An argparse ``type``: ``convert(text)``, refused as not ``kind`` or, where ``ok`` fails, as ``outside``."""
    def number(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {kind}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{text.strip()} is {outside}")
        return value
    return number


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type``: a whole number of at least ``minimum`` (else the parser's one line)."""
    return _bounded_number(int, "a whole number", lambda value: value >= minimum, f"less than {minimum}")


def more_than(minimum: float) -> Callable[[str], float]:
    """An argparse ``type``: a number greater than ``minimum`` (NaN is not; else the parser's one line)."""
    return _bounded_number(float, "a number", lambda value: value > minimum, f"not greater than {minimum:g}")


def zoo_model(text: str) -> str:
    """An argparse ``type``: a network of the zoo, spelled as registered (names are case-insensitive)."""
    if text in MODELS:
        return MODELS.canonical(text)
    raise argparse.ArgumentTypeError(MODELS.unknown_message(text))


def report_user_errors(task: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a Hydra task function so :class:`UserError` ends the process with one line.

    The job's ``.hydra/`` record and log file are held until the job takes its run directory
    (:mod:`distiller.config.run_record`): a command the directory refuses writes nothing there, and
    one that stops before taking it removes the empty folder Hydra made for it.
    """

    @functools.wraps(task)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        run_record.hold(args[0] if args else kwargs.get("cfg"))
        try:
            return task(*args, **kwargs)
        except UserError as err:
            if debug_mode():
                raise
            logging.getLogger("distiller").error("%s", err)
            run_record.release()
            run_record.remove_untaken_run_dir()
            if run_record.in_multirun():  # this job fails, the sweep goes on; Hydra reports it in one line when it ends
                raise SweepJobError(f"error: {' '.join(str(err).split())}") from None
            fail(str(err))
        except KeyboardInterrupt:
            fail("interrupted; the last checkpoint is intact, rerun the same command to resume")
        finally:
            run_record.release()

    return wrapper


def _group_options(group: str) -> list[str]:
    """Options of a config group: its YAML files and its ConfigStore nodes (the model groups)."""
    folder = CONFIG_DIR / group
    files = sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []
    return files + [name for name in group_options(group) if name not in files]


def explain_config_error(err: BaseException, config_name: str | None = None, overrides: list[str] = ()) -> str:
    """Turn a Hydra / OmegaConf composition error into one helpful line.

    ``config_name`` and ``overrides``: what was composed; with them, a key that does not exist gets
    advice for the config at hand (:func:`distiller.config.key_advice.unknown_key_message`).
    """
    if isinstance(err, UserError):
        return str(err)
    text = str(err)
    missing = re.search(r"Could not find '([^']+)/([^']+)'", text)
    if missing:
        group, option = missing.groups()
        group = group.split("@")[0].lstrip("/")
        options = _group_options(group)
        registry = {"dataset": DATASETS, "distill": METHODS}.get(group)
        if registry is not None and option in registry and registry.canonical(option) == option:
            return (f"{group}={option} is registered ({registry.kind} '{option}') but has no "
                    f"configs/{group}/{option}.yaml, which makes it a choice of {group}=: add that file with its keys "
                    f"(see configs/{group}/ for examples; README: Adding a data set, docs/extending.md)")
        close = difflib.get_close_matches(option, options, n=1, cutoff=0.5)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        return f"unknown {group} '{option}'.{hint} Valid {group} options: {', '.join(options)}"
    override = re.search(r"Could not override '([^']+)'", text)
    if override:
        key = override.group(1)
        return unknown_key_message(config_name, list(overrides), key)
    several = re.search(r"Ambiguous value for argument '([^=']+)=([^']*)'", text)
    if several:  # a comma without -m: Hydra's own report is four lines
        key, value = several.groups()
        if _group_options(key):
            return f"{key}={value} names several {key} choices: add -m to run one job each"
        return (f"{key}={value} gives {key} several values: add -m to sweep over them, write {key}=[{value}] "
                f"for a list, or {key}='{value}' (quoted) for one text value")
    append = re.search(r"Could not append to config\. An item is already at '([^']+)'", text)
    if append:
        return f"config key '{append.group(1)}' already exists; set it without the leading '+'"
    cause = err if isinstance(err, OmegaConfBaseException) else err.__cause__
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
        return describe_error(cause)  # a value of the wrong type for a typed node (teacher.lr=abc)
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(err).__name__)
    return f"invalid configuration: {first}"
