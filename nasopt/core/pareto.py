"""Pareto dominance (strict and weak), non-dominated rank, non-dominated set and NSGA-II crowding.

The strategies (``evolution``, ``staged`` and its surrogate) and the benchmark harness take these
rules from here. Points are the rows of an (n, m) array, one column per objective, every
objective minimized; :func:`minimized` turns objective values and Optuna study directions into
that form. A point *dominates* another when it is no worse in every objective and better in at
least one; it *weakly dominates* it when it is no worse in every objective (so equal points
weakly dominate each other, and neither dominates the other). A comparison with NaN is false: a
point with a NaN objective neither dominates nor is dominated.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike
from optuna.study import StudyDirection


def minimized(values: ArrayLike, directions: Sequence[StudyDirection]) -> np.ndarray:
    """``values`` (one point, shape (m,), or points, shape (n, m)) as floats with every
    objective not minimized by its direction negated. An empty sequence gives shape (0, m)."""
    signs = np.array([1.0 if d == StudyDirection.MINIMIZE else -1.0 for d in directions])
    array = np.asarray(values, dtype=float)
    if array.size == 0 and array.ndim < 2:
        array = array.reshape(0, len(signs))
    return array * signs


def dominates(a: ArrayLike, b: ArrayLike) -> bool:
    """``a`` is no worse than ``b`` in every objective and better in at least one."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return bool((a <= b).all() and (a < b).any())


def weakly_dominates(a: ArrayLike, b: ArrayLike) -> bool:
    """``a`` is no worse than ``b`` in every objective (true for equal points)."""
    return bool((np.asarray(a, dtype=float) <= np.asarray(b, dtype=float)).all())


def _points(points: ArrayLike) -> np.ndarray:
    """``points`` as a float array of shape (n, m); an empty sequence: no points."""
    array = np.asarray(points, dtype=float)
    if array.size == 0 and array.ndim < 2:
        return array.reshape(0, 0)
    if array.ndim != 2:
        raise ValueError(f"points must have shape (n, m), not {array.shape}")
    return array


def _dominance(points: np.ndarray) -> np.ndarray:
    """(n, n) bool matrix: entry [j, i] is true when point j dominates point i."""
    le = (points[:, None, :] <= points[None, :, :]).all(-1)
    lt = (points[:, None, :] < points[None, :, :]).any(-1)
    return le & lt


def nondominated_mask(points: ArrayLike, unique: bool = False) -> np.ndarray:
    """Bool per point: no point dominates it. Equal points are all kept, or, with ``unique``,
    only the first of them (in the order of ``points``)."""
    array = _points(points)
    keep = ~_dominance(array).any(0)
    if unique:
        equal = (array[:, None, :] == array[None, :, :]).all(-1)
        keep &= ~np.tril(equal, -1).any(1)  # row i, columns j < i: an earlier equal point
    return keep


def weakly_dominated(points: ArrayLike, by: ArrayLike) -> np.ndarray:
    """Bool per point of ``points``: some point of ``by`` weakly dominates it (no worse in
    every objective, equal included)."""
    array, others = _points(points), _points(by)
    if not len(array) or not len(others):
        return np.zeros(len(array), dtype=bool)
    return (others[None, :, :] <= array[:, None, :]).all(-1).any(-1)


def nondominated_ranks(points: ArrayLike) -> np.ndarray:
    """Pareto rank of each point (int): 0 for the points no other point dominates, r + 1 for
    those no point left after removing ranks 0..r dominates. Equal points share a rank."""
    array = _points(points)
    dominance = _dominance(array)
    rank, left, r = np.full(len(array), -1), np.ones(len(array), dtype=bool), 0
    while left.any():
        current = left & ~(dominance & left[:, None]).any(0)
        rank[current], left, r = r, left & ~current, r + 1
    return rank


def crowding_distances(points: ArrayLike) -> np.ndarray:
    """NSGA-II crowding distance of each point among ``points`` (taken as one rank).

    With at most two points, every distance is infinite. Otherwise, per objective, the points
    are sorted by it (ties keep their order in ``points``), the first and last of that order
    get infinity, and each other point adds the gap between its two neighbours divided by the
    objective's range (nothing when the range is zero)."""
    array = _points(points)
    n = len(array)
    if n <= 2:
        return np.full(n, np.inf)
    distance = np.zeros(n)
    for k in range(array.shape[1]):
        order = np.argsort(array[:, k], kind="stable")
        span = array[order[-1], k] - array[order[0], k]
        distance[order[0]] = distance[order[-1]] = np.inf
        if span > 0:
            distance[order[1:-1]] += (array[order[2:], k] - array[order[:-2], k]) / span
    return distance


def ranks_and_crowding(points: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """:func:`nondominated_ranks` of the points and the :func:`crowding_distances` of each
    among the points of its own rank."""
    array = _points(points)
    rank = nondominated_ranks(array)
    crowd = np.zeros(len(array))
    for r in range(rank.max() + 1 if len(array) else 0):
        idx = np.flatnonzero(rank == r)
        crowd[idx] = crowding_distances(array[idx])
    return rank, crowd
