"""``tpe``: Optuna's (multi-objective) Tree-structured Parzen Estimator."""
import optuna

from nasopt.core.space import SearchSpace
from nasopt.core.strategy import Strategy


def _make(space: SearchSpace, seed: int) -> optuna.samplers.BaseSampler:
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=10, multivariate=True)


STRATEGY = Strategy("tpe", "Optuna TPE (multivariate), 10 random start-up trials", _make)
