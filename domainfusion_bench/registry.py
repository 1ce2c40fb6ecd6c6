"""One small name -> object registry, shared by algorithms, datasets, launchers and backbones."""

from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterator, TypeVar

from domainfusion_bench.errors import DfbenchError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@ALGORITHMS.register("ERM")``. Re-registering a name replaces it (plugin reloads)."""

        def decorate(obj: T) -> T:
            self._entries[name] = obj
            if isinstance(obj, type):
                obj.registered_name = name  # type: ignore[attr-defined]
            return obj

        return decorate

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            close = difflib.get_close_matches(name, self._entries, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise DfbenchError(
                f"unknown {self.kind} {name!r}.{hint} Choices: {', '.join(self.names())}."
            ) from None

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def items(self):
        return self._entries.items()
