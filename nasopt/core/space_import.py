"""Finding a search space from anywhere: the spaces nasopt ships, spaces installed under the
entry-point group ``nasopt.spaces``, and a user's own class named by an import spec:

- ``path/to/file.py:Class`` — a Python file (relative to the working folder, recorded as an
  absolute path);
- ``package.module:Class`` — an importable module.

A space found by a spec remembers it (``import_spec`` on the class); its description
(:meth:`nasopt.core.space.SearchSpace.describe`) records it, so that a study, an export folder and a
worker in a fresh process find the class again (:func:`nasopt.core.space.space_from_description`).
"""
from __future__ import annotations

from collections.abc import Mapping
from importlib.metadata import EntryPoint

from nasopt.core.errors import NasoptError
from nasopt.core.import_spec import is_spec, load_attribute
from nasopt.core.registry import Registry
from nasopt.core.space import SearchSpace

#: the entry-point group under which installed packages offer their spaces (name = "module:Class")
ENTRY_POINTS = "nasopt.spaces"


def load_space_class(spec: str) -> type[SearchSpace]:
    """The :class:`SearchSpace` subclass that the import spec ``spec`` names; one clear error
    naming what failed otherwise. The class's ``import_spec`` is set to a spec that finds it
    again from any folder (a file's absolute path)."""
    cls, module, found = load_attribute(spec, "space", "Class")
    where, _, attr = spec.rpartition(":")
    if cls is None:
        raise NasoptError(f"space {spec!r}: {where} has no {attr!r}; the classes there: "
                          f"{', '.join(sorted(_space_classes(module))) or 'none'}")
    if not (isinstance(cls, type) and issubclass(cls, SearchSpace)):
        raise NasoptError(f"space {spec!r}: {attr} is not a nasopt.SearchSpace subclass")
    cls.import_spec = found
    return cls


def _space_classes(module) -> list[str]:  # noqa: ANN001
    return [k for k, v in vars(module).items()
            if isinstance(v, type) and issubclass(v, SearchSpace) and v is not SearchSpace]


class Spaces(Registry[type[SearchSpace]]):
    """Every space by name: the shipped ones (``builtin``), then the installed entry points of
    :data:`ENTRY_POINTS`; a key that is an import spec loads that class."""

    def __init__(self, builtin: Mapping[str, type[SearchSpace]]):
        super().__init__(builtin, ENTRY_POINTS)

    def load_installed(self, name: str, entry: EntryPoint) -> type[SearchSpace]:
        cls = load_space_class(entry.value)
        cls.import_spec = entry.value
        return cls

    def __getitem__(self, key: str) -> type[SearchSpace]:
        try:
            return super().__getitem__(key)
        except KeyError:
            if isinstance(key, str) and is_spec(key):
                return load_space_class(key)
            raise

    def __contains__(self, key: object) -> bool:
        # a spec's import errors are reported when it is loaded
        return super().__contains__(key) or (isinstance(key, str) and is_spec(key))
