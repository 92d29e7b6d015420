"""Contract tests run over every registered strategy, on the NAS-Bench-201 table (fast), plus the
selection rule of regularized evolution and the policy and reward of REINFORCE."""
from __future__ import annotations

import math

import numpy as np
import optuna
import pytest
from optuna.distributions import CategoricalDistribution
from optuna.study import StudyDirection

from nasopt_bench.strategies import random_search_best
from nasopt.core.errors import NasoptError
from nasopt.core.objectives import Constraint, get_objectives
from nasopt.core.pareto import crowding_distances, nondominated_ranks
from nasopt.search.loop import run_search
from nasopt.search.study import pareto_numbers
from nasopt.search.tabular import TabularEvaluator
from nasopt.spaces.nb201 import CIFAR10_SHAPE, EDGES, OPS, Nb201Space
from nasopt.strategies import STRATEGIES
from nasopt.strategies.evolution import POPULATION, tournament_winner
from nasopt.strategies.reinforce import ReinforceSampler, mnasnet_rewards

NAMES = list(STRATEGIES)
OBJECTIVES = {"single": ["accuracy"], "multi": ["accuracy", "params"]}
# few op multisets (params/MAC counting is the slow part), but several options on most genes
RESTRICT = {"e1_0": ["nor_conv_3x3", "skip_connect"], "e2_0": ["nor_conv_1x1", "avg_pool_3x3"],
            "e2_1": ["none", "nor_conv_3x3", "avg_pool_3x3"], "e3_2": ["nor_conv_3x3"]}
MAX, MIN = StudyDirection.MAXIMIZE, StudyDirection.MINIMIZE


@pytest.fixture(scope="module")
def space() -> Nb201Space:
    return Nb201Space(CIFAR10_SHAPE, 10).restrict(RESTRICT)


@pytest.fixture(scope="module")
def evaluator(space) -> TabularEvaluator:
    return TabularEvaluator(space)


def run(space, evaluator, name: str, seed: int, trials: int, objectives=("accuracy",),
        storage=None, study_name: str = "s") -> optuna.Study:
    objs = get_objectives(list(objectives))
    sampler = STRATEGIES[name].make_sampler(space, seed)
    study = optuna.create_study(storage=storage, study_name=study_name, sampler=sampler,
                                directions=[o.direction for o in objs], load_if_exists=True)
    run_search(study, space, evaluator, objs, trials, show_progress=False)
    return study


def params_of(study: optuna.Study) -> list[dict]:
    return [t.params for t in study.trials]


@pytest.mark.parametrize("kind", OBJECTIVES)
@pytest.mark.parametrize("name", NAMES)
def test_proposals_stay_inside_a_restricted_space(space, evaluator, name, kind):
    study = run(space, evaluator, name, seed=0, trials=POPULATION + 15,
                objectives=OBJECTIVES[kind])
    assert len(study.trials) == POPULATION + 15
    for t in study.trials:
        assert t.state == optuna.trial.TrialState.COMPLETE
        assert set(t.params) == set(EDGES)
        for gene, value in t.params.items():
            assert value in space.genes[gene], (name, t.number, gene, value)


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_reproduces_the_same_trials(space, evaluator, name):
    a, b, c = (run(space, evaluator, name, seed=s, trials=30) for s in (3, 3, 4))
    assert params_of(a) == params_of(b)
    assert params_of(a) != params_of(c)  # the seed is used


@pytest.mark.parametrize("name", NAMES)
def test_stopping_and_continuing_continues_the_study(space, evaluator, name):
    # the storage outlives the sampler, as an SQLite file outlives a process (the CLI test in
    # test_nb201.py does it with a file); in memory keeps this fast
    storage = optuna.storages.InMemoryStorage()
    first = params_of(run(space, evaluator, name, seed=1, trials=25, storage=storage))
    # a new process: a fresh sampler (seeded differently, as api.search does) on the same storage
    study = run(space, evaluator, name, seed=2, trials=40, storage=storage)
    assert [t.number for t in study.trials] == list(range(40))
    assert params_of(study)[:25] == first
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)


@pytest.mark.parametrize("name", NAMES)
def test_infeasible_archs_are_never_reported_as_winners(space, evaluator, name):
    objs = get_objectives(["accuracy", "params"])
    limit = 400_000  # params: excludes the most accurate archs of this sub-space
    study = optuna.create_study(directions=[o.direction for o in objs],
                                sampler=STRATEGIES[name].make_sampler(space, 0))
    run_search(study, space, evaluator, objs, 30, show_progress=False,
               constraints=[Constraint("params", limit)])
    feasible = {t.number for t in study.trials if t.user_attrs["metrics"]["params"] <= limit}
    assert feasible and len(feasible) < len(study.trials)
    front = pareto_numbers(study)
    assert front and front <= feasible


def test_evolution_mutates_the_population_rebuilt_from_the_study(space, evaluator):
    storage = optuna.storages.InMemoryStorage()
    run(space, evaluator, "evolution", seed=1, trials=POPULATION + 5, storage=storage)
    study = run(space, evaluator, "evolution", seed=2, trials=POPULATION + 25, storage=storage)
    trials = study.trials
    for t in trials[POPULATION:]:
        population = trials[t.number - POPULATION:t.number]
        distances = [sum(p.params[g] != t.params[g] for g in EDGES) for p in population]
        assert 1 in distances, (t.number, distances)  # a one-gene mutant of a member


def test_tournament_selection():
    # one objective: the best value wins, in either direction
    assert tournament_winner([[0.5], [0.9], [0.7]], [MAX]) == 1
    assert tournament_winner([[0.5], [0.9], [0.7]], [MIN]) == 0
    # accuracy up, size down: (0.8, 300) is dominated by (0.9, 200)
    points = [[0.8, 300.0], [0.9, 200.0], [0.7, 100.0], [0.85, 150.0]]
    minimized = [[-a, s] for a, s in points]
    assert nondominated_ranks(minimized).tolist() == [1, 0, 0, 0]
    crowd = crowding_distances([minimized[i] for i in (1, 2, 3)])
    assert crowd[0] == crowd[1] == math.inf and math.isfinite(crowd[2])
    assert tournament_winner(points, [MAX, MIN]) == 1  # rank 0, boundary, first drawn
    assert tournament_winner([points[0], points[3], points[1]], [MAX, MIN]) == 1
    # among the non-dominated, the middle point loses to a boundary point
    assert tournament_winner([[0.85, 150.0], [0.9, 200.0], [0.7, 100.0]], [MAX, MIN]) == 1


def test_tournament_prefers_feasible_contestants():
    values = [[0.95], [0.90], [0.80]]
    assert tournament_winner(values, [MAX], [5.0, 0.0, 0.0]) == 1  # the best is over budget
    assert tournament_winner(values, [MAX], [5.0, 2.0, 9.0]) == 1  # none feasible: least excess
    assert tournament_winner(values, [MAX], [0.0, 0.0, 0.0]) == 0
    multi = [[0.95, 900.0], [0.90, 300.0], [0.80, 200.0], [0.85, 250.0]]
    assert tournament_winner(multi, [MAX, MIN], [1.0, 0.0, 0.0, 0.0]) in (1, 2)


def test_evolution_with_a_budget_breeds_from_feasible_parents(space, evaluator):
    objs = get_objectives(["accuracy"])
    limit = 400_000  # params; about half of this sub-space is within it
    study = optuna.create_study(direction="maximize",
                                sampler=STRATEGIES["evolution"].make_sampler(space, 0))
    run_search(study, space, evaluator, objs, POPULATION + 40, show_progress=False,
               constraints=[Constraint("params", limit)])
    trials = study.trials
    late = [t.user_attrs["metrics"]["params"] <= limit for t in trials[-20:]]
    early = [t.user_attrs["metrics"]["params"] <= limit for t in trials[:POPULATION]]
    assert sum(late) / len(late) > sum(early) / len(early)


def test_mnasnet_reward():
    rewards = mnasnet_rewards([[0.9, 100.0], [0.8, 400.0], [0.85, 200.0]], [MAX, MIN])
    assert rewards == pytest.approx([0.9 * 0.5 ** -0.07, 0.8 * 2.0 ** -0.07, 0.85])
    with pytest.raises(NasoptError, match="needs a first objective where higher is better"):
        mnasnet_rewards([[100.0, 0.9]], [MIN, MAX])


def synthetic_study(n: int) -> optuna.Study:
    """``n`` uniformly drawn archs scoring 1 when e1_0 is nor_conv_3x3, else 0."""
    study = optuna.create_study(direction="maximize",
                                sampler=optuna.samplers.RandomSampler(seed=0))
    dist = CategoricalDistribution(OPS)
    for _ in range(n):
        trial = study.ask({e: dist for e in EDGES})
        study.tell(trial, float(trial.params["e1_0"] == "nor_conv_3x3"))
    return study


def test_reinforce_policy_is_rebuilt_from_the_study_and_learns():
    study = synthetic_study(60)
    space = {e: CategoricalDistribution(OPS) for e in EDGES}
    one = ReinforceSampler(seed=0).policy(study, space)
    other = ReinforceSampler(seed=99).policy(study, space)  # state comes from the study only
    for e in EDGES:
        assert one[e].tolist() == other[e].tolist()
        assert one[e].sum() == pytest.approx(1.0)
    good = one["e1_0"][OPS.index("nor_conv_3x3")]
    assert good > 0.5 and good == one["e1_0"].max()
    # genes that do not affect the reward only drift (by chance correlations in 60 draws)
    assert good > max(one[e].max() for e in EDGES[1:]) + 0.2
    fresh = ReinforceSampler(seed=0).policy(synthetic_study(0), space)
    assert all(p == pytest.approx(0.2) for e in EDGES for p in fresh[e])


def test_reinforce_refuses_a_minimized_first_objective(space, evaluator):
    with pytest.raises(NasoptError, match="needs a first objective where higher is better"):
        run(space, evaluator, "reinforce", seed=0, trials=3, objectives=("params", "accuracy"))


def test_exact_random_search_reference():
    # best of 2 draws from {1, 2, 3}: P(1) = 1/9, P(2) = 3/9, P(3) = 5/9
    mean, std = random_search_best(np.array([3.0, 1.0, 2.0]), 2)
    assert mean == pytest.approx(22 / 9)
    assert std == pytest.approx(math.sqrt((1 + 12 + 45) / 9 - (22 / 9) ** 2))
