"""The one search loop: ask (the strategy's sampler) -> evaluate -> tell, on an Optuna study."""
from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import optuna

from nasopt.core.arch import Arch
from nasopt.core.metrics import Metrics
from nasopt.core.errors import NasoptError
from nasopt.core.objectives import Constraint, Objective
from nasopt.core.progress import progress_bar
from nasopt.core.space import SearchSpace
from nasopt.search.ledger import Ledger
from nasopt.search.study import completed
from nasopt.search import workers

Evaluate = Callable[[Arch], Metrics]
MAX_CONSECUTIVE_FAILURES = 20


def suggest_arch(trial: optuna.Trial, space: SearchSpace) -> Arch:
    """The trial's params are the arch: one categorical parameter per gene."""
    return space.validate({g: trial.suggest_categorical(g, list(opts))
                           for g, opts in space.genes.items()})


def start_trial(trial: optuna.Trial, space: SearchSpace,
                trial_attrs: Mapping[str, Any] | None = None) -> Arch:
    """Draw the trial's arch (its params, and user attr ``arch``) and record ``trial_attrs``."""
    arch = suggest_arch(trial, space)
    for key, value in (trial_attrs or {}).items():
        trial.set_user_attr(key, value)
    trial.set_user_attr("arch", arch.key)  # the params again, in one line for the dashboard
    return arch


def finish_trial(trial: optuna.Trial, arch: Arch, evaluate: Evaluate,
                 objectives: Sequence[Objective], constraints: Sequence[Constraint] = ()
                 ) -> list[float]:
    """Evaluate ``arch`` and record what every trial of a nasopt study holds: user attr
    ``metrics``, the constraint values. Returns the objective values; raises on a failed
    evaluation or non-finite values."""
    metrics = evaluate(arch)
    trial.set_user_attr("metrics", metrics.to_dict())
    violations = {c.name: c.value(metrics) for c in constraints}
    for name, value in violations.items():
        trial.set_constraint(name, value)
    if violations:
        trial.set_user_attr("constraints", violations)
        trial.set_user_attr("feasible", all(v <= 0 for v in violations.values()))
    values = [float(o.value(metrics)) for o in objectives]
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"non-finite objective values {values} for arch {arch.key}")
    return values


def measure_trial(trial: optuna.Trial, space: SearchSpace, evaluate: Evaluate,
                  objectives: Sequence[Objective], trial_attrs: Mapping[str, Any] | None = None,
                  constraints: Sequence[Constraint] = ()) -> list[float]:
    """:func:`start_trial` then :func:`finish_trial`: a whole trial's record, for loops that
    run outside :func:`run_search` (the NNI bridge)."""
    arch = start_trial(trial, space, trial_attrs)
    return finish_trial(trial, arch, evaluate, objectives, constraints)


class _SurplusLog(logging.Filter):
    """Optuna logs every FAIL with a traceback; a surplus trial is no failure, and a trial
    interrupted by Ctrl-C is the user's stop (the CLI says so in one line): neither is logged."""

    def __init__(self) -> None:
        super().__init__()
        self.numbers: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        found = re.match(r"Trial (\d+) failed with", str(record.msg))
        if not found:
            return True
        if record.exc_info and isinstance(record.exc_info[1], KeyboardInterrupt):
            return False
        if "Surplus(" in str(record.msg):
            self.numbers.add(found.group(1))
        return found.group(1) not in self.numbers


def run_search(study: optuna.Study, space: SearchSpace, evaluate: Evaluate,
               objectives: Sequence[Objective], trials: int, timeout: float | None = None,
               show_progress: bool = True, trial_attrs: Mapping[str, Any] | None = None,
               constraints: Sequence[Constraint] = ()) -> int:
    """Run trials until the study holds ``trials`` completed ones (or ``timeout`` seconds pass).

    Completed trials of every worker count, so several processes sharing one study stop together
    at ``trials``. A trial whose evaluation raises or yields a non-finite value is recorded as
    FAIL and the search goes on; after ``MAX_CONSECUTIVE_FAILURES`` failures in a row it stops
    with an error quoting the last failure. A file-system fault (``OSError``: a full disk) stops
    it at once and is raised again, so the CLI names it. Each constraint's ``value - limit`` is recorded with ``trial.set_constraint``
    (feasible when <= 0) and, for the dashboard, in the user attr ``constraints``.
    Several workers may share the study (see :mod:`nasopt.search.workers`): trials of dead workers are
    failed and retried, and the study ends with exactly ``trials`` completed trials.
    Returns the number of trials this call evaluated (COMPLETE or FAIL; a retry of a dead
    worker's trial counts, trials of other workers and surplus trials do not).
    """
    ledger = Ledger(study._storage)  # the same study, written with the fewest writes per trial
    study = optuna.Study(study_name=study.study_name, storage=ledger, sampler=study.sampler,
                         pruner=study.pruner)
    workers.recover(study)  # trials left RUNNING by a killed worker: FAIL, then retried
    remaining = trials - len(completed(study))
    if remaining <= 0:
        return 0
    getattr(study.sampler, "plan", lambda n: None)(trials)  # samplers that plan over a budget

    def objective(trial: optuna.Trial) -> list[float]:
        # the ledger writes the arch and the worker record in one write, before the evaluation
        # (a killed worker's trial is then retried with its arch), and the rest with the result
        ledger.hold(trial._trial_id, trial.study._study_id)
        arch = start_trial(trial, space, trial_attrs)
        trial.set_user_attr(workers.WORKER_ATTR, {**me, "trial": trial.number})
        ledger.flush(trial._trial_id)
        if not workers.claim(study, trial, trials):  # exact totals with several workers
            trial.set_user_attr(workers.SURPLUS_ATTR, True)
            trial.set_user_attr("error", f"surplus: the study reached {trials} completed trials "
                                "while this one waited; it evaluated nothing")
            raise workers.Surplus()
        try:
            return finish_trial(trial, arch, evaluate, objectives, constraints)
        except OSError as exc:  # a full disk fails every trial alike: stop now, say why
            fault.append(exc)
            study.stop()
            raise
        except Exception as exc:  # recorded on the trial (Optuna keeps no reason), then FAIL
            trial.set_user_attr("error", f"{type(exc).__name__}: {exc}"[:1000])
            raise

    bar = progress_bar(total=remaining, desc=f"search {study.study_name}", unit="trial",
                       enabled=show_progress)
    ran = [0]  # trials this call evaluated (retries of dead workers' trials included)
    failures: list[str] = []
    fault: list[OSError] = []  # a file-system fault: the search stops at the first one
    me = workers.identity()

    def after_trial(s: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if trial.state == optuna.trial.TrialState.COMPLETE:
            bar.update(1)
            failures.clear()
            ran[0] += 1
        elif trial.state == optuna.trial.TrialState.FAIL:
            if trial.user_attrs.get(workers.SURPLUS_ATTR):
                s.stop()
                return
            ran[0] += 1
            failures.append(str(trial.user_attrs.get("error", "unknown reason")))
        if len(failures) >= MAX_CONSECUTIVE_FAILURES or workers.wait_for_room(s, trials) >= trials:
            s.stop()

    quiet = _SurplusLog()
    optuna_log = logging.getLogger("optuna.study._optimize")
    optuna_log.addFilter(quiet)
    try:
        study.optimize(objective, n_trials=None, timeout=timeout, catch=(Exception,),
                       callbacks=[after_trial], gc_after_trial=False)
    except AssertionError:  # Optuna's words for a trial whose end could not be written
        if ledger.write_error is not None:
            raise ledger.write_error
        raise
    finally:
        optuna_log.removeFilter(quiet)
        bar.close()
    if fault:
        raise fault[0]
    if len(failures) >= MAX_CONSECUTIVE_FAILURES:
        raise NasoptError(f"stopped after {len(failures)} failed trials in a row; the last one: "
                          f"{failures[-1][:300]}")
    return ran[0]
