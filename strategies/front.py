"""The parents the multi-objective local searches (``staged``, ``predictor``) draw from: the
Pareto front of a study's completed trials, merged incrementally so that an ask costs the size
of the front, not of the study."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from optuna.trial import FrozenTrial

from nasopt.core.pareto import minimized, nondominated_mask
from nasopt.search.study import constraint_excess


class IncrementalFront:
    """The non-dominated feasible trials or, while none is feasible, the least infeasible ones
    (those with the smallest total constraint excess), ordered by trial number. Trials are
    merged in any order and once each (:meth:`merge` skips those merged before); the result is
    that of the whole set, as Pareto dominance is transitive."""

    def __init__(self, directions):  # noqa: ANN001
        self.directions = directions
        self.merged: set[int] = set()
        self.front: list[FrozenTrial] = []
        self.least: list[FrozenTrial] = []
        self.least_excess = np.inf

    def merge(self, trials: Sequence[FrozenTrial]) -> None:
        new = [t for t in trials if t.number not in self.merged]
        if not new:
            return
        self.merged.update(t.number for t in new)
        excess = [constraint_excess(t) for t in new]
        feasible = [t for t, e in zip(new, excess) if e <= 0]
        if feasible:
            pool = self.front + feasible
            keep = nondominated_mask(minimized([t.values for t in pool], self.directions))
            self.front = sorted((t for t, k in zip(pool, keep) if k), key=lambda t: t.number)
            self.least = []
        elif not self.front:
            for t, e in zip(new, excess):
                if e < self.least_excess:
                    self.least_excess, self.least = e, [t]
                elif e == self.least_excess:
                    self.least.append(t)
            self.least.sort(key=lambda t: t.number)

    def members(self) -> list[FrozenTrial]:
        return self.front if self.front else self.least


def front(trials: Sequence[FrozenTrial], directions) -> list[FrozenTrial]:  # noqa: ANN001
    """The :class:`IncrementalFront` of ``trials`` at once."""
    merged = IncrementalFront(directions)
    merged.merge(trials)
    return merged.members()
