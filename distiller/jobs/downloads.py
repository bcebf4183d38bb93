"""Downloaded weights files: torchvision names each one after its sha256, so a damaged or altered copy shows.

torchvision (through ``torch.hub``) publishes its weights as ``<name>-<hex>.pth``, the hex digits
being the start of the file's sha256 (``resnet34-b627a593.pth``), and checks a download against
them. A teacher file that keeps such a name is held to the same check before it is indexed
(``scripts/teachers.py add``) or loaded unindexed: a truncated download or an edited copy is one
line, not a teacher that quietly scores less.
"""
from __future__ import annotations

import re
from pathlib import Path

from common.errors import UserError
from common.files import file_sha256

# <name>-<8 to 64 lower-case hex digits>.pth (or .pt): torch.hub's HASH_REGEX, held to whole names
HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.pth?$")


def check_name_hash(path: Path) -> None:
    """One :class:`UserError` when ``path``'s name promises a sha256 prefix its bytes do not have."""
    match = HASH_IN_NAME.search(Path(path).name)
    if match is None:
        return
    prefix, actual = match.group(1), file_sha256(path)
    if not actual.startswith(prefix):
        raise UserError(f"teacher checkpoint {path} is not the file its name promises: its sha256 begins "
                        f"{actual[:len(prefix)]}, not {prefix} (torchvision names a weights file after its sha256), "
                        f"so it was damaged or altered; download it again")
