"""A user's own search space, named by an import spec (`path/file.py:Class`, `module:Class`):
searched, then inspected, exported and loaded from another folder in fresh processes (the study
and the export record how to import the class)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from nasopt.cli import main as cli

USER_SPACE = '''"""A user's space: the shipped conv1d family under its own name."""
from nasopt.spaces.conv1d import Conv1dSpace


class NarrowConv1d(Conv1dSpace):
    name = "narrow-conv1d"
'''
TINY = ["--dataset", "mnist1d", "--trials", "3", "--quiet", "--set", "supernet.epochs=1",
        "--set", "supernet.warmup_epochs=1", "--set", "supernet.n_random=0",
        "--restrict", "s1.depth=1", "--restrict", "s2.depth=1", "--restrict", "s3.depth=1"]


def run(cwd: Path, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """A study of the user's space, searched from the folder that holds its file."""
    root = tmp_path_factory.mktemp("user_space")
    (root / "mine").mkdir()
    (root / "mine" / "my_space.py").write_text(USER_SPACE)
    old = os.getcwd()
    os.chdir(root / "mine")
    try:
        assert cli.main(["search", "--space", "my_space.py:NarrowConv1d", *TINY,
                         "--run-dir", str(root / "runs")]) == 0
    finally:
        os.chdir(old)
    return root


def test_a_fresh_process_elsewhere_inspects_exports_and_loads_it(searched):
    elsewhere = searched / "elsewhere"
    elsewhere.mkdir()
    runs = str(searched / "runs")
    show = run(elsewhere, "-m", "nasopt.cli", "studies", "show", "narrow-conv1d-mnist1d",
               "--run-dir", runs)
    assert show.returncode == 0 and "COMPLETE" in show.stdout, show.stderr
    export = run(elsewhere, "-m", "nasopt.cli", "export", "narrow-conv1d-mnist1d", "--trial",
                 "best", "--out", "model", "--run-dir", runs)
    assert export.returncode == 0, export.stderr
    load = run(elsewhere, "-c", "import json, torch, nasopt\n"
               "x = torch.zeros(2, 1, 40)\n"
               "print(tuple(nasopt.load('model')(x).shape), "
               "tuple(nasopt.load('model/model.packed')(x).shape))\n"
               "print(json.load(open('model/model.json'))['space']['import'])")
    assert load.returncode == 0, load.stderr
    shape, spec = load.stdout.splitlines()
    assert shape == "(2, 10) (2, 10)"
    assert spec == f"{searched / 'mine' / 'my_space.py'}:NarrowConv1d"  # absolute: any folder


def test_the_study_continues_and_finetunes_from_elsewhere(searched, tmp_path):
    runs = str(searched / "runs")
    tune = run(tmp_path, "-m", "nasopt.cli", "finetune", "--study", "narrow-conv1d-mnist1d",
               "--trial", "best", "--epochs", "1", "--out", "tuned", "--run-dir", runs)
    assert tune.returncode == 0, tune.stderr
    spec = str(searched / "mine" / "my_space.py") + ":NarrowConv1d"
    more = run(tmp_path, "-m", "nasopt.cli", "search", "--space", spec, *TINY[:2], "--trials",
               "4", *TINY[4:], "--run-dir", runs)
    assert more.returncode == 0 and "4 completed trials (1 run now" in more.stdout, more.stderr


@pytest.mark.parametrize("spec, message", [
    ("nope.py:X", "the file"),
    ("my_space.py:Nope", "has no 'Nope'; the classes there: Conv1dSpace, NarrowConv1d"),
    ("os:path", "is not a nasopt.SearchSpace subclass"),
    ("no_such_module_xyz:Space", "cannot import the module 'no_such_module_xyz'"),
    ("broken.py:Space", "importing"),
])
def test_a_space_that_cannot_be_found_is_one_line(searched, tmp_path, capsys, monkeypatch, spec,
                                                   message):
    (tmp_path / "my_space.py").write_text(USER_SPACE)
    (tmp_path / "broken.py").write_text("raise RuntimeError('a bug in the user file')\n")
    monkeypatch.chdir(tmp_path)
    code = cli.main(["search", "--space", spec, *TINY, "--run-dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err


def test_a_space_offered_by_an_installed_package_through_its_entry_point(tmp_path):
    """A package that declares `[project.entry-points."nasopt.spaces"]` (here its installed
    metadata, a .dist-info folder on the path, as pip writes it) is found by name: the tiny MLP
    example, searched, exported and loaded in fresh processes."""
    example = Path(__file__).resolve().parents[1] / "examples" / "tiny_mlp_space.py"
    site = tmp_path / "site"
    (site / "tinyspace-0.1.dist-info").mkdir(parents=True)
    (site / "tinyspace.py").write_text(example.read_text())
    (site / "tinyspace-0.1.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: tinyspace\nVersion: 0.1\n")
    (site / "tinyspace-0.1.dist-info" / "entry_points.txt").write_text(
        "[nasopt.spaces]\ntiny-mlp = tinyspace:TinyMLPSpace\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(site), *filter(None, [os.environ.get("PYTHONPATH")])])}
    listed = subprocess.run([sys.executable, "-m", "nasopt.cli", "spaces"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=300)
    assert listed.returncode == 0 and "tiny-mlp" in listed.stdout, listed.stderr
    found = subprocess.run([sys.executable, "-m", "nasopt.cli", "search", "--space", "tiny-mlp",
                            "--dataset", "digits", "--trials", "3", "--quiet", "--set",
                            "supernet.epochs=1", "--set", "supernet.warmup_epochs=1",
                            "--run-dir", "runs"], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=600)
    assert found.returncode == 0, found.stderr
    assert "study 'tiny-mlp-digits': 3 completed trials" in found.stdout
    export = subprocess.run([sys.executable, "-m", "nasopt.cli", "export", "tiny-mlp-digits",
                             "--trial", "best", "--out", "model", "--run-dir", "runs"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert export.returncode == 0, export.stderr
    load = subprocess.run([sys.executable, "-c", "import nasopt, torch\n"
                           "print(tuple(nasopt.load('model')(torch.zeros(2, 8, 8)).shape))"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert load.returncode == 0 and load.stdout.strip() == "(2, 10)", load.stderr


def test_the_tiny_mlp_example_from_a_folder_outside_the_repository(tmp_path):
    """examples/tiny_mlp_space.py copied to a folder of its own: searched on digits, exported,
    loaded in a fresh process (the README's promise for a user's own family)."""
    example = Path(__file__).resolve().parents[1] / "examples" / "tiny_mlp_space.py"
    (tmp_path / "tiny_mlp_space.py").write_text(example.read_text())
    search = run(tmp_path, "-m", "nasopt.cli", "search", "--space",
                 "tiny_mlp_space.py:TinyMLPSpace", "--dataset", "digits", "--trials", "4",
                 "--quiet", "--set", "supernet.epochs=2", "--set", "supernet.warmup_epochs=1",
                 "--max-size", "8KB", "--run-dir", "runs")
    assert search.returncode == 0, search.stderr
    assert "study 'tiny-mlp-digits': 4 completed trials" in search.stdout
    export = run(tmp_path, "-m", "nasopt.cli", "export", "tiny-mlp-digits", "--trial", "best",
                 "--out", "model", "--run-dir", "runs", "--format", "pytorch", "--format",
                 "packed", "--format", "onnx")
    assert export.returncode == 0, export.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    load = run(elsewhere, "-c", "import nasopt, torch\n"
               "from sklearn.datasets import load_digits\n"
               "x = torch.tensor(load_digits().images[:5], dtype=torch.float32)[:, None]\n"
               "print(tuple(nasopt.load('../model')(x).shape))")
    assert load.returncode == 0 and load.stdout.strip() == "(5, 10)", load.stderr
