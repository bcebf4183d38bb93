"""A generated stand-in for CIFAR-100 (or CIFAR-10) with real class structure, cached in the official format.

Why: no test and no demo may download anything, yet the whole pipeline (reader,
augmentation, training, distillation) should run on data where accuracy means
something. Each of the 100 classes is a smooth texture: a plaid of two gratings
(class-specific spatial frequency and orientation) blending two class colours.
Classes come in 20 coarse groups of 5 that share their colour pair (up to a
class shade), so colour mostly narrows a sample to its group and the texture
has to tell the rest (as with CIFAR-100's superclasses). Every sample gets its own phase (a random
shift), jittered frequency / orientation / sharpness / colours, a brightness
change, a lighting gradient and pixel noise, so no single pixel gives the class
away. The plaid is mirror-symmetric, so horizontal flips keep the class; the
texture fills the image, so random crops keep it too.

The set is written once to ``<root>/synthetic-<train>-<test>-seed<seed>/cifar-100-python/``
(train/test/meta pickles with the official keys) and read back by the same reader
as the real data. Generation is deterministic: same sizes and seed, same bytes.

``dataset.num_classes=10`` makes the CIFAR-10 stand-in instead: 10 classes in 2 groups of 5
(as CIFAR-10's vehicles and animals), written in the ``cifar-10-batches-py`` layout
(five training batches, ``test_batch``, ``batches.meta``) under
``<root>/synthetic10-<train>-<test>-seed<seed>/`` and read by the CIFAR-10 reader.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import UserError
from common.files import atomic_write
from datasets import cifar
from datasets.base import DATASETS, CorruptDataError, DatasetFacts, DataSplits, cfg_int, data_root
from datasets.cifar10 import CIFAR10
from datasets.cifar100 import CIFAR100

log = logging.getLogger(__name__)

DEFAULT_TRAIN_SIZE = 10000
DEFAULT_TEST_SIZE = 2000
_CHUNK = 1000  # images rendered at a time, bounding float32 scratch memory to ~40 MB
_SIZE = 32
PER_GROUP = 5  # classes per coarse group (they share a colour pair)
NUM_CLASSES = 100
FORMATS = {100: CIFAR100, 10: CIFAR10}  # class count -> the archive the stand-in mimics


def label_names(num_classes: int = NUM_CLASSES) -> list[str]:
    """The synthetic class names: ``class_00`` .. ``class_<num_classes - 1>``."""
    return [f"class_{i:02d}" for i in range(num_classes)]


def coarse_names(num_classes: int = NUM_CLASSES) -> list[str]:
    return [f"group_{i:02d}" for i in range(num_classes // PER_GROUP)]


FINE_LABEL_NAMES = label_names(NUM_CLASSES)
COARSE_LABEL_NAMES = coarse_names(NUM_CLASSES)


def cache_folder(root: Path, train_size: int, test_size: int, seed: int, num_classes: int = NUM_CLASSES) -> Path:
    """Where a given set lives; class count, sizes and seed are in the name so different sets never clash."""
    prefix = "synthetic" if num_classes == NUM_CLASSES else f"synthetic{num_classes}"
    return Path(root) / f"{prefix}-{train_size}-{test_size}-seed{seed}" / FORMATS[num_classes].base_folder


def coarse_label(fine: np.ndarray) -> np.ndarray:
    """Classes 5g..5g+4 form coarse group g (they share a colour pair)."""
    return fine // PER_GROUP


def _prototypes(rng: np.random.Generator, num_classes: int = NUM_CLASSES) -> dict[str, np.ndarray]:
    """Per-class texture and colour parameters."""
    per_group = PER_GROUP
    groups = num_classes // per_group
    # A group's two colours differ by a step of length 0.45-0.65 in a random direction, so
    # every texture has visible contrast (a class with invisible texture would be unlearnable).
    colour_a = rng.uniform(0.1, 0.9, size=(groups, 3))
    step = rng.normal(size=(groups, 3))
    step *= rng.uniform(0.45, 0.65, size=(groups, 1)) / np.linalg.norm(step, axis=1, keepdims=True)
    colour_b = np.clip(colour_a + step, 0.0, 1.0)
    # Within a group the five orientations are spread over [0, 90) degrees (a mirror-symmetric
    # plaid at angle t looks the same at 180 - t), starting at a random angle per group.
    start = rng.uniform(0.0, np.pi / 2, size=(groups, 1))
    theta = (start + np.arange(per_group) * (np.pi / 2) / per_group) % (np.pi / 2)
    # Spatial frequency in cycles per pixel (periods of ~3.5 to ~13 pixels), log-spaced levels
    # dealt out in a random order per group: fine classes differ in frequency and orientation.
    levels = np.geomspace(0.075, 0.28, per_group)
    freq = np.stack([rng.permutation(levels) for _ in range(groups)])
    # Fine classes of a group share its colours up to a class shade about as large as the
    # per-sample colour jitter: colour helps to tell them apart, texture has to do the rest.
    shade = rng.normal(0.0, 0.07, size=(num_classes, 2, 3))
    return {
        "colour_a": np.repeat(colour_a, per_group, axis=0) + shade[:, 0],
        "colour_b": np.repeat(colour_b, per_group, axis=0) + shade[:, 1],
        "theta": theta.reshape(-1),
        "freq": freq.reshape(-1),
    }


def _balanced_labels(n: int, rng: np.random.Generator, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """``n`` labels in shuffled order, each class count within one of the others (all present if n >= classes)."""
    return rng.permutation(np.arange(n, dtype=np.int64) % num_classes)


def _render(labels: np.ndarray, proto: dict[str, np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """uint8 images [N, 3, 32, 32] for ``labels``; all per-sample randomness comes from ``rng``."""
    n = labels.shape[0]
    # Per-sample nuisance parameters, drawn up front so the result does not depend on _CHUNK.
    theta = proto["theta"][labels] + rng.normal(0.0, np.deg2rad(5.0), n)
    freq = proto["freq"][labels] * np.exp(rng.normal(0.0, 0.08, n))
    phase = rng.uniform(0.0, 2 * np.pi, size=(n, 2))
    sharp = rng.uniform(1.5, 4.0, n)
    cast = rng.normal(0.0, 0.02, (n, 3))  # a colour cast shared by both colours of a sample
    colour_a = proto["colour_a"][labels] + cast + rng.normal(0.0, 0.04, (n, 3))
    colour_b = proto["colour_b"][labels] + cast + rng.normal(0.0, 0.04, (n, 3))
    gain = rng.uniform(0.7, 1.3, n)
    gradient = rng.normal(0.0, 0.08, (n, 2))  # lighting ramp across the image, per axis
    out = np.empty((n, 3, _SIZE, _SIZE), dtype=np.uint8)
    grid = (np.arange(_SIZE, dtype=np.float32) - (_SIZE - 1) / 2)
    ys, xs = np.meshgrid(grid, grid, indexing="ij")  # [32, 32] each
    for lo in range(0, n, _CHUNK):
        s = slice(lo, min(lo + _CHUNK, n))
        k = (2 * np.pi * freq[s]).astype(np.float32)[:, None, None]
        kx = k * np.cos(theta[s]).astype(np.float32)[:, None, None]
        ky = k * np.sin(theta[s]).astype(np.float32)[:, None, None]
        p1 = phase[s, 0].astype(np.float32)[:, None, None]
        p2 = phase[s, 1].astype(np.float32)[:, None, None]
        # Two gratings mirrored about the vertical axis: the sum is a plaid whose mirror image
        # is the same pattern shifted, so a horizontal flip keeps the class.
        plaid = 0.5 * (np.cos(kx * xs + ky * ys + p1) + np.cos(-kx * xs + ky * ys + p2))
        mix = 0.5 + 0.5 * np.tanh(sharp[s].astype(np.float32)[:, None, None] * plaid)  # [n, 32, 32]
        a = colour_a[s].astype(np.float32)[:, :, None, None]
        b = colour_b[s].astype(np.float32)[:, :, None, None]
        img = b + (a - b) * mix[:, None]
        ramp = (gradient[s, 0, None, None] * ys + gradient[s, 1, None, None] * xs) / (_SIZE / 2)
        img = img * gain[s].astype(np.float32)[:, None, None, None] + ramp.astype(np.float32)[:, None]
        img += rng.normal(0.0, 0.05, img.shape).astype(np.float32)
        out[s] = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
    return out


def _split_dict(images: np.ndarray, labels: np.ndarray, split: str) -> dict[str, Any]:
    """One CIFAR-100 split in the official layout (same keys, same key order, same types)."""
    return {
        "filenames": [f"synthetic_{split}_{i:06d}.png" for i in range(labels.shape[0])],
        "batch_label": f"{'training' if split == 'train' else 'testing'} batch 1 of 1",
        "fine_labels": labels.tolist(),
        "coarse_labels": coarse_label(labels).tolist(),
        "data": images.reshape(images.shape[0], -1),
    }


def _batch_dict(images: np.ndarray, labels: np.ndarray, label: str, first: int) -> dict[str, Any]:
    """One CIFAR-10 batch file in the official layout (same keys, same key order, same types)."""
    return {
        "batch_label": label,
        "labels": labels.tolist(),
        "data": images.reshape(images.shape[0], -1),
        "filenames": [f"synthetic_{first + i:06d}.png" for i in range(labels.shape[0])],
    }


def generate(train_size: int, test_size: int, seed: int, num_classes: int = NUM_CLASSES) -> dict[str, dict[str, Any]]:
    """The files' contents of the set with these sizes and seed, by file name of the mimicked archive.

    Independent streams for prototypes, train and test (SeedSequence.spawn), so the test
    set does not change with ``train_size``.
    """
    proto_seq, train_seq, test_seq = np.random.SeedSequence(seed).spawn(3)
    proto = _prototypes(np.random.default_rng(proto_seq), num_classes)
    splits = {}
    for split, size, seq in (("train", train_size, train_seq), ("test", test_size, test_seq)):
        rng = np.random.default_rng(seq)
        labels = _balanced_labels(size, rng, num_classes)
        splits[split] = (_render(labels, proto, rng), labels)
    if num_classes == NUM_CLASSES:
        return {
            "train": _split_dict(*splits["train"], "train"),
            "test": _split_dict(*splits["test"], "test"),
            "meta": {"fine_label_names": label_names(num_classes), "coarse_label_names": coarse_names(num_classes)},
        }
    fmt = FORMATS[num_classes]
    batches = len(fmt.train_files)
    bounds = np.linspace(0, train_size, batches + 1).round().astype(int)  # near-equal contiguous batches
    files: dict[str, dict[str, Any]] = {}
    for k, name in enumerate(fmt.train_files):
        lo, hi = bounds[k], bounds[k + 1]
        images, labels = splits["train"][0][lo:hi], splits["train"][1][lo:hi]
        files[name] = _batch_dict(images, labels, f"training batch {k + 1} of {batches}", int(lo))
    files[fmt.test_files[0]] = _batch_dict(*splits["test"], "testing batch 1 of 1", 0)
    files[fmt.meta_file] = {"num_cases_per_batch": int(bounds[1]), "label_names": label_names(num_classes),
                            "num_vis": 3 * _SIZE * _SIZE}
    return files


def write_synthetic(folder: Path, train_size: int, test_size: int, seed: int, num_classes: int = NUM_CLASSES) -> None:
    """Generate the set and write it into ``folder`` (meta last, so a complete folder has every file)."""
    start = time.perf_counter()
    files = generate(train_size, test_size, seed, num_classes)
    meta = FORMATS[num_classes].meta_file
    folder.mkdir(parents=True, exist_ok=True)
    for name in sorted(files, key=lambda n: n == meta):
        atomic_write(files[name], folder / name, "pickle")
    log.info("generated synthetic data set in %s (%.1f s)", folder, time.perf_counter() - start)


def _read_checked(folder: Path, train_size: int, test_size: int, num_classes: int = NUM_CLASSES) -> DataSplits:
    """Read the cache and check it is the set that was asked for (sizes, classes present)."""
    splits = cifar.read_folder(folder, FORMATS[num_classes])
    if splits.train_labels.shape[0] != train_size or splits.test_labels.shape[0] != test_size:
        raise CorruptDataError(
            f"{folder} holds {splits.train_labels.shape[0]}/{splits.test_labels.shape[0]} images, "
            f"expected {train_size}/{test_size}"
        )
    if splits.class_names != label_names(num_classes):
        raise CorruptDataError(f"{folder}/{FORMATS[num_classes].meta_file} does not hold the synthetic class names")
    return splits


def synthetic_classes(cfg: Mapping[str, Any]) -> int:
    """``dataset.num_classes``: 100 (the CIFAR-100 stand-in, the default) or 10 (the CIFAR-10 one)."""
    value = cfg_int(cfg, "num_classes", NUM_CLASSES, minimum=1)
    if value not in FORMATS:
        raise UserError(f"dataset.num_classes={value} is not valid for dataset=synthetic; use 100 (the CIFAR-100 "
                        f"stand-in) or 10 (the CIFAR-10 one)")
    return value


@DATASETS.register("synthetic", facts=DatasetFacts(image_size=(_SIZE, _SIZE), channels=3),
                   options=("train_size", "test_size", "seed"), check=synthetic_classes, default_classes=NUM_CLASSES)
def load_synthetic(cfg: Mapping[str, Any]) -> DataSplits:
    """``dataset=synthetic``: read the cached set, generating it first when missing or corrupt."""
    num_classes = synthetic_classes(cfg)
    train_size = cfg_int(cfg, "train_size", DEFAULT_TRAIN_SIZE, minimum=num_classes)  # every class in train
    test_size = cfg_int(cfg, "test_size", DEFAULT_TEST_SIZE, minimum=1)
    seed = cfg_int(cfg, "seed", 0, minimum=0)
    folder = cache_folder(data_root(cfg), train_size, test_size, seed, num_classes)
    if all((folder / name).is_file() for name in FORMATS[num_classes].split_files):
        try:
            return _read_checked(folder, train_size, test_size, num_classes)
        except CorruptDataError as e:
            log.warning("synthetic data cache is corrupt, regenerating it: %s", e)
    try:
        write_synthetic(folder, train_size, test_size, seed, num_classes)
    except OSError as e:
        raise UserError(
            f"cannot write the synthetic data set to {folder} ({e}); set dataset.root to a writable folder"
        ) from None
    return _read_checked(folder, train_size, test_size, num_classes)
