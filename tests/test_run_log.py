"""What a run records: every loss term per step (``train/loss_<term>``) and per epoch (``epoch/loss_<term>``)."""
from __future__ import annotations

import json
from pathlib import Path

from helpers import tiny_trainer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def test_every_term_is_logged_per_step_and_per_epoch(tmp_path: Path) -> None:
    trainer = tiny_trainer(tmp_path, {"name": "kd", "gamma": 0.1, "alpha": 0.9, "temperature": 4.0}, 1,
                           "trainer.log_interval=1")
    state = trainer.fit()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/acc", "train/lr", "train/loss_ce", "train/loss_kd"} <= tags
    assert {"epoch/train_loss", "epoch/loss_ce", "epoch/loss_kd", "epoch/test_top1", "epoch/test_top5"} <= tags
    steps = len(trainer.train_loader)
    assert len(events.Scalars("train/loss_kd")) == steps  # log_interval 1: one point per step
    record = state.history[-1]
    # the epoch's total is the weighted sum of its terms' means (the same samples, the same weights)
    assert abs(record["train_loss"] - (0.1 * record["loss_ce"] + 0.9 * record["loss_kd"])) < 1e-5
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["epochs"][0]["loss_kd"] == record["loss_kd"]
