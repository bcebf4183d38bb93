"""Telling a file torch.save wrote from one it did not, by its first bytes (no unpickling).

Every reader of checkpoints (``distiller.engine.checkpoints.safe_load``, a network's ``weights=`` file)
asks first, so that a text file given as a checkpoint is named as such instead of failing inside
the unpickler with a misleading message (or a bare ``KeyError``).
"""
from __future__ import annotations

from pathlib import Path

# how torch.save's files begin: a zip archive (the default since torch 1.6), the legacy pickle
# (protocol 2: 0x80 0x02), the oldest tar layout ("ustar" at byte 257), or the legacy magic number
# pickled as text (protocol 0/1)
_ZIP, _PICKLE, _TAR_AT, _MAGIC = b"PK\x03\x04", b"\x80", 257, b"119547037146038801333356"


def not_a_torch_file(path: str | Path) -> str | None:
    """Why the file at ``path`` cannot be one torch.save wrote (None when it may be), from its first 512 bytes."""
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        return "the file is empty"
    if head.startswith((_ZIP, _PICKLE)) or head[_TAR_AT:_TAR_AT + 5] == b"ustar" or _MAGIC in head[:32]:
        return None
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return f"it begins with the bytes {head[:8].hex(' ')}"
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return f"it is a text file, beginning {first[:40]!r}"
