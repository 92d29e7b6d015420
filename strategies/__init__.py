"""Search strategies, one module per strategy. ``STRATEGIES`` maps a name to its Strategy."""
from __future__ import annotations

from nasopt.strategy import Strategy

from . import evolution, nsga2, random_search, reinforce, staged, tpe

STRATEGIES: dict[str, Strategy] = {m.STRATEGY.name: m.STRATEGY for m in (
    random_search, nsga2, tpe, evolution, reinforce, staged)}
