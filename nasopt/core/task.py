"""The task a dataset poses, and what follows from it: the training loss, the in-place
distillation loss, the metrics a search scores, and the trivial predictor every search must beat.

- ``classification``: integer labels 0..K-1; cross-entropy; the soft targets of the largest
  subnet (temperature-scaled KL divergence); accuracy, balanced accuracy and macro-F1; always
  answering the most frequent class.
- ``regression``: float targets shaped (N, T); mean squared error; the largest subnet's outputs
  as targets (mean squared error); MAE and RMSE (lower is better); always answering the
  training targets' mean.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from nasopt.core.errors import NasoptError
from nasopt.core.scores import BUILTIN, REGRESSION, Metric

KINDS = ("classification", "regression")


@dataclass(frozen=True)
class Task:
    kind: str  # "classification" | "regression"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise NasoptError(f"unknown task {self.kind!r}; choose {' or '.join(KINDS)}")

    @property
    def regression(self) -> bool:
        return self.kind == "regression"

    @property
    def metrics(self) -> dict[str, Metric]:
        """The built-in metrics a search on this task scores."""
        return dict(REGRESSION if self.regression else BUILTIN)

    @property
    def default_quality(self) -> str:
        """The metric a search optimizes unless the objectives name another."""
        return "mae" if self.regression else "accuracy"

    def loss(self, outputs: Tensor, y: Tensor) -> Tensor:
        return F.mse_loss(outputs, y) if self.regression else F.cross_entropy(outputs, y)

    def distillation_loss(self, student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
        """The loss of a student's outputs against a teacher's (detached) outputs."""
        if self.regression:
            return F.mse_loss(student, teacher.detach())
        soft = F.softmax(teacher.detach() / temperature, dim=1)
        return F.kl_div(F.log_softmax(student / temperature, dim=1), soft,
                        reduction="batchmean") * temperature ** 2

    def trivial_outputs(self, y_train: Tensor, n: int, outputs: int) -> np.ndarray:
        """The outputs of the trivial predictor for ``n`` samples: the training split's most
        frequent class (classification) or its mean target (regression)."""
        y = y_train.detach().cpu()
        if self.regression:
            return np.tile(y.double().mean(0).numpy(), (n, 1))
        out = np.zeros((n, outputs))
        out[:, int(torch.bincount(y.long().flatten()).argmax())] = 1.0
        return out


CLASSIFICATION = Task("classification")


def require_classification(data, what: str) -> None:  # noqa: ANN001 - a Dataset
    """One clear error for a step that trains on class labels only so far."""
    if task_of(data).regression:
        raise NasoptError(f"{what} trains on class labels; {data.name} is a regression dataset: "
                          f"search and export its models (nasopt search, nasopt export)")


def task_of(data) -> Task:  # noqa: ANN001 - a Dataset
    return Task(getattr(data, "task", "classification"))
