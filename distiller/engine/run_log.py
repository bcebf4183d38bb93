"""What a run leaves behind for people: ``metrics.json`` and the curves of the ``logger`` backends.

:class:`RunLogger` rewrites ``metrics.json`` (pinned keys: final_top1, best_top1, final_top5, epochs)
and hands scalars to the backends. Only the main process (rank 0) writes; other ranks get a logger
that does nothing.

The backends (``logger=tensorboard|wandb|none``, configs/logger/) all receive the same things: the
scalars the trainer logs (``train/<term>`` each log interval at the global step, ``epoch/<metric>``
each epoch, ``init/<phase>/...`` for initialisation phases), the resolved config once, and the run's
summary (the scalar keys of ``metrics.json``). They are a registry, so adding one is a class here and
a file in ``configs/logger/``; the heavy packages are imported only when their backend is chosen.
"""
from __future__ import annotations

import importlib
import logging
import os
import secrets
import sys
from pathlib import Path
from typing import Any

from common.errors import UserError
from common.files import atomic_write
from common.registry import Registry

log = logging.getLogger("distiller")


class RunLogger:
    """Curves for the ``logger`` backends and the run's ``metrics.json`` (pinned keys: final_top1, best_top1,
    final_top5, epochs).

    ``settings``: the run's ``logger`` node (typed, defaults filled in: which backends, and their
    keys); None writes ``metrics.json`` alone. ``config``: the resolved config of the run, for the
    backends that record it (W&B).
    """

    def __init__(self, run_dir: Path, enabled: bool, header: dict[str, Any],
                 config: dict[str, Any] | None = None, settings: Any = None) -> None:
        self.run_dir = run_dir
        self.enabled = enabled
        self.header = header
        self._status = "running"
        self.backends = make_backends(run_dir, settings, config or {}) if enabled and settings is not None else []

    def scalars(self, values: dict[str, float], step: int, prefix: str) -> None:
        for backend in self.backends:
            backend.scalars(values, step, prefix)

    def metrics(self, state: dict[str, Any], status: str, extra: dict[str, Any] | None = None) -> None:
        """Rewrite ``metrics.json`` from the run state (atomic)."""
        if not self.enabled:
            return
        history = state["history"]
        last = history[-1] if history else {}
        data = {
            **self.header,
            "status": status,
            "final_top1": last.get("test_top1"),
            "final_top5": last.get("test_top5"),
            "best_top1": state["best_top1"] if history else None,
            "best_epoch": state["best_epoch"] if history else None,
            "completed_epochs": len(history),
            "epochs": history,
            "init_epochs": state["init_history"],
            **(extra or {}),
        }
        atomic_write(data, self.run_dir / "metrics.json", "json")
        self._status = status
        for backend in self.backends:
            backend.summary(data)

    def flush(self) -> None:
        for backend in self.backends:
            backend.flush()

    def close(self) -> None:
        """End every backend's run; a run that failed or is being interrupted (called from the trainer's
        ``finally``, with an exception on its way out) is marked failed where the backend knows the notion."""
        failed = self._status == "failed" or sys.exc_info()[0] is not None
        for backend in self.backends:
            backend.close(failed=failed)


log = logging.getLogger("distiller")

# W&B's own variable decides the mode when logger.mode is null; offline otherwise, so that no run
# sends anything anywhere unless the user asks for it
WANDB_MODE_ENV = "WANDB_MODE"
DEFAULT_WANDB_MODE = "offline"


class Backend:
    """One destination of a run's scalars, config and summary (rank 0 only)."""

    def __init__(self, run_dir: Path, settings: Any, config: dict[str, Any]) -> None:
        self.run_dir, self.settings, self.config = Path(run_dir), settings, config

    def scalars(self, values: dict[str, float], step: int, prefix: str) -> None:
        """Log ``{prefix}/{name}`` = value at ``step`` (the global step, or the epoch)."""

    def summary(self, values: dict[str, Any]) -> None:
        """The run's current summary (called after every epoch and at the end)."""

    def flush(self) -> None:
        pass

    def close(self, failed: bool) -> None:
        pass


BACKENDS: Registry[type[Backend]] = Registry("logger backend")


@BACKENDS.register("tensorboard")
class TensorBoardBackend(Backend):
    """Event files in ``<run dir>/tensorboard`` (the config is in ``config.yaml`` beside them)."""

    def __init__(self, run_dir: Path, settings: Any, config: dict[str, Any]) -> None:
        super().__init__(run_dir, settings, config)
        self._writer = None

    @property
    def writer(self):  # created lazily: importing tensorboard costs start-up time
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
        return self._writer

    def scalars(self, values: dict[str, float], step: int, prefix: str) -> None:
        for name, value in values.items():
            self.writer.add_scalar(f"{prefix}/{name}", value, step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self, failed: bool) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def import_wandb() -> Any:
    """The ``wandb`` module, or a one-line error naming the package when it is not installed."""
    try:
        return importlib.import_module("wandb")
    except ImportError:
        raise UserError("logger=wandb needs the wandb package, which is not installed: pip install wandb "
                        "(or choose logger=tensorboard)") from None


# the modes W&B's own settings accept (logger.mode offers the first three)
WANDB_MODES = ("online", "offline", "disabled", "dryrun", "run", "shared")


def wandb_mode(settings: Any) -> str:
    """``logger.mode`` when set; else ``WANDB_MODE`` from the environment (one W&B accepts); else offline."""
    if settings.mode:
        return str(settings.mode)
    env = os.environ.get(WANDB_MODE_ENV, "").strip()
    if env and env not in WANDB_MODES:
        raise UserError(f"{WANDB_MODE_ENV}={env} is not a Weights & Biases mode: set it to online, offline or "
                        "disabled, or unset it, or pass logger.mode=online|offline|disabled")
    return env or DEFAULT_WANDB_MODE


@BACKENDS.register("wandb", options=("project", "entity", "name", "group", "tags", "mode"))
class WandbBackend(Backend):
    """A Weights & Biases run in ``<run dir>/wandb`` (offline unless asked; ``wandb sync`` uploads it later).

    Each prefix gets its own step axis (``train/step``, ``epoch/step``, ...): W&B's own step must
    only grow, while the trainer logs per-step and per-epoch curves on different axes. A resumed
    run continues the same W&B run (its id is kept in ``<run dir>/wandb/run_id``).
    """

    def __init__(self, run_dir: Path, settings: Any, config: dict[str, Any]) -> None:
        super().__init__(run_dir, settings, config)
        self._wandb = import_wandb()  # now: a missing package fails before the run starts
        wandb_mode(settings)  # and so does a WANDB_MODE that W&B would refuse
        self._run = None
        self._axes: set[str] = set()

    @property
    def run(self) -> Any:
        """The W&B run, started at the first scalar (a run that fails while being built leaves no W&B files)."""
        if self._run is None:
            folder = Path(os.environ.get("WANDB_DIR") or self.run_dir)
            id_file = self.run_dir / "wandb" / "run_id"
            run_id = id_file.read_text().strip() if id_file.is_file() else None
            if run_id is None:
                run_id = secrets.token_hex(4)  # W&B's id alphabet: lower-case letters and digits
                id_file.parent.mkdir(parents=True, exist_ok=True)
                id_file.write_text(run_id + "\n")
            mode, settings = wandb_mode(self.settings), self.settings
            try:
                self._run = self._wandb.init(
                    project=settings.project, entity=settings.entity, name=settings.name or self._default_name(),
                    group=settings.group, tags=list(settings.tags or []) or None, config=self.config, dir=str(folder),
                    mode=mode, id=run_id, resume="allow", reinit="finish_previous")
            except Exception as err:  # noqa: BLE001 - W&B raises many types (login, network, settings)
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise UserError(f"Weights & Biases could not start a {mode} run ({first}); run `wandb login` "
                                f"for logger.mode=online, or use logger.mode=offline") from None
            log.info("Weights & Biases run %s (%s) in %s", run_id, mode, folder / "wandb")
        return self._run

    def _default_name(self) -> str:
        """The run directory below ``runs/`` (e.g. ``student/resnet32x4-resnet8x4/kd/seed0``)."""
        parts = self.run_dir.resolve().parts
        return "/".join(parts[parts.index("runs") + 1:]) if "runs" in parts[:-1] else self.run_dir.name

    def scalars(self, values: dict[str, float], step: int, prefix: str) -> None:
        axis = f"{prefix}/step"
        if prefix not in self._axes:
            self.run.define_metric(axis)
            self.run.define_metric(f"{prefix}/*", step_metric=axis)
            self._axes.add(prefix)
        self.run.log({axis: step, **{f"{prefix}/{name}": value for name, value in values.items()}})

    def summary(self, values: dict[str, Any]) -> None:
        self.run.summary.update({k: v for k, v in values.items()
                                 if v is None or isinstance(v, (bool, int, float, str))})

    def close(self, failed: bool) -> None:
        if self._run is not None:
            self._run.finish(exit_code=1 if failed else 0)
            self._run = None


def make_backends(run_dir: Path, settings: Any, config: dict[str, Any]) -> list[Backend]:
    """The backends ``settings`` names: the run's typed ``logger`` node (backends and their keys)."""
    return [BACKENDS.get(name)(run_dir, settings, config) for name in dict.fromkeys(settings.backends)]
