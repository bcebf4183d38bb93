"""The plain settings of the training loop, resolved from config by the entry point.

Its own module so that the phase plan, the optimizers and the engine all read it
without importing each other.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class TrainSettings:
    """Plain settings of the loop, resolved from config by the entry point."""

    epochs: int
    lr: float
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    optimizer_impl: str = "auto"
    milestones: tuple[int, ...] = (150, 180, 210)
    lr_decay: float = 0.1
    batch_size: int = 64
    eval_batch_size: int = 1024
    seed: int = 0
    log_interval: int = 50
    checkpoint_every_steps: int = 0
    nonfinite_check: str = "loss"
    progress: bool = True
    find_unused_parameters: bool = False
    optimizer: str = "sgd"  # a name in OPTIMIZERS (config: optim.name)
    optimizer_options: dict[str, Any] = field(default_factory=dict)  # its own keys (e.g. DOT's delta)
