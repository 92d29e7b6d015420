"""Strategy: how a search proposes architectures.

Every strategy is an Optuna sampler: Optuna's ``study.ask()`` / ``study.tell()`` are the ask/tell
of the search loop, and a sampler rebuilds whatever state it needs from the study's trials, so a
resumed search continues where it stopped. Sample-based strategies of our own implement
``optuna.samplers.BaseSampler`` the same way Optuna's own GA samplers do.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import optuna

from .space import SearchSpace

SamplerFactory = Callable[[SearchSpace, int], optuna.samplers.BaseSampler]


@dataclass(frozen=True)
class Strategy:
    name: str
    description: str
    make_sampler: SamplerFactory  # (space, seed) -> sampler
