"""The incremental Pareto front the local searches draw parents from (``strategies/front.py``)."""
import random

import optuna
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from nasopt.core.pareto import minimized, nondominated_mask
from nasopt.strategies.front import IncrementalFront, front

DIRECTIONS = [StudyDirection.MAXIMIZE, StudyDirection.MINIMIZE]


def _trial(number, values, excess=0.0):
    trial = FrozenTrial(number=number, state=TrialState.COMPLETE, value=None, values=values,
                        datetime_start=None, datetime_complete=None, params={},
                        distributions={}, user_attrs={}, system_attrs={},
                        intermediate_values={}, trial_id=number)
    if excess is not None:
        trial.set_constraint("size", excess)
    return trial


def _batch(trials):
    """The rule written out over the whole set: feasible non-dominated, else least infeasible."""
    feasible = [t for t in trials if t.constraints["size"] <= 0]
    if not feasible:
        least = min(t.constraints["size"] for t in trials)
        return sorted((t for t in trials if t.constraints["size"] == least),
                      key=lambda t: t.number)
    keep = nondominated_mask(minimized([t.values for t in feasible], DIRECTIONS))
    return sorted((t for t, k in zip(feasible, keep) if k), key=lambda t: t.number)


def test_merging_in_any_order_and_chunks_gives_the_front_of_the_whole_set():
    rng = random.Random(0)
    for case in range(20):
        trials = [_trial(i, [rng.choice([0.5, 0.6, 0.7, 0.8, 0.9, rng.random()]),
                             rng.choice([100.0, 200.0, rng.random() * 1000])],
                         rng.choice([-1.0, 0.0, 0.0, 5.0, 10.0]))
                  for i in range(60)]
        want = [t.number for t in _batch(trials)]
        shuffled = trials[:]
        rng.shuffle(shuffled)
        merged = IncrementalFront(DIRECTIONS)
        start = 0
        while start < len(shuffled):
            step = rng.randint(1, 9)
            merged.merge(shuffled[start:start + step])
            merged.merge(shuffled[:start])  # merging a trial again changes nothing
            start += step
            assert [t.number for t in merged.members()] == \
                [t.number for t in _batch(shuffled[:start])], case
        assert [t.number for t in merged.members()] == want
        assert [t.number for t in front(trials, DIRECTIONS)] == want


def test_while_none_is_feasible_the_least_infeasible_then_the_feasible_front():
    merged = IncrementalFront(DIRECTIONS)
    merged.merge([_trial(0, [0.9, 10.0], 5.0), _trial(1, [0.5, 10.0], 2.0),
                  _trial(2, [0.7, 1.0], 2.0)])
    assert [t.number for t in merged.members()] == [1, 2]
    merged.merge([_trial(3, [0.1, 100.0], 0.0)])  # a poor feasible trial still replaces them
    assert [t.number for t in merged.members()] == [3]
    merged.merge([_trial(4, [0.95, 1.0], 9.0)])
    assert [t.number for t in merged.members()] == [3]


def test_equal_points_are_all_kept_and_a_study_gives_its_own_front():
    merged = IncrementalFront(DIRECTIONS)
    merged.merge([_trial(0, [0.9, 10.0]), _trial(1, [0.9, 10.0]), _trial(2, [0.8, 10.0])])
    assert [t.number for t in merged.members()] == [0, 1]
    study = optuna.create_study(directions=["maximize", "minimize"])
    for acc, size in [(0.5, 3.0), (0.7, 5.0), (0.6, 6.0), (0.9, 9.0)]:
        study.add_trial(optuna.trial.create_trial(values=[acc, size]))
    assert [t.number for t in front(study.trials, study.directions)] == [0, 1, 3]
