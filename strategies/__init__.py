"""Search strategies, one module per strategy. ``STRATEGIES`` maps a name to its Strategy (Optuna
samplers); ``GRADIENT_STRATEGIES`` holds the gradient strategies (kind "gradient", run by
nasopt.gradient.run, not samplers)."""
from __future__ import annotations

from nasopt.core.strategy import Strategy

from nasopt.strategies import (darts, evolution, gdas, nsga2, predictor, random_search, reinforce,
                               staged, tpe)

STRATEGIES: dict[str, Strategy] = {m.STRATEGY.name: m.STRATEGY for m in (
    random_search, nsga2, tpe, evolution, reinforce, staged, predictor)}
GRADIENT_STRATEGIES: dict[str, Strategy] = {m.STRATEGY.name: m.STRATEGY for m in (darts, gdas)}

from nasopt.strategies import nni  # noqa: E402  (after the samplers: it names no sampler)

#: NNI's multi-trial strategies through nasopt.strategies.nni_bridge (kind "nni"; optional extra nasopt[nni])
NNI_STRATEGIES: dict[str, Strategy] = nni.STRATEGIES
