"""``common.files.atomic_write`` on a full disk: one line that says so, the previous file intact, no temp file.

The disk is filled by a file object whose ``write`` raises ``OSError(ENOSPC)`` after a few KiB,
as the kernel does; torch.save turns that into ``RuntimeError: unexpected pos`` with the OSError
as its context, which must still be recognised.
"""
from __future__ import annotations

import errno
import io
import json
import os
from pathlib import Path

import pytest
import torch

from common import files
from common.errors import UserError


class _FullDisk:
    """A file object that takes ``room`` bytes, then fails like a write to a full disk."""

    def __init__(self, f: io.BufferedWriter, room: int, code: int) -> None:
        self._f, self._room, self._code = f, room, code

    def write(self, data: bytes) -> int:
        self._room -= len(data)
        if self._room < 0:
            raise OSError(self._code, os.strerror(self._code))
        return self._f.write(data)

    def __getattr__(self, name: str):
        return getattr(self._f, name)

    def __enter__(self) -> _FullDisk:
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()


@pytest.fixture
def full_disk(monkeypatch):
    """Every file that atomic_write opens from now on has ``room`` bytes before ENOSPC (or another errno)."""
    def fill(room: int = 4096, code: int = errno.ENOSPC) -> None:
        real = os.fdopen
        monkeypatch.setattr(files.os, "fdopen", lambda fd, *a, **k: _FullDisk(real(fd, *a, **k), room, code))
    return fill


@pytest.mark.parametrize("fmt", ["torch", "json"])
def test_a_full_disk_keeps_the_previous_file_and_says_so(tmp_path: Path, full_disk, fmt: str) -> None:
    target = tmp_path / ("last.pt" if fmt == "torch" else "metrics.json")
    files.atomic_write({"epoch": 1, "w": [1.0] * 10} if fmt == "json" else {"epoch": 1, "w": torch.ones(10)},
                       target, fmt)
    before = target.read_bytes()
    full_disk()
    big = {"epoch": 2, "w": [2.0] * 100_000} if fmt == "json" else {"epoch": 2, "w": torch.ones(100_000)}
    with pytest.raises(UserError, match=r"the disk is full \(ENOSPC\) while writing .* the previous "
                                        rf"{target.name} is intact") as err:
        files.atomic_write(big, target, fmt)
    assert "\n" not in str(err.value) and str(target) in str(err.value)
    assert target.read_bytes() == before  # byte for byte the file before the failed write
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]  # the partial temporary file is gone
    loaded = json.loads(before) if fmt == "json" else torch.load(target, weights_only=True)
    assert loaded["epoch"] == 1


def test_a_full_disk_without_a_previous_file_leaves_nothing(tmp_path: Path, full_disk) -> None:
    full_disk(room=0)
    with pytest.raises(UserError, match=r"disk is full \(ENOSPC\).*nothing was written"):
        files.atomic_write({"w": torch.ones(1000)}, tmp_path / "final.pt")
    assert list(tmp_path.iterdir()) == []


def test_other_write_errors_are_not_called_a_full_disk(tmp_path: Path, full_disk) -> None:
    """An I/O error is not the user's to fix by freeing space: it stays the OSError it is."""
    full_disk(room=0, code=errno.EIO)
    with pytest.raises(OSError) as err:
        files.atomic_write({"a": 1}, tmp_path / "x.json", "json")
    assert err.value.errno == errno.EIO and not isinstance(err.value, UserError)
    assert list(tmp_path.iterdir()) == []


def test_a_quota_and_torch_s_unexpected_pos_are_recognised() -> None:
    """EDQUOT counts as full; the OSError is found behind torch.save's RuntimeError."""
    with pytest.raises((RuntimeError, OSError)) as err:
        torch.save({"w": torch.ones(10_000)}, _FullDisk(io.BufferedWriter(io.BytesIO()), 100, errno.EDQUOT))
    found = files.full_disk_error(err.value)
    assert found is not None and found.errno == errno.EDQUOT
    assert files.full_disk_error(RuntimeError("unexpected pos 704 vs 598")) is None  # no OSError behind it
