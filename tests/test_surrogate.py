"""Surrogate screening (strategies/surrogate.py): the margin beyond a front, the gene encoding,
forests that predict held-out archs, refits every REFIT trials, log scale for positive
objectives, predicted-infeasible candidates last, and `staged` with screening beating `staged`
without it at the same number of evaluations."""
from __future__ import annotations

import numpy as np
import optuna
from scipy.stats import spearmanr

from nasopt.core.objectives import get_constraints, get_objectives, hypervolume
from nasopt.search.loop import run_search
from nasopt.strategies import surrogate
from nasopt.strategies.staged import StagedSampler
from nasopt.strategies.surrogate import REFIT, Surrogate, encode, margin, pick
from test_staged import space, synthetic

OPTIONS = {"w": [8, 16, 32], "d": [1, 2, 3, 4, 5], "b": [4, 8]}


def trial(number: int, params: dict, values: list[float], excess: float | None = None
          ) -> optuna.trial.FrozenTrial:
    t = optuna.trial.create_trial(
        params=params, values=values,
        distributions={g: optuna.distributions.CategoricalDistribution(o)
                       for g, o in OPTIONS.items()},
        constraints=None if excess is None else {"width": excess})
    t.number = number
    return t


def all_archs() -> list[dict]:
    return [{"w": w, "d": d, "b": b} for w in OPTIONS["w"] for d in OPTIONS["d"]
            for b in OPTIONS["b"]]


def values(a: dict) -> list[float]:
    """accuracy (maximized) and bytes (minimized) of a made-up arch"""
    return [0.5 + 0.01 * a["w"] + 0.03 * a["d"] - (0.1 if a["b"] == 4 else 0.0),
            float(a["w"] * a["d"] * a["b"] * 10)]


def test_margin_is_the_distance_beyond_the_front_in_front_spans():
    front = np.array([[0.0, 1.0], [1.0, 0.0]])  # minimized, spans 1 and 1
    points = np.array([[0.5, 0.5], [1.0, 1.0], [2.0, 2.0], [-1.0, 0.5]])
    assert np.allclose(margin(points, front), [0.5, 0.0, -1.0, 1.0])
    # spans scale each objective: the second objective's range is 10
    assert np.allclose(margin(np.array([[0.5, 5.0]]), np.array([[0.0, 10.0], [1.0, 0.0]])),
                       [0.5])


def test_encode_is_the_option_position_scaled_to_one():
    assert encode({"w": 16, "d": 5, "b": 4}, OPTIONS) == [0.5, 1.0, 0.0]


def test_forests_rank_held_out_archs_and_refit_every_refit_trials():
    archs = all_archs()
    rng = np.random.RandomState(0)
    order = rng.permutation(len(archs))
    train, test = [archs[i] for i in order[:25]], [archs[i] for i in order[25:]]
    s = Surrogate(OPTIONS)
    directions = [optuna.study.StudyDirection.MAXIMIZE, optuna.study.StudyDirection.MINIMIZE]
    s.fit([trial(i, a, values(a)) for i, a in enumerate(train)], directions)
    assert s.fitted_on == tuple(range(25 // REFIT * REFIT)) and s.ready
    # bytes are positive: modelled on a log scale; -accuracy is not
    assert list(s.logged) == [False, True]
    points, _ = s.predict(test)
    truth = np.array([values(a) for a in test])
    assert spearmanr(points[:, 0], -truth[:, 0]).statistic > 0.8
    assert spearmanr(points[:, 1], np.log(truth[:, 1])).statistic > 0.8
    # more trials within the same multiple of REFIT: no refit; the first trials by number are
    # the ones fitted to, whatever order they come in
    models = s.models
    s.fit([trial(i, a, values(a)) for i, a in enumerate(train[:REFIT * 2 + 1])][::-1],
          directions)
    assert s.models is models
    # the next multiple: refitted
    s.fit([trial(i, a, values(a)) for i, a in enumerate(archs)], directions)
    assert s.models is not models and s.fitted_on == tuple(range(len(archs) // REFIT * REFIT))
    # not fitted yet: the first candidate
    assert pick(Surrogate(OPTIONS), test, [trial(0, train[0], values(train[0]))], [],
                directions) == 0


def test_candidates_predicted_infeasible_come_last():
    archs = all_archs()
    directions = [optuna.study.StudyDirection.MAXIMIZE, optuna.study.StudyDirection.MINIMIZE]
    # a width budget of 16: the excess grows with the width beyond it
    done = [trial(i, a, values(a), excess=max(0.0, a["w"] - 16.0)) for i, a in enumerate(archs)]
    s = Surrogate(OPTIONS)
    feasible = [t for t in done if t.constraints["width"] == 0]
    front = [feasible[0]]
    wide, narrow = {"w": 32, "d": 5, "b": 8}, {"w": 8, "d": 2, "b": 8}
    # the wide arch is far more accurate (beyond the front) but predicted to break the budget
    assert pick(s, [wide, narrow], done, front, directions) == 1
    assert s.excess is not None
    # without the budget the wide one is picked
    free = [trial(t.number, t.params, t.values) for t in done]
    assert pick(Surrogate(OPTIONS), [wide, narrow], free, front, directions) == 0


def test_screening_beats_no_screening_at_the_same_number_of_evaluations():
    sp = space()
    objs = get_objectives(["accuracy", "size"])
    hv = {}
    for screen in (1, surrogate.SCREEN):
        hv[screen] = []
        for seed in range(5):
            study = optuna.create_study(directions=[o.direction for o in objs],
                                        sampler=StagedSampler(sp, seed=seed, screen=screen))
            run_search(study, sp, synthetic, objs, 100, show_progress=False)
            points = [(t.values[0], t.values[1]) for t in study.best_trials]
            hv[screen].append(hypervolume(points, 20000))
    assert np.mean(hv[surrogate.SCREEN]) > np.mean(hv[1]), hv


def test_staged_screens_with_one_objective_three_objectives_and_a_budget():
    sp = space()
    for names, budget in ((["accuracy"], None), (["accuracy", "size", "macs"], None),
                          (["accuracy", "size"], 3000.0)):
        objs = get_objectives(names)
        sampler = StagedSampler(sp, seed=0)
        study = optuna.create_study(directions=[o.direction for o in objs], sampler=sampler)
        constraints = get_constraints({"size": budget}) if budget else ()
        run_search(study, sp, synthetic, objs, 60, show_progress=False,
                   constraints=constraints)
        done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        assert len(done) == 60 and sampler._surrogate is not None, names
        assert sampler._surrogate.ready and len(sampler._surrogate.models) == len(names)
        if budget:
            assert sampler._surrogate.excess is not None
            feasible = [t for t in done if t.values[1] <= budget]
            # the screen keeps proposing archs within the budget
            assert len(feasible) > len(done) / 2, len(feasible)
