"""The CIFAR-100 subset the GPU check's accuracy step trains on: a class-balanced, seeded choice of the real
data, written once in the official pickle format (small enough to travel to a GPU machine with the code)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from common.errors import UserError
from common.files import atomic_write
from datasets import cifar
from datasets.cifar100 import CIFAR100, read_cifar_folder
from distiller.config.compose import CONFIG_DIR

REPO = CONFIG_DIR.parent
SUBSET_DIR = REPO / "data" / "cifar100-subset"  # git-ignored (/data/)
SUBSET_PER_CLASS = (140, 50)  # 14,000 train / 5,000 test images: 58.4 MB, under the ~60 MB a GPU machine receives

load_pickle = cifar.load_pickle  # the reader's restricted unpickler (numpy arrays only)


def find_cifar_folder(root: Path) -> Path | None:
    """``<root>/cifar-100-python`` (or ``root`` itself) when it holds train, test and meta."""
    return cifar.find_folder(Path(root), CIFAR100)


def default_source() -> Path:
    """Where the full CIFAR-100 is looked for: ``$KD_DATA_ROOT``, else ``../shared/data`` beside the checkout."""
    return Path(os.environ.get("KD_DATA_ROOT") or REPO.parent / "shared" / "data")


def write_cifar_subset(source: Path, dest: Path = SUBSET_DIR, per_class: tuple[int, int] = SUBSET_PER_CLASS,
                       seed: int = 0, force: bool = False) -> Path:
    """Write ``per_class`` (train, test) images of every class of the CIFAR-100 under ``source`` into
    ``dest/cifar-100-python/`` in the official pickle format (same keys; ``meta`` copied), once.

    The images of each class are a seeded random choice, kept in the source's order. Returns the folder.
    """
    folder = find_cifar_folder(Path(source))
    if folder is None:
        raise UserError(f"no CIFAR-100 (cifar-100-python/ with train, test, meta) under {source}; pass --source "
                        "PATH or set KD_DATA_ROOT")
    out = Path(dest) / CIFAR100.base_folder
    if find_cifar_folder(Path(dest)) is not None and not force:
        return out
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, n in zip(("train", "test"), per_class):
        entry = load_pickle(folder / split)
        labels = np.asarray(entry["fine_labels"], dtype=np.int64)
        keep = []
        for c in range(int(labels.max()) + 1):
            members = np.flatnonzero(labels == c)
            if len(members) < n:
                raise UserError(f"{folder / split} has {len(members)} images of class {c}, fewer than {n} per class")
            keep.append(rng.choice(members, size=n, replace=False))
        index = np.sort(np.concatenate(keep))
        subset = {"data": np.ascontiguousarray(entry["data"][index]),
                  "fine_labels": labels[index].tolist(),
                  "coarse_labels": (np.asarray(entry["coarse_labels"])[index].tolist()
                                    if "coarse_labels" in entry else [0] * len(index)),
                  "filenames": ([entry["filenames"][i] for i in index] if "filenames" in entry
                                else [f"{split}_{i}.png" for i in index]),
                  "batch_label": f"{split} subset: {n} per class, seed {seed}"}
        atomic_write(subset, out / split, "pickle")
    atomic_write(load_pickle(folder / "meta"), out / "meta", "pickle")
    read_cifar_folder(out)  # fails here, not on the GPU machine, if anything is off
    return out
