"""Registries of named parts: the ones nasopt ships, then those installed packages offer under an
entry-point group (``nasopt.spaces``, ``nasopt.strategies``), as ``name = "module:attr"``."""
from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator, Mapping
from importlib.metadata import EntryPoint, entry_points
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Mapping[str, T], Generic[T]):
    """The shipped entries by name (``builtin``), then the installed entry points of ``group``
    (a shipped name wins); an installed entry is imported only when it is looked up."""

    def __init__(self, builtin: Mapping[str, T], group: str):
        self._builtin = dict(builtin)
        self.group = group

    @abstractmethod
    def load_installed(self, name: str, entry: EntryPoint) -> T:
        """The entry ``name`` that an installed package offers (one clear error if it fails)."""

    def installed(self) -> dict[str, EntryPoint]:
        return {ep.name: ep for ep in entry_points(group=self.group)
                if ep.name not in self._builtin}

    def __getitem__(self, key: str) -> T:
        if key in self._builtin:
            return self._builtin[key]
        installed = self.installed()
        if key in installed:
            return self.load_installed(key, installed[key])
        raise KeyError(key)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and (key in self._builtin or key in self.installed())

    def __iter__(self) -> Iterator[str]:
        yield from self._builtin
        yield from self.installed()

    def __len__(self) -> int:
        return len(self._builtin) + len(self.installed())
