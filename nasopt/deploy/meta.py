"""A meta-learned initialisation for few-shot transfer: first-order meta-learning by Reptile
(Nichol, Achiam and Schulman, "On First-Order Meta-Learning Algorithms", 2018).

The model is the one ``nasopt finetune`` adapts: the deployed structure of an arch re-headed to
``ways`` outputs (:func:`nasopt.deploy.finetune.reheaded`) and prepared for quantization-aware
training (:func:`nasopt.deploy.finetune.prepare_qat`: BatchNorm folded, fake quantization at the
arch's bit-widths, fixed pruning masks). Reptile moves the same latent parameters fine-tuning
then adapts, so the adapted model finalizes and exports as any fine-tuned one.

One iteration:

1. a task: ``ways`` classes drawn at random from the source data's classes, in random order
   (the order is the task's labels: class ``c_i`` is label ``i``, so every output of the head
   sees every class and the head learns a neutral initialisation), and ``shots`` training
   samples of each (the support batch);
2. the inner loop: ``inner_steps`` steps of Adam (first moment off, ``betas = (0, 0.999)``,
   as the paper's) or SGD at ``inner_lr`` on the whole support batch, from the current
   initialisation ``theta``, giving ``phi``;
3. the outer update ``theta <- theta + eps * (phi - theta)``, ``eps`` decaying linearly from
   ``meta_lr`` to 0 over ``iterations``.

Classes and their order come from a :class:`random.Random`, samples from a
:class:`torch.Generator`, both seeded with ``seed``: the same seed, data and model give the same
initialisation. Only the training split of the source data is read.
"""
from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nasopt.core.data import Dataset
from nasopt.core.errors import NasoptError
from nasopt.core.progress import progress_bar

INNER_OPTIMIZERS = ("adam", "sgd")


@dataclass(frozen=True)
class MetaConfig:
    """Reptile's settings (see the module doc)."""

    iterations: int = 1000  # tasks, one outer update each
    ways: int | None = None  # classes per task; None: the model's outputs (the target's classes)
    shots: int = 10  # support samples per class and task
    inner_steps: int = 5  # optimizer steps per task on its support batch
    inner_lr: float = 1e-3
    meta_lr: float = 0.1  # outer step size at the first iteration, decaying linearly to 0
    inner_optimizer: str = "adam"  # adam (beta1 = 0) | sgd
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("iterations", "shots", "inner_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise NasoptError(f"meta {name} must be a whole number >= 1, got {value!r}")
        if self.ways is not None and (isinstance(self.ways, bool)
                                      or not isinstance(self.ways, int) or self.ways < 2):
            raise NasoptError(f"meta ways must be a whole number >= 2 or unset (the target's "
                              f"class count), got {self.ways!r}")
        if not self.inner_lr > 0:
            raise NasoptError(f"meta inner_lr must be > 0, got {self.inner_lr}")
        if not 0 < self.meta_lr <= 1:
            raise NasoptError(f"meta meta_lr must lie in (0, 1] (1: move to the adapted "
                              f"weights), got {self.meta_lr}")
        if self.inner_optimizer not in INNER_OPTIMIZERS:
            raise NasoptError(f"meta inner_optimizer must be one of "
                              f"{', '.join(INNER_OPTIMIZERS)}, got {self.inner_optimizer!r}")


@dataclass
class MetaHistory:
    """What meta-training did: the support loss at the first and after the last inner step,
    each averaged over tenths of the iterations (adaptation gets easier as the initialisation
    improves: the second falls faster than the first)."""

    ways: int
    classes: int  # source classes the tasks were drawn from
    iterations: int
    seconds: float = 0.0
    loss_before: list[float] = field(default_factory=list)
    loss_after: list[float] = field(default_factory=list)


def source_classes(labels: Sequence[int], target: Sequence[int] | None,
                   given: Sequence[int] | None, ways: int, dataset: str) -> list[int]:
    """The classes meta-training draws its tasks from: ``given``, or else every label of the
    source dataset (``labels``) not among the ``target`` classes of the same dataset (None: the
    target is another dataset). Checked: known labels, none of the target's, at least ``ways``."""
    labels = sorted(int(c) for c in labels)
    target = [int(c) for c in target or ()]
    chosen = [int(c) for c in given] if given else [c for c in labels if c not in target]
    unknown = sorted(set(chosen) - set(labels))
    if unknown:
        raise NasoptError(f"meta classes {unknown} are not labels of {dataset} (it has "
                          f"{labels[0]}..{labels[-1]}); name source classes of the dataset")
    if len(set(chosen)) != len(chosen):
        raise NasoptError(f"meta classes {chosen} name a class twice; name each once")
    overlap = sorted(set(chosen) & set(target))
    if overlap:
        raise NasoptError(f"meta classes {overlap} are also target classes; meta-train on "
                          f"other classes than the ones fine-tuning adapts to")
    if len(chosen) < ways:
        raise NasoptError(f"meta-training draws {ways} classes per task (the target's class "
                          f"count) from {len(chosen)} source class(es) {chosen}; give at least "
                          f"{ways} source classes")
    return chosen


def source_split(data: Dataset, classes: Sequence[int]) -> tuple[Tensor, Tensor]:
    """The training samples of ``classes`` (labels of ``data``) and their labels renumbered
    0..k-1 in the order given: what :func:`reptile` reads, and all it reads of the source."""
    if data.task != "classification":
        raise NasoptError(f"meta-training draws classes; {data.name} is a regression dataset")
    lookup = torch.full((data.num_classes,), -1, dtype=torch.long)
    lookup[torch.tensor([int(c) for c in classes])] = torch.arange(len(classes))
    keep = lookup[data.y_train.cpu()] >= 0
    return data.x_train[keep.to(data.x_train.device)], lookup[data.y_train.cpu()[keep]].to(
        data.y_train.device)


@dataclass
class SourceTask:
    """What meta-training reads of the source data: its ``classes`` (labels of the source
    dataset, in order) and their training samples ``x`` with labels ``y`` renumbered 0..k-1."""

    dataset: str
    classes: list[int]
    x: Tensor
    y: Tensor


def source_task(source: Dataset, target: Dataset, target_classes: Sequence[int] | None,
                given: Sequence[int] | None, cfg: MetaConfig, input_shape: Sequence[int], *,
                dataset: str | None = None) -> SourceTask:
    """The source classes meta-training draws its tasks from, and their training split, for a
    model taking ``input_shape`` that fine-tuning then adapts to ``target``: the ``given``
    classes of ``source``, or else every class of it not among ``target_classes`` (None: the
    target is another dataset). Checked before any training: both are classification data, the
    source samples fit the model, the classes are labels of the source and none of the
    target's, at least as many as the target has (the classes per task), each with at least
    ``cfg.shots`` training samples. ``dataset`` names the source in messages (default: its
    name)."""
    name = dataset or source.name
    for data in (target, source):
        if data.task != "classification":
            raise NasoptError(f"meta-training draws classes; {data.name} is a regression "
                              f"dataset: use plain fine-tuning for it")
    if source.input_shape != tuple(input_shape):
        raise NasoptError(f"{name} samples are shaped {source.input_shape}, the model takes "
                          f"{tuple(input_shape)}; meta-training needs the model's inputs")
    labels = sorted(set(source.y_train.tolist()))
    chosen = source_classes(labels, target_classes, given, cfg.ways or target.num_classes, name)
    x, y = source_split(source, chosen)
    counts = torch.bincount(y.cpu(), minlength=len(chosen))
    short = [c for c, n in zip(chosen, counts.tolist()) if n < cfg.shots]
    if short:
        raise NasoptError(f"source class {short[0]} of {name} has "
                          f"{int(counts[chosen.index(short[0])])} training samples, fewer than "
                          f"meta shots={cfg.shots}; lower the meta shots")
    return SourceTask(name, chosen, x, y)


def meta_record(cfg: MetaConfig, history: MetaHistory, source: SourceTask) -> dict:
    """The model card's ``meta``: the settings, the source classes and what training did."""
    return {**dataclasses.asdict(cfg), "ways": history.ways, "dataset": source.dataset,
            "classes": source.classes, "train_samples": len(source.y),
            "seconds": history.seconds, "loss_before_adaptation": history.loss_before,
            "loss_after_adaptation": history.loss_after}


def reptile(model: nn.Module, x: Tensor, y: Tensor, cfg: MetaConfig, *,
            show_progress: bool = False, desc: str = "meta") -> MetaHistory:
    """Meta-train ``model``'s trainable parameters in place by Reptile on tasks drawn from the
    samples ``x`` with labels ``y`` (0..C-1, C >= ways; a training split: see
    :func:`source_split`); returns the history. ``model``'s output count is the tasks' class
    count (``cfg.ways``, when given, must equal it)."""
    if len(x) != len(y) or len(x) == 0 or y.dtype != torch.long:
        raise NasoptError(f"meta-training needs labelled samples (integer labels, one per "
                          f"sample); got {len(x)} samples and labels {tuple(y.shape)} {y.dtype}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise NasoptError("the model has no trainable parameters to meta-train")
    with torch.no_grad():
        outputs = model.eval()(x[:1]).shape[1]
    ways = cfg.ways or outputs
    if ways != outputs:
        raise NasoptError(f"meta ways {ways} but the model has {outputs} outputs; re-head it to "
                          f"{ways} classes or leave ways unset")
    members = [torch.nonzero(y == c).flatten() for c in range(int(y.max()) + 1)]
    present = [c for c, idx in enumerate(members) if len(idx)]
    if len(present) < ways:
        raise NasoptError(f"the source samples hold {len(present)} classes, fewer than the "
                          f"{ways} each task draws; give more source classes")
    short = [c for c in present if len(members[c]) < cfg.shots]
    if short:
        raise NasoptError(f"source class {short[0]} has {len(members[short[0]])} samples, "
                          f"fewer than meta shots={cfg.shots}; lower the meta shots")
    pick = random.Random(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    history = MetaHistory(ways=ways, classes=len(present), iterations=cfg.iterations)
    before, after = [], []
    labels = torch.arange(ways, device=y.device).repeat_interleave(cfg.shots)
    start = time.perf_counter()
    bar = progress_bar(total=cfg.iterations, desc=desc, unit="task", enabled=show_progress)
    model.train()
    try:
        for it in range(cfg.iterations):
            classes = pick.sample(present, ways)  # random order: a random label per class
            idx = torch.cat([members[c][torch.randperm(len(members[c]), generator=gen)
                                        [:cfg.shots].to(members[c].device)] for c in classes])
            xb = x[idx]
            theta = [p.detach().clone() for p in params]
            opt = (torch.optim.Adam(params, lr=cfg.inner_lr, betas=(0.0, 0.999))
                   if cfg.inner_optimizer == "adam" else torch.optim.SGD(params, lr=cfg.inner_lr))
            for step in range(cfg.inner_steps):
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(xb), labels)
                if not torch.isfinite(loss):
                    raise NasoptError(f"meta-training loss became {loss.item()} at iteration "
                                      f"{it}; lower the meta inner_lr (now {cfg.inner_lr})")
                if step == 0:
                    before.append(loss.item())
                loss.backward()
                opt.step()
            with torch.no_grad():
                after.append(F.cross_entropy(model(xb), labels).item())
                eps = cfg.meta_lr * (1 - it / cfg.iterations)
                for p, t in zip(params, theta):
                    p.copy_(t + eps * (p - t))
            bar.update(1)
            if (it + 1) % 10 == 0:
                bar.set_postfix(loss=f"{before[-1]:.3f}")
    finally:
        bar.close()
    model.eval()
    for p in params:
        p.grad = None
    history.seconds = round(time.perf_counter() - start, 2)
    history.loss_before, history.loss_after = _tenths(before), _tenths(after)
    return history


def _tenths(values: list[float]) -> list[float]:
    """The means of ``values`` over (at most) ten consecutive, equal-sized parts."""
    n = min(10, len(values))
    parts = [values[i * len(values) // n:(i + 1) * len(values) // n] for i in range(n)]
    return [round(sum(part) / len(part), 4) for part in parts]
