"""Every user error gives one clear message naming the fix, exit code 2, and no traceback."""
from __future__ import annotations

import subprocess
import sys

import pytest

from nasopt import cli

QUICK = ["--set", "supernet.epochs=1", "--set", "supernet.warmup_epochs=1", "--quiet"]


def run(tmp_path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nasopt.cli", *args], capture_output=True,
                          text=True, cwd=tmp_path, timeout=300)


CASES = [
    (["search", "--space", "resnet", "--dataset", "digits"], "known: conv1d, mobilenet"),
    (["search", "--space", "conv1d", "--dataset", "mnist1d", "--strategy", "bayes"],
     "known: random, nsga2, tpe"),
    (["search", "--dataset", "cifar10"], "known: digits, mnist1d, fashion-mnist"),
    (["search", "--dataset", "mnist1d", "--restrict", "s7.k=3"], "unknown gene 's7.k'"),
    (["search", "--dataset", "mnist1d", "--restrict", "s1.k=4"], "choose among [3, 5, 7]"),
    (["search", "--dataset", "mnist1d", "--restrict", "s1.k="], "no option"),
    (["search", "--space", "conv1d", "--dataset", "digits"], "choose a space made for this data"),
    (["search", "--dataset", "mnist1d", "--storage",
      "postgresql://nasopt:s3cret@127.0.0.1:1/nasopt"], "cannot open storage"),
    (["search", "--dataset", "mnist1d", "--set", "search.trails=3"], "unknown config key"),
    (["search", "--dataset", "mnist1d", "--trials", "0"], "at least 1"),
    (["studies", "show", "nope"], "no study named 'nope'"),
    (["export", "nope", "--trial", "0", "--out", "x"], "no study named 'nope'"),
]


@pytest.mark.parametrize("args, message", CASES, ids=[" ".join(c[0][:3]) for c in CASES])
def test_user_errors(tmp_path, capsys, args, message):
    code = cli.main([*args, *(QUICK if args[0] == "search" else []), "--run-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and err.startswith("nasopt: error:")
    assert "s3cret" not in err  # passwords are masked


def test_no_traceback_from_the_real_command(tmp_path):
    proc = run(tmp_path, "search", "--space", "nope", "--dataset", "digits")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "unknown space 'nope'" in proc.stderr


def test_existing_study_with_a_different_space_is_refused(tmp_path, capsys):
    base = ["search", "--dataset", "mnist1d", "--run-dir", str(tmp_path), "--study", "s",
            "--trials", "1", *QUICK]
    assert cli.main([*base, "--restrict", "s1.k=3"]) == 0
    capsys.readouterr()
    assert cli.main([*base, "--restrict", "s1.k=5"]) == 2
    err = capsys.readouterr().err
    assert "different setup" in err and "new --study name" in err


def test_help_on_every_command():
    for args in (["--help"], ["search", "--help"], ["studies", "--help"],
                 ["studies", "show", "--help"], ["export", "--help"], ["bench", "--help"],
                 ["bench", "supernet", "--help"]):
        with pytest.raises(SystemExit) as exc:
            cli.main(args)
        assert exc.value.code == 0
