"""Arch: a flat, JSON-able mapping ``gene name -> value`` describing one whole deployed model."""
from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Union

Value = Union[int, float, str, bool]


class Arch(Mapping[str, Value]):
    """An immutable gene -> value mapping with a canonical key.

    Architecture genes (``s1.depth``) and, later, compression genes (``s1.bits``) live in the same
    mapping, so one Arch describes the whole deployed model.
    """

    __slots__ = ("_genes", "_key")

    def __init__(self, genes: Mapping[str, Value]):
        for name, value in genes.items():
            if not isinstance(name, str):
                raise TypeError(f"gene names must be strings, got {name!r}")
            if not isinstance(value, (int, float, str, bool)):
                raise TypeError(f"gene {name!r} has a non-JSON value {value!r}")
        self._genes = dict(sorted(genes.items()))
        self._key = json.dumps(self._genes, sort_keys=True, separators=(",", ":"))

    def __getitem__(self, name: str) -> Value:
        return self._genes[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._genes)

    def __len__(self) -> int:
        return len(self._genes)

    def __hash__(self) -> int:
        return hash(self._key)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Arch):
            return self._key == other._key
        if isinstance(other, Mapping):
            return self._genes == dict(other)
        return NotImplemented

    def __repr__(self) -> str:
        return f"Arch({self._genes})"

    @property
    def key(self) -> str:
        """Canonical string: equal archs have equal keys (used for caching and de-duplication)."""
        return self._key

    def to_dict(self) -> dict[str, Value]:
        return dict(self._genes)

    def to_json(self) -> str:
        return json.dumps(self._genes, sort_keys=True, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "Arch":
        data: Any = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("an arch JSON must be an object mapping gene names to values")
        return cls(data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Arch":
        return cls.from_json(Path(path).read_text())
