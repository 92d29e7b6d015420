"""``staged``: architecture first, then architecture and compression moves around the front
(for joint spaces).

A joint architecture + compression space is large (conv1d: 36^3 = 46,656 architectures x 5^4
bit-widths x 4 sparsities x 3 ranks), and a generic sampler spends much of its budget on compressed versions
of poor architectures. Compression genes act on an architecture that is already good, so the
budget is split in two phases (the search loop tells the sampler its budget through ``plan``):

1. **architecture phase** (the first ``ARCH_SHARE`` of the completed trials): NSGA-II restricted
   to the architecture genes, every child at the *reference compression* (uniform int8, dense,
   full rank: ``compress.reference_compression``, the usual deployment default): ``INITIAL``
   random archs, then two binary tournaments (feasibility first, as Deb's rule, then Pareto
   rank, then crowding distance) among the trials at the reference compression, uniform
   crossover, one or two genes mutated. **Sweep**: where the architecture space has at most
   ``SWEEP_MAX`` members (conv1d: 46,656), a share ``SWEEP`` of these children is instead the
   architecture, among *all* those not yet evaluated at the reference compression, that the
   surrogate (below) predicts furthest beyond the front; the forests' predictions for the whole
   grid are computed once per refit. (Chosen from runs at 1000 evaluations on MNIST-1D,
   the NSGA-II int8 front's points not weakly dominated by the joint front: on the supernet of
   results/compression_mnist1d.md, seeds 0-11, 15 with the sweep vs 23 without, every point on
   3 of 12 seeds either way, hypervolume 0.9259 vs 0.9243; on a second training of that
   supernet (``supernet.seed=1``), seeds 0-11, 8 vs 12 points, 8 vs 6 of 12 seeds,
   hypervolume 0.9148 vs 0.9167. Also tried, no better within seed noise: 96 proposals per child instead
   of the sweep, an optimistic sweep (mean minus the trees' spread), a 0.6 architecture phase
   with the sweep, and sweeps at a front member's compression in the compression phase.)
2. **compression phase**: a parent drawn from the Pareto front of *all* trials (feasible ones
   first): with probability ``TOP_SHARE`` from its most accurate quarter (``TOP_PART``, by the
   first objective), otherwise uniformly from the whole front. (Uniform draws alone spent a
   third of the children on the front's sub-1 KB, < 85 % members, and the int8 front's most
   accurate archs were the ones missed: at 1000 evaluations on MNIST-1D, seeds 0-5, every int8
   point weakly dominated on 5 of 6 seeds, 2 points missed, vs 2 of 6 and 9 uniformly, same
   hypervolume; those seeds chose the rule: on seeds 6-11, 3 of 6 and 6 missed vs 2 of 6 and
   7, a smaller gain; on a later training of the same supernet, seeds 0-11: 3 of 12, 23
   missed.) Half of the children (``ARCH_MOVES``) are architecture moves at the
   parent's compression: half of those first take each architecture gene from a second front
   member with probability 1/2 (uniform crossover), then one or two architecture genes are
   mutated, so the architecture keeps improving where the front is compressed. The other
   children are compression moves: half of them lower every bit-width one option (8 -> 6 -> 4
   ...: the whole model a step smaller), the others move one or two compression genes to a
   neighbouring option (bits, sparsity and rank are ordinal). (Measured at 1000 evaluations on
   MNIST-1D: with one compression gene redrawn uniformly the joint front weakly dominated
   60-68 % of the int8 front's points; with the ordinal compression moves alone 76-90 %, the
   misses being int8 archs the shorter architecture phase had not found;
   results/compression_mnist1d.md has the current figures.)

**Surrogate screening** (``strategies/surrogate.py``): each child is the best of ``screen``
(default ``surrogate.SCREEN``) distinct proposals made by the moves above, by the objectives a
forest fitted to the completed trials predicts (the proposal predicted furthest beyond the
front; predicted budget breakers last); a share ``EXPLORE`` of children, and the initial random
ones, skip the screen. (A run at 1000 evaluations on MNIST-1D, seeds 0-2, on the
supernet of results/compression_mnist1d.md: the joint front's hypervolume 0.924-0.926 with
screening vs 0.917-0.919 without, and 3 vs 10 points of the NSGA-II int8 front not weakly
dominated; that file has the bench's figures.)

Without a known budget the two phases' moves are interleaved at random (``ARCH_SHARE`` each).
Spaces without compression genes get architecture moves only. State is the study's trials alone
(plus the budget), so a resumed study continues; the draw sequence follows the seed. A child
already in the study is re-drawn (up to ``RETRIES`` more proposals than ``screen``), so the budget
is not spent on repeats.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

import optuna
from optuna.distributions import BaseDistribution
from optuna.study import Study
from optuna.trial import FrozenTrial, TrialState

from nasopt.compression.compress import reference_compression
from nasopt.core.pareto import minimized, ranks_and_crowding
from nasopt.core.space import SearchSpace
from nasopt.core.strategy import GeneSampler, Strategy
from nasopt.core.trials import completed_trials
from nasopt.search.study import constraint_excess

from nasopt.strategies import moves, surrogate
from nasopt.strategies.front import IncrementalFront
from nasopt.strategies.surrogate import Surrogate

ARCH_SHARE = 0.5
INITIAL = 16
RETRIES = 20
#: share of the compression phase's children that are architecture moves at their parent's
#: compression (the others are compression moves)
ARCH_MOVES = 0.5
#: share of compression moves that lower every bit-width one step (the others move 1-2 genes)
SHIFT_SHARE = 0.5
#: share of children after the initial ones that skip the surrogate (the first candidate is
#: evaluated), so regions the surrogate thinks poor are still sampled
EXPLORE = 0.1
#: share of compression-phase parents drawn from the front's leading part (``TOP_PART`` of its
#: members, best by the first objective: accuracy) instead of the whole front
TOP_SHARE = 0.5
TOP_PART = 0.25
#: share of the architecture phase's children (after the initial ones) chosen by the surrogate
#: from *every* architecture not yet evaluated at the reference compression, instead of from
#: ``screen`` NSGA-II proposals; only where the architecture space has at most ``SWEEP_MAX``
#: members
SWEEP = 0.9
SWEEP_MAX = 200_000


def _points(trials: Sequence[FrozenTrial], directions) -> np.ndarray:
    """The trials' objective values, every objective minimized (one row per trial)."""
    return minimized([t.values for t in trials], directions)


def leading(members: Sequence[FrozenTrial], directions, part: float) -> list[FrozenTrial]:
    """The ``part`` of ``members`` (at least one) best by the first objective."""
    if not members:
        return []
    order = sorted(members, key=lambda t: minimized(t.values, directions)[0])
    return order[:max(1, int(np.ceil(part * len(order))))]


class _Pool(NamedTuple):
    trials: list[FrozenTrial]
    keys: list[tuple]  # tournament key of each trial (smaller wins)


class StagedSampler(GeneSampler):
    def __init__(self, space: SearchSpace, seed: int | None = None,
                 arch_share: float = ARCH_SHARE, initial: int = INITIAL,
                 screen: int = surrogate.SCREEN):
        super().__init__(seed)
        self.seed = seed or 0
        self.screen = max(1, screen)
        self._surrogate: Surrogate | None = None  # refitted from the trials (surrogate.REFIT)
        genes = space.genes
        self.compression = [g for g in space.compression_genes() if g in genes]
        self.architecture = [g for g in genes if g not in self.compression]
        self.reference = reference_compression({g: genes[g] for g in self.compression})
        self.arch_share = arch_share
        self.initial = initial
        self.budget: int | None = None
        self._grid: tuple | None = None  # (choices, option positions, encoded) of _sweep
        self._swept: tuple | None = None  # ((trials fitted on, fixed genes), predictions)
        #: (study, its front merged incrementally, the completed trials' parameter keys)
        self._front: tuple | None = None

    def plan(self, trials: int) -> None:
        """Called by the search loop with the number of completed trials the study will hold."""
        self.budget = trials

    def sample_relative(self, study: Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        if not search_space:
            return {}
        choices = {n: list(d.choices) for n, d in search_space.items()}  # type: ignore[attr-defined]
        done = completed_trials(study)
        # trials other workers are evaluating now count as seen, so they are not proposed again
        busy = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,
                                                                   TrialState.WAITING))
                if t.params]
        state = (study._study_id, tuple(study.directions))
        if self._front is None or self._front[0] != state:
            self._front = (state, IncrementalFront(study.directions), set())
        _, merged, done_keys = self._front
        done_keys.update(tuple(sorted(t.params.items())) for t in done
                         if t.number not in merged.merged)  # each completed trial's, once
        merged.merge(done)
        seen = {tuple(sorted(t.params.items())) for t in busy}  # and this ask's candidates
        parents = merged.members()
        top = leading(parents, study.directions, TOP_PART)
        pools: list[_Pool] = []  # the NSGA-II pool, built once and only when a proposal needs it

        def pool() -> _Pool:
            if not pools:
                pools.append(self.pool(done, study.directions))
            return pools[0]

        if (SWEEP and self.budget is not None and parents
                and self.initial <= len(done) < self.arch_share * self.budget
                and self._rng.rand() < SWEEP):
            child = self._sweep(done, parents, study.directions, choices,
                                {g: v for g, v in self.reference.items() if g in choices}, busy)
            if child is not None:
                return child
        candidates: list[dict[str, Any]] = []
        for _ in range(RETRIES + self.screen):
            child = self.propose(done, parents, top, pool, choices)
            key = tuple(sorted(child.items()))
            if key not in done_keys and key not in seen:
                seen.add(key)
                candidates.append(child)
            if len(candidates) >= self.screen:
                break
        if not candidates:  # every proposal a repeat: evaluate the last one anyway
            return child
        if len(candidates) == 1 or len(done) < self.initial or self._rng.rand() < EXPLORE:
            return candidates[0]
        return candidates[surrogate.pick(self._surrogate_for(choices), candidates, done,
                                         parents, study.directions)]

    def _surrogate_for(self, choices: dict[str, list]) -> Surrogate:
        if self._surrogate is None or self._surrogate.options != choices:
            self._surrogate = Surrogate(choices, seed=self.seed)
        return self._surrogate

    def _sweep(self, done: list[FrozenTrial], parents: list[FrozenTrial], directions,
               choices: dict[str, list], fixed: dict[str, Any],
               busy: Sequence[FrozenTrial] = ()) -> dict[str, Any] | None:
        """The architecture, at the compression ``fixed`` (the reference one), that the
        surrogate predicts furthest beyond the front among all those not yet evaluated (nor
        being evaluated: ``busy``) there (None: the space is larger than ``SWEEP_MAX``, the
        surrogate is not fitted yet, or all are evaluated)."""
        genes = [g for g in self.architecture if g in choices]
        sizes = [len(choices[g]) for g in genes]
        if not genes or int(np.prod(sizes)) > SWEEP_MAX:
            return None
        names = list(choices)
        if self._grid is None or self._grid[0] != choices:
            positions = np.indices(sizes).reshape(len(genes), -1).T
            x = np.zeros((len(positions), len(names)))
            for j, g in enumerate(genes):
                x[:, names.index(g)] = positions[:, j] / max(1, sizes[j] - 1)
            self._grid = (choices, positions, x)
            self._swept = None
        _, positions, x = self._grid
        model = self._surrogate_for(choices)
        model.fit(done, directions)
        if not model.ready:
            return None
        key = (model.fitted_on, tuple(sorted(fixed.items())))
        if self._swept is None or self._swept[0] != key:
            for g, v in fixed.items():
                x[:, names.index(g)] = choices[g].index(v) / max(1, len(choices[g]) - 1)
            self._swept = (key, model.predict_encoded(x))
        score = surrogate.scores(model, *self._swept[1], parents, directions)
        weights = np.cumprod([1, *sizes[:0:-1]])[::-1]  # flat index of option positions
        for t in (*done, *busy):
            if all(t.params.get(g) == v for g, v in fixed.items()) and \
                    all(t.params.get(g) in choices[g] for g in genes):
                score[sum(choices[g].index(t.params[g]) * w for g, w in zip(genes, weights))] \
                    = -np.inf
        best = int(np.argmax(score))
        if not np.isfinite(score[best]):
            return None
        child = {g: choices[g][positions[best, j]] for j, g in enumerate(genes)}
        child.update(fixed)
        return {n: child.get(n, choices[n][0]) for n in choices}

    def propose(self, done: list[FrozenTrial], parents: list[FrozenTrial],
                 top: list[FrozenTrial], pool: Callable[[], _Pool], choices: dict[str, list]
                 ) -> dict[str, Any]:
        # compression genes fixed to one option (``--restrict``) cannot move
        compression = [g for g in self.compression if len(choices.get(g, ())) > 1]
        random = {n: c[self._rng.randint(len(c))] for n, c in choices.items()}
        if self.budget is not None:  # phases: architecture first, compression at the end
            arch_phase = len(done) < self.arch_share * self.budget
        else:  # no budget known: interleave the two kinds of move
            arch_phase = self._rng.rand() < self.arch_share
        if len(done) < self.initial:
            child = random
        elif not compression or arch_phase:
            child = self._architecture_move(pool(), choices) or random
        else:
            pick = lambda: parents[self._rng.randint(len(parents))].params  # noqa: E731
            if self._rng.rand() < TOP_SHARE:
                parent = top[self._rng.randint(len(top))].params
            else:
                parent = pick()
            child = {n: parent[n] if parent.get(n) in c else random[n]
                     for n, c in choices.items()}
            bits = [g for g in compression if g.endswith(".bits") and len(choices[g]) > 1]
            architecture = [g for g in self.architecture if g in choices]
            if architecture and self._rng.rand() < ARCH_MOVES:
                moves.cross(self._rng, child, pick(), architecture, choices)
                moves.mutate(self._rng, child, architecture, choices)
            elif bits and self._rng.rand() < SHIFT_SHARE:
                moves.shift(child, bits, choices)
            else:
                moves.step(self._rng, child, compression, choices)
            return child
        child.update({g: v for g, v in self.reference.items() if g in choices})
        return child

    def pool(self, done: list[FrozenTrial], directions) -> _Pool:
        """The trials at the reference compression, with NSGA-II's tournament key (feasibility,
        then Pareto rank, then crowding) of each."""
        pool = [t for t in done if all(t.params.get(g) == v for g, v in self.reference.items())]
        if len(pool) < 2:
            return _Pool(pool, [])
        excess = np.array([constraint_excess(t) for t in pool])
        rank, crowd = ranks_and_crowding(_points(pool, directions))
        return _Pool(pool, [(e > 0, e, r, -c) for e, r, c in zip(excess, rank, crowd)])

    def _architecture_move(self, pool: _Pool, choices: dict[str, list]
                           ) -> dict[str, Any] | None:
        """NSGA-II's step on the trials at the reference compression: two binary tournaments
        (feasibility, then rank, then crowding), uniform crossover, one-or-two-gene mutation."""
        if len(pool.trials) < 2:
            return None

        def tournament() -> dict[str, Any]:
            a, b = self._rng.choice(len(pool.trials), 2, replace=False)
            return pool.trials[min(a, b, key=lambda i: pool.keys[i])].params

        mother, father = tournament(), tournament()
        genes = [g for g in self.architecture if g in choices]
        child = {n: (mother if self._rng.rand() < 0.5 else father).get(n) for n in choices}
        child = {n: v if v in choices[n] else choices[n][self._rng.randint(len(choices[n]))]
                 for n, v in child.items()}
        moves.mutate(self._rng, child, genes, choices)
        return child


def _make(space: SearchSpace, seed: int) -> optuna.samplers.BaseSampler:
    return StagedSampler(space, seed=seed)


STRATEGY = Strategy("staged", "architecture moves at int8, then architecture and compression "
                    f"moves around the Pareto front ({ARCH_SHARE:.0%} / {1 - ARCH_SHARE:.0%}), "
                    "each child the best of several by a surrogate; for joint spaces",
                    _make)
