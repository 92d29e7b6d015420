"""Objectives, constraints (budgets), the MnasNet reward, and hypervolume.

A constraint is satisfied when ``value - limit <= 0`` (Optuna's convention); it is recorded on
each trial with ``trial.set_constraint`` and Optuna's Pareto sets then hold feasible trials only.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from nasopt.core.errors import NasoptError
from nasopt.core.scores import HIGHER_IS_BETTER, UNIT_SCORES

if TYPE_CHECKING:  # annotations only: the read-only commands import this module without torch
    from nasopt.core.metrics import Metrics
    from nasopt.core.scores import Metric

#: MnasNet soft-constraint exponent (Tan et al. 2019): alpha = beta = -0.07
MNASNET_W = -0.07


@dataclass(frozen=True)
class Objective:
    name: str
    direction: str  # "maximize" | "minimize"
    value: Callable[[Metrics], float]
    description: str


METRIC_OF = {"size": "compressed_bytes", "float_size": "float_bytes", "params": "params",
             "macs": "macs", "nonzero_params": "nonzero_params",
             # with a hardware profile (nasopt.hardware.profile): batch-1 latency, peak activation memory
             "latency": "latency_ms", "sram": "sram_bytes"}

OBJECTIVES: dict[str, Objective] = {o.name: o for o in (
    Objective("accuracy", "maximize", lambda m: m.accuracy, "validation accuracy"),
    Objective("balanced_accuracy", "maximize", lambda m: m.scores["balanced_accuracy"],
              "validation balanced accuracy (mean per-class recall)"),
    Objective("f1", "maximize", lambda m: m.scores["f1"], "validation macro-F1"),
    Objective("mae", "minimize", lambda m: m.scores["mae"],
              "validation mean absolute error (regression)"),
    Objective("rmse", "minimize", lambda m: m.scores["rmse"],
              "validation root mean squared error (regression)"),
    Objective("size", "minimize", lambda m: float(m.compressed_bytes),
              "bytes of the packed compressed model file"),
    Objective("float_size", "minimize", lambda m: float(m.float_bytes),
              "bytes of the uncompressed weights as float32"),
    Objective("params", "minimize", lambda m: float(m.params), "stored parameters"),
    Objective("macs", "minimize", lambda m: float(m.macs), "multiply-accumulates per sample"),
    Objective("latency", "minimize", lambda m: float(m.latency_ms),
              "batch-1 latency in ms on the --hardware profile"),
    Objective("sram", "minimize", lambda m: float(m.sram_bytes),
              "peak activation bytes at the --hardware profile's data type"),
)}


def mnasnet_reward(accuracy: float, cost: float, target: float, w: float = MNASNET_W) -> float:
    """ACC x (cost / target) ^ w: a soft constraint when w < 0 on both sides of the target."""
    return accuracy * (max(cost, 1e-12) / target) ** w


def get_objectives(names: Sequence[str], budgets: Mapping[str, float] | None = None,
                   user: Metric | None = None) -> list[Objective]:
    """Objectives by name: the built-in ones, and ``user``'s name for a user's metric
    (:mod:`nasopt.core.scores`). ``mnasnet`` is the scalarized reward ACC x (size / T)^-0.07 for
    single-objective strategies; its target T is the size budget (``--max-size``)."""
    budgets = budgets or {}
    known = [*OBJECTIVES, "mnasnet", *([user.name] if user is not None else [])]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise NasoptError(f"unknown objective(s) {unknown}; choose from {', '.join(known)}")
    if len(set(names)) != len(names):
        raise NasoptError(f"objectives {list(names)} repeat a name; list each once")
    out = []
    for n in names:
        if n == "mnasnet":
            if "size" not in budgets:
                raise NasoptError("the mnasnet objective needs a size target: add --max-size "
                                  "(e.g. --max-size 4KB)")
            target = budgets["size"]
            out.append(Objective("mnasnet", "maximize",
                                 lambda m, t=target: mnasnet_reward(m.accuracy,
                                                                    m.compressed_bytes, t),
                                 f"accuracy x (size / {target:.0f} B)^{MNASNET_W}"))
        elif user is not None and n == user.name:
            out.append(Objective(n, user.direction, lambda m, k=n: m.scores[k],
                                 user.description))
        else:
            out.append(OBJECTIVES[n])
    return out


# ---- budgets ------------------------------------------------------------------------------
_UNITS = {"": 1, "b": 1, "kb": 1024, "kib": 1024, "mb": 1024 ** 2, "mib": 1024 ** 2,
          "k": 1e3, "m": 1e6, "g": 1e9}
_TIME_UNITS = {"": 1.0, "ms": 1.0, "us": 1e-3, "µs": 1e-3, "s": 1e3}  # -> milliseconds
#: the units a budget may end with (lower case), e.g. to recognise one written apart
BUDGET_UNITS = frozenset(u for u in (*_UNITS, *_TIME_UNITS) if u)


def parse_quantity(text: str | float, what: str) -> float:
    """``4KB`` -> 4096 (bytes use binary units), ``2M`` -> 2e6 (counts use decimal units);
    for ``latency``: milliseconds, ``0.3ms`` -> 0.3, ``300us`` -> 0.3, a bare number is ms."""
    units, example = ((_TIME_UNITS, "0.3ms, 300us") if what == "latency"
                      else (_UNITS, "4KB, 32KiB, 8192, 2M"))
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        match = re.fullmatch(r"\s*(-?[0-9]*\.?[0-9]+(?:e[+-]?\d+)?)\s*([a-zA-Zµ]*)\s*",
                             str(text))
        unit = match.group(2).lower() if match else None
        if not match or unit not in units:
            raise NasoptError(f"cannot read the {what} budget {text!r}; write e.g. {example}")
        value = float(match.group(1)) * units[unit]
    if value <= 0:
        raise NasoptError(f"the {what} budget must be positive, got {text!r}")
    return value


#: budgets on a score of the outputs, and whether higher is better for it: the budget is a floor
#: (f1 at least 0.8) where higher is better, a ceiling (mae at most 0.5) where lower is
SCORE_BUDGETS = HIGHER_IS_BETTER


@dataclass(frozen=True)
class Constraint:
    name: str  # an objective-style name: size, params, macs, ..., or a score (f1, mae, ...)
    limit: float
    floor: bool = False  # the value must be at least the limit (a score where higher is better)

    def value(self, metrics: Metrics) -> float:
        """Optuna's constraint value: feasible when <= 0."""
        if self.name in METRIC_OF:
            measured = float(getattr(metrics, METRIC_OF[self.name]))
        else:
            measured = float(metrics.accuracy if self.name == "accuracy"
                             else metrics.scores[self.name])
        return self.limit - measured if self.floor else measured - self.limit


def parse_score(text: str | float, what: str) -> float:
    """A budget on a score: a plain number (``0.8``), or a percentage (``80%``); accuracy,
    balanced accuracy and F1 lie in [0, 1]."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        match = re.fullmatch(r"\s*(-?[0-9]*\.?[0-9]+(?:e[+-]?\d+)?)\s*(%?)\s*", str(text))
        if not match:
            raise NasoptError(f"cannot read the {what} budget {text!r}; write a number, e.g. "
                              f"0.8 or 80%")
        value = float(match.group(1)) / (100.0 if match.group(2) else 1.0)
    if what in UNIT_SCORES and not 0 <= value <= 1:
        raise NasoptError(f"the {what} budget {text!r} lies outside [0, 1]; write e.g. 0.9 or "
                          f"90%")
    return value


def get_constraints(budgets: Mapping[str, str | float], user: Metric | None = None
                    ) -> list[Constraint]:
    """Budgets by name: costs (``size``, ``params``... at most the limit) and scores of the
    outputs (``f1``, ``mae``, ``user``'s metric: at least the limit where higher is better, at
    most where lower is)."""
    scores = {**SCORE_BUDGETS, **({user.name: user.higher_is_better} if user else {})}
    unknown = [k for k in budgets if k not in METRIC_OF and k not in scores]
    if unknown:
        raise NasoptError(f"unknown budget(s) {unknown}; budgets exist for "
                          f"{', '.join([*METRIC_OF, *scores])}")
    return [Constraint(k, parse_quantity(v, k)) if k in METRIC_OF else
            Constraint(k, parse_score(v, k), floor=scores[k]) for k, v in budgets.items()]


# ---- hypervolume --------------------------------------------------------------------------
def hypervolume(points: Sequence[tuple[float, float]], reference_size: float) -> float:
    """Hypervolume of (accuracy, size) points, maximizing accuracy and minimizing size.

    Reference point: accuracy 0 and size ``reference_size``; sizes are divided by it, so the
    result lies in [0, 1] (1 = 100 % accuracy at zero bytes). Points larger than the reference
    contribute nothing."""
    kept = sorted((s / reference_size, a) for a, s in points if s < reference_size and a > 0)
    volume, best = 0.0, 0.0
    # sweep by increasing size; the non-dominated points form a staircase whose steps reach
    # from each point's size to the next point's (or the reference's)
    front: list[tuple[float, float]] = []
    for size, acc in kept:
        if acc > best:
            front.append((size, acc))
            best = acc
    for i, (size, acc) in enumerate(front):
        next_size = front[i + 1][0] if i + 1 < len(front) else 1.0
        volume += (next_size - size) * acc
    return volume
