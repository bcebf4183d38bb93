"""An exact cache of a frozen teacher's logits for every input the CIFAR training augmentation can make.

Why: in a KD step of resnet32x4 -> resnet8x4 the teacher's forward is two thirds of the work, and it
is the same for every run of a sweep with that teacher. The on-device augmentation
(:mod:`datasets.augment`) is a crop offset in ``0..2*pad`` on each axis and a flip, so a training
image has ``(2*pad+1)**2 * 2`` inputs (162 at 32 px) and the eval-mode teacher one row of logits for
each. Computed once, the rows replace the teacher's forward in every later run whose methods read
only its logits: the loader tells each batch's (image, offset, flip) (``Batch.offsets`` /
``Batch.flips``) and :meth:`TeacherCache.lookup` returns those rows.

Files, in the teacher's folder (beside its index) unless ``cache_dir`` says otherwise, for the
teacher file ``<stem>.pt`` and a training split of N images of data set ``<data>``::

    <stem>.<data>-<N>.<dtype>.logits          the rows: C logits each, raw, native byte order
    <stem>.<data>-<N>.<dtype>.json            the header: key and shape; written last, so it marks completion
    <stem>.<data>-<N>.<dtype>.logits.partial  a build in progress ...
    <stem>.<data>-<N>.<dtype>.partial.json    ... and its progress record (rows on disk, key)
    <stem>.<data>-<N>.<dtype>.lock            held (fcntl) by the one process that builds

Row layout: the row of image ``i`` at crop offset ``(dy, dx)`` and flip ``f`` is
``((i * S + dy) * S + dx) * 2 + f`` with ``S = 2*pad + 1``: an image's variants are contiguous, so
the build walks the images in order and a lookup reads one small row per sample.

The key (:class:`CacheKey`) is everything the logits depend on: the teacher file's sha256, the data
(name, size, sha256 of the uint8 images and labels: about 0.2 s for CIFAR-100), the augmentation (padding,
image size), the normalisation (mean/std), the class count, the stored dtype and the precision of the
build's forwards. A cache whose key differs from the run's is never used: one line says which parts
differ and how to rebuild. Not in the key: the memory format and precision of the run's own teacher
forward; a run in channels_last or bf16 would differ from the cached fp32 rows by that forward's rounding.

Building the rows (resumable, kill-safe, once under the lock for concurrent runs) runs the teacher
over the data set, so it is the jobs' part: :mod:`distiller.jobs.cache_build`. This module reads a
complete cache and takes the lock that keeps a build from replacing the files under a reader.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from common.errors import UserError
from common.files import file_sha256
from datasets.augment import crop_and_flip, padding_for
from datasets.base import DataSplits
from datasets.batch import Batch
from datasets.device_loader import fits_on_device

log = logging.getLogger("distiller")

CACHE_FORMAT = 1
# stored dtypes; fp32 is exact to the forward, fp16 keeps ~3 decimal digits (logits up to 65504), bf16 ~2
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# precision of the build's forwards: fp32, bf16 autocast, or fp64 (a float64 teacher: reference builds, tests)
PRECISIONS = ("fp32", "bf16", "fp64")


# ---- the key ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CacheKey:
    """Everything a cached row depends on; two caches with equal keys hold the same logits."""

    teacher_sha256: str
    dataset: str
    size: int  # training images
    data_sha256: str  # of the uint8 training images and their labels
    pad: int  # crop padding: offsets 0..2*pad on each axis
    image_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int
    dtype: str  # stored: fp32 | fp16 | bf16
    precision: str  # of the build's forwards: fp32 | bf16 | fp64

    @property
    def side(self) -> int:
        """Crop offsets per axis: ``2*pad + 1``."""
        return 2 * self.pad + 1

    @property
    def variants(self) -> int:
        """Inputs per image: every offset, with and without the flip."""
        return self.side**2 * 2

    @property
    def rows(self) -> int:
        return self.size * self.variants

    @property
    def row_bytes(self) -> int:
        return self.num_classes * DTYPES[self.dtype].itemsize

    @property
    def nbytes(self) -> int:
        return self.rows * self.row_bytes

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CacheKey:
        names = {f.name for f in fields(cls)}
        if set(data) != names:
            raise ValueError(f"key fields {sorted(data)} are not {sorted(names)}")
        return cls(**{**data, "image_size": tuple(data["image_size"]), "mean": tuple(data["mean"]),
                      "std": tuple(data["std"])})

    def differences(self, other: CacheKey) -> list[str]:
        """What differs from ``other``, one phrase per field: ``"<what> <self's> (now <other's>)"``."""
        out = []
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if mine != theirs:
                if f.name.endswith("sha256"):
                    mine, theirs = f"{mine[:12]}...", f"{theirs[:12]}..."
                out.append(f"{_KEY_WORDS[f.name]} {mine} (now {theirs})")
        return out


_KEY_WORDS = {"teacher_sha256": "teacher file sha256", "dataset": "data set", "size": "training images",
              "data_sha256": "training data sha256", "pad": "crop padding", "image_size": "image size",
              "mean": "normalisation mean", "std": "normalisation std", "num_classes": "classes",
              "dtype": "stored dtype", "precision": "build precision"}


def data_fingerprint(images: torch.Tensor, labels: torch.Tensor) -> str:
    """sha256 of uint8 images [N, C, H, W] and their labels (as int64), shapes included."""
    digest = hashlib.sha256(repr((tuple(images.shape), tuple(labels.shape))).encode())
    digest.update(memoryview(images.detach().cpu().contiguous().numpy()).cast("B"))
    digest.update(memoryview(labels.detach().cpu().to(torch.int64).contiguous().numpy()).cast("B"))
    return digest.hexdigest()


def cache_key(teacher_path: str | Path, data: DataSplits, dataset: str, *, dtype: str = "fp32",
              precision: str = "fp32", pad: int | None = None) -> CacheKey:
    """The key of ``data``'s training split seen by the teacher in ``teacher_path`` (hashes both files' bytes).

    ``pad``: the crop padding, by default the loader's (:func:`datasets.augment.padding_for`).
    """
    if dtype not in DTYPES:
        raise UserError(f"unknown teacher-cache dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
    if precision not in PRECISIONS:
        raise UserError(f"unknown teacher-cache build precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
    height, width = data.image_size
    return CacheKey(teacher_sha256=file_sha256(teacher_path), dataset=str(dataset),
                    size=int(data.train_images.shape[0]),
                    data_sha256=data_fingerprint(data.train_images, data.train_labels),
                    pad=padding_for(height, width) if pad is None else int(pad), image_size=(height, width),
                    mean=tuple(float(m) for m in data.mean), std=tuple(float(s) for s in data.std),
                    num_classes=int(data.num_classes), dtype=dtype, precision=precision)


# ---- the row layout ---------------------------------------------------------------------------------------
def row_index(indices: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, pad: int) -> torch.Tensor:
    """Rows (int64 [B]) of images ``indices`` [B] at crop ``offsets`` [B, 2] (row, col) and ``flips`` [B]."""
    side = 2 * pad + 1
    offsets = offsets.to(torch.int64)
    return ((indices.to(torch.int64) * side + offsets[:, 0]) * side + offsets[:, 1]) * 2 + flips.to(torch.int64)


def row_variant(rows: torch.Tensor, pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inverse of :func:`row_index`: (indices [R], offsets [R, 2], flips [R] bool) of ``rows``."""
    side = 2 * pad + 1
    flips = rows % 2
    cell = rows // 2
    dx = cell % side
    dy = (cell // side) % side
    return cell // (side * side), torch.stack([dy, dx], dim=1), flips.bool()


def variant_images(images: torch.Tensor, rows: torch.Tensor, key: CacheKey) -> torch.Tensor:
    """The normalised float32 inputs of ``rows``: the loader's crop, flip and normalisation, op for op.

    ``images``: the uint8 training split [N, C, H, W], on the device the result is wanted on.
    """
    indices, offsets, flips = row_variant(rows.to(images.device), key.pad)
    augmented = crop_and_flip(images[indices], offsets, flips, key.pad)
    mean = torch.tensor(key.mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(key.std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    # the same ops as DeviceLoader._normalise, so a cached row's input is the loader's batch image bit for bit
    return augmented.to(torch.float32).div_(255.0).sub_(mean).div_(std)


# ---- the files --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CacheFiles:
    """The paths of one cache (see the module docstring)."""

    base: Path  # <folder>/<stem>.<data>-<N>.<dtype>

    @classmethod
    def beside(cls, teacher_path: str | Path, dataset: str, size: int, dtype: str,
               cache_dir: str | Path | None = None) -> CacheFiles:
        """The cache of ``teacher_path`` for a data set: in ``cache_dir``, else the teacher's own folder."""
        teacher_path = Path(teacher_path)
        folder = Path(cache_dir) if cache_dir is not None else teacher_path.parent
        return cls(folder / f"{teacher_path.stem}.{dataset}-{size}.{dtype}")

    def _with(self, suffix: str) -> Path:
        return self.base.with_name(self.base.name + suffix)

    @property
    def data(self) -> Path:
        return self._with(".logits")

    @property
    def header(self) -> Path:
        return self._with(".json")

    @property
    def partial(self) -> Path:
        return self._with(".logits.partial")

    @property
    def record(self) -> Path:
        return self._with(".partial.json")

    @property
    def lock(self) -> Path:
        return self._with(".lock")


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON file's content; None when it is missing or unreadable (our files are written atomically)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def stored_key(header: dict[str, Any] | None) -> CacheKey | None:
    try:
        return CacheKey.from_json(header["key"]) if header and header.get("format") == CACHE_FORMAT else None
    except (KeyError, TypeError, ValueError):
        return None


@contextlib.contextmanager
def cache_lock(files: CacheFiles, shared: bool = False) -> Iterator[None]:
    """Hold the cache's lock: exclusive to build, shared to open (so no build replaces the files meanwhile).

    The kernel releases it when the holder dies, even by kill -9. In a folder this process cannot
    write, opening goes on without the shared lock, and building is a one-line error.
    """
    try:
        files.lock.parent.mkdir(parents=True, exist_ok=True)
        handle = open(files.lock, "a")
    except OSError as err:
        if not shared:
            raise UserError(f"cannot build the teacher cache in {files.lock.parent} ({err}); choose a writable folder "
                            f"for it (teacher.cache_dir=DIR; scripts/teachers.py cache --cache-dir DIR)") from None
        handle = None
    if handle is None:
        yield
        return
    with handle:
        mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        try:
            fcntl.flock(handle, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process that builds the teacher cache %s", files.data)
            fcntl.flock(handle, mode)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ---- reading ----------------------------------------------------------------------------------------------
class TeacherCache:
    """An open cache: ``logits`` [rows, C] in the stored dtype, memory-mapped (or resident, :meth:`to`).

    ``built``: whether this process computed it (False: it was there, or another process built it).
    """

    def __init__(self, path: Path, key: CacheKey, logits: torch.Tensor, built: bool = False) -> None:
        self.path, self.key, self.logits, self.built = path, key, logits, built

    @property
    def nbytes(self) -> int:
        return self.key.nbytes

    def lookup(self, batch: Batch) -> torch.Tensor:
        """The teacher's logits [B, C] (float32, on the batch's device) of a training batch's inputs."""
        if batch.offsets is None or batch.flips is None:
            raise ValueError("the batch does not say which crops and flips it holds (an eval batch?)")
        return self.lookup_at(batch.indices, batch.offsets, batch.flips)

    def lookup_at(self, indices: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        """The logits [B, C] (float32, on ``indices``' device) of images ``indices`` at ``offsets`` / ``flips``."""
        home = self.logits.device
        rows = row_index(indices.to(home), offsets.to(home), flips.to(home), self.key.pad)
        return self.logits.index_select(0, rows).to(device=indices.device, dtype=torch.float32)

    def to(self, device: torch.device | str) -> TeacherCache:
        """The cache held on ``device`` when it fits there (as the data set is, :func:`fits_on_device`), else self."""
        device = torch.device(device)
        if device == self.logits.device or not fits_on_device(self.nbytes, device):
            return self
        return TeacherCache(self.path, self.key, self.logits.to(device), self.built)


def _rebuild_hint(files: CacheFiles, teacher: str | None, key: CacheKey) -> str:
    """How to rebuild the cache at ``files`` for ``key``: the command, with the options that key needs."""
    options = [f"--{name} {value}" for name, value in (("dtype", key.dtype), ("precision", key.precision))
               if value != "fp32"]
    if teacher is None or Path(teacher).parent != files.base.parent:
        options.append(f"--cache-dir {files.base.parent}")
    # options first: the run's other dataset.* settings go at the end, after the file's overrides
    command = " ".join(["python scripts/teachers.py cache", *options, "--rebuild", teacher or "TEACHER.pt",
                        f"dataset={key.dataset}"])
    return f"rebuild it with `{command}` (plus the run's other dataset.* settings), or delete {files.header}"


def open_cache(files: CacheFiles, key: CacheKey | None = None) -> TeacherCache:
    """Open the complete cache at ``files`` (memory-mapped), refusing it unless its key is ``key``.

    One-line :class:`UserError` s: no complete cache there (missing, or a build not finished), a key
    that differs (which parts, and how to rebuild), a data file of the wrong size.
    """
    header = read_json(files.header)
    stored = stored_key(header)
    if stored is None:
        state = "a build was interrupted; running the build again resumes it" if files.record.exists() else \
            "build it with `python scripts/teachers.py cache TEACHER.pt dataset=NAME`"
        raise UserError(f"no complete teacher cache at {files.data} ({state})")
    hint = _rebuild_hint(files, header.get("teacher_file"), key or stored)
    if key is not None and stored != key:
        raise UserError(f"the teacher cache {files.data} does not match this run (built for "
                        f"{'; '.join(stored.differences(key))}): it is not used; {hint}")
    size = files.data.stat().st_size if files.data.is_file() else None
    if size != stored.nbytes:
        raise UserError(f"the teacher cache {files.data} is damaged ({size} bytes, expected {stored.nbytes}); {hint}")
    flat = torch.from_file(str(files.data), shared=False, size=stored.rows * stored.num_classes,
                           dtype=DTYPES[stored.dtype])
    return TeacherCache(files.data, stored, flat.view(stored.rows, stored.num_classes))


