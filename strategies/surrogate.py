"""Surrogate screening: predict a candidate arch's objectives from its genes before spending an
evaluation on it.

A strategy proposes several children, :class:`Surrogate` predicts each one's objectives, and the
child predicted furthest beyond the current Pareto front (:func:`margin`) is the one evaluated
(DyNAS-T's and BANANAS's idea: a cheap predictor in the loop, the real evaluation for the pick).
The predictor is scikit-learn's extremely randomized trees (one forest per objective, and one for
the constraint excess when a study has constraints), fitted to the study's completed trials;
genes are encoded as their option's position (genes are ordinal: widths, depths, kernels, bits,
sparsities, ranks); a surrogate made with ``categorical=True`` one-hot encodes the genes whose
options are not all numbers (NAS-Bench-201's operations), which have no order. Objectives whose values are all positive (sizes, MACs, latency: they span
orders of magnitude) are modelled and compared on a log scale.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from optuna.trial import FrozenTrial
from sklearn.ensemble import ExtraTreesRegressor

from nasopt.core.pareto import minimized
from nasopt.search.study import constraint_excess

#: candidates a strategy proposes per evaluation (the surrogate picks one)
SCREEN = 24
#: trees per forest
TREES = 50
#: a forest sees the first multiple of REFIT completed trials (by trial number), so the
#: prediction is a function of the study's trials and is refitted every REFIT trials only
REFIT = 10


def encode(params: Mapping[str, Any], options: Mapping[str, Sequence[Any]],
           categorical: frozenset[str] = frozenset()) -> list[float]:
    """Each gene as its option's position, scaled to [0, 1]; the genes in ``categorical`` as one
    column per option instead (1 for the arch's option, 0 for the others)."""
    out: list[float] = []
    for g, opts in options.items():
        i = list(opts).index(params[g])
        if g in categorical:
            out.extend(float(j == i) for j in range(len(opts)))
        else:
            out.append(i / max(1, len(opts) - 1))
    return out


def unordered(options: Mapping[str, Sequence[Any]]) -> frozenset[str]:
    """The genes whose options are not all numbers (no order to encode)."""
    return frozenset(g for g, opts in options.items()
                     if not all(isinstance(o, (int, float)) and not isinstance(o, bool)
                                for o in opts))


class Surrogate:
    """Forests predicting the minimized objectives (and the constraint excess) of an arch."""

    def __init__(self, options: Mapping[str, Sequence[Any]], seed: int = 0,
                 categorical: bool = False, refit: int = REFIT, signed: bool = False):
        self.options = dict(options)
        self.seed = seed
        #: genes one-hot encoded (:func:`unordered`) when ``categorical``, else none
        self.categorical = unordered(options) if categorical else frozenset()
        #: the forests see the first multiple of ``refit`` completed trials
        self.refit = refit
        #: model each constraint's signed value (``value - limit``, as recorded) instead of the
        #: clipped total excess: a candidate's trees then place the budget's boundary between
        #: the trials on either side of it, not in leaves mixing both (see :meth:`breaking`)
        self.signed = signed
        self.limits: list[ExtraTreesRegressor] = []
        self.fitted_on: tuple[int, ...] = ()  # numbers of the trials the forests were fitted to
        self.logged = np.zeros(0, dtype=bool)
        self.floor = np.zeros(0)
        self.models: list[ExtraTreesRegressor] = []
        self.excess: ExtraTreesRegressor | None = None

    def transform(self, points: np.ndarray) -> np.ndarray:
        """Minimized objective values on the scale the forests model (log where positive)."""
        out = np.array(points, dtype=float)
        out[:, self.logged] = np.log(np.maximum(out[:, self.logged], self.floor[self.logged]))
        return out

    def fit(self, trials: Sequence[FrozenTrial], directions) -> None:
        """Fit to the first multiple of ``refit`` (:data:`REFIT` by default) of ``trials``
        (completed ones), unless already fitted to those."""
        trials = sorted((t for t in trials  # a resumed study may hold options since restricted
                         if all(t.params.get(g) in o for g, o in self.options.items())),
                        key=lambda t: t.number)
        trials = trials[:len(trials) // self.refit * self.refit]
        # keyed by the trials themselves: with several workers, trials finish out of order
        numbers = tuple(t.number for t in trials)
        if not trials or numbers == self.fitted_on:
            return
        x = np.array([self.encode(t.params) for t in trials])
        y = minimized([t.values for t in trials], directions)
        self.logged = (y > 0).all(0)
        self.floor = y.min(0)  # log of a later non-positive value: clipped to the fitted range
        y = self.transform(y)
        forest = lambda: ExtraTreesRegressor(TREES, min_samples_leaf=2,  # noqa: E731
                                             random_state=self.seed)
        self.models = [forest().fit(x, y[:, k]) for k in range(y.shape[1])]
        excess = np.array([constraint_excess(t) for t in trials])
        self.excess = forest().fit(x, excess) if excess.any() else None
        names = sorted({k for t in trials for k in (t.constraints or {})}) \
            if self.signed and self.excess is not None else []
        self.limits = [forest().fit(x, np.array([float((t.constraints or {}).get(k, 0.0))
                                                 for t in trials])) for k in names]
        self.fitted_on = numbers

    @property
    def ready(self) -> bool:
        return bool(self.fitted_on)

    def predict(self, candidates: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
        """Predicted minimized objectives (on :meth:`transform`'s scale), one row per
        candidate, and the share of trees that predict a constraint excess (zeros without
        constraints)."""
        return self.predict_encoded(np.array([self.encode(c) for c in candidates]))

    def encode(self, params: Mapping[str, Any]) -> list[float]:
        """``params`` as the forests' input row (:func:`encode`)."""
        return encode(params, self.options, self.categorical)

    def tree_predictions(self, x: np.ndarray) -> np.ndarray:
        """Every tree's prediction of the modelled objectives for the encoded candidates ``x``:
        shape (objectives, trees, candidates), on :meth:`transform`'s scale."""
        x = np.ascontiguousarray(x, dtype=np.float32)  # the trees' own input type
        return np.stack([np.stack([tree.predict(x, check_input=False) for tree in m.estimators_])
                         for m in self.models])

    def breaking(self, x: np.ndarray) -> np.ndarray:
        """The share of the excess forest's trees that predict a constraint excess for each
        encoded candidate (zeros without constraints)."""
        if self.excess is None:
            return np.zeros(len(x))
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self.limits:  # a tree breaks the budgets where it predicts any value above 0
            over = np.stack([np.stack([tree.predict(x, check_input=False) > 0
                                       for tree in m.estimators_]) for m in self.limits])
            return over.any(0).mean(0)
        return np.mean([tree.predict(x, check_input=False) > 0
                        for tree in self.excess.estimators_], 0)

    def predict_encoded(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`predict` of candidates already encoded (one row each, :func:`encode`)."""
        points = np.stack([m.predict(x) for m in self.models], 1)
        if self.excess is None:
            return points, np.zeros(len(x))
        breaking = np.mean([tree.predict(x) > 0 for tree in self.excess.estimators_], 0)
        return points, breaking


def margin(points: np.ndarray, front: np.ndarray) -> np.ndarray:
    """How far each point lies beyond ``front`` (all minimized): min over front members f of
    max over objectives k of (f_k - p_k) / span_k, span_k the front's range in objective k.
    Positive: no member weakly dominates the point (the larger, the further beyond); zero or
    negative: some member does."""
    span = front.max(0) - front.min(0)
    span[span <= 0] = 1.0
    return ((front[None, :, :] - points[:, None, :]) / span).max(-1).min(-1)


def pick(surrogate: Surrogate, candidates: Sequence[Mapping[str, Any]],
         trials: Sequence[FrozenTrial], front: Sequence[FrozenTrial], directions) -> int:
    """Index of the candidate predicted furthest beyond ``front`` among those most trees
    predict within the constraints; if none is, the one fewest trees predict breaking them.
    0 (the first) while the surrogate cannot be fitted yet (fewer than :data:`REFIT` trials)
    or there is no front."""
    surrogate.fit(trials, directions)
    if not surrogate.ready or not front:
        return 0
    return int(np.argmax(scores(surrogate, *surrogate.predict(candidates), front, directions)))


def scores(surrogate: Surrogate, points: np.ndarray, breaking: np.ndarray,
           front: Sequence[FrozenTrial], directions) -> np.ndarray:
    """Each candidate's score from its predicted ``points`` and ``breaking`` share
    (:meth:`Surrogate.predict`): its margin beyond ``front`` if most trees predict it within the
    constraints, else ``-1e9`` less its breaking share (the larger, the better)."""
    ahead = margin(points, surrogate.transform(
        minimized([t.values for t in front], directions)))
    return np.where(breaking < 0.5, ahead, -1e9 - breaking)
