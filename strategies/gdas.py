"""``gdas``: gradient search with hard Gumbel-softmax samples of every gene (GDAS / FBNet style,
annealed temperature, straight-through gradients) on the relaxed supernet; the top derived archs
are recorded as trials. See nasopt.gradient.search and nasopt.gradient.run."""
import optuna

from nasopt.core.errors import NasoptError
from nasopt.core.space import SearchSpace
from nasopt.core.strategy import Strategy


def _make(space: SearchSpace, seed: int) -> optuna.samplers.BaseSampler:
    raise NasoptError(f"{STRATEGY.name!r} is a gradient strategy, not a sampler: run it with "
                      f"nasopt search --strategy {STRATEGY.name} (nasopt.gradient.run)")


STRATEGY = Strategy("gdas", "gradient search with Gumbel-softmax samples (GDAS/FBNet, "
                    "annealed temperature; conv1d)", _make, kind="gradient")
