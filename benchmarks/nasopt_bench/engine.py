"""``nasopt bench engine``: what nasopt's search loop costs per trial beside Optuna's own loop.

Both loops run the same sampler on the same storage (opened by nasopt's ``open_storage``, so RDB
storages carry the heartbeat nasopt uses), with the same evaluation: the NAS-Bench-201 CIFAR-10
table's accuracy and the counted size of the cell (a dictionary look-up once the counts are
cached, so what is measured is the engine, not the evaluation). Optuna's loop is
``study.optimize`` with an objective that suggests the genes and returns the two objectives;
nasopt's is :func:`nasopt.search.loop.run_search`, which also records the arch, the worker, the
metrics and the strategy on every trial, and checks the exact total across workers.

The two loops alternate in growing segments (to 100, 200, 500, 1,000, ... trials), so that each
checkpoint of both is measured close in time on a machine whose load changes. The cost of the
N-th trial is the median interval between the completion times of trials N-99..N (the median:
a moment when another job takes the cores does not count as the engine's).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import optuna

from nasopt.core.config import DEFAULT_METRIC, DEFAULT_TABLE
from nasopt.core.objectives import get_objectives
from nasopt.search.loop import run_search
from nasopt.search.study import completed, open_storage
from nasopt.search.tabular import TabularEvaluator
from nasopt.strategies import STRATEGIES
from nasopt_bench.report import LoadSampler, machine, table

WINDOW = 100  # trials whose median interval is the cost at a checkpoint
TARGET_RATIO = 1.2  # nasopt's per-trial cost over Optuna's, at most
TARGET_GROWTH = 1.5  # the last checkpoint's cost over the first's, at most
LOOPS = ("optuna", "nasopt")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trials", type=int, default=10_000, help="trials per loop (default 10000)")
    p.add_argument("--storages", default="sqlite,journal,postgresql",
                   help="comma-separated: sqlite, journal, postgresql (default: all three; "
                   "postgresql needs --postgres-url or NASOPT_TEST_POSTGRES)")
    p.add_argument("--postgres-url", default=os.environ.get("NASOPT_TEST_POSTGRES"),
                   help="an empty PostgreSQL database (default: $NASOPT_TEST_POSTGRES)")
    p.add_argument("--samplers", default="random,evolution",
                   help="nasopt strategies whose sampler both loops use (default random,evolution)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--run-dir", default="runs/bench-engine", help="where the SQLite and journal "
                   "files are written (emptied first)")
    p.add_argument("--out", default="results/engine.md", help="report (and its data beside it "
                   "as .json, rewritten after each checkpoint)")
    p.add_argument("--merge", metavar="A.json,B.json", help="only write the report of earlier "
                   "runs (e.g. one per storage, run side by side) from their .json files")


def checkpoints(trials: int) -> list[int]:
    """100, 200, 500, 1000, 2000, 5000, ... up to ``trials`` (always included)."""
    points, base = [], 100
    while base < trials:
        points += [n for n in (base, 2 * base, 5 * base) if n < trials]
        base *= 10
    return sorted(set(points)) + [trials]


def warm(evaluator: TabularEvaluator) -> None:
    """Count params and MACs of every distinct cell once (cached by count key)."""
    import itertools
    genes = evaluator.space.genes
    for values in itertools.product(*genes.values()):
        evaluator.counts(dict(zip(genes, values)))


def per_trial_ms(study: optuna.Study, upto: int) -> float:
    """Median interval (ms) between completion times of trials ``upto - WINDOW`` .. ``upto``."""
    done = sorted(completed(study), key=lambda t: t.number)[:upto]
    stamps = [t.datetime_complete.timestamp() for t in done[-(WINDOW + 1):]]
    return 1000 * float(np.median(np.diff(stamps)))


def storage_url(kind: str, folder: Path, postgres: str | None) -> str | None:
    if kind == "sqlite":
        return f"sqlite:///{folder / 'studies.db'}"
    if kind == "journal":
        return f"journal:///{folder / 'studies.log'}"
    if kind == "postgresql":
        return postgres
    raise ValueError(f"unknown storage {kind!r}; use sqlite, journal or postgresql")


class Run:
    """One loop on one storage with one sampler, continued segment by segment."""

    def __init__(self, loop: str, storage: optuna.storages.BaseStorage, name: str,
                 sampler_name: str, evaluator: TabularEvaluator, seed: int):
        self.loop, self.evaluator = loop, evaluator
        self.objectives = get_objectives(["accuracy", "size"])
        space = evaluator.space
        sampler = STRATEGIES[sampler_name].make_sampler(space, seed)
        self.study = optuna.create_study(study_name=name, storage=storage, sampler=sampler,
                                         directions=[o.direction for o in self.objectives])
        self.study.set_user_attr("nasopt", {"space": {"name": space.name}, "objectives":
                                            ["accuracy", "size"]})
        self.cpu = 0.0
        self.wall = 0.0
        self.done = 0

    def objective(self, trial: optuna.Trial) -> list[float]:
        genes = self.evaluator.space.genes
        arch = {g: trial.suggest_categorical(g, list(opts)) for g, opts in genes.items()}
        metrics = self.evaluator(arch)
        return [float(o.value(metrics)) for o in self.objectives]

    def to(self, n: int) -> None:
        cpu, wall = time.process_time(), time.perf_counter()
        if self.loop == "optuna":
            self.study.optimize(self.objective, n_trials=n - self.done, gc_after_trial=False)
        else:
            run_search(self.study, self.evaluator.space, self.evaluator, self.objectives, n,
                       show_progress=False, trial_attrs={"strategy": "bench"})
        self.cpu += time.process_time() - cpu
        self.wall += time.perf_counter() - wall
        self.done = n


def run(args: argparse.Namespace) -> Path:
    """Run the loops (the report is rewritten after each checkpoint, so a run stopped early
    keeps what it measured), or with ``--merge`` only write the report of earlier runs."""
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.merge:
        parts = [json.loads(Path(f).read_text()) for f in args.merge.split(",")]
        rows = [row for part in parts for row in part["rows"]]
        commands = "`, `".join(p["command"] for p in parts)
        loads = "".join(f"\n- {p['command'].split('--storages ')[1].split()[0]}: {p['load']}"
                        for p in parts)
        out.write_text(_report(f"{commands}` side by side, then `nasopt bench engine --merge "
                               f"{args.merge}", rows, [s for p in parts for s in p["skipped"]],
                               loads, parts[0]["machine"]))
        print(f"wrote {out}")
        return out
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    from nasopt.spaces import SPACES
    cls = SPACES["nb201"]
    space = cls(*cls.table_input)
    evaluator = TabularEvaluator(space, DEFAULT_TABLE, DEFAULT_METRIC)
    print("counting params and MACs of every cell once (cached for both loops)...", flush=True)
    warm(evaluator)
    points = checkpoints(args.trials)
    samplers = [s.strip() for s in args.samplers.split(",") if s.strip()]
    kinds = [s.strip() for s in args.storages.split(",") if s.strip()]
    folder = Path(args.run_dir)
    command = (f"nasopt bench engine --trials {args.trials} --storages {args.storages} "
               f"--samplers {args.samplers}")
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    load = LoadSampler().start()

    def write() -> None:
        record = {"command": command, "machine": machine(), "rows": rows, "skipped": skipped,
                  "load": load.note()}
        out.with_suffix(".json").write_text(json.dumps(record, indent=1))
        out.write_text(_report(command, rows, skipped, load.note(), record["machine"]))

    try:
        for kind in kinds:
            for sampler in samplers:
                sub = folder / f"{kind}-{sampler}"
                if sub.exists():
                    shutil.rmtree(sub)
                sub.mkdir(parents=True)
                url = storage_url(kind, sub, args.postgres_url)
                if url is None:
                    skipped.append(f"{kind}: no server (give --postgres-url or set "
                                   f"NASOPT_TEST_POSTGRES)")
                    break
                storage = open_storage(url)
                tag = f"{kind}-{sampler}-{os.getpid()}-{int(time.time())}"
                runs = {loop: Run(loop, storage, f"engine-{loop}-{tag}", sampler, evaluator,
                                  args.seed) for loop in LOOPS}
                for loop in LOOPS:
                    rows.append({"storage": kind, "sampler": sampler, "loop": loop,
                                 "costs": {}, "cpu": 0.0, "wall": 0.0})
                mine = rows[-len(LOOPS):]
                for n in points:
                    for loop, row in zip(LOOPS, mine):
                        runs[loop].to(n)
                        row["costs"][str(n)] = per_trial_ms(runs[loop].study, n)
                        row["cpu"], row["wall"] = runs[loop].cpu, runs[loop].wall
                    print(f"{kind:10s} {sampler:9s} {n:6d} trials: optuna "
                          f"{mine[0]['costs'][str(n)]:.1f} ms/trial, nasopt "
                          f"{mine[1]['costs'][str(n)]:.1f}", flush=True)
                    write()
                if kind == "postgresql":  # leave the shared database as it was
                    for loop in LOOPS:
                        optuna.delete_study(study_name=runs[loop].study.study_name,
                                            storage=storage)
    finally:
        load.stop()
        write()
    print(f"wrote {out}")
    return out


def _report(command: str, rows: list[dict[str, Any]], skipped: list[str], load: str,
            machine_line: str) -> str:
    by = {(r["storage"], r["sampler"], r["loop"]): r for r in rows}
    body, targets = [], []
    reached: list[int] = []
    for (kind, sampler, loop), r in by.items():
        if loop != "nasopt":
            continue
        o = by[(kind, sampler, "optuna")]
        done = sorted(int(n) for n in r["costs"] if n in o["costs"])
        if not done:
            continue
        marks = [n for n in done if n in (100, 1000, 10_000)]
        if done[-1] not in marks:  # the last checkpoint reached
            marks.append(done[-1])
        reached = sorted(set(reached) | set(marks))
        first, last = marks[0], marks[-1]
        ratio = [r["costs"][str(n)] / o["costs"][str(n)] for n in marks]
        growth = r["costs"][str(last)] / r["costs"][str(first)]
        # the whole run: mean cost per trial, both loops over the same trials
        mean_ratio = r["wall"] / o["wall"]
        cell = lambda n: (f"{o['costs'][str(n)]:.1f} / {r['costs'][str(n)]:.1f}"  # noqa: E731
                          if n in marks else "—")
        body.append([kind, sampler, f"{done[-1]:,}"] + [cell(n) for n in (100, 1000, 10_000)]
                    + [cell(last) if last not in (100, 1000, 10_000) else "—",
                       f"{mean_ratio:.2f}", f"{max(ratio):.2f}",
                       f"{growth:.2f} ({last:,} / {first:,})",
                       f"{o['cpu']:.0f} / {r['cpu']:.0f}", f"{o['wall']:.0f} / {r['wall']:.0f}"])
        targets.append([f"{kind}, {sampler}: nasopt / Optuna, mean cost per trial over the run "
                        f"({done[-1]:,} trials each; worst checkpoint {max(ratio):.2f})",
                        f"<= {TARGET_RATIO}", f"{mean_ratio:.2f}",
                        "met" if mean_ratio <= TARGET_RATIO else "not met"])
        verdict = ("met" if growth <= TARGET_GROWTH else "not met") + (
            "" if last == 10_000 else f" up to trial {last:,}; trial 10,000 not reached")
        targets.append([f"{kind}, {sampler}: trial {last:,} / trial {first:,} (nasopt)",
                        f"<= {TARGET_GROWTH} (trial 10,000 / trial 100)", f"{growth:.2f}",
                        verdict])
    heads = (["storage", "sampler", "trials run"]
             + [f"trial {n:,}: Optuna / nasopt (ms)" for n in (100, 1000, 10_000)]
             + ["last checkpoint: Optuna / nasopt (ms)", "nasopt / Optuna, whole run",
                "nasopt / Optuna, worst checkpoint", "nasopt growth", "CPU s: Optuna / nasopt",
                "wall s: Optuna / nasopt"])
    missing = "".join(f"\n- not run: {s}" for s in skipped)
    points = ", ".join(f"{n:,}" for n in checkpoints(max(reached or [100])))
    return f"""# Engine overhead: nasopt's search loop beside Optuna's own

Command: `{command}` (PostgreSQL: a local server, `.ci/postgres.sh`; a stopped run's report
holds the checkpoints it reached)
Machine: {machine_line}
Load: {load}

What runs: up to 10,000 trials per loop of the same sampler on the same storage (opened by
`nasopt.search.study.open_storage`: SQLite and PostgreSQL with the 10 s heartbeat nasopt uses,
a journal file with its file lock), scoring NAS-Bench-201 CIFAR-10 cells from the shipped table
(accuracy, and the size counted from the cell's network, cached: a look-up, so the engine is
what is measured). **Optuna**: `study.optimize` with an objective that suggests the 6 genes and
returns (accuracy, size). **nasopt**: `nasopt.search.loop.run_search`, as `nasopt search` runs it:
it also records the arch, the worker, the strategy and the metrics on every trial, checks the
exact total across workers and fails the trials of dead workers. The two loops alternate in
segments (to {points} trials), so both are measured close in time.
Cost of trial N: the median interval between the completion times of trials N-{WINDOW - 1}..N
(ask, sampling, evaluation, writes and reads); a window in which other jobs held the cores can
still move it, so the ratio target is judged on the whole run (wall time of all trials of one
loop over the other's: the mean cost per trial), with the worst checkpoint beside it. CPU s:
this process only (a database server's CPU is not counted).

## Results

{table(heads, body)}{missing}

## Targets

{table(["target", "wanted", "measured", "verdict"], targets)}

Notes: the storage writes are where the loops differ: Optuna writes each suggested gene, user
attribute and constraint as its own transaction (or journal append); nasopt's ledger
(`nasopt.search.ledger`) writes a trial three times — its creation, its arch with its worker
record before the evaluation, and its metrics with its state after it. Timings on a shared
machine are upper bounds (see Load); the ratios are measured side by side.
"""
