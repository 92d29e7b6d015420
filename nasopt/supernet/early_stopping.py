"""Early stopping on the validation split around :func:`nasopt.supernet.train.fit`.

The model's validation accuracy (MAE for regression, where lower is better) is measured before
training and after every epoch; the weights of the best of these are kept (ties: the earlier one)
and restored at the end; training stops after ``patience`` epochs without improvement. Only ``data.x_val`` / ``data.y_val`` are read: never the test split.
The learning rate follows ``fit``'s cosine schedule over the configured epochs.
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import Tensor, nn

from nasopt.core.data import Dataset
from nasopt.core.task import task_of
from nasopt.supernet.train import LossFn, TrainConfig, fit, quality


@dataclass
class History:
    initial_val_accuracy: float | None = None  # before training
    val_accuracy: list[float] = field(default_factory=list)  # one per finished epoch
    best_epoch: int = -1  # -1: the initial weights were never beaten
    stopped_early: bool = False
    #: the metric of the values above: accuracy, or mae for regression (lower is better)
    metric: str = "accuracy"

    @property
    def best_val_accuracy(self) -> float | None:
        return (self.initial_val_accuracy if self.best_epoch < 0
                else self.val_accuracy[self.best_epoch])


class _Stop(Exception):
    """Raised from the epoch hook to leave ``fit`` early."""


def train_early_stopping(model: nn.Module, params: list[nn.Parameter], loss_fn: LossFn,
                         data: Dataset, cfg: TrainConfig, patience: int, *,
                         on_epoch_start: Callable[[int], None] | None = None,
                         desc: str = "train", show_progress: bool = False,
                         train_targets: Tensor | None = None) -> History:
    """Minimise ``loss_fn`` with :func:`fit`; keep the weights of the best validation epoch
    (by the task's metric: accuracy, or MAE for regression). ``loss_fn`` gets minibatches of
    the training inputs and of ``train_targets`` (one row per sample; default the labels)."""
    task = task_of(data)
    sign = -1.0 if task.regression else 1.0  # the comparison below takes higher as better

    def validation() -> float:
        return quality(model, data.x_val, data.y_val, task)

    history = History(initial_val_accuracy=validation(), metric=task.default_quality)
    best_state = copy.deepcopy(model.state_dict())

    def on_epoch_end(epoch: int, optimizer, scheduler) -> None:  # noqa: ANN001
        acc = validation()
        history.val_accuracy.append(acc)
        if sign * acc > sign * history.best_val_accuracy:
            history.best_epoch = epoch
            best_state.update(copy.deepcopy(model.state_dict()))
        elif epoch - history.best_epoch >= patience:
            history.stopped_early = True
            raise _Stop

    model.train()
    try:
        targets = data.y_train if train_targets is None else train_targets
        fit(params, loss_fn, data.x_train, targets, cfg, on_epoch_start=on_epoch_start,
            on_epoch_end=on_epoch_end, desc=desc, show_progress=show_progress)
    except _Stop:
        pass
    model.load_state_dict(best_state)
    model.eval()
    return history
