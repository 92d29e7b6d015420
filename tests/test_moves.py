"""The gene moves the local searches share (``strategies/moves.py``)."""
import numpy as np

from nasopt.strategies import moves

CHOICES = {"w": [8, 16, 24, 32], "k": [3, 5, 7], "a.bits": [2, 4, 8, 32], "b.bits": [2, 4, 8, 32],
           "fixed": ["x"]}
PARENT = {"w": 16, "k": 5, "a.bits": 8, "b.bits": 2, "fixed": "x"}


def _changed(child):
    return {g for g in CHOICES if child[g] != PARENT[g]}


def test_shift_lowers_every_gene_one_option_where_it_can():
    child = dict(PARENT)
    moves.shift(child, ["a.bits", "b.bits"], CHOICES)
    assert child == {**PARENT, "a.bits": 4, "b.bits": 2}


def test_step_moves_one_or_two_distinct_genes_to_a_neighbouring_option():
    rng = np.random.RandomState(0)
    counts = set()
    for _ in range(200):
        child = dict(PARENT)
        moves.step(rng, child, list(CHOICES), CHOICES)
        changed = _changed(child)
        counts.add(len(changed))
        assert "fixed" not in changed
        for g in changed:
            assert abs(CHOICES[g].index(child[g]) - CHOICES[g].index(PARENT[g])) == 1
    assert counts == {1, 2}


def test_mutate_sets_genes_to_other_options_of_theirs():
    rng = np.random.RandomState(1)
    reached = set()
    for _ in range(300):
        child = dict(PARENT)
        moves.mutate(rng, child, ["w", "k", "fixed"], CHOICES)
        changed = _changed(child)
        assert changed <= {"w", "k"} and len(changed) <= 2  # a second draw may undo the first
        assert all(child[g] in CHOICES[g] for g in CHOICES)
        reached.add(child["w"])
    assert reached == set(CHOICES["w"])  # any option, not only neighbours


def test_cross_takes_genes_only_from_the_other_and_only_those_named():
    rng = np.random.RandomState(2)
    other = {"w": 32, "k": 7, "a.bits": 32, "b.bits": 32, "fixed": "x"}
    took = set()
    for _ in range(100):
        child = dict(PARENT)
        moves.cross(rng, child, other, ["w", "k"], CHOICES)
        for g in CHOICES:
            assert child[g] in (PARENT[g], other[g])
        assert child["a.bits"] == PARENT["a.bits"] and child["b.bits"] == PARENT["b.bits"]
        took |= _changed(child)
    assert took == {"w", "k"}


def test_the_same_seed_makes_the_same_moves():
    def run(seed):
        rng, child = np.random.RandomState(seed), dict(PARENT)
        for _ in range(20):
            moves.mutate(rng, child, ["w", "k"], CHOICES)
            moves.step(rng, child, ["a.bits", "b.bits"], CHOICES)
        return child
    assert run(3) == run(3)
