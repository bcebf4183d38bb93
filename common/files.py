"""One atomic writer for every file a run leaves: checkpoints, JSON, YAML, pickles.

A crash at any moment leaves either the previous file or the complete new one,
never half a file: the data goes to a temporary file in the same directory, is
flushed and fsynced, then renamed over the target (atomic on POSIX), and the
directory entry is fsynced too.
"""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable


def _torch(obj: Any, f: BinaryIO) -> None:
    import torch  # imported lazily: data-set code writes pickles without needing torch loaded

    torch.save(obj, f)


def _json(obj: Any, f: BinaryIO) -> None:
    f.write(json.dumps(obj, indent=1).encode())


def _yaml(obj: Any, f: BinaryIO) -> None:
    from omegaconf import OmegaConf

    f.write(OmegaConf.to_yaml(OmegaConf.create(obj)).encode())


def _pickle(obj: Any, f: BinaryIO) -> None:
    pickle.dump(obj, f, protocol=4)  # fixed: the bytes must not depend on Python's default protocol


WRITERS: dict[str, Callable[[Any, BinaryIO], None]] = {"torch": _torch, "json": _json, "yaml": _yaml,
                                                        "pickle": _pickle}


_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once: setting it and setting it back is the only portable way


def atomic_write(obj: Any, path: str | Path, fmt: str = "torch") -> None:
    """Write ``obj`` to ``path`` as ``fmt`` (``torch``, ``json``, ``yaml`` or ``pickle``), atomically.

    The file gets the permissions an ordinary ``open(path, "w")`` would give it.
    """
    writer = WRITERS[fmt]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            writer(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
