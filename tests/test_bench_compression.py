"""The front arithmetic of `nasopt bench compression`: Pareto fronts, the share of a baseline's
front that the joint front weakly dominates, and the points it misses (with the joint front's
best accuracy at that size)."""
from __future__ import annotations

from nasopt.bench.compression import best_under, dominated_share, misses, pareto


def test_pareto_dominated_share_and_misses():
    joint = pareto([(0.90, 1000, "a"), (0.95, 3000, "b"), (0.85, 2000, "dominated"),
                    (0.97, 6000, "c")])
    assert [label for *_, label in joint] == ["a", "b", "c"]
    int8 = [(0.80, 900, "too small"), (0.90, 1200, "tie"), (0.96, 4000, "better"),
            (0.97, 7000, "same acc, larger")]
    # (0.90, 1200) is weakly dominated by (0.90, 1000); (0.97, 7000) by (0.97, 6000)
    assert dominated_share(joint, int8) == 0.5
    assert misses(joint, int8) == [(0.80, 900, None), (0.96, 4000, 0.95)]
    assert best_under(joint, 2) == 0.90 and best_under(joint, 0.5) is None
    assert dominated_share(joint, []) == 0.0
