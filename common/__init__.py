"""Infrastructure every layer may import: the user-error type, the registry, atomic file writes.

Nothing here imports ``models``, ``datasets`` or ``distiller``, so the import graph
keeps pointing one way: ``common`` <- ``models``, ``datasets`` <- ``distiller`` <- entry points.
"""
from common.errors import UserError
from common.files import atomic_write
from common.registry import Registry

__all__ = ["UserError", "Registry", "atomic_write"]
