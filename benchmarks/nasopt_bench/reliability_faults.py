"""Part 6 of ``nasopt bench reliability``: faults of the disk, with real processes.

- A torn journal record: a search on a ``journal:///`` file, its last record torn as a full disk
  tears it, the same command re-run (the recovery the docs give), then ``studies list``.
- A full disk during a search: a small tmpfs (root only; otherwise the row says it did not run)
  filled while a search writes its study; then freed and the same command re-run.
- A full disk during ``nasopt export --force`` over a finished export on the same tmpfs.

Each row: the exit code, the one message, a traceback, completed trials before and after,
whether the previous export survived whole.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import optuna

from nasopt.search.study import JOURNAL
from nasopt_bench import crash
from nasopt_bench.crash import TABLE, TINY
from nasopt_bench.report import cell, table


def _complete(url: str, study: str) -> int:
    s = optuna.load_study(study_name=study, storage=crash.storage_of(url))
    return sum(t.state == optuna.trial.TrialState.COMPLETE for t in s.trials)


def _first_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.startswith("nasopt:")]
    return (lines[-1] if lines else err.strip().splitlines()[-1] if err.strip() else "—")[:170]


def fill_disk(folder: Path, leave_blocks: int = 2) -> None:
    """Fill the file system of ``folder`` with the file ``folder/fill``, but ``leave_blocks``."""
    st = os.statvfs(folder)
    with open(folder / "fill", "wb") as f:
        try:
            f.write(b"\0" * max(0, st.f_bavail - leave_blocks) * st.f_bsize)
        except OSError:
            pass


def _snapshot(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()[:16]


def mount_tmpfs(folder: Path, size: str) -> bool:
    """Mount a tmpfs of ``size`` on ``folder`` (root only); whether it worked."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True).returncode == 0


def faults_section(work: Path, log) -> str:  # noqa: ANN001
    work.mkdir(parents=True)
    logs = work / "logs"
    logs.mkdir()
    rows = []

    def run(cwd: Path, *args: str, command: str = "search") -> tuple[int, str, str]:
        code, out, err, _ = crash.wait(crash.start(cwd, *args, command=command, logs=logs),
                                       timeout=600)
        return code, out, err

    # -- a torn journal record
    log("reliability: faults: torn journal record")
    folder = work / "journal"
    folder.mkdir()
    url = f"{JOURNAL}{folder / 'studies.log'}"
    args = [*TABLE, "--run-dir", str(folder), "--storage", url, "--study", "j"]
    run(folder, *args, "--trials", "100")
    before = _complete(url, "j")
    with open(folder / "studies.log", "ab") as f:
        f.write(b'{"op_code":5,"x"')
    code, out, err = run(folder, *args, "--trials", "110")
    code2, out2, err2 = run(folder, "list", "--storage", url, command="studies")
    after = _complete(url, "j")
    backup = (folder / "studies.log.torn-1").exists()
    ok = code == 0 and code2 == 0 and before == 100 and after == 110 and backup
    rows.append(["torn last journal record, then the same command", code,
                 cell(_first_line(err)), "yes" if crash.has_traceback(out, err) else "no",
                 f"{before} → {after}", "yes (backup kept)" if backup else "—",
                 "ok" if ok else "**fail**"])

    # -- a full disk during a search, then during an export --force
    disk = work / "disk"
    mounted = mount_tmpfs(disk, "12M")
    if not mounted:
        rows.append(["full disk during a search", "—", "not run: mounting a tmpfs needs root",
                     "—", "—", "—", "not run"])
    else:
        try:
            run_dir = disk / "runs"
            url = f"sqlite:///{run_dir / 'studies.db'}"
            log("reliability: faults: full disk during a search")
            search = [*TABLE, "--run-dir", str(run_dir), "--study", "d"]
            run(disk, *search, "--trials", "20")
            before = _complete(url, "d")
            fill_disk(disk)
            code, out, err = run(disk, *search, "--trials", "5000")
            (disk / "fill").unlink()
            kept = _complete(url, "d")
            code2, _, err2 = run(disk, *search, "--trials", str(kept + 10))
            after = _complete(url, "d")
            ok = (code == 2 and "disk is full" in err and not crash.has_traceback(out, err)
                  and kept >= before and code2 == 0 and after == kept + 10)
            rows.append(["full disk during a search, then freed and re-run", code,
                         cell(_first_line(err)), "yes" if crash.has_traceback(out, err) else "no",
                         f"{before} → {kept} kept → {after}", "—", "ok" if ok else "**fail**"])

            log("reliability: faults: full disk during export --force")
            tiny = [*TINY, "--run-dir", str(run_dir), "--study", "e", "--quiet"]
            run(disk, *tiny, "--trials", "3")
            export = disk / "model"
            run(disk, "e", "--trial", "0", "--out", str(export), "--run-dir", str(run_dir),
                command="export")
            (export / "notes.txt").write_text("the user's")
            old = _snapshot(export)
            fill_disk(disk, leave_blocks=1)
            code, out, err = run(disk, "e", "--trial", "1", "--out", str(export), "--force",
                                 "--run-dir", str(run_dir), command="export")
            (disk / "fill").unlink()
            whole = _snapshot(export) == old
            hidden = [p.name for p in export.iterdir() if p.name.startswith(".nasopt-")]
            ok = (code == 2 and "disk is full" in err and not crash.has_traceback(out, err)
                  and whole and not hidden)
            rows.append(["full disk during `nasopt export --force` over an export", code,
                         cell(_first_line(err)), "yes" if crash.has_traceback(out, err) else "no",
                         "—", "yes, byte for byte" + (f"; left {hidden}" if hidden else "")
                         if whole else "**no**", "ok" if ok else "**fail**"])
        finally:
            subprocess.run(["umount", "-l", str(disk)], capture_output=True)
    passed = sum(r[-1] == "ok" for r in rows)
    return f"""## 6. Disk faults

A torn journal record (the last line cut, as a full disk cuts it) and a full disk (a 12 MB tmpfs
filled by another file while nasopt writes), each followed by the documented recovery: free the
space or simply re-run the same command. Columns: exit code of the faulted command, its message,
a traceback, completed trials (before → after), the previous export.

{table(["fault", "exit", "message", "traceback", "complete trials", "previous export", "result"], rows)}

**{passed} of {len(rows)} faults handled** (one clear line or a clean recovery, no completed
trial lost, the previous export whole).
"""
