"""A small generic name -> object registry used for models, methods and data sets."""
from __future__ import annotations

import difflib
from typing import Any, Callable, Generic, Iterable, TypeVar

from common.errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names (and aliases) to objects; unknown names raise a helpful :class:`UserError`.

    ``kind`` names what is registered ("model", "method", ...) and is used in messages.
    Lookups are case-insensitive when ``case_insensitive`` is set (model names are).
    Keyword arguments of :meth:`register` are kept as the entry's metadata (e.g. a model's
    recommended learning rate), read back with :meth:`metadata`.
    """

    def __init__(self, kind: str, case_insensitive: bool = False) -> None:
        self.kind = kind
        self.case_insensitive = case_insensitive
        self._entries: dict[str, T] = {}
        self._canonical: dict[str, str] = {}  # lookup key -> canonical name (aliases included)
        self._metadata: dict[str, dict[str, Any]] = {}

    def _key(self, name: str) -> str:
        return name.lower() if self.case_insensitive else name

    def register(self, name: str, aliases: Iterable[str] = (), **metadata: Any) -> Callable[[T], T]:
        """Decorator registering ``obj`` under ``name`` and its ``aliases``; duplicates raise."""

        def decorator(obj: T) -> T:
            self.add(name, obj, aliases, **metadata)
            return obj

        return decorator

    def add(self, name: str, obj: T, aliases: Iterable[str] = (), **metadata: Any) -> None:
        for key in (name, *aliases):
            if self._key(key) in self._canonical:
                raise ValueError(f"{self.kind} '{key}' is registered twice")
            self._canonical[self._key(key)] = name
        self._entries[name] = obj
        self._metadata[name] = dict(metadata)

    def remove(self, name: str) -> None:
        """Take ``name`` and its aliases out (plugins and tests that register for a while)."""
        canonical = self.canonical(name)
        for key in [k for k, target in self._canonical.items() if target == canonical]:
            del self._canonical[key]
        del self._entries[canonical]
        self._metadata.pop(canonical, None)

    def metadata(self, name: str) -> dict[str, Any]:
        """The keyword arguments ``name`` was registered with (a copy; empty when there were none)."""
        return dict(self._metadata[self.canonical(name)])

    def aliases(self, name: str) -> list[str]:
        """Every lookup key of ``name`` other than the name itself (aliases; lower case if case-insensitive)."""
        canonical = self.canonical(name)
        return [key for key, target in self._canonical.items() if target == canonical and key != canonical]

    def canonical(self, name: str) -> str:
        """The registered name for ``name`` (resolving aliases and case)."""
        try:
            return self._canonical[self._key(str(name))]
        except KeyError:
            raise UserError(self.unknown_message(str(name))) from None

    def get(self, name: str) -> T:
        return self._entries[self.canonical(name)]

    def unknown_message(self, name: str) -> str:
        valid = self.names()
        keys = list(self._canonical)
        close = difflib.get_close_matches(self._key(name), keys, n=1, cutoff=0.5)
        hint = f" Did you mean '{self._canonical[close[0]]}'?" if close else ""
        return f"unknown {self.kind} '{name}'.{hint} Valid {self.kind}s: {', '.join(valid)}"

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._key(name) in self._canonical

    def __len__(self) -> int:
        return len(self._entries)
