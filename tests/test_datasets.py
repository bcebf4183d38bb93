"""Data layer: official-format reader, synthetic set, cifar100 preparation, on-device batches.

CPU only, no network (downloads are monkeypatched to fail), tiny sets. Expected
values come from independent computations: torchvision's own CIFAR100 reader,
pickles read naively, sha256 of files, and per-image Python loops.
"""
from __future__ import annotations

import datetime
import hashlib
import logging
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
import torchvision.datasets.cifar as tv_cifar

from common.errors import UserError
from datasets import CIFAR100_MEAN, CIFAR100_STD, DATASETS, DeviceLoader, load_dataset
from datasets.cifar100 import load_pickle
from datasets.synthetic import cache_folder

REAL_CIFAR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar-100-python"
FILES = ("train", "test", "meta")


def synthetic_cfg(root: Path, train_size: int = 200, test_size: int = 100, seed: int = 0) -> dict:
    return {"name": "synthetic", "root": str(root), "train_size": train_size, "test_size": test_size, "seed": seed}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    load_dataset(synthetic_cfg(root))
    return root


@pytest.fixture(scope="module")
def synthetic_folder(synthetic_root: Path) -> Path:
    return synthetic_root / "synthetic-200-100-seed0" / "cifar-100-python"


# ----------------------------------------------------------------------------------------------
# Registry and config handling


def test_registry_names_and_unknown_dataset() -> None:
    assert {"cifar10", "cifar100", "imagefolder", "imagenet", "synthetic"} <= set(DATASETS.names())
    with pytest.raises(UserError) as err:
        load_dataset({"name": "svhn", "root": "unused"})
    assert "svhn" in str(err.value) and all(name in str(err.value) for name in DATASETS.names())


def test_num_classes_mismatch_is_a_user_error(synthetic_root: Path) -> None:
    # (for dataset=synthetic num_classes picks the set: 100 or 10 classes)
    cfg = {"name": "cifar100", "root": str(synthetic_root / "synthetic-200-100-seed0"), "verify_checksums": False,
           "download": False, "num_classes": 10}
    with pytest.raises(UserError, match="dataset.num_classes=10 but the cifar100 data set has 100 classes"):
        load_dataset(cfg)


def test_root_defaults_to_env_var(synthetic_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KD_DATA_ROOT", str(synthetic_root))
    cfg = synthetic_cfg(synthetic_root)
    del cfg["root"]
    splits = load_dataset(cfg)
    assert splits.train_labels.shape == (200,)


@pytest.mark.parametrize("train_size", [99, 0, "many", True])
def test_bad_synthetic_size_is_a_user_error(tmp_path: Path, train_size: object) -> None:
    with pytest.raises(UserError, match="train_size"):
        load_dataset({**synthetic_cfg(tmp_path), "train_size": train_size})


# ----------------------------------------------------------------------------------------------
# Synthetic set: format, determinism, cache


def test_cache_location_names_sizes_and_seed(tmp_path: Path) -> None:
    load_dataset(synthetic_cfg(tmp_path, 150, 30, seed=7))
    folder = tmp_path / "synthetic-150-30-seed7" / "cifar-100-python"
    assert cache_folder(tmp_path, 150, 30, 7) == folder
    assert sorted(p.name for p in folder.iterdir()) == ["meta", "test", "train"]  # no temp files left


def test_torchvision_reads_synthetic_folder(synthetic_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Bypass only torchvision's md5 checks (our bytes are not the official archive's).
    monkeypatch.setattr(torchvision.datasets.CIFAR100, "_check_integrity", lambda self: True)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)
    ours = load_dataset(synthetic_cfg(synthetic_folder.parents[1]))
    splits = ((True, ours.train_images, ours.train_labels), (False, ours.test_images, ours.test_labels))
    for train, images, labels in splits:
        tv = torchvision.datasets.CIFAR100(str(synthetic_folder.parent), train=train, download=False)
        assert np.array_equal(tv.data, images.permute(0, 2, 3, 1).numpy())  # torchvision stores HWC
        assert tv.targets == labels.tolist()
        assert tv.classes == ours.class_names
        image, target = tv[0]  # the PIL path works too
        assert image.size == (32, 32) and target == labels[0].item()


def test_synthetic_files_have_official_keys(synthetic_folder: Path) -> None:
    official = {"filenames", "batch_label", "fine_labels", "coarse_labels", "data"}
    for split, size in (("train", 200), ("test", 100)):
        with open(synthetic_folder / split, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
        assert set(entry) == official
        assert entry["data"].dtype == np.uint8 and entry["data"].shape == (size, 3072)
        assert len(entry["filenames"]) == size and isinstance(entry["batch_label"], str)
        # Each fine class belongs to exactly one of the 20 coarse classes.
        pairs = set(zip(entry["fine_labels"], entry["coarse_labels"]))
        assert len({fine for fine, _ in pairs}) == len(pairs)
        assert {coarse for _, coarse in pairs} <= set(range(20))
    with open(synthetic_folder / "meta", "rb") as f:
        meta = pickle.load(f, encoding="latin1")
    assert set(meta) == {"fine_label_names", "coarse_label_names"}
    assert len(meta["fine_label_names"]) == 100 and len(meta["coarse_label_names"]) == 20


def test_reader_matches_naive_pickles(synthetic_folder: Path) -> None:
    ours = load_dataset(synthetic_cfg(synthetic_folder.parents[1]))
    for split, images, labels in (
        ("train", ours.train_images, ours.train_labels),
        ("test", ours.test_images, ours.test_labels),
    ):
        with open(synthetic_folder / split, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
        assert images.dtype == torch.uint8 and images.shape == (len(entry["data"]), 3, 32, 32)
        assert labels.dtype == torch.int64 and labels.tolist() == entry["fine_labels"]
        # Channel-planar rows: 1024 red, then green, then blue values, row-major.
        for n in (0, len(entry["data"]) - 1):
            for c in range(3):
                for y in (0, 13, 31):
                    for x in (0, 7, 31):
                        assert images[n, c, y, x].item() == entry["data"][n][c * 1024 + y * 32 + x]
    assert ours.num_classes == 100 and len(ours.class_names) == 100


def test_synthetic_labels_cover_every_class(synthetic_root: Path, tmp_path: Path) -> None:
    ours = load_dataset(synthetic_cfg(synthetic_root))
    assert torch.bincount(ours.train_labels, minlength=100).tolist() == [2] * 100
    assert torch.bincount(ours.test_labels, minlength=100).tolist() == [1] * 100
    small = load_dataset(synthetic_cfg(tmp_path, train_size=130, test_size=40))
    counts = torch.bincount(small.train_labels, minlength=100)
    assert counts.min() == 1 and counts.max() == 2  # balanced within one
    assert len(set(small.test_labels.tolist())) == 40


def test_same_seed_same_bytes_different_seed_different(tmp_path: Path) -> None:
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        load_dataset(synthetic_cfg(tmp_path / name, 120, 20, seed=seed))
    digests = {
        name: [sha256(cache_folder(tmp_path / name, 120, 20, seed) / f) for f in FILES]
        for name, seed in (("a", 3), ("b", 3), ("c", 4))
    }
    assert digests["a"] == digests["b"]
    assert digests["a"][0] != digests["c"][0] and digests["a"][1] != digests["c"][1]


def test_test_split_does_not_depend_on_train_size(tmp_path: Path) -> None:
    small = load_dataset(synthetic_cfg(tmp_path, 100, 50))
    large = load_dataset(synthetic_cfg(tmp_path, 300, 50))
    assert torch.equal(small.test_images, large.test_images)
    assert torch.equal(small.test_labels, large.test_labels)


def test_synthetic_has_class_structure(tmp_path: Path) -> None:
    """Even a nearest-centroid rule on per-channel mean and std beats chance (1%) many times."""
    ours = load_dataset(synthetic_cfg(tmp_path, 2000, 500))

    def features(images: torch.Tensor) -> torch.Tensor:
        x = images.double() / 255
        return torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)

    train, test = features(ours.train_images), features(ours.test_images)
    centroids = torch.stack([train[ours.train_labels == c].mean(0) for c in range(100)])
    predicted = torch.cdist(test, centroids).argmin(1)
    accuracy = (predicted == ours.test_labels).double().mean().item()
    assert accuracy > 0.08


def corrupt_truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def corrupt_garbage(path: Path) -> None:
    path.write_bytes(b"this is not a pickle" * 10)


def corrupt_wrong_shape(path: Path) -> None:
    entry = {"data": np.zeros((200, 1024), np.uint8), "fine_labels": [0] * 200, "coarse_labels": [0] * 200}
    path.write_bytes(pickle.dumps(entry))


def corrupt_foreign_object(path: Path) -> None:
    # A pickle that names a non-numpy global must be refused, not executed.
    path.write_bytes(pickle.dumps({"data": datetime.date(2020, 1, 1)}))


@pytest.mark.parametrize("corrupt", [corrupt_truncate, corrupt_garbage, corrupt_wrong_shape, corrupt_foreign_object])
@pytest.mark.parametrize("victim", ["train", "meta"])
def test_corrupt_cache_is_regenerated(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, corrupt: object, victim: str
) -> None:
    cfg = synthetic_cfg(tmp_path, 120, 20)
    before = load_dataset(cfg)
    path = cache_folder(tmp_path, 120, 20, 0) / victim
    digest = sha256(path)
    corrupt(path)  # type: ignore[operator]
    with caplog.at_level(logging.WARNING, logger="datasets.synthetic"):
        after = load_dataset(cfg)
    assert any("regenerating" in r.getMessage() for r in caplog.records)
    assert torch.equal(before.train_images, after.train_images)
    assert torch.equal(before.train_labels, after.train_labels)
    assert torch.equal(before.test_images, after.test_images)
    assert sha256(path) == digest


def test_reader_refuses_foreign_objects(tmp_path: Path) -> None:
    path = tmp_path / "train"
    corrupt_foreign_object(path)
    with pytest.raises(UserError, match="unexpected object datetime.date"):
        load_pickle(path)


def test_reader_accepts_numpy1_protocol2_pickles(tmp_path: Path, synthetic_folder: Path) -> None:
    """The official archive was pickled by Python 2 with numpy 1 (protocol 2, numpy.core names)."""
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name in FILES:
        with open(synthetic_folder / name, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
        raw = pickle.dumps(entry, protocol=2)
        assert b"numpy._core.multiarray\n" in raw or name == "meta"
        (folder / name).write_bytes(raw.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n"))
    ours = load_dataset({"name": "cifar100", "root": str(tmp_path), "verify_checksums": False, "download": False})
    expected = load_dataset(synthetic_cfg(synthetic_folder.parents[1]))
    assert torch.equal(ours.train_images, expected.train_images)
    assert torch.equal(ours.test_labels, expected.test_labels)


def test_missing_cache_file_is_regenerated(tmp_path: Path) -> None:
    cfg = synthetic_cfg(tmp_path, 120, 20)
    before = load_dataset(cfg)
    (cache_folder(tmp_path, 120, 20, 0) / "test").unlink()
    assert torch.equal(load_dataset(cfg).test_images, before.test_images)


def test_crash_while_writing_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import common.files as files

    def crash(obj: object, f: object, protocol: int) -> None:
        f.write(b"half a file")  # type: ignore[attr-defined]
        raise KeyboardInterrupt

    monkeypatch.setattr(files.pickle, "dump", crash)  # the one atomic writer
    with pytest.raises(KeyboardInterrupt):
        load_dataset(synthetic_cfg(tmp_path, 120, 20))
    folder = cache_folder(tmp_path, 120, 20, 0)
    assert list(folder.iterdir()) == []  # neither the final file nor the temporary one
    monkeypatch.undo()
    assert load_dataset(synthetic_cfg(tmp_path, 120, 20)).train_labels.shape == (120,)


# ----------------------------------------------------------------------------------------------
# Real CIFAR-100: reader on the local copy, offline behaviour, archive handling


@pytest.mark.skipif(not REAL_CIFAR.is_dir(), reason="no local CIFAR-100 copy")
@pytest.mark.parametrize("root", [REAL_CIFAR.parent, REAL_CIFAR])
def test_real_cifar100_reader(root: Path) -> None:
    cfg = {"name": "cifar100", "root": str(root), "download": False, "verify_checksums": False}
    splits = load_dataset(cfg)
    assert splits.train_images.shape == (50000, 3, 32, 32) and splits.test_images.shape == (10000, 3, 32, 32)
    assert splits.train_labels[0].item() == 19 and splits.test_labels[0].item() == 49
    assert splits.class_names[19] == "cattle" and splits.class_names[49] == "mountain"
    assert torch.bincount(splits.train_labels, minlength=100).tolist() == [500] * 100
    assert torch.bincount(splits.test_labels, minlength=100).tolist() == [100] * 100


@pytest.mark.skipif(not REAL_CIFAR.is_dir(), reason="no local CIFAR-100 copy")
def test_reconstructed_copy_fails_the_official_checksum() -> None:
    cfg = {"name": "cifar100", "root": str(REAL_CIFAR.parent), "download": False, "verify_checksums": True}
    with pytest.raises(UserError, match="verify_checksums=false"):
        load_dataset(cfg)


@pytest.mark.parametrize("download", [True, False])
def test_offline_missing_cifar100_says_where_to_put_the_archive(tmp_path: Path, offline: None, download: bool) -> None:
    cfg = {"name": "cifar100", "root": str(tmp_path), "download": download}
    with pytest.raises(UserError) as info:
        load_dataset(cfg)
    message = str(info.value)
    assert str(tmp_path / "cifar-100-python.tar.gz") in message
    assert str(tmp_path / "cifar-100-python") in message
    assert "\n" not in message
    if download:
        assert "network is unreachable" in message


def make_archive(folder: Path, archive: Path) -> None:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="cifar-100-python")


def test_archive_is_extracted_without_download(tmp_path: Path, synthetic_folder: Path, offline: None) -> None:
    make_archive(synthetic_folder, tmp_path / "cifar-100-python.tar.gz")
    cfg = {"name": "cifar100", "root": str(tmp_path), "verify_checksums": False}
    splits = load_dataset(cfg)
    expected = load_dataset(synthetic_cfg(synthetic_folder.parents[1]))
    assert torch.equal(splits.train_images, expected.train_images)
    assert torch.equal(splits.test_labels, expected.test_labels)


def test_archive_with_wrong_checksum_is_a_user_error(tmp_path: Path, synthetic_folder: Path, offline: None) -> None:
    make_archive(synthetic_folder, tmp_path / "cifar-100-python.tar.gz")
    with pytest.raises(UserError, match="does not match the official checksum"):
        load_dataset({"name": "cifar100", "root": str(tmp_path)})


def test_broken_archive_is_a_user_error(tmp_path: Path, offline: None) -> None:
    (tmp_path / "cifar-100-python.tar.gz").write_bytes(b"not a tar file")
    with pytest.raises(UserError, match="cannot extract"):
        load_dataset({"name": "cifar100", "root": str(tmp_path), "verify_checksums": False})


def test_corrupt_real_folder_is_a_user_error(tmp_path: Path, synthetic_folder: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name in FILES:
        (folder / name).write_bytes((synthetic_folder / name).read_bytes())
    corrupt_truncate(folder / "test")
    with pytest.raises(UserError, match="cannot read .*test"):
        load_dataset({"name": "cifar100", "root": str(tmp_path), "verify_checksums": False, "download": False})


# ----------------------------------------------------------------------------------------------
# DeviceLoader

MEAN = torch.tensor(CIFAR100_MEAN, dtype=torch.float64).view(3, 1, 1)
STD = torch.tensor(CIFAR100_STD, dtype=torch.float64).view(3, 1, 1)


def noise_set(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random-noise images: every 32x32 window of one is unique, so matches are unambiguous."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 32, 32), generator=gen, dtype=torch.uint8)
    return images, torch.randint(0, 100, (n,), generator=gen)


def naive_normalise(image: torch.Tensor) -> torch.Tensor:
    out = torch.empty(image.shape, dtype=torch.float64)
    for c in range(3):
        out[c] = (image[c].double() / 255.0 - CIFAR100_MEAN[c]) / CIFAR100_STD[c]
    return out


def naive_windows(image: torch.Tensor) -> list[tuple[int, int, bool, torch.Tensor]]:
    """All 81 crops x 2 flips of the zero-padded uint8 image, built with plain loops."""
    padded = torch.zeros(3, 40, 40, dtype=torch.uint8)
    padded[:, 4:36, 4:36] = image
    windows = []
    for oy in range(9):
        for ox in range(9):
            crop = padded[:, oy : oy + 32, ox : ox + 32]
            windows.append((oy, ox, False, crop))
            windows.append((oy, ox, True, crop[:, :, [31 - j for j in range(32)]]))
    return windows


def unnormalise(image: torch.Tensor) -> torch.Tensor:
    """Back to uint8 pixels (exact: the normalisation error is far below half a grey level)."""
    return torch.round((image.double() * STD + MEAN) * 255).to(torch.uint8)


def batches(loader: DeviceLoader, epoch: int, start_step: int = 0) -> list:
    return list(loader.epoch(epoch, start_step))


def test_augmented_images_are_padded_windows_possibly_mirrored() -> None:
    images, labels = noise_set(37)
    loader = DeviceLoader(images, labels, 8, "cpu", train=True, seed=5)
    found = []
    for epoch in (0, 1):
        order, offsets, flips = loader.epoch_plan(epoch)
        position = 0
        for batch in loader.epoch(epoch):
            assert batch.images.dtype == torch.float32 and batch.images.shape == (len(batch), 3, 32, 32)
            for k in range(len(batch)):
                index = batch.indices[k].item()
                pixels = unnormalise(batch.images[k])
                matches = [
                    (oy, ox, flip, window)
                    for oy, ox, flip, window in naive_windows(images[index])
                    if torch.equal(pixels, window)
                ]
                assert len(matches) == 1, f"image {k} of a batch is no padded window of sample {index}"
                oy, ox, flip, window = matches[0]
                assert torch.allclose(batch.images[k].double(), naive_normalise(window), atol=1e-5)
                # The plan of the epoch is what was applied, position by position.
                expected = (offsets[position, 0].item(), offsets[position, 1].item(), flips[position].item())
                assert (oy, ox, flip) == expected
                assert order[position].item() == index
                found.append((oy, ox, flip))
                position += 1
    assert {flip for _, _, flip in found} == {False, True}
    assert {oy for oy, _, _ in found} >= {0, 8} and {ox for _, ox, _ in found} >= {0, 8}
    assert 0.3 < sum(flip for _, _, flip in found) / len(found) < 0.7


def test_labels_follow_indices() -> None:
    images, labels = noise_set(37)
    for train in (True, False):
        for batch in DeviceLoader(images, labels, 8, "cpu", train=train).epoch(0):
            assert batch.labels.dtype == torch.int64 and batch.indices.dtype == torch.int64
            assert torch.equal(batch.labels, labels[batch.indices])
            assert batch.extras == {}


def test_eval_is_ordered_normalised_and_complete() -> None:
    images, labels = noise_set(37)
    loader = DeviceLoader(images, labels, 10, "cpu", train=False)
    got = batches(loader, 0)
    assert [len(b) for b in got] == [10, 10, 10, 7] and len(loader) == 4
    assert torch.cat([b.indices for b in got]).tolist() == list(range(37))
    for batch in got:
        for k in range(len(batch)):
            expected = naive_normalise(images[batch.indices[k]])
            assert torch.allclose(batch.images[k].double(), expected, atol=1e-5)
    assert batches(loader, 3)[0].images.equal(got[0].images)  # eval ignores the epoch


def test_same_seed_same_batches_and_epochs_differ() -> None:
    images, labels = noise_set(37)
    first = batches(DeviceLoader(images, labels, 8, "cpu", train=True, seed=1), 4)
    again = batches(DeviceLoader(images, labels, 8, "cpu", train=True, seed=1), 4)
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.images, b.images)
    other_epoch = batches(DeviceLoader(images, labels, 8, "cpu", train=True, seed=1), 5)
    other_seed = batches(DeviceLoader(images, labels, 8, "cpu", train=True, seed=2), 4)
    assert not torch.equal(first[0].indices, other_epoch[0].indices)
    assert not torch.equal(first[0].indices, other_seed[0].indices)


@pytest.mark.parametrize(
    ("n", "sizes"),
    [(37, [8, 8, 8, 8, 5]), (32, [8, 8, 8, 8]), (34, [8, 8, 8, 8, 2]), (33, [8, 8, 8, 8])],  # 33: lone sample dropped
)
def test_every_sample_once_per_epoch(n: int, sizes: list[int]) -> None:
    images, labels = noise_set(n)
    loader = DeviceLoader(images, labels, 8, "cpu", train=True)
    assert len(loader) == len(sizes)
    for epoch in (0, 1):
        got = batches(loader, epoch)
        assert [len(b) for b in got] == sizes
        seen = torch.cat([b.indices for b in got]).tolist()
        assert len(set(seen)) == len(seen) == sum(sizes)
        assert set(seen) <= set(range(n))


def test_start_step_resumes_without_computing_skipped_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    images, labels = noise_set(37)
    loader = DeviceLoader(images, labels, 8, "cpu", train=True, seed=3)
    full = batches(loader, 2)
    calls = []
    import datasets.device_loader as device_loader

    original = device_loader.crop_and_flip
    monkeypatch.setattr(device_loader, "crop_and_flip", lambda *a: calls.append(1) or original(*a))
    for k in range(len(full) + 1):
        calls.clear()
        resumed = batches(DeviceLoader(images, labels, 8, "cpu", train=True, seed=3), 2, start_step=k)
        assert len(calls) == len(full) - k  # skipped steps cost nothing
        assert len(resumed) == len(full) - k
        for a, b in zip(resumed, full[k:], strict=True):
            assert torch.equal(a.indices, b.indices) and torch.equal(a.images, b.images)
    with pytest.raises(UserError, match="resume"):
        batches(loader, 2, start_step=len(full) + 1)


@pytest.mark.parametrize(
    ("n", "rank_sizes"),
    [
        (37, [[4, 4, 4, 4, 3], [4, 4, 4, 4, 2]]),  # last global batch of 5 split 3 + 2
        (40, [[4] * 5, [4] * 5]),
        (36, [[4, 4, 4, 4, 2], [4, 4, 4, 4, 2]]),
        (35, [[4] * 4, [4] * 4]),  # last global batch of 3 cannot give both ranks 2: dropped
    ],
)
def test_ddp_shards_are_disjoint_and_form_the_single_process_batch(n: int, rank_sizes: list[list[int]]) -> None:
    images, labels = noise_set(n)
    ranks = [
        batches(DeviceLoader(images, labels, 4, "cpu", train=True, seed=9, rank=r, world_size=2), 1) for r in (0, 1)
    ]
    single = batches(DeviceLoader(images, labels, 8, "cpu", train=True, seed=9), 1)
    assert [[len(b) for b in rank] for rank in ranks] == rank_sizes
    seen: list[int] = []
    for step, (b0, b1) in enumerate(zip(*ranks, strict=True)):
        assert not set(b0.indices.tolist()) & set(b1.indices.tolist())
        assert torch.equal(torch.cat([b0.indices, b1.indices]), single[step].indices)
        assert torch.equal(torch.cat([b0.images, b1.images]), single[step].images)
        seen += b0.indices.tolist() + b1.indices.tolist()
    assert len(seen) == len(set(seen))


def test_ddp_eval_shards_cover_everything_once_in_order() -> None:
    images, labels = noise_set(37)
    loaders = [DeviceLoader(images, labels, 5, "cpu", train=False, rank=r, world_size=2) for r in (0, 1)]
    shards = [torch.cat([b.indices for b in batches(loader, 0)]).tolist() for loader in loaders]
    assert shards == [list(range(19)), list(range(19, 37))]
    single = batches(DeviceLoader(images, labels, 37, "cpu", train=False), 0)[0]
    merged = torch.cat([b.images for loader in loaders for b in batches(loader, 0)])
    assert torch.equal(merged, single.images)


def test_too_small_training_set_is_a_user_error() -> None:
    images, labels = noise_set(3)
    with pytest.raises(UserError, match="too few"):
        DeviceLoader(images, labels, 4, "cpu", train=True, rank=0, world_size=2)
    with pytest.raises(UserError, match="batch size"):
        DeviceLoader(images, labels, 0, "cpu", train=True)


def test_channels_last_keeps_values() -> None:
    images, labels = noise_set(37)
    plain = batches(DeviceLoader(images, labels, 8, "cpu", train=True), 0)
    fast = batches(DeviceLoader(images, labels, 8, "cpu", train=True, channels_last=True), 0)
    for a, b in zip(plain, fast, strict=True):
        assert b.images.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(a.images, b.images)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_equal_cpu_batches() -> None:
    images, labels = noise_set(37)
    cpu = batches(DeviceLoader(images, labels, 8, "cpu", train=True, seed=4), 1)
    gpu = batches(DeviceLoader(images, labels, 8, torch.device("cuda"), train=True, seed=4), 1)
    for a, b in zip(cpu, gpu, strict=True):
        assert b.images.device.type == "cuda" and b.indices.device.type == "cuda"
        assert torch.equal(a.indices, b.indices.cpu())
        assert torch.allclose(a.images, b.images.cpu(), atol=1e-6)
