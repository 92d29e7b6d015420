"""Several workers on one study, and trials left RUNNING by a killed worker.

Any number of processes may run the search loop on one study (same ``--storage``, same
``--study``). This module owns how they share it:

* **Who is alive.** Each trial records its worker (user attr ``worker``: host, boot id, pid,
  process start time). A RUNNING trial whose worker ran on this machine and is gone (SIGKILL,
  power cut of a process) is failed at once and retried. On RDB storages (SQLite, PostgreSQL)
  Optuna's heartbeat does the same for workers on other machines: a trial whose heartbeat is
  older than the grace period is failed and retried. Retrying = Optuna's
  ``RetryHeartbeatStaleTrialCallback``: a WAITING copy of the trial with the same params, which
  the next ``ask`` of any worker picks up, so the arch it was evaluating is not lost.
* **Exact totals.** ``--trials N`` is the number of COMPLETE trials the study should hold, across
  all workers. A trial may start only while (complete + running trials numbered before it) < N;
  otherwise it waits for those to finish. If they all complete it is not needed: it is closed as
  FAIL with user attr ``surplus`` (it evaluated nothing and is not retried), so
  the COMPLETE count never overshoots N. Between trials a worker waits while complete + running
  >= N, so a surplus trial happens only when two workers ask at the same instant.
"""
from __future__ import annotations

import copy
import os
import socket
import time
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

#: seconds between heartbeats of a running trial (RDB storages); a trial without a heartbeat for
#: GRACE_FACTOR times this long is failed and retried by the next worker that looks
HEARTBEAT_INTERVAL = 10
GRACE_FACTOR = 3
MAX_RETRY = 3
POLL_SECONDS = 0.5
WORKER_ATTR = "worker"
SURPLUS_ATTR = "surplus"
ORPHAN_SECONDS = 120


def retry_callback() -> optuna.storages.RetryHeartbeatStaleTrialCallback:
    with warnings.catch_warnings():  # "experimental" since Optuna 2.8: not the user's concern
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _start_ticks(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), '' where /proc is absent,
    None when no such process exists."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except FileNotFoundError:
        return None
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return ""


def identity() -> dict[str, Any]:
    """This process, as recorded on the trials it runs."""
    pid = os.getpid()
    return {"host": socket.gethostname(), "boot": _boot_id(), "pidns": _pid_namespace(),
            "pid": pid, "start": _start_ticks(pid) or ""}


def _pid_namespace() -> str:
    """This process's PID namespace (containers on one host share its hostname and boot id)."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def is_dead(worker: Any) -> bool:
    """True only when ``worker`` ran on this machine (same host and boot) and is gone."""
    if not isinstance(worker, dict) or worker.get("host") != socket.gethostname():
        return False
    if worker.get("boot", "") != _boot_id():
        return False
    if worker.get("pidns") and worker["pidns"] != _pid_namespace():  # older records lack it
        return False
    try:
        start = _start_ticks(int(worker["pid"]))
    except (KeyError, TypeError, ValueError):
        return False
    if start is None:
        return True
    return bool(start and worker.get("start") and start != worker["start"])  # pid reused


def recover(study: optuna.Study) -> list[int]:
    """Fail and retry the RUNNING trials of dead workers; returns their numbers.

    Dead workers on this machine are found by pid at once; on RDB storages Optuna's heartbeat
    finds those elsewhere after the grace period. When two workers fail the same trial, the
    storage lets only one succeed, so each is retried once."""
    with warnings.catch_warnings():  # "experimental" since Optuna 2.9
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # heartbeat (RDB storages); no-op elsewhere
    storage = study._storage
    failed = []
    now = datetime.now()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = t.user_attrs.get(WORKER_ATTR)
        # a retry copies its failed trial's user attrs, so a record naming another trial is the
        # dead worker's, not the one now running it: unclaimed, like a trial with no record
        if isinstance(worker, dict) and worker.get("trial", t.number) != t.number:
            worker = None
        # a worker records itself right after `ask`; none after minutes: it died in between
        orphan = (worker is None and t.datetime_start is not None
                  and (now - t.datetime_start).total_seconds() > ORPHAN_SECONDS)
        if not (orphan or is_dead(worker)):
            continue
        try:
            storage.set_trial_user_attr(t._trial_id, "error",
                                        "its worker process died while it was RUNNING; retried")
            if not storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                continue
        except (optuna.exceptions.UpdateFinishedTrialError, KeyError):
            continue  # another worker failed it first
        dead = copy.deepcopy(storage.get_trial(t._trial_id))
        dead.user_attrs.pop("error", None)  # the retry copies the user attrs, not this one
        retry_callback()(study, dead)
        failed.append(t.number)
    return failed


def _counts(study: optuna.Study, below: int | None = None) -> tuple[int, int]:
    """(complete trials, running trials [numbered below ``below``])."""
    from nasopt.search.ledger import Ledger
    storage = study._storage
    ledger = storage if isinstance(storage, Ledger) else Ledger(storage)
    return ledger.count_trials(study._study_id, below)


def claim(study: optuna.Study, trial: optuna.Trial, target: int) -> bool:
    """Wait until ``trial`` (RUNNING) is needed to reach ``target`` complete trials (True) or
    the others have reached it (False: the trial is surplus)."""
    while True:
        complete, ahead = _counts(study, below=trial.number)
        if complete >= target:
            return False
        if complete + ahead < target:
            return True
        time.sleep(POLL_SECONDS)
        recover(study)


def wait_for_room(study: optuna.Study, target: int) -> int:
    """Between trials: wait while the running trials of other workers may already fill the
    remaining slots. Returns the number of complete trials."""
    while True:
        complete, running = _counts(study)
        if complete >= target or complete + running < target:
            return complete
        time.sleep(POLL_SECONDS)
        recover(study)


class Surplus(Exception):
    """The trial is not needed: the study reached its target while it waited."""

    def __init__(self) -> None:
        super().__init__("surplus trial: the study already holds its completed trials")
