"""Streaming from image files: the ImageNet data set, the streamed image folder, and the stream loader's guarantees.

Guarantees checked against independent facts: two simulated ranks (and two real gloo
processes) see each sample of an epoch once and together form one process's batch with
B * W; resuming at step k gives the remaining batches and decodes nothing before them; a
sample's augmentation depends on (seed, epoch, position) only, not on workers or batch size;
a streamed image folder gives the very batches of the in-memory one; the transforms against
PIL's resize of the decoded file. Bad folders and files are one line each.
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import run_ranks, seed
from image_files import imagenet_folder, noise_jpeg
from PIL import Image

import datasets.stream_loader as stream_loader
import datasets.streaming as streaming
from common.errors import UserError
from datasets import DataSplits, DeviceLoader, load_dataset
from datasets.base import FileSplits
from datasets.decode import UnreadableImage, decode_rgb
from datasets.imagenet import IMAGENET_MEAN, IMAGENET_STD
from datasets.loaders import make_loader
from datasets.sample_transforms import InceptionCrop
from datasets.sharding import draw_epoch_plan
from datasets.stream_loader import StreamLoader

WNIDS = ("n01440764", "n01443537", "n01484850")
SIZE, RESIZE = 16, 20  # the test recipe: RandomResizedCrop(16), Resize(20) + CenterCrop(16)
MEAN = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(3, 1, 1)


def imagenet_cfg(root: Path, **more: object) -> dict:
    return {"name": "imagenet", "root": str(root), "image_size": SIZE, "eval_resize": RESIZE, "workers": 0, **more}


@pytest.fixture(scope="module")
def imagenet_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("imagenet")
    imagenet_folder(root, np.random.default_rng(seed(0)), WNIDS, train=5, val=2)
    return root


@pytest.fixture(scope="module")
def imagenet(imagenet_root: Path) -> FileSplits:
    return load_dataset(imagenet_cfg(imagenet_root))


@pytest.fixture(scope="module")
def folder_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An image folder of 3 classes of 16 x 16 PNGs and JPEGs (one mode awkward)."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(seed(1))
    for c, name in enumerate(("ant", "bee", "cat")):
        for split, count in (("train", 7), ("val", 3)):
            for i in range(count):
                path = root / split / name / f"{i}.{'png' if i % 2 else 'jpg'}"
                path.parent.mkdir(parents=True, exist_ok=True)
                pixels = rng.integers(0, 128, (16, 16, 3), dtype=np.uint8)
                pixels[..., c] += 127
                Image.fromarray(pixels).save(path)
    Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8), "L").save(root / "train" / "ant" / "gray.png")
    return root


def batches(loader, epoch: int, start_step: int = 0) -> list:
    return list(loader.epoch(epoch, start_step))


def stream(data: FileSplits, batch_size: int, train: bool = True, **more: object) -> StreamLoader:
    """The stream loader of a split, seed 7, decoding in this process unless ``workers`` says otherwise."""
    files, labels = (data.train_files, data.train_labels) if train else (data.test_files, data.test_labels)
    return StreamLoader(files, labels, batch_size, "cpu", train=train, transform=data.transform, mean=data.mean,
                        std=data.std, **{"seed": 7, "workers": 0, **more})


def same(a: list, b: list) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x.indices, y.indices) and torch.equal(x.labels, y.labels)
        assert torch.equal(x.images, y.images)


def to_pixels(image: torch.Tensor) -> torch.Tensor:
    """Back to uint8 from ImageNet normalisation (exact: the float error is far below half a grey level)."""
    return torch.round((image.double() * STD + MEAN) * 255).to(torch.uint8)


# ---------------------------------------------------------------------------------------------- ImageNet layout


def test_imagenet_reads_the_layout_with_the_published_recipe(imagenet_root: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    for stale in imagenet_root.glob(".kd-check-*"):
        stale.unlink()  # checked afresh, so the warning is this load's
    with caplog.at_level(logging.WARNING):
        data = load_dataset(imagenet_cfg(imagenet_root))
    assert isinstance(data, FileSplits)
    assert data.class_names == list(WNIDS) and data.num_classes == 3
    assert data.mean == IMAGENET_MEAN and data.std == IMAGENET_STD and data.image_shape == (3, SIZE, SIZE)
    assert data.transform == InceptionCrop(size=SIZE, resize=RESIZE)
    for files, labels in ((data.train_files, data.train_labels), (data.test_files, data.test_labels)):
        folders = [Path(f).parent.name for f in files]
        assert [WNIDS.index(w) for w in folders] == labels.tolist()
        assert files == sorted(files, key=lambda f: (Path(f).parent.name, f))  # class order, then path order
    assert len(data.train_files) == 3 * 5 + 4 and len(data.test_files) == 3 * 2 + 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith("5 of 26 image files")
    assert "1 CMYK" in warnings[0] and "1 PNG named .JPEG" in warnings[0] and "1 palette (P)" in warnings[0]


def test_imagenet_defaults_are_the_published_sizes(imagenet_root: Path) -> None:
    data = load_dataset({"name": "imagenet", "root": str(imagenet_root)})
    assert data.transform == InceptionCrop(size=224, resize=256, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))
    assert data.image_shape == (3, 224, 224)


def test_the_check_runs_once(imagenet_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    load_dataset(imagenet_cfg(imagenet_root))

    def refuse(path):
        raise AssertionError(f"decoded {path} although the files did not change")

    monkeypatch.setattr(streaming, "decode_rgb", refuse)
    assert len(load_dataset(imagenet_cfg(imagenet_root)).train_files) == 19


# ---------------------------------------------------------------------------------------------- order and shards


@pytest.mark.parametrize("recipe", ["imagenet", "imagefolder"])
def test_two_ranks_together_are_one_process_with_the_global_batch(recipe: str, imagenet: FileSplits,
                                                                  folder_root: Path) -> None:
    data = imagenet if recipe == "imagenet" else load_dataset({"name": "imagefolder", "root": str(folder_root),
                                                               "stream": True, "workers": 0})
    n = len(data.train_files)
    ranks = [batches(stream(data, 3, rank=r, world_size=2), 2) for r in (0, 1)]
    single = batches(stream(data, 6), 2)
    assert len(ranks[0]) == len(ranks[1]) == len(single)
    seen: list[int] = []
    for b0, b1, one in zip(*ranks, single):
        assert not set(b0.indices.tolist()) & set(b1.indices.tolist())
        assert torch.equal(torch.cat([b0.indices, b1.indices]), one.indices)
        assert torch.equal(torch.cat([b0.images, b1.images]), one.images)
        assert torch.equal(torch.cat([b0.labels, b1.labels]), one.labels)
        seen += one.indices.tolist()
    order = draw_epoch_plan(7, 2, n, 0)[0].tolist()
    assert seen == order[: len(seen)] and len(set(seen)) == len(seen)  # the epoch's permutation, each sample once
    assert len(seen) == n - n % 6 + (n % 6 if n % 6 >= 4 else 0)  # the last global batch kept iff both get >= 2


def test_resume_gives_the_remaining_batches_and_decodes_nothing_before(imagenet: FileSplits,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    full = batches(stream(imagenet, 4), 3)
    decoded: list[str] = []
    monkeypatch.setattr(stream_loader, "decode_rgb", lambda p: decoded.append(p) or decode_rgb(p))
    for k in range(len(full) + 1):
        decoded.clear()
        resumed = batches(stream(imagenet, 4), 3, start_step=k)
        same(resumed, full[k:])
        assert sorted(decoded) == sorted(imagenet.train_files[i] for b in full[k:] for i in b.indices.tolist())
    with pytest.raises(UserError, match="resume"):
        batches(stream(imagenet, 4), 3, start_step=len(full) + 1)


@pytest.mark.parametrize("workers", [0, 1])
@pytest.mark.parametrize("train", [True, False])
def test_reading_an_epoch_leaves_the_global_random_state_alone(imagenet: FileSplits, workers: int,
                                                              train: bool) -> None:
    """The run's checkpoints restore the global RNG; each DataLoader iterator drew its workers' seed from it, so
    a resumed epoch (one iterator fewer) left CRD drawing other negatives than the run it continued."""
    torch.manual_seed(123)
    before = torch.get_rng_state()
    assert batches(stream(imagenet, 4, train=train, workers=workers), 2, start_step=1)
    assert torch.equal(torch.get_rng_state(), before)


def test_augmentation_depends_on_seed_epoch_and_position_only(imagenet: FileSplits) -> None:
    """Workers, batch size and rank do not change a sample; the epoch and the seed do."""
    by_four = batches(stream(imagenet, 4), 1)
    same(batches(stream(imagenet, 4, workers=2), 1), by_four)
    by_three = batches(stream(imagenet, 3), 1)
    covered = min(sum(len(b) for b in by_four), sum(len(b) for b in by_three))
    assert torch.equal(torch.cat([b.images for b in by_three])[:covered],
                       torch.cat([b.images for b in by_four])[:covered])
    other_epoch = torch.cat([b.images for b in batches(stream(imagenet, 4), 2)])
    other_seed = torch.cat([b.images for b in batches(stream(imagenet, 4, seed=8), 1)])
    first = torch.cat([b.images for b in by_four])
    assert not torch.equal(first, other_epoch) and not torch.equal(first, other_seed)


def test_eval_shards_are_contiguous_and_are_the_eval_transform(imagenet: FileSplits) -> None:
    loaders = [stream(imagenet, 2, train=False, rank=r, world_size=2) for r in (0, 1)]
    shards = [torch.cat([b.indices for b in batches(loader, 0)]).tolist() for loader in loaders]
    n = len(imagenet.test_files)
    assert shards == [list(range(0, (n + 1) // 2)), list(range((n + 1) // 2, n))]
    single = batches(stream(imagenet, n, train=False), 5)[0]
    for k, path in enumerate(imagenet.test_files):
        # PIL's resize of the decoded file (shorter side to RESIZE, the longer one truncated as Resize(int)
        # documents), then the centre SIZE x SIZE window
        image = Image.fromarray(decode_rgb(path).permute(1, 2, 0).numpy())
        w, h = image.size
        scaled = image.resize((RESIZE, int(h * RESIZE / w)) if w < h else (int(w * RESIZE / h), RESIZE),
                              Image.Resampling.BILINEAR)
        top, left = round((scaled.size[1] - SIZE) / 2), round((scaled.size[0] - SIZE) / 2)
        expected = np.array(scaled)[top: top + SIZE, left: left + SIZE].transpose(2, 0, 1).astype(int)
        got = to_pixels(single.images[k]).numpy().astype(int)
        assert np.abs(got - expected).max() <= 2, path  # two antialiased bilinear resizes agree within 2 levels


def test_a_training_sample_is_a_resized_crop_possibly_mirrored(tmp_path: Path) -> None:
    """With scale 1 and the image's own aspect ratio the crop is the whole image: the sample is PIL's resize
    of the file, or its mirror, and both occur."""
    path = tmp_path / "x.JPEG"
    noise_jpeg(path, np.random.default_rng(seed(2)), 24, 32)
    pixels = decode_rgb(path)
    recipe = InceptionCrop(size=SIZE, resize=RESIZE, scale=(1.0, 1.0), ratio=(32 / 24, 32 / 24))
    resized = np.array(Image.fromarray(pixels.permute(1, 2, 0).numpy()).resize((SIZE, SIZE), Image.Resampling.BILINEAR))
    expected = resized.transpose(2, 0, 1).astype(int)
    flips = []
    for s in range(16):
        got = recipe(pixels, s).numpy().astype(int)
        flipped = np.abs(got[:, :, ::-1] - expected).max() <= 2
        assert flipped or np.abs(got - expected).max() <= 2
        flips.append(flipped)
        assert torch.equal(recipe(pixels, s), recipe(pixels, s))
    assert 0 < sum(flips) < 16


# ---------------------------------------------------------------------------------------------- the image folder


def test_streamed_folder_gives_the_in_memory_batches(folder_root: Path) -> None:
    memory = load_dataset({"name": "imagefolder", "root": str(folder_root), "stream": False})
    streamed = load_dataset({"name": "imagefolder", "root": str(folder_root), "stream": True, "workers": 0})
    assert isinstance(memory, DataSplits) and isinstance(streamed, FileSplits)
    assert streamed.mean == memory.mean and streamed.std == memory.std  # the same exact sums
    assert streamed.image_shape == memory.image_shape and streamed.class_names == memory.class_names
    assert torch.equal(streamed.train_labels, memory.train_labels)
    for split, train in (("train", True), ("test", False)):
        options = dict(train=train, seed=3, views=("standard",) if train else ())
        device = make_loader(memory, split, 4, "cpu", **options)
        files = make_loader(streamed, split, 4, "cpu", **options)
        assert isinstance(device, DeviceLoader) and isinstance(files, StreamLoader) and len(device) == len(files)
        for epoch in (0, 1):
            got, want = batches(files, epoch), batches(device, epoch)
            same(got, want)
            for a, b in zip(got, want):
                assert a.views.keys() == b.views.keys() and all(torch.equal(a.views[k], b.views[k]) for k in a.views)


def test_auto_streams_when_the_decoded_set_exceeds_the_budget(folder_root: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """stream <=> bytes > MEMORY_FRACTION * available / processes on the node, with bytes = N * 3 * H * W."""
    decoded = (22 + 9) * 3 * 16 * 16
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    cfg = {"name": "imagefolder", "root": str(folder_root), "workers": 0}
    for available, streams in ((decoded * 8, False), (decoded * 8 - 8, True)):  # budget = 0.25 * available / 2
        monkeypatch.setattr(streaming, "available_memory", lambda available=available: available)
        assert isinstance(load_dataset({**cfg, "stream": "auto"}), FileSplits) is streams
    assert isinstance(load_dataset({**cfg, "stream": False}), DataSplits)  # false: in memory whatever the budget
    monkeypatch.setattr(streaming, "available_memory", lambda: 10**15)
    assert isinstance(load_dataset({**cfg, "stream": True}), FileSplits)
    with pytest.raises(UserError, match="dataset.stream must be auto, true or false"):
        load_dataset({**cfg, "stream": "sometimes"})


def test_a_file_broken_after_the_check_is_one_line(tmp_path: Path) -> None:
    root = tmp_path / "net"
    imagenet_folder(root, np.random.default_rng(seed(3)), WNIDS[:2], train=3, val=1, special=False)
    data = load_dataset(imagenet_cfg(root))
    victim = Path(data.train_files[0])
    victim.write_bytes(victim.read_bytes()[:200])
    for workers in (0, 1):
        with pytest.raises(UnreadableImage) as info:
            batches(stream(data, 6, train=True, workers=workers), 0)
        assert str(victim) in str(info.value) and "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------- bad input


def bad_imagenet(tmp_path: Path, case: str) -> tuple[Path, dict, str]:
    """A folder with one defect, the config, and what the message must name."""
    root = tmp_path / "bad"
    if case != "missing root":
        imagenet_folder(root, np.random.default_rng(seed(4)), WNIDS[:2], train=2, val=1, special=False)
    cfg = imagenet_cfg(root)
    wnid = WNIDS[0]
    if case == "missing root":
        return root, cfg, str(root)
    if case == "no train":
        shutil.rmtree(root / "train")
        return root, cfg, str(root / "train")
    if case == "no val":
        shutil.rmtree(root / "val")
        return root, cfg, str(root / "val")
    if case == "val lacks a class":
        shutil.rmtree(root / "val" / wnid)
        return root, cfg, wnid
    if case == "val has another class":
        noise_jpeg(root / "val" / "n09999999" / "x.JPEG", np.random.default_rng(0), 8, 8)
        return root, cfg, "n09999999"
    if case == "empty class":
        (root / "train" / "n00000001").mkdir()
        return root, cfg, str(root / "train" / "n00000001")
    if case == "one class":
        for split in ("train", "val"):
            shutil.rmtree(root / split / WNIDS[1])
        return root, cfg, str(root / "train")
    if case == "zero-byte file":
        (root / "train" / wnid / "empty.JPEG").write_bytes(b"")
        return root, cfg, str(root / "train" / wnid / "empty.JPEG")
    if case == "truncated JPEG":
        path = root / "val" / wnid / f"{wnid}_val_0.JPEG"
        path.write_bytes(path.read_bytes()[:300])
        return root, cfg, str(path)
    if case == "three bad files":
        for k in range(3):
            (root / "train" / wnid / f"bad{k}.JPEG").write_text("not an image")
        return root, cfg, "3 image files cannot be decoded"
    if case == "stream false":
        return root, {**cfg, "stream": False}, "dataset.stream"
    if case == "eval_resize below image_size":
        return root, {**cfg, "eval_resize": SIZE - 1}, "dataset.eval_resize"
    raise ValueError(case)


BAD = ["missing root", "no train", "no val", "val lacks a class", "val has another class", "empty class", "one class",
       "zero-byte file", "truncated JPEG", "three bad files", "stream false", "eval_resize below image_size"]


@pytest.mark.parametrize("case", BAD)
def test_bad_imagenet_folder_is_one_line(tmp_path: Path, case: str) -> None:
    root, cfg, named = bad_imagenet(tmp_path, case)
    with pytest.raises(UserError) as info:
        load_dataset(cfg)
    message = str(info.value)
    assert named in message and "\n" not in message, message
    assert not list(root.glob(".kd-check-*")) if root.is_dir() else True  # nothing recorded for a bad folder


# ---------------------------------------------------------------------------------------------- 2 gloo processes


def _rank(rank: int, world: int, root: str, out: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{out}/pg", rank=rank, world_size=world)
    try:
        data = load_dataset(imagenet_cfg(Path(root)))
        loader = StreamLoader(data.train_files, data.train_labels, 3, "cpu", train=True, transform=data.transform,
                              mean=data.mean, std=data.std, seed=7, rank=rank, world_size=world, workers=1)
        steps = []
        for batch in loader.epoch(4):
            gathered: list = [None] * world
            torch.distributed.all_gather_object(gathered, (batch.indices, batch.labels, batch.images))
            steps.append([torch.cat([g[k] for g in gathered]) for k in range(3)])
        if rank == 0:
            torch.save(steps, f"{out}/steps.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_two_gloo_processes_equal_one_process_step_by_step(imagenet_root: Path, imagenet: FileSplits,
                                                           tmp_path: Path) -> None:
    run_ranks(_rank, 2, str(imagenet_root), str(tmp_path))
    steps = torch.load(tmp_path / "steps.pt", weights_only=True)
    single = batches(stream(imagenet, 6), 4)
    assert len(steps) == len(single)
    seen: list[int] = []
    for (indices, labels, images), one in zip(steps, single):
        assert torch.equal(indices, one.indices) and torch.equal(labels, one.labels)
        assert torch.equal(images, one.images)
        seen += indices.tolist()
    assert len(seen) == len(set(seen)) == 18  # 19 samples: the last global batch of 1 is dropped
    assert os.path.exists(tmp_path / "steps.pt")


# ---------------------------------------------------------------------------------------------- config


def test_configs_compose_and_validate(compose) -> None:
    from distiller.config import validation

    typed = validation.validate(compose("train_teacher", ["dataset=imagenet", "dataset.root=/data/imagenet",
                                                      "model=MobileNetV1"]), "train_teacher")
    assert (typed.dataset.name, typed.dataset.image_size, typed.dataset.eval_resize) == ("imagenet", 224, 256)
    assert typed.dataset.stream == "auto" and typed.dataset.workers is None
    for value, parsed in (("true", True), ("false", False), ("auto", "auto")):
        cfg = compose("train_teacher", ["dataset=imagefolder", "dataset.root=/x", f"dataset.stream={value}"])
        assert validation.validate(cfg, "train_teacher").dataset.stream == parsed
    for bad, words in (("dataset.stream=maybe", "dataset.stream=maybe"), ("dataset.workers=-1", "dataset.workers")):
        with pytest.raises(UserError) as info:
            validation.validate(compose("train_teacher", ["dataset=imagenet", "dataset.root=/x", bad]), "train_teacher")
        assert words in str(info.value) and "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------- the benchmark


def test_loader_benchmark_runs_and_its_figures_follow_from_each_other() -> None:
    """scripts/stream_benchmark.py on a tiny generated folder: every figure present and consistent (speed itself is
    never asserted)."""
    from distiller.bench import loader_speed

    result = loader_speed.measure(images=12, workers=(1,), batch_size=4, rounds=1, size=(48, 64))
    assert set(result["decoders_per_core"]) == {"torchvision.io + tensor ops (ours)", "PIL + tensor ops",
                                                "PIL + PIL ops (baseline)"}
    assert all(rate > 0 for rate in result["decoders_per_core"].values())
    rates = result["loaders"]["1"]
    assert rates["ours"] > 0 and rates["torchvision ImageFolder"] > 0
    assert rates["ratio"] == pytest.approx(rates["ours"] / rates["torchvision ImageFolder"])
    assert rates["ours_per_core"] == rates["ours"] and result["mean_file_kb"] > 0
