"""The ``predictor`` strategy (also covered by the contract tests of test_strategies.py, which run
every registered strategy): the NAS-Bench-201 table (architecture-only, categorical genes), the
conv1d joint space with a closed-form evaluator (no supernet), one or several objectives,
budgets, seeds, resuming, the refit schedule and the default strategy."""
from __future__ import annotations

import itertools

import optuna
import pytest

from nasopt.core.arch import Arch
from nasopt.core.config import SearchConfig
from nasopt.core.metrics import Metrics
from nasopt.core.objectives import Constraint, get_objectives
from nasopt.search.loop import run_search
from nasopt.search.study import is_feasible
from nasopt.search.tabular import TabularEvaluator
from nasopt.spaces.conv1d import Conv1dSpace
from nasopt.spaces.nb201 import CIFAR10_SHAPE, Nb201Space
from nasopt.strategies import STRATEGIES
from nasopt.strategies.predictor import INITIAL, PredictorSampler, fitted_count
from nasopt.strategies.surrogate import Surrogate, encode, unordered

# 2 x 2 x 3 x 5 x 5 x 1 = 300 cells (as tests/test_strategies.py)
RESTRICT = {"e1_0": ["nor_conv_3x3", "skip_connect"], "e2_0": ["nor_conv_1x1", "avg_pool_3x3"],
            "e2_1": ["none", "nor_conv_3x3", "avg_pool_3x3"], "e3_2": ["nor_conv_3x3"]}


@pytest.fixture(scope="module")
def nb201() -> tuple[Nb201Space, TabularEvaluator]:
    space = Nb201Space(CIFAR10_SHAPE, 10).restrict(RESTRICT)
    return space, TabularEvaluator(space)


def synthetic(arch: Arch) -> Metrics:
    """Accuracy grows with width and depth and drops with aggressive compression; size follows
    the widths and bits (as tests/test_staged.py)."""
    width = sum(int(arch[f"s{s}.width"]) * int(arch[f"s{s}.depth"]) for s in (1, 2, 3))
    bits = [int(v) for g, v in arch.items() if g.endswith(".bits")]
    penalty = sum(0.05 for b in bits if b <= 4) + 0.1 * float(arch["sparsity"])
    acc = min(1.0, width / 300) - penalty
    size = width * 20 * sum(bits) / len(bits) / 8 * (1 - float(arch["sparsity"]) / 2)
    return Metrics(accuracy=acc, params=width * 20, macs=width * 400, float_bytes=width * 80,
                   compressed_bytes=int(size), nonzero_params=width * 20)


def joint_run(seed: int, trials: int, budget: float | None = None,
              storage=None) -> optuna.Study:  # noqa: ANN001
    space = Conv1dSpace((1, 40), 10)
    objs = get_objectives(["accuracy", "size"])
    study = optuna.create_study(directions=[o.direction for o in objs], storage=storage,
                                study_name="joint", load_if_exists=True,
                                sampler=STRATEGIES["predictor"].make_sampler(space, seed))
    run_search(study, space, synthetic, objs, trials, show_progress=False,
               constraints=[Constraint("size", budget)] if budget else ())
    return study


def test_finds_the_best_cell_of_a_tabular_space(nb201):
    space, evaluator = nb201
    optimum = max(evaluator.accuracy(dict(zip(space.genes, v)))
                  for v in itertools.product(*space.genes.values()))
    objs = get_objectives(["accuracy"])
    for seed in range(2):
        study = optuna.create_study(direction="maximize",
                                    sampler=STRATEGIES["predictor"].make_sampler(space, seed))
        run_search(study, space, evaluator, objs, 60, show_progress=False)
        assert study.best_value == optimum, seed  # 60 of 300 cells
        keys = [tuple(sorted(t.params.items())) for t in study.trials]
        # after the random initial archs, never an arch evaluated before
        assert all(k not in keys[:i] for i, k in enumerate(keys) if i >= INITIAL)


def test_joint_space_several_objectives_reproducible_and_resumable():
    a, b, c = (joint_run(s, 60) for s in (5, 5, 6))
    params = lambda study: [t.params for t in study.trials]  # noqa: E731
    assert params(a) == params(b) and params(a) != params(c)
    storage = optuna.storages.InMemoryStorage()
    first = params(joint_run(1, 30, storage=storage))
    resumed = joint_run(2, 50, storage=storage)  # a fresh sampler on the same study
    assert params(resumed)[:30] == first and len(resumed.trials) == 50
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in resumed.trials)


def test_a_budget_is_honoured_and_its_best_feasible_model_sought():
    budget = 1500.0  # bytes of the synthetic size: excludes the most accurate archs
    study = joint_run(0, 120, budget)
    trials = study.trials
    feasible = [t for t in trials if is_feasible(t)]
    assert feasible and len(feasible) < len(trials)
    assert all(t.values[1] <= budget for t in feasible)
    early = sum(is_feasible(t) for t in trials[:INITIAL]) / INITIAL
    late = sum(is_feasible(t) for t in trials[-50:]) / 50
    assert late > early  # proposals move into the budget
    best = max(t.values[0] for t in feasible)
    random = joint_run_random(0, 120, budget)
    assert best > max(t.values[0] for t in random.trials if is_feasible(t))


def test_accurate_archs_over_the_budget_are_tried_at_fewer_bits():
    """The squeeze move: members of the front of the infeasible trials (accuracy against
    excess), every bit-width lowered to an option between the second lowest and its own."""
    from nasopt.search.study import constraint_excess
    space = Conv1dSpace((1, 40), 10)
    study = joint_run(0, 60, 1500.0)
    sampler = PredictorSampler(space, seed=1)
    choices = {n: list(o) for n, o in space.genes.items()}
    done = [t for t in study.trials if t.values is not None]
    sampler._state(study, choices)
    bits = [g for g in choices if g.endswith(".bits")]
    architecture = [g for g in space.genes if g not in space.compression_genes()]
    seen = {tuple(sorted(t.params.items())) for t in done}
    out = sampler._squeezed(bits, architecture, choices, seen, 20)
    assert out and len({tuple(sorted(c.items())) for c in out}) == len(out)
    over = [t for t in done if constraint_excess(t) > 0]
    front = [t for t in over if not any(
        o.values[0] >= t.values[0] and constraint_excess(o) <= constraint_excess(t)
        and (o.values[0], constraint_excess(o)) != (t.values[0], constraint_excess(t))
        for o in over)]
    for child in out:
        assert tuple(sorted(child.items())) not in seen
        parents = [t.params for t in front if all(
            choices[g].index(child[g]) <= choices[g].index(t.params[g]) and
            (choices[g].index(child[g]) >= 1 or t.params[g] == choices[g][0]) for g in bits)
            and sum(child[g] != t.params[g] for g in architecture) <= 2]
        assert parents, child  # a front member, at fewer (or as many) bits


def joint_run_random(seed: int, trials: int, budget: float) -> optuna.Study:
    space = Conv1dSpace((1, 40), 10)
    objs = get_objectives(["accuracy", "size"])
    study = optuna.create_study(directions=[o.direction for o in objs],
                                sampler=STRATEGIES["random"].make_sampler(space, seed))
    run_search(study, space, synthetic, objs, trials, show_progress=False,
               constraints=[Constraint("size", budget)])
    return study


def test_refits_on_a_schedule():
    assert [fitted_count(n) for n in (0, INITIAL - 1)] == [0, 0]
    assert fitted_count(INITIAL) == INITIAL
    counts = [fitted_count(n) for n in range(10_001)]
    assert all(a <= b for a, b in zip(counts, counts[1:]))  # a function of n, never backwards
    assert all(c <= n for n, c in enumerate(counts))
    assert 30 <= len(set(counts)) - 1 <= 80  # refits over a 10,000-trial search


def test_categorical_genes_are_one_hot_and_ordinal_genes_positions():
    options = {"op": ["none", "conv"], "width": [8, 16, 32]}
    assert unordered(options) == {"op"}
    assert encode({"op": "conv", "width": 16}, options, unordered(options)) == [0.0, 1.0, 0.5]
    assert encode({"op": "conv", "width": 16}, options) == [1.0, 0.5]
    assert Surrogate(options).categorical == frozenset()  # staged's surrogate is unchanged


def test_sampler_state_comes_from_the_study():
    space = Conv1dSpace((1, 40), 10)
    study = joint_run(3, 40)
    # a fresh sampler asked on the finished study proposes an arch not yet evaluated
    sampler = PredictorSampler(space, seed=9)
    study.sampler = sampler
    trial = study.ask()
    from nasopt.search.loop import suggest_arch
    arch = suggest_arch(trial, space)
    assert dict(arch) not in [t.params for t in study.trials[:-1]]


def test_predictor_is_the_default_strategy():
    assert SearchConfig().strategy == "predictor"
    assert "predictor" in STRATEGIES
