"""``predictor``: local search screened by a predictor (BANANAS / NASLib's local search /
DyNAS-T's LINAS idea) for every space: architecture-only or joint, tabular or supernet, one or
several objectives, with or without budgets.

Each new arch is the best of ``CANDIDATES`` distinct proposals never evaluated in the study:

- **proposals**: mutations (one gene, or two with probability 1/3; a numeric gene moves to a
  neighbouring option half of the time, else to any other option) of a parent, with a share
  ``RANDOM_SHARE`` of uniformly random archs. Parents are, with one objective, the ``PARENTS``
  best trials (Deb's rule with budgets: feasible ones first, then the least excess); with
  several objectives, the members of the Pareto front (of the feasible trials, when there are
  budgets), half of the time from its leading part (``TOP_PART``, best by the first objective).
- **exploration**: a share ``EXPLORE`` of the asks skips the screen and evaluates a random
  one-gene neighbour, not yet evaluated, of the best trial (several objectives: of a random
  parent), so a neighbour the predictor underrates is still tried (on NAS-Bench-201 the
  all-3x3-convolution cell, 93.76 %, has a neighbour at 94.36 % that the screen kept missing).
- **joint spaces, several objectives** (a space with compression genes): the asks that do not
  aim at a budget are ``staged``'s (``strategies/staged.py``: architecture moves at int8, then
  architecture and compression moves around the front), which leads on hypervolume there.
- **budgets** (constraints recorded by ``trial.set_constraint``, as ``nasopt search --max-*``
  does): with several objectives a share ``FOCUS`` of the asks (from the first feasible trial
  on, through ``staged``'s architecture phase too) aims at the most accurate *feasible* model:
  the parents are
  the ``PARENTS`` best feasible trials by the first objective, the proposals (on joint spaces
  ``staged``'s compression-phase moves, and in a share ``SHIFT_AND_GROW`` every bit-width a
  step lower and then one or two architecture genes changed: each move alone loses accuracy,
  so neither would become a parent; and in a share ``SQUEEZE`` an accurate trial just over
  the budget, a member of the front of the infeasible trials by first objective and excess,
  with every bit-width set to a random option between the second lowest and its own, and half
  of the time one architecture gene a step away: the accurate models the budget excludes at
  their bit-widths are tried at fewer bits; ``FOCUS_CANDIDATES`` of them, not ``CANDIDATES``)
  are ranked by the predicted first objective, so the front's member nearest the budget keeps
  being improved while the rest of the front is spread.
- **predictor** (``strategies/surrogate.py``): extremely randomized trees, one forest per
  objective and one per constraint (its signed value, so the trees place the budget's boundary
  between the trials on either side of it), fitted to the completed trials; genes whose
  options are not numbers (NAS-Bench-201's operations) are one-hot encoded. Each ask scores the
  proposals with the mean of a random ``SAMPLE_TREES`` of the trees (a Thompson-like draw, so
  close calls are not always settled the same way): with one objective (and in the ``FOCUS``
  asks) the predicted value, with several the margin beyond the current front
  (``surrogate.margin``); proposals most trees predict over a budget come last.
- the first ``INITIAL`` archs are uniformly random.

Cost: the forests are refitted on a schedule, not at every ask: to the first ``INITIAL`` trials,
then each time the completed trials have grown by ``max(REFIT, 10 %)`` (a 10,000-trial search
refits about 50 times); the parents (the best trials, the front) are merged incrementally from
the trials completed since the last ask. State is a function of the study's trials alone
(the schedule fixes which trials a forest sees), so a resumed study continues and a seed
reproduces a search.

Settings: ``INITIAL`` and ``EXPLORE`` were chosen between a few variants on NAS-Bench-201
(``nasopt bench strategies --part nb201``; results/strategies.md says which and how); the
budget design (``FOCUS`` asks from the start rather than after the architecture phase, their
share, ``staged``'s moves and the compound move, signed constraint forests) between a few
variants at 300 evaluations under 2 KB and 4 KB on MNIST-1D, seeds 0-4 (the seeds ``nasopt
bench budget`` reports: results/budget.md), so those figures are not a held-out test of it;
``SQUEEZE`` between 0, 0.3 and 0.5 at 4 KB on seeds 0-9, then checked on seeds 10-19;
``FOCUS_CANDIDATES`` between 100 and 300 at 4 KB on seeds 0-19, then checked on seeds 20-29
(results/budget_4kb_30seeds.md).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution
from optuna.study import Study
from optuna.trial import FrozenTrial, TrialState

from nasopt.core.pareto import minimized
from nasopt.core.space import SearchSpace
from nasopt.core.strategy import GeneSampler, Strategy
from nasopt.search.study import constraint_excess

from nasopt.strategies import moves
from nasopt.strategies.front import IncrementalFront
from nasopt.strategies.staged import StagedSampler
from nasopt.strategies.surrogate import Surrogate, margin, unordered

INITIAL = 20
CANDIDATES = 100
FOCUS_CANDIDATES = 300
PARENTS = 10
RANDOM_SHARE = 0.1
TOP_PART = 0.25
FOCUS = 0.5
TREES = 50
SAMPLE_TREES = 10
REFIT = 5
EXPLORE = 0.35
SHIFT_AND_GROW = 0.3
SQUEEZE = 0.3

FINISHED = (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)


def fitted_count(n: int, initial: int = INITIAL, refit: int = REFIT) -> int:
    """How many of ``n`` completed trials (the first, by number) the forests see: the largest
    point <= ``n`` of the schedule ``initial``, then steps of ``max(refit, 10 %)``; 0 below
    ``initial``."""
    point = max(1, initial)
    if n < point:
        return 0
    while True:
        nxt = point + max(refit, point // 10)
        if nxt > n:
            return point
        point = nxt


def _key(params: dict[str, Any]) -> tuple:
    return tuple(sorted(params.items()))


class _Elite:
    """The parents, merged incrementally from completed trials: the ``size`` best by the first
    objective (Deb's rule: feasible first, then least excess; ties by trial number), and, with
    several objectives, the front of the feasible trials (or the least infeasible ones while
    none is feasible); and the front of the infeasible trials by first objective and excess.
    A function of the set of merged trials, whatever order they came in."""

    def __init__(self, directions, size: int, multi: bool):
        self.sign = 1.0 if directions[0] == optuna.study.StudyDirection.MINIMIZE else -1.0
        self.directions = directions
        self.size = size
        self.multi = multi
        self.merged: set[int] = set()
        self.best: list[tuple] = []  # (infeasible, excess, minimized first objective, number, t)
        self.feasible_best: list[tuple] = []
        self.over: list[tuple] = []  # (minimized first objective, excess, number, t)
        self.pareto = IncrementalFront(directions)  # with several objectives

    def merge(self, new: Sequence[FrozenTrial]) -> None:
        """Add the completed trials ``new`` (not merged before)."""
        if not new:
            return
        self.merged.update(t.number for t in new)
        rows = []
        for t in new:
            excess = constraint_excess(t)
            rows.append((excess > 0, excess, self.sign * t.values[0], t.number, t))
        self.best = sorted(self.best + rows, key=lambda r: r[:4])[:self.size]
        self.feasible_best = sorted(self.feasible_best + [r for r in rows if not r[0]],
                                    key=lambda r: r[:4])[:self.size]
        over = sorted(self.over + [(r[2], r[1], r[3], r[4]) for r in rows if r[0]],
                      key=lambda r: r[:3])
        self.over, least = [], float("inf")
        for row in over:  # best first: each kept one exceeds less than those before it
            if row[1] < least:
                self.over.append(row)
                least = row[1]
        if self.multi:
            self.pareto.merge(new)

    def parents(self) -> list[FrozenTrial]:
        """One objective: the best trials; several: the front (or the least infeasible)."""
        if not self.multi:
            return [r[4] for r in self.best]
        return self.pareto.members()

    def feasible(self) -> list[FrozenTrial]:
        """The best feasible trials by the first objective (empty while none is feasible)."""
        return [r[4] for r in self.feasible_best]

    def over_front(self) -> list[FrozenTrial]:
        """The infeasible trials no other beats on both the first objective and the excess,
        best first."""
        return [r[3] for r in self.over]


class PredictorSampler(GeneSampler):
    """Predictor-screened local search over the categorical parameters (see the module doc)."""

    def __init__(self, space: SearchSpace | None = None, seed: int | None = None,
                 initial: int = INITIAL,
                 candidates: int = CANDIDATES, focus_candidates: int = FOCUS_CANDIDATES,
                 parents: int = PARENTS,
                 sample_trees: int = SAMPLE_TREES, refit: int = REFIT, focus: float = FOCUS,
                 explore: float = EXPLORE):
        super().__init__(seed)
        self.seed = seed or 0
        self.initial = max(1, initial)
        self.candidates = max(1, candidates)
        self.focus_candidates = max(1, focus_candidates)
        self.n_parents = max(1, parents)
        self.sample_trees = sample_trees
        self.refit = max(1, refit)
        self.focus = focus
        self.explore = explore
        self._surrogate: Surrogate | None = None
        self._elite: _Elite | None = None
        self._elite_for: tuple | None = None
        self._seen: dict[int, tuple] = {}  # finished trials' params keys, by number
        self._seen_keys: set[tuple] = set()
        self._fitted_count = 0
        #: joint spaces (compression genes), several objectives: the asks that do not aim at
        #: the best feasible model are staged's (architecture first, then compression moves)
        self._staged = (StagedSampler(space, seed=seed)
                        if space is not None and space.compression_genes() else None)

    def plan(self, trials: int) -> None:
        """Called by the search loop with the number of completed trials the study will hold."""
        if self._staged is not None:
            self._staged.plan(trials)

    # -- state rebuilt from the study ---------------------------------------------------------
    def _state(self, study: Study, choices: dict[str, list]):  # noqa: ANN202
        trials = study.get_trials(deepcopy=False)
        directions = study.directions
        key = (id(study._storage), study._study_id, tuple(directions),
               tuple((n, tuple(c)) for n, c in choices.items()))
        if self._elite is None or self._elite_for != key:
            self._elite = _Elite(directions, self.n_parents, len(directions) > 1)
            self._elite_for = key
            self._seen, self._seen_keys = {}, set()
            self._fitted_count = 0
        done, busy, new = [], set(), []
        for t in trials:
            if t.state == TrialState.COMPLETE:
                done.append(t)
                if t.number not in self._elite.merged:
                    new.append(t)
            if t.state in FINISHED:
                if t.number not in self._seen and t.params:
                    self._seen[t.number] = _key(t.params)
                    self._seen_keys.add(self._seen[t.number])
            elif t.params:  # running elsewhere: not proposed again
                busy.add(_key(t.params))
        # the parents must hold options of this space (a resumed study may have been wider)
        self._elite.merged.update(t.number for t in new)
        self._elite.merge([t for t in new if all(t.params.get(g) in c
                                                 for g, c in choices.items())])
        return done, busy

    def _model(self, done: list[FrozenTrial], choices: dict[str, list], directions
               ) -> Surrogate | None:
        if self._surrogate is None or self._surrogate.options != choices:
            self._surrogate = Surrogate(choices, seed=self.seed, categorical=True, refit=1,
                                        signed=True)
            self._fitted_count = 0
        # the first ``count`` completed trials by number (those with options of this space)
        count = fitted_count(len(done), self.initial, self.refit)
        if count and count != self._fitted_count:
            first = sorted(done, key=lambda t: t.number)[:count]
            self._surrogate.fit(first, directions)  # it drops trials with other options
            self._fitted_count = count
        return self._surrogate if self._surrogate.ready else None

    # -- the ask ------------------------------------------------------------------------------
    def sample_relative(self, study: Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        if not search_space:
            return {}
        choices = {n: list(d.choices) for n, d in search_space.items()}  # type: ignore[attr-defined]
        done, busy = self._state(study, choices)
        if len(done) < self.initial:
            return {}  # random (sample_independent)
        elite = self._elite
        assert elite is not None
        directions = study.directions
        constrained = any(t.constraints for t in done[-1:]) or any(
            t.constraints for t in elite.parents())
        focus = (elite.multi and constrained and bool(elite.feasible())
                 and self._rng.rand() < self.focus)
        if elite.multi and self._staged is not None and not focus:
            return self._staged.sample_relative(study, trial, search_space)
        if focus:
            parents = elite.feasible()
        else:
            parents = elite.parents()
            if elite.multi and parents and self._rng.rand() < 0.5:
                order = sorted(parents, key=lambda t: (elite.sign * t.values[0], t.number))
                parents = order[:max(1, int(np.ceil(TOP_PART * len(order))))]
        seen = self._seen_keys | busy if busy else self._seen_keys
        if parents and self._rng.rand() < self.explore:
            child = self._neighbour(parents[0] if len(directions) == 1 or focus
                                    else parents[self._rng.randint(len(parents))],
                                    choices, seen)
            if child is not None:
                return child
        if focus and self._staged is not None:
            proposals = self._staged_proposals(done, parents, choices, seen, directions)
        else:
            proposals = self._propose(parents, choices, seen)
        if not proposals:  # every proposal a repeat (a tiny space): a random arch
            return {n: c[self._rng.randint(len(c))] for n, c in choices.items()}
        model = self._model(done, choices, directions)
        if model is None or len(proposals) == 1:
            return proposals[0]
        x = np.array([model.encode(p) for p in proposals])
        trees = model.tree_predictions(x)  # (objectives, trees, proposals)
        if 0 < self.sample_trees < trees.shape[1]:
            pick = self._rng.choice(trees.shape[1], self.sample_trees, replace=False)
            trees = trees[:, pick]
        points = trees.mean(1).T  # (proposals, objectives), minimized, model scale
        breaking = model.breaking(x)
        if len(directions) == 1 or focus:
            score = -points[:, 0]
        else:
            front = elite.parents()
            score = margin(points, model.transform(minimized([t.values for t in front],
                                                             directions)))
        score = np.where(breaking < 0.5, score, -1e9 - breaking)
        return proposals[int(np.argmax(score))]

    def _staged_proposals(self, done: list[FrozenTrial], parents: list[FrozenTrial],
                          choices: dict[str, list], seen: set, directions
                          ) -> list[dict[str, Any]]:
        """Up to ``focus_candidates`` distinct archs not in ``seen`` made by staged's
        compression-phase moves (architecture moves at the parent's compression, bit-width
        shifts, compression steps) from ``parents``."""
        staged = self._staged
        assert staged is not None
        out, keys = [], set()
        pools: list = []  # staged's NSGA-II pool, built once if its architecture phase asks

        def pool():  # noqa: ANN202
            if not pools:
                pools.append(staged.pool(done, directions))
            return pools[0]

        bits = [g for g in staged.compression if g.endswith(".bits") and len(choices.get(g, ())) > 1]
        architecture = [g for g in staged.architecture if g in choices]
        for _ in range(3 * self.focus_candidates):
            if bits and architecture and self._rng.rand() < SHIFT_AND_GROW:
                # a compound move: every bit-width a step lower, then one or two architecture
                # genes changed, so the budget freed by the bits can buy a larger network (each
                # move alone loses accuracy: neither would make a parent)
                parent = parents[self._rng.randint(len(parents))].params
                child = {n: parent[n] for n in choices}
                moves.shift(child, bits, choices)
                moves.mutate(self._rng, child, architecture, choices)
            else:
                child = staged.propose(done, parents, parents, pool, choices)
            key = _key(child)
            if key in seen or key in keys:
                continue
            keys.add(key)
            out.append(child)
            if len(out) >= self.focus_candidates:
                break
        squeezed = self._squeezed(bits, architecture, choices, seen | keys,
                                  int(SQUEEZE * len(out)))
        return out[:len(out) - len(squeezed)] + squeezed

    def _squeezed(self, bits: list[str], architecture: list[str], choices: dict[str, list],
                  seen: set, count: int) -> list[dict[str, Any]]:
        """Up to ``count`` distinct archs not in ``seen``: members of the front of the
        infeasible trials (most accurate for their excess) with every bit-width gene set to a
        random option from the second lowest up to the member's own, and half of the time one
        architecture gene a step away."""
        assert self._elite is not None
        near = self._elite.over_front()
        if not near or not bits or count < 1:
            return []
        out, keys = [], set()
        for _ in range(3 * count):
            parent = near[self._rng.randint(len(near))].params
            child = {n: parent[n] for n in choices}
            for g in bits:
                options = choices[g]
                i = options.index(child[g])
                lower = options[min(1, i):i + 1]
                child[g] = lower[self._rng.randint(len(lower))]
            if architecture and self._rng.rand() < 0.5:
                moves.step(self._rng, child, architecture, choices)
            key = _key(child)
            if key in seen or key in keys:
                continue
            keys.add(key)
            out.append(child)
            if len(out) >= count:
                break
        return out

    def _neighbour(self, parent: FrozenTrial, choices: dict[str, list], seen: set
                   ) -> dict[str, Any] | None:
        """A random one-gene neighbour of ``parent`` not in ``seen`` (None: all are)."""
        options = []
        for gene, values in choices.items():
            for v in values:
                if v != parent.params[gene]:
                    child = {**{n: parent.params[n] for n in choices}, gene: v}
                    if _key(child) not in seen:
                        options.append(child)
        return options[self._rng.randint(len(options))] if options else None

    def _propose(self, parents: list[FrozenTrial], choices: dict[str, list], seen: set
                 ) -> list[dict[str, Any]]:
        """Up to ``candidates`` distinct archs not in ``seen``: mutants of ``parents`` and a
        share of random ones."""
        out: list[dict[str, Any]] = []
        keys: set[tuple] = set()
        names = list(choices)
        mutable = [n for n in names if len(choices[n]) > 1]
        ordered = {n for n in mutable if n not in unordered({n: choices[n]})}
        for _ in range(3 * self.candidates):
            if not parents or not mutable or self._rng.rand() < RANDOM_SHARE:
                child = {n: c[self._rng.randint(len(c))] for n, c in choices.items()}
            else:
                parent = parents[self._rng.randint(len(parents))].params
                child = {n: parent[n] for n in names}
                self._mutate(child, mutable, choices, ordered)
            key = _key(child)
            if key in seen or key in keys:
                continue
            keys.add(key)
            out.append(child)
            if len(out) >= self.candidates:
                break
        return out

    def _mutate(self, child: dict[str, Any], mutable: list[str], choices: dict[str, list],
                ordered: set[str]) -> None:
        count = min(len(mutable), 1 + (self._rng.rand() < 1 / 3))
        for j in self._rng.choice(len(mutable), count, replace=False):
            gene = mutable[j]
            options = choices[gene]
            i = options.index(child[gene])
            if gene in ordered and self._rng.rand() < 0.5:
                near = [k for k in (i - 1, i + 1) if 0 <= k < len(options)]
                child[gene] = options[near[self._rng.randint(len(near))]]
            else:
                others = [o for k, o in enumerate(options) if k != i]
                child[gene] = others[self._rng.randint(len(others))]


def _make(space: SearchSpace, seed: int) -> optuna.samplers.BaseSampler:
    return PredictorSampler(space, seed=seed)


STRATEGY = Strategy("predictor", f"local search screened by a predictor: each arch the best of "
                    f"{CANDIDATES} mutants of the best trials / front by extremely randomized "
                    f"trees fitted to the study; with budgets, a share aimed at the most "
                    f"accurate feasible model; every space", _make)
