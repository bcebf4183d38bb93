"""Speed of the streaming loader against the torchvision baseline, on the same folder of real-size JPEGs and cores
(``scripts/stream_benchmark.py``).

Measured (all on the same generated folder, ``DIR/train/<class>/*.JPEG``, photo-like 500x375
JPEGs at quality 90 unless a ``root`` is given):

* ``decoders``: per core, one process, no loader: images/s of decode + ImageNet training
  transform for each candidate decoder: torchvision's (``torchvision.io.decode_image`` +
  tensor RandomResizedCrop/flip: ours), PIL + the same tensor transforms, and PIL + PIL
  transforms (the baseline's work). This is what picked the decoder.
* ``loaders``: end to end, normalised float batches in the main process, per worker count:
  ours (``dataset=imagenet`` + :class:`~datasets.stream_loader.StreamLoader`) and the baseline
  mdistiller and torchvision's reference scripts use: ``torchvision.datasets.ImageFolder``
  (PIL loader) + RandomResizedCrop(224) + RandomHorizontalFlip + ToTensor + Normalize +
  ``DataLoader(shuffle=True)``, with the same batch size and workers. images/s per core =
  images/s / workers (the main process only collects batches).

Rounds alternate ours and the baseline; the best round of each counts (a shared machine's
noise only slows a round down). :func:`measure` returns the figures as a dict.
"""
from __future__ import annotations

import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from common.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def write_photo_folder(root: Path, images: int = 320, classes: int = 8, size: tuple[int, int] = (375, 500),
                       quality: int = 90, seed: int = 0) -> Path:
    """``root/train/<class>/*.JPEG`` and a small ``val/`` of photo-like JPEGs (smooth shapes plus grain), in
    ``classes`` classes (fewer where there are fewer ``images``).

    Smooth random fields at 1/16 and 1/4 of the resolution, upsampled, plus grain: about the
    entropy of a photograph (files of ~95 KB at 500x375, ImageNet's average is ~110 KB), so
    they decode at photograph speed, not at the speed of a flat or pure-noise image.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    height, width = size
    classes = min(classes, images)  # every class in both splits, however few images
    for split, count in (("train", images), ("val", max(classes, images // 10))):
        for i in range(count):
            path = root / split / f"n{i % classes:08d}" / f"{split}_{i:06d}.JPEG"
            if path.exists():
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            coarse = Image.fromarray(rng.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8))
            fine = Image.fromarray(rng.integers(0, 256, (height // 4, width // 4, 3), dtype=np.uint8))
            field = (0.75 * np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)
                     + 0.25 * np.asarray(fine.resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32))
            field += rng.normal(0.0, 14.0, field.shape).astype(np.float32)
            Image.fromarray(np.clip(field, 0, 255).astype(np.uint8)).save(path, "JPEG", quality=quality)
    return root


def _best_rate(run: Callable[[], int], rounds: int) -> float:
    """Images/s of the fastest of ``rounds`` calls (each returns how many images it produced)."""
    best = 0.0
    for _ in range(rounds):
        start = time.perf_counter()
        count = run()
        best = max(best, count / (time.perf_counter() - start))
    return best


def decoder_rates(files: list[Path], rounds: int = 3, size: int = 224) -> dict[str, float]:
    """Per core (this process, one thread): images/s of decode + RandomResizedCrop + flip, per decoder."""
    from PIL import Image
    from torchvision import transforms as T
    from torchvision.transforms import v2

    from datasets.decode import decode_rgb
    from datasets.sample_transforms import InceptionCrop

    torch.set_num_threads(1)
    recipe = InceptionCrop(size=size)
    pil_recipe = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip()])

    def ours() -> int:
        for k, path in enumerate(files):
            recipe(decode_rgb(path), k)
        return len(files)

    def pil_then_tensor() -> int:
        for k, path in enumerate(files):
            with Image.open(path) as image:
                pixels = v2.functional.pil_to_tensor(image.convert("RGB"))
            recipe(pixels, k)
        return len(files)

    def pil_baseline() -> int:
        for path in files:
            with Image.open(path) as image:
                pil_recipe(image.convert("RGB"))
        return len(files)

    candidates = {"torchvision.io + tensor ops (ours)": ours, "PIL + tensor ops": pil_then_tensor,
                  "PIL + PIL ops (baseline)": pil_baseline}
    rates = dict.fromkeys(candidates, 0.0)
    for _ in range(rounds):  # interleaved, best round of each
        for name, run in candidates.items():
            rates[name] = max(rates[name], _best_rate(run, 1))
    return rates


def loader_rates(root: Path, workers: int, batch_size: int = 64, rounds: int = 3, size: int = 224) -> dict[str, float]:
    """End to end images/s of one training epoch: ours (dataset=imagenet, StreamLoader) and the torchvision baseline."""
    from torch.utils.data import DataLoader
    from torchvision import datasets as tv_datasets
    from torchvision import transforms as T

    from datasets import load_dataset
    from datasets.loaders import make_loader

    data = load_dataset({"name": "imagenet", "root": str(root), "image_size": size, "workers": workers})
    ours = make_loader(data, "train", batch_size, "cpu", train=True, seed=0)
    baseline = DataLoader(
        tv_datasets.ImageFolder(str(root / "train"), T.Compose([
            T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ])),
        batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=False)
    epoch = iter(range(10**9))

    def run_ours() -> int:
        return sum(len(batch) for batch in ours.epoch(next(epoch)))

    def run_baseline() -> int:
        return sum(len(labels) for _, labels in baseline)

    rates = {"ours": 0.0, "torchvision ImageFolder": 0.0}
    for _ in range(rounds):
        rates["ours"] = max(rates["ours"], _best_rate(run_ours, 1))
        rates["torchvision ImageFolder"] = max(rates["torchvision ImageFolder"], _best_rate(run_baseline, 1))
    return rates


def measure(root: Path | None = None, images: int = 320, workers: tuple[int, ...] = (1, 2), batch_size: int = 64,
            rounds: int = 3, size: tuple[int, int] = (375, 500)) -> dict[str, Any]:
    """The figures of the module docstring for the folder at ``root`` (or ``images`` generated JPEGs of ``size``)."""
    if any(w < 1 for w in workers):
        raise ValueError("the loaders are measured with at least one worker (per core = images/s / workers)")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(root) if root is not None else write_photo_folder(Path(tmp) / "photos", images, size=size)
        files = sorted((folder / "train").rglob("*.JPEG"))
        if not files:
            raise UserError(f"{folder / 'train'} holds no .JPEG files: give an ImageNet-layout folder "
                            f"(train/<wnid>/*.JPEG and val/<wnid>/*.JPEG), or leave --root out to generate one")
        result: dict[str, Any] = {
            "folder": str(folder) if root is not None else f"generated: {len(files)} JPEGs, {size[1]}x{size[0]}, "
                                                           f"quality 90",
            "mean_file_kb": float(np.mean([f.stat().st_size for f in files]) / 1024),
            "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "cpu": platform.processor() or platform.machine(),
            "bf16_native": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
            "decoders_per_core": decoder_rates(files, rounds),
            "loaders": {},
        }
        for w in workers:
            rates = loader_rates(folder, w, batch_size, rounds)
            result["loaders"][str(w)] = {**rates, "ours_per_core": rates["ours"] / w,
                                         "baseline_per_core": rates["torchvision ImageFolder"] / w,
                                         "ratio": rates["ours"] / rates["torchvision ImageFolder"]}
    return result
