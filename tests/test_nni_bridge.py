"""The NNI bridge (nasopt.strategies.nni_bridge): NNI 3.0's multi-trial strategies on our spaces, recorded in
our study. Runs on the NAS-Bench-201 table (fast). Skipped only when NNI is not installed AND the
environment does not set NASOPT_REQUIRE_NNI (CI sets it, so a broken install fails CI)."""
from __future__ import annotations

import importlib
import os

import optuna
import pytest
from optuna.study import StudyDirection

from nasopt.cli import main as cli
from nasopt.strategies import nni_bridge
from nasopt.core.errors import NasoptError
from nasopt.core.objectives import Constraint, get_objectives
from nasopt.search.tabular import TabularEvaluator
from nasopt.spaces.nb201 import CIFAR10_SHAPE, EDGES, OPS, Nb201Space
from nasopt.strategies import NNI_STRATEGIES

try:
    importlib.import_module("nni")
    HAVE_NNI = True
except ImportError:
    HAVE_NNI = False
needs_nni = pytest.mark.skipif(not HAVE_NNI and not os.environ.get("NASOPT_REQUIRE_NNI"),
                               reason="NNI is not installed (pip install -e '.[nni]'); set "
                                      "NASOPT_REQUIRE_NNI=1 to make this a failure")

NAMES = list(NNI_STRATEGIES)
# the restriction of tests/test_strategies.py: few op multisets (fast counting), several options
RESTRICT = {"e1_0": ["nor_conv_3x3", "skip_connect"], "e2_0": ["nor_conv_1x1", "avg_pool_3x3"],
            "e2_1": ["none", "nor_conv_3x3", "avg_pool_3x3"], "e3_2": ["nor_conv_3x3"]}
TRIALS = 24  # > the evolution population (20): some mutations; > 20: one PPO update of nni-rl


@pytest.fixture(scope="module")
def space() -> Nb201Space:
    return Nb201Space(CIFAR10_SHAPE, 10).restrict(RESTRICT)


@pytest.fixture(scope="module")
def evaluator(space) -> TabularEvaluator:
    return TabularEvaluator(space)


def run(space, evaluate, name: str, seed: int, trials: int, objectives=("accuracy",),
        storage=None, constraints=()) -> optuna.Study:
    objs = get_objectives(list(objectives))
    study = optuna.create_study(storage=storage, study_name="s", load_if_exists=True,
                                directions=[o.direction for o in objs])
    nni_bridge.run_nni_search(study, space, evaluate, objs, trials, name, seed,
                              show_progress=False, trial_attrs={"seed": seed},
                              constraints=constraints)
    return study


def params_of(study: optuna.Study) -> list[dict]:
    return [t.params for t in study.trials]


@needs_nni
def test_translated_space_has_exactly_the_genes_and_options(space):
    full = Nb201Space(CIFAR10_SHAPE, 10)
    assert nni_bridge.mutables(full) == {e: list(OPS) for e in EDGES}
    assert nni_bridge.mutables(space) == {g: list(o) for g, o in space.genes.items()}
    assert nni_bridge.mutables(space)["e2_1"] == ["none", "nor_conv_3x3", "avg_pool_3x3"]
    assert nni_bridge.mutables(space)["e3_2"] == ["nor_conv_3x3"]


@needs_nni
def test_translation_keeps_typed_options_of_a_joint_space(datasets):
    from nasopt import api
    conv = api.make_space("conv1d", datasets["mnist1d"], {"s1.k": ["3", "7"]})
    assert nni_bridge.mutables(conv) == {g: list(o) for g, o in conv.genes.items()}
    assert nni_bridge.mutables(conv)["s1.k"] == [3, 7]


@needs_nni
@pytest.mark.parametrize("name", NAMES)
def test_strategy_records_exactly_n_trials_inside_the_restricted_space(space, evaluator, name):
    study = run(space, evaluator, name, seed=0, trials=TRIALS, objectives=("accuracy", "params"))
    assert len(study.trials) == TRIALS
    for t in study.trials:
        assert t.state == optuna.trial.TrialState.COMPLETE
        assert t.user_attrs["strategy"] == name and t.user_attrs["seed"] == 0
        assert set(t.user_attrs["metrics"]) >= {"accuracy", "params", "compressed_bytes"}
        assert t.values == [t.user_attrs["metrics"]["accuracy"], t.user_attrs["metrics"]["params"]]
        assert set(t.params) == set(EDGES)
        for gene, value in t.params.items():
            assert value in space.genes[gene], (name, t.number, gene, value)


@needs_nni
@pytest.mark.parametrize("name", NAMES)
def test_same_seed_reproduces_and_a_rerun_continues_the_study(space, evaluator, name):
    assert params_of(run(space, evaluator, name, 3, 12)) == params_of(
        run(space, evaluator, name, 3, 12))
    storage = optuna.storages.InMemoryStorage()
    first = params_of(run(space, evaluator, name, seed=1, trials=12, storage=storage))
    again = run(space, evaluator, name, seed=2, trials=12, storage=storage)
    assert params_of(again) == first  # the budget is reached: nothing to do
    study = run(space, evaluator, name, seed=2, trials=20, storage=storage)
    assert [t.number for t in study.trials] == list(range(20))
    assert params_of(study)[:12] == first
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)


@needs_nni
def test_failed_evaluations_are_recorded_and_do_not_count(space, evaluator):
    def flaky(arch):  # the real table evaluator, except that archs with a skip on e1_0 fail
        if arch["e1_0"] == "skip_connect":
            raise RuntimeError("simulated evaluation failure")
        return evaluator(arch)

    study = run(space, flaky, "nni-random", seed=0, trials=10)
    states = [t.state for t in study.trials]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 10
    failed = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    assert failed and all("simulated" in t.user_attrs["error"] for t in failed)


@needs_nni
def test_constraints_are_recorded_like_every_other_strategy(space, evaluator):
    limit = 400_000
    study = run(space, evaluator, "nni-evolution", 0, 10, ("accuracy", "params"),
                constraints=[Constraint("params", limit)])
    for t in study.trials:
        excess = t.user_attrs["metrics"]["params"] - limit
        assert t.constraints == {"params": excess}
        assert t.user_attrs["feasible"] == (excess <= 0)


def test_scalar_reward():
    max_, min_ = StudyDirection.MAXIMIZE, StudyDirection.MINIMIZE
    assert nni_bridge.scalar_reward([0.9], [max_], [None], [[0.9]]) == 0.9
    assert nni_bridge.scalar_reward([5.0], [min_], [None], [[5.0]]) == -5.0
    # a cost at its budget leaves the accuracy; twice the budget costs 2 ** -0.07
    assert nni_bridge.scalar_reward([0.8, 100.0], [max_, min_], [None, 100.0], []) == 0.8
    assert nni_bridge.scalar_reward([0.8, 200.0], [max_, min_], [None, 100.0], []) == \
        pytest.approx(0.8 * 2 ** -0.07)
    # without a budget the target is the median cost seen so far
    history = [[0.5, 50.0], [0.6, 100.0], [0.8, 400.0]]
    assert nni_bridge.scalar_reward([0.8, 400.0], [max_, min_], [None, None], history) == \
        pytest.approx(0.8 * 4 ** -0.07)


def test_without_nni_the_cli_names_the_extra(tmp_path, capsys, monkeypatch):
    def no_nni(name: str):
        if name == "nni" or name.startswith("nni."):
            raise ImportError(f"No module named {name!r}")
        return importlib.import_module(name)

    monkeypatch.setattr(nni_bridge, "import_module", no_nni)
    code = cli.main(["search", "--space", "nb201", "--table", "--strategy", "nni-tpe",
                     "--trials", "3", "--quiet", "--run-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code != 0
    assert "pip install -e '.[nni]'" in err and "Traceback" not in err
    assert not (tmp_path / "studies.db").exists()  # checked before any work
    with pytest.raises(NasoptError, match=r"nasopt\[nni\]"):
        nni_bridge.run_nni_search(optuna.create_study(), None, None, [], 3, "nni-rl", 0)
