"""Import specs: a user's own object named as ``path/to/file.py:NAME`` (a Python file, relative
to the working folder) or ``package.module:NAME`` (an importable module). One loader for every
kind of object a user brings (search spaces, metric functions), with one clear error naming
what failed."""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

from nasopt.core.errors import NasoptError


def is_spec(text: str) -> bool:
    """Whether ``text`` names an object by import spec (``file.py:NAME``, ``module:NAME``)."""
    return ":" in text


def load_attribute(spec: str, what: str, example: str = "NAME") -> tuple[Any, Any, str]:
    """``(object, its module, a spec that finds it again from any folder)`` for the import spec
    ``spec`` (a file is recorded by its absolute path). ``what`` names the kind of object in
    errors (``"space"``, ``"metric"``), ``example`` the attribute in the hint."""
    where, _, attr = spec.rpartition(":")
    if not where or not attr:
        raise NasoptError(f"{what} {spec!r}: write path/to/file.py:{example} or "
                          f"package.module:{example}")
    if where.endswith(".py"):
        path = Path(where).expanduser().resolve()
        if not path.is_file():
            raise NasoptError(f"{what} {spec!r}: the file {path} does not exist; check the path "
                              f"(relative to the working folder)")
        name = f"nasopt_user_{abs(hash(str(path)))}"
        module = sys.modules.get(name)
        if module is None:
            loader_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[name] = module
            try:
                loader_spec.loader.exec_module(module)
            except Exception as exc:
                del sys.modules[name]
                raise NasoptError(f"{what} {spec!r}: importing {path} failed "
                                  f"({type(exc).__name__}: {exc}); fix the file") from None
        found = f"{path}:{attr}"
    else:
        try:
            module = importlib.import_module(where)
        except Exception as exc:
            raise NasoptError(f"{what} {spec!r}: cannot import the module {where!r} "
                              f"({type(exc).__name__}: {exc}); install it or put it on "
                              f"PYTHONPATH, or give path/to/file.py:{example}") from None
        found = spec
    return getattr(module, attr, None), module, found
