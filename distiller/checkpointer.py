"""What a run saves and restores: ``last.pt`` to continue exactly, ``best.pt``/``final.pt`` to use the network.

``last.pt`` holds everything the loop needs (student, method helpers such as CRD
banks, optimizer, :class:`RunState`, mid-epoch meter sums, RNG states); the slim
files hold what using the network needs, in the older frameworks' layout.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common.errors import UserError
from common.files import atomic_write
from distiller.runtime import barrier, rng_state, set_rng_state

CHECKPOINT_FORMAT = 1


@dataclass
class RunState:
    """Where a run stands; saved in every checkpoint (plain types only)."""

    phase: int = 0  # index into the phase plan (init phases first, main last)
    epoch: int = 0  # completed epochs of the current phase
    step: int = 0  # completed steps of the current, unfinished epoch
    global_step: int = 0
    best_top1: float = -1.0
    best_epoch: int = 0
    history: list = field(default_factory=list)  # one record per main-phase epoch
    init_history: list = field(default_factory=list)  # one record per initialisation epoch
    finished: bool = False


def slim_checkpoint(model: dict[str, torch.Tensor], arch: str, num_classes: int, epochs: int, top1: float | None,
                    config: dict[str, Any]) -> dict[str, Any]:
    """The layout of ``final.pt``/``best.pt`` (and stored teachers): the weights under ``model`` plus a header."""
    return {"model": model, "arch": arch, "num_classes": num_classes, "epoch": epochs, "accuracy": top1,
            "config": config}


def slim_from_last(last: dict[str, Any]) -> dict[str, Any]:
    """A finished run's ``final.pt``, rebuilt from its ``last.pt`` (for a run killed before it wrote one)."""
    history = last["run"]["history"]
    return slim_checkpoint(last["model"], last["arch"], last["num_classes"], len(history),
                           history[-1]["test_top1"] if history else None, last.get("config") or {})


class Checkpointer:
    """Writes (rank 0 only, atomically) and reads the checkpoints of one run directory."""

    def __init__(self, run_dir: Path, is_main: bool, student: nn.Module, objective: nn.Module,
                 student_arch: str, teacher_arch: str | None, num_classes: int, config: dict[str, Any]) -> None:
        self.run_dir, self.is_main = Path(run_dir), is_main
        self.student, self.objective = student, objective
        self.student_arch, self.teacher_arch = student_arch, teacher_arch
        self.num_classes, self.config = num_classes, config

    def save_last(self, state: RunState, optimizer: torch.optim.Optimizer,
                  meter_state: dict[str, torch.Tensor]) -> None:
        """Everything needed to continue; all ranks wait until it is on disk."""
        if self.is_main:
            atomic_write({
                "format": CHECKPOINT_FORMAT, "arch": self.student_arch, "num_classes": self.num_classes,
                "teacher_arch": self.teacher_arch, "model": self.student.state_dict(),
                "objective": self.objective.state_dict(), "optimizer": optimizer.state_dict(),
                "run": asdict(state), "accumulators": meter_state, "rng": rng_state(), "config": self.config,
            }, self.run_dir / "last.pt")
        barrier()

    def slim(self, epochs: int, top1: float | None) -> dict[str, Any]:
        """What a user of the trained network needs (loads like the older frameworks' files)."""
        return slim_checkpoint(self.student.state_dict(), self.student_arch, self.num_classes, epochs, top1,
                               self.config)

    def save_best(self, epochs: int, top1: float) -> None:
        if self.is_main:
            atomic_write(self.slim(epochs, top1), self.run_dir / "best.pt")

    def restore(self, checkpoint: dict, device: torch.device) -> tuple[RunState, dict | None, dict[str, torch.Tensor]]:
        """Load a ``last.pt``: weights, helpers, RNG. Returns (run state, optimizer state, meter sums)."""
        if checkpoint.get("format") != CHECKPOINT_FORMAT or "run" not in checkpoint:
            raise UserError("last.pt was not written by this version of the trainer; "
                            "start afresh with trainer.resume=false trainer.force=true")
        self.student.load_state_dict(checkpoint["model"])
        self.objective.load_state_dict(checkpoint["objective"])
        set_rng_state(checkpoint["rng"])
        meter = {k: v.to(device) for k, v in checkpoint.get("accumulators", {}).items()}
        return RunState(**checkpoint["run"]), checkpoint.get("optimizer"), meter
