"""When a data set streams from its files (``dataset.stream``), and the check of every file that streaming starts with.

``dataset.stream``: ``false`` decodes the whole set into memory (the image folder's cache);
``true`` keeps the files and decodes each batch in loader workers
(:mod:`datasets.stream_loader`); ``auto`` (the default) streams when the decoded set would
not fit the memory budget:

    stream  <=>  decoded bytes  >  MEMORY_FRACTION * available memory / processes on this node

with *decoded bytes* = (training + test images) x 3 x height x width (uint8), *available
memory* the kernel's ``MemAvailable`` (capped by the container's cgroup limit, when there is
one) at the time the data set is loaded, and *processes on this node* ``LOCAL_WORLD_SIZE``
(torchrun sets it; 1 otherwise): each process holds its own copy. :data:`MEMORY_FRACTION`
is a quarter because the in-memory path briefly holds the set twice (decoding or reading
the cache, then pinning it for the accelerator) and the networks, optimizer and page cache
need the rest.

Unreadable files are found **up front**, not skipped mid-epoch: before a streamed set is
used, every file is decoded once, with the decoder training uses, in a thread pool. A bad
file then stops the run at once with one line naming it (and how many others are bad),
instead of hours later; skipping would instead change the epoch's batches (a batch one
sample short on one rank), breaking "W ranks equal one process" and silently training on
another set. The check also counts converted files (one warning line) and, for an image
folder, computes the training split's mean/std with the same exact sums as the in-memory
path. Its result is cached in ``DIR/.kd-check-<tag>-<key>.json``, keyed like the image
cache by the file list, sizes and modification times, so later runs only list the files.
Its cost is one decoding pass (a fraction of an epoch, since nothing is augmented or trained).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from common.errors import UserError
from common.files import atomic_write
from datasets.base import stats_from_sums
from datasets.decode import ConversionTally, UnreadableImage, decode_rgb, describe

log = logging.getLogger(__name__)

STREAM_CHOICES = ("auto", True, False)
MEMORY_FRACTION = 0.25  # of the available memory, shared by the processes on the node (module docstring)
CHECK_PREFIX = ".kd-check-"
CHECK_VERSION = 1  # bump when the check's content changes meaning
_CHUNK = 1024  # files handed to the thread pool at a time: bounded memory for a million files


def stream_setting(value: Any) -> bool | str:
    """``dataset.stream`` as ``"auto"``, ``True`` or ``False``; anything else is a :class:`UserError`."""
    if isinstance(value, str) and value.strip().lower() in ("auto", "true", "false"):
        return {"auto": "auto", "true": True, "false": False}[value.strip().lower()]
    if value is None:
        return "auto"
    if isinstance(value, bool):
        return value
    raise UserError(f"dataset.stream must be auto, true or false, got {value!r}")


def _cgroup_room() -> int | None:
    """Bytes left under the cgroup v2 memory limit of this process, None without a limit."""
    base = Path("/sys/fs/cgroup")
    try:
        limit = (base / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int((base / "memory.current").read_text().strip())
    except (OSError, ValueError):
        return None


def available_memory() -> int | None:
    """Bytes this process can still allocate without swapping (``MemAvailable``, cgroup-capped); None: unknown."""
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    room = _cgroup_room()
    return available if room is None else min(available, room)


def local_processes() -> int:
    """Training processes on this node (torchrun's ``LOCAL_WORLD_SIZE``; 1 without it)."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def memory_budget() -> int | None:
    """The most decoded bytes one process may hold in memory (the module docstring's formula); None: unknown."""
    available = available_memory()
    return None if available is None else int(MEMORY_FRACTION * available / local_processes())


def decide_stream(setting: bool | str, decoded_bytes: Callable[[], int], where: str) -> bool:
    """Whether to stream: the setting, or for ``auto`` whether ``decoded_bytes()`` exceeds :func:`memory_budget`.

    ``decoded_bytes`` is called only for ``auto`` (it may read a file's header).
    """
    if setting != "auto":
        return bool(setting)
    budget = memory_budget()
    size = decoded_bytes()
    stream = budget is not None and size > budget
    if stream:
        log.info("streaming %s from its files: decoded it would take %.2f GiB, over the memory budget of %.2f GiB "
                 "(dataset.stream=false to hold it in memory anyway)", where, size / 2**30, budget / 2**30)
    return stream


def mixed_sizes(path: Path, shape: Sequence[int], reference: Path, ref_shape: Sequence[int]) -> UserError:
    """The one line for an image whose size differs from the first one's, without a resize."""
    return UserError(
        f"{path} is {shape[1]}x{shape[0]} but {reference} is {ref_shape[1]}x{ref_shape[0]}: the images must share "
        f"one size, or set dataset.image_size=N to resize every image to N x N"
    )


@dataclass
class FileCheck:
    """What decoding every file once found: the shared sample size, the conversions and the training statistics."""

    shape: tuple[int, int] | None  # (height, width) every sample has after ``prepare``; None: sizes differ
    converted: dict[str, int]  # ConversionTally counts
    total: int  # files checked
    mean: tuple[float, ...] | None = None  # training split's per-channel statistics (``stats=True``)
    std: tuple[float, ...] | None = None

    def warn(self, where: str) -> None:
        """The one warning line about converted files, when there were any."""
        message = ConversionTally(self.converted).message(self.total, where)
        if message:
            log.warning(message)


def _check_one(path: Path, prepare: Callable[[torch.Tensor], torch.Tensor] | None,
               stats: bool) -> tuple[tuple[int, int], str | None, torch.Tensor | None] | UnreadableImage:
    """Decode one file: its sample's (height, width), its conversion note, and (stats) its int64 channel sums."""
    try:
        pixels = decode_rgb(path)
    except UnreadableImage as e:
        return e
    if prepare is not None:
        pixels = prepare(pixels)
    sums = None
    if stats:
        wide = pixels.to(torch.int64)
        sums = torch.stack([wide.sum(dim=(1, 2)), wide.square().sum(dim=(1, 2))])  # exact integers
    return (int(pixels.shape[1]), int(pixels.shape[2])), describe(path), sums


def check_key(files: Sequence[Path], *facts: Any) -> str:
    """A hash of the file list with each file's size and modification time, and of ``facts`` (the recipe)."""
    h = hashlib.sha256(json.dumps([CHECK_VERSION, *facts], default=str).encode())
    for path in files:
        st = path.stat()
        h.update(json.dumps([str(path), st.st_size, st.st_mtime_ns]).encode())
    return h.hexdigest()[:24]


def check_files(root: Path, tag: str, train: Sequence[Path], test: Sequence[Path], *,
                prepare: Callable[[torch.Tensor], torch.Tensor] | None = None, same_size: bool = False,
                stats: bool = False, key_facts: Sequence[Any] = (), threads: int | None = None) -> FileCheck:
    """Decode every file of both splits once (or read the cached result); a bad file is one :class:`UserError`.

    ``prepare``: what the data set does to a decoded image before the loader's augmentation
    (a resize), so ``shape`` and the statistics are the samples'. ``same_size``: every sample
    must have the first training sample's size. ``stats``: the training split's mean/std.
    """
    files = [*train, *test]
    key = check_key(files, tag, same_size, stats, *key_facts)
    path = root / f"{CHECK_PREFIX}{tag}-{key}.json"
    cached = _read_check(path)
    if cached is not None:
        return cached
    start = time.perf_counter()
    threads = threads or min(16, os.cpu_count() or 1)
    bad: list[UnreadableImage] = []
    tally = ConversionTally()
    shapes: set[tuple[int, int]] = set()
    reference: tuple[Path, tuple[int, int]] | None = None
    total = torch.zeros(3, dtype=torch.int64)
    squares = torch.zeros(3, dtype=torch.int64)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for lo in range(0, len(files), _CHUNK):
            chunk = files[lo: lo + _CHUNK]
            for k, result in enumerate(pool.map(lambda p: _check_one(p, prepare, stats), chunk), start=lo):
                if isinstance(result, UnreadableImage):
                    bad.append(result)
                    continue
                size, note, sums = result
                tally.add(note)
                reference = reference or (files[k], size)
                if same_size and size != reference[1]:
                    raise mixed_sizes(files[k], size, *reference)
                shapes.add(size)
                if stats and k < len(train):
                    total += sums[0]
                    squares += sums[1]
    if bad:
        raise _unreadable(bad)
    shape = next(iter(shapes)) if len(shapes) == 1 else None
    check = FileCheck(shape=shape, converted=dict(tally.counts), total=len(files))
    if stats:
        if shape is None:
            raise ValueError("training statistics need one shared sample size")
        count = len(train) * shape[0] * shape[1]
        check.mean, check.std = stats_from_sums(total.double(), squares.double(), float(count))
    log.info("checked the %d image files of %s in %.1f s", len(files), root, time.perf_counter() - start)
    _write_check(check, path, tag)
    return check


def _unreadable(bad: Sequence[UnreadableImage]) -> UserError:
    """One line for every unreadable file: the first in full, the count and a few names of the rest."""
    if len(bad) == 1:
        return bad[0]
    others = ", ".join(e.path for e in bad[1:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
    return UserError(f"{len(bad)} image files cannot be decoded: {bad[0].path} ({bad[0].reason}), and {others}: "
                     f"replace or delete them")


def _read_check(path: Path) -> FileCheck | None:
    if not path.is_file():
        return None
    try:
        content = json.loads(path.read_text())
        content.pop("version")
        shape = content.pop("shape")
        check = FileCheck(shape=None if shape is None else (int(shape[0]), int(shape[1])), **content)
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("ignoring the unreadable file check %s (%s); checking the files again", path, e)
        return None
    check.mean = None if check.mean is None else tuple(check.mean)
    check.std = None if check.std is None else tuple(check.std)
    return check


def _write_check(check: FileCheck, path: Path, tag: str) -> None:
    """Store the check atomically and drop older ones of the same tag; a read-only folder only warns."""
    try:
        atomic_write({"version": CHECK_VERSION, **asdict(check)}, path, "json")
    except OSError as e:
        log.warning("cannot write the file check %s (%s): the files will be checked again next run", path, e)
        return
    for stale in path.parent.glob(f"{CHECK_PREFIX}{tag}-*.json"):
        if stale != path:
            stale.unlink(missing_ok=True)
