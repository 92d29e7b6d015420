"""Resume after SIGKILL and several workers on one study, with real `nasopt search` processes.

* SIGKILL during supernet training, then mid-search (a trial RUNNING), re-run the same command:
  the training resumes at its partial epoch, every completed trial is kept, the killed trial is
  failed and retried (same params), and the study ends with exactly --trials completed trials.
* workers in parallel, 3 on a journal file and 4 on PostgreSQL (NASOPT_TEST_POSTGRES, started
  by .ci/run): exact total, distinct trials, Pareto front == the one computed from all trials;
  on PostgreSQL one worker is killed mid-trial and its trial is found by Optuna's heartbeat.
"""
from __future__ import annotations

import os
import signal
import uuid
from pathlib import Path
from urllib.parse import urlparse

import optuna
import pytest

from nasopt.search import workers
from nasopt_bench.crash import (
    TABLE, TINY, complete, fronts, kill_when, ledger, output, start, storage_of, trials_of,
)


def finish(proc, timeout: float = 600) -> tuple[str, str]:
    proc.wait(timeout=timeout)
    out, err = output(proc)
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err
    return out, err


def check_front(url: str, name: str) -> None:
    """nasopt's Pareto front == the non-dominated set computed from all trials."""
    ours, recomputed = fronts(url, name)
    assert ours == recomputed and recomputed


def check_exact(trials, total: int) -> None:
    counts = ledger(trials)
    assert (counts["gaps"], counts["duplicates"]) == (0, 0), counts  # no gap, no duplicate
    assert counts["complete"] == total, [(t.number, t.state.name) for t in trials]
    assert counts["incomplete"] == 0 and counts["running"] == 0, counts
    # a retried trial is run once: one retry per failed (stale) trial
    assert counts["double_retries"] == 0, counts
    # a surplus trial (two workers asked at the same instant) evaluated nothing
    assert counts["surplus_evaluated"] == 0, counts


def test_sigkill_in_supernet_training_and_mid_search_then_the_same_command_resumes(tmp_path):
    url = f"sqlite:///{tmp_path}/runs/studies.db"
    # a long heartbeat: the killed trial must be found at once by its dead pid, not by age
    cmd = [*TINY, "--trials", "12", "--study", "k", "--run-dir", "runs", "--heartbeat", "60"]
    folder = tmp_path / "runs" / "supernets"

    # (a) killed during supernet training, once the first epoch's checkpoint is written
    proc = start(tmp_path, *cmd)
    kill_when(proc, lambda: any(folder.glob("*.partial.pt")))
    proc.wait(timeout=60)
    assert "training supernet conv1d: " in output(proc)[1]  # the user is told what runs
    partial = next(folder.glob("*.partial.pt"))
    epoch = torch_load_epoch(partial)
    assert not list(folder.glob("conv1d-????????????????.pt"))  # not finished
    assert trials_of(url, "k") == []

    # (b) the same command resumes training, then is killed mid-search (a trial RUNNING): the
    # process SIGKILLs itself while evaluating its 4th trial (polling the study from here
    # races with trials that take ~0.1 s: the kill could land between two trials)
    proc = start(tmp_path, *cmd, kill_at="mid-evaluation:4")
    assert proc.wait(timeout=600) == -signal.SIGKILL, output(proc)[1][-2000:]
    err = output(proc)[1]
    assert f"resuming supernet training at epoch {epoch + 2}" in err  # not from scratch
    assert list(folder.glob("conv1d-????????????????.pt")) and not list(folder.glob("*.partial*"))
    before = trials_of(url, "k")
    killed = [t for t in before if t.state == optuna.trial.TrialState.RUNNING]
    assert len(killed) == 1
    kept = {t.number: (t.values, t.params) for t in complete(before)}

    # (c) the same command finishes the search
    out, err = finish(start(tmp_path, *cmd))
    assert "reusing trained supernet" in err
    after = trials_of(url, "k")
    check_exact(after, 12)
    by_number = {t.number: t for t in after}
    for number, (values, params) in kept.items():  # every completed trial is kept as it was
        assert by_number[number].state == optuna.trial.TrialState.COMPLETE
        assert (by_number[number].values, by_number[number].params) == (values, params)
    dead = by_number[killed[0].number]
    assert dead.state == optuna.trial.TrialState.FAIL and "died" in dead.user_attrs["error"]
    retry = [t for t in after if t.system_attrs.get("failed_trial") == dead.number]
    assert len(retry) == 1 and retry[0].state == optuna.trial.TrialState.COMPLETE
    assert retry[0].params == dead.params  # the arch it was evaluating is not lost
    assert "12 completed trials" in out


def torch_load_epoch(path: Path) -> int:
    from nasopt.core import checkpoint
    return int(checkpoint.load(path)["epoch"])


def run_workers(tmp_path: Path, url: str, total: int, n: int = 3, kill_one: bool = False):
    name = f"w-{uuid.uuid4().hex[:8]}"
    cmd = [*TABLE, "--trials", str(total), "--study", name, "--storage", url,
           "--run-dir", "runs", "--heartbeat", "1"]
    procs = [start(tmp_path, *cmd, "--seed", str(i)) for i in range(n)]
    if kill_one:  # a worker dies mid-trial "on another machine": only the heartbeat finds it
        victim = procs[0]
        storage = storage_of(url)

        def running_trial_moved_elsewhere() -> bool:
            """The victim's running trial, its record moved to another host *before* the kill
            (after it, a worker could find the dead PID first and fail the trial under us)."""
            for t in trials_of(url, name):
                if t.state == optuna.trial.TrialState.RUNNING and \
                        (t.user_attrs.get("worker") or {}).get("pid") == victim.pid:
                    try:
                        storage.set_trial_user_attr(
                            t._trial_id, "worker", {**t.user_attrs["worker"], "host": "elsewhere"})
                    except optuna.exceptions.UpdateFinishedTrialError:
                        return False  # it finished meanwhile: wait for its next trial
                    return True
            return False

        kill_when(victim, running_trial_moved_elsewhere)
        procs = procs[1:]
    password = urlparse(url).password
    for p in procs:
        out, err = finish(p)
        assert not password or password not in out + err  # masked in every output
    if password:  # and in the files written (the run's config)
        assert all(password.encode() not in f.read_bytes()
                   for f in (tmp_path / "runs").rglob("*") if f.is_file())
    trials = trials_of(url, name)
    check_exact(trials, total)
    check_front(url, name)
    strategies = {t.user_attrs.get("seed") for t in complete(trials)}
    assert len(strategies) >= 2  # the workers really shared the study
    return trials


def test_three_workers_share_a_journal_file(tmp_path):
    run_workers(tmp_path, f"journal:///{tmp_path}/runs/studies.log", total=40)


POSTGRES = os.environ.get("NASOPT_TEST_POSTGRES")


@pytest.mark.skipif(not POSTGRES and not os.environ.get("NASOPT_REQUIRE_POSTGRES"),
                    reason="no NASOPT_TEST_POSTGRES (.ci/run starts a PostgreSQL server)")
def test_four_workers_share_a_postgres_study_and_a_killed_one_is_retried(tmp_path):
    assert POSTGRES, "NASOPT_REQUIRE_POSTGRES is set but NASOPT_TEST_POSTGRES is not"
    trials = run_workers(tmp_path, POSTGRES, total=40, n=4, kill_one=True)
    stale = [t for t in trials if t.state == optuna.trial.TrialState.FAIL
             and not t.user_attrs.get(workers.SURPLUS_ATTR)]
    assert stale, "the killed worker's trial was not failed"
    assert all(any(r.system_attrs.get("failed_trial") == t.number for r in trials) for t in stale)


def test_sqlite_writer_waits_for_another_process_lock(tmp_path):
    """A SQLite storage waits out a lock held longer than sqlite3's default 5 s busy timeout
    (another worker's long write, a heartbeat under load) instead of "database is locked"."""
    import sqlite3
    import threading
    import time

    from nasopt.search.study import SQLITE_BUSY_TIMEOUT, open_storage
    study_lock_seconds = 6.5  # > sqlite3's 5 s default
    assert SQLITE_BUSY_TIMEOUT > study_lock_seconds
    db = tmp_path / "studies.db"
    storage = open_storage(f"sqlite:///{db}")
    held = threading.Event()

    def hold_lock() -> None:
        con = sqlite3.connect(db, isolation_level=None)
        con.execute("BEGIN EXCLUSIVE")
        held.set()
        time.sleep(study_lock_seconds)
        con.execute("COMMIT")
        con.close()
    locker = threading.Thread(target=hold_lock)
    locker.start()
    held.wait()
    start = time.monotonic()
    study = optuna.create_study(storage=storage, study_name="waits")
    waited = time.monotonic() - start
    locker.join()
    assert waited > 5 and study.study_name in optuna.get_all_study_names(storage)


def test_recover_fails_a_dead_workers_trial_but_not_a_retry_just_claimed(tmp_path):
    """A RUNNING trial whose record names a dead process is failed and retried; a retry still
    carrying the dead worker's record (Optuna copies user attrs, so it names the failed trial)
    is one another worker just asked for, and is left alone."""
    import subprocess
    import sys
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead = {**workers.identity(), "pid": gone.pid, "start": "1"}
    assert workers.is_dead(dead) and workers.is_dead({k: v for k, v in dead.items() if k != "pidns"})
    assert not workers.is_dead({**dead, "pidns": "pid:[1]"})  # another container: can't tell
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}", study_name="r")
    t = study.ask({"x": optuna.distributions.CategoricalDistribution([1, 2])})
    t.set_user_attr(workers.WORKER_ATTR, {**dead, "trial": t.number})
    assert workers.recover(study) == [t.number]
    retry = study.ask()  # the WAITING retry, now RUNNING in this process
    assert retry.params == t.params and retry.user_attrs[workers.WORKER_ATTR]["trial"] == t.number
    assert workers.recover(study) == []
    states = {tr.number: tr.state for tr in study.get_trials(deepcopy=False)}
    assert states == {t.number: optuna.trial.TrialState.FAIL,
                      retry.number: optuna.trial.TrialState.RUNNING}
