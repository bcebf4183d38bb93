"""The exact teacher-output cache: the loader's crops and flips, the row layout, cached logits against live
forwards, the key, kill -9 during a build, concurrent builders, and the ``scripts/teachers.py cache`` command.

Tiny sizes throughout: 8 x 8 images (crop padding 1: 3 x 3 offsets x 2 flips = 18 variants per image),
five classes, resnet8 teachers.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from helpers import generator, random_teacher_file, seed, write_image_folder
from torch import nn

import distiller.engine.teacher_cache as tc
import distiller.jobs.cache_build as build
from common.errors import UserError
from datasets import DataSplits, DeviceLoader
from datasets.device_loader import epoch_seed
from scripts import teachers as teachers_cmd

SIDE, CLASSES, N = 8, 5, 40
MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)
# significand bits of each stored dtype: storing rounds to nearest, a relative error of at most 2**-bits
SIGNIFICAND = {"fp32": 24, "fp16": 11, "bf16": 8}


def tiny_data(n: int = N, seed_base: int = 0) -> DataSplits:
    gen = generator(seed_base)
    images = torch.randint(0, 256, (n, 3, SIDE, SIDE), dtype=torch.uint8, generator=gen)
    labels = torch.arange(n) % CLASSES
    return DataSplits(images, labels, images[:4].clone(), labels[:4].clone(), CLASSES,
                      [str(c) for c in range(CLASSES)], mean=MEAN, std=STD)


def tiny_teacher(folder: Path, seed_base: int = 0, name: str = "resnet8.pt") -> tuple[nn.Module, Path]:
    return random_teacher_file(folder, CLASSES, seed_base, name)


class Counting(nn.Module):
    """The teacher, counting the inputs it sees and optionally sleeping per batch (to widen a race's window)."""

    def __init__(self, teacher: nn.Module, sleep: float = 0.0) -> None:
        super().__init__()
        self.teacher, self.sleep, self.seen = teacher, sleep, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen += x.shape[0]
        if self.sleep:
            time.sleep(self.sleep)
        return self.teacher(x)


def naive_crop(image: torch.Tensor, dy: int, dx: int, flip: bool, pad: int) -> torch.Tensor:
    """The crop at (dy, dx) of the zero-padded uint8 image, mirrored when ``flip``, with plain loops."""
    c, h, w = image.shape
    out = torch.zeros(c, h, w, dtype=torch.uint8)
    for i in range(h):
        for j in range(w):
            y, x = dy + i - pad, dx + (w - 1 - j if flip else j) - pad
            if 0 <= y < h and 0 <= x < w:
                out[:, i, j] = image[:, y, x]
    return out


def one_line_user_error(call, *words: str) -> str:
    with pytest.raises(UserError) as err:
        call()
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message
    return message


# ---- the loader tells what it drew ---------------------------------------------------------------------------
def test_train_batches_carry_the_offsets_and_flips_they_were_made_with() -> None:
    data = tiny_data(37)
    mean = torch.tensor(MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(STD, dtype=torch.float32).view(3, 1, 1)
    loader = DeviceLoader(data.train_images, data.train_labels, 8, "cpu", train=True, seed=seed(5), mean=MEAN,
                          std=STD, views=("strong",))
    for epoch in (0, 3):
        # the epoch's draws, made here as the loader has always made them: one generator seeded by (seed, epoch)
        gen = torch.Generator().manual_seed(epoch_seed(seed(5), epoch))
        order = torch.randperm(37, generator=gen)
        offsets = torch.randint(0, 3, (37, 2), generator=gen)
        flips = torch.rand(37, generator=gen) < 0.5
        position = 0
        for batch in loader.epoch(epoch):
            span = slice(position, position + len(batch))
            assert torch.equal(batch.indices, order[span])
            assert torch.equal(batch.offsets, offsets[span]) and torch.equal(batch.flips, flips[span])
            for k, index in enumerate(batch.indices.tolist()):
                crop = naive_crop(data.train_images[index], *batch.offsets[k].tolist(), bool(batch.flips[k]), 1)
                # each elementwise float32 op rounds exactly once, so the same ops give the same bits
                assert torch.equal(batch.images[k], (crop.to(torch.float32) / 255.0 - mean) / std)
            position += len(batch)
        assert position == 37  # four batches of 8 and the rest of 5
    eval_batches = DeviceLoader(data.train_images, data.train_labels, 8, "cpu", train=False).epoch(0)
    assert all(b.offsets is None and b.flips is None for b in eval_batches)  # not augmented: nothing to tell


# ---- the row layout -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("pad", [1, 2, 4])
def test_row_layout_is_the_naive_enumeration(pad: int) -> None:
    side, naive = 2 * pad + 1, []
    for i in range(3):
        for dy in range(side):
            for dx in range(side):
                for f in (False, True):
                    naive.append((i, dy, dx, f))
    indices = torch.tensor([t[0] for t in naive])
    offsets = torch.tensor([[t[1], t[2]] for t in naive])
    flips = torch.tensor([t[3] for t in naive])
    rows = tc.row_index(indices, offsets, flips, pad)
    assert rows.tolist() == list(range(len(naive)))  # row r is the r-th tuple of the nested loops
    back = tc.row_variant(rows, pad)
    assert torch.equal(back[0], indices) and torch.equal(back[1], offsets) and torch.equal(back[2], flips)


# ---- cached logits against the live teacher ------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_cached_logits_are_the_teachers_at_the_loaders_crops(tmp_path: Path, dtype: str) -> None:
    """Built in float64, stored in ``dtype``: each cached logit is the float64 forward rounded once to ``dtype``.

    Bound: half an ulp of ``dtype`` (relative 2**-bits; bf16/fp16 values may round via fp32 first, adding
    2**-24) plus the float64 forward's dependence on how the images were batched (~1e-15 for logits of
    order 1; allowed 1e-9), plus fp16's subnormal spacing (2**-25) for logits near zero.
    """
    data = tiny_data()
    teacher, path = tiny_teacher(tmp_path / "teachers")
    teacher = teacher.double()
    cache = build.ensure_cache(teacher, path, data, "tiny", dtype=dtype, precision="fp64", batch_size=64,
                            progress=False)
    assert cache.built and cache.logits.dtype == tc.DTYPES[dtype] and cache.logits.shape == (N * 18, CLASSES)
    loader = DeviceLoader(data.train_images, data.train_labels, 16, "cpu", train=True, seed=seed(1), mean=MEAN,
                          std=STD)
    rtol, atol = 2.0 ** -SIGNIFICAND[dtype] + 2.0 ** -24, 1e-9 + 2.0 ** -25
    for epoch in (0, 1):
        for batch in loader.epoch(epoch):
            rows = tc.row_index(batch.indices, batch.offsets, batch.flips, cache.key.pad)
            assert torch.equal(tc.variant_images(data.train_images, rows, cache.key), batch.images)  # same input
            cached = cache.lookup(batch)
            assert cached.dtype == torch.float32 and cached.shape == (len(batch), CLASSES)
            with torch.no_grad():
                live = teacher(batch.images.double())
            assert ((cached.double() - live).abs() <= rtol * live.abs() + atol).all()


def test_cached_logits_at_random_triples_equal_a_forward_of_the_naive_crop(tmp_path: Path) -> None:
    data = tiny_data()
    teacher, path = tiny_teacher(tmp_path / "teachers")
    teacher = teacher.double()
    cache = build.ensure_cache(teacher, path, data, "tiny", precision="fp64", progress=False)
    gen = generator(2)
    indices = torch.randint(0, N, (30,), generator=gen)
    offsets = torch.randint(0, 3, (30, 2), generator=gen)
    flips = torch.rand(30, generator=gen) < 0.5
    crops = torch.stack([naive_crop(data.train_images[i], dy, dx, f, 1)
                         for i, (dy, dx), f in zip(indices.tolist(), offsets.tolist(), flips.tolist())])
    mean = torch.tensor(MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=torch.float32).view(1, 3, 1, 1)
    inputs = (crops.to(torch.float32) / 255.0 - mean) / std  # the loader's float32 input (each op rounds once)
    with torch.no_grad():
        live = teacher(inputs.double())
    cached = cache.lookup_at(indices, offsets, flips).double()
    assert ((cached - live).abs() <= 2.0 ** -24 * live.abs() + 1e-9).all()


# ---- the key ----------------------------------------------------------------------------------------------------
def test_a_cache_with_another_key_is_refused_in_one_line_and_rebuilt_on_request(tmp_path: Path) -> None:
    data = tiny_data(8)
    teacher, path = tiny_teacher(tmp_path / "teachers")
    cache = build.ensure_cache(teacher, path, data, "tiny", progress=False)
    files = tc.CacheFiles.beside(path, "tiny", 8, "fp32")
    assert cache.path == files.data and files.header.is_file() and not files.partial.exists()
    before = files.data.read_bytes()

    changed = tiny_data(8)
    changed.train_images[3, 1, 2, 2] ^= 1  # one bit of one pixel
    one_line_user_error(lambda: build.ensure_cache(teacher, path, changed, "tiny", progress=False),
                        "training data sha256", "--rebuild", "is not used")
    wrong_pad = dataclasses.replace(cache.key, pad=2)
    one_line_user_error(lambda: tc.open_cache(files, wrong_pad), "crop padding 1 (now 2)", "--rebuild")
    other, _ = tiny_teacher(tmp_path / "teachers", seed_base=1)  # a retrained teacher in the same file
    message = one_line_user_error(lambda: build.ensure_cache(other, path, data, "tiny", progress=False),
                                  "teacher file sha256", "--rebuild")
    assert "training data" not in message  # only what differs is named
    assert files.data.read_bytes() == before  # a refused cache is left as it was

    rebuilt = build.ensure_cache(other, path, data, "tiny", progress=False, rebuild=True)
    assert rebuilt.built and rebuilt.key.teacher_sha256 != cache.key.teacher_sha256
    with torch.no_grad():  # the build's one batch (8 x 18 rows < 256), recomputed: the same kernels give the same bits
        live = other(tc.variant_images(data.train_images, torch.arange(8 * 18), rebuilt.key))
    assert torch.equal(rebuilt.logits, live)
    assert not build.ensure_cache(other, path, data, "tiny", progress=False).built  # found, not built again


def test_cache_dir_moves_the_files_and_a_missing_cache_says_how_to_build_it(tmp_path: Path) -> None:
    data = tiny_data(4)
    teacher, path = tiny_teacher(tmp_path / "teachers")
    cache = build.ensure_cache(teacher, path, data, "tiny", cache_dir=tmp_path / "elsewhere", progress=False)
    assert cache.path.parent == tmp_path / "elsewhere" and cache.nbytes == 4 * 18 * CLASSES * 4
    assert sorted(p.name for p in (tmp_path / "teachers").iterdir()) == ["resnet8.pt"]
    one_line_user_error(lambda: tc.open_cache(tc.CacheFiles.beside(path, "tiny", 4, "fp32")),
                        "no complete teacher cache", "scripts/teachers.py cache")


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_a_narrow_cache_is_derived_from_the_fp32_one_without_forwards_and_equals_a_build(tmp_path: Path,
                                                                                         dtype: str) -> None:
    data = tiny_data(6)
    teacher, path = tiny_teacher(tmp_path / "teachers")
    wide = build.ensure_cache(teacher, path, data, "tiny", progress=False)
    counting = Counting(teacher)
    derived = build.ensure_cache(counting, path, data, "tiny", dtype=dtype, progress=False)
    assert derived.built and counting.seen == 0 and derived.key.dtype == dtype
    # a build of the narrow cache elsewhere runs the same batches through the same kernels, then rounds once
    built = build.ensure_cache(counting, path, data, "tiny", dtype=dtype, cache_dir=tmp_path / "built",
                               progress=False)
    assert counting.seen == 6 * 18 and derived.path.read_bytes() == built.path.read_bytes()
    bits = SIGNIFICAND[dtype]  # and each value is its fp32 row rounded to nearest: within half an ulp
    error = (derived.logits.double() - wide.logits.double()).abs()
    assert (error <= 2.0 ** -bits * wide.logits.double().abs() + 2.0 ** -25).all()
    other, _ = tiny_teacher(tmp_path / "teachers", seed_base=1, name="other.pt")  # no fp32 twin: built
    counting = Counting(other)
    build.ensure_cache(counting, tmp_path / "teachers" / "other.pt", data, "tiny", dtype=dtype, progress=False)
    assert counting.seen == 6 * 18


# ---- crashes and concurrency ---------------------------------------------------------------------------------
def _build_in_child(teacher: nn.Module, path: Path, data: DataSplits, sleep: float, results=None,
                    barrier=None) -> None:
    """A builder process: ``ensure_cache`` with a slow counting teacher; reports (built, forwards) if asked."""
    torch.set_num_threads(1)
    counting = Counting(teacher, sleep)
    if barrier is not None:
        barrier.wait()
    cache = build.ensure_cache(counting, path, data, "tiny", batch_size=16, progress=False, record_every=0.0)
    if results is not None:
        results.put((cache.built, counting.seen))


def test_kill_9_during_the_build_leaves_no_usable_cache_and_the_rerun_resumes(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    data = tiny_data()
    teacher, path = tiny_teacher(tmp_path / "a")
    reference = build.ensure_cache(teacher, path, data, "tiny", batch_size=16, progress=False)
    other = tmp_path / "b" / "resnet8.pt"
    other.parent.mkdir()
    other.write_bytes(path.read_bytes())
    files = tc.CacheFiles.beside(other, "tiny", N, "fp32")

    # 45 batches of 16 rows, 50 ms each: the kill lands within the first few, wherever in a batch it falls
    child = mp.get_context("fork").Process(target=_build_in_child, args=(teacher, other, data, 0.05))
    child.start()
    done, deadline = 0, time.monotonic() + 60
    while done < 3 * 16 and time.monotonic() < deadline:  # at least three batches recorded
        record = tc.read_json(files.record)
        done = record["rows_done"] if record else 0
        time.sleep(0.002)
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    assert child.exitcode == -signal.SIGKILL

    assert not files.header.exists() and files.partial.is_file()
    one_line_user_error(lambda: tc.open_cache(files), "no complete teacher cache", "interrupted")
    done = json.loads(files.record.read_text())["rows_done"]
    assert 3 * 16 <= done < N * 18 and done % 16 == 0

    counting = Counting(teacher)
    resumed = build.ensure_cache(counting, other, data, "tiny", batch_size=16, progress=False)
    assert resumed.built and counting.seen == N * 18 - done  # only the rows not yet on disk
    # the resumed build ran the same batches of the same rows as the uninterrupted one, with the same kernels
    assert files.data.read_bytes() == reference.path.read_bytes()
    assert not files.partial.exists() and not files.record.exists()
    assert not list(files.base.parent.glob(".*.tmp"))


@pytest.mark.parametrize("dies", ["before the rename", "after the rename"])
def test_a_build_killed_while_finishing_is_unusable_then_finished_without_recomputing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dies: str) -> None:
    data = tiny_data(4)
    teacher, path = tiny_teacher(tmp_path / "teachers")
    files = tc.CacheFiles.beside(path, "tiny", 4, "fp32")

    class Killed(BaseException):
        pass

    def die(*args: object, **kwargs: object) -> None:
        raise Killed

    if dies == "before the rename":  # every row and the record are on disk, the data file is not in place
        replace = os.replace
        monkeypatch.setattr(build.os, "replace", lambda src, dst: die() if Path(dst) == files.data
                            else replace(src, dst))
    else:  # the data file is in place, its header is not
        real = build.atomic_write
        monkeypatch.setattr(build, "atomic_write", lambda obj, p, fmt="torch": die() if p == files.header
                            else real(obj, p, fmt))
    with pytest.raises(Killed):
        build.ensure_cache(teacher, path, data, "tiny", progress=False)
    monkeypatch.undo()
    one_line_user_error(lambda: tc.open_cache(files), "no complete teacher cache")
    counting = Counting(teacher)
    cache = build.ensure_cache(counting, path, data, "tiny", progress=False)
    assert counting.seen == 0 and cache.logits.shape == (4 * 18, CLASSES)
    with torch.no_grad():  # the build's one batch, recomputed
        live = teacher(tc.variant_images(data.train_images, torch.arange(4 * 18), cache.key))
    assert torch.equal(cache.logits, live)


def test_concurrent_builders_build_once_and_both_read_it(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    data = tiny_data(12)
    teacher, path = tiny_teacher(tmp_path / "teachers")
    ctx = mp.get_context("fork")
    results, barrier = ctx.Queue(), ctx.Barrier(2)
    procs = [ctx.Process(target=_build_in_child, args=(teacher, path, data, 0.02, results, barrier))
             for _ in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=60)
    assert [proc.exitcode for proc in procs] == [0, 0]
    outcomes = sorted(results.get(timeout=5) for _ in procs)
    assert outcomes == [(False, 0), (True, 12 * 18)]  # one built every row; the other waited and read it
    assert tc.open_cache(tc.CacheFiles.beside(path, "tiny", 12, "fp32")).logits.shape == (12 * 18, CLASSES)


# ---- the command ---------------------------------------------------------------------------------------------
def test_the_cache_command_builds_reports_and_refuses_bad_input(tmp_path: Path, capsys) -> None:
    data = tiny_data(10)
    write_image_folder(tmp_path / "images", data)
    teacher, path = tiny_teacher(tmp_path / "teachers")
    args = ["cache", str(path), "dataset=imagefolder", f"dataset.root={tmp_path / 'images'}", "trainer.device=cpu"]
    assert teachers_cmd.main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["built"] and report["bytes"] == 10 * 18 * CLASSES * 4
    assert Path(report["path"]).parent == path.parent and report["key"]["dataset"] == "imagefolder"
    assert teachers_cmd.main(args) == 0
    assert "already there" in capsys.readouterr().out

    bad = {"--dtype": [*args, "--dtype", "fp8"], "--batch-size": [*args, "--batch-size", "0"],
           "not found": ["cache", str(tmp_path / "missing.pt"), "dataset=imagefolder"],
           "crop padding": [*args, "dataset.image_size=16"],  # another image size: another key
           # the run's key of the setting the command takes as an option: named with it (it said 'drop it')
           "its option --dtype sets it; replace teacher.cache_dtype=fp16 with --dtype VALUE":
               [*args, "teacher.cache_dtype=fp16"]}
    for words, argv in bad.items():
        with pytest.raises(SystemExit) as exit_:
            teachers_cmd.main(argv)
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and words in err, err
    assert teachers_cmd.main([*args, "dataset.image_size=16", "--rebuild"]) == 0
    assert "built now" in capsys.readouterr().out
