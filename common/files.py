"""One atomic writer for every file a run leaves: checkpoints, JSON, YAML, pickles, copies.

A crash at any moment leaves either the previous file or the complete new one,
never half a file: the data goes to a temporary file in the same directory, is
flushed and fsynced, then renamed over the target (atomic on POSIX), and the
directory entry is fsynced too.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

from common.errors import UserError

# a write that fails with one of these is the disk's fault, not the data's: said in one line
FULL_DISK_ERRNOS = {errno.ENOSPC: "ENOSPC", errno.EDQUOT: "EDQUOT"}


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

    The file gets the permissions an ordinary ``open(path, "w")`` would give it. A full disk is a
    one-line :class:`UserError`; the previous file at ``path`` is left as it was.
    """
    writer = WRITERS[fmt]
    _write_atomically(Path(path), lambda f: writer(obj, f))


def atomic_copy(source: str | Path, path: str | Path, on_block: Callable[[int], None] | None = None) -> None:
    """Copy ``source``'s bytes to ``path`` atomically (same guarantees as :func:`atomic_write`).

    ``on_block(n)`` runs after the n-th 1 MiB block is written (tests interrupt a copy half-way).
    """
    def copy(f: BinaryIO) -> None:
        with open(source, "rb") as src:
            for n, block in enumerate(iter(lambda: src.read(1 << 20), b""), start=1):
                f.write(block)
                if on_block is not None:
                    f.flush()
                    on_block(n)

    _write_atomically(Path(path), copy)


def replace_durably(source: str | Path, path: str | Path) -> None:
    """``os.replace(source, path)`` (atomic on POSIX), then fsync the directory so the rename survives a crash."""
    os.replace(source, path)
    fsync_dir(Path(path).parent)


def fsync_dir(folder: str | Path) -> None:
    """Make a directory's entries (files created, renamed or removed in it) durable."""
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def full_disk_error(err: BaseException) -> OSError | None:
    """The out-of-space ``OSError`` behind ``err``, if any (torch.save re-raises it as a RuntimeError
    "unexpected pos", keeping the OSError as its context)."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in FULL_DISK_ERRNOS:
            return err
        err = err.__cause__ or err.__context__
    return None


def _write_atomically(path: Path, write: Callable[[BinaryIO], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        full = full_disk_error(err)
        if full is not None:
            free = shutil.disk_usage(path.parent).free
            kept = f"the previous {path.name} is intact" if path.exists() else "nothing was written"
            raise UserError(f"the disk is full ({FULL_DISK_ERRNOS[full.errno]}) while writing {path} "
                            f"({free / 2**20:.0f} MiB free on its file system): {kept}; free some space "
                            f"and rerun") from None
        raise
    fsync_dir(path.parent)


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
