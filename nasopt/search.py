"""The one search loop: ask (the strategy's sampler) -> evaluate -> tell, on an Optuna study."""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import optuna

from .arch import Arch
from .metrics import Metrics
from .objectives import Constraint, Objective
from .progress import progress_bar
from .space import SearchSpace
from .study import completed

Evaluate = Callable[[Arch], Metrics]


def suggest_arch(trial: optuna.Trial, space: SearchSpace) -> Arch:
    """The trial's params are the arch: one categorical parameter per gene."""
    return space.validate({g: trial.suggest_categorical(g, list(opts))
                           for g, opts in space.genes.items()})


def run_search(study: optuna.Study, space: SearchSpace, evaluate: Evaluate,
               objectives: Sequence[Objective], trials: int, timeout: float | None = None,
               show_progress: bool = True, trial_attrs: Mapping[str, Any] | None = None,
               constraints: Sequence[Constraint] = ()) -> int:
    """Run trials until the study holds ``trials`` completed ones (or ``timeout`` seconds pass).

    A trial whose evaluation raises or yields a non-finite value is recorded as FAIL and the
    search goes on. Each constraint's ``value - limit`` is recorded with ``trial.set_constraint``
    (feasible when <= 0) and, for the dashboard, in the user attr ``constraints``.
    Returns the number of trials run by this call.
    """
    remaining = trials - len(completed(study))
    if remaining <= 0:
        return 0

    def objective(trial: optuna.Trial) -> list[float]:
        for key, value in (trial_attrs or {}).items():
            trial.set_user_attr(key, value)
        arch = suggest_arch(trial, space)
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

    bar = progress_bar(total=remaining, desc=f"search {study.study_name}", unit="trial",
                       enabled=show_progress)
    before = len(study.trials)
    try:
        study.optimize(objective, n_trials=remaining, timeout=timeout, catch=(Exception,),
                       callbacks=[lambda s, t: bar.update(1)], gc_after_trial=False)
    finally:
        bar.close()
    return len(study.trials) - before
