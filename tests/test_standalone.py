"""The repository stands alone: a copy of it in a folder of its own (nothing beside it) collects
the whole suite and searches the shipped NAS-Bench-201 table."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _copy_checkout(dest: Path) -> Path:
    """The files git would clone (tracked, plus new files not ignored) copied to ``dest``: what
    a fresh clone of the working tree holds, without committing it first."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def test_a_copy_alone_in_its_folder_collects_the_suite_and_finds_its_table(tmp_path):
    clone = _copy_checkout(tmp_path / "alone" / "nasopt")
    assert sorted(p.name for p in clone.parent.iterdir()) == ["nasopt"]
    # the copy's own code first on the path (not this checkout's editable install)
    env = {**os.environ, "PYTHONPATH": str(clone), "PYTHONDONTWRITEBYTECODE": "1"}
    collect = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                              "-p", "no:cacheprovider"], cwd=clone, env=env,
                             capture_output=True, text=True, timeout=600)
    assert collect.returncode == 0, collect.stdout[-3000:] + collect.stderr[-3000:]
    assert " error" not in collect.stdout.splitlines()[-1], collect.stdout[-3000:]
    run = subprocess.run([sys.executable, "-m", "nasopt.cli", "search", "--space", "nb201",
                          "--table", "--trials", "5", "--quiet", "--run-dir", "runs"], cwd=clone,
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "study 'nb201-nb201_cifar10': 5 completed trials" in run.stdout, run.stdout
