"""Bad input, table-driven, through the real CLI: each case gives exactly one clear message
(`nasopt: error: ...` naming the fix), exit code 2, no traceback, and leaves every existing file
as it was (same bytes, same mtime). Cases already in tests/test_cli_errors.py are not repeated.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import optuna
import pytest

from nasopt import cli
from nasopt import study as nstudy
from nasopt.compress import Policy, compress
from nasopt.packed import pack
from search_spaces import SPACES

PASSWORD = "Sup3r-s3cret"
QUICK = ["--set", "supernet.epochs=1", "--set", "supernet.warmup_epochs=1", "--quiet"]


def _conv1d():
    space = SPACES["conv1d"]((1, 40), 10)
    return space, space.smallest()


def make_files(root: Path) -> None:
    """The inputs the cases refer to (created once per test, before the snapshot)."""
    (root / "typo.toml").write_text("[supernet]\nepoch = 3\n")
    (root / "broken.toml").write_text("[search\nspace = 'conv1d'\n")
    (root / "ts_only.toml").write_text("[export]\nformats = ['torchscript']\n")
    rng = np.random.default_rng(0)
    np.savez(root / "shapes.npz", x=rng.normal(size=(100, 40)).astype("float32"),
             y=np.arange(90) % 10)
    x = rng.normal(size=(100, 40)).astype("float32")
    x[3, 7] = np.nan
    np.savez(root / "nans.npz", x=x, y=np.arange(100) % 10)
    np.savez(root / "one_class.npz", x=rng.normal(size=(100, 40)).astype("float32"),
             y=np.zeros(100, dtype=int))
    space, arch = _conv1d()
    # an export folder whose packed file is cut short (a real packed file, truncated)
    model, stored = compress(space.build(arch).eval(), Policy.from_arch(arch), space.group_of)
    data = pack(space, arch, stored)
    export = root / "truncated_export"
    export.mkdir()
    (export / "arch.json").write_text(arch.to_json() + "\n")
    (export / "model.json").write_text(json.dumps({"space": space.describe(),
                                                   "files": {"packed": "model.packed"}}))
    (export / "model.packed").write_bytes(data[: len(data) // 2])
    # a student folder whose checkpoint is corrupt
    student = root / "corrupt_student"
    student.mkdir()
    (student / "arch.json").write_text(arch.to_json() + "\n")
    (student / "student.json").write_text(json.dumps({"space": space.describe(),
                                                      "dataset": {"dataset": "mnist1d"}}))
    (student / "student.pt").write_bytes(b"PK\x03\x04 this is not a checkpoint" * 10)
    # a storage with a nasopt study holding a FAILED trial, and a study nasopt did not create
    (root / "runs").mkdir()
    storage = nstudy.open_storage(f"sqlite:///{root}/runs/studies.db")
    s = optuna.create_study(study_name="s", storage=storage, directions=["maximize", "minimize"])
    s.set_user_attr(nstudy.SETUP_ATTR, {"space": space.describe(), "objectives": ["accuracy",
                                                                                  "size"]})
    trial = s.ask()
    s.tell(trial, state=optuna.trial.TrialState.FAIL)
    optuna.create_study(study_name="foreign", storage=storage)
    (root / "out").mkdir()
    (root / "out" / "keep.txt").write_text("do not touch")


CLOSED_PG = f"postgresql://nasopt:{PASSWORD}@127.0.0.1:9/nasopt"
SEARCH_TABLE = ["search", "--space", "nb201", "--table", "--quiet"]

# (case id, argv, text the one message must contain)
CASES = [
    ("typo'd key in a TOML file", ["search", "--config", "typo.toml", *QUICK],
     "unknown config key(s) ['supernet.epoch']"),
    ("TOML syntax error", ["search", "--config", "broken.toml", *QUICK], "is not valid TOML"),
    ("run exporting TorchScript alone", ["run", "ts_only.toml", "--quiet"],
     "needs pytorch or packed too"),
    ("bench distill without QAT epochs", ["bench", "distill", "--qat-epochs", "0", "--out",
                                          "d.md"], "--qat-epochs must be >= 1"),
    ("wrong type", ["search", "--set", "eval.calib_samples=\"many\"", *QUICK],
     "eval.calib_samples takes an integer"),
    ("negative learning rate", ["search", "--set", "supernet.lr=-0.1", *QUICK],
     "supernet.lr must be positive"),
    ("negative size budget", ["search", "--max-size=-4KB", *QUICK], "must be positive"),
    ("unreadable budget", ["search", "--max-macs", "lots", *QUICK], "write e.g."),
    ("negative timeout", [*SEARCH_TABLE, "--timeout", "-5"], "positive seconds"),
    ("unknown objective", [*SEARCH_TABLE, "--objectives", "accuracy,speed"],
     "unknown objective(s)"),
    ("unknown strategy (tabular)", [*SEARCH_TABLE, "--strategy", "annealing"], "known: random"),
    ("restrict to a nonexistent option", [*SEARCH_TABLE, "--restrict", "e1_0=conv_9x9"],
     "conv_9x9"),
    ("missing table", ["search", "--space", "nb201", "--table", "nope.csv", "--quiet"],
     "nope.csv"),
    ("dataset with wrong shapes", ["search", "--dataset", "shapes.npz", *QUICK],
     "x has 100 samples but y has shape (90,)"),
    ("dataset with NaNs", ["search", "--dataset", "nans.npz", *QUICK], "NaN"),
    ("dataset of one class", ["search", "--dataset", "one_class.npz", *QUICK],
     "needs at least two classes"),
    ("corrupt checkpoint", ["finetune", "--from", "corrupt_student", "--out", "out"],
     "is corrupt or not a nasopt checkpoint"),
    ("truncated packed file", ["finetune", "--from", "truncated_export", "--dataset", "mnist1d",
                               "--out", "out"], "truncated"),
    ("export of a FAILED trial", ["export", "s", "--trial", "0", "--out", "out"],
     "is FAIL, not COMPLETE"),
    ("export of a missing trial", ["export", "s", "--trial", "7", "--out", "out"],
     "has no trial 7"),
    ("study not created by nasopt", ["studies", "show", "foreign"], "not created by nasopt"),
    ("unknown study (pareto)", ["studies", "pareto", "nope"], "no study named 'nope'"),
    ("storage down (PostgreSQL, closed port)", ["studies", "list", "--storage", CLOSED_PG],
     "cannot open storage postgresql://nasopt:***@127.0.0.1:9/nasopt"),
    ("storage that is not a URL", ["studies", "list", "--storage", "runs/studies.db"],
     "is not a URL"),
    ("journal storage without a file", [*SEARCH_TABLE, "--storage", "journal:///"],
     "journal storage needs a file path"),
    ("heartbeat of zero seconds", [*SEARCH_TABLE, "--heartbeat", "0"],
     "at least 1 second"),
]


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(),
                                       p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bad")
    make_files(path)
    return path


@pytest.mark.parametrize("argv, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(root, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(root)
    before = snapshot(root)
    with_run_dir = argv[0] in ("search", "studies", "export")
    code = cli.main([*argv, *(["--run-dir", "runs"] if with_run_dir else [])])
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert err.count("nasopt: error:") == 1 and err.startswith("nasopt: error:"), err
    assert message in err, err
    assert "Traceback" not in err and PASSWORD not in err + out
    after = snapshot(root)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing overwritten
    new = sorted(set(after) - set(before))
    assert all(k.startswith("runs/") for k in new), new  # at most an empty study database


def test_the_table_has_enough_cases():
    assert len(CASES) >= 15


@pytest.mark.parametrize("text, hidden", [
    ("postgresql://u:pw@h/db", "pw"),
    ("(psycopg.OperationalError) postgresql+psycopg://nasopt:p@ss:w0rd@10.0.0.1:5432/x failed",
     "p@ss:w0rd"),
    ("host=db user=u password=hunter2 dbname=x", "hunter2"),
    ("mysql://root:toor@localhost/db and sqlite:///runs/studies.db", "toor"),
])
def test_passwords_are_masked_in_messages(text, hidden):
    masked = nstudy.mask_url(text)
    assert hidden not in masked and "***" in masked
    assert nstudy.mask_url("sqlite:///runs/studies.db") == "sqlite:///runs/studies.db"
