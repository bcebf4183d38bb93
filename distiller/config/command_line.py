"""Entry-point plumbing: one-line errors instead of tracebacks, and a config check before Hydra runs.

Hydra prints a traceback for any exception escaping the task function and a
multi-line report for a bad override. Users get one line on stderr and a non-zero
exit instead; ``HYDRA_FULL_ERROR=1`` (or ``KD_DEBUG=1``) shows the full traceback.
Importing it also fills Hydra's ConfigStore and registers the resolvers (:mod:`distiller.config.compose`).
"""
from __future__ import annotations

import contextlib
import difflib
import functools
import logging
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

from omegaconf.errors import OmegaConfBaseException

from common.errors import UserError
from distiller.config import run_record
from distiller.config.compose import CONFIG_DIR, compose
from distiller.config.messages import describe_error
from distiller.config.schema import SCHEMAS
from distiller.config.store import group_options
from distiller.config.validation import validate
from models import MODELS

EXIT_USER_ERROR = 2




def debug_mode() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1" or os.environ.get("KD_DEBUG") == "1"


def fail(message: str) -> None:
    """Print one line on stderr and exit with the user-error status."""
    line = " ".join(str(message).split())
    sys.stderr.write(f"error: {line}\n")
    sys.stderr.flush()
    sys.exit(EXIT_USER_ERROR)


def report_user_errors(task: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a Hydra task function so :class:`UserError` ends the process with one line.

    The job's ``.hydra/`` record and log file are held until the job takes its run directory
    (:mod:`distiller.config.run_record`): a command the directory refuses writes nothing there.
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
            if _in_multirun():
                raise  # this job fails, the sweep goes on; Hydra reports the failure when the sweep ends
            fail(str(err))
        except KeyboardInterrupt:
            fail("interrupted; the last checkpoint is intact, rerun the same command to resume")
        finally:
            run_record.release()

    return wrapper


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _group_options(group: str) -> list[str]:
    """Options of a config group: its YAML files and its ConfigStore nodes (the model groups)."""
    folder = CONFIG_DIR / group
    files = sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []
    return files + [name for name in group_options(group) if name not in files]


def explain_config_error(err: BaseException) -> str:
    """Turn a Hydra / OmegaConf composition error into one helpful line."""
    if isinstance(err, UserError):
        return str(err)
    text = str(err)
    missing = re.search(r"Could not find '([^']+)/([^']+)'", text)
    if missing:
        group, option = missing.groups()
        group = group.split("@")[0].lstrip("/")
        options = _group_options(group)
        close = difflib.get_close_matches(option, options, n=1, cutoff=0.5)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        return f"unknown {group} '{option}'.{hint} Valid {group} options: {', '.join(options)}"
    override = re.search(r"Could not override '([^']+)'", text)
    if override:
        key = override.group(1)
        return (f"config key '{key}' does not exist; check the spelling "
                f"(or add a new key with +{key}=VALUE if you really mean to)")
    append = re.search(r"Could not append to config\. An item is already at '([^']+)'", text)
    if append:
        return f"config key '{append.group(1)}' already exists; set it without the leading '+'"
    cause = err if isinstance(err, OmegaConfBaseException) else err.__cause__
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
        return describe_error(cause)  # a value of the wrong type for a typed node (teacher.lr=abc)
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(err).__name__)
    return f"invalid configuration: {first}"


def canonical_model_choices(argv: list[str]) -> list[str]:
    """``model=``, ``teacher=`` and ``student=`` choices spelled as registered (names are case-insensitive)."""
    out = []
    for arg in argv:
        choice = re.fullmatch(r"(model|teacher|student)=(.+)", arg)
        if choice:
            names = [MODELS.canonical(n) if n in MODELS else n for n in choice.group(2).split(",")]
            arg = f"{choice.group(1)}={','.join(names)}"
        out.append(arg)
    return out


def check_run_dir(path: Path) -> None:
    """Fail now, in one line, where Hydra could not create the run directory or write into it.

    Permission bits do not tell (root passes them everywhere; ``/proc`` or a read-only mount only
    refuse when written), so the directory is really created and a file opened in it; whatever
    the check created is removed again, so it writes nothing either way.
    """
    if path.exists() and not path.is_dir():
        raise UserError(f"hydra.run.dir={path} is a file, not a directory; choose another hydra.run.dir")
    existing = path if path.exists() else next(p for p in path.absolute().parents if p.exists())
    if not existing.is_dir():
        raise UserError(f"hydra.run.dir={path} cannot be created: {existing} is a file; choose another hydra.run.dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"hydra.run.dir={path} cannot be created or written: {existing} is not writable; "
                        f"choose another hydra.run.dir")
    created = [p for p in (path.absolute(), *path.absolute().parents) if not p.exists()]  # deepest first
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise UserError(f"hydra.run.dir={path} cannot be created or written ({err.strerror or err}); "
                        f"choose another hydra.run.dir") from None
    finally:
        for folder in created:
            with contextlib.suppress(OSError):
                folder.rmdir()


def preflight(config_name: str, argv: list[str]) -> None:
    """Compose and validate the config once with the command-line overrides; a mistake ends here in one line.

    Architecture names on the command line are first rewritten as registered (``sys.argv`` too,
    for Hydra). Multirun sweeps and Hydra's own flags are left to Hydra (each job validates its config).
    """
    canonical = canonical_model_choices(argv)
    if canonical != argv and sys.argv[1:] == argv:
        sys.argv[1:] = canonical
    argv = canonical
    if debug_mode() or any(a in ("-m", "--multirun") or a.startswith("--") or a.startswith("-") for a in argv):
        return
    try:
        cfg = compose(config_name, [a for a in argv if "=" in a], return_hydra_config=True)
        validate(cfg, config_name if config_name in SCHEMAS else None)
        check_run_dir(Path(str(cfg.hydra.run.dir)))
    except Exception as err:  # noqa: BLE001 - every composition failure is a user error here
        fail(explain_config_error(err))
