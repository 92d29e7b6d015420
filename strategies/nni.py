"""``nni-random``, ``nni-tpe``, ``nni-evolution``, ``nni-rl``: NNI 3.0's multi-trial strategies
(Random, TPE, RegularizedEvolution, PolicyBasedRL) searching our spaces through
:mod:`nasopt.strategies.nni_bridge`, recorded in the same study. Kind "nni": not Optuna samplers, and only
usable with the optional extra ``pip install 'nasopt[nni]'``."""
import optuna

from nasopt.core.errors import NasoptError
from nasopt.strategies.nni_bridge import DESCRIPTIONS, NNI_STRATEGIES
from nasopt.core.space import SearchSpace
from nasopt.core.strategy import Strategy


def _make(space: SearchSpace, seed: int) -> optuna.samplers.BaseSampler:
    raise NasoptError("the NNI strategies are not Optuna samplers: run them with nasopt search "
                      "--strategy nni-... (nasopt.strategies.nni_bridge.run_nni_search)")


STRATEGIES: dict[str, Strategy] = {name: Strategy(name, DESCRIPTIONS[name], _make, kind="nni")
                                   for name in NNI_STRATEGIES}
