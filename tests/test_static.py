"""pyflakes over the code: an undefined name (a missing import on a path no other test runs)
or an unused import fails here rather than in a user's run."""
from __future__ import annotations

import io
from pathlib import Path

from pyflakes.api import checkRecursive
from pyflakes.reporter import Reporter

ROOT = Path(__file__).resolve().parents[1]


def test_pyflakes_finds_nothing():
    out, err = io.StringIO(), io.StringIO()
    found = checkRecursive([str(ROOT / d) for d in ("nasopt", "strategies", "search_spaces",
                                                    "tests")], Reporter(out, err))
    assert found == 0, out.getvalue() + err.getvalue()


def test_every_package_ships_in_a_built_wheel():
    """pyproject's package list covers every package of the code (a non-editable install of
    a hand-written list once left out ``nasopt.bench``, so ``nasopt bench`` failed)."""
    import tomllib

    from setuptools import find_packages

    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    included = set(find_packages(str(ROOT), include=find["packages"]["find"]["include"]))
    packages = {str(p.parent.relative_to(ROOT)).replace("/", ".")
                for d in ("nasopt", "strategies", "search_spaces")
                for p in (ROOT / d).rglob("__init__.py")}
    assert "nasopt.bench" in packages
    assert packages <= included, sorted(packages - included)
    assert included <= packages | {"tests"} and "tests" not in included
