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
                                                    "benchmarks", "examples", "tests")], Reporter(out, err))
    assert found == 0, out.getvalue() + err.getvalue()


def test_the_built_wheel_holds_the_package_and_nothing_else(tmp_path):
    """A wheel built from the tracked files holds every module of nasopt, search_spaces/ and
    strategies/ under ``nasopt`` (as ``nasopt.spaces`` and ``nasopt.strategies``), the profiles
    and the NAS-Bench-201 table; no top-level package with a generic name, and not the benchmark
    harness (a package of its own)."""
    import shutil
    import subprocess
    import sys
    import zipfile

    src = tmp_path / "src"
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, src / f)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)], check=True,
                   capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("nasopt-*.whl")
    names = {n for n in zipfile.ZipFile(wheel).namelist() if ".dist-info/" not in n}
    expected = set()
    for folder, package in (("nasopt", "nasopt"), ("search_spaces", "nasopt/spaces"),
                            ("strategies", "nasopt/strategies")):
        expected |= {f"{package}/{f[len(folder) + 1:]}" for f in files
                     if f.startswith(folder + "/")
                     and (not f.endswith(".md") or f == "nasopt/tables/README.md")}
    assert names == expected, (sorted(expected - names), sorted(names - expected))
    assert "nasopt/tables/nb201_cifar10.csv.gz" in names
    assert any(n.startswith("nasopt/hardware/profiles/") for n in names)


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
