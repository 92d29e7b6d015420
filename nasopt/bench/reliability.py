"""``nasopt bench reliability``: operating searches (issue 7), measured with real processes.

1. Kill matrix: ``nasopt search`` on a tiny conv1d/MNIST-1D sub-space, SIGKILLed at named points
   (supernet training, each step of a trial, between trials, config write, final print, export)
   and at random times, then the same command re-run in the same folder; per row: completed
   trials kept, the killed RUNNING trial failed and retried with its params, the epoch the
   supernet resumed at, its final weights against an uninterrupted run, exact totals.
2. Several workers on a journal file, on SQLite, and on PostgreSQL (``--postgres`` or
   NASOPT_TEST_POSTGRES), NAS-Bench-201 in tabular mode; optionally one worker killed mid-trial.
3. Bad input: the CASES of tests/test_bad_input.py through the CLI, one subprocess each.
4. Distributed: a 2-process torchrun supernet training: identical weights on both ranks.
5. Atomic writes: truncated copies of a real checkpoint never load.

Every number in the report comes from this run.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from .. import checkpoint, distributed, workers
from ..errors import NasoptError
from ..study import mask_url
from . import crash
from .crash import POINTS, TABLE, TINY
from .report import machine, table

PARTS = ("kill", "workers", "bad-input", "distributed", "atomic")
EPOCHS = 6
KILL_TRIALS = 12
STUDY = "k"
TRAINING_POINTS = ("mid-epoch:2", "epoch-end:1", "epoch-end:4", "checkpoint-write:3",
                   "final-write")
SEARCH_POINTS = ("config-write", "before-worker-record:4", "trial-start:4", "mid-evaluation:4",
                 "before-tell:4", "between-trials:4", "final-print")
#: a trial killed before it records its worker is failed by age only (nasopt.workers)
SLOW_POINTS = ("before-worker-record",)


def add_arguments(q: argparse.ArgumentParser) -> None:
    """The subcommand's options (cli.py calls this)."""
    q.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of "
                   f"{','.join(PARTS)}")
    q.add_argument("--reps", type=int, default=2, help="repetitions of each kill point "
                   "(default 2)")
    q.add_argument("--random-kills", type=int, default=6, help="kills at random times "
                   "(default 6)")
    q.add_argument("--workers", default="1,2,3,4", help="worker counts (default 1,2,3,4)")
    q.add_argument("--worker-trials", type=int, default=40, help="target completed trials of "
                   "each several-worker search (default 40)")
    q.add_argument("--postgres", default=os.environ.get("NASOPT_TEST_POSTGRES"),
                   help="PostgreSQL URL for the worker part (default: $NASOPT_TEST_POSTGRES; "
                   "`source .ci/postgres.sh` starts a throw-away server)")
    q.add_argument("--seed", type=int, default=0, help="seed of the random kill times")
    q.add_argument("--work-dir", help="keep the run folders here (default: a temp folder, "
                   "removed at the end)")
    q.add_argument("--out", default="results/reliability.md")


def run(args: argparse.Namespace) -> Path:
    parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise NasoptError(f"unknown part(s) {unknown}; choose from {', '.join(PARTS)}")
    if args.reps < 1 or args.random_kills < 0 or args.worker_trials < 1:
        raise NasoptError("--reps and --worker-trials must be >= 1, --random-kills >= 0")
    counts = [int(n) for n in args.workers.split(",") if n]
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    t0 = time.monotonic()
    load0 = os.getloadavg()[0]
    own = args.work_dir is None
    work = Path(tempfile.mkdtemp(prefix="nasopt-reliability-") if own else args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    sections = []
    try:
        reference = None
        if "kill" in parts or "atomic" in parts:
            reference = reference_run(work / "reference", log)
        if "kill" in parts:
            sections.append(kill_section(work, reference, args.reps, args.random_kills,
                                         args.seed, log))
        if "workers" in parts:
            sections.append(workers_section(work, counts, args.worker_trials, args.postgres, log))
        if "bad-input" in parts:
            sections.append(bad_input_section(work / "bad", log))
        if "distributed" in parts:
            sections.append(distributed_section(work / "ddp", log))
        if "atomic" in parts:
            sections.append(atomic_section(work / "atomic", reference, log))
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)
    argv = sys.argv[1:]
    shown = ("nasopt " + " ".join(shlex.quote(mask_url(a)) for a in argv)
             if argv[:2] == ["bench", "reliability"] else "nasopt bench reliability")
    if args.postgres and "--postgres" not in argv and os.environ.get("NASOPT_TEST_POSTGRES"):
        shown = f"NASOPT_TEST_POSTGRES={mask_url(args.postgres)} {shown}"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    text = "\n\n".join([
        "# Reliability: resume after SIGKILL, several workers, bad input (issue 7)",
        f"Command: `{shown}`  \nMachine: {machine()}; this run (and every process it started) "
        f"was allowed {cores} CPU core(s); total {time.monotonic() - t0:.0f} s; load average "
        f"{load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end (the machine is shared: "
        f"wall times include waiting for the CPU).",
        *sections, NOT_COVERED]) + "\n"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return out


# ---------------------------------------------------------------- 1. kill matrix

def kill_command() -> list[str]:
    return [*TINY, "--set", f"supernet.epochs={EPOCHS}", "--trials", str(KILL_TRIALS),
            "--study", STUDY, "--run-dir", "runs", "--heartbeat", "60"]


def _url(folder: Path) -> str:
    return f"sqlite:///{folder}/runs/studies.db"


def _supernets(folder: Path) -> tuple[list[Path], list[Path]]:
    """(trained supernet files, partial checkpoints) in the folder's run dir."""
    d = folder / "runs" / "supernets"
    files = sorted(d.glob("*.pt")) if d.exists() else []
    return ([p for p in files if not p.name.endswith(".partial.pt")],
            [p for p in files if p.name.endswith(".partial.pt")])


def _temp_files(folder: Path) -> list[str]:
    """Temp files of atomic writes left behind (a killed writer cannot remove them)."""
    return sorted(str(p.relative_to(folder)) for p in (folder / "runs").rglob(".*")
                  if p.name.endswith(".tmp") or p.is_dir())


def _weights_hash(path: Path) -> str:
    return distributed.state_hash(checkpoint.load(path)["net"])


def reference_run(folder: Path, log) -> dict[str, Any]:  # noqa: ANN001
    """The kill matrix's command, uninterrupted: wall time, supernet weights, its study."""
    folder.mkdir(parents=True)
    log("reliability: uninterrupted reference run")
    code, out, err, wall = crash.wait(crash.start(folder, *kill_command()))
    if code != 0:
        raise NasoptError(f"the reference search failed ({code}): {err[-1500:]}")
    final = _supernets(folder)[0][0]
    return {"folder": folder, "wall": wall, "supernet": final, "hash": _weights_hash(final),
            "ledger": crash.ledger(crash.trials_of(_url(folder), STUDY)),
            "traceback": crash.has_traceback(out, err)}


def _disk_state(folder: Path) -> str:
    finals, partials = _supernets(folder)
    trials = crash.trials_of(_url(folder), STUDY)
    if trials:
        return (f"search: {len(crash.complete(trials))} complete, "
                f"{len(crash.running(trials))} running")
    if finals:
        return "supernet trained, no trial yet"
    if partials:
        try:
            return f"training: checkpoint of epoch {checkpoint.load(partials[0])['epoch'] + 1}"
        except NasoptError:
            return "training: checkpoint **corrupt**"
    return "startup: nothing written"


def _expected_resume(point: str | None) -> int | None:
    """The epoch (1-based) the re-run should resume at (1: from scratch); None: not known."""
    if point is None:
        return None
    name, n = crash.parse_point(point)
    return {"mid-epoch": n, "epoch-end": n + 1, "checkpoint-write": n,
            "final-write": EPOCHS + 1}.get(name)


def kill_row(folder: Path, point: str | None, reference: dict[str, Any], rep: int,
             delay: float | None = None) -> dict[str, Any]:
    """Kill one run of the matrix's command (at ``point``, or from outside after ``delay``
    seconds), re-run the same command, and check what the promises are about."""
    folder.mkdir(parents=True)
    search_phase = point is not None and point.split(":")[0] in {
        p.split(":")[0] for p in SEARCH_POINTS}
    if search_phase:  # the supernet is the reference's: these points are about the search
        dest = folder / "runs" / "supernets"
        dest.mkdir(parents=True)
        shutil.copy2(reference["supernet"], dest / reference["supernet"].name)
    cmd = kill_command()
    url = _url(folder)
    proc = crash.start(folder, *cmd, kill_at=point)
    if delay is not None:
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
    code, out1, err1, _ = crash.wait(proc)
    at = _disk_state(folder) if code == -signal.SIGKILL else f"not killed (exit {code})"
    cfg_file = folder / "runs" / "configs" / f"{STUDY}.json"
    config_after_kill = _json_ok(cfg_file)
    before = crash.trials_of(url, STUDY)
    kept_before = {t.number: (t.values, t.params) for t in crash.complete(before)}
    killed = crash.running(before)
    temp_after_kill = _temp_files(folder)

    t = time.monotonic()
    code2, out2, err2, _ = crash.wait(crash.start(folder, *cmd))
    rerun_seconds = time.monotonic() - t
    after = crash.trials_of(url, STUDY)
    by_number = {t.number: t for t in after}
    kept = sum(n in by_number and by_number[n].state.name == "COMPLETE"
               and (by_number[n].values, by_number[n].params) == v for n, v in kept_before.items())
    retries = []
    for dead in killed:
        now = by_number.get(dead.number)
        retry = [r for r in after if crash.retried_from(r) == dead.number]
        retries.append({
            "number": dead.number, "state": now.state.name if now else "missing",
            "died": bool(now and "died" in str(now.user_attrs.get("error", ""))),
            "retry": retry[0].number if len(retry) == 1 else None,
            "retry_state": retry[0].state.name if len(retry) == 1 else None,
            "params": _retry_params(dead, retry),
            "retries": len(retry)})
    resumed = re.search(r"resuming supernet training at epoch (\d+)", err2)
    supernet = (f"resumed at epoch {resumed.group(1)}" if resumed else
                "reused" if "reusing trained supernet" in err2 else "trained from scratch")
    finals = _supernets(folder)[0]
    same_weights = bool(finals) and _weights_hash(finals[0]) == reference["hash"]
    ledger = crash.ledger(after)
    front_ok = None
    if after:
        ours, recomputed = crash.fronts(url, STUDY)
        front_ok = ours == recomputed and bool(ours)
    expected = _expected_resume(point)
    problems = []
    if point and code != -signal.SIGKILL:
        problems.append("kill point not reached")
    if code2 != 0:
        problems.append(f"re-run exit {code2}: {err2.strip().splitlines()[-1][:120] if err2.strip() else ''}")
    if kept != len(kept_before):
        problems.append(f"lost {len(kept_before) - kept} completed trial(s)")
    for r in retries:
        # a retry still WAITING is fine only when it holds nothing (no gene was drawn) and the
        # study reached its target without it (the dead trial was found after the last ask)
        unneeded = (r["retry_state"] == "WAITING" and r["params"] == "none drawn"
                    and ledger["complete"] == KILL_TRIALS)
        if not (r["state"] == "FAIL" and r["died"] and r["retries"] == 1
                and (r["retry_state"] == "COMPLETE" or unneeded)
                and r["params"] not in ("DIFFERENT", "no retry")):
            problems.append(f"killed trial #{r['number']}: {r}")
    if expected is not None and supernet != f"resumed at epoch {expected}" and not (
            expected == 1 and supernet == "trained from scratch"):
        problems.append(f"expected resume at epoch {expected}")
    if not same_weights:
        problems.append("supernet weights differ from the uninterrupted run")
    if (ledger["complete"], ledger["gaps"], ledger["duplicates"], ledger["running"],
            ledger["waiting_with_params"], ledger["incomplete"], ledger["unretried"],
            ledger["double_retries"]) != (KILL_TRIALS, 0, 0, 0, 0, 0, 0, 0):
        problems.append(f"ledger {ledger}")
    if front_ok is False:
        problems.append("Pareto front != recomputed")
    if crash.has_traceback(out1, err1, out2, err2):
        problems.append("traceback")
    warned = [line for line in err2.splitlines() if "Warning" in line]
    if warned:
        problems.append(f"warning on stderr: {warned[0][:120]}")
    if _json_ok(cfg_file) != "valid":
        problems.append("run config unreadable after the re-run")
    return {"point": point or f"random {delay:.2f} s", "rep": rep, "at": at,
            "kept": f"{kept}/{len(kept_before)}", "retries": retries, "supernet": supernet,
            "expected": expected, "same_weights": same_weights, "ledger": ledger,
            "front_ok": front_ok, "rerun": (code2, rerun_seconds),
            "config_after_kill": config_after_kill, "temp_after_kill": temp_after_kill,
            "temp_left": _temp_files(folder),
            "new_trials": _run_now(out2), "problems": problems}


def _retry_params(dead, retry) -> str:  # noqa: ANN001
    """How the retry's params relate to the dead trial's: a trial killed while drawing its arch
    has some genes only; the retry keeps those and draws the rest."""
    if not dead.params:
        return "none drawn"
    if len(retry) != 1:
        return "no retry"
    got = retry[0].params
    if got == dead.params:
        return "same"
    if retry[0].state.name == "COMPLETE" and all(got.get(k) == v for k, v in dead.params.items()):
        return f"the {len(dead.params)} drawn genes kept, the rest drawn"
    return "DIFFERENT"


def _run_now(out: str) -> int | None:
    m = re.search(r"\((\d+) run now", out)
    return int(m.group(1)) if m else None


def _json_ok(path: Path) -> str:
    if not path.exists():
        return "absent"
    try:
        json.loads(path.read_text())
        return "valid"
    except ValueError:
        return f"**truncated** ({path.stat().st_size} B)"


def export_row(folder: Path, reference: dict[str, Any], rep: int) -> dict[str, Any]:
    """`nasopt export` of trial B over an export of trial A, killed while replacing its 3rd
    file; which trial each file belongs to, what ``nasopt.load`` does with the folder, the re-run.
    """
    from .. import api
    shutil.copytree(reference["folder"] / "runs", folder / "runs")
    trials = crash.complete(crash.trials_of(_url(folder), STUDY))
    a, b = trials[0], next(t for t in trials[1:] if t.params != trials[0].params)
    digests: dict[str, dict[str, str]] = {}
    codes = []
    for trial, out in ((b, "only-b"), (a, "export")):  # B alone: the files B's export writes
        base = [STUDY, "--run-dir", "runs", "--out", out, "--trial", str(trial.number)]
        codes.append(crash.wait(crash.start(folder, *base, command="export"))[0])
        digests[f"#{trial.number}"] = _digests(folder / out)
    base = [STUDY, "--run-dir", "runs", "--out", "export", "--trial", str(b.number)]
    code, out1, err1, _ = crash.wait(crash.start(folder, *base, command="export",
                                                 kill_at="export-write:3"))
    export = folder / "export"
    holds = _owners(export, digests)
    load = _try_load(api, export)
    code2, out2, err2, _ = crash.wait(crash.start(folder, *base, command="export"))
    after = _owners(export, digests)
    load2 = _try_load(api, export)
    problems = []
    if codes != [0, 0] or code != -signal.SIGKILL:
        problems.append(f"setup: exports exit {codes}, killed export exit {code}")
    if len(set(holds.values()) - {"absent"}) > 1 and load == "loads":
        problems.append("a folder mixing two trials' files loads")
    if code2 != 0 or set(after.values()) != {f"#{b.number}"} or load2 != "loads":
        problems.append(f"re-run: exit {code2}, {after}, {load2}")
    if crash.has_traceback(out1, err1, out2, err2):
        problems.append("traceback")
    return {"rep": rep, "a": a.number, "b": b.number, "holds": holds, "load": load,
            "after": after, "rerun": code2, "problems": problems,
            "temp_left": sorted(p.name for p in folder.iterdir() if p.name.startswith("."))}


EXPORT_NAMES = ("arch.json", "model.json", "weights.pt", "model.packed")


def _digests(folder: Path) -> dict[str, str]:
    return {n: hashlib.sha256((folder / n).read_bytes()).hexdigest()
            for n in EXPORT_NAMES if (folder / n).exists()}


def _owners(folder: Path, digests: dict[str, dict[str, str]]) -> dict[str, str]:
    """Per export file: the trial whose export wrote exactly these bytes."""
    now = _digests(folder)
    return {n: "absent" if n not in now else
            next((t for t, d in digests.items() if d.get(n) == now[n]), "?")
            for n in EXPORT_NAMES}


def _try_load(api, folder: Path) -> str:  # noqa: ANN001
    try:
        api.load(folder)
        return "loads"
    except NasoptError as exc:
        text = str(exc).replace(str(folder), "export")
        return "refused: " + (text.split("); ")[0] + ")" if "); " in text else text[:150])


def kill_section(work: Path, reference: dict[str, Any], reps: int, random_kills: int,
                 seed: int, log) -> str:  # noqa: ANN001
    rows: list[dict[str, Any]] = []
    slow = [p for p in (*TRAINING_POINTS, *SEARCH_POINTS) if p.split(":")[0] in SLOW_POINTS]
    fast = [p for p in (*TRAINING_POINTS, *SEARCH_POINTS) if p not in slow]
    with ThreadPoolExecutor(max_workers=1) as pool:  # slow rows mostly wait: run beside
        background = [pool.submit(kill_row, work / f"{_slug(p)}-{r}", p, reference, r)
                      for p in slow for r in range(1, reps + 1)]
        for point in fast:
            for r in range(1, reps + 1):
                log(f"reliability: kill at {point} (rep {r})")
                rows.append(kill_row(work / f"{_slug(point)}-{r}", point, reference, r))
        rng = random.Random(seed)
        for i in range(random_kills):  # one delay in each of N equal slices of the run
            delay = 0.5 + (0.95 * reference["wall"] - 0.5) * rng.uniform(
                i / random_kills, (i + 1) / random_kills)
            log(f"reliability: kill after {delay:.2f} s (random {i + 1})")
            rows.append(kill_row(work / f"random-{i}", None, reference, i + 1, delay))
        exports = []
        for r in range(1, reps + 1):
            log(f"reliability: kill during export (rep {r})")
            exports.append(export_row(work / f"export-{r}", reference, r))
        rows += [f.result() for f in background]
    order = {p: i for i, p in enumerate((*TRAINING_POINTS, *SEARCH_POINTS))}
    rows.sort(key=lambda r: (order.get(r["point"], len(order)), r["rep"]))

    def retried(row: dict[str, Any]) -> str:
        if not row["retries"]:
            return "none RUNNING"
        return "; ".join(f"#{r['number']} {r['state']}" + (" (died)" if r["died"] else "") +
                         (f" → retry #{r['retry']} {r['retry_state']}" +
                          (" (not needed: target reached)" if r["retry_state"] == "WAITING"
                           else "") + f", params {r['params']}"
                          if r["retry"] is not None else f", {r['retries']} retries")
                         for r in row["retries"])

    def point_text(row: dict[str, Any]) -> str:
        name = row["point"].split(":")[0]
        return f"`{row['point']}`" if name in POINTS else row["point"]

    table_rows = [[point_text(r), r["rep"], r["at"], r["kept"], retried(r), r["supernet"] +
                   (f" (expected {r['expected']})" if r["expected"] else ""),
                   "yes" if r["same_weights"] else "**no**",
                   f"{r['ledger']['complete']}/{KILL_TRIALS}",
                   f"{r['rerun'][0]}, {r['rerun'][1]:.1f} s, {r['new_trials']} new",
                   "yes" if any("traceback" in p for p in r["problems"]) else "no",
                   "; ".join(_cell(p) for p in r["problems"] if p != "traceback") or "ok"]
                  for r in rows]
    notes = [f"`{name}`: {POINTS[name][0]}" for name in dict.fromkeys(
        p.split(":")[0] for p in (*TRAINING_POINTS, *SEARCH_POINTS, "export-write:3"))]
    passed = sum(not r["problems"] for r in rows)
    unkilled = sum(r["at"].startswith("not killed") for r in rows)
    temp = sorted({t for r in rows for t in r["temp_left"]})
    cfg_rows = [r for r in rows if r["point"].startswith("config-write")]
    erows = [[r["rep"], f"#{r['a']} then #{r['b']}",
              ", ".join(f"{k} {v}" for k, v in r["holds"].items()), _cell(r["load"]),
              f"exit {r['rerun']}: " + ", ".join(f"{k} {v}" for k, v in r["after"].items()),
              "; ".join(_cell(p) for p in r["problems"]) or "ok"] for r in exports]
    ref = reference
    return f"""## 1. Kill matrix: SIGKILL, then the same command again

Command (killed, then re-run as is, in a fresh folder per row; storage `sqlite:///runs/studies.db`):
`nasopt search {' '.join(shlex.quote(a) for a in kill_command())}`

Uninterrupted reference run of it: {ref['wall']:.1f} s, {ref['ledger']['complete']} complete
trials, supernet weights sha256 `{ref['hash'][:16]}…`. Rows marked with a point name were started
through `python -m nasopt.bench.crash --kill-at POINT`, which patches one engine function so the
process SIGKILLs itself exactly there (deterministic); "random" rows were SIGKILLed from outside
after a random delay (uniform in 0.5 s … 95 % of the reference wall time, seed {seed}).
Search-phase points start from a copy of the reference's trained supernet. Columns: the state on
disk at the kill; completed trials before the kill still COMPLETE with the same values and
params after the re-run; what became of trials left RUNNING; how the re-run got its supernet;
its final weights equal to the uninterrupted run's; complete trials at the end; the re-run's
exit code, wall time and trials it ran; a traceback in either process's output; everything else
checked (no gap or duplicate trial number, nothing RUNNING, one retry per dead trial, nasopt's
Pareto front == the one recomputed from all trials, the run config readable).

{table(["kill point", "rep", "at the kill", "kept", "trials left RUNNING", "supernet", "weights = uninterrupted", "complete", "re-run", "traceback", "problems"], table_rows)}

**{passed} of {len(rows)} rows passed every check**{f" ({unkilled} random row(s) finished before their kill time: nothing was killed there)" if unkilled else ""}.
Resuming "at epoch {EPOCHS + 1}" (`final-write`) means every epoch was done: the re-run only
writes the trained file.

Points: {'; '.join(notes)}.

Temp files of atomic writes left by a killed writer (checkpoint/export temp files; harmless,
never read): {', '.join(f'`{t}`' for t in temp) or 'none'}. Run config right after a kill in
`config-write`: {', '.join(r['config_after_kill'] for r in cfg_rows) or 'not run'}.
`before-worker-record` kills a trial in the moment between Optuna's `ask` and its worker record:
nothing names its process, so it is failed when it is {workers.ORPHAN_SECONDS} s old, or earlier by the
heartbeat (after 3 x `--heartbeat`: 180 s with this command's 60, 30 s with the default 10); the
re-run waits for it only once the other slots are filled, which sets its wall time in those rows.

### Kill during `nasopt export`

`nasopt export {STUDY} --trial A --out export`, then the same for trial B killed while replacing
the 3rd file of the folder (`export-write:3`), then `nasopt export` of B again. Which trial each
file belongs to (by content), and what `nasopt.load` does with the folder after the kill:

{table(["rep", "exports", "folder after the kill", "nasopt.load after the kill", "re-run", "problems"], erows)}
"""


def _slug(point: str) -> str:
    return point.replace(":", "-")


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


# ---------------------------------------------------------------- 2. several workers

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
                     "ok" if ok else "**" + _cell(mask_url(problem)) + "**"])
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


# ---------------------------------------------------------------- 3. bad input

def _bad_input_module():  # noqa: ANN202
    path = crash.ROOT / "tests" / "test_bad_input.py"
    if not path.exists():
        return None
    spec = importlib.util.spec_from_file_location("nasopt_bench_bad_input", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(crash.ROOT))  # it imports search_spaces
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(crash.ROOT))
    return module


def bad_input_section(root: Path, log) -> str:  # noqa: ANN001
    module = _bad_input_module()
    if module is None:
        return "## 3. Bad input\n\nNot run: tests/test_bad_input.py is not in this checkout."
    root.mkdir(parents=True)
    logs = root.with_name(root.name + "-logs")
    logs.mkdir()
    with warnings.catch_warnings():  # its fixture study asks a trial outside optimize
        warnings.simplefilter("ignore")
        module.make_files(root)
    rows, passed = [], 0
    for case, argv, message in module.CASES:
        log(f"reliability: bad input: {case}")
        before = module.snapshot(root)
        extra = ["--run-dir", "runs"] if argv[0] in ("search", "studies", "export") else []
        code, out, err, wall = crash.wait(crash.start(root, *argv[1:], *extra, command=argv[0],
                                                      logs=logs), timeout=300)
        after = module.snapshot(root)
        unchanged = {k: v for k, v in after.items() if k in before} == before
        new = sorted(set(after) - set(before))
        errors = err.count("nasopt: error:")
        line = err.strip().splitlines()[0] if err.strip() else "(no message)"
        tb = crash.has_traceback(out, err)
        leak = module.PASSWORD in out + err
        ok = (code == 2 and errors == 1 and message in err and not tb and unchanged
              and all(k.startswith("runs/") for k in new) and not leak)
        passed += ok
        rows.append([case, code, _cell(line[:150] + ("…" if len(line) > 150 else "")),
                     "yes" if message in err else "**no**", "**yes**" if tb else "no",
                     "yes" if unchanged else "**no**",
                     ", ".join(new) if new else "—", f"{wall:.1f}", "ok" if ok else "**fail**"])
    return f"""## 3. Bad input through the CLI

The {len(module.CASES)} CASES of tests/test_bad_input.py (imported, same input files from its
`make_files`), each run as its own `nasopt` process in one folder; columns: exit code, the first
line of stderr (the one message), the expected text in it, a traceback, every file that existed
before unchanged (bytes and mtime), files created (only an empty study database under runs/ is
allowed), seconds.

{table(["case", "exit", "message", "expected text", "traceback", "files unchanged", "new files", "s", "result"], rows)}

**{passed} of {len(module.CASES)} cases passed** (exit 2, exactly one `nasopt: error:` line
with the expected text, no traceback, no file changed, no password printed).
"""


# ---------------------------------------------------------------- 4. distributed

def distributed_section(folder: Path, log) -> str:  # noqa: ANN001
    folder.mkdir(parents=True)
    log("reliability: torchrun, 2 processes")
    args = [*TINY, "--set", "supernet.epochs=2", "--set", "supernet.n_random=1",
            "--run-dir", "runs", "--device", "cpu", "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(crash.ROOT), "OMP_NUM_THREADS": "1"}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                           "2", "--standalone", "-m", "nasopt.cli", "train-supernet", *args],
                          cwd=folder, env=env, capture_output=True, text=True, timeout=600)
    wall = time.monotonic() - t0
    lines = re.findall(r"rank (\d)/2: supernet (\S+) weights sha256 ([0-9a-f]{64})", proc.stdout)
    hashes = {h for _, _, h in lines}
    identical = len(lines) == 2 and len(hashes) == 1
    file_ok, reuse = "—", "—"
    if lines:
        path = folder / lines[0][1]
        state = checkpoint.load(path)
        file_ok = ("yes" if distributed.state_hash(state["net"]) in hashes
                   and state["world_size"] == 2 else "**no**")
        search = crash.wait(crash.start(folder, *TINY, "--set", "supernet.epochs=2", "--set",
                                        "supernet.n_random=1", "--run-dir", "runs", "--device",
                                        "cpu", "--trials", "2"), timeout=300)
        reuse = "yes" if search[0] == 0 and f"reusing trained supernet {lines[0][1]}" in search[2] \
            else f"**no** (exit {search[0]})"
    rows = [["exit code of torchrun", proc.returncode],
            ["ranks reporting a weight hash", len(lines)],
            ["identical weight hashes on both ranks", "yes" if identical else "**no**"],
            ["rank 0's checkpoint holds those weights (world_size 2)", file_ok],
            ["`nasopt search` with the same settings reuses it", reuse],
            ["wall time of the training", f"{wall:.1f} s"],
            ["traceback", "**yes**" if crash.has_traceback(proc.stdout, proc.stderr) else "no"]]
    return f"""## 4. Data-parallel supernet training (torchrun)

`torchrun --nproc_per_node 2 --standalone -m nasopt.cli train-supernet {' '.join(shlex.quote(a) for a in args)}`
(gloo on CPU, OMP_NUM_THREADS=1).

{table(["check", "result"], rows)}
"""


# ---------------------------------------------------------------- 5. atomic writes

def atomic_section(folder: Path, reference: dict[str, Any], log) -> str:  # noqa: ANN001
    log("reliability: truncated checkpoints")
    folder.mkdir(parents=True)
    data = reference["supernet"].read_bytes()
    fractions = (0.0, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 0.999)
    rows, refused = [], 0
    for f in fractions:
        cut = folder / f"cut-{f}.pt"
        cut.write_bytes(data[: int(len(data) * f)])
        try:
            checkpoint.load(cut)
            outcome = "**loaded**"
        except NasoptError as exc:
            outcome = "refused: " + _cell(str(exc).split(" (")[0].replace(str(cut), "FILE"))
            refused += 1
        rows.append([f"{f:.1%}", int(len(data) * f), outcome])
    return f"""## 5. Atomic writes

Where: `nasopt/checkpoint.py`. `save` (supernet checkpoints, per epoch and final) writes
`torch.save` to a temp file in the same folder, fsyncs it, then `os.replace`s the target;
`atomic_write_bytes` (export files, packed files, the run config, REINFORCE controller state,
LUTs, plots, reports) does the same with bytes. Exports are first written and verified in a
temp folder, then each file is replaced atomically, `model.json` (the commit record) removed
first and written last, so a folder killed between two files has none and is refused by
`nasopt.load` (the export rows of section 1). A reader therefore sees the old file or the new one, never half of one —
the `checkpoint-write` and `final-write` rows of section 1 kill in the middle of that write and
the re-run resumed from the previous checkpoint. And a file that is cut short anyway (copied
half, disk full) is refused with a clear message, never half-loaded: `checkpoint.load` on
prefixes of the reference run's trained supernet ({len(data)} B):

{table(["prefix", "bytes", "checkpoint.load"], rows)}

{refused} of {len(fractions)} truncated copies refused.
"""


NOT_COVERED = """## What this does not cover

- Machines on a real network: every worker ran on this one machine; "another host" was
  simulated by re-labelling a dead worker's trial, so only the heartbeat path could find it.
  Network partitions, clock skew between hosts and a slow database link were not tried.
- Power loss or a kernel crash (of a worker or of the database server): SIGKILL keeps what the
  kernel already holds in its page cache. Checkpoints and exports are fsynced before their
  rename, but the folder is not fsynced after it, so a rename just before a power cut may be
  lost (the previous file stays).
- The database server itself killed or restarted mid-run (the CLI turns a lost connection into
  one error message; re-running continues, but this run did not kill PostgreSQL).
- A journal file shared over NFS by several machines: the journal has no heartbeat, so a
  worker that dies on another machine leaves its trial RUNNING (no pid check can reach it).
- Kills inside Optuna's own storage writes (between the SQL statements of one call) other than
  where the random kills happened to land.
- GPU (nccl) data-parallel training: the torchrun row ran gloo on CPU.
"""
