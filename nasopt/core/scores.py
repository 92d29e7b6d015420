"""Scores of a model's outputs on labelled samples: the built-in metrics of classification
(accuracy, balanced accuracy, macro-F1) and of regression (MAE, RMSE), and a user's own metric
function.

A user's metric is a function ``(outputs, targets) -> float`` given numpy arrays (the model's
outputs on the validation split, shaped ``(N, classes)``, and the labels, shaped ``(N,)``), with
an attribute ``higher_is_better`` (bool) that says its direction (for regression the outputs
and targets are shaped ``(N, targets)``); the function's name is the
metric's name (an objective may name it: ``--metric file.py:func --objectives func,size``)::

    def macro_recall(outputs, targets):
        ...
    macro_recall.higher_is_better = True
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from nasopt.core.errors import NasoptError
from nasopt.core.import_spec import load_attribute

Score = Callable[[np.ndarray, np.ndarray], float]


@dataclass(frozen=True)
class Metric:
    name: str
    higher_is_better: bool
    score: Score  # (outputs (N, classes), labels (N,)) -> a number
    description: str
    spec: str | None = None  # import spec of a user's function (recorded in the study)

    @property
    def direction(self) -> str:
        return "maximize" if self.higher_is_better else "minimize"

    def record(self) -> dict:
        """What a study's setup records to find the metric again (a user's function)."""
        return {"name": self.name, "spec": self.spec, "higher_is_better": self.higher_is_better}


def _confusion(outputs: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per class present in the labels or the predictions: (true positives, and the counts of
    labels and of predictions of that class)."""
    predicted = outputs.argmax(1)
    classes = np.union1d(targets, predicted)
    tp = np.array([np.sum((predicted == c) & (targets == c)) for c in classes], dtype=np.float64)
    labelled = np.array([np.sum(targets == c) for c in classes], dtype=np.float64)
    guessed = np.array([np.sum(predicted == c) for c in classes], dtype=np.float64)
    return tp, np.stack([labelled, guessed])


def accuracy(outputs: np.ndarray, targets: np.ndarray) -> float:
    """The share of samples whose largest output is their label."""
    return float(np.sum(outputs.argmax(1) == targets)) / len(targets)


def balanced_accuracy(outputs: np.ndarray, targets: np.ndarray) -> float:
    """The mean over the classes present in the labels of each class's recall."""
    tp, (labelled, _) = _confusion(outputs, targets)
    present = labelled > 0
    return float(np.mean(tp[present] / labelled[present]))


def macro_f1(outputs: np.ndarray, targets: np.ndarray) -> float:
    """The mean over the classes in the labels or the predictions of each class's F1
    (2 TP / (2 TP + FP + FN)), as scikit-learn's ``f1_score(average="macro")``."""
    tp, (labelled, guessed) = _confusion(outputs, targets)
    return float(np.mean(2 * tp / (labelled + guessed)))


#: the built-in metrics of classification, by name
BUILTIN: dict[str, Metric] = {m.name: m for m in (
    Metric("accuracy", True, accuracy, "validation accuracy"),
    Metric("balanced_accuracy", True, balanced_accuracy,
           "validation balanced accuracy (mean per-class recall)"),
    Metric("f1", True, macro_f1, "validation macro-F1"),
)}


def mae(outputs: np.ndarray, targets: np.ndarray) -> float:
    """Mean absolute error over every sample and target."""
    return float(np.mean(np.abs(outputs - targets.reshape(outputs.shape))))


def rmse(outputs: np.ndarray, targets: np.ndarray) -> float:
    """Root mean squared error over every sample and target."""
    return float(np.sqrt(np.mean((outputs - targets.reshape(outputs.shape)) ** 2)))


#: the built-in metrics of regression, by name (lower is better)
REGRESSION: dict[str, Metric] = {m.name: m for m in (
    Metric("mae", False, mae, "validation mean absolute error"),
    Metric("rmse", False, rmse, "validation root mean squared error"),
)}

#: whether higher is better, for every built-in metric
HIGHER_IS_BETTER = {name: m.higher_is_better for name, m in {**BUILTIN, **REGRESSION}.items()}
#: the built-in scores that lie in [0, 1] (those of classification)
UNIT_SCORES = tuple(BUILTIN)


def load_metric(spec: str) -> Metric:
    """A user's metric function named by the import spec ``spec`` (``file.py:func``,
    ``module:func``); one clear error naming what is wrong otherwise."""
    fn, _, found = load_attribute(spec, "metric", "func")
    where, _, attr = spec.rpartition(":")
    if fn is None:
        raise NasoptError(f"metric {spec!r}: {where} has no {attr!r}")
    if not callable(fn):
        raise NasoptError(f"metric {spec!r}: {attr} is not a function (outputs, targets) -> float")
    higher = getattr(fn, "higher_is_better", None)
    if not isinstance(higher, bool):
        raise NasoptError(f"metric {spec!r}: say whether higher is better: set "
                          f"{attr}.higher_is_better = True (or False) in {where}")
    name = fn.__name__
    from nasopt.core.objectives import METRIC_OF, OBJECTIVES  # (objectives imports this module)
    if name in HIGHER_IS_BETTER or name in OBJECTIVES or name in METRIC_OF or name == "mnasnet":
        raise NasoptError(f"metric {spec!r}: its name {name!r} is taken by a built-in objective; "
                          f"rename the function")
    return Metric(name, higher, fn, f"{name} of the validation outputs ({found})", found)


def metric_from_record(record: Mapping) -> Metric:
    """The user's metric a study's setup recorded (:meth:`Metric.record`), imported again."""
    metric = load_metric(record["spec"])
    if metric.name != record["name"] or metric.higher_is_better != record["higher_is_better"]:
        raise NasoptError(f"metric {record['spec']!r} has changed since the study was run (it "
                          f"was {record['name']!r}, higher_is_better={record['higher_is_better']})"
                          f"; restore it, or start a new study")
    return metric


def scores(outputs: np.ndarray, targets: np.ndarray, metrics: Mapping[str, Metric]
           ) -> dict[str, float]:
    """Every metric of ``metrics`` on these outputs; a user's function that fails or returns
    no finite number is one clear error."""
    out = {}
    for name, metric in metrics.items():
        try:
            value = float(metric.score(outputs, targets))
        except Exception as exc:
            if metric.spec is None:
                raise
            raise NasoptError(f"metric {metric.spec!r} failed on the validation outputs "
                              f"({type(exc).__name__}: {exc}); it is given numpy arrays "
                              f"outputs (N, classes) and targets (N,)") from None
        if not np.isfinite(value):
            raise NasoptError(f"metric {name!r} gave {value} on the validation outputs; it must "
                              f"return a finite number")
        out[name] = value
    return out
