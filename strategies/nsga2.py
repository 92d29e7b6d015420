"""``nsga2``: Optuna's NSGA-II genetic algorithm (Pareto rank + crowding distance)."""
import optuna

from nasopt.core.space import SearchSpace
from nasopt.core.strategy import Strategy

POPULATION = 16  # small populations suit the tens-to-hundreds of trials a supernet search runs


def _make(space: SearchSpace, seed: int) -> optuna.samplers.BaseSampler:
    return optuna.samplers.NSGAIISampler(population_size=POPULATION, seed=seed)


STRATEGY = Strategy("nsga2", f"Optuna NSGA-II, population {POPULATION}", _make)
