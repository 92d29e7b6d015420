"""Kill points of `nasopt bench reliability` (nasopt_bench.crash) and what a kill leaves behind.

tests/test_workers.py covers resume and several workers end to end; here: a kill point really
SIGKILLs a real `nasopt` process where it says, and an export killed between its files is
never a loadable mix of two exports.
"""
from __future__ import annotations

import signal

import pytest
import torch

from nasopt import api
from nasopt.core import checkpoint
from nasopt.deploy import export as nexport
from nasopt_bench import crash
from nasopt.compression.compress import Policy, compress
from nasopt.core.errors import NasoptError
from nasopt.spaces import SPACES


def test_kill_point_names_are_checked():
    assert crash.parse_point("mid-evaluation:4") == ("mid-evaluation", 4)
    assert crash.parse_point("final-print") == ("final-print", 1)
    with pytest.raises(ValueError, match="unknown kill point"):
        crash.parse_point("mid-lunch:2")
    with pytest.raises(ValueError, match="positive integer"):
        crash.parse_point("between-trials:0")


def test_a_kill_point_sigkills_a_real_nasopt_process_right_there(tmp_path):
    cmd = [*crash.TABLE, "--trials", "3", "--study", "t", "--run-dir", "runs"]
    code, out, err, _ = crash.wait(crash.start(tmp_path, *cmd, kill_at="between-trials:1"),
                                   timeout=120)
    assert code == -signal.SIGKILL, err[-2000:]
    assert not crash.has_traceback(out, err) and "completed trials" not in out
    trials = crash.trials_of(f"sqlite:///{tmp_path}/runs/studies.db", "t")
    assert [t.state.name for t in trials] == ["COMPLETE"]  # told COMPLETE, no next ask


def _deployed(space, arch, seed: int):
    torch.manual_seed(seed)
    return compress(space.build(arch).eval(), Policy.from_arch(arch), space.group_of)


def test_an_export_interrupted_in_its_swap_leaves_the_previous_one_whole(tmp_path, monkeypatch):
    """Ctrl-C while the new files move in: the previous export is put back whole (a SIGKILL
    there is undone by the next command: tests/test_hostile.py, bench reliability's kill
    matrix)."""
    from pathlib import Path
    space = SPACES["conv1d"]((1, 40), 10)
    a = space.smallest()
    b = space.validate({**a, "s1.bits": 4 if a["s1.bits"] != 4 else 8})  # same shapes
    out = tmp_path / "export"
    model_a, stored_a = _deployed(space, a, 0)
    nexport.export_model(model_a, stored_a, a, space, out, {}, api.SPACES)
    model_b, stored_b = _deployed(space, b, 1)
    real, into = Path.replace, []

    def interrupted(self, target):  # noqa: ANN001, ANN202 - the third new file moving in
        if Path(target).parent == out:
            into.append(Path(target).name)
            if len(into) == 3:
                raise KeyboardInterrupt
        return real(self, target)

    monkeypatch.setattr(Path, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        nexport.export_model(model_b, stored_b, b, space, out, {}, api.SPACES)
    monkeypatch.setattr(Path, "replace", real)
    assert "model.json" not in into[:2]  # the card, the export's commit record, comes last
    x = torch.randn(4, 1, 40)
    with torch.no_grad():
        assert (api.load(out)(x) - model_a(x)).abs().max().item() < 1e-6  # A, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no working folder left
    nexport.export_model(model_b, stored_b, b, space, out, {}, api.SPACES)  # the re-run
    with torch.no_grad():
        assert (api.load(out)(x) - model_b(x)).abs().max().item() < 1e-6


def test_the_run_config_is_written_atomically(tmp_path, monkeypatch):
    import os

    from nasopt.core.config import load_config
    path = tmp_path / "configs" / "k.json"
    load_config(None, ["supernet.epochs=3"]).save(path)
    before = path.read_bytes()

    def killed(src, dst):  # the process dies between writing the temp file and the rename
        raise KeyboardInterrupt
    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        load_config(None, ["supernet.epochs=7"]).save(path)
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == ["k.json"]  # no temp file left


def test_checkpoints_are_synced_before_the_rename_and_not_private(tmp_path, monkeypatch):
    import os
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real(fd))
    path = tmp_path / "supernets" / "x.partial.pt"
    checkpoint.save({"epoch": 3, "w": torch.ones(2)}, path)
    assert synced and checkpoint.load(path)["epoch"] == 3
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # like every other file written


def test_retrying_a_dead_workers_trial_prints_no_optuna_warning(recwarn):
    import optuna

    from nasopt.search import workers
    workers.retry_callback()
    assert not [w for w in recwarn if issubclass(w.category, optuna.exceptions.ExperimentalWarning)]


def test_run_now_counts_the_retry_of_a_dead_workers_trial(tmp_path):
    import socket
    import subprocess

    import optuna

    from nasopt.search import workers
    from nasopt.core.metrics import Metrics
    from nasopt.core.objectives import get_objectives
    from nasopt.search.loop import run_search, suggest_arch
    space = SPACES["conv1d"]((1, 40), 10)
    study = optuna.create_study(directions=["maximize", "minimize"],
                                storage=f"sqlite:///{tmp_path}/s.db",
                                sampler=optuna.samplers.RandomSampler(seed=0))
    gone = subprocess.Popen(["true"])
    gone.wait()
    trial = study.ask()  # left RUNNING by a worker that died on this machine
    suggest_arch(trial, space)
    trial.set_user_attr(workers.WORKER_ATTR, {"host": socket.gethostname(),
                                              "boot": workers._boot_id(), "pid": gone.pid,
                                              "start": "1"})
    ran = run_search(study, space, lambda arch: Metrics(accuracy=0.5, params=10, macs=10,
                                                        float_bytes=40),
                     get_objectives(["accuracy", "size"]), trials=3, show_progress=False)
    assert [t.state.name for t in study.trials] == ["FAIL", "COMPLETE", "COMPLETE", "COMPLETE"]
    assert study.trials[1].params == study.trials[0].params  # the retry
    assert ran == 3  # the retry was evaluated by this call too


def test_workers_starting_together_on_a_new_database_do_not_fail(tmp_path, monkeypatch):
    """The losers of the table-creation race (measured: 3 of 4 processes opening a new SQLite
    file at once) retry and open the storage; other errors are not retried."""
    import optuna

    from nasopt.search import study as nstudy
    real, calls = optuna.storages.RDBStorage, []

    def racing(url, **kwargs):
        calls.append(url)
        if len(calls) <= 2:
            raise RuntimeError("(sqlite3.OperationalError) table study_system_attributes "
                               "already exists")
        return real(url, **kwargs)

    monkeypatch.setattr(optuna.storages, "RDBStorage", racing)
    assert nstudy.open_storage(f"sqlite:///{tmp_path}/s.db") is not None and len(calls) == 3

    def down(url, **kwargs):
        calls.append(url)
        raise RuntimeError("connection refused")

    calls.clear()
    monkeypatch.setattr(optuna.storages, "RDBStorage", down)
    with pytest.raises(NasoptError, match="cannot open storage"):
        nstudy.open_storage(f"sqlite:///{tmp_path}/t.db")
    assert len(calls) == 1


def test_a_surplus_trial_is_not_logged_as_a_failure_with_a_traceback(tmp_path, monkeypatch):
    import logging

    import optuna

    from nasopt.search import workers
    from nasopt.core.metrics import Metrics
    from nasopt.core.objectives import get_objectives
    from nasopt.search.loop import run_search
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("optuna").addHandler(handler)
    monkeypatch.setattr(workers, "claim", lambda study, trial, target: False)  # others filled it
    study = optuna.create_study(directions=["maximize", "minimize"])
    try:
        run_search(study, SPACES["conv1d"]((1, 40), 10),
                   lambda arch: Metrics(accuracy=0.5, params=10, macs=10, float_bytes=40),
                   get_objectives(["accuracy", "size"]), trials=3, show_progress=False)
    finally:
        logging.getLogger("optuna").removeHandler(handler)
    assert study.trials[0].user_attrs[workers.SURPLUS_ATTR] is True
    assert not [r for r in records if "failed" in r.getMessage()], records
