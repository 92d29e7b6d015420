"""``nasopt bench budget``: its arguments are checked before any training, and a search's scores
(best feasible accuracy, hypervolume under the budget, feasible share) come from its trials."""
from __future__ import annotations

import argparse

import optuna
import pytest

from nasopt.core.errors import NasoptError
from nasopt.core.objectives import hypervolume
from nasopt_bench import budget


def args(**kw) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    budget.add_arguments(p)
    return p.parse_args([f"--{k.replace('_', '-')}={v}" for k, v in kw.items()])


def test_arguments_are_checked_first():
    names, budgets = budget._check(args(strategies="predictor,tpe", budgets="2KB,4KB"))
    assert names == ["predictor", "tpe"] and budgets == [("2KB", 2048.0), ("4KB", 4096.0)]
    with pytest.raises(NasoptError, match="unknown strategies"):
        budget._check(args(strategies="predictor,nope"))
    with pytest.raises(NasoptError, match="at least one budget"):
        budget._check(args(budgets=","))


def test_scores_count_only_feasible_trials():
    study = optuna.create_study(directions=["maximize", "minimize"])
    for acc, size in ((0.95, 5000.0), (0.90, 4000.0), (0.85, 2000.0)):
        study.add_trial(optuna.trial.create_trial(values=[acc, size]))
    best, hv, share = budget.scores(study, 4096.0)
    assert best == 0.90 and share == pytest.approx(2 / 3)
    assert hv == pytest.approx(hypervolume([(0.90, 4000.0), (0.85, 2000.0)], 4096.0))
