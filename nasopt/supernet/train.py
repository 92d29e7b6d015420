"""The one training loop, used for supernet training and stand-alone training (and, later,
distillation and fine-tuning): seeded minibatches, Adam + cosine schedule, a progress bar with
ETA, a non-finite loss stops training with a clear error, and a per-epoch hook for checkpoints."""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nasopt.core.errors import NasoptError
from nasopt.core.progress import progress_bar

if TYPE_CHECKING:
    from nasopt.core.task import Task


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 30
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 0.0
    seed: int = 0


class TrainingDiverged(NasoptError):
    """The loss became NaN or infinite."""


#: inputs larger than this make a diverged training point at the inputs, not the learning rate
INPUT_SCALE_WARN = 1e4

def minibatches(x: Tensor, y: Tensor, batch_size: int, seed: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Shuffled minibatches whose order depends only on ``seed``."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=g).to(x.device)
    for start in range(0, len(x), batch_size):
        idx = order[start:start + batch_size]
        yield x[idx], y[idx]


LossFn = Callable[[Tensor, Tensor], Tensor]


def fit(params: list[nn.Parameter], loss_fn: LossFn, x: Tensor, y: Tensor, cfg: TrainConfig, *,
        start_epoch: int = 0, resume_state: dict[str, Any] | None = None,
        on_epoch_start: Callable[[int], None] | None = None,
        on_epoch_end: Callable[[int, torch.optim.Optimizer, Any], None] | None = None,
        after_backward: Callable[[Tensor], Tensor] | None = None,
        desc: str = "train", show_progress: bool = True) -> None:
    """Minimise ``loss_fn`` over ``cfg.epochs`` epochs of (x, y).

    ``on_epoch_end(epoch, optimizer, scheduler)`` lets a caller checkpoint; passing their state
    dicts back as ``resume_state`` (keys "optimizer", "scheduler") with ``start_epoch`` continues
    exactly where it stopped. ``after_backward(loss)``, called between each backward pass and
    its optimizer step, may change the gradients and returns the loss to report (processes
    that share a step sum theirs there: :meth:`nasopt.supernet.split.Split.reduce`).
    """
    if cfg.epochs <= 0:
        return
    # foreach: one update call for all parameters instead of one per parameter
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
    steps_per_epoch = math.ceil(len(x) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * steps_per_epoch)
    if resume_state is not None:
        opt.load_state_dict(resume_state["optimizer"])
        sched.load_state_dict(resume_state["scheduler"])
    bar = progress_bar(total=cfg.epochs, initial=start_epoch, desc=desc, unit="epoch",
                       enabled=show_progress)
    try:
        for epoch in range(start_epoch, cfg.epochs):
            if on_epoch_start is not None:
                on_epoch_start(epoch)
            total, count = 0.0, 0
            for xb, yb in minibatches(x, y, cfg.batch_size, seed=cfg.seed * 100_003 + epoch):
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(xb, yb)
                if not torch.isfinite(loss):
                    scale = x.abs().max().item()
                    raise TrainingDiverged(
                        f"loss became {loss.item()} in epoch {epoch}; "
                        + (f"the inputs reach {scale:.3g}: scale them first (e.g. to [0, 1] or "
                           f"standardized)" if scale > INPUT_SCALE_WARN else
                           f"lower the learning rate (currently {cfg.lr})"))
                loss.backward()
                if after_backward is not None:
                    loss = after_backward(loss)
                opt.step()
                sched.step()
                total += loss.item() * len(xb)
                count += len(xb)
            bar.set_postfix(loss=f"{total / count:.4f}")
            bar.update(1)
            if on_epoch_end is not None:
                on_epoch_end(epoch, opt, sched)
    finally:
        bar.close()


def train_model(model: nn.Module, x: Tensor, y: Tensor, cfg: TrainConfig, *,
                desc: str = "train", show_progress: bool = False) -> nn.Module:
    """Supervised training of a stand-alone model with cross-entropy."""
    torch.manual_seed(cfg.seed)
    model.train()
    fit(list(model.parameters()), lambda xb, yb: F.cross_entropy(model(xb), yb), x, y, cfg,
        desc=desc, show_progress=show_progress)
    model.eval()
    return model


@torch.no_grad()
def outputs(model: nn.Module, x: Tensor, batch_size: int = 1024) -> Tensor:
    """The outputs of ``model`` in eval mode on ``x``, batch by batch."""
    if len(x) == 0:
        raise NasoptError("cannot measure a model on an empty split; use more data")
    was_training = model.training
    model.eval()
    out = torch.cat([model(x[start:start + batch_size]) for start in range(0, len(x), batch_size)])
    model.train(was_training)
    return out


def quality(model: nn.Module, x: Tensor, y: Tensor, task: "Task") -> float:
    """The task's quality metric (accuracy, or MAE for regression) of ``model`` on ``x``
    against ``y``."""
    metric = task.metrics[task.default_quality]
    return metric.score(outputs(model, x).cpu().numpy(), y.cpu().numpy())


def correct(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1024) -> Tensor:
    """Whether ``model`` (in eval mode) classifies each sample right: a bool per sample."""
    if len(x) == 0:
        raise NasoptError("cannot measure accuracy on an empty split; use more data")
    was_training = model.training
    model.eval()
    right = torch.cat([model(x[start:start + batch_size]).argmax(1) == y[start:start + batch_size]
                       for start in range(0, len(x), batch_size)])
    model.train(was_training)
    return right


def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1024) -> float:
    """Top-1 accuracy of ``model`` in eval mode."""
    return correct(model, x, y, batch_size).sum().item() / len(x)
