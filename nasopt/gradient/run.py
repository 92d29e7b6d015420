"""Gradient strategies (``darts``, ``gdas``) inside a nasopt search.

Gradient search is not an Optuna sampler: it optimizes architecture logits on a relaxed copy of
the trained supernet (:mod:`nasopt.gradient.relaxation`, :func:`nasopt.gradient.search.gradient_search`), then
the top derived archs are scored by the *same* Evaluator as every other strategy and recorded as
ordinary trials of the study (params = genes, user attr ``strategy`` = darts / gdas), so they
land on the same Pareto front. The supernet checkpoint is never written: the relaxation
fine-tunes a private copy of its weights, and derived archs are scored with the supernet's own
weights, like every trial.

Cost: with a size budget (``--max-size``) the budget is the target of the expected packed size
(Lagrangian rule, :mod:`nasopt.gradient.search`); without one, if ``size`` is an objective, the cost is
``DEFAULT_LAM * log E[size]``; otherwise accuracy alone. A latency budget (``--max-latency``,
with a profile whose latency is ``predicted``) adds the expected latency under the look-up table
(:meth:`nasopt.hardware.lut.LatencyTable.expected_latency`) as a further Lagrangian term, an SRAM budget
(``--max-sram``) the expected peak activation memory at the profile's data type
(:class:`nasopt.hardware.memory.ExpectedPeak`). Params and MACs budgets have no differentiable form
here: the evaluator checks them (and every other budget) on every derived arch, as for any
strategy.

Resume: the search's result (final logits and trajectory) is saved in
``run_dir/gradient/<study>/<variant>-<key>.json`` (key = hash of the settings, the supernet and
the seed) with its CSV and PNG; a re-run with the same settings reuses it instead of searching
again, derives the same archs, and records only those the study does not hold yet.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from nasopt.core.arch import Arch
from nasopt.core.config import GradientConfig
from nasopt.core.errors import NasoptError
from nasopt.gradient.search import (
    GradientResult, gradient_search, load_trajectory, plot_trajectory, save_trajectory,
)
from nasopt.core.objectives import Constraint, Objective
from nasopt.gradient.relaxation import relax
from nasopt.search.loop import Evaluate, run_search
from nasopt.core.space import SearchSpace
from nasopt.core.strategy import ProposalSampler
from nasopt.search.study import completed
from nasopt.supernet.elastic import Supernet

#: cost weight of ``lam * log E[size]`` when size is an objective without a budget
DEFAULT_LAM = 0.5


class DerivedSampler(ProposalSampler):
    """Proposes a fixed list of archs, one per trial, in order (the derived archs), skipping
    those another worker's trial already holds (several workers derive the same list)."""

    def __init__(self, archs: Sequence[Arch]):
        self._archs = list(archs)
        self._given: dict[int, Arch] = {}

    def sample_independent(self, study, trial, param_name, param_distribution):  # noqa: ANN001, ANN201
        if trial._trial_id not in self._given:
            held = {Arch(t.params).key for t in study.get_trials(
                deepcopy=False, states=(TrialState.RUNNING, TrialState.COMPLETE))
                if t._trial_id != trial._trial_id}
            while self._archs and self._archs[0].key in held:
                self._archs.pop(0)
        return super().sample_independent(study, trial, param_name, param_distribution)

    def arch_for(self, trial: FrozenTrial) -> Arch:
        if trial._trial_id not in self._given:
            if not self._archs:
                raise NasoptError("no derived arch left to propose")
            self._given[trial._trial_id] = self._archs.pop(0)
        return self._given[trial._trial_id]


def settings_key(variant: str, settings: GradientConfig, supernet_path: Path | str,
                 space: SearchSpace, lam: float | None, target: float | None, seed: int,
                 targets: Mapping[str, float] | None = None) -> str:
    payload = {"variant": variant, "settings": asdict(settings),
               "supernet": Path(supernet_path).name, "space": space.describe(),
               "lam": lam, "target": target, "seed": seed}
    if targets:  # only then: keys of earlier results without further budgets stay valid
        payload["targets"] = dict(targets)
    payload = json.dumps(payload, sort_keys=True, default=list)
    return hashlib.sha1(payload.encode()).hexdigest()[:12]


def cost_rule(objectives: Sequence[Objective], constraints: Sequence[Constraint],
              lam: float | None = None) -> tuple[float | None, float | None]:
    """(lam, target) of the size cost: the size budget as target (``lam``, if given, is the
    multiplier's start), else ``lam`` (DEFAULT_LAM when not given) when size is an objective,
    else neither."""
    for c in constraints:
        if c.name == "size":
            return lam, float(c.limit)
    if any(o.name == "size" for o in objectives):
        return (DEFAULT_LAM if lam is None else lam), None
    return None, None


def further_targets(constraints: Sequence[Constraint], latency_table: Any = None,
                    sram_dtype: str | None = None) -> dict[str, float]:
    """The budgets besides size that become Lagrangian terms: latency (ms), which needs the
    look-up table (a profile whose latency is measured per arch has no differentiable form),
    and SRAM (bytes), which needs the profile's data type."""
    out = {}
    for c in constraints:
        if c.name == "sram":
            if sram_dtype is None:
                raise NasoptError("gradient search under an SRAM budget needs a hardware "
                                  "profile that counts SRAM (e.g. --hardware mcu)")
            out["sram"] = float(c.limit)
        if c.name == "latency":
            if latency_table is None:
                raise NasoptError("gradient search under a latency budget needs predicted "
                                  "latency: use a profile with metrics.latency = \"predicted\" "
                                  "(e.g. --hardware cpu-ort), or a sampling strategy")
            out["latency"] = float(c.limit)
    return out


def run_gradient(study: optuna.Study, space: SearchSpace, supernet: Supernet,
                 supernet_path: Path, data: Any, evaluate: Evaluate,
                 objectives: Sequence[Objective], constraints: Sequence[Constraint], *,
                 variant: str, trials: int, seed: int, run_dir: str | Path,
                 timeout: float | None = None, show_progress: bool = True,
                 settings: GradientConfig = GradientConfig(), latency_table: Any = None,
                 sram_dtype: str | None = None,
                 log: Callable[[str], None] = lambda s: None) -> int:
    """Search by gradient (or reuse the saved result), then record derived archs until the
    study holds ``trials`` completed trials. Returns the number of trials run by this call."""
    remaining = trials - len(completed(study))
    if remaining <= 0:
        return 0
    lam, target = cost_rule(objectives, constraints, settings.lam)
    targets = further_targets(constraints, latency_table, sram_dtype)
    key = settings_key(variant, settings, supernet_path, space, lam, target, seed, targets)
    folder = Path(run_dir) / "gradient" / study.study_name
    stem = f"{variant}-{key}"
    saved = folder / f"{stem}.json"
    relaxation = relax(space, supernet, latency=latency_table,
                       sram_dtype=sram_dtype if "sram" in targets else None)
    if saved.exists():
        result = load_trajectory(saved)
        log(f"reusing the {variant} search result {saved}")
    else:
        log(f"{variant} search: {settings.epochs} epochs on the relaxed supernet, cost "
            + (f"target {target:.0f} B" if target is not None else
               f"lam {lam} * log E[size]" if lam is not None else "none")
            + "".join(f", {name} target {limit:.4g}" for name, limit in targets.items()))
        result = gradient_search(relaxation, data, variant=variant, epochs=settings.epochs,
                                 lr_w=settings.lr_w, lr_alpha=settings.lr_alpha,
                                 cost="size", lam=lam, target=target, seed=seed,
                                 batch_size=settings.batch_size, tau=tuple(settings.tau),
                                 dual_lr=settings.dual_lr, max_batches=settings.max_batches,
                                 targets=targets)
        save_trajectory(result, folder, stem)
        plot_trajectory(result, folder / f"{stem}.png",
                        f"{variant} on {space.name}: gene probabilities per epoch")
        last = result.trajectory[-1]["expected"]
        log(f"{variant} search done in {result.wall_s:.1f}s; expected size "
            f"{last.get('size', float('nan')):.0f} B"
            + (f", expected latency {last['latency']:.4g} ms" if "latency" in last else "")
            + f"; trajectory in {folder / stem}.json/.csv/.png")
    seen = {Arch(t.params).key for t in study.get_trials(deepcopy=False)
            if t.state == optuna.trial.TrialState.COMPLETE}
    archs: list[Arch] = []
    for arch, _ in result.derive(remaining + len(seen)):
        full = relaxation.full_arch(arch)
        if full.key not in seen:
            archs.append(full)
        if len(archs) == remaining:
            break
    if not archs:
        log(f"every arch {variant} derives is already in the study")
        return 0
    study.sampler = DerivedSampler(archs)
    return run_search(study, space, evaluate, objectives, len(completed(study)) + len(archs),
                      timeout, show_progress, trial_attrs={"strategy": variant, "seed": seed},
                      constraints=constraints)


def trial_prob(result: GradientResult, arch: Mapping[str, Any]) -> float:
    """The joint probability of ``arch`` (its relaxed genes) under the result's distributions."""
    p = 1.0
    for g, opts in result.genes.items():
        p *= result.probs[g][list(opts).index(arch[g])]
    return p
