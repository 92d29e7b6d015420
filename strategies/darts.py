"""``darts``: DARTS-style gradient search on the relaxed supernet (softmax mixture of every gene's
options, first-order alternation, expected packed size as a differentiable cost); the top
derived archs are recorded as trials. See nasopt.gradient.search and nasopt.gradient.run."""
import optuna

from nasopt.core.errors import NasoptError
from nasopt.core.space import SearchSpace
from nasopt.core.strategy import Strategy


def _make(space: SearchSpace, seed: int) -> optuna.samplers.BaseSampler:
    raise NasoptError(f"{STRATEGY.name!r} is a gradient strategy, not a sampler: run it with "
                      f"nasopt search --strategy {STRATEGY.name} (nasopt.gradient.run)")


STRATEGY = Strategy("darts", "gradient search on the relaxed supernet (softmax mixture, "
                    "expected size cost; conv1d)", _make, kind="gradient")
