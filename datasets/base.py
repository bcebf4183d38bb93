"""What every data set shares: the registry, the facts a data set declares, and :class:`DataSplits`.

A data set is one file in ``datasets/`` that registers its loader with
``@DATASETS.register(name, facts=DatasetFacts(...))``; ``datasets/__init__.py``
imports every module of the package, so adding the file is adding the data set.
The loader turns the ``dataset`` config node into :class:`DataSplits` (decoded, in memory)
or, for a set too large for memory, :class:`FileSplits` (the image files, decoded batch by
batch); the facts (classes, image size, channels, mean/std) travel with the splits, and the
engine, the loaders and the feature probe read them from there, never from CIFAR constants.
``datasets.loaders.make_loader`` builds the right loader for either. ``options=(...)`` names the optional
keys of the ``dataset`` node the data set reads (any other is refused when set); ``check=`` a function of
the node that raises :class:`UserError` for settings the data set refuses by themselves, run with the
config's validation, so a run or a sweep stops on them before it starts.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from common.errors import UserError
from common.registry import Registry

if TYPE_CHECKING:
    from datasets.sample_transforms import SampleTransform

DATA_ROOT_ENV = "KD_DATA_ROOT"
# hex digits of the resolved root's sha256 in an image folder's teacher folder: 32 bits, so two folders of
# one machine collide with odds of about 1 in 4 billion
ROOT_HASH_CHARS = 8

Loader = Callable[[Mapping[str, Any]], "DataSplits | FileSplits"]
DATASETS: Registry[Loader] = Registry("dataset")


@dataclass(frozen=True)
class DatasetFacts:
    """What a data set declares before it is read; ``None``: the data itself says (read at load time).

    ``image_size`` is (height, width); ``mean`` / ``std`` are per channel, on pixels scaled to [0, 1].
    """

    num_classes: int | None = None
    image_size: tuple[int, int] | None = None
    channels: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None


def dataset_facts(name: str) -> DatasetFacts:
    """The facts data set ``name`` registered (all ``None`` for a loader registered without any)."""
    return DATASETS.metadata(name).get("facts") or DatasetFacts()


class CorruptDataError(UserError):
    """A data file exists but cannot be read as its format (truncated, garbage, wrong shapes)."""


@dataclass
class DataSplits:
    """A whole data set in memory: uint8 images [N, C, H, W] and int64 labels [N] on the CPU, with its facts.

    ``mean`` / ``std`` (per channel, pixels in [0, 1]) normalise the images; when a loader
    leaves them out they are the training split's own statistics.
    """

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int
    class_names: list[str]
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.mean is None or self.std is None:
            mean, std = channel_stats(self.train_images)
            self.mean = self.mean if self.mean is not None else mean
            self.std = self.std if self.std is not None else std
        self.mean, self.std = tuple(float(m) for m in self.mean), tuple(float(s) for s in self.std)

    @property
    def channels(self) -> int:
        return int(self.train_images.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) of every image."""
        return int(self.train_images.shape[2]), int(self.train_images.shape[3])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(channels, height, width): what a network is fed, e.g. by the feature probe."""
        return (self.channels, *self.image_size)


@dataclass
class FileSplits:
    """A data set kept as image files, decoded per batch by loader workers: one too large for memory.

    The files were checked when the set was loaded (every one decodes; see
    :mod:`datasets.streaming`). ``transform`` is the recipe that turns a decoded file into a
    sample (:mod:`datasets.sample_transforms`); every sample has its ``output_size``.
    ``workers``: decoding processes per training process (None: the loader's default).
    The facts read like :class:`DataSplits`' (``num_classes``, ``image_shape``, ``train_labels``, ...).
    """

    train_files: list[str]
    train_labels: torch.Tensor
    test_files: list[str]
    test_labels: torch.Tensor
    num_classes: int
    class_names: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    transform: SampleTransform
    workers: int | None = None

    def __post_init__(self) -> None:
        for split, files, labels in (("train", self.train_files, self.train_labels),
                                     ("test", self.test_files, self.test_labels)):
            if len(files) != labels.shape[0]:
                raise ValueError(f"{len(files)} {split} files but {labels.shape[0]} labels")
        self.mean, self.std = tuple(float(m) for m in self.mean), tuple(float(s) for s in self.std)

    channels = 3  # the decoder makes every file RGB

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) of every sample."""
        return self.transform.output_size

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.channels, *self.image_size)


def channel_stats(images: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) standard deviation of uint8 images [N, C, H, W], pixels / 255.

    Sums in float64 over chunks of images, so memory stays bounded and the result is exact to
    float64 rounding whatever the set's size.
    """
    if images.shape[0] == 0:
        raise UserError("the training split has no images, so its mean and std are undefined")
    c = images.shape[1]
    total = torch.zeros(c, dtype=torch.float64)
    squares = torch.zeros(c, dtype=torch.float64)
    for lo in range(0, images.shape[0], chunk):
        x = images[lo : lo + chunk].to(torch.float64)
        total += x.sum(dim=(0, 2, 3))
        squares += x.square().sum(dim=(0, 2, 3))
    return stats_from_sums(total, squares, images.numel() / c)


def stats_from_sums(total: torch.Tensor, squares: torch.Tensor,
                    count: float) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """:func:`channel_stats` from per-channel float64 sums of uint8 pixels and of their squares over ``count`` pixels.

    The streaming check accumulates the same exact integer sums file by file, so both paths
    give the same statistics to the last bit.
    """
    mean = total / count
    var = (squares / count - mean.square()).clamp_min(0.0)
    std = var.sqrt() / 255.0
    # A constant channel has std 0; dividing by it would make every pixel inf. 1 leaves it centred.
    std = torch.where(std > 0, std, torch.ones_like(std))
    return tuple((mean / 255.0).tolist()), tuple(std.tolist())


def cfg_get(cfg: Mapping[str, Any], key: str, default: Any = None) -> Any:
    """``cfg[key]`` for a plain Mapping or an OmegaConf DictConfig, ``default`` when absent or null."""
    value = cfg.get(key, default)
    return default if value is None else value


def cfg_int(cfg: Mapping[str, Any], key: str, default: int, minimum: int) -> int:
    """An integer config value of at least ``minimum``; anything else is a :class:`UserError`."""
    value = cfg_get(cfg, key, default)
    # bool is an int subclass; `dataset.train_size=true` is a typo, not 1.
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise UserError(f"dataset.{key} must be an integer >= {minimum}, got {value!r}")
    try:
        number = int(value)
    except ValueError:
        raise UserError(f"dataset.{key} must be an integer >= {minimum}, got {value!r}") from None
    if number < minimum:
        raise UserError(f"dataset.{key} must be an integer >= {minimum}, got {number}")
    return number


def cfg_floats(cfg: Mapping[str, Any], key: str, count: int, positive: bool = False) -> tuple[float, ...] | None:
    """A list of ``count`` numbers (``dataset.mean`` / ``dataset.std``), or ``None`` when unset."""
    value = cfg_get(cfg, key)
    if value is None:
        return None
    need = f"dataset.{key} must be a list of {count} {'positive ' if positive else ''}numbers (one per channel)"
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise UserError(f"{need}, got {value!r}")
    items = list(value)
    if len(items) != count or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in items):
        raise UserError(f"{need}, got {items!r}")
    if positive and any(not v > 0 for v in items):
        raise UserError(f"{need}, got {items!r}")
    return tuple(float(v) for v in items)


def teachers_data_root(name: str, root: str | None) -> str | None:
    """The resolved ``root`` where it *is* the data (a data set registered with ``teachers_per_root=True``:
    an image folder), else None: what tells one image folder's teachers from another's."""
    if name in DATASETS and DATASETS.metadata(name).get("teachers_per_root"):
        if root is None or str(root) == "":
            raise UserError(f"dataset={name} needs dataset.root=DIR, the folder of the data (its teachers are "
                            f"kept per folder)")
        return str(Path(str(root)).expanduser().resolve())
    return None


def teacher_folder(name: str, root: str, num_classes: Any = None) -> str:
    """The folder of this data's teachers under ``checkpoints/teachers/`` (``teacher_dir``'s default).

    The data set's name, except where the root *is* the data (:func:`teachers_data_root`): then the
    name, the root's folder name and a short hash of its resolved path
    (``imagefolder-flowers-1a2b3c4d``), so two folders' teachers never replace each other, not even
    when the folders share a name (``/a/data``, ``/b/data``). A data set whose class count is a setting
    (registered with ``default_classes``) adds the count where ``num_classes`` differs from that default
    (``synthetic10``, as its cache is named), so a 10-class teacher never replaces the 100-class one.
    """
    resolved = teachers_data_root(name, root)
    if resolved is not None:
        digest = hashlib.sha256(resolved.encode()).hexdigest()[:ROOT_HASH_CHARS]
        return f"{DATASETS.canonical(name)}-{Path(resolved).name}-{digest}"
    default = DATASETS.metadata(name).get("default_classes") if name in DATASETS else None
    if default is not None and str(num_classes) not in ("None", "null", "") and str(num_classes) != str(default):
        return f"{name}{num_classes}"
    return str(name)


def data_root(cfg: Mapping[str, Any]) -> Path:
    """``dataset.root``; when unset, ``$KD_DATA_ROOT`` or ``./data`` (the config default does the same)."""
    root = cfg_get(cfg, "root") or os.environ.get(DATA_ROOT_ENV) or "data"
    return Path(str(root)).expanduser()
