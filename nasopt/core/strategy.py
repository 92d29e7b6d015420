"""Strategy: how a search proposes architectures.

Every strategy is an Optuna sampler: Optuna's ``study.ask()`` / ``study.tell()`` are the ask/tell
of the search loop, and a sampler rebuilds whatever state it needs from the study's trials, so a
resumed search continues where it stopped. Sample-based strategies of our own implement
``optuna.samplers.BaseSampler`` the same way Optuna's own GA samplers do.
"""
from __future__ import annotations

import abc
import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.trial import FrozenTrial

from nasopt.core.errors import NasoptError
from nasopt.core.registry import Registry
from nasopt.core.space import SearchSpace
from nasopt.core.trials import completed_trials

SamplerFactory = Callable[[SearchSpace, int], optuna.samplers.BaseSampler]

#: the entry-point group under which installed packages offer strategies (a :class:`Strategy`
#: of kind "sampler": ``name = "module:STRATEGY"``)
ENTRY_POINTS = "nasopt.strategies"


@dataclass(frozen=True)
class Strategy:
    name: str
    description: str
    make_sampler: SamplerFactory  # (space, seed) -> sampler
    #: "sampler": proposes archs through ``make_sampler``; "gradient": optimizes architecture
    #: logits on the relaxed supernet (nasopt.gradient.run) and records its derived archs
    kind: str = "sampler"


class Strategies(Registry[Strategy]):
    """Every sampling strategy by name: the shipped ones, then the installed entry points of
    :data:`ENTRY_POINTS`."""

    def __init__(self, builtin: Mapping[str, Strategy]):
        super().__init__(builtin, ENTRY_POINTS)

    def load_installed(self, name: str, entry: EntryPoint) -> Strategy:
        try:
            strategy = entry.load()
        except Exception as exc:
            raise NasoptError(f"strategy {name!r}: importing {entry.value} (entry point of group "
                              f"{ENTRY_POINTS}) failed ({type(exc).__name__}: {exc}); reinstall "
                              f"the package that offers it") from None
        if not isinstance(strategy, Strategy) or strategy.kind != "sampler":
            raise NasoptError(f"strategy {name!r}: {entry.value} is not a nasopt Strategy of kind "
                              f"'sampler' (Strategy(name, description, make_sampler))")
        return strategy


class ProposalSampler(optuna.samplers.BaseSampler):
    """A sampler whose archs are chosen outside Optuna (a gradient search's derived archs, the
    models an NNI strategy samples): :meth:`arch_for` gives a trial's arch, and every gene of the
    trial is taken from it."""

    @abc.abstractmethod
    def arch_for(self, trial: FrozenTrial) -> Any:
        """The arch (gene -> value) that ``trial`` evaluates."""

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial
                                    ) -> dict[str, BaseDistribution]:
        return {}

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        return {}

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        return self.arch_for(trial)[param_name]


def attach_run_folder(sampler: optuna.samplers.BaseSampler | None, run_dir: str | Path,
                      study_name: str) -> optuna.samplers.BaseSampler | None:
    """Tell a sampler that keeps state on disk (it has ``use_run_folder``, e.g. REINFORCE's
    controller) the search's run folder; other samplers are returned unchanged."""
    if sampler is not None and hasattr(sampler, "use_run_folder"):
        sampler.use_run_folder(Path(run_dir), study_name)
    return sampler


class GeneSampler(optuna.samplers.BaseSampler):
    """Base of our own samplers: the arch genes (categorical parameters) are sampled together
    by :meth:`sample_relative`; anything else, and the first trials, fall back to seeded random
    sampling. Subclasses keep no state between calls that a study could not rebuild."""

    def __init__(self, seed: int | None = None):
        self._rng = np.random.RandomState(seed)
        self._random = optuna.samplers.RandomSampler(seed=seed)
        # the intersection of the completed trials' distributions, kept between asks
        self._space: tuple[int, set[int], dict[str, BaseDistribution] | None] | None = None

    def reseed_rng(self) -> None:
        self._rng.seed()
        self._random.reseed_rng()

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial
                                    ) -> dict[str, BaseDistribution]:
        """The categorical parameters every completed trial shares (Optuna's intersection
        search space), updated with the trials completed since the last ask."""
        if self._space is None or self._space[0] != study._study_id:
            self._space = (study._study_id, set(), None)
        _, seen, space = self._space
        for t in completed_trials(study):
            if t.number in seen:
                continue
            seen.add(t.number)
            space = (dict(t.distributions) if space is None else
                     {n: d for n, d in space.items() if t.distributions.get(n) == d})
        self._space = (study._study_id, seen, space)
        return {name: copy.deepcopy(dist) for name, dist in sorted((space or {}).items())
                if isinstance(dist, CategoricalDistribution)}

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        return self._random.sample_independent(study, trial, param_name, param_distribution)
