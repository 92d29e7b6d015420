"""``nasopt bench reliability``, part 1: the kill matrix. ``nasopt search`` on a tiny
conv1d/MNIST-1D sub-space, SIGKILLed at named points (supernet training, each step of a trial,
between trials, config write, final print, export) and at random times, then the same command
re-run in the same folder; per row: completed trials kept, the killed RUNNING trial failed and
retried with its params, the epoch the supernet resumed at, its final weights against an
uninterrupted run, exact totals. The kill points themselves: :mod:`nasopt_bench.crash`.
"""
from __future__ import annotations

import hashlib
import json
import random
import re
import shlex
import shutil
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from nasopt.core import checkpoint
from nasopt.supernet import distributed
from nasopt.search import workers
from nasopt.core.errors import NasoptError
from nasopt_bench import crash
from nasopt_bench.crash import POINTS, TINY
from nasopt_bench.report import cell, table

EPOCHS = 6
KILL_TRIALS = 12
STUDY = "k"
TRAINING_POINTS = ("mid-epoch:2", "epoch-end:1", "epoch-end:4", "checkpoint-write:3",
                   "final-write")
SEARCH_POINTS = ("config-write", "before-worker-record:4", "trial-start:4", "mid-evaluation:4",
                 "before-tell:4", "between-trials:4", "final-print")
#: a trial killed before it records its worker is failed by age only (nasopt.search.workers)
SLOW_POINTS = ("before-worker-record",)


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
    """`nasopt export` of trial B over an export of trial A, killed while moving its 3rd new
    file into the folder; which trial each file belongs to, what ``nasopt.load`` does with the folder, the re-run.
    """
    from nasopt import api
    shutil.copytree(reference["folder"] / "runs", folder / "runs")
    trials = crash.complete(crash.trials_of(_url(folder), STUDY))
    a, b = trials[0], next(t for t in trials[1:] if t.params != trials[0].params)
    digests: dict[str, dict[str, str]] = {}
    codes = []
    for trial, out in ((b, "only-b"), (a, "export")):  # B alone: the files B's export writes
        base = [STUDY, "--run-dir", "runs", "--out", out, "--trial", str(trial.number), "--force"]
        codes.append(crash.wait(crash.start(folder, *base, command="export"))[0])
        digests[f"#{trial.number}"] = _digests(folder / out)
    # over A's export, so --force (without it the command refuses a folder holding files)
    base = [STUDY, "--run-dir", "runs", "--out", "export", "--trial", str(b.number), "--force"]
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
    hidden = sorted(p.name for p in export.iterdir() if p.name.startswith(".nasopt-"))
    if hidden:
        problems.append(f"working folders left after the re-run: {hidden}")
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
                   "; ".join(cell(p) for p in r["problems"] if p != "traceback") or "ok"]
                  for r in rows]
    notes = [f"`{name}`: {POINTS[name][0]}" for name in dict.fromkeys(
        p.split(":")[0] for p in (*TRAINING_POINTS, *SEARCH_POINTS, "export-write:3"))]
    passed = sum(not r["problems"] for r in rows)
    unkilled = sum(r["at"].startswith("not killed") for r in rows)
    temp = sorted({t for r in rows for t in r["temp_left"]})
    cfg_rows = [r for r in rows if r["point"].startswith("config-write")]
    erows = [[r["rep"], f"#{r['a']} then #{r['b']}",
              ", ".join(f"{k} {v}" for k, v in r["holds"].items()), cell(r["load"]),
              f"exit {r['rerun']}: " + ", ".join(f"{k} {v}" for k, v in r["after"].items()),
              "; ".join(cell(p) for p in r["problems"]) or "ok"] for r in exports]
    ref = reference
    return f"""## 1. Kill matrix: SIGKILL, then the same command again

Command (killed, then re-run as is, in a fresh folder per row; storage `sqlite:///runs/studies.db`):
`nasopt search {' '.join(shlex.quote(a) for a in kill_command())}`

Uninterrupted reference run of it: {ref['wall']:.1f} s, {ref['ledger']['complete']} complete
trials, supernet weights sha256 `{ref['hash'][:16]}…`. Rows marked with a point name were started
through `python -m nasopt_bench.crash --kill-at POINT`, which patches one engine function so the
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

`nasopt export {STUDY} --trial A --out export`, then the same for trial B killed while its verified
files move into the folder, at the 3rd (`export-write:3`: A's files are already set aside, B's
`model.json` comes last), then `nasopt export` of B again, which first puts A's export back and
then makes its own swap. Which trial each file belongs to (by content), and what `nasopt.load`
does with the folder after the kill:

{table(["rep", "exports", "folder after the kill", "nasopt.load after the kill", "re-run", "problems"], erows)}
"""


def _slug(point: str) -> str:
    return point.replace(":", "-")
