"""``logger=wandb``: an offline Weights & Biases run with the same curves TensorBoard gets, the config, the summary.

The run's ``.wandb`` file is read back here with a reader written from the file format (W&B's
records, protobuf, in LevelDB-log framing: 32 KiB blocks, each record chunk a 7-byte header of
crc32, little-endian length and chunk type) rather than through W&B's own reader, and compared
with the TensorBoard events of the same run and with ``metrics.json``. No network: the mode is
offline and the files stay in the run directory.
"""
from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest
from helpers import random_splits, tiny_trainer

from common.errors import UserError
from distiller.config.schema import LoggerConfig
from distiller.config.validation import load_job, validate
from distiller.engine.run_log import DEFAULT_WANDB_MODE, make_backends, wandb_mode

wandb = pytest.importorskip("wandb")
pb = pytest.importorskip("wandb.proto.wandb_internal_pb2")

BLOCK, HEADER = 32768, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> list:
    """Every record of a ``.wandb`` file, parsed as W&B's ``Record`` protobuf."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a W&B run file"
    records, chunk, pos = [], b"", HEADER  # the file header: ':W&B', magic 0xBEE1, version
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if kind == 0 and length == 0:  # zero padding at the end of a block
            pos += left
            continue
        chunk += data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(chunk)
            records.append(record)
            chunk = b""
    return records


def items(updates) -> dict:
    return {u.key or "/".join(u.nested_key): json.loads(u.value_json) for u in updates}


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))  # nothing in the user's home
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def test_an_offline_run_logs_what_tensorboard_logs_plus_config_and_summary(tmp_path, offline):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = tiny_trainer(tmp_path, {"name": "kd", "gamma": 0.1, "alpha": 0.9, "temperature": 4.0}, 2,
                           "logger=wandb", "logger.project=kd-test", "logger.tags=[t]", "trainer.log_interval=1",
                           data=random_splits(48, 10, 7, test_n=16))
    config = trainer.checkpointer.config  # the run's resolved config, as a run records it
    assert config["logger"]["project"] == "kd-test" and "wandb" in config["logger"]["backends"]
    trainer.fit()
    wandb.teardown()  # W&B's service process writes the run file asynchronously: stop it, so the file is complete

    files = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, "one offline run, in the run directory"
    records = read_records(files[0])
    history = [items(r.history.item) for r in records if r.WhichOneof("record_type") == "history"]
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    summary: dict = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            summary.update({k: v for k, v in items(r.summary.update).items() if k})

    # the same curves: every TensorBoard tag at every step, with the value TensorBoard holds (float32)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss_ce", "train/loss_kd", "epoch/loss_kd", "epoch/test_top1"} <= tags
    logged = {k for row in history for k in row if not k.startswith("_") and not k.endswith("/step")}
    assert logged == tags
    for tag in tags:
        prefix = tag.rsplit("/", 1)[0]
        ours = {row[f"{prefix}/step"]: row[tag] for row in history if tag in row}
        theirs = {e.step: e.value for e in events.Scalars(tag)}
        assert set(ours) == set(theirs), tag
        for step, value in theirs.items():  # TensorBoard keeps float32: equal after rounding to float32
            assert struct.unpack("f", struct.pack("f", ours[step]))[0] == value, (tag, step)
    # the resolved config, and the summary equal to metrics.json's scalars
    logged_config = {k: v for k, v in items(run.config.update).items() if k != "_wandb"}
    assert logged_config == config
    assert (run.project, list(run.tags)) == ("kd-test", ["t"])
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("final_top1", "final_top5", "best_top1", "best_epoch", "status", "kind"):
        assert summary[key] == metrics[key], key
    assert summary["status"] == "finished"
    assert (tmp_path / "wandb" / "run_id").read_text().strip() == files[0].stem.removeprefix("run-")


def test_a_missing_package_is_one_line_naming_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now raises ImportError
    with pytest.raises(UserError) as err:
        make_backends(tmp_path, LoggerConfig(backends=["tensorboard", "wandb"]), {})
    assert "\n" not in str(err.value) and "pip install wandb" in str(err.value)
    assert not list(tmp_path.iterdir())  # nothing written


def test_the_mode_is_offline_unless_asked(monkeypatch):
    class Settings:
        mode = None

    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert wandb_mode(Settings) == DEFAULT_WANDB_MODE == "offline"
    monkeypatch.setenv("WANDB_MODE", "online")
    assert wandb_mode(Settings) == "online"
    Settings.mode = "disabled"  # logger.mode wins over the environment
    assert wandb_mode(Settings) == "disabled"


def test_a_wandb_mode_wandb_refuses_is_one_line_before_anything_is_written(tmp_path, monkeypatch):
    """WANDB_MODE=bogus was passed to W&B at the first scalar, after the run had written its config and
    TensorBoard files; it is refused when the backend is made, in one line, and logger.mode still wins."""
    monkeypatch.setenv("WANDB_MODE", "bogus")
    with pytest.raises(UserError) as err:
        make_backends(tmp_path, LoggerConfig(backends=["tensorboard", "wandb"]), {})
    assert str(err.value) == ("WANDB_MODE=bogus is not a Weights & Biases mode: set it to online, offline or disabled, "
                              "or unset it, or pass logger.mode=online|offline|disabled")
    assert not list(tmp_path.iterdir())  # nothing written
    make_backends(tmp_path, LoggerConfig(backends=["wandb"], mode="disabled"), {})  # the config's mode wins


def test_logger_group_choices(compose, tmp_path):
    for choice, names in (("tensorboard", ["tensorboard"]), ("wandb", ["tensorboard", "wandb"]), ("none", [])):
        cfg = compose("train_teacher", [f"logger={choice}"])
        assert list(validate(cfg, "train_teacher").logger.backends) == names
        assert [type(b).__name__ for b in make_backends(tmp_path, load_job(cfg, "train_teacher").logger, {})] == \
            [{"tensorboard": "TensorBoardBackend", "wandb": "WandbBackend"}[n] for n in names]
    assert not (tmp_path / "wandb").exists()  # a W&B run starts at the first scalar, not when the backend is made
    with pytest.raises(UserError, match=r"logger.backends\[0\]=mlflow is not valid"):
        validate(compose("train_teacher", ["logger.backends=[mlflow]"]), "train_teacher")
    with pytest.raises(UserError, match="logger.mode=sometimes is not valid"):
        validate(compose("train_teacher", ["logger=wandb", "logger.mode=sometimes"]), "train_teacher")
