"""Knowledge distillation: teachers, the KD loss, an adaptive temperature, feature (hint)
distillation, and training a student with early stopping on validation.

**Loss** (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network"), with ``p_t`` the
(weighted average of the) teachers' softmax at temperature ``T``::

    alpha * CE(y, student) + (1 - alpha) * T^2 * KL(p_t || softmax(student / T))

computed as ``F.kl_div(log_softmax(student / T), p_t, reduction="batchmean")``: the student side
is the log-probability input, the teacher side the target distribution (swapping them computes
KL(student || teacher), a different loss; a test checks the direction against numpy).

**Adaptive temperature** (``adaptive_temperature = true``): the temperature is annealed from
``T`` to 1 over the epochs by the schedule of Annealing-KD (Jafari et al., EACL 2021, "Annealing
Knowledge Distillation", Eq. 3): the teacher's logits are scaled by
``phi = 1 - (tau - 1) / T`` with ``tau`` falling linearly from ``T`` to 1, i.e. the temperature of
epoch ``e`` is ``1 / phi``. Here it is applied as the temperature of the loss above (both sides,
with the ``T^2`` factor), not with their separate MSE phase: soft targets early, sharp late.

**Feature distillation** (``hint_weight > 0``; FitNets, Romero et al., ICLR 2015): the output of
one intermediate module (default: the last stage, ``stages.<n-1>``) of the student passes
through a learned 1x1 convolution to the teacher's channel count and is pulled to the first
teacher's output of the same module by MSE. Student and teacher must have the same spatial size
there (true for archs of one space). TorchScript teachers cannot be hooked: no hint loss for them.

**Teachers** (:func:`load_teacher`): ``largest`` (the supernet's largest subnet, with inherited
weights and recalibrated BatchNorm, the default), a TorchScript file, or a nasopt export
(a folder or a ``.packed`` file, loaded with ``nasopt.load`` as the bare network). Exports take
raw samples (the data's preprocessing inside); training feeds preprocessed ones, so an export's
``model.ts`` is fed them turned back into raw samples (:class:`FromPreprocessed`). Several
teachers: their softmax outputs are averaged with selectable weights.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nasopt.core.augment import Augment
from nasopt.core.task import task_of
from nasopt.core.data import Dataset
from nasopt.supernet.early_stopping import History, train_early_stopping
from nasopt.supernet.network import last_stage
from nasopt.core.errors import NasoptError
from nasopt.supernet.train import TrainConfig, outputs


def kd_loss(student_logits: Tensor, teacher_probs: Tensor, y: Tensor, alpha: float,
            temperature: float) -> Tensor:
    """``alpha * CE(y, s) + (1 - alpha) * T^2 * KL(teacher || student_T)``.

    ``teacher_probs`` are the teachers' (averaged) probabilities at the same temperature
    (:meth:`Teachers.probs`)."""
    hard = F.cross_entropy(student_logits, y)
    if alpha >= 1.0:
        return hard
    soft = F.kl_div(F.log_softmax(student_logits / temperature, dim=1), teacher_probs,
                    reduction="batchmean")
    return alpha * hard + (1.0 - alpha) * temperature ** 2 * soft


def annealed_temperature(temperature: float, epoch: int, epochs: int) -> float:
    """Annealing-KD's schedule (see the module doc): ``temperature`` at epoch 0, 1 at the last."""
    if epochs <= 1 or temperature <= 1.0:
        return temperature
    tau = temperature - (temperature - 1.0) * min(epoch, epochs - 1) / (epochs - 1)
    phi = 1.0 - (tau - 1.0) / temperature
    return 1.0 / phi


# ---------------------------------------------------------------------------------------------
@dataclass
class Teachers:
    """Fixed teacher models (eval mode, no gradients) and the weights of their soft targets."""

    models: list[nn.Module]
    weights: list[float]
    names: list[str]

    def __post_init__(self) -> None:
        if not self.models:
            raise NasoptError("distillation needs at least one teacher")
        if len(self.weights) != len(self.models):
            raise NasoptError(f"{len(self.models)} teachers but {len(self.weights)} teacher "
                              f"weights; give one weight per teacher")
        if any(w < 0 for w in self.weights) or sum(self.weights) <= 0:
            raise NasoptError(f"teacher weights must be >= 0 with a positive sum, got "
                              f"{self.weights}")
        total = sum(self.weights)
        self.weights = [w / total for w in self.weights]
        for m in self.models:
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)

    @torch.no_grad()
    def recorded(self, x: Tensor, batch_size: int = 1024) -> Tensor:
        """Every teacher's outputs on ``x``, shaped (teachers, samples, outputs), batch by
        batch: what :meth:`outputs` and :meth:`probs` take as ``recorded`` rows."""
        return torch.stack([outputs(model, x, batch_size) for model in self.models])

    @torch.no_grad()
    def outputs(self, x: Tensor, recorded: Tensor | None = None) -> Tensor:
        """Weighted average of the teachers' outputs (regression: their predictions) on ``x``,
        or of their ``recorded`` outputs (one row per teacher) on the same samples."""
        raw = self._raw(x, recorded)
        return sum(w * out for out, w in zip(raw, self.weights))

    def probs(self, x: Tensor, temperature: float, recorded: Tensor | None = None) -> Tensor:
        """Weighted average of the teachers' softmax(logits / T) on ``x`` (or ``recorded``)."""
        out = None
        for logits, w in zip(self._raw(x, recorded), self.weights):
            p = w * F.softmax(logits / temperature, dim=1)
            out = p if out is None else out + p
        return out

    def _raw(self, x: Tensor, recorded: Tensor | None) -> Iterator[Tensor]:
        if recorded is not None:
            yield from recorded
            return
        with torch.no_grad():
            for model in self.models:
                yield model(x)


def load_teacher(spec: str, largest: Callable[[], nn.Module] | None, spaces) -> nn.Module:  # noqa: ANN001
    """One teacher: ``largest`` (calls ``largest()``), a TorchScript file, or a nasopt export."""
    if spec == "largest":
        if largest is None:
            raise NasoptError("teacher 'largest' needs a supernet: give --study (or use a "
                              "teacher file)")
        return largest()
    path = Path(spec)
    if not path.exists():
        raise NasoptError(f"teacher {spec!r} is neither 'largest' nor an existing file or "
                          f"folder; give a TorchScript file or a nasopt export")
    if path.is_dir() or path.suffix == ".packed":
        from nasopt.deploy.export import load
        return load(path, spaces, raw_input=False)  # the network: fed preprocessed inputs
    try:
        scripted = torch.jit.load(str(path), map_location="cpu").eval()
    except (RuntimeError, ValueError) as exc:
        raise NasoptError(f"teacher {spec}: not a TorchScript file ({str(exc)[:120]}); save one "
                          f"with torch.jit.save, or give a nasopt export folder") from None
    return _takes_preprocessed(scripted, path)


class FromPreprocessed(nn.Module):
    """A model that takes raw samples (a nasopt ``model.ts``: the data's preprocessing inside),
    fed the preprocessed inputs training uses: they are turned back into raw samples first."""

    def __init__(self, model: nn.Module, preprocess):  # noqa: ANN001
        super().__init__()
        self.model = model
        self.preprocess = preprocess

    def forward(self, x: Tensor) -> Tensor:
        return self.model(self.preprocess.raw(x))


def _takes_preprocessed(scripted: nn.Module, path: Path) -> nn.Module:
    """``scripted`` as a teacher: a nasopt export's ``model.ts`` (its folder's ``model.json``
    records the preprocessing it applies inside) is wrapped in :class:`FromPreprocessed`; any
    other TorchScript file is taken as it is (it must take the inputs training feeds)."""
    if path.name != "model.ts" or not (path.parent / "model.json").exists():
        return scripted
    from nasopt.deploy.export import preprocess_of_card, read_card
    pre = preprocess_of_card(read_card(path.parent))  # the one reader: a damaged card is an error
    return scripted if pre is None or pre.identity else FromPreprocessed(scripted, pre)


def make_teachers(specs: Sequence[str], weights: Sequence[float], largest, spaces,  # noqa: ANN001
                  data: Dataset, device: torch.device | str = "cpu") -> Teachers:
    """Load every teacher and check that it maps the data's inputs to its classes."""
    weights = list(weights) or [1.0] * len(specs)
    models = []
    for spec in specs:
        model = load_teacher(spec, largest, spaces).to(device)
        with torch.no_grad():
            out = model.eval()(data.x_val[:2].to(device))
        if out.dim() != 2 or out.shape[1] != data.num_classes:
            raise NasoptError(f"teacher {spec!r} outputs shape {tuple(out.shape)} but "
                              f"{data.name} has {data.num_classes} classes; use a teacher for "
                              f"this label set")
        models.append(model)
    return Teachers(models, weights, list(specs))


# ---------------------------------------------------------------------------------------------
class Hint(nn.Module):
    """FitNets hint loss: MSE(adapter(student feature), teacher feature) at module ``layer``."""

    def __init__(self, student: nn.Module, teacher: nn.Module, layer: str, x: Tensor):
        super().__init__()
        if isinstance(teacher.model if isinstance(teacher, FromPreprocessed) else teacher,
                      torch.jit.ScriptModule):
            raise NasoptError("feature distillation needs a teacher nn.Module (hooks); a "
                              "TorchScript teacher supports logit distillation only: set "
                              "hint_weight = 0")
        self._features: dict[str, Tensor] = {}
        try:
            s_mod, t_mod = student.get_submodule(layer), teacher.get_submodule(layer)
        except AttributeError:
            raise NasoptError(f"hint layer {layer!r} is not a module of both student and "
                              f"teacher; name a module such as 'stages.1'") from None
        self._handles = [s_mod.register_forward_hook(self._keep("student")),
                         t_mod.register_forward_hook(self._keep("teacher"))]
        with torch.no_grad():
            student(x[:2])
            teacher(x[:2])
        s, t = self._features["student"], self._features["teacher"]
        if s.shape[2:] != t.shape[2:] or s.dim() not in (3, 4):
            raise NasoptError(f"hint layer {layer!r}: student feature {tuple(s.shape)} and "
                              f"teacher feature {tuple(t.shape)} differ in spatial size")
        conv = nn.Conv1d if s.dim() == 3 else nn.Conv2d
        self.adapter = conv(s.shape[1], t.shape[1], 1).to(s.device)

    def _keep(self, key: str):  # noqa: ANN202
        def hook(module, inputs, output):  # noqa: ANN001, ANN202
            self._features[key] = output
        return hook

    def loss(self) -> Tensor:
        """MSE between the features captured by the last student and teacher forwards."""
        return F.mse_loss(self.adapter(self._features["student"]),
                          self._features["teacher"].detach())

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def default_hint_layer(model: nn.Module) -> str:
    """The last stage (:func:`nasopt.supernet.network.last_stage`)."""
    name = last_stage(model)
    if name is None:
        raise NasoptError("no default hint layer (the model has no 'stages'); set hint_layer "
                          "to a module name of the student")
    return name


# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DistillConfig:
    epochs: int = 40
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 0.0
    alpha: float = 0.5  # weight of the label loss; 1 - alpha on the soft targets
    temperature: float = 4.0
    adaptive_temperature: bool = False  # Annealing-KD schedule from temperature to 1
    hint_weight: float = 0.0  # > 0: feature distillation at hint_layer
    hint_layer: str = ""  # default: the last stage
    patience: int = 10  # early stopping: epochs without a better validation accuracy
    seed: int = 0
    #: training-time augmentation of the inputs, e.g. ("flip", "shift=2") (:mod:`nasopt.core.augment`)
    augment: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        Augment.parse(self.augment, "distill.augment")
        if not 0.0 <= self.alpha <= 1.0:
            raise NasoptError(f"distill.alpha must lie in [0, 1], got {self.alpha}")
        if self.temperature <= 0 or not math.isfinite(self.temperature):
            raise NasoptError(f"distill.temperature must be positive, got {self.temperature}")
        if self.epochs < 1:
            raise NasoptError(f"distill epochs must be >= 1, got {self.epochs}; give --epochs "
                              f"1 or more (distill.epochs in a run config; distill.enabled = "
                              f"false skips distillation)")
        if self.patience < 1 or self.hint_weight < 0:
            raise NasoptError(f"distill patience must be >= 1 and hint_weight >= 0, got "
                              f"patience {self.patience}, hint_weight {self.hint_weight}")

    def train_config(self) -> TrainConfig:
        return TrainConfig(self.epochs, self.batch_size, self.lr, self.weight_decay, self.seed)


class StudentLoss:
    """The training loss of a student (a :data:`nasopt.supernet.train.LossFn` for
    ``train_early_stopping(..., train_targets=loss.targets)``): the task's loss alone without
    ``teachers``, else the KD loss (regression: ``alpha`` x MSE to the targets + the rest x MSE
    to the teachers' mean output), plus the ``hint`` loss; the training inputs ``augment``-ed
    (draws seeded by ``seed``), the teachers shown the same inputs.

    Teachers run in eval mode: without augmentation or a hint their outputs on a sample are the
    same every epoch, so they are computed once on the training split (teachers x samples x
    outputs numbers) and ``targets`` are sample numbers that look them up."""

    def __init__(self, model: nn.Module, data: Dataset, teachers: Teachers | None, alpha: float,
                 temperature: float, augment: Augment, seed: int, hint: Hint | None = None,
                 hint_weight: float = 0.0, where: str = "augment"):
        augment.check(data.x_train.shape[1:], where)
        self.model, self.data, self.teachers, self.task = model, data, teachers, task_of(data)
        self.alpha, self.temperature, self.hint, self.hint_weight = alpha, temperature, hint, \
            hint_weight
        self.augment, self.draws = augment, torch.Generator().manual_seed(seed)
        self.recorded = None
        self.targets: Tensor | None = None  # None: the labels
        if teachers is not None and hint is None and not augment:
            self.recorded = teachers.recorded(data.x_train)
            self.targets = torch.arange(len(data.x_train), device=data.y_train.device)

    def __call__(self, x: Tensor, target: Tensor) -> Tensor:
        if self.recorded is None:
            y, taught = target, None
        else:  # sample numbers: their labels and recorded teacher outputs
            y, taught = self.data.y_train[target], self.recorded[:, target]
        x = self.augment(x, self.draws)
        logits = self.model(x)
        task, teachers = self.task, self.teachers
        if teachers is None:
            return task.loss(logits, y)
        if task.regression:  # alpha on the targets, the rest on the teachers' mean output
            mean = teachers.outputs(x, taught)
            loss = self.alpha * task.loss(logits, y) + (1.0 - self.alpha) * task.loss(logits, mean)
        else:
            loss = kd_loss(logits, teachers.probs(x, self.temperature, taught), y, self.alpha,
                           self.temperature)
        if self.hint is not None:
            loss = loss + self.hint_weight * self.hint.loss()
        return loss


def train_student(model: nn.Module, data: Dataset, teachers: Teachers | None, cfg: DistillConfig,
                  *, show_progress: bool = False, desc: str = "distill") -> History:
    """Train ``model`` in place on ``data``'s training split: with the KD loss from
    ``teachers`` (regression: ``alpha`` x MSE to the targets + the rest x MSE to the teachers'
    mean output), or with the task's loss alone when ``teachers`` is None (the from-scratch
    baseline). Early stopping on the validation split; the best epoch's weights are kept."""
    torch.manual_seed(cfg.seed)
    model.train()
    params = list(model.parameters())
    hint = None
    if teachers is not None and cfg.hint_weight > 0:
        layer = cfg.hint_layer or default_hint_layer(model)
        hint = Hint(model, teachers.models[0], layer, data.x_val)
        params += list(hint.adapter.parameters())
    try:  # the hint's hooks are removed whatever happens
        loss = StudentLoss(model, data, teachers, cfg.alpha, cfg.temperature,
                           Augment.parse(cfg.augment, "distill.augment"), cfg.seed, hint,
                           cfg.hint_weight, "distill.augment")

        def on_epoch_start(epoch: int) -> None:
            if cfg.adaptive_temperature:
                loss.temperature = annealed_temperature(cfg.temperature, epoch, cfg.epochs)

        return train_early_stopping(
            model, params, loss, data, cfg.train_config(), cfg.patience,
            on_epoch_start=on_epoch_start, desc=desc, show_progress=show_progress,
            train_targets=loss.targets)
    finally:
        if hint is not None:
            hint.remove()
