"""A quick CLI: `nasopt --version`; `--help` and the read-only study commands import neither
torch nor the strategies (their start-up time is what a user waits for at every command)."""
from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from nasopt import __version__
from nasopt.cli import main as cli

HEAVY = ("torch", "nasopt.strategies", "nasopt.spaces", "sklearn", "matplotlib")

#: runs ``nasopt ARGS`` in a fresh interpreter, then prints the heavy modules it imported
PROBE = """
import sys
from nasopt.cli import main as cli
try:
    code = cli.main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
heavy = sorted(m for m in {heavy!r} if m in sys.modules)
print("IMPORTED", ",".join(heavy), "EXIT", code)
""".format(heavy=HEAVY)


def probe(*args: str) -> tuple[list[str], str]:
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True,
                          timeout=120)
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("IMPORTED") and last.endswith("EXIT 0"), proc.stdout + proc.stderr
    return [m for m in last.split()[1].split(",") if m and m != "EXIT"], proc.stdout


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"nasopt {__version__}"


def test_help_imports_neither_torch_nor_the_strategies():
    heavy, out = probe("--help")
    assert heavy == [] and "search" in out and "export" in out
    heavy, out = probe("studies", "--help")
    assert heavy == []


def test_read_only_study_commands_import_neither_torch_nor_the_strategies(tmp_path):
    run = str(tmp_path)
    assert cli.main(["search", "--space", "nb201", "--table", "--trials", "6", "--quiet",
                     "--study", "s", "--run-dir", run]) == 0
    for args in (["studies", "list"], ["studies", "show", "s"], ["studies", "pareto", "s"],
                 ["studies", "compare", "s"], ["studies", "export", "s", "--to",
                                               str(tmp_path / "t.csv")]):
        heavy, out = probe(*args, "--run-dir", run)
        assert heavy == [], (args, heavy)
        assert "s" in out


def test_nasopt_run_help_names_the_config_top_level_keys():
    from nasopt.cli.deploy import RUN_TOP_LEVEL
    from nasopt.pipeline import RunConfig
    plain = [f.name for f in dataclasses.fields(RunConfig)
             if f.default is not dataclasses.MISSING]
    assert sorted(RUN_TOP_LEVEL) == sorted(plain)
