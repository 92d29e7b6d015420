"""``nasopt bench reliability``, part 2: several ``nasopt search`` workers on one study, on a
journal file, on SQLite and on PostgreSQL (``--postgres`` or NASOPT_TEST_POSTGRES),
NAS-Bench-201 in tabular mode; optionally one worker killed mid-trial.
"""
from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from nasopt.search.study import mask_url
from nasopt_bench import crash
from nasopt_bench.crash import TABLE
from nasopt_bench.report import cell, table

def run_workers(folder: Path, url: str, total: int, n: int, kill: str | None = None,
                heartbeat: int = 1) -> dict[str, Any]:
    """``n`` `nasopt search` processes on one study (NAS-Bench-201 table); ``kill``: 'pid'
    (one worker SIGKILLed mid-trial, found by its dead pid) or 'heartbeat' (the same, its trial
    re-labelled as from another host, so only Optuna's heartbeat can find it)."""
    folder.mkdir(parents=True, exist_ok=True)
    name = f"w-{uuid.uuid4().hex[:8]}"
    cmd = [*TABLE, "--trials", str(total), "--study", name, "--storage", url,
           "--run-dir", "runs", "--heartbeat", str(heartbeat)]
    t0 = time.monotonic()
    procs = [crash.start(folder, *cmd, "--seed", str(i)) for i in range(n)]
    victim_trial = None
    if kill:
        victim = procs[0]

        def victim_running() -> list:
            return [t for t in crash.running(crash.trials_of(url, name))
                    if crash.worker_pid(t) == victim.pid]

        try:
            crash.kill_when(victim, lambda: bool(victim_running()), poll=0.02)
        except crash.KillPointMissed:
            pass  # it finished first: reported as "no trial RUNNING at the kill"
        stuck = victim_running()
        victim_trial = stuck[0].number if stuck else None
        if kill == "heartbeat":
            storage = crash.storage_of(url)
            for t in stuck:
                storage.set_trial_user_attr(t._trial_id, "worker",
                                            {**t.user_attrs["worker"], "host": "elsewhere"})
        procs = procs[1:]
    results = [crash.wait(p, timeout=300) for p in procs]
    wall = time.monotonic() - t0
    trials = crash.trials_of(url, name)
    ledger = crash.ledger(trials)
    ours, recomputed = crash.fronts(url, name) if trials else (set(), set())
    password = urlparse(url.replace("postgresql+psycopg", "postgresql")).password
    leaked = bool(password) and (
        any(password in out + err for _, out, err, _ in results) or
        any(password.encode() in f.read_bytes() for f in (folder / "runs").rglob("*")
            if f.is_file()))
    retry_of_victim = None
    if victim_trial is not None:
        by = {t.number: t for t in trials}
        retry = [t for t in trials if crash.retried_from(t) == victim_trial]
        dead = by[victim_trial]
        route = ("by pid" if "died" in str(dead.user_attrs.get("error", "")) else
                 "by heartbeat" if dead.state.name == "FAIL" else "not failed")
        retry_of_victim = (f"#{victim_trial} {dead.state.name} ({route}) → " +
                           (f"retry #{retry[0].number} {retry[0].state.name}" if retry else
                            "no retry"))
    elif kill:
        retry_of_victim = "no trial RUNNING at the kill"
    errors = [err.strip().splitlines()[-1][:160] for code, _, err, _ in results
              if code != 0 and err.strip()]
    errors += [line[:160] for _, _, err, _ in results for line in err.splitlines()
               if "Warning" in line][:1]
    # Optuna's journal lock is a lock file: one left by a killed holder makes the others wait
    # for its grace period, then they remove it ("Forcibly releasing")
    lock_waits = sum("to acquire the lock file" in err for _, _, err, _ in results)
    forced = any("Forcibly releasing" in err for _, _, err, _ in results)
    locked = any("database is locked" in err for _, _, err, _ in results)
    return {"n": n, "kill": kill, "wall": wall, "codes": [r[0] for r in results],
            "ledger": ledger, "front_ok": ours == recomputed and bool(ours),
            "front_size": len(ours), "seeds": len({t.user_attrs.get("seed")
                                                   for t in crash.complete(trials)}),
            "leaked": leaked, "victim": retry_of_victim, "errors": errors,
            "locked": locked, "lock": f"{lock_waits} waited" + (", lock forced" if forced else "") if lock_waits
            else "—",
            "traceback": any(crash.has_traceback(o, e) for _, o, e, _ in results)}


def workers_section(work: Path, counts: list[int], total: int, postgres: str | None,
                    log) -> str:  # noqa: ANN001
    runs: list[tuple[str, dict[str, Any]]] = []
    rows_of = [("journal", n, None) for n in counts] + [("journal", max(3, *counts), "pid")]
    if postgres:
        rows_of += [("postgresql", n, None) for n in counts]
        rows_of += [("postgresql", max(3, *counts), "heartbeat")]
    rows_of.append(("sqlite", max(counts), None))
    rows_of.append(("sqlite, --heartbeat 10", max(counts), None))
    fresh = []
    for label, n, kill in rows_of:
        log(f"reliability: {n} worker(s) on {label}" + (f", one killed ({kill})" if kill else ""))
        folder = work / f"w-{label.split(',')[0]}-{n}{'-kill' if kill else ''}" \
            f"{'-hb10' if 'heartbeat' in label else ''}"
        if label == "postgresql":
            url, made = _fresh_database(postgres)
            fresh.append(made)
        else:
            url = (f"journal:///{folder}/runs/studies.log" if label == "journal" else
                   f"sqlite:///{folder}/runs/studies.db")
        runs.append((label, run_workers(folder, url, total, n, kill=kill,
                                        heartbeat=10 if "heartbeat 10" in label else 1)))
        if label == "postgresql" and made:
            _drop_database(postgres, url)

    rows = []
    for label, r in runs:
        lg = r["ledger"]
        ok = (all(c == 0 for c in r["codes"]) and not r["errors"] and lg["complete"] == total
              and not lg["gaps"] and not lg["duplicates"] and not lg["running"]
              and not lg["waiting_with_params"]
              and not lg["incomplete"] and not lg["unretried"] and not lg["double_retries"]
              and not lg["surplus_evaluated"] and r["front_ok"] and not r["leaked"]
              and not r["traceback"])
        failed = sum(c != 0 for c in r["codes"])
        problem = (f"{failed} of {len(r['codes'])} workers exit {sorted(set(r['codes']) - {0})}"
                   f": {r['errors'][0]}" if failed else r["errors"][0] if r["errors"] else
                   f"{lg}")
        rows.append([label, r["n"], {"pid": "1 (SIGKILL, found by pid)",
                                     "heartbeat": "1 (SIGKILL, found by heartbeat)"}.get(
                                         r["kill"], "—"),
                     f"{r['wall']:.1f}", f"{lg['complete']}/{total}", lg["trials"],
                     lg["duplicates"],
                     lg["gaps"] + lg["running"] + lg["unretried"] + lg["waiting_with_params"],
                     f"{lg['surplus']} ({lg['surplus_evaluated']} evaluated)",
                     lg["died"], r["victim"] or "—", lg["repeated_archs"], r["seeds"],
                     f"{'yes' if r['front_ok'] else '**no**'} ({r['front_size']})",
                     r["lock"], "**yes**" if r["traceback"] else "no",
                     "ok" if ok else "**" + cell(mask_url(problem)) + "**"])
    where = ("each row on a fresh database created for it (so its workers also race to create "
             "the tables)" if fresh and all(fresh) else "one shared database (a fresh one could "
             "not be created)")
    pg = (f"PostgreSQL: `{mask_url(postgres)}`, {where}; the password was checked absent from "
          f"every output and file of the runs: "
          f"{'**leaked**' if any(r['leaked'] for _, r in runs) else 'absent'}."
          if postgres else "**PostgreSQL was not run**: no `--postgres` URL and no "
          "NASOPT_TEST_POSTGRES (`source .ci/postgres.sh` starts a throw-away server).")
    locked = [f"{label} ({r['n']} workers)" for label, r in runs if r["locked"]]
    sqlite_note = (f" In {', '.join(locked)} a worker hit SQLite's \"database is locked\" (its "
                   "busy timeout is 5 s); when that happens in Optuna's heartbeat thread, the "
                   "thread ends, the live worker's trial looks stale after the grace period, "
                   "another worker fails and retries it, and the worker's own `tell` then fails "
                   "(\"Cannot tell a FAIL trial\", a traceback) — totals stay exact, the worker "
                   "is lost." if locked else "")
    return f"""## 2. Several workers on one study

N processes `nasopt search {' '.join(TABLE)} --trials {total} --study NAME --storage URL
--heartbeat 1 --seed I` (I = 0..N-1) started together on one study; wall time from the first
start to the last exit. In the kill rows one worker is SIGKILLed while it has a trial RUNNING;
for "heartbeat" its trial is then re-labelled as run on another host, so the pid check cannot
see it and only Optuna's heartbeat (grace 3 s) fails it. Columns: complete trials / target;
all trials in the study; duplicate trial numbers; lost (a gap in the numbering, a trial left
RUNNING, or a dead worker's trial never retried); surplus trials (asked while the others filled
the last slots: closed as FAIL without evaluating anything); trials failed because their worker
died; the killed worker's trial; complete trials repeating an earlier arch (the strategies may
propose an arch twice: counted, not an error); distinct worker seeds among complete trials;
nasopt's Pareto front equal to the one recomputed from all trials (its size).

{table(["storage", "workers", "killed", "wall s", "complete", "trials", "duplicates", "lost", "surplus", "died", "killed worker's trial", "repeated archs", "seeds", "front = recomputed", "journal lock", "traceback", "result"], rows)}

{pg} Journal and SQLite rows use a new file on the local disk for each row. SQLite serves one
machine and few writers: Optuna's maintainers point parallel optimization to another RDB
(optuna/optuna#4002: without `SELECT ... FOR UPDATE` two workers may pop the same WAITING
trial, which is what a retry is), and SQLite's locking is unreliable on network file systems. "journal lock": workers that printed Optuna's
"taking longer than 10.0 seconds to acquire the lock file" (a worker SIGKILLed while holding
the journal's lock file leaves it behind; the others remove it after Optuna's 30 s grace).{sqlite_note}
"""


def _fresh_database(url: str) -> tuple[str, bool]:
    """(URL of a new empty database on the server of ``url``, True), or (``url``, False) when
    one cannot be created (no CREATE DATABASE privilege)."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url
    base = make_url(url)
    name = f"nasopt_rel_{uuid.uuid4().hex[:8]}"
    try:
        engine = create_engine(base, isolation_level="AUTOCOMMIT")
        with engine.connect() as c:
            c.execute(text(f'CREATE DATABASE "{name}"'))
        engine.dispose()
    except Exception:  # noqa: BLE001 - reported as "one shared database"
        return url, False
    return base.set(database=name).render_as_string(hide_password=False), True


def _drop_database(base_url: str, url: str) -> None:
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url
    storage = crash._STORAGES.pop(url, None)
    if storage is not None and hasattr(storage, "engine"):
        storage.engine.dispose()
    try:
        engine = create_engine(make_url(base_url), isolation_level="AUTOCOMMIT")
        with engine.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{make_url(url).database}" WITH (FORCE)'))
        engine.dispose()
    except Exception:  # noqa: BLE001 - a left-over test database is harmless
        pass
