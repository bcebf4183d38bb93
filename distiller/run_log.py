"""What a run leaves behind for people: TensorBoard curves, ``metrics.json``, log lines.

Only the main process (rank 0) writes; other ranks get a logger that does nothing.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from common.files import atomic_write

log = logging.getLogger("distiller")


class RunLogger:
    """TensorBoard scalars and the run's ``metrics.json`` (pinned keys: final_top1, best_top1, final_top5, epochs)."""

    def __init__(self, run_dir: Path, enabled: bool, header: dict[str, Any]) -> None:
        self.run_dir = run_dir
        self.enabled = enabled
        self.header = header
        self._writer = None

    @property
    def writer(self):  # created lazily: importing tensorboard costs start-up time
        if self._writer is None and self.enabled:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
        return self._writer

    def scalars(self, values: dict[str, float], step: int, prefix: str) -> None:
        if not self.enabled:
            return
        for name, value in values.items():
            self.writer.add_scalar(f"{prefix}/{name}", value, step)

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

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
