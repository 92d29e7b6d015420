"""Real ``nasopt`` processes, killed at chosen points, and what their study looks like afterwards.

Shared by ``nasopt bench reliability`` and ``tests/test_workers.py``:

* :func:`start` runs ``nasopt ARGS`` in a subprocess (output to files, never a pipe that could
  fill and block it); with ``kill_at`` the process is started through this module's ``__main__``,
  which patches one function of the engine so the process sends itself SIGKILL at that exact
  point (:data:`POINTS`), then runs the ordinary CLI. The re-run is always the plain command.
* :func:`kill_when` sends SIGKILL from outside once a condition on the files/study holds.
* :func:`trials_of`, :func:`ledger`, :func:`fronts` read a study the way a user would and count
  what the reliability promises are about (exact totals, no gap, no double count, retries).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna

from nasopt.core.pareto import minimized, nondominated_mask
from nasopt.search import study as nstudy
from nasopt.search import workers

ROOT = Path(__file__).resolve().parents[2]

#: a tiny conv1d/MNIST-1D sub-space: a supernet trains in seconds on one core
TINY = ["--space", "conv1d", "--dataset", "mnist1d", "--set", "supernet.epochs=3",
        "--set", "supernet.warmup_epochs=1", "--set", "supernet.n_random=0",
        "--set", "supernet.batch_size=256", "--set", "eval.calib_samples=64",
        *[f"--restrict=s{i}.{g}" for i in (1, 2, 3)
          for g in ("depth=1,2", "k=3", "width=8,16")]]
#: NAS-Bench-201 in tabular mode: a trial is a table look-up
TABLE = ["--space", "nb201", "--table", "--quiet"]


class KillPointMissed(RuntimeError):
    """The process finished (or the deadline passed) before the kill point was reached."""


# ---------------------------------------------------------------- processes (parent side)

def start(cwd: Path, *args: str, kill_at: str | None = None, command: str = "search",
          logs: Path | None = None) -> subprocess.Popen:
    """``nasopt COMMAND ARGS`` in a subprocess in ``cwd``; ``kill_at``: a point of
    :data:`POINTS` where it SIGKILLs itself. Its stdout/stderr go to files in ``logs``
    (default ``cwd``): read them with :func:`output`."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    tag = uuid.uuid4().hex[:8]
    logs = cwd if logs is None else logs
    out, err = logs / f"out-{tag}.txt", logs / f"err-{tag}.txt"
    head = ["-m", "nasopt.cli"] if kill_at is None else \
        ["-m", "nasopt_bench.crash", "--kill-at", kill_at]
    with open(out, "w") as fo, open(err, "w") as fe:
        proc = subprocess.Popen([sys.executable, *head, command, *args], cwd=cwd, env=env,
                                stdout=fo, stderr=fe)
    proc.paths = (out, err)
    proc.started = time.monotonic()
    return proc


def output(proc: subprocess.Popen) -> tuple[str, str]:
    return proc.paths[0].read_text(), proc.paths[1].read_text()


def wait(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str, str, float]:
    """(exit code, stdout, stderr, seconds since start); a process past ``timeout`` is
    killed and reported with exit code -9."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    out, err = output(proc)
    return proc.returncode, out, err, time.monotonic() - proc.started


def kill_when(proc: subprocess.Popen, ready: Callable[[], bool], timeout: float = 600,
              poll: float = 0.05) -> None:
    """SIGKILL ``proc`` as soon as ``ready()`` holds."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise KillPointMissed(f"finished before the kill: {output(proc)[1][-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise KillPointMissed("the kill point was never reached")
        time.sleep(poll)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def has_traceback(*texts: str) -> bool:
    return any("Traceback (most recent call last)" in t for t in texts)


# ---------------------------------------------------------------- studies (parent side)

_STORAGES: dict[str, optuna.storages.BaseStorage] = {}


def storage_of(url: str) -> optuna.storages.BaseStorage:
    if url not in _STORAGES:
        _STORAGES[url] = nstudy.open_storage(url)
    return _STORAGES[url]


def trials_of(url: str, name: str) -> list[optuna.trial.FrozenTrial]:
    """The study's trials, [] when it does not exist yet (or its file is being written)."""
    try:
        return optuna.load_study(study_name=name,
                                 storage=storage_of(url)).get_trials(deepcopy=True)
    except Exception:  # noqa: BLE001 - KeyError (no study yet), a locked or half-made file
        return []


def complete(trials) -> list[optuna.trial.FrozenTrial]:  # noqa: ANN001
    return [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]


def running(trials) -> list[optuna.trial.FrozenTrial]:  # noqa: ANN001
    return [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]


def ledger(trials) -> dict[str, Any]:  # noqa: ANN001
    """What the exact-total promise is about, counted from a study's trials:

    ``complete``; ``gaps`` (trial numbers missing) and ``duplicates`` (numbers seen twice);
    ``running`` left, ``waiting`` (retries never run; ``waiting_with_params``: holding an
    arch that was never evaluated); ``incomplete`` COMPLETE trials without metrics or params; ``surplus``
    trials (FAIL, user attr ``surplus``) and ``surplus_evaluated`` (those with metrics);
    ``failed`` other FAIL trials; ``died`` those whose worker died (found by its pid: error
    "...died...", or by Optuna's heartbeat: no error recorded), ``unretried`` those without a
    retry, ``double_retries`` trials retried more than once; ``repeated_archs`` complete trials
    whose params equal an earlier complete trial's (a strategy may propose an arch twice)."""
    numbers = [t.number for t in trials]
    done = complete(trials)
    retried = [n for n in map(retried_from, trials) if n is not None]
    surplus = [t for t in trials if t.user_attrs.get(workers.SURPLUS_ATTR)]
    failed = [t for t in trials if t.state == optuna.trial.TrialState.FAIL
              and not t.user_attrs.get(workers.SURPLUS_ATTR)]
    died = [t for t in failed if "died" in str(t.user_attrs.get("error", "died"))]
    seen: set[tuple] = set()
    repeated = 0
    for t in sorted(done, key=lambda t: t.number):
        key = tuple(sorted(t.params.items()))
        repeated += key in seen
        seen.add(key)
    return {"trials": len(trials), "complete": len(done),
            "gaps": (max(numbers) + 1 - len(set(numbers))) if numbers else 0,
            "duplicates": len(numbers) - len(set(numbers)),
            "running": len(running(trials)),
            "waiting": sum(t.state == optuna.trial.TrialState.WAITING for t in trials),
            "waiting_with_params": sum(t.state == optuna.trial.TrialState.WAITING and
                                       bool(t.params) for t in trials),
            "incomplete": sum(not (t.user_attrs.get("metrics") and t.params) for t in done),
            "surplus": len(surplus), "surplus_evaluated": sum("metrics" in t.user_attrs for t in surplus),
            "failed": len(failed), "died": len(died),
            "unretried": sum(t.number not in retried for t in died),
            "double_retries": len(retried) - len(set(retried)),
            "repeated_archs": repeated}


def fronts(url: str, name: str) -> tuple[set[int], set[int]]:
    """(nasopt's Pareto front, the non-dominated set computed here from all complete feasible
    trials, each arch listed at its first trial) as trial numbers."""
    study = optuna.load_study(study_name=name, storage=storage_of(url))
    done = [t for t in complete(study.trials) if nstudy.is_feasible(t)]
    keep = nondominated_mask(minimized([t.values for t in done], study.directions))
    front = [t for t, k in zip(done, keep) if k]
    first: dict[tuple, int] = {}
    for t in sorted(front, key=lambda t: t.number):
        first.setdefault(tuple(sorted(t.params.items())), t.number)
    return nstudy.pareto_numbers(study), set(first.values())


def retried_from(trial: optuna.trial.FrozenTrial) -> int | None:
    """The number of the trial that ``trial`` retries (Optuna's retry history), else None."""
    history = trial.system_attrs.get("retry_history")
    return history[-1] if history else None


def worker_pid(trial: optuna.trial.FrozenTrial) -> int | None:
    return (trial.user_attrs.get(workers.WORKER_ATTR) or {}).get("pid")


# ---------------------------------------------------------------- kill points (child side)

def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _nth(n: int) -> Callable[[], bool]:
    """A counter: True on its n-th call (1-based)."""
    calls = [0]

    def hit() -> bool:
        calls[0] += 1
        return calls[0] == n
    return hit


def _patch(owner: Any, name: str, make: Callable[[Callable], Callable]) -> None:
    setattr(owner, name, make(getattr(owner, name)))


def _mid_epoch(n: int) -> None:
    from nasopt.supernet import train
    hit = _nth(n)

    def make(real):  # noqa: ANN001, ANN202
        def minibatches(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            batches = list(real(*args, **kwargs))
            if not hit():
                yield from batches
                return
            yield from batches[: len(batches) // 2]
            _die()
        return minibatches
    _patch(train, "minibatches", make)


def _after_epoch_checkpoint(n: int) -> None:
    from nasopt.core import checkpoint

    def make(real):  # noqa: ANN001, ANN202
        def save(obj, path):  # noqa: ANN001, ANN202
            real(obj, path)
            if Path(path).name.endswith(".partial.pt") and obj.get("epoch") == n - 1:
                _die()
        return save
    _patch(checkpoint, "save", make)


def _mid_write(n: int, matches: Callable[[Path], bool]) -> None:
    """Killed while the n-th matching file is written: an atomic write (temp file + rename,
    ``os.replace``) has its temp file cut to half and dies before the rename; a plain
    ``Path.write_text`` dies after writing half of its text."""
    hit = _nth(n)

    def make_replace(real):  # noqa: ANN001, ANN202
        def replace(src, dst, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            if matches(Path(dst)) and hit():
                size = os.path.getsize(src)
                os.truncate(src, size // 2)
                _die()
            return real(src, dst, *args, **kwargs)
        return replace

    def make_write_text(real):  # noqa: ANN001, ANN202
        def write_text(self, data, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            if matches(Path(self)) and hit():
                with open(self, "w") as f:
                    f.write(data[: len(data) // 2])
                    f.flush()
                    os.fsync(f.fileno())
                _die()
            return real(self, data, *args, **kwargs)
        return write_text
    _patch(os, "replace", make_replace)
    _patch(Path, "write_text", make_write_text)


def _before_worker_record(n: int) -> None:
    hit = _nth(n)

    def make(real):  # noqa: ANN001, ANN202
        def set_user_attr(self, key, value):  # noqa: ANN001, ANN202
            if key == workers.WORKER_ATTR and hit():
                _die()
            return real(self, key, value)
        return set_user_attr
    _patch(optuna.trial.Trial, "set_user_attr", make)


def _at_call(owner: Any, name: str, n: int, after: bool = False) -> None:
    hit = _nth(n)

    def make(real):  # noqa: ANN001, ANN202
        def call(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            now = hit()
            if now and not after:
                _die()
            result = real(*args, **kwargs)
            if now:
                _die()
            return result
        return call
    _patch(owner, name, make)


def _mid_evaluation(n: int) -> None:
    from nasopt.search import loop as search
    hit = _nth(n)

    def make(real):  # noqa: ANN001, ANN202
        def finish_trial(trial, arch, evaluate, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            if not hit():
                return real(trial, arch, evaluate, *args, **kwargs)

            def dying(arch):  # noqa: ANN001, ANN202
                evaluate(arch)  # the work is done, its metrics never recorded
                _die()
            return real(trial, arch, dying, *args, **kwargs)
        return finish_trial
    _patch(search, "finish_trial", make)


def _final_print(n: int) -> None:
    from nasopt.cli import main as cli
    _at_call(cli, "_print_frame", n)


def _supernet_file(path: Path) -> bool:
    return path.parent.name == "supernets" and not path.name.endswith(".partial.pt")


#: point name -> (what it means, installer taking N); N counts from 1 in this process
POINTS: dict[str, tuple[str, Callable[[int], None]]] = {
    "mid-epoch": ("halfway through supernet epoch N (its minibatches)", _mid_epoch),
    "epoch-end": ("right after supernet epoch N's checkpoint is written", _after_epoch_checkpoint),
    "checkpoint-write": ("while writing supernet epoch N's checkpoint (temp file half written)",
                         lambda n: _mid_write(n, lambda p: p.name.endswith(".partial.pt"))),
    "final-write": ("while writing the trained supernet (temp file half written)",
                    lambda n: _mid_write(n, _supernet_file)),
    "config-write": ("while writing the run config RUN_DIR/configs/STUDY.json",
                     lambda n: _mid_write(n, lambda p: p.parent.name == "configs")),
    "before-worker-record": ("trial N asked (RUNNING), before it records its worker",
                             _before_worker_record),
    "trial-start": ("trial N started (its arch and worker recorded), before it is evaluated",
                    lambda n: _at_call(workers, "claim", n)),
    "mid-evaluation": ("trial N evaluated, its metrics not yet recorded", _mid_evaluation),
    "before-tell": ("trial N measured and recorded, before it is told COMPLETE",
                    lambda n: _at_call(__import__("nasopt.search.loop", fromlist=["x"]),
                                       "finish_trial", n, after=True)),
    "between-trials": ("after trial N is told COMPLETE, before the next ask",
                       lambda n: _at_call(workers, "wait_for_room", n)),
    "final-print": ("while printing the Pareto front (every trial done)", _final_print),
    "export-write": ("`nasopt export` while moving the N-th new file into the export folder "
                     "(the swap of renames)",
                     lambda n: _mid_write(n, lambda p: not p.name.startswith(".")
                                          and p.parent.name == "export")),
}


def parse_point(point: str) -> tuple[str, int]:
    """'NAME' or 'NAME:N' -> (NAME, N); N defaults to 1."""
    name, _, n = point.partition(":")
    if name not in POINTS:
        raise ValueError(f"unknown kill point {name!r}; known: {', '.join(POINTS)}")
    if n and (not n.isdigit() or int(n) < 1):
        raise ValueError(f"kill point {point!r}: N must be a positive integer")
    return name, int(n or 1)


def install(point: str) -> None:
    name, n = parse_point(point)
    POINTS[name][1](n)


if __name__ == "__main__":  # python -m nasopt_bench.crash --kill-at POINT COMMAND ARGS...
    if len(sys.argv) < 3 or sys.argv[1] != "--kill-at":
        sys.exit("usage: python -m nasopt_bench.crash --kill-at POINT[:N] COMMAND [ARGS...]")
    install(sys.argv[2])
    from nasopt.cli import main as cli
    sys.exit(cli.main(sys.argv[3:]))
