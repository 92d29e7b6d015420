"""Studies: the Optuna study is the single ledger of a search.

Each trial's params are the arch, its user attr ``metrics`` holds the full Metrics, its values are
the objectives. The study's user attr ``nasopt`` holds the setup (space, data, supernet recipe,
objectives) so a study can be reopened, checked and exported without any other file.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
import pandas as pd

from nasopt.core.scores import HIGHER_IS_BETTER
from nasopt.core.trials import completed_trials
from nasopt.core.errors import NasoptError

SETUP_ATTR = "nasopt"
#: setup keys that may differ when an existing study is continued (they do not change scores)
#: (a table found at another path is the same table when its fingerprint matches; the supernet
#: check, nasopt.search.sanity, is measured again by each search;
#: the data's preprocessing is recorded since exports apply it; studies made before have none,
#: and its changes change the data fingerprint, which is compared)
FREE_KEYS = ("supernet_path", "table", "sanity", "preprocess")


def mask_url(text: str) -> str:
    """Hide the passwords of storage URLs in ``text`` (``postgresql://user:***@host/db``), also
    ``password=...`` parameters (libpq style). Works on whole messages, e.g. a driver's error."""
    # user (maybe empty) ':' password '@', up to the last '@': an '@' may be in the password
    text = re.sub(r"(://[^:/@\s]*:)\S*@", r"\1***@", text)
    return re.sub(r"(password\s*=\s*)('[^']*'|[^&\s]+)", r"\1***", text, flags=re.IGNORECASE)


def mask_secrets(value: Any) -> Any:
    """``value`` (a JSON-able record: dicts, lists, strings...) with :func:`mask_url` applied to
    every string: what nasopt writes to a file or prints about a run goes through this, so no
    storage password reaches the disk or the screen."""
    if isinstance(value, str):
        return mask_url(value)
    if isinstance(value, dict):
        return {mask_secrets(k): mask_secrets(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(mask_secrets(v) for v in value)
    return value


def resolve_storage(url: str | None, run_dir: str | Path, must_exist: bool = False) -> str:
    """The storage URL to use: ``url``, or an SQLite file in ``run_dir``. Makes the folder of a
    new SQLite or journal file; with ``must_exist`` (read-only commands) it makes nothing and
    raises unless that file exists (a server's URL, e.g. PostgreSQL, is not checked)."""
    if url is not None and url.startswith("sqlite:") and (
            url.split("?", 1)[0] in ("sqlite://", "sqlite:///") or ":memory:" in url
            or "mode=memory" in url):
        raise NasoptError(f"storage {url!r} is an in-memory SQLite database: its trials would be "
                          f"lost when the command ends; give a file, e.g. "
                          f"sqlite:///runs/studies.db")
    if url is None:
        file: str | None = str(Path(run_dir) / "studies.db")
    else:
        # the file of an SQLite or journal URL (an SQLite URL may carry ?query parameters)
        file = (url.split(":///", 1)[1].split("?", 1)[0] if url.startswith(("sqlite:///", JOURNAL))
                else None)  # the file of an SQLite or journal URL
    if file and must_exist and not Path(file).is_file():
        fix = ("give the run folder of a search with --run-dir, or its storage with --storage URL"
               if url is None else "check the --storage URL, or give the run folder of a search "
               "with --run-dir")
        raise NasoptError(f"no study database at {file}; {fix}")
    if file is not None and not must_exist:
        Path(file).parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{file}" if url is None else url


def open_existing_storage(url: str | None, run_dir: str | Path) -> optuna.storages.BaseStorage:
    """The storage of earlier searches, for commands that only read it: creates no folder and
    no file (see :func:`resolve_storage` with ``must_exist``)."""
    return open_storage(resolve_storage(url, run_dir, must_exist=True), read_only=True)


JOURNAL = "journal:///"


#: seconds a SQLite write waits for another process's lock before "database is locked"
#: (sqlite3's default, 5 s, is too short for several workers and a heartbeat thread under load;
#: kept below the default heartbeat grace period, 30 s, so a waiting heartbeat is not stale)
SQLITE_BUSY_TIMEOUT = 20


def _engine_kwargs(url: str) -> dict:
    return {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT}} if url.startswith("sqlite") else {}


def _sqlite_file(url: str) -> str | None:
    """The database file of an ``sqlite:///FILE[?query]`` URL (None for other URLs)."""
    return url.split(":///", 1)[1].split("?", 1)[0] if url.startswith("sqlite:///") else None


def _use_wal(url: str) -> None:
    """Put the SQLite database of ``url`` in write-ahead-log mode (kept in the file).

    A commit in SQLite's default rollback-journal mode waits for several fsyncs (~15 ms here),
    and Optuna commits every field of a trial; in WAL mode with ``synchronous=NORMAL`` (set on
    each connection, :func:`_sqlite_pragmas`) a commit is an append to the log. A killed process
    loses nothing it committed; a power cut may lose the last commits but never leaves the
    database corrupt (SQLite's guarantee for WAL), and those trials are retried like a killed
    worker's. Readers no longer block the writer. WAL needs the database's folder on a local
    disk (as SQLite storage always did: several machines share PostgreSQL or a journal file)."""
    import sqlite3
    file = _sqlite_file(url)
    if not file:
        return
    connection = sqlite3.connect(file, timeout=SQLITE_BUSY_TIMEOUT)
    try:
        connection.execute("PRAGMA journal_mode=WAL")
    finally:
        connection.close()


def _sqlite_pragmas(connection: Any, _record: Any) -> None:
    connection.execute("PRAGMA synchronous=NORMAL")  # with WAL: durable at a process kill


def open_storage(url: str, heartbeat: int | None = None, read_only: bool = False
                 ) -> optuna.storages.BaseStorage:
    """An Optuna storage for ``url``: ``sqlite:///FILE`` (one machine, one writer at a time),
    ``journal:///FILE`` (a journal file: several processes on one machine), or an RDB URL such
    as ``postgresql://user:pass@host/db`` (several machines). RDB storages get Optuna's
    heartbeat (``heartbeat`` seconds, default :data:`nasopt.search.workers.HEARTBEAT_INTERVAL`), so
    trials of a killed worker are failed and retried (see :mod:`nasopt.search.workers`)."""
    from nasopt.search import workers
    if url.startswith(JOURNAL):  # read_only: a torn journal is read as it is, not repaired
        return _journal(Path(url[len(JOURNAL):]), read_only)
    if "://" not in url:
        raise NasoptError(f"storage {mask_url(url)!r} is not a URL; use e.g. "
                          f"sqlite:///runs/studies.db, journal:///runs/studies.log or "
                          f"postgresql://user:pass@host/db")
    interval = int(workers.HEARTBEAT_INTERVAL if heartbeat is None else heartbeat)
    if interval < 1:
        raise NasoptError(f"the heartbeat interval must be at least 1 second, got {heartbeat}")
    for attempt in range(CREATE_ATTEMPTS):
        try:
            with warnings.catch_warnings():  # the heartbeat is "experimental" since Optuna 2.9
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                if not read_only:
                    _use_wal(url)
                storage = optuna.storages.RDBStorage(
                    url, engine_kwargs=_engine_kwargs(url), heartbeat_interval=interval,
                    grace_period=workers.GRACE_FACTOR * interval,
                    heartbeat_stale_trial_callback=workers.retry_callback())
                if _sqlite_file(url):
                    import sqlalchemy
                    sqlalchemy.event.listen(storage.engine, "connect", _sqlite_pragmas)
                    storage.engine.dispose()  # the connections made so far lack the pragma
                return storage
        except ImportError as exc:
            raise NasoptError(f"the database driver for {mask_url(url)} is not installed "
                              f"({exc}); for PostgreSQL: pip install 'psycopg[binary]'") from None
        except Exception as exc:
            # workers started together on a new database all create its tables: the losers
            # see "already exists" / a unique violation, and the tables are there a moment later
            if attempt + 1 < CREATE_ATTEMPTS and any(h in str(exc) for h in _CREATE_RACE):
                time.sleep(0.2 * (attempt + 1))
                continue
            if "database is locked" in str(exc):
                raise NasoptError(f"the SQLite database {mask_url(url)} stayed locked by another "
                                  f"process for {SQLITE_BUSY_TIMEOUT} s; for many workers use a "
                                  f"journal file (journal:///runs/studies.log) or PostgreSQL"
                                  ) from None
            raise NasoptError(f"cannot open storage {mask_url(url)} ({type(exc).__name__}); "
                              f"check that the database is running and the URL is "
                              f"right") from None
    raise AssertionError("unreachable")


CREATE_ATTEMPTS = 6
_CREATE_RACE = ("already exists", "UNIQUE constraint failed", "duplicate key")


def _journal(path: Path, read_only: bool = False) -> optuna.storages.BaseStorage:
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock
    if not str(path) or path.is_dir():
        raise NasoptError(f"journal storage needs a file path: journal:///path/to/studies.log "
                          f"(got {str(path)!r})")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # an open(O_EXCL) lock file works on every file system, NFS included
        lock = JournalFileOpenLock(str(path))
        if not read_only:
            repair_journal(path, lock)
        elif path.is_file() and path.stat().st_size and not _whole(path):
            print(f"nasopt: warning: the journal {path} ends in a torn record (read up to it); "
                  f"the next search on it cuts it off, keeping a copy", file=sys.stderr)
        backend = JournalFileBackend(str(path), lock_obj=lock)
        return optuna.storages.JournalStorage(backend)
    except Exception as exc:
        raise NasoptError(f"cannot open the journal file {path} ({type(exc).__name__}: {exc}); "
                          f"check the path and its permissions") from None


def repair_journal(path: Path, lock: Any) -> Path | None:
    """Cut a torn last record off the journal file ``path`` (a full disk or a killed machine
    leaves a partial line; Optuna reads the records before it, but a record appended after it
    would make the whole journal unreadable). Every complete record is kept. Returns the
    backup's path, or None when the journal was whole (then nothing is written or locked).

    The file is first copied beside itself (``FILE.torn-N``, before taking the lock, so a large
    journal does not hold it for long), then, holding the journal's own ``lock`` so that no
    worker appends meanwhile, checked again and cut back to its last complete record."""
    if not path.is_file() or path.stat().st_size == 0 or _whole(path):
        return None
    n = 1
    while (backup := path.with_name(f"{path.name}.torn-{n}")).exists():
        n += 1
    with open(path, "rb") as src, open(backup, "wb") as copy:
        shutil.copyfileobj(src, copy, 1 << 20)
        copy.flush()
        os.fsync(copy.fileno())
    lock.acquire()
    try:
        with open(path, "rb+") as f:
            size = f.seek(0, 2)
            keep, tail = _last_record_end(f, size)
            if keep == size:  # another process repaired it meanwhile
                backup.unlink()
                return None
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
    finally:
        lock.release()
    print(f"nasopt: warning: the journal {path} ended in a torn record ({size - keep} bytes: "
          f"{tail[:40]!r}...), cut off; every complete record is kept, the file as it was is "
          f"in {backup}", file=sys.stderr)
    return backup


def _whole(path: Path) -> bool:
    """Whether the journal file ``path`` ends in a whole record (read only)."""
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        return _last_record_end(f, size)[0] == size


def _last_record_end(f: Any, size: int) -> tuple[int, bytes]:
    """(offset just after the last whole, valid JSON line of the open file ``f``, the bytes
    after it): a last line without its newline, or one that is not JSON, is torn."""
    start = size
    while start > 0:  # find the newline before the last line, reading backwards in blocks
        block = min(start, 1 << 16)
        f.seek(start - block)
        data = f.read(block)
        cut = data.rfind(b"\n", 0, len(data) - (1 if start == size else 0))
        if cut >= 0:
            start = start - block + cut + 1
            break
        start -= block
    f.seek(start)
    last = f.read(size - start)
    if last.endswith(b"\n"):
        try:
            json.loads(last)
            return size, b""
        except ValueError:
            pass
    return start, last


def open_study(storage: optuna.storages.BaseStorage, name: str, setup: dict[str, Any],
               directions: list[str], sampler: optuna.samplers.BaseSampler | None = None
               ) -> optuna.Study:
    """Create the study ``name`` or continue it if its setup matches ``setup``."""
    try:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler)
    except KeyError:
        try:
            study = optuna.create_study(study_name=name, storage=storage, sampler=sampler,
                                        directions=directions)
            study.set_user_attr(SETUP_ATTR, setup)
            return study
        except optuna.exceptions.DuplicatedStudyError:  # another worker created it just now
            study = optuna.load_study(study_name=name, storage=storage, sampler=sampler)
    old = _setup_when_written(study)
    if old is None:
        raise NasoptError(f"study {name!r} exists but was not created by nasopt; "
                          f"choose another --study name")
    old = {**old, "space": with_later_genes(old.get("space"), setup.get("space"))}
    diffs = [k for k in sorted(set(old) | set(setup)) if k not in FREE_KEYS
             and old.get(k) != setup.get(k)]
    if "packed_format" in diffs:
        raise NasoptError(f"study {name!r} measured sizes in packed format "
                          f"{old.get('packed_format', 1)}, this nasopt writes format "
                          f"{setup['packed_format']} (with a checksum, 4 bytes more); continue "
                          f"it with the nasopt that made it, or search into a new --study name")
    if "scoring" in diffs:
        was = old.get("scoring", 1)
        how = ("on a float-trained supernet with BatchNorm folded before pruning" if was == 1
               else "pruning by weight magnitude" if was == 2 else "otherwise")
        raise NasoptError(f"study {name!r} scored its trials {how} (scoring {was}); this nasopt "
                          f"trains the supernet under compression and prunes by LAMP scores "
                          f"(scoring {setup.get('scoring')}): its trials stay readable and "
                          f"exportable; search into a new --study name")
    if diffs:
        detail = "; ".join(f"{k}: study has {old.get(k)!r}, now {setup.get(k)!r}" for k in diffs)
        raise NasoptError(f"study {name!r} was created with a different setup ({detail}); "
                          f"use a new --study name, or the study's original settings")
    return study


def with_later_genes(recorded: Any, current: Any) -> Any:
    """A study's recorded space description with the genes the space gained since filled in,
    where ``current`` holds them at their absent value only (what the recorded study meant):
    such a study goes on. Anything else is returned as it was."""
    from nasopt.compression.compress import absent_value
    if not (isinstance(recorded, dict) and isinstance(current, dict)
            and isinstance(recorded.get("genes"), dict) and isinstance(current.get("genes"), dict)):
        return recorded
    genes = dict(recorded["genes"])
    for gene, options in current["genes"].items():
        if gene not in genes and list(options) == [absent_value(gene)]:
            genes[gene] = options
    return {**recorded, "genes": genes}


#: how long a worker waits for the setup of a study another worker has just created
SETUP_WAIT_SECONDS = 30.0


def _setup_when_written(study: optuna.Study) -> dict[str, Any] | None:
    """The study's setup attr. Optuna creates a study and sets its attrs in two steps, so a
    worker may see a study another worker created a moment ago without its setup: an empty
    study without one is waited for (a few seconds); one with trials is not nasopt's."""
    deadline = time.monotonic() + SETUP_WAIT_SECONDS
    while True:
        setup = study.user_attrs.get(SETUP_ATTR)
        if setup is not None or time.monotonic() > deadline or study.get_trials(deepcopy=False):
            return setup
        time.sleep(0.2)


def load_study(storage: optuna.storages.BaseStorage, name: str) -> optuna.Study:
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        known = [s.study_name for s in optuna.get_all_study_summaries(storage)]
        raise NasoptError(f"no study named {name!r}; known studies: "
                          f"{', '.join(known) or '(none)'}") from None
    if SETUP_ATTR not in study.user_attrs:
        raise NasoptError(f"study {name!r} was not created by nasopt")
    return study


def setup_of(study: optuna.Study) -> dict[str, Any]:
    return dict(study.user_attrs[SETUP_ATTR])




def quality_metric(study: optuna.Study) -> tuple[str, bool]:
    """The study's quality metric and whether higher is better: its first objective that scores
    the models' outputs (accuracy, balanced_accuracy, f1, mae, rmse, or the user's metric its
    setup records); when no objective does, accuracy (mae for regression). The best trial and the
    knee follow it."""
    setup = setup_of(study)
    user = setup.get("metric")
    for name in setup.get("objectives", []):
        if name in HIGHER_IS_BETTER:
            return name, HIGHER_IS_BETTER[name]
        if user is not None and name == user["name"]:
            return name, bool(user["higher_is_better"])
    if setup.get("data", {}).get("task") == "regression":
        return "mae", False
    return "accuracy", True


def completed(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return completed_trials(study)


def constraint_excess(trial: optuna.trial.FrozenTrial) -> float:
    """Summed excess over the trial's constraints (``trial.set_constraint`` values > 0)."""
    return sum(max(0.0, float(v)) for v in (trial.constraints or {}).values())


def is_feasible(trial: optuna.trial.FrozenTrial) -> bool:
    """All recorded constraint values are <= 0 (no constraints: feasible)."""
    return constraint_excess(trial) == 0.0


def pareto_numbers(study: optuna.Study) -> set[int]:
    """Numbers of the feasible trials on the Pareto front (the best one for one objective)."""
    feasible = [t for t in completed(study) if is_feasible(t)]
    if not feasible:
        return set()
    if len(study.directions) == 1:
        sign = 1 if study.direction == optuna.study.StudyDirection.MAXIMIZE else -1
        return {max(feasible, key=lambda t: sign * t.value).number}
    first: dict[tuple, int] = {}  # a strategy may propose an arch twice: list it once
    for t in sorted((t for t in study.best_trials if is_feasible(t)), key=lambda t: t.number):
        first.setdefault(tuple(sorted(t.params.items())), t.number)
    return set(first.values())


def closest_trial(study: optuna.Study) -> optuna.trial.FrozenTrial:
    """The completed trial with the smallest summed constraint excess (value - limit > 0)."""
    return min(completed(study), key=constraint_excess)


def trials_frame(study: optuna.Study, pareto_only: bool = False) -> pd.DataFrame:
    """One row per trial: number, state, Pareto mark, strategy, metrics, and the arch genes.

    The objective values are functions of the metrics, so the metrics columns carry them.
    ``feasible`` is None for a trial that did not complete (FAIL, RUNNING: nothing measured)."""
    front = pareto_numbers(study)
    rows = []
    for t in study.get_trials(deepcopy=False):
        done = t.state == optuna.trial.TrialState.COMPLETE
        row: dict[str, Any] = {"trial": t.number, "state": t.state.name,
                               "pareto": t.number in front,
                               "feasible": is_feasible(t) if done else None,
                               "strategy": t.user_attrs.get("strategy"),
                               "error": t.user_attrs.get("error")}
        metrics = t.user_attrs.get("metrics", {})
        for key in ("accuracy", "compressed_bytes", "params", "nonzero_params", "macs",
                    "float_bytes"):
            row[key] = metrics.get(key)
        row.update(t.params)
        rows.append(row)
    frame = pd.DataFrame(rows)
    if "error" in frame and frame["error"].isna().all():
        frame = frame.drop(columns="error")
    if pareto_only and len(frame):
        frame = frame[frame["pareto"]].sort_values("accuracy", ascending=False)
    return frame.reset_index(drop=True)


def list_studies(storage: optuna.storages.BaseStorage) -> pd.DataFrame:
    rows = []
    for s in optuna.get_all_study_summaries(storage, include_best_trial=False):
        setup = s.user_attrs.get(SETUP_ATTR, {})
        study = optuna.load_study(study_name=s.study_name, storage=storage)
        states = [t.state.name for t in study.get_trials(deepcopy=False)]
        rows.append({"study": s.study_name, "space": setup.get("space", {}).get("name"),
                     # tabular studies have no dataset: the table they were scored from
                     "dataset": setup.get("data", {}).get("dataset") or (
                         f"table {Path(setup['table']).name}" if setup.get("table") else None),
                     "objectives": ",".join(setup.get("objectives", [])),
                     "complete": states.count("COMPLETE"), "failed": states.count("FAIL"),
                     "running": states.count("RUNNING"),
                     "created": s.datetime_start.strftime("%Y-%m-%d %H:%M") if s.datetime_start else ""})
    return pd.DataFrame(rows, columns=["study", "space", "dataset", "objectives", "complete",
                                       "failed", "running", "created"])
