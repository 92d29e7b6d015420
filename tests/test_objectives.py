"""Objectives, budgets as constraints, the MnasNet reward and hypervolume."""
from __future__ import annotations

import optuna
import pytest

from nasopt import api
from nasopt.cli import main as cli
from nasopt.core.errors import NasoptError
from nasopt.core.metrics import Metrics
from nasopt.core.objectives import (
    get_constraints, get_objectives, hypervolume, mnasnet_reward, parse_quantity,
)
from nasopt.search.loop import run_search
from nasopt.search.study import is_feasible, load_study, open_storage, pareto_numbers


@pytest.mark.parametrize("text, value", [("4KB", 4096), ("4 kb", 4096), ("32KiB", 32768),
                                         ("8192", 8192), ("2M", 2e6), ("1.5k", 1500),
                                         ("1MB", 1048576)])
def test_parse_quantity(text, value):
    assert parse_quantity(text, "size") == value


@pytest.mark.parametrize("text", ["4 parsecs", "-3KB", "0", "KB", ""])
def test_bad_quantities_are_clear_errors(text):
    with pytest.raises(NasoptError, match="budget"):
        parse_quantity(text, "size")


def test_mnasnet_reward_matches_the_paper_formula():
    assert mnasnet_reward(0.9, 4096, 4096) == pytest.approx(0.9)
    assert mnasnet_reward(0.9, 8192, 4096) == pytest.approx(0.9 * 2 ** -0.07)
    assert mnasnet_reward(0.9, 2048, 4096) == pytest.approx(0.9 * 0.5 ** -0.07)
    [obj] = get_objectives(["mnasnet"], {"size": 4096})
    m = Metrics(accuracy=0.8, params=1, macs=1, float_bytes=4, compressed_bytes=8192)
    assert obj.direction == "maximize" and obj.value(m) == pytest.approx(0.8 * 2 ** -0.07)
    with pytest.raises(NasoptError, match="--max-size"):
        get_objectives(["mnasnet"])


def test_hypervolume_of_a_staircase():
    # (acc, size) with reference size 100: steps 0.5 wide at 0.5 ... computed by hand
    assert hypervolume([(0.5, 50), (0.8, 80)], 100) == pytest.approx(0.5 * 0.3 + 0.8 * 0.2)
    # a dominated point and a point beyond the reference add nothing
    assert hypervolume([(0.5, 50), (0.4, 60), (0.8, 80), (0.99, 150)], 100) == \
        pytest.approx(0.31)
    assert hypervolume([], 100) == 0.0


def test_infeasible_trials_are_never_on_the_front(tmp_path):
    space = api.SPACES["conv1d"]((1, 40), 10)
    # accuracy grows with size, so without the budget the largest models win
    def evaluate(arch):
        size = 1000 * int(arch["s1.width"])
        return Metrics(accuracy=size / 40000, params=1, macs=1, float_bytes=4,
                       compressed_bytes=size)
    study = optuna.create_study(directions=["maximize", "minimize"],
                                sampler=optuna.samplers.RandomSampler(seed=0))
    [budget] = get_constraints({"size": "16000"})
    run_search(study, space, evaluate, get_objectives(["accuracy", "size"]), trials=30,
               show_progress=False, constraints=[budget])
    front = pareto_numbers(study)
    assert front
    for t in study.trials:
        feasible = t.user_attrs["metrics"]["compressed_bytes"] <= 16000
        assert is_feasible(t) == feasible == t.user_attrs["feasible"]
        if t.number in front:
            assert feasible
    assert any(not is_feasible(t) for t in study.trials)


def test_constrained_search_on_digits_reports_only_feasible_winners(tmp_path, capsys):
    args = ["search", "--space", "mobilenet", "--dataset", "digits", "--quiet", "--run-dir",
            str(tmp_path), "--trials", "8", "--max-size", "3KB",
            "--set", "supernet.epochs=1", "--set", "supernet.warmup_epochs=1",
            *[a for s in (1, 2, 3) for a in ("--restrict", f"s{s}.k=3", "--restrict",
                                              f"s{s}.expand=2")]]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    study = load_study(open_storage(f"sqlite:///{tmp_path}/studies.db"), "mobilenet-digits")
    sizes = {t.number: t.user_attrs["metrics"]["compressed_bytes"] for t in study.trials}
    front = pareto_numbers(study)
    assert all(sizes[n] <= 3 * 1024 for n in front)
    if front:
        assert "Pareto front (budgets {'size': '3KB'})" in out
    else:
        assert "no completed trial meets the budgets" in out


def test_unknown_budget_is_a_clear_error():
    with pytest.raises(NasoptError, match="unknown budget"):
        get_constraints({"energy": "1mJ"})  # latency is a budget (hardware profiles), energy is not


def test_an_arch_proposed_twice_is_listed_once_on_the_front():
    study = optuna.create_study(directions=["maximize", "minimize"])
    dist = {"s1.k": optuna.distributions.CategoricalDistribution([3, 5])}
    for k, values in ((3, [0.9, 100.0]), (5, [0.8, 50.0]), (3, [0.9, 100.0])):
        study.add_trial(optuna.trial.create_trial(params={"s1.k": k}, distributions=dist,
                                                  values=values))
    assert pareto_numbers(study) == {0, 1}
