"""The GPU check's rows (one line of its table each), its shared time budget, and the guard that turns one
failing item into a row so the other items still run."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import time
import traceback
from pathlib import Path
from typing import Any, Callable

FAILED, SKIPPED, OK = "failed", "skipped", "ok"


@dataclasses.dataclass
class Row:
    """One line of the table; the JSON file holds the same fields plus ``extra``."""

    step: str
    config: str
    status: str = OK
    images_per_sec: float | None = None
    ms_per_step: float | None = None
    mfu: float | None = None
    peak_memory_bytes: int | None = None
    speedup: float | None = None
    accuracy: str | None = None
    detail: str = ""
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


def one_line(text: str, limit: int = 300) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


class Budget:
    """The steps' shared time budget: work that would start after it is reported as skipped."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def timeout(self) -> float:
        """What is left, as a subprocess timeout (at least a second, at most a day)."""
        return min(max(1.0, self.left()), 86400.0)

    def spent(self) -> bool:
        return self.left() <= 0


def guarded(step: str, config: str, rows: list[Row], budget: Budget, fn: Callable[[], list[Row] | Row]) -> None:
    """Run one item of a step; a failure (or the spent budget) becomes a row and the check goes on."""
    if budget.spent():
        rows.append(Row(step, config, SKIPPED, detail="time budget spent"))
        return
    try:
        out = fn()
    except Exception as err:  # noqa: BLE001 - one failing item is reported, the others still run
        rows.append(Row(step, config, FAILED, detail=one_line(f"{type(err).__name__}: {err}")))
        if os.environ.get("KD_DEBUG"):
            traceback.print_exc()
        return
    rows.extend(out if isinstance(out, list) else [out])


def run_subprocess(cmd: list[str], timeout: float, cwd: Path, env: dict[str, str] | None = None,
                   ) -> subprocess.CompletedProcess:
    """Run ``cmd``; a non-zero status raises with the last lines of its output (one row's detail)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    result = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"exit {result.returncode}: {' | '.join(tail)}")
    return result
