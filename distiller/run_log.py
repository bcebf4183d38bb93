"""What a run leaves behind for people: curves (TensorBoard, W&B: :mod:`distiller.loggers`), ``metrics.json``.

Only the main process (rank 0) writes; other ranks get a logger that does nothing.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from common.files import atomic_write
from distiller.config import logger_settings
from distiller.loggers import make_backends

log = logging.getLogger("distiller")


class RunLogger:
    """Curves for the ``logger`` backends and the run's ``metrics.json`` (pinned keys: final_top1, best_top1,
    final_top5, epochs).

    ``config``: the resolved config of the run; its ``logger`` node chooses the backends
    (absent: TensorBoard), and backends that record configs (W&B) get all of it.
    """

    def __init__(self, run_dir: Path, enabled: bool, header: dict[str, Any],
                 config: dict[str, Any] | None = None) -> None:
        self.run_dir = run_dir
        self.enabled = enabled
        self.header = header
        self._status = "running"
        settings = logger_settings((config or {}).get("logger"))
        self.backends = make_backends(run_dir, settings, config or {}) if enabled else []

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
