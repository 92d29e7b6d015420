"""``random``: uniform random sampling of the space (Optuna's RandomSampler)."""
import optuna

from nasopt.core.space import SearchSpace
from nasopt.core.strategy import Strategy


def _make(space: SearchSpace, seed: int) -> optuna.samplers.BaseSampler:
    return optuna.samplers.RandomSampler(seed=seed)


STRATEGY = Strategy("random", "uniform random sampling (baseline)", _make)
