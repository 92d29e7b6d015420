"""``nasopt bench reliability``: operating searches, measured with real processes.

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
6. Disk faults: a torn journal record, a full disk during a search and during an export.

Parts 1 and 2 live in :mod:`.reliability_kill` and :mod:`.reliability_workers`.

Every number in the report comes from this run.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from nasopt.core import checkpoint
from nasopt.supernet import distributed
from nasopt.core.errors import NasoptError
from nasopt.search.study import mask_url
from nasopt_bench import crash
from nasopt_bench.crash import TINY
from nasopt_bench.report import cell, machine, table

from nasopt_bench.reliability_faults import faults_section
from nasopt_bench.reliability_kill import kill_section, reference_run
from nasopt_bench.reliability_workers import workers_section

PARTS = ("kill", "workers", "bad-input", "distributed", "atomic", "faults")


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
                   "`source .ci/postgres.sh` starts a temporary server)")
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
        if "faults" in parts:
            sections.append(faults_section(work / "faults", log))
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
        "# Reliability: resume after SIGKILL, several workers, bad input, disk faults",
        f"Command: `{shown}`  \nMachine: {machine()}; this run (and every process it started) "
        f"was allowed {cores} CPU core(s); total {time.monotonic() - t0:.0f} s; load average "
        f"{load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end (the machine is shared: "
        f"wall times include waiting for the CPU).",
        *sections, NOT_COVERED]) + "\n"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return out


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
    totals = {"clear": 0, "tracebacks": 0, "secrets": 0, "lost": 0}
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
        written = any(module.PASSWORD.encode() in (root / k).read_bytes() for k in new)
        leak = module.PASSWORD in out + err or written
        clear = code == 2 and errors == 1 and message in err and not tb
        ok = clear and unchanged and all(k.startswith("runs/") for k in new) and not leak
        passed += ok
        totals["clear"] += clear
        totals["tracebacks"] += tb
        totals["secrets"] += leak
        totals["lost"] += not unchanged
        rows.append([case, code, cell(line[:150] + ("…" if len(line) > 150 else "")),
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

| cases | clear one-line errors | tracebacks | secrets printed or written | finished work lost (a file that existed changed) |
|---|---|---|---|---|
| {len(module.CASES)} | {totals["clear"]} | {totals["tracebacks"]} | {totals["secrets"]} | {totals["lost"]} |

The storage URLs of these cases carry a password (`{module.PASSWORD[:2]}…`); it is looked for in
every line printed and in every file a case created. Section 6 adds the disk faults; the
test suite's tests/test_hostile.py checks everything `nasopt run`, `nasopt finetune` and `studies
report` write and print for a PostgreSQL password.
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
            outcome = "refused: " + cell(str(exc).split(" (")[0].replace(str(cut), "FILE"))
            refused += 1
        rows.append([f"{f:.1%}", int(len(data) * f), outcome])
    return f"""## 5. Atomic writes

Where: `nasopt/core/checkpoint.py`. `save` (supernet checkpoints, per epoch and final) writes
`torch.save` to a temp file in the same folder, fsyncs it, then `os.replace`s the target;
`atomic_write_bytes` (export files, packed files, the run config, REINFORCE controller state,
LUTs, plots, reports) does the same with bytes. Exports are first written and verified in a
hidden working folder inside the export folder, then swapped in by renames: the old files (the
commit record `model.json` first) move to another hidden folder, the new ones move in (`model.json` last), the old ones
are deleted. A folder killed midway has no `model.json` and is refused by `nasopt.load` (the
export rows of section 1), and the next command on it puts the old export back before its own
swap; a full disk fails before the swap (section 6). A reader therefore sees the old file or the new one, never half of one —
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
