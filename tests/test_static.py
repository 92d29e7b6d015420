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
                                                    "examples", "tests")], Reporter(out, err))
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


def test_every_data_file_ships_in_a_built_wheel():
    """Each non-Python file inside ``nasopt/`` matches a package-data pattern, so an installed
    (non-editable) nasopt has its profiles and its NAS-Bench-201 table."""
    import tomllib

    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]["nasopt"]
    package = ROOT / "nasopt"
    data = [p.relative_to(package) for p in package.rglob("*")
            if p.is_file() and p.suffix not in (".py", ".pyc")]
    assert any(str(p) == "tables/nb201_cifar10.csv.gz" for p in data)
    missing = [str(p) for p in data if not any(p.match(pattern) for pattern in patterns)]
    assert not missing, f"add these to [tool.setuptools.package-data] in pyproject.toml: {missing}"


def test_nothing_names_a_path_outside_the_repository():
    """The repository stands alone: no tracked file reads or names a sibling folder of it."""
    import subprocess

    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    outside = "../" + "shared"  # split, so that this file does not name it either
    hits = [f for f in files if (ROOT / f).is_file() and f.endswith((".py", ".md", ".sh", ".toml",
                                                                       ".txt", ".cfg", ".ini"))
            and outside in (ROOT / f).read_text(errors="replace")]
    assert not hits, hits
