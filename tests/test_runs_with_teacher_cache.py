"""Runs with ``teacher.cache=true``: the step reads the teacher's logits from the cache instead of running it.

What is checked: a run on a cache that holds the live teacher's logits is the live run bit for bit
(so the step reads exactly the rows of the (image, crop, flip) the loader drew, and nothing else
changes); a sweep of three logit methods builds the cache once and every run uses it; where the
cache cannot apply, one line says why and the teacher runs live; a cache left from a retrained
teacher stops the run in one line with the command that rebuilds it; 2 DDP ranks read their own rows
and build the cache once; a run interrupted mid-epoch resumes bit for bit with the cache on.

That a cached row equals the live forward to rounding is :mod:`tests.test_teacher_cache`'s part.
Tiny sizes: 40 training images of 8 x 8 pixels (crop padding 1: 18 variants each), five classes,
resnet8 networks, fp32 on the CPU.
"""
from __future__ import annotations

import copy
import logging
import os
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import (
    assert_same_weights,
    comparable_metrics,
    compose_config,
    generator,
    random_teacher_file,
    run_cli,
    run_ranks,
    write_image_folder,
)
from omegaconf import DictConfig, OmegaConf

from common.errors import UserError
from datasets import DataSplits, load_dataset
from distiller.engine.runtime import make_runtime
from distiller.engine.teacher_cache import TeacherCache, row_index
from distiller.jobs.train import assemble_distillation, compose_job, distill
from scripts import teachers as teachers_cmd

CLASSES, TRAIN, TEST, SIDE = 5, 40, 10, 8
USED = "teacher logits from the cache"
REFUSED = "teacher.cache=true does not apply"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> SimpleNamespace:
    """An image folder (``dataset=imagefolder``) of random 8 x 8 images and a random resnet8 teacher file."""
    root = tmp_path_factory.mktemp("cached_runs")
    gen = generator(3)
    images = torch.randint(0, 256, (TRAIN + TEST, 3, SIDE, SIDE), dtype=torch.uint8, generator=gen)
    labels = torch.arange(TRAIN + TEST) % CLASSES
    write_image_folder(root / "images", DataSplits(images[:TRAIN], labels[:TRAIN], images[TRAIN:], labels[TRAIN:],
                                                   CLASSES, [str(c) for c in range(CLASSES)]))
    _, teacher = random_teacher_file(root / "teachers", CLASSES)
    load_dataset({"name": "imagefolder", "root": str(root / "images")})  # decoded once, here: the runs read it back
    return SimpleNamespace(root=root, images=root / "images", teacher=teacher)


def overrides(files: SimpleNamespace, *extra: str) -> list[str]:
    # fp32 whatever trainer.precision=auto would pick: the runs are compared bit for bit
    return ["teacher=resnet8", "student=resnet8", "dataset=imagefolder", f"dataset.root={files.images}",
            "dataset.batch_size=8", "dataset.eval_batch_size=16", "trainer.epochs=1", "trainer.device=cpu",
            "trainer.progress=false", "trainer.precision=fp32", "trainer.eval_precision=fp32",
            f"teacher.ckpt={files.teacher}", "teacher.verify=false", f"teacher_dir={files.root / 'teachers'}",
            "logger=none", *extra]


_COMPOSED: dict[tuple[str, ...], DictConfig] = {}


def configured(args: list[str], **keys: object) -> DictConfig:
    """The composed config of ``args`` (Hydra composes each distinct list once) with ``keys`` set:
    ``cache_dir=...`` sets ``teacher.cache_dir``, other names are ``trainer.<name>``."""
    if tuple(args) not in _COMPOSED:
        _COMPOSED[tuple(args)] = compose_config("train_student", args)
    cfg = copy.deepcopy(_COMPOSED[tuple(args)])
    for name, value in keys.items():
        OmegaConf.update(cfg, f"teacher.{name}" if name.startswith("cache") else f"trainer.{name}", value)
    return cfg


def assembled(run_dir: Path, cfg: DictConfig, load_teacher: bool = True):
    job, record, _ = compose_job(cfg, "train_student")
    trainer, _ = assemble_distillation(job, run_dir, record, make_runtime(job.trainer), load_teacher=load_teacher)
    return trainer


def messages(caplog: pytest.LogCaptureFixture, words: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if words in r.getMessage()]


# ---- the step reads exactly the drawn rows ------------------------------------------------------------------
def test_a_run_on_a_cache_of_the_live_logits_is_the_live_run_bit_for_bit(files, tmp_path) -> None:
    """Every row the two epochs draw holds the live teacher's logits of that batch, every other row NaN: a wrong
    row would make the loss NaN (the run stops), a right one gives the live run's weights exactly."""
    args = overrides(files, "distill=kd", "trainer.epochs=2")
    live = assembled(tmp_path / "live", configured(args))
    cached = assembled(tmp_path / "cached", configured(args, cache=True, cache_dir=str(tmp_path / "cache")))
    cache = cached.step.teacher_cache
    assert isinstance(cache, TeacherCache) and cache.built and live.step.teacher_cache is None

    logits = torch.full_like(cache.logits, float("nan"))
    with torch.no_grad():  # the teacher as the live run has it: same module state, same batches, same kernels
        for epoch in (1, 2):
            for batch in live.train_loader.epoch(epoch):
                logits[row_index(batch.indices, batch.offsets, batch.flips, cache.key.pad)] = live.teacher(batch.images)
    cached.step.teacher_cache = TeacherCache(cache.path, cache.key, logits)
    forwards = []
    cached.teacher.register_forward_hook(lambda *_: forwards.append(1))

    live.fit()
    cached.fit()
    assert not forwards  # the cached run never ran the teacher while training
    for name, value in live.student.state_dict().items():
        assert torch.equal(cached.student.state_dict()[name], value), name
    assert [r["test_top1"] for r in live.state.history] == [r["test_top1"] for r in cached.state.history]


# ---- a sweep builds once ---------------------------------------------------------------------------------------
def test_a_sweep_of_three_logit_methods_builds_the_cache_once_and_every_run_uses_it(files, tmp_path) -> None:
    result = run_cli("train_student.py", "-m", "distill=kd,dkd,dist", f"hydra.sweep.dir={tmp_path / 'sweep'}",
                     *overrides(files, "teacher.cache=true", f"teacher.cache_dir={tmp_path / 'cache'}"))
    assert result.returncode == 0, result.stderr[-3000:]
    logs = {p.parent.parent.name: p.read_text() for p in (tmp_path / "sweep").rglob("train_student.log")}
    assert sorted(logs) == ["dist", "dkd", "kd"]
    used = {method: [line for line in text.splitlines() if USED in line] for method, text in logs.items()}
    assert all(len(lines) == 1 for lines in used.values()), used
    assert sorted("built now" in lines[0] for lines in used.values()) == [False, False, True]  # built once
    assert sum(text.count("building the teacher cache") for text in logs.values()) == 1
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [  # complete: no partial files left
        "resnet8.imagefolder-40.fp32.json", "resnet8.imagefolder-40.fp32.lock", "resnet8.imagefolder-40.fp32.logits"]


# ---- where it cannot apply ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, load_teacher, why", [
    (("distill=crd", "distill.nce_k=8"), True, "crd reads the teacher's embedding, not only its logits"),
    (("distill=fitnet",), True, "fitnet reads the teacher's stages, stem, not only its logits"),
    (("distill=kd", "dataset.stream=true", "dataset.workers=0"), True,
     "the data set is streamed from files, and the cache is built over a data set decoded into memory: "
     "dataset.stream=false decodes it (if it fits)"),
    (("distill=kd",), False, "the teacher is not loaded from a stored file"),
    (("distill=kd", "distill.alpha=0"), True, "the objective never runs the teacher"),
])
def test_where_the_cache_cannot_apply_one_line_says_why_and_the_teacher_runs_live(
        files, tmp_path, caplog, extra, load_teacher, why) -> None:
    caplog.set_level(logging.INFO, logger="distiller")
    trainer = assembled(tmp_path / "run", configured(overrides(files, *extra), cache=True,
                                                     cache_dir=str(tmp_path / "cache")), load_teacher=load_teacher)
    refused = messages(caplog, REFUSED)
    assert len(refused) == 1 and why in refused[0] and refused[0].endswith("the teacher runs live"), refused
    assert trainer.step.teacher_cache is None and not messages(caplog, USED)
    assert not (tmp_path / "cache").exists()  # nothing built


def test_mlkd_takes_its_weak_view_from_the_cache_and_runs_the_teacher_on_the_strong_one(files, tmp_path,
                                                                                         caplog) -> None:
    caplog.set_level(logging.INFO, logger="distiller")
    trainer = assembled(tmp_path / "run", configured(overrides(files, "distill=mlkd"), cache=True,
                                                     cache_dir=str(tmp_path / "cache")))
    used = messages(caplog, USED)
    assert len(used) == 1 and "the teacher runs live on the random strong view" in used[0]
    assert trainer.step.teacher_cache is not None and not messages(caplog, REFUSED)
    seen = []
    trainer.teacher.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
    trainer.fit()
    batches = list(trainer.train_loader.epoch(1))
    assert len(seen) == len(batches)  # one live forward per step: the strong view's, never the weak images
    assert all(torch.equal(x, b.views["strong"]) for x, b in zip(seen, batches))


# ---- a stale cache -------------------------------------------------------------------------------------------------
def test_a_cache_of_a_retrained_teacher_stops_the_run_in_one_line_that_says_how_to_rebuild(files, tmp_path,
                                                                                          caplog) -> None:
    caplog.set_level(logging.INFO, logger="distiller")
    _, teacher = random_teacher_file(tmp_path / "teachers", CLASSES)
    cache_dir = tmp_path / "cache"
    cfg = configured(overrides(files, "distill=kd"), cache=True, cache_dir=str(cache_dir))
    cfg.teacher.ckpt = str(teacher)
    assert assembled(tmp_path / "first", copy.deepcopy(cfg)).step.teacher_cache.built
    random_teacher_file(tmp_path / "teachers", CLASSES, seed_base=1)  # retrained: the same file, other weights
    with pytest.raises(UserError) as err:
        assembled(tmp_path / "second", copy.deepcopy(cfg))
    message = str(err.value)
    assert "\n" not in message and "teacher file sha256" in message and "is not used" in message
    command = f"python scripts/teachers.py cache --cache-dir {cache_dir} --rebuild {teacher} dataset=imagefolder"
    assert command in message, message
    assert not (tmp_path / "second" / "config.yaml").exists()  # the run did not start

    # the command the line gives (with the run's dataset.* settings) rebuilds it; the run then finds it
    argv = command.split()[2:]
    assert teachers_cmd.main([*argv, f"dataset.root={files.images}", "trainer.device=cpu"]) == 0
    caplog.clear()
    assert not assembled(tmp_path / "second", cfg).step.teacher_cache.built
    assert "(found, fp32, on cpu)" in messages(caplog, USED)[0]


# ---- DDP ---------------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_steps(rank: int, world: int, port: int, out: Path, args: list[str]) -> None:
    """One rank: assemble the run (both ranks reach the cache at once), train 3 steps with BatchNorm in eval mode."""
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    trainer = assembled(out / f"run{world}", compose_config("train_student", args))
    phase = trainer.plan[-1]
    optimizer = trainer.prepare_phase(phase)
    # BatchNorm in eval mode: each sample's output depends on that sample only, so two ranks of 8 give the
    # gradient of one batch of 16 (averaged instead of summed: rounding differs)
    trainer.student.eval()
    rows = []
    for _, batch in zip(range(3), trainer.train_loader.epoch(1)):
        rows.append(row_index(batch.indices, batch.offsets, batch.flips, 1))
        trainer.train_step(batch, phase, 1, optimizer)
    torch.save({"model": trainer.student.state_dict(), "built": trainer.step.teacher_cache.built, "rows": rows},
               out / f"world{world}_rank{rank}.pt")
    if world > 1:
        torch.distributed.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_two_ddp_ranks_build_the_cache_once_read_their_own_rows_and_match_one_process(files, tmp_path) -> None:
    args = overrides(files, "distill=kd", "teacher.cache=true", f"teacher.cache_dir={tmp_path / 'cache'}")
    run_ranks(_rank_steps, 2, _free_port(), tmp_path, [*args, "dataset.batch_size=8"])
    run_ranks(_rank_steps, 1, _free_port(), tmp_path, [*args, "dataset.batch_size=16"])
    ranks = [torch.load(tmp_path / f"world2_rank{r}.pt", weights_only=True) for r in (0, 1)]
    single = torch.load(tmp_path / "world1_rank0.pt", weights_only=True)
    assert sorted(r["built"] for r in ranks) == [False, True] and not single["built"]  # built once, then found
    # each rank read the rows of its own part of every global batch: together, the one process's rows
    for step, rows in enumerate(single["rows"]):
        assert torch.equal(torch.cat([ranks[0]["rows"][step], ranks[1]["rows"][step]]), rows)
    for key, value in single["model"].items():
        assert torch.equal(ranks[0]["model"][key], ranks[1]["model"][key]), key
        if value.is_floating_point() and "running" not in key:
            torch.testing.assert_close(ranks[0]["model"][key], value, rtol=1e-4, atol=1e-5, msg=key)


# ---- resume ------------------------------------------------------------------------------------------------------
class Interrupted(Exception):
    """Stands for a kill in the middle of an epoch (the checkpoint of the step before is on disk)."""


def test_a_run_interrupted_mid_epoch_resumes_bit_for_bit_with_the_cache_on(files, tmp_path,
                                                                          monkeypatch) -> None:
    args = overrides(files, "distill=dkd", "trainer.checkpoint_every_steps=1")
    run = lambda **keys: configured(args, cache=True, cache_dir=str(tmp_path / "cache"), **keys)
    distill(run(), tmp_path / "reference")

    lookup, calls = TeacherCache.lookup, []

    def interrupted(self, batch):
        calls.append(1)
        if len(calls) == 3:  # step 3 of 5
            raise Interrupted
        return lookup(self, batch)

    monkeypatch.setattr(TeacherCache, "lookup", interrupted)
    with pytest.raises(Interrupted):
        distill(run(), tmp_path / "victim")
    monkeypatch.undo()
    assert torch.load(tmp_path / "victim" / "last.pt", weights_only=True)["run"]["step"] == 2  # mid-epoch
    distill(run(resume=True), tmp_path / "victim")
    assert_same_weights(tmp_path / "reference" / "final.pt", tmp_path / "victim" / "final.pt")
    assert comparable_metrics(tmp_path / "reference") == comparable_metrics(tmp_path / "victim")


# ---- the keys ----------------------------------------------------------------------------------------------------
def test_the_cache_keys_change_a_runs_identity_only_where_they_can_change_its_result() -> None:
    """A run directory made before the keys existed resumes with them at their defaults; where the cache lives
    never matters; switching it on, or storing rounded logits, is another run (rounding differs)."""
    from distiller.jobs.run_dir import run_identity

    before = {"seed": 0, "teacher": {"name": "resnet8", "ckpt": "a.pt", "verify": True}}
    node = lambda **keys: {**before, "teacher": {**before["teacher"], "cache": False, "cache_dir": None,
                                                 "cache_dtype": "fp32", **keys}}
    assert run_identity(node()) == run_identity(before)
    assert run_identity(node(cache_dir="/elsewhere")) == run_identity(before)
    assert run_identity(node(cache=True)) != run_identity(before)
    assert run_identity(node(cache=True, cache_dtype="bf16")) != run_identity(node(cache=True))
