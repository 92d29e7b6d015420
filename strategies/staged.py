"""``staged``: architecture first, then compression around the front (for joint spaces).

A joint architecture + compression space is large (conv1d: 3^9 architectures x 5^4 bit-widths x
4 sparsities x 3 ranks), and a generic sampler spends most of its budget on badly compressed
versions of badly chosen architectures. Compression genes act on an architecture that is already
good, so this strategy alternates two kinds of move, each a mutation of a parent from a Pareto
front (Deb's feasibility rule first, as in ``evolution``):

- **architecture move** (probability ``ARCH_SHARE``, and every trial until ``INITIAL`` trials
  are complete): a random arch at first, then a parent from the front of the trials that carry
  the *reference compression* (uniform int8, dense, full rank: ``compress.reference_compression``)
  with one or two architecture genes changed; the child carries the reference compression too.
  This is an architecture-only search at int8, the usual deployment default.
- **compression move**: a parent from the front of *all* trials, with one or two compression genes
  changed: it explores bit-widths, sparsity and rank around architectures that are already good.

Spaces without compression genes get architecture moves only (a front-based mutation search).
State is the study's trials alone, so a resumed study continues; the draw sequence follows the
seed. A child already in the study is re-drawn (up to ``RETRIES`` times), so budgets are not
spent on repeats.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

import optuna
from optuna.distributions import BaseDistribution
from optuna.study import Study
from optuna.trial import FrozenTrial, TrialState

from nasopt.compress import reference_compression
from nasopt.space import SearchSpace
from nasopt.strategy import GeneSampler, Strategy
from nasopt.study import constraint_excess

from .evolution import _minimized

ARCH_SHARE = 0.5
INITIAL = 16
RETRIES = 20


def front(trials: Sequence[FrozenTrial], directions) -> list[FrozenTrial]:
    """The non-dominated trials; with constraints, among the feasible ones (or, when none is
    feasible, the least infeasible)."""
    if not trials:
        return []
    excess = [constraint_excess(t) for t in trials]
    feasible = [t for t, e in zip(trials, excess) if e <= 0]
    if not feasible:
        least = min(excess)
        return [t for t, e in zip(trials, excess) if e == least]
    points = np.array([_minimized(t.values, directions) for t in feasible])
    le = (points[:, None, :] <= points[None, :, :]).all(-1)  # le[j, i]: j no worse than i
    lt = (points[:, None, :] < points[None, :, :]).any(-1)
    dominated = (le & lt).any(0)
    return [t for t, d in zip(feasible, dominated) if not d]


class StagedSampler(GeneSampler):
    def __init__(self, space: SearchSpace, seed: int | None = None,
                 arch_share: float = ARCH_SHARE, initial: int = INITIAL):
        super().__init__(seed)
        genes = space.genes
        self.compression = [g for g in space.compression_genes() if g in genes]
        self.architecture = [g for g in genes if g not in self.compression]
        self.reference = reference_compression({g: genes[g] for g in self.compression})
        self.arch_share = arch_share
        self.initial = initial

    def sample_relative(self, study: Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        if not search_space:
            return {}
        choices = {n: list(d.choices) for n, d in search_space.items()}  # type: ignore[attr-defined]
        done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        seen = {tuple(sorted(t.params.items())) for t in done}
        child: dict[str, Any] = {}
        for _ in range(RETRIES):
            child = self._propose(study, done, choices)
            if tuple(sorted(child.items())) not in seen:
                break
        return child

    def _propose(self, study: Study, done: list[FrozenTrial],
                 choices: dict[str, list]) -> dict[str, Any]:
        compression = [g for g in self.compression if g in choices]
        arch_move = (not compression or len(done) < self.initial
                     or self._rng.rand() < self.arch_share)
        if arch_move:
            at_reference = [t for t in done
                            if all(t.params.get(g) == v for g, v in self.reference.items())]
            parents = front(at_reference, study.directions)
            genes = [g for g in self.architecture if g in choices]
        else:
            parents = front(done, study.directions)
            genes = compression
        if len(done) < self.initial or not parents:
            child = {n: c[self._rng.randint(len(c))] for n, c in choices.items()}
        else:
            parent = parents[self._rng.randint(len(parents))].params
            child = {n: parent[n] if parent.get(n) in c else c[self._rng.randint(len(c))]
                     for n, c in choices.items()}
            self._mutate(child, genes, choices)
        if arch_move:
            child.update({g: v for g, v in self.reference.items() if g in choices})
        return child

    def _mutate(self, child: dict[str, Any], genes: list[str], choices: dict[str, list]) -> None:
        mutable = [g for g in genes if len(choices[g]) > 1]
        if not mutable:
            return
        for _ in range(1 + (self._rng.rand() < 1 / 3)):
            gene = mutable[self._rng.randint(len(mutable))]
            others = [c for c in choices[gene] if c != child[gene]]
            child[gene] = others[self._rng.randint(len(others))]


def _make(space: SearchSpace, seed: int) -> optuna.samplers.BaseSampler:
    return StagedSampler(space, seed=seed)


STRATEGY = Strategy("staged", "architecture moves at int8, then compression moves around the "
                    f"Pareto front ({ARCH_SHARE:.0%} / {1 - ARCH_SHARE:.0%}); for joint spaces",
                    _make)
