"""A streamed ImageNet folder through the engine on 2 gloo processes: the ranks see each sample of an epoch once
and together take one process's steps.

As ``tests/test_ddp.py`` does for the in-memory loader: the real trainer is assembled by the job's
own builder in each forked rank (``dataset=imagenet dataset.stream=true``), BatchNorm in eval mode
(each sample's output then depends on that sample only, so a global batch split over ranks gives
the whole batch's gradient), fp32 pinned. 2 ranks x 4 images must equal 1 process x 8 images step
for step; the samples each step covers are compared with the epoch's permutation drawn here
(``draw_epoch_plan``), an independent statement of the order.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_ranks_match_one_process, compose_config, run_ranks, seed
from image_files import imagenet_folder

from datasets import load_dataset
from datasets.sharding import draw_epoch_plan

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")

WNIDS = ("n01440764", "n01443537", "n01484850")
SIZE, RESIZE = 16, 18


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def overrides(root: Path, tmp: Path, batch: int) -> list[str]:
    return ["teacher=resnet8", "student=resnet8", "distill=kd", "dataset=imagenet", f"dataset.root={root}",
            f"dataset.image_size={SIZE}", f"dataset.eval_resize={RESIZE}", "dataset.stream=true", "dataset.workers=0",
            f"dataset.batch_size={batch}", "dataset.eval_batch_size=3", "trainer.epochs=1", "trainer.device=cpu",
            "trainer.precision=fp32", "trainer.eval_precision=fp32", "trainer.progress=false", "logger=none",
            f"teacher_dir={tmp / 'teachers'}"]


def epoch_with_engine(rank: int, world_size: int, port: int, out: Path, root: Path, batch: int) -> None:
    """Assemble the run as the job does, train one epoch step by step, save weights, evaluation and each step's
    sample indices (gathered from every rank)."""
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    from datasets.stream_loader import StreamLoader
    from distiller.engine.runtime import make_runtime
    from distiller.jobs.train import assemble_distillation, compose_job

    job, record, _ = compose_job(compose_config("train_student", overrides(root, out, batch)), "train_student")
    runtime = make_runtime(job.trainer)
    trainer, _ = assemble_distillation(job, out / f"run{world_size}", record, runtime, load_teacher=False)
    assert isinstance(trainer.train_loader, StreamLoader) and isinstance(trainer.test_loader, StreamLoader)
    phase = trainer.plan[-1]
    optimizer = trainer.prepare_phase(phase)
    trainer.student.eval()
    steps = []
    for batch_ in trainer.train_loader.epoch(1):
        trainer.train_step(batch_, phase, 1, optimizer)
        shards: list = [batch_.indices]
        if world_size > 1:
            shards = [None] * world_size
            torch.distributed.all_gather_object(shards, batch_.indices)
        steps.append([s.tolist() for s in shards])
    evaluation = trainer.measure(trainer.student)
    torch.save({"model": trainer.student.state_dict(), "evaluation": evaluation, "steps": steps},
               out / f"world{world_size}_rank{rank}.pt")
    if world_size > 1:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("stream_ddp") / "net"
    imagenet_folder(folder, np.random.default_rng(seed(40)), WNIDS, train=4, val=2)
    load_dataset({"name": "imagenet", "root": str(folder), "image_size": SIZE, "eval_resize": RESIZE})  # checked once
    return folder


def test_two_streaming_ranks_equal_one_process_through_the_engine(root: Path, tmp_path: Path) -> None:
    run_ranks(epoch_with_engine, 1, free_port(), tmp_path, root, 8)
    run_ranks(epoch_with_engine, 2, free_port(), tmp_path, root, 4)
    single = torch.load(tmp_path / "world1_rank0.pt", weights_only=True)
    ranks = [torch.load(tmp_path / f"world2_rank{r}.pt", weights_only=True) for r in (0, 1)]
    # 16 training images (12 JPEGs and 4 awkward files), global batch 8: 2 steps that cover the epoch's
    # permutation once; rank r takes the r-th half of each global batch
    n = 16
    order = draw_epoch_plan(0, 1, n, 0)[0].tolist()
    assert [sum(step, []) for step in single["steps"]] == [order[:8], order[8:]]
    assert ranks[0]["steps"] == ranks[1]["steps"] == [[order[:4], order[4:8]], [order[8:12], order[12:]]]
    assert sorted(i for step in ranks[0]["steps"] for shard in step for i in shard) == list(range(n))
    assert_ranks_match_one_process(ranks, single)
