"""The benchmark's config: ``configs/benchmark.yaml`` (``train_student.yaml`` plus ``bench.*``) composed with
the command line's overrides, its ``bench`` keys checked once into :class:`BenchSettings`, and the random
data set that ``bench.data=random`` points the run at.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any, Iterator, Mapping

import torch
from omegaconf import DictConfig, open_dict

from common.errors import UserError
from datasets import DATASETS, DataSplits
from distiller.config.command_line import explain_config_error
from distiller.config.compose import compose
from distiller.config.overrides import override_key

CONFIG_NAME = "benchmark"
RANDOM_DATASET = "benchmark_random"  # bench.data=random: generated images, registered for the run (random_data_set)
RANDOM_TEST_SIZE = 256
RANDOM_OPTIONS = ("train_size", "test_size", "seed")  # the dataset.* keys the random set reads (set by the benchmark)


def compose_benchmark(argv: list[str]) -> DictConfig:
    """``configs/benchmark.yaml`` with the command-line overrides (one clear line on a mistake)."""
    stray = [a for a in argv if "=" not in a]
    if stray:
        raise UserError(f"unexpected argument '{stray[0]}': the options are --methods SET and --teacher-cache; the "
                        "rest are Hydra-style overrides key=value, e.g. distill=crd bench.steps=50 (see python "
                        "scripts/benchmark.py --help)")
    network = next((a for a in argv if override_key(a) in ("model", "model.name")), None)
    if network is not None:  # the step distils: its networks are the teacher's and the student's
        raise UserError(f"{network}: the benchmark times a distillation step; choose its networks with teacher=NAME "
                        f"student=NAME")
    try:
        cfg = compose(CONFIG_NAME, argv)
    except Exception as err:  # noqa: BLE001 - every composition failure is a user error here
        raise UserError(explain_config_error(err, CONFIG_NAME, list(argv))) from None
    chosen = [a for a in argv if override_key(a) == "dataset"]
    if chosen and cfg.bench.data == "random":  # it would be replaced by the generated images in silence
        raise UserError(f"{chosen[-1]} is not read with bench.data=random (the default: generated images of "
                        f"CIFAR's shape, bench.train_size of them): add bench.data=dataset to time the step on it")
    return cfg


@dataclasses.dataclass(frozen=True)
class BenchSettings:
    """The ``bench`` keys of ``configs/benchmark.yaml``, checked (their meaning: the comments there)."""

    steps: int
    warmup: int
    reference_steps: int
    reference_warmup: int
    rounds: int
    reference_workers: int  # ``auto`` resolved to os.cpu_count()
    data: str
    train_size: int
    phase: str
    peak_matmul: bool
    flops: bool
    seed: int


def _count(node: Mapping[str, Any], key: str, minimum: int) -> int:
    value = node.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(f"bench.{key}={value} must be a whole number >= {minimum}")
    return value


def bench_settings(cfg: DictConfig) -> BenchSettings:
    """The composed config's ``bench`` node as :class:`BenchSettings`; a bad value is one :class:`UserError`."""
    node = cfg.bench
    data = str(node.get("data", "random"))
    if data not in ("random", "dataset"):
        raise UserError(f"bench.data={data} is not valid; use random (generated uint8 images) or dataset "
                        "(the dataset= group, e.g. dataset=synthetic)")
    workers = node.get("reference_workers", "auto")
    if workers == "auto":
        workers = os.cpu_count() or 1
    elif isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise UserError(f"bench.reference_workers={workers} must be auto or a whole number >= 0")
    return BenchSettings(
        steps=_count(node, "steps", 1), warmup=_count(node, "warmup", 0),
        reference_steps=_count(node, "reference_steps", 0), reference_warmup=_count(node, "reference_warmup", 0),
        rounds=_count(node, "rounds", 1), reference_workers=int(workers), data=data,
        train_size=_count(node, "train_size", 100), phase=str(node.get("phase", "main")),
        peak_matmul=bool(node.get("peak_matmul", True)), flops=bool(node.get("flops", True)),
        seed=int(node.get("seed", 0)))


def random_splits(cfg: Mapping[str, Any]) -> DataSplits:
    """Uniform uint8 images with balanced, shuffled labels: the cost of a step does not depend on pixels."""
    num_classes = int(cfg["num_classes"])
    gen = torch.Generator().manual_seed(int(cfg["seed"]))

    def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen)
        labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=gen)]
        return images, labels

    train_images, train_labels = split(int(cfg["train_size"]))
    test_images, test_labels = split(int(cfg["test_size"]))
    return DataSplits(train_images, train_labels, test_images, test_labels, num_classes,
                      [f"class_{i}" for i in range(num_classes)])


@contextlib.contextmanager
def random_data_set() -> Iterator[None]:
    """:data:`RANDOM_DATASET` is a data set inside the block only: the registry is as it was afterwards."""
    added = RANDOM_DATASET not in DATASETS
    if added:
        DATASETS.add(RANDOM_DATASET, random_splits, options=RANDOM_OPTIONS)
    try:
        yield
    finally:
        if added and RANDOM_DATASET in DATASETS:
            DATASETS.remove(RANDOM_DATASET)


def use_settings_data(cfg: DictConfig, bench: BenchSettings) -> None:
    """Under ``bench.data=random``, point ``cfg.dataset`` at :func:`random_splits` (before the job is validated,
    so the run records what it trains on); its other keys stay. Needs :func:`random_data_set` around the run."""
    if bench.data != "random":
        return
    # the keys only other data sets read (dataset=cifar100's download, ...) do not apply to generated images
    unread = {name for entry in DATASETS.names() for name in DATASETS.metadata(entry).get("options", ())}
    with open_dict(cfg):
        cfg.dataset.merge_with({key: None for key in unread - set(RANDOM_OPTIONS) if key in cfg.dataset})
        cfg.dataset.merge_with({"name": RANDOM_DATASET, "train_size": bench.train_size,
                                "test_size": RANDOM_TEST_SIZE, "seed": bench.seed})
