"""The package layout as a user meets it: nothing with a generic top-level name (a user's own
strategies.py or search_spaces.py in the working folder changes nothing), the public names for
writing a space, strategies offered by installed packages, and the benchmark harness outside
the library."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import nasopt

ROOT = Path(__file__).resolve().parents[1]
BROKEN = 'raise ImportError("a user module of the same name must not be imported")\n'


def run(cwd: Path, *argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env=env)


@pytest.mark.parametrize("name", ["strategies", "search_spaces", "benchmarks", "core", "search",
                                  "deploy", "cli"])
def test_a_users_module_with_a_generic_name_does_not_disturb_nasopt(tmp_path, name):
    (tmp_path / f"{name}.py").write_text(BROKEN)
    probe = run(tmp_path, "-c", "from nasopt import api\n"
                "print(sorted(api.STRATEGIES)[:2], sorted(api.SPACES)[:1])")
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == "['evolution', 'nsga2'] ['conv1d']"
    search = run(tmp_path, "-m", "nasopt", "search", "--space", "nb201", "--table",
                 "--trials", "2", "--quiet", "--run-dir", "runs")
    assert search.returncode == 0, search.stderr


def test_the_public_names_for_writing_a_space():
    import torch

    from nasopt.core.space import SearchSpace
    from nasopt.supernet import elastic, network

    assert nasopt.SearchSpace is SearchSpace and nasopt.ElasticNetwork is network.ElasticNetwork
    assert nasopt.ElasticLinear is elastic.ElasticLinear
    assert {"ElasticConv1d", "ElasticConv2d", "ElasticBatchNorm1d", "ElasticBatchNorm2d",
            "importance", "permute_", "permute_bn_", "compression_genes"} <= set(dir(nasopt))
    with pytest.raises(AttributeError):
        nasopt.no_such_name  # noqa: B018
    depthwise = nasopt.ElasticConv2d(8, 8, 3, depthwise=True)
    assert depthwise(torch.zeros(1, 6, 5, 5)).shape == (1, 6, 5, 5)  # follows its input


def test_a_network_that_is_not_elastic_is_refused_in_one_line():
    from torch import nn

    from nasopt.core.errors import NasoptError

    class Plain(nasopt.SearchSpace):
        name = "plain"

        def architecture_genes(self):
            return {"w": (4, 8)}

        def network(self, dims):
            return nn.Linear(3, 2)

    with pytest.raises(NasoptError, match="subclasses nasopt.ElasticNetwork"):
        Plain((3,), 2).supernet()


def test_the_group_rule_has_one_owner():
    from nasopt.spaces.conv1d import Conv1dSpace
    from nasopt.supernet.network import depth_position, group_of, units

    assert [group_of(n) for n in ("stages.0.blocks.1.conv", "stages.2", "head", "stem_bn")] \
        == ["s1", "s3", "head", "stem"]
    assert Conv1dSpace.group_of is group_of  # the space's rule is the network module's
    assert depth_position("stages.1.blocks.2.conv") == ("s2.depth", 2)
    assert depth_position("stages.1.weight") == ("depth", 1)
    assert depth_position("head") is None
    space = Conv1dSpace((1, 40), 10)
    names = [n for n, _ in units(space.build(space.largest()))]
    assert names[:3] == ["stages.0.blocks.0", "stages.0.blocks.1", "stages.0.blocks.2"]
    assert names[-1] == "head"


def test_a_strategy_offered_by_an_installed_package(tmp_path):
    """A package that declares `[project.entry-points."nasopt.strategies"]` (its installed
    metadata, as pip writes it) is listed and searched by name; a broken one is one line."""
    site = tmp_path / "site"
    info = site / "mystrategy-0.1.dist-info"
    info.mkdir(parents=True)
    (site / "mystrategy.py").write_text(
        "import optuna\n"
        "from nasopt.core.strategy import Strategy\n"
        "STRATEGY = Strategy('qmc', 'quasi-random (Sobol) sampling',\n"
        "                    lambda space, seed: optuna.samplers.QMCSampler(seed=seed))\n"
        "NOT_A_STRATEGY = 42\n")
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mystrategy\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[nasopt.strategies]\nqmc = mystrategy:STRATEGY\nbroken = mystrategy:NOT_A_STRATEGY\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(site), *filter(None, [os.environ.get("PYTHONPATH")])])}
    listed = run(tmp_path, "-m", "nasopt", "strategies", env=env)
    assert listed.returncode == 2 and "quasi-random (Sobol) sampling" in listed.stdout
    assert "is not a nasopt Strategy" in listed.stderr  # the broken entry, named, after the list
    search = run(tmp_path, "-m", "nasopt", "search", "--space", "nb201", "--table", "--strategy",
                 "qmc", "--trials", "3", "--quiet", "--run-dir", "runs", env=env)
    assert search.returncode == 0, search.stderr
    assert "3 completed trials" in search.stdout
    broken = run(tmp_path, "-m", "nasopt", "search", "--space", "nb201", "--table", "--strategy",
                 "broken", "--trials", "3", "--quiet", "--run-dir", "runs2", env=env)
    assert broken.returncode == 2 and len(broken.stderr.strip().splitlines()) == 1
    assert "is not a nasopt Strategy" in broken.stderr


def test_bench_without_the_harness_says_how_to_install_it():
    probe = run(ROOT, "-c", "import sys\nsys.modules['nasopt_bench'] = None\n"
                "from nasopt.cli.main import main\nraise SystemExit(main(['bench', '--help']))")
    assert probe.returncode == 2
    assert probe.stderr.strip().splitlines() == [
        "nasopt: error: `nasopt bench` needs the benchmark harness, which is not part of the "
        "nasopt package: from a source checkout, pip install -e ./benchmarks"]


def test_the_tree_shows_the_architecture():
    """Every module of the library lies in a sub-package by concept; only the facades
    (``api``, ``pipeline``, ``testing``) and the entry points sit at the top."""
    top = sorted(p.name for p in (ROOT / "nasopt").glob("*.py"))
    assert top == ["__init__.py", "__main__.py", "api.py", "pipeline.py", "testing.py"]
    packages = sorted(p.parent.name for p in (ROOT / "nasopt").glob("*/__init__.py"))
    assert packages == ["cli", "compression", "core", "deploy", "gradient", "hardware",
                        "inspection", "search", "supernet"]
