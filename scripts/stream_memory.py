"""Memory of the streaming loader as the folder grows: what the loader holds, and the peak RSS of one epoch.

    python -m scripts.stream_memory                          # 256 and 1024 generated 500x375 JPEGs, 2 workers
    python -m scripts.stream_memory --images 512 --factor 4 --workers 1 2

"Memory stays flat when the folder grows": a streamed set keeps, per image, only its path and
its label (a numpy bytes array and an int64 tensor), never pixels; decoded samples exist only in
the batches in flight (workers x prefetch x batch size, whatever the folder's size). Measured
here, for N and factor x N images of the same size, each in a fresh interpreter (a process's
peak RSS never goes down, so one size must not hide the other's):

* ``held_bytes``: every tensor, array and Python container reachable from the loader object
  (:func:`held_bytes`), after it is built and after one training epoch;
* peak RSS (``ru_maxrss``) of the process that loads the set and reads one training epoch,
  minus its RSS after the imports (the files' check is done beforehand, in another process, so
  this is the epoch's), and the largest worker's peak RSS (which counts the pages it shares with
  the main process since the fork). Each is run ``rounds`` times with glibc's default allocator
  and with its mmap threshold fixed at 128 KiB (``MALLOC_MMAP_THRESHOLD_``): by default glibc
  raises the threshold after large blocks are freed, so later batch-sized blocks come from the
  heap and freed ones may stay resident, which makes the default peak vary from run to run.

The tests assert only the structural fact behind the figures (the loader holds no pixels:
``tests/test_stream_memory.py``), never a number of bytes.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.errors import UserError
from distiller.config.command_line import OneLineParser, at_least, fail

REPO = Path(__file__).resolve().parent.parent


def _children(obj: Any) -> Iterator[Any]:
    if isinstance(obj, dict):
        yield from obj.keys()
        yield from obj.values()
    elif isinstance(obj, (list, tuple, set, frozenset)):
        yield from obj
    elif hasattr(obj, "__dict__") and type(obj).__module__.split(".")[0] in ("datasets", "scripts"):
        yield from vars(obj).values()  # our objects (the loader, its samples, the recipe); not library internals


def held_arrays(obj: Any) -> list[torch.Tensor | np.ndarray]:
    """Every tensor and numpy array reachable from ``obj`` through our objects' attributes and containers."""
    seen: set[int] = set()
    found: list[torch.Tensor | np.ndarray] = []
    stack = [obj]
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, (torch.Tensor, np.ndarray)):
            found.append(item)
            continue
        stack.extend(_children(item))
    return found


def held_bytes(obj: Any) -> int:
    """Bytes ``obj`` keeps alive: its tensors' storages and arrays' buffers (each once) plus the Python containers,
    strings and numbers among its attributes (``sys.getsizeof``)."""
    storages: dict[int, int] = {}
    for array in held_arrays(obj):
        if isinstance(array, torch.Tensor):
            storage = array.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        else:
            base = array.base if array.base is not None else array
            storages[id(base)] = base.nbytes
    python, seen, stack = 0, set(), [obj]
    while stack:
        item = stack.pop()
        if id(item) in seen or isinstance(item, (torch.Tensor, np.ndarray)):
            continue
        seen.add(id(item))
        if isinstance(item, (dict, list, tuple, set, frozenset, str, bytes, int, float)):
            python += sys.getsizeof(item)
        stack.extend(_children(item))
    return sum(storages.values()) + python


def _rss_kb() -> int:
    """This process's resident set size now (KB), from /proc (ru_maxrss is the peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def one_epoch(root: Path, workers: int, batch_size: int) -> dict[str, Any]:
    """In this process: load ``root`` as ``dataset=imagenet``, read one training epoch; what it held and its peaks."""
    from datasets import load_dataset
    from datasets.loaders import make_loader

    torch.set_num_threads(1)
    after_imports = _rss_kb()
    data = load_dataset({"name": "imagenet", "root": str(root), "workers": workers})
    loader = make_loader(data, "train", batch_size, "cpu", train=True, seed=0)
    built = held_bytes(loader)
    images = sum(len(batch) for batch in loader.epoch(0))
    return {"images": images, "held_bytes_built": built, "held_bytes_after_epoch": held_bytes(loader),
            "largest_held_array_elements": max(a.numel() if isinstance(a, torch.Tensor) else a.size
                                               for a in held_arrays(loader)),
            "rss_after_imports_mb": after_imports / 1024,
            "peak_rss_growth_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - after_imports) / 1024,
            "worker_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


ALLOCATORS = {"glibc default": {}, "mmap threshold 128 KiB": {"MALLOC_MMAP_THRESHOLD_": "131072"}}


def _child(*args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    command = [sys.executable, "-m", "scripts.stream_memory", *args]
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    done = subprocess.run(command, cwd=REPO, env=full_env, capture_output=True, text=True)
    if done.returncode != 0:  # the child's own last line says why (its one-line error, or a traceback's end)
        why = next((line for line in reversed(done.stderr.splitlines()) if line.strip()), f"status {done.returncode}")
        raise UserError(f"the measurement in a fresh process failed: {why.removeprefix('error: ')}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(images: int = 256, factor: int = 4, workers: tuple[int, ...] = (2,), batch_size: int = 64,
            size: tuple[int, int] = (375, 500), rounds: int = 3) -> dict[str, Any]:
    """The module docstring's figures for ``images`` and ``factor`` x ``images`` generated JPEGs, per worker count:
    per allocator setting, the smallest and largest of ``rounds`` peaks."""
    from distiller.bench.loader_speed import write_photo_folder

    result: dict[str, Any] = {"image_size": f"{size[1]}x{size[0]}", "batch_size": batch_size, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        for n in (images, factor * images):
            root = write_photo_folder(Path(tmp) / f"n{n}", n, size=size)
            _child("--check", str(root))
            for w in workers:
                for allocator, env in ALLOCATORS.items():
                    runs = [_child("--child", str(root), str(w), str(batch_size), env=env) for _ in range(rounds)]
                    growth = [r["peak_rss_growth_mb"] for r in runs]
                    result["runs"].append({"files": n, "workers": w, "allocator": allocator, **runs[0],
                                           "peak_rss_growth_mb": [min(growth), max(growth)],
                                           "worker_peak_rss_mb": max(r["worker_peak_rss_mb"] for r in runs)})
    return result


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--child"]:  # one measurement in this fresh process
        print(json.dumps(one_epoch(Path(args[1]), int(args[2]), int(args[3]))))
        return 0
    if args[:1] == ["--check"]:  # decode every file once and cache the check, outside the measured processes
        from datasets import load_dataset

        try:
            load_dataset({"name": "imagenet", "root": args[1]})
        except UserError as err:
            fail(str(err))
        print(json.dumps({}))
        return 0
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=at_least(2), default=256, help="N: training JPEGs of the smaller folder")
    parser.add_argument("--factor", type=at_least(1), default=4, help="the larger folder holds factor x N")
    parser.add_argument("--workers", type=at_least(0), nargs="+", default=[2])
    parser.add_argument("--batch-size", type=at_least(1), default=64)
    parser.add_argument("--rounds", type=at_least(1), default=3)
    parsed = parser.parse_args(args)
    try:
        result = measure(parsed.images, parsed.factor, tuple(parsed.workers), parsed.batch_size, rounds=parsed.rounds)
    except UserError as err:
        fail(str(err))
    print(f"{result['image_size']} JPEGs, batch {result['batch_size']}")
    for run in result["runs"]:
        low, high = run["peak_rss_growth_mb"]
        print(f"  {run['files']:6d} files, {run['workers']} worker(s), {run['allocator']:22s}: held "
              f"{run['held_bytes_built'] / 1024:6.1f} KiB ({run['held_bytes_built'] / run['files']:.0f} B/file; after "
              f"an epoch {run['held_bytes_after_epoch'] / 1024:.1f} KiB), epoch's peak RSS +{low:.0f}..{high:.0f} MB "
              f"over {run['rss_after_imports_mb']:.0f} MB after imports, largest worker "
              f"{run['worker_peak_rss_mb']:.0f} MB")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
