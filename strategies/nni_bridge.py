"""NNI bridge: NNI 3.0's multi-trial NAS strategies searching a nasopt space, recorded in our study.

Optional: needs the extra (``pip install -e '.[nni]'`` in the checkout; NNI pins old
dependencies and bundles a Node binary, so it is never a core import); :func:`import_nni` is the
one place NNI is imported.

How a search runs (``nasopt search --strategy nni-evolution ...``):

1. :func:`model_space` translates the (restricted) SearchSpace into an NNI ``ModelSpace`` with one
   ``nni.choice(gene, options)`` per gene, in the space's gene order, registered with
   ``add_mutable``; a frozen instance holds the sampled arch in ``.arch``. No network is built by
   NNI: our evaluator builds it (or reads the table).
2. NNI's in-process engine (``SequentialExecutionEngine``, the engine behind
   ``NasExperimentConfig('sequential', 'simplified')``) runs the strategy on a
   ``SimplifiedModelSpace`` with a ``FunctionalEvaluator``. Its function turns NNI's sample into
   a nasopt Arch, scores it with OUR evaluator (supernet :class:`~nasopt.search.evaluate.Evaluator`, or
   :class:`~nasopt.search.tabular.TabularEvaluator`) and records it as a trial of OUR Optuna study with
   :func:`nasopt.search.loop.measure_trial` (the same params and user attrs as every other strategy,
   plus ``strategy=nni-<name>``), then reports the scalar reward to NNI.
   The experiment wrapper ``NasExperiment`` is not used: it adds nothing in-process but writes
   experiment manifests and checkpoints under ``~/nni-experiments``.
3. The budget is exact: the engine accepts a new model only while the study has fewer than
   ``trials`` completed trials counting this call's (failed evaluations are recorded as FAIL and
   do not count, as in :func:`~nasopt.search.loop.run_search`; 20 failures in a row stop the search).
   Random and evolution run with ``dedup=False`` so that a small (restricted) space never ends
   the search early; TPE may propose an arch twice, like Optuna's.

Reward (NNI strategies optimize one scalar): for one objective, its value (negated when it is
minimized). For several objectives the MnasNet reward ``ACC * prod_j (cost_j / T_j) ** -0.07``
(:func:`nasopt.core.objectives.mnasnet_reward`): ACC is the first objective (it must be maximized),
T_j the budget on cost_j when one is given (``--max-size`` ...), else the median of cost_j over
the study's completed trials at the time of the report (so early and late rewards use slightly
different targets).

Seeds: Random, RegularizedEvolution and TPE take the seed; PolicyBasedRL (tianshou's PPO) draws
from torch's and numpy's global generators, which the bridge seeds for the run and restores
afterwards. Same seed, same study -> the same trials (tested). Resume: a re-run tops the study up
to ``trials``; the NNI strategy starts afresh (seeded with the trial count, as our samplers are)
and does not learn from the trials already there, which stay in the study and on its Pareto
front. One process per study: NNI's strategies do not share a study between workers.
"""
from __future__ import annotations

import contextlib
import io
import logging
import statistics
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from importlib import import_module
from types import SimpleNamespace
from typing import Any

import numpy as np
import optuna
import torch
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from nasopt.core.arch import Arch
from nasopt.core.errors import NasoptError
from nasopt.core.objectives import MNASNET_W, Constraint, Objective, mnasnet_reward
from nasopt.core.progress import progress_bar
from nasopt.search.loop import MAX_CONSECUTIVE_FAILURES, measure_trial
from nasopt.core.space import SearchSpace
from nasopt.core.strategy import ProposalSampler
from nasopt.search.study import completed

#: nasopt strategy name -> NNI strategy (nni.nas.strategy.*)
NNI_STRATEGIES = {"nni-random": "Random", "nni-tpe": "TPE",
                  "nni-evolution": "RegularizedEvolution", "nni-rl": "PolicyBasedRL"}
DESCRIPTIONS = {
    "nni-random": "NNI Random (nni.nas.strategy.Random) through the bridge; needs nasopt[nni]",
    "nni-tpe": "NNI TPE (hyperopt-style tuner) through the bridge; needs nasopt[nni]",
    "nni-evolution": "NNI RegularizedEvolution (population 20, sample 5, as ours) through the "
                     "bridge; needs nasopt[nni]",
    "nni-rl": "NNI PolicyBasedRL (tianshou PPO) through the bridge; needs nasopt[nni]",
}
#: evolution's population and tournament size: the same as our `evolution` strategy (NNI's
#: defaults, 100 and 25, would spend most of a 150-trial budget on the random population)
POPULATION, SAMPLE = 20, 5
INSTALL = "pip install -e '.[nni]' in the nasopt checkout"


def import_nni(importer: Callable[[str], Any] | None = None) -> SimpleNamespace:
    """The NNI modules the bridge uses (imported by ``importer``, default
    ``importlib.import_module``), or one NasoptError naming the extra to install."""
    importer = importer or import_module
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            # NNI warns about torch classes it does not know; gym (for PolicyBasedRL) prints a
            # deprecation banner on import; neither concerns the bridge
            warnings.simplefilter("ignore")
            return SimpleNamespace(
                nni=importer("nni"), mutable=importer("nni.mutable"),
                nn=importer("nni.nas.nn.pytorch"), evaluator=importer("nni.nas.evaluator"),
                execution=importer("nni.nas.execution"), space=importer("nni.nas.space"),
                strategy=importer("nni.nas.strategy"))
    except ImportError as exc:
        raise NasoptError(f"the NNI strategies need the optional extra nasopt[nni]: {INSTALL} "
                          f"(import failed: {exc})") from None


def model_space(space: SearchSpace, nni: SimpleNamespace | None = None) -> Any:
    """An NNI ModelSpace with one ``nni.choice`` per gene of ``space`` (restricted options only)."""
    nni = nni or import_nni()

    class GeneSpace(nni.nn.ModelSpace):
        """The genes as NNI mutables; a frozen instance's ``arch`` is the sampled arch."""

        def __init__(self, genes: Mapping[str, Sequence[Any]]):
            super().__init__()
            self.arch = {g: nni.mutable.ensure_frozen(self.add_mutable(nni.nni.choice(g, list(o))))
                         for g, o in genes.items()}

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise NasoptError("the NNI bridge's model space is not a network; nasopt's "
                              "evaluator builds and scores the arch")

    return GeneSpace({g: list(o) for g, o in space.genes.items()})


def mutables(space: SearchSpace, nni: SimpleNamespace | None = None) -> dict[str, list]:
    """Label -> options of the translated model space, as NNI sees them (for checks and tests)."""
    return {label: list(m.values) for label, m in model_space(space, nni).simplify().items()}


def scalar_reward(values: Sequence[float], directions: Sequence[StudyDirection],
                  targets: Sequence[float | None], history: Sequence[Sequence[float]]) -> float:
    """The scalar NNI optimizes (see the module doc). ``targets[j]`` is cost j's budget or None;
    ``history`` the objective values of the study's completed trials, this one included."""
    if len(values) == 1:
        return values[0] if directions[0] == StudyDirection.MAXIMIZE else -values[0]
    reward = values[0]
    if reward < 0:
        raise NasoptError(f"the NNI strategies' reward is ACC * (cost / target) ** -0.07, which "
                          f"needs the first objective at 0 or more, but a trial scored {reward:g}"
                          f"; use evolution, nsga2, tpe, staged or random for this metric")
    for j in range(1, len(values)):
        target = targets[j] if targets[j] is not None else statistics.median(
            h[j] for h in history)
        cost, target = max(values[j], 1e-12), max(target, 1e-12)
        if directions[j] == StudyDirection.MAXIMIZE:
            cost, target = target, cost  # a maximized objective counts inverted
        reward = mnasnet_reward(reward, cost, target, MNASNET_W)
    return float(reward)


class _Proposal(ProposalSampler):
    """Proposes the arch NNI chose (set before each ``study.ask()``)."""

    def __init__(self) -> None:
        self.arch: Arch | None = None

    def arch_for(self, trial: FrozenTrial) -> Arch:
        assert self.arch is not None
        return self.arch


def make_strategy(name: str, seed: int, nni: SimpleNamespace) -> Any:
    """The NNI strategy for a nasopt name (``nni-random`` ...), seeded where NNI takes a seed."""
    if name not in NNI_STRATEGIES:
        raise NasoptError(f"unknown NNI strategy {name!r}; known: {', '.join(NNI_STRATEGIES)}")
    s = nni.strategy
    if name == "nni-random":
        return s.Random(seed=seed, dedup=False)
    if name == "nni-evolution":
        return s.RegularizedEvolution(population_size=POPULATION, sample_size=SAMPLE, seed=seed,
                                      dedup=False)
    if name == "nni-tpe":
        return _sequential_tpe(s)(seed=seed)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            return s.PolicyBasedRL()  # NNI's defaults: 20 samples per PPO update
    except ImportError as exc:  # tianshou or gym missing
        raise NasoptError(f"nni-rl needs tianshou and gym, part of the extra nasopt[nni]: "
                          f"{INSTALL} ({exc})") from None


def _sequential_tpe(s: Any) -> type:
    """NNI's TPE strategy, minus its one-second poll per model: its loop is written for
    asynchronous training services; in the sequential engine ``submit_models`` returns after
    the model is trained and its metric reported, so the wait only costs time (150 s per 150
    trials). Same tuner, same calls, same order."""

    class SequentialTPE(s.TPE):
        def _run(self) -> None:
            space = {label: m.as_legacy_dict() for label, m in self.model_space.simplify().items()}
            self.tuner.update_search_space(space)
            while self.engine.budget_available():
                with self._thread_lock:
                    param = self.tuner.generate_parameters(self._model_count)
                    model = self.model_space.freeze(param)
                    self._model_to_id[model] = self._model_count
                    self._model_count += 1
                self.engine.submit_models(model)

    return SequentialTPE


def run_nni_search(study: optuna.Study, space: SearchSpace, evaluate: Callable[[Arch], Any],
                   objectives: Sequence[Objective], trials: int, strategy: str, seed: int,
                   timeout: float | None = None, show_progress: bool = True,
                   trial_attrs: Mapping[str, Any] | None = None,
                   constraints: Sequence[Constraint] = (),
                   importer: Callable[[str], Any] | None = None) -> int:
    """Run NNI strategy ``strategy`` until ``study`` holds ``trials`` completed trials (or
    ``timeout`` seconds pass); every evaluation is recorded in ``study``. Returns the number of
    trials this call added."""
    nni = import_nni(importer)
    if len(study.directions) > 1 and study.directions[0] != StudyDirection.MAXIMIZE:
        raise NasoptError("the NNI strategies' reward with several objectives is ACC * (cost / "
                          "target) ** -0.07: it needs a first objective where higher is better "
                          "(accuracy, f1, balanced_accuracy); with mae or rmse use evolution, nsga2, tpe, staged or random")
    remaining = trials - len(completed(study))
    if remaining <= 0:
        return 0
    limits = {c.name: c.limit for c in constraints}
    targets = [limits.get(o.name) for o in objectives]
    history = [list(t.values) for t in completed(study)]
    proposal = _Proposal()
    state = SimpleNamespace(done=0, failures=[], added=0)
    bar = progress_bar(total=remaining, desc=f"search {study.study_name}", unit="trial",
                       enabled=show_progress)
    attrs = {**(trial_attrs or {}), "strategy": strategy}
    start = time.monotonic()

    def evaluate_sample(model: Any) -> None:
        """NNI's FunctionalEvaluator function: score the sampled arch, record it, report."""
        proposal.arch = space.validate(model.arch)
        trial = study.ask()
        state.added += 1
        try:
            values = measure_trial(trial, space, evaluate, objectives, attrs, constraints)
        except Exception as exc:
            trial.set_user_attr("error", f"{type(exc).__name__}: {exc}"[:1000])
            study.tell(trial, state=TrialState.FAIL)
            state.failures.append(f"{type(exc).__name__}: {exc}")
            raise  # NNI records the model as failed and goes on (continue_on_failure)
        study.tell(trial, values)
        state.done += 1
        state.failures.clear()
        bar.update(1)
        history.append(values)
        nni.nni.report_final_result(scalar_reward(values, study.directions, targets, history))

    class Engine(nni.execution.SequentialExecutionEngine):
        """The in-process engine with nasopt's budget: completed trials, failures, timeout."""

        def budget_available(self) -> bool:
            return (state.done < remaining
                    and len(state.failures) < MAX_CONSECUTIVE_FAILURES
                    and (timeout is None or time.monotonic() - start < timeout))

    exec_space = nni.space.SimplifiedModelSpace.from_model(
        model_space(space, nni), nni.evaluator.FunctionalEvaluator(evaluate_sample))
    engine = Engine(continue_on_failure=True)
    nni_strategy = make_strategy(strategy, seed, nni)
    sampler, study.sampler = study.sampler, proposal
    logger = logging.getLogger("nni")
    level = logger.level
    logger.setLevel(logging.CRITICAL)  # NNI logs every model at INFO, failures with tracebacks
    np_state = np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # PolicyBasedRL's policy and sampling
            np.random.seed(seed % 2 ** 32)  # tianshou's replay-buffer sampling
            nni_strategy.initialize(exec_space, engine)
            nni_strategy.run()
    finally:
        np.random.set_state(np_state)
        logger.setLevel(level)
        study.sampler = sampler
        bar.close()
    if len(state.failures) >= MAX_CONSECUTIVE_FAILURES:
        raise NasoptError(f"stopped after {len(state.failures)} failed trials in a row; the last "
                          f"one: {state.failures[-1][:300]}")
    return state.added
