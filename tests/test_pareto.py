"""nasopt.core.pareto: dominance (strict and weak), non-dominated ranks, crowding distances and
the non-dominated mask, on hand-computed cases and against a brute-force reference."""
from __future__ import annotations

import math
import random

import pytest
from optuna.study import StudyDirection

from nasopt.core.pareto import (
    crowding_distances, dominates, minimized, nondominated_mask, nondominated_ranks,
    ranks_and_crowding, weakly_dominated, weakly_dominates,
)

MAX, MIN = StudyDirection.MAXIMIZE, StudyDirection.MINIMIZE
INF = math.inf


def test_minimized_negates_maximized_objectives():
    values = [[0.9, 100.0], [0.8, 50.0]]
    assert minimized(values, [MAX, MIN]).tolist() == [[-0.9, 100.0], [-0.8, 50.0]]
    assert minimized([0.9, 100.0], [MIN, MAX]).tolist() == [0.9, -100.0]
    assert minimized([], [MAX, MIN]).shape == (0, 2)
    assert minimized([[1, 2]], [MIN, MIN]).dtype == float


def test_strict_and_weak_dominance():
    assert not dominates([1, 2], [1, 2]) and weakly_dominates([1, 2], [1, 2])  # equal
    assert dominates([1, 2], [1, 3]) and weakly_dominates([1, 2], [1, 3])  # better in one
    assert dominates([0, 2], [1, 3]) and not dominates([1, 3], [0, 2])
    assert not dominates([1, 3], [2, 2]) and not weakly_dominates([1, 3], [2, 2])  # a trade-off
    assert not dominates([2, 2], [1, 3]) and not weakly_dominates([2, 2], [1, 3])
    # a comparison with NaN is false: such a point neither dominates nor is dominated
    assert not dominates([math.nan, 1], [2, 2]) and not weakly_dominates([math.nan, 1], [2, 2])
    assert not dominates([1, 1], [math.nan, 2]) and not weakly_dominates([1, 1], [math.nan, 2])


def test_ranks_peel_fronts_and_equal_points_share_one():
    #        A       B       C       D       E       F (= B)
    points = [[1, 5], [2, 3], [4, 1], [3, 4], [5, 5], [2, 3]]
    # D is dominated by B and F only, E by everything else, and D dominates E
    ranks = nondominated_ranks(points)
    assert ranks.tolist() == [0, 0, 0, 1, 2, 0] and ranks.dtype.kind == "i"
    assert nondominated_mask(points).tolist() == [True, True, True, False, False, True]
    # unique: of equal points only the first is kept
    assert nondominated_mask(points, unique=True).tolist() == [True, True, True, False, False,
                                                               False]
    assert nondominated_ranks([]).tolist() == [] and nondominated_mask([]).tolist() == []
    assert nondominated_ranks([[3.0]]).tolist() == [0]
    assert nondominated_ranks([[3.0], [1.0], [2.0], [1.0]]).tolist() == [2, 0, 1, 0]


def test_crowding_distances_by_hand():
    # three points: the middle one's gaps are (4 - 1) / 3 and (5 - 1) / 4
    assert crowding_distances([[1, 5], [2, 3], [4, 1]]).tolist() == [INF, 2.0, INF]
    # four points: (3 - 0) / 4 + (4 - 1) / 4 and (4 - 1) / 4 + (2 - 0) / 4
    assert crowding_distances([[0, 4], [1, 2], [3, 1], [4, 0]]).tolist() == [INF, 1.5, 1.25,
                                                                           INF]
    # an objective with no range adds nothing, though its first and last are boundaries
    assert crowding_distances([[1, 1], [2, 1], [3, 1]]).tolist() == [INF, 1.0, INF]
    # ties keep the order of the points: the first and last of equal points are boundaries
    assert crowding_distances([[1, 1]] * 4).tolist() == [INF, 0.0, 0.0, INF]
    # at most two points: all boundaries
    assert crowding_distances([[1, 2], [2, 1]]).tolist() == [INF, INF]
    assert crowding_distances([[1, 2]]).tolist() == [INF]
    assert crowding_distances([]).tolist() == []


def test_ranks_and_crowding_measures_crowding_within_each_rank():
    # rank 0: (1, 5), (2, 3), (4, 1); rank 1: (2, 6), (3, 4), (5, 2); interleaved
    points = [[2, 6], [1, 5], [3, 4], [2, 3], [5, 2], [4, 1]]
    rank, crowd = ranks_and_crowding(points)
    assert rank.tolist() == [1, 0, 1, 0, 1, 0]
    # each middle point: (5 - 2) / 3 + (6 - 2) / 4 in rank 1, (4 - 1) / 3 + (5 - 1) / 4 in rank 0
    assert crowd.tolist() == [INF, INF, 2.0, 2.0, INF, INF]
    # two points of rank 1 alone are boundaries, whatever the front's size
    rank, crowd = ranks_and_crowding([[0, 4], [1, 2], [3, 1], [4, 0], [5, 5], [4, 6]])
    assert rank.tolist() == [0, 0, 0, 0, 1, 1]
    assert crowd.tolist() == [INF, 1.5, 1.25, INF, INF, INF]
    rank, crowd = ranks_and_crowding([])
    assert rank.tolist() == [] and crowd.tolist() == []


def test_weakly_dominated_by_another_set():
    points = [[1, 2], [0, 5], [3, 3]]
    # (1, 2) by its equal, (3, 3) by (2, 2); nothing is as good as (0, 5) in the first
    assert weakly_dominated(points, [[1, 2], [2, 2]]).tolist() == [True, False, True]
    assert weakly_dominated(points, []).tolist() == [False] * 3
    assert weakly_dominated([], [[1, 2]]).tolist() == []


def test_points_must_be_a_matrix():
    with pytest.raises(ValueError, match="shape"):
        nondominated_ranks([1.0, 2.0])


# ---- brute-force reference ----------------------------------------------------------------
def _dominates(a: list[float], b: list[float]) -> bool:
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def reference_ranks(points: list[list[float]]) -> list[int]:
    """Rank as the length of the longest chain of dominating points above each point: 0 when
    nothing dominates it, else one more than the largest rank among its dominators."""
    ranks: dict[int, int] = {}

    def rank(i: int) -> int:
        if i not in ranks:
            above = [rank(j) for j in range(len(points)) if _dominates(points[j], points[i])]
            ranks[i] = 1 + max(above) if above else 0
        return ranks[i]

    return [rank(i) for i in range(len(points))]


def reference_crowding(points: list[list[float]], members: list[int]) -> dict[int, float]:
    """NSGA-II crowding distance of each of ``members`` among themselves, one point at a time."""
    if len(members) <= 2:
        return {i: INF for i in members}
    distance = {i: 0.0 for i in members}
    for k in range(len(points[0])):
        order = sorted(members, key=lambda i: (points[i][k], i))
        span = points[order[-1]][k] - points[order[0]][k]
        for pos, i in enumerate(order):
            if pos in (0, len(order) - 1):
                distance[i] = INF
            elif span > 0:
                distance[i] += (points[order[pos + 1]][k] - points[order[pos - 1]][k]) / span
    return distance


def random_points(rng: random.Random) -> list[list[float]]:
    n, m = rng.randint(0, 40), rng.randint(1, 4)
    if rng.random() < 0.5:  # a coarse grid: many ties and equal points
        return [[float(rng.randint(0, 4)) for _ in range(m)] for _ in range(n)]
    return [[rng.uniform(-1, 1) for _ in range(m)] for _ in range(n)]


def test_ranks_and_crowding_match_a_brute_force_reference():
    rng = random.Random(0)
    for _ in range(400):
        points = random_points(rng)
        rank, crowd = ranks_and_crowding(points)
        expected = reference_ranks(points)
        assert rank.tolist() == expected
        assert nondominated_ranks(points).tolist() == expected
        assert nondominated_mask(points).tolist() == [r == 0 for r in expected]
        for r in set(expected):
            members = [i for i, e in enumerate(expected) if e == r]
            reference = reference_crowding(points, members)
            assert [crowd[i] for i in members] == [reference[i] for i in members]
            assert crowding_distances([points[i] for i in members]).tolist() == \
                [reference[i] for i in members]


def test_unique_mask_of_sorted_points_is_a_two_objective_staircase():
    """Sorted by the second objective (then the first), the points ``unique`` keeps are those
    strictly better in the first objective than every point before them."""
    rng = random.Random(1)
    for _ in range(400):
        points = sorted(([float(rng.randint(0, 5)), float(rng.randint(0, 5))]
                         for _ in range(rng.randint(0, 20))), key=lambda p: (p[1], p[0]))
        best, expected = INF, []
        for first, _ in points:
            expected.append(first < best)
            best = min(best, first)
        assert nondominated_mask(points, unique=True).tolist() == expected


def test_weak_dominance_matches_a_brute_force_reference():
    rng = random.Random(2)
    for _ in range(200):
        m = rng.randint(1, 3)
        points = [[float(rng.randint(0, 3)) for _ in range(m)] for _ in range(rng.randint(0, 8))]
        by = [[float(rng.randint(0, 3)) for _ in range(m)] for _ in range(rng.randint(0, 8))]
        expected = [any(all(x <= y for x, y in zip(b, p)) for b in by) for p in points]
        assert weakly_dominated(points, by).tolist() == expected
        for a in points:
            for b in by:
                assert weakly_dominates(a, b) == all(x <= y for x, y in zip(a, b))
                assert dominates(a, b) == _dominates(a, b)
