"""``evolution``: regularized (aging) evolution (Real et al., AAAI 2019) as an Optuna sampler.

The population is the last ``population_size`` COMPLETE trials of the study (by trial number), so
the oldest member dies as each new one is born ("aging"), and a resumed study rebuilds the
population from its trials with no other state. Until the study holds a full population, archs are
drawn uniformly at random. Each new arch is a one-gene mutation of the winner of a tournament
among ``sample_size`` members drawn without replacement:

- one objective: the best value wins;
- several objectives: the lowest non-dominated rank *within the tournament* wins, ties broken by
  the largest crowding distance within that rank (NSGA-II's order), then by draw order;
- with budgets (constraints recorded by ``trial.set_constraint``, as ``nasopt search --max-*``
  does), Deb's rule comes first: a feasible contestant beats an infeasible one, and among
  infeasible ones the smallest total excess wins.

Failed and running trials never join the population: a failure does not make a parent.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution
from optuna.study import Study, StudyDirection
from optuna.trial import FrozenTrial

from nasopt.core.pareto import crowding_distances, minimized, nondominated_ranks
from nasopt.core.space import SearchSpace
from nasopt.core.strategy import GeneSampler, Strategy
from nasopt.core.trials import completed_trials
from nasopt.search.study import constraint_excess

POPULATION = 20
SAMPLE = 5


violation = constraint_excess  # total excess over the trial's constraints (0 when feasible)


def tournament_winner(values: Sequence[Sequence[float]], directions: Sequence[StudyDirection],
                      violations: Sequence[float] | None = None) -> int:
    """Index of the winner among the contestants' objective ``values`` (see the module doc)."""
    index = list(range(len(values)))
    if violations is not None and any(v > 0 for v in violations):
        feasible = [i for i in index if violations[i] <= 0]
        if not feasible:
            return min(index, key=lambda i: violations[i])
        index = feasible
    points = minimized([values[i] for i in index], directions)
    if len(directions) == 1:
        return index[int(np.argmin(points[:, 0]))]  # the first best on ties
    best = np.flatnonzero(nondominated_ranks(points) == 0)
    crowding = crowding_distances(points[best])
    return index[int(best[np.argmax(crowding)])]  # the first of the largest


class RegularizedEvolutionSampler(GeneSampler):
    """Aging evolution over categorical parameters; everything else is sampled at random."""

    def __init__(self, population_size: int = POPULATION, sample_size: int = SAMPLE,
                 seed: int | None = None):
        if not 2 <= sample_size <= population_size:
            raise ValueError(f"need 2 <= sample_size ({sample_size}) <= population_size "
                             f"({population_size})")
        self.population_size = population_size
        self.sample_size = sample_size
        super().__init__(seed)

    def population(self, study: Study) -> list[FrozenTrial]:
        """The current population: the last ``population_size`` complete trials."""
        done = completed_trials(study)
        return sorted(done, key=lambda t: t.number)[-self.population_size:]

    def sample_relative(self, study: Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        if not search_space:
            return {}
        population = self.population(study)
        if len(population) < self.population_size:
            return {}  # the initial population is random (sample_independent)
        picks = self._rng.choice(len(population), self.sample_size, replace=False)
        contestants = [population[i] for i in picks]
        parent = contestants[tournament_winner([t.values for t in contestants],
                                               study.directions,
                                               [violation(t) for t in contestants])]
        return self.mutate(parent.params, search_space)

    def mutate(self, params: dict[str, Any],
               search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        """``params`` with one gene (among those with a choice) set to another of its options."""
        child = {}
        for name, dist in search_space.items():
            value = params.get(name)
            choices = dist.choices  # type: ignore[attr-defined]
            # a parent from an older or wider space may hold an option this space lacks
            child[name] = value if value in choices else choices[self._rng.randint(len(choices))]
        mutable = [n for n, d in search_space.items() if len(d.choices) > 1]  # type: ignore[attr-defined]
        if mutable:
            name = mutable[self._rng.randint(len(mutable))]
            others = [c for c in search_space[name].choices if c != child[name]]  # type: ignore[attr-defined]
            child[name] = others[self._rng.randint(len(others))]
        return child



def _make(space: SearchSpace, seed: int) -> optuna.samplers.BaseSampler:
    return RegularizedEvolutionSampler(POPULATION, SAMPLE, seed=seed)


STRATEGY = Strategy("evolution", f"regularized (aging) evolution, population {POPULATION}, "
                    f"tournament {SAMPLE}, one-gene mutation", _make)
