"""``nasopt run CONFIG.toml``: the whole path from data to a verified deployable model, and the
building blocks the ``distill`` / ``finetune`` commands share with it.

train supernet → search → pick → distill → fine-tune (QAT) → export → report

- **pick**: ``rule = "best"``: the feasible trial (all budgets met) with the best validation
  accuracy (ties: the smaller packed size); ``rule = "knee"``: the knee of the feasible
  accuracy/size Pareto front, the point farthest above the straight line between the front's two
  ends after scaling both axes to [0, 1] (the "Kneedle" idea, Satopää et al., ICDCS-W 2011);
  ``trial = N`` picks a trial by number. ``rerank = K`` (rule "best"): the K most accurate
  feasible trials each get a short QAT fine-tune from the inherited weights and the best on
  validation is deployed (:func:`rerank_trials`).
- **distill**: the picked arch's float model, from inherited supernet weights (``init =
  "inherit"``) or a fresh seeded initialisation (``"scratch"``), trained with the KD loss from
  the teacher(s) (:mod:`nasopt.deploy.distill`); early stopping on validation.
- **fine-tune**: quantization-aware training with the arch's compression policy
  (:mod:`nasopt.deploy.finetune`).
- **export**: arch.json, model.json, weights.pt, model.packed (:mod:`nasopt.deploy.export`, verified),
  model.ts (:mod:`nasopt.deploy.torchscript`, verified), ONNX fp32 / int8 when :mod:`nasopt.deploy.onnx`
  is available.
- **meta** (only with a ``[meta]`` table, :class:`MetaStep`): few-shot transfer from a
  meta-learned initialisation, as ``nasopt finetune --meta`` (:func:`transfer`): the fine-tuned
  model re-headed to the target task's classes, meta-trained by Reptile
  (:mod:`nasopt.deploy.meta`) on tasks drawn from the source classes' training split, fine-tuned
  (QAT) on the target's few labelled samples, exported (verified, the same formats) to its own
  folder (``meta.out``, default ``<export.out>_meta``).
- **report**: ``metrics.json`` (the model card: the test accuracy of every artifact (MAE for
  regression: :func:`scorer`), measured once at the end, size, MACs, latency, the command) and
  ``REPORT.md`` in the export folder; with ``[meta]`` also the adapted model's settings and
  target test accuracy (in the card's ``meta`` and the meta folder's own ``metrics.json``).

The search and every training step read only the train and validation splits.
"""
from __future__ import annotations

import dataclasses
import json
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import torch
from torch import Tensor, nn

from nasopt.core.arch import Arch
from nasopt.compression.compress import Policy, compress
from nasopt.core.config import Config, _build, load_raw
from nasopt.core.data import Dataset
from nasopt.deploy.distill import DistillConfig, Teachers, make_teachers, train_student
from nasopt.core.errors import NasoptError
from nasopt.deploy.finetune import FinetuneConfig, finetune, prepare_qat, reheaded
from nasopt.deploy.meta import MetaConfig, SourceTask, meta_record, reptile
from nasopt.core.metrics import FLOAT32_BYTES, count_macs, count_params
from nasopt.search.study import mask_secrets
from nasopt.core.task import task_of
from nasopt.supernet.train import quality

Log = Callable[[str], None]
PICK_RULES = ("best", "knee")
EXPORT_FORMATS = ("pytorch", "packed", "torchscript", "onnx", "onnx-int8", "c")
#: written unless export.formats says otherwise (c on request: it needs a C compiler)
DEFAULT_EXPORT_FORMATS = EXPORT_FORMATS[:-1]


@dataclass(frozen=True)
class PickConfig:
    rule: str = "best"  # best | knee
    trial: int | None = None  # pick this trial number instead of applying the rule
    #: rule "best": the this-many most accurate feasible trials are each fine-tuned briefly
    #: (QAT from the inherited weights, ``rerank_epochs``) and the best on validation is picked;
    #: 0: the most accurate by inherited weights
    rerank: int = 0
    rerank_epochs: int = 5

    def __post_init__(self) -> None:
        if self.rule not in PICK_RULES:
            raise NasoptError(f"pick.rule must be one of {', '.join(PICK_RULES)}, got "
                              f"{self.rule!r}")
        if self.rerank < 0 or self.rerank_epochs < 1:
            raise NasoptError(f"pick.rerank must be >= 0 (0: no re-ranking) and "
                              f"pick.rerank_epochs >= 1, got {self.rerank} and "
                              f"{self.rerank_epochs}")


@dataclass(frozen=True)
class DistillStep(DistillConfig):
    init: str = "inherit"  # inherit (supernet weights) | scratch
    teachers: tuple[str, ...] = ("largest",)  # "largest", TorchScript files, nasopt exports
    teacher_weights: tuple[float, ...] = ()  # default: equal
    enabled: bool = True  # false: no distillation (the inherited weights go to fine-tuning)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init not in ("inherit", "scratch"):
            raise NasoptError(f"distill.init must be inherit or scratch, got {self.init!r}")
        if not self.enabled and self.init == "scratch":
            raise NasoptError("distill.init = 'scratch' needs distill.enabled = true")
        if self.enabled and not self.teachers:  # checked before the search, not after it
            raise NasoptError("distill.teachers is empty; name at least one (\"largest\", a "
                              "TorchScript file or a nasopt export), or set distill.enabled = "
                              "false")
        if self.teacher_weights and len(self.teacher_weights) != len(self.teachers):
            raise NasoptError(f"distill.teacher_weights has {len(self.teacher_weights)} values "
                              f"for {len(self.teachers)} teachers; give one per teacher")


@dataclass(frozen=True)
class FinetuneStep(FinetuneConfig):
    #: true: the QAT loss is the KD loss from [distill]'s teachers (its alpha and temperature)
    #: instead of the labels alone
    distill: bool = False


@dataclass(frozen=True)
class ExportStep:
    out: str = "results/model"
    formats: tuple[str, ...] = DEFAULT_EXPORT_FORMATS

    def __post_init__(self) -> None:
        if not self.out.strip():  # "" would be the working directory itself
            raise NasoptError("export.out is empty; name the folder to write, e.g. "
                              "out = \"results/model\"")
        bad = [f for f in self.formats if f not in EXPORT_FORMATS]
        if bad or not self.formats:
            raise NasoptError(f"export.formats: unknown {bad}; choose from "
                              f"{', '.join(EXPORT_FORMATS)}")
        if not {"pytorch", "packed"} & set(self.formats):  # checked before any work
            raise NasoptError(f"export.formats {list(self.formats)} needs pytorch or packed too: "
                              f"the export folder's model, which the other formats join")
        if "c" in self.formats:  # the C export is verified with a host compiler: found first
            from nasopt.deploy.firmware.toolchain import host_compiler
            host_compiler()


@dataclass(frozen=True)
class MetaStep:
    """``[meta]``: few-shot transfer from a meta-learned initialisation after the export (see
    the module doc). The keys are the options of ``nasopt finetune --meta`` (dashes as
    underscores) with their defaults: the target task (``dataset``, ``classes``, ``fraction``,
    ``shots``, ``shots_seed``), Reptile's settings (``meta_*``), the adaptation's fine-tuning
    (``epochs``, ``lr``, ``batch_size``, ``patience``, ``freeze``) and ``seed`` for both. A
    ``[meta]`` table turns the step on (:func:`load_run_config`); ``enabled = false`` turns it
    off again."""

    enabled: bool = False
    #: the target: a built-in dataset or a .npz / .csv file; None: data.dataset, whose other
    #: classes are then the source classes
    dataset: str | None = None
    classes: tuple[int, ...] = ()  # target labels, renumbered 0..k-1; (): every label
    fraction: float = 1.0  # a stratified share of the target's train and validation splits
    shots: int | None = None  # training samples per target class (None: all)
    shots_seed: int = 0  # which ones
    label_column: str | None = None  # of a target CSV; None: data.label_column
    #: source classes (labels of data.dataset); (): every one not among the target classes
    meta_classes: tuple[int, ...] = ()
    meta_iterations: int = MetaConfig.iterations
    meta_shots: int = MetaConfig.shots
    meta_inner_steps: int = MetaConfig.inner_steps
    meta_inner_lr: float = MetaConfig.inner_lr
    meta_lr: float = MetaConfig.meta_lr
    epochs: int = FinetuneConfig.epochs
    lr: float = FinetuneConfig.lr
    batch_size: int = FinetuneConfig.batch_size
    patience: int = FinetuneConfig.patience
    freeze: tuple[str, ...] = ()
    seed: int = 0
    out: str | None = None  # the adapted model's export folder; None: <export.out>_meta

    def __post_init__(self) -> None:
        for name in ("classes", "meta_classes"):  # `--set meta.classes=5,6` gives strings
            value = getattr(self, name)
            labels = tuple(v if isinstance(v, int) else int(v) for v in value
                           if (isinstance(v, int) and not isinstance(v, bool) and v >= 0)
                           or (isinstance(v, str) and v.strip().isdigit()))
            if len(labels) != len(value):
                raise NasoptError(f"meta.{name} must list labels (whole numbers >= 0), got "
                                  f"{list(value)}; e.g. {name} = [5, 6, 7, 8, 9]")
            if len(set(labels)) != len(labels):
                raise NasoptError(f"meta.{name} {list(labels)} names a label twice; name each "
                                  f"once")
            object.__setattr__(self, name, labels)
        whole = {"meta_iterations": self.meta_iterations, "meta_shots": self.meta_shots,
                 "meta_inner_steps": self.meta_inner_steps, "epochs": self.epochs,
                 "batch_size": self.batch_size, "patience": self.patience}
        if self.shots is not None:
            whole["shots"] = self.shots
        for name, value in whole.items():
            if value < 1:
                raise NasoptError(f"meta.{name} must be a whole number >= 1, got {value}")
        for name in ("shots_seed", "seed"):
            if getattr(self, name) < 0:
                raise NasoptError(f"meta.{name} must be 0 or more, got {getattr(self, name)}")
        for name in ("meta_inner_lr", "lr"):
            if not getattr(self, name) > 0:
                raise NasoptError(f"meta.{name} must be > 0, got {getattr(self, name)}")
        if not 0 < self.meta_lr <= 1:
            raise NasoptError(f"meta.meta_lr must lie in (0, 1] (the outer step size; 1: move "
                              f"to the adapted weights), got {self.meta_lr}")
        if not 0 < self.fraction <= 1:
            raise NasoptError(f"meta.fraction must lie in (0, 1] (1: the whole target "
                              f"splits), got {self.fraction}")
        for name in ("dataset", "out", "label_column"):
            value = getattr(self, name)
            if value is not None and not value.strip():
                raise NasoptError(f"meta.{name} is empty; remove the key for its default or "
                                  f"give a value")

    def reptile(self) -> MetaConfig:
        """Reptile's settings (``ways``: the target's class count)."""
        return MetaConfig(iterations=self.meta_iterations, shots=self.meta_shots,
                          inner_steps=self.meta_inner_steps, inner_lr=self.meta_inner_lr,
                          meta_lr=self.meta_lr, seed=self.seed)

    def finetune(self) -> FinetuneConfig:
        """The adaptation's fine-tuning settings."""
        return FinetuneConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
                              patience=self.patience, freeze=self.freeze, seed=self.seed)

    def out_for(self, export_out: str) -> Path:
        return Path(self.out) if self.out else Path(f"{export_out.rstrip('/')}_meta")


@dataclass(frozen=True)
class RunConfig(Config):
    """A :class:`nasopt.core.config.Config` (sections data, supernet, eval, search, gradient) plus the
    steps after the search (sections pick, distill, finetune, export)."""

    #: torch CPU threads for this run; 0 keeps torch's default. Small models on a shared machine
    #: run far faster on one thread (measured: 10x for a conv1d student on 2 busy cores)
    threads: int = 0
    pick: PickConfig = field(default_factory=PickConfig)
    distill: DistillStep = field(default_factory=DistillStep)
    finetune: FinetuneStep = field(default_factory=FinetuneStep)
    export: ExportStep = field(default_factory=ExportStep)
    meta: MetaStep = field(default_factory=MetaStep)

    def base(self) -> Config:
        """The search's config: the :class:`Config` fields of this one."""
        return Config(**{f.name: getattr(self, f.name) for f in dataclasses.fields(Config)})

    def to_dict(self) -> dict[str, Any]:
        """As :meth:`Config.to_dict`; without ``meta`` when that step is off (a config without
        ``[meta]`` records as it did before the step existed)."""
        record = super().to_dict()
        if not self.meta.enabled:
            record.pop("meta")
        return record


def _build_run(raw: Mapping[str, Any]) -> RunConfig:
    """:func:`nasopt.core.config._build` for a :class:`RunConfig`: a ``[meta]`` table (or a
    ``meta.*`` override) turns the meta step on unless it says ``enabled = false``."""
    if isinstance(raw, Mapping) and isinstance(raw.get("meta"), Mapping):
        raw = {**raw, "meta": {"enabled": True, **raw["meta"]}}
    return _build(RunConfig, raw, "")


def load_run_config(path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """A TOML file updated by ``section.key=value`` overrides (as ``nasopt search --set``)."""
    return _build_run(load_raw(path, overrides))


def load_search_config(path: str | Path | None, overrides: Sequence[str] = ()
                       ) -> tuple[Config, list[str]]:
    """The search's config from a search config or a whole `nasopt run` config, and the names of
    the run-only keys it holds (sections pick, distill, finetune, export, meta; ``threads``),
    which the search does not use. Those are still checked, so a typo in them fails here too;
    the search part equals :meth:`RunConfig.base`, so a search run this way continues the
    pipeline's study on the same supernet."""
    raw = load_raw(path, overrides)
    search_keys = {f.name for f in dataclasses.fields(Config)}
    unused = sorted(k for k in raw if k not in search_keys
                    and k in {f.name for f in dataclasses.fields(RunConfig)})
    return _build_run(raw).base(), unused


# ---------------------------------------------------------------------------------------------
def pick_trial(study: optuna.Study, cfg: PickConfig) -> int:
    """The number of the trial to deploy by the rule alone (see the module doc;
    :func:`rerank_trials` then re-ranks the leading ones when ``cfg.rerank`` asks)."""
    return pick_candidates(study, cfg)[0]


def pick_candidates(study: optuna.Study, cfg: PickConfig) -> list[int]:
    """The trial the rule picks, first; with rule "best" followed by the next most accurate
    feasible trials, up to ``max(1, cfg.rerank)`` in all."""
    from nasopt.search.study import quality_metric, trials_frame
    frame = trials_frame(study)
    if cfg.trial is not None:
        if cfg.trial not in set(frame["trial"]):
            raise NasoptError(f"pick.trial {cfg.trial} is not a trial of {study.study_name!r}")
        return [int(cfg.trial)]
    ok = frame[(frame["state"] == "COMPLETE") & frame["feasible"]]
    if ok.empty:
        raise NasoptError(f"no completed trial of {study.study_name!r} meets the budgets; "
                          f"loosen them or run more trials")
    metric, higher = quality_metric(study)  # accuracy unless the objectives name another
    recorded = {t.number: t.user_attrs.get("metrics", {}).get(metric)
                for t in study.get_trials(deepcopy=False)}
    ok = ok.assign(quality=[recorded[n] if higher else -recorded[n] for n in ok["trial"]])
    if cfg.rule == "knee":
        front = ok[ok["pareto"]].sort_values("compressed_bytes")
        if len(front) >= 3:
            return [int(front.iloc[knee_index(front["compressed_bytes"].to_numpy(float),
                                              front["quality"].to_numpy(float))]["trial"])]
    best = ok.sort_values(["quality", "compressed_bytes", "trial"], ascending=[False, True, True])
    return [int(n) for n in best["trial"].iloc[:max(1, cfg.rerank)]]


def rerank_trials(study: optuna.Study, numbers: Sequence[int], evaluator, data: Dataset,  # noqa: ANN001
                  cfg: PickConfig, finetune_cfg: FinetuneConfig, log: Log = lambda s: None
                  ) -> tuple[int, list[dict[str, Any]]]:
    """Of the trials ``numbers`` (the rule's order), the one whose arch scores best on the
    validation split after a short fine-tune: quantization-aware training of its compressed
    model from the inherited weights for ``cfg.rerank_epochs`` epochs (``finetune_cfg``'s
    learning rate, batch and seed). Ties keep the rule's order. Returns the number and one
    record per trial (inherited and fine-tuned validation score)."""
    metric, score = scorer(data)
    higher = metric == "accuracy"
    short = dataclasses.replace(finetune_cfg, epochs=cfg.rerank_epochs,
                                patience=cfg.rerank_epochs, freeze=())
    records = []
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    for number in numbers:
        trial = by_number[number]
        arch = evaluator.space.validate(trial.params)
        policy = Policy.from_arch(arch, evaluator.pruning)  # as the study scored it
        qat = prepare_qat(evaluator.calibrated_model(arch), policy, evaluator.space.group_of)
        model, _, _ = finetune(qat, policy, evaluator.space.group_of, data, short)
        value = score(model, data.x_val, data.y_val)
        inherited = trial.user_attrs.get("metrics", {}).get(metric)
        records.append({"trial": number, f"inherited_val_{metric}": inherited,
                        f"short_finetune_val_{metric}": value})
        was = "?" if inherited is None else f"{inherited:.4f}"
        log(f"re-ranking trial {number}: val {metric} {was} inherited, {value:.4f} after "
            f"{cfg.rerank_epochs} epochs of QAT")
    values = [r[f"short_finetune_val_{metric}"] for r in records]
    best = max(range(len(values)), key=lambda i: (values[i] if higher else -values[i], -i))
    return numbers[best], records


def knee_index(size, acc) -> int:  # noqa: ANN001
    """Index of the knee of a front sorted by size (accuracy rising with size): both axes scaled
    to [0, 1], the point farthest above the straight line between the two ends (Kneedle's
    difference curve); a front with no point above that line has no knee: the most accurate."""
    import numpy as np
    s = (size - size.min()) / max(np.ptp(size), 1e-12)
    a = (acc - acc.min()) / max(np.ptp(acc), 1e-12)
    chord = a[0] + (a[-1] - a[0]) * (s - s[0]) / max(s[-1] - s[0], 1e-12)
    gain = a - chord
    return int(np.argmax(gain)) if gain.max() > 1e-12 else len(size) - 1


def student_model(evaluator, arch: Arch, init: str, seed: int) -> nn.Module:  # noqa: ANN001
    """The float model of ``arch``: inherited supernet weights (BN recalibrated) or fresh."""
    if init == "inherit":
        return evaluator.float_model(arch).train()
    torch.manual_seed(seed)
    return evaluator.space.build(arch).to(next(evaluator.supernet.parameters()).device)


def teachers_for(evaluator, specs: Sequence[str], weights: Sequence[float], data: Dataset,  # noqa: ANN001
                 spaces) -> Teachers:  # noqa: ANN001
    largest = lambda: evaluator.float_model(evaluator.space.largest())  # noqa: E731
    return make_teachers(specs, weights, largest, spaces, data, data.x_val.device)


@dataclass
class Transfer:
    """What :func:`transfer` made: the deployed model (its ``stored`` layers for the export),
    its space (re-headed when the labels changed), the fine-tuning history and, when Reptile
    ran first, its record (:func:`nasopt.deploy.meta.meta_record`)."""

    model: nn.Module
    stored: list
    space: Any
    history: Any
    meta: dict[str, Any] | None = None


def transfer(model: nn.Module, space, arch: Arch, data: Dataset,  # noqa: ANN001
             cfg: FinetuneConfig, *, deployed: bool, rehead: bool, meta: MetaConfig | None = None,
             source: SourceTask | None = None, show_progress: bool = False,
             desc: str = "finetune") -> Transfer:
    """Quantization-aware fine-tuning of ``model`` (an arch of ``space``: a float model, or with
    ``deployed`` an export's compressed one) on ``data`` with the arch's compression policy:
    ``nasopt finetune`` and the pipeline's meta step.

    ``rehead`` (or meta-training): the classifier is replaced for ``data``'s labels
    (:func:`nasopt.deploy.finetune.reheaded`, on the deployed structure). With ``meta`` and
    ``source`` (:func:`nasopt.deploy.meta.source_task`) the re-headed QAT model is meta-trained by
    Reptile first, then fine-tuned. Every draw is seeded by ``cfg.seed``; ``model`` is not
    changed. Trains on ``data``'s device."""
    policy = Policy.from_arch(arch)
    if (meta is None) != (source is None):
        raise NasoptError("meta-training needs both its settings and its source task")
    if rehead or source is not None:
        if not deployed:  # re-heading works on the deployed structure
            model, deployed = compress(model, policy, space.group_of)[0], True
        model, space = reheaded(model, space, arch, data.num_classes, cfg.seed)
    qat = prepare_qat(model, policy, space.group_of, deployed=deployed,
                      seed=cfg.seed).to(data.x_train.device)
    record = None
    if source is not None:
        history = reptile(qat, source.x.to(data.x_train.device), source.y.to(data.y_train.device),
                          meta, show_progress=show_progress)
        record = meta_record(meta, history, source)
    final, stored, history = finetune(qat, policy, space.group_of, data, cfg,
                                      show_progress=show_progress, desc=desc)
    return Transfer(final, stored, space, history, record)


# ---------------------------------------------------------------------------------------------
def scorer(data: Dataset) -> tuple[str, Callable[[nn.Module, Tensor, Tensor], float]]:
    """The task's quality metric (accuracy, or MAE for regression) and a function that scores a
    model with it on samples and their labels."""
    task = task_of(data)
    return task.default_quality, lambda model, x, y: quality(model, x, y, task)


def artifact_accuracies(out: Path, model: nn.Module, data: Dataset, spaces,  # noqa: ANN001
                        formats: Sequence[str]) -> dict[str, float]:
    """The test score (accuracy, or MAE for regression: :func:`scorer`) of every written
    artifact, loaded back from its file and fed raw samples (the files apply the data's
    preprocessing inside)."""
    from nasopt.deploy.export import load
    from nasopt.deploy.torchscript import FILE as TS_FILE
    _, score = scorer(data)
    x, y = data.x_test.cpu(), data.y_test.cpu()
    raw = data.preprocess.raw(x)
    acc = {"fine-tuned model (in memory)": score(model.cpu(), x, y)}
    if "pytorch" in formats:
        acc["weights.pt via nasopt.load"] = score(load(out, spaces), raw, y)
    if "packed" in formats:
        acc["model.packed via nasopt.load"] = score(load(out / "model.packed", spaces), raw, y)
    if "torchscript" in formats:
        acc["model.ts via torch.jit.load"] = score(torch.jit.load(str(out / TS_FILE)), raw, y)
    return acc


@torch.no_grad()
def latency_ms(model: nn.Module, input_shape: Sequence[int], repeats: int = 50) -> float:
    """Median CPU time of one forward pass at batch size 1 (PyTorch eager, one thread), in ms."""
    model = model.eval().cpu()
    x = torch.zeros((1, *input_shape))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # batch 1 of a small model: one thread, as on a microcontroller
    try:
        for _ in range(5):
            model(x)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t)
    finally:
        torch.set_num_threads(threads)
    return 1000 * sorted(times)[len(times) // 2]


@dataclass
class RunResult:
    out: Path
    trial: int
    card: dict[str, Any]


def run(cfg: RunConfig, command: str, *, show_progress: bool = True,
        log: Log = lambda s: None, force: bool = False) -> RunResult:
    """The whole pipeline (see the module doc). Returns the export folder and the model card.

    ``export.out`` must be new or empty unless ``force`` (checked before any work): then the
    nasopt files an earlier run left there are replaced, other files kept."""
    from nasopt import api
    from nasopt.deploy.export import ARTIFACTS, check_out
    timings: dict[str, float] = {}
    start = t = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t
        now = time.perf_counter()
        timings[name] = round(now - t, 2)
        t = now

    # a run of this same config that was interrupted while exporting may go on over its files
    out = check_out(cfg.export.out, force or _unfinished_by(cfg, cfg.export.out), "export.out")
    if cfg.threads < 0:
        raise NasoptError(f"threads must be >= 0 (0: torch's default), got {cfg.threads}")
    if cfg.finetune.distill and not cfg.distill.enabled:
        raise NasoptError("finetune.distill = true takes the teachers of [distill]: set "
                          "distill.enabled = true, or finetune.distill = false")
    plan = meta_plan(cfg, force) if cfg.meta.enabled else None  # checked before any training
    if cfg.distill.augment or cfg.finetune.augment:  # inputs it cannot move: refused before training
        from nasopt.core.augment import Augment
        shape = api.load_data(cfg.base()).input_shape
        for key in ("distill", "finetune"):
            Augment.parse(getattr(cfg, key).augment).check(shape, f"{key}.augment")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    outcome = api.search(cfg.base(), show_progress=show_progress, log=log)
    lap("supernet + search")
    search_s = timings.pop("supernet + search")
    timings["supernet"] = round(outcome.supernet_s, 2)  # trained, resumed or loaded
    timings["search"] = round(search_s - outcome.supernet_s, 2)  # data, study, trials
    study = outcome.study
    for line in outcome.warnings:  # supernet or best trial near chance (nasopt.search.sanity)
        log(f"warning: {line}")
    candidates = pick_candidates(study, cfg.pick)
    evaluator, data = api.rebuild(study, str(api.resolve_device(cfg.device)))
    number, reranked = candidates[0], []
    if len(candidates) > 1:
        number, reranked = rerank_trials(study, candidates, evaluator, data, cfg.pick,
                                         cfg.finetune, log)
        lap("pick")
    trial = next(tr for tr in study.trials if tr.number == number)
    space = evaluator.space
    arch = space.validate(trial.params)
    searched = evaluator(arch)
    metric, score = scorer(data)  # accuracy, or mae for regression
    searched_value = searched.accuracy if metric == "accuracy" else searched.scores[metric]
    how = ("by number" if cfg.pick.trial is not None else
           f"{cfg.pick.rule}, re-ranked among {len(candidates)}" if reranked else cfg.pick.rule)
    log(f"picked trial {number} ({how}): "
        f"val {metric} {searched_value:.4f} (inherited weights), "
        f"{searched.compressed_bytes} B")
    policy = Policy.from_arch(arch, evaluator.pruning)  # the study's pruning criterion
    d = cfg.distill
    student = student_model(evaluator, arch, d.init if d.enabled else "inherit", d.seed)
    teachers = None
    distill_history = None
    if d.enabled:
        teachers = teachers_for(evaluator, d.teachers, d.teacher_weights, data, api.SPACES)
        distill_history = train_student(student, data, teachers, d, show_progress=show_progress,
                                        desc="distill")
        log(f"distilled from {', '.join(d.teachers)}: val {metric} "
            f"{distill_history.best_val_accuracy:.4f} (best epoch {distill_history.best_epoch + 1}"
            f" of {len(distill_history.val_accuracy)})")
    lap("distill")
    student.eval()
    qat = prepare_qat(student, policy, space.group_of)
    model, stored, ft_history = finetune(
        qat, policy, space.group_of, data, cfg.finetune,
        teachers=teachers if cfg.finetune.distill else None, alpha=d.alpha,
        temperature=d.temperature, show_progress=show_progress)
    log(f"fine-tuned with the compression policy (QAT): val {metric} "
        f"{ft_history.best_val_accuracy:.4f}")
    lap("fine-tune")
    formats = cfg.export.formats
    info = {"study": study.study_name, "trial": number, "dataset": dataclasses.asdict(cfg.data),
            "origin": "nasopt run: distilled and fine-tuned (QAT)" if d.enabled else
                      "nasopt run: fine-tuned (QAT) from the inherited weights",
            "weights": "distilled, fine-tuned" if d.enabled else "fine-tuned"}
    model = model.cpu()
    onnx_note = write_export(cfg, model, stored, arch, space, out, info, data,
                             evaluator.calibration_samples, log)
    lap("export")
    adapted = None
    if plan is not None:
        adapted = meta_step(cfg, plan, model, arch, space, data, info, show_progress, log)
        lap("meta")

    # ---- report: the test split is read here, once ----------------------------------------
    teacher_acc = ({name: score(m, data.x_test, data.y_test)
                    for name, m in zip(teachers.names, teachers.models)} if teachers else {})
    searched_model, _ = evaluator.compressed(arch)
    test = {"searched (inherited weights, compressed)": score(searched_model, data.x_test,
                                                              data.y_test),
            "distilled (float)": score(student, data.x_test, data.y_test),
            "distilled + post-training compression": score(
                compress(student, policy, space.group_of)[0], data.x_test, data.y_test)}
    test.update(artifact_accuracies(out, model, data.to("cpu"), api.SPACES, formats))
    test.update(onnx_note.pop("test", {}))
    size = (out / "model.packed").stat().st_size if "packed" in formats else None
    card = {
        "command": command,
        "study": study.study_name, "trial": number, "arch": dict(arch),
        "pick": {**dataclasses.asdict(cfg.pick), "reranked": reranked},
        "dataset": data.summary(),
        # validation accuracy of the supernet's largest / smallest subnets vs the majority class
        "sanity": {**(outcome.sanity or {}), "warnings": outcome.warnings},
        "metric": metric,  # of the scores below: accuracy, or mae for regression
        f"test_{metric}": test,
        f"teacher_test_{metric}": teacher_acc,
        f"val_{metric}": {"searched": searched_value,
                         "distilled": distill_history.best_val_accuracy if distill_history
                         else None,
                         "fine-tuned": ft_history.best_val_accuracy},
        "packed_bytes": size, "predicted_bytes": searched.compressed_bytes,
        "float_bytes": count_params(student) * FLOAT32_BYTES,
        "params": count_params(model), "macs": count_macs(model, space.input_shape),
        "latency_ms_cpu_batch1": round(latency_ms(model, space.input_shape), 4),
        "files": sorted(p.name for p in out.iterdir() if p.name in ARTIFACTS),
        "formats": {"packed": "weights at the arch's bit-widths (2-8 bit or float32) exactly",
                    "weights.pt / model.ts": "float32 tensors holding the dequantized weights",
                    **onnx_note},
        "timings_s": {**timings, "total": round(time.perf_counter() - start, 2)},
        "config": cfg.to_dict(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s), "
                   f"torch {torch.__version__}, Python {platform.python_version()}",
        "torch_threads": torch.get_num_threads(),
    }
    if adapted is not None:  # the adapted model's target test split, read here, once
        card["meta"] = meta_report(cfg, adapted, command, number, out)
        card["timings_s"]["total"] = round(time.perf_counter() - start, 2)
    card = mask_secrets(card)  # no storage password in a file (the config, the command)
    (out / "metrics.json").write_text(json.dumps(card, indent=2) + "\n")
    (out / "REPORT.md").write_text(report_markdown(card))
    card["files"] = sorted(p.name for p in out.iterdir() if p.name in ARTIFACTS)
    (out / "metrics.json").write_text(json.dumps(card, indent=2) + "\n")
    (out / UNFINISHED).unlink(missing_ok=True)
    if adapted is not None:  # finished last: a run cut off before here goes on over it
        (adapted.out / UNFINISHED).unlink(missing_ok=True)
    return RunResult(out, number, card)


#: a hidden file in ``export.out`` while `nasopt run` writes it: the digest of the run's config,
#: so that the same command re-run after an interruption goes on over its own files
UNFINISHED = ".nasopt-run-unfinished"


def _config_digest(cfg: RunConfig) -> str:
    import hashlib
    return hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()


def _unfinished_by(cfg: RunConfig, folder: str | Path) -> bool:
    """Whether ``folder`` (``export.out``, the meta step's ``meta.out``) holds the unfinished
    export of a run of this same config."""
    marker = Path(folder) / UNFINISHED
    try:
        return marker.read_text().strip() == _config_digest(cfg)
    except OSError:
        return False


def write_export(cfg: RunConfig, model: nn.Module, stored: list, arch: Arch, space,  # noqa: ANN001
                 out: Path, info: Mapping[str, Any], data: Dataset, calibration: Tensor,
                 log: Log) -> dict[str, Any]:
    """Write ``export.formats`` of the deployed ``model`` into ``out`` (each file verified),
    marked unfinished until the run's card is written; returns the ONNX notes of the card.
    ``calibration``: training samples (preprocessed) the C format calibrates on; it is
    verified on ``data``'s validation split."""
    from nasopt import api
    from nasopt.deploy.export import export_model, with_preprocess
    from nasopt.deploy.torchscript import FILE as TS_FILE
    from nasopt.deploy.torchscript import write as write_torchscript
    formats = cfg.export.formats
    out.mkdir(parents=True, exist_ok=True)
    (out / UNFINISHED).write_text(_config_digest(cfg) + "\n")  # until the card is written
    export_model(model, stored, arch, space, out,
                 info, api.SPACES, [f for f in formats if f in ("pytorch", "packed", "c")],
                 # the C format calibrates on training samples, is verified on validation ones
                 samples=((calibration.cpu(), data.x_val.cpu(), data.y_val.cpu())
                          if "c" in formats else None),
                 preprocess=data.preprocess)
    if "torchscript" in formats:  # takes raw samples, as every model file of the folder
        write_torchscript(with_preprocess(model, data.preprocess), out / TS_FILE,
                          space.input_shape)
    return _export_onnx(model, out, space, data, formats, log)


# ---- the meta step ---------------------------------------------------------------------------
@dataclass
class MetaPlan:
    """The meta step's inputs, checked before the supernet trains: the target task (its
    splits as ``[data]`` sets them), the target classes of the source dataset (None: the target
    is another dataset) and the export folder."""

    target: Dataset
    spec: str
    target_classes: list[int] | None
    out: Path


@dataclass
class Adapted:
    """The meta step's result: the exported adapted model and what made it."""

    out: Path
    transfer: Transfer
    target: Dataset
    onnx_note: dict[str, Any]
    plan: MetaPlan


def meta_plan(cfg: RunConfig, force: bool = False) -> MetaPlan:
    """Load the meta step's target task and check everything the step will need, so that a bad
    ``[meta]`` fails in one line before any training: the target data (classes, shots), the
    source classes and their samples per class (:func:`nasopt.deploy.meta.source_task`), the
    shared input shape, and ``meta.out`` (new or empty unless ``force``, not ``export.out``)."""
    from nasopt import api
    from nasopt.core.data import load_dataset
    from nasopt.deploy.export import check_out
    from nasopt.deploy.meta import source_task
    m, d = cfg.meta, cfg.data
    if cfg.search.table:
        raise NasoptError("[meta] needs trained weights; a tabular search (search.table) has "
                          "none: remove [meta] or search a space on a dataset")
    spec = m.dataset or d.dataset
    same = spec == d.dataset
    if same and not m.classes:
        raise NasoptError(f"[meta] needs meta.classes: the target classes of {spec} (e.g. "
                          f"classes = [5, 6, 7, 8, 9]); meta-training draws its tasks from its "
                          f"other classes (meta.meta_classes), or name another meta.dataset")
    try:
        target = load_dataset(spec, seed=d.seed, val_fraction=d.val_fraction,
                              test_fraction=d.test_fraction,
                              label_column=m.label_column or d.label_column,
                              classes=list(m.classes) or None, fraction=m.fraction,
                              shots=m.shots, shots_seed=m.shots_seed)
    except NasoptError as exc:  # load_dataset's words, said of the [meta] keys
        raise NasoptError(f"[meta] target task: {exc}".replace("--classes", "meta.classes")
                          ) from None
    source = api.load_data(cfg.base())  # the pipeline's own split: only its labels are read
    if target.input_shape != source.input_shape:
        raise NasoptError(f"meta.dataset {spec}: samples shaped {target.input_shape}, the "
                          f"searched models take {source.input_shape} ({d.dataset}); transfer "
                          f"needs the same input shape")
    classes = list(m.classes) if same else None
    source_task(source, target, classes, list(m.meta_classes) or None, m.reptile(),
                source.input_shape, dataset=d.dataset)
    out = m.out_for(cfg.export.out)
    main = Path(cfg.export.out)
    a, b = out.resolve(), main.resolve()
    if a == b or a.is_relative_to(b) or b.is_relative_to(a):
        raise NasoptError(f"meta.out {out} {'is' if a == b else 'nests with'} export.out "
                          f"{main}; give the adapted model a folder of its own, e.g. out = "
                          f"\"{cfg.export.out.rstrip('/')}_meta\"")
    check_out(out, force or _unfinished_by(cfg, out), "meta.out")
    return MetaPlan(target, spec, classes, out)


def meta_step(cfg: RunConfig, plan: MetaPlan, model: nn.Module, arch: Arch, space,  # noqa: ANN001
              data: Dataset, info: Mapping[str, Any], show_progress: bool, log: Log) -> Adapted:
    """Few-shot transfer of the pipeline's deployed ``model`` (see the module doc): re-headed,
    meta-trained on the source classes of ``data`` (its training split), fine-tuned (QAT) on the
    target's training split with validation early stopping, exported to ``plan.out``."""
    from nasopt.deploy.meta import source_task
    m = cfg.meta
    reptile_cfg = m.reptile()
    target = plan.target.to(data.x_train.device)
    source = source_task(data, target, plan.target_classes, list(m.meta_classes) or None,
                         reptile_cfg, space.input_shape, dataset=cfg.data.dataset)
    result = transfer(model, space, arch, target, m.finetune(), deployed=True, rehead=True,
                      meta=reptile_cfg, source=source, show_progress=show_progress,
                      desc="meta finetune")
    record = result.meta
    log(f"meta-trained (Reptile) on {record['iterations']} tasks of {record['ways']} classes "
        f"drawn from {source.dataset} classes {','.join(map(str, source.classes))}, fine-tuned "
        f"(QAT) on {target.summary()}: val accuracy {result.history.best_val_accuracy:.4f}")
    final = result.model.cpu()
    result.model = final
    meta_info = {**info, "dataset": {"dataset": plan.spec, "classes": list(m.classes) or None,
                                     "fraction": m.fraction, "shots": m.shots,
                                     "shots_seed": m.shots_seed if m.shots else None,
                                     "task": target.task},
                 "origin": f"nasopt run [meta]: the picked model meta-trained (Reptile) on "
                           f"{source.dataset} classes {','.join(map(str, source.classes))}, "
                           f"fine-tuned (QAT) on {target.name}",
                 "weights": "meta-trained, fine-tuned"}
    onnx_note = write_export(cfg, final, result.stored, arch, result.space, plan.out,
                             meta_info, target, target.x_train, log)
    return Adapted(plan.out, result, target, onnx_note, plan)


def meta_report(cfg: RunConfig, adapted: Adapted, command: str, trial: int,
                source_out: Path) -> dict[str, Any]:
    """The test score of every artifact of the meta step's folder on the target's test split
    (read here, once, after every step), written with the step's settings to that folder's
    ``metrics.json`` and ``REPORT.md``; returns the main card's ``meta``."""
    from nasopt import api
    from nasopt.deploy.export import ARTIFACTS
    out, result, target = adapted.out, adapted.transfer, adapted.target.to("cpu")
    formats = cfg.export.formats
    onnx_note = dict(adapted.onnx_note)
    test = artifact_accuracies(out, result.model, target, api.SPACES, formats)
    test.update(onnx_note.pop("test", {}))
    shape = result.space.input_shape
    record = {
        "out": str(out), "from": str(source_out), "trial": trial,
        "target": target.summary(),
        "settings": dataclasses.asdict(cfg.meta),
        "reptile": result.meta,
        "finetune": dataclasses.asdict(cfg.meta.finetune()),
        "val_accuracy": result.history.best_val_accuracy,
        "test_accuracy": test,
        "packed_bytes": (out / "model.packed").stat().st_size if "packed" in formats else None,
        "params": count_params(result.model), "macs": count_macs(result.model, shape),
    }
    if onnx_note:  # the ONNX files' notes, as the main card's formats
        record["formats"] = onnx_note
    card = mask_secrets({"command": command, **record,
                         "history": dataclasses.asdict(result.history)})
    card["files"] = sorted({*(p.name for p in out.iterdir() if p.name in ARTIFACTS),
                            "REPORT.md", "metrics.json"})
    (out / "metrics.json").write_text(json.dumps(card, indent=2) + "\n")
    (out / "REPORT.md").write_text(f"# nasopt run [meta]: trial {trial}, few-shot transfer\n\n"
                                   f"Command: `{card['command']}`\n\n"
                                   + meta_markdown(card, heading=False))
    return {**mask_secrets(record), "files": card["files"]}


def _export_onnx(model: nn.Module, out: Path, space, data: Dataset, formats: Sequence[str],  # noqa: ANN001
                 log: Log) -> dict[str, Any]:
    """ONNX fp32 / int8 through :mod:`nasopt.deploy.onnx` (another module's job); skipped with a
    note in the card when that module is not available."""
    wanted = [f for f in formats if f.startswith("onnx")]
    if not wanted:
        return {}
    try:
        from nasopt.deploy import onnx as onnx_export  # noqa: F401
    except ImportError:
        log("ONNX export skipped: nasopt.deploy.onnx is not available in this version")
        return {"onnx": "not written: nasopt.deploy.onnx is not available in this version"}
    return onnx_export.pipeline_export(model, out, space, data, wanted, log)  # type: ignore[attr-defined]


def int8_not_written(card: Mapping[str, Any]) -> str | None:
    """Why the card's run wrote no model.int8.onnx though asked to (it failed its check)."""
    onnx = card["formats"].get("onnx")
    return onnx.get("onnx-int8", {}).get("not_written") if isinstance(onnx, dict) else None


def _sanity_markdown(record: Mapping[str, Any] | None) -> str:
    """REPORT.md's supernet check (:mod:`nasopt.search.sanity`) and its warnings, or nothing."""
    if not record or "largest" not in record:
        return ""
    from nasopt.search.sanity import summary
    warnings = "".join(f"\n**Warning**: {w}\n" for w in record.get("warnings", []))
    return f"{summary(record).replace('supernet check', 'Supernet check', 1)}.\n{warnings}\n"


def report_markdown(card: Mapping[str, Any]) -> str:
    metric = card.get("metric", "accuracy")
    named = "MAE (lower is better)" if metric == "mae" else metric
    val = card[f"val_{metric}"]
    rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in card[f"test_{metric}"].items())
    teachers = "\n".join(f"| teacher {k} | {v:.4f} |"
                         for k, v in card[f"teacher_test_{metric}"].items())
    timings = ", ".join(f"{k} {v:.0f} s" for k, v in card["timings_s"].items())
    genes = ", ".join(f"{k}={v}" for k, v in card["arch"].items())
    reason = int8_not_written(card)
    not_written = f"\n**model.int8.onnx not written**: {reason}" if reason else ""
    check = _sanity_markdown(card.get("sanity"))
    reranked = card["pick"].get("reranked") or []
    if reranked:
        lines = "\n".join(f"| {r['trial']} | {r[f'inherited_val_{metric}'] or float('nan'):.4f} | "
                          f"{r[f'short_finetune_val_{metric}']:.4f} |" for r in reranked)
        check += (f"Re-ranked by {card['pick']['rerank_epochs']} epochs of QAT each (validation "
                  f"{named}):\n\n| trial | inherited | after the short fine-tune |\n"
                  f"|---|---|---|\n{lines}\n\n")
    return f"""# nasopt run: {card['study']}, trial {card['trial']}

Command: `{card['command']}`
Machine: {card['machine']}
Data: {card['dataset']}

Picked trial {card['trial']} (rule: {card['pick']['rule'] if card['pick']['trial'] is None
                                     else 'by number'}{', re-ranked' if reranked else ''}): {genes}

{check}Validation {named}: searched {val['searched']:.4f} (inherited supernet
weights), distilled {val['distilled'] or float('nan'):.4f}, fine-tuned
{val['fine-tuned']:.4f}.

## Test {named} (measured once, after every step)

| model / artifact | test {metric} |
|---|---|
{rows}
{teachers}

Packed file: {card['packed_bytes']} B (predicted by the search: {card['predicted_bytes']} B);
float32 model: {card['float_bytes']} B; params {card['params']}, MACs {card['macs']};
CPU latency (batch 1, PyTorch, 1 thread; noisy on a shared machine): {card['latency_ms_cpu_batch1']:.3f} ms.
Files: {', '.join(card['files'])}.{not_written}

Time: {timings}.
{meta_markdown(card['meta']) if card.get('meta') else ''}"""


def meta_markdown(meta: Mapping[str, Any], heading: bool = True) -> str:
    """The meta step's part of REPORT.md (the card's ``meta``)."""
    r = meta["reptile"]
    rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in meta["test_accuracy"].items())
    title = ("\n## Few-shot transfer from a meta-learned initialisation ([meta])\n\n"
             if heading else "")
    packed = f"; packed file: {meta['packed_bytes']} B" if meta["packed_bytes"] else ""
    first, last = r["loss_after_adaptation"][0], r["loss_after_adaptation"][-1]
    seed, tasks, classes = r["seed"], r["iterations"], ", ".join(map(str, r["classes"]))
    return f"""{title}The picked model, re-headed, meta-trained by Reptile (seed {seed}) on {tasks}
tasks ({r['ways']} classes x {r['shots']} shots each) drawn from {r['dataset']} classes
{classes} ({r['train_samples']} training samples; support loss after adaptation {first:.3f}
in the first tenth, {last:.3f} in the last), then fine-tuned (QAT) on {meta['target']}:
validation accuracy {meta['val_accuracy']:.4f}. Exported to `{meta['out']}`
({', '.join(meta['files'])}){packed}.

| adapted model / artifact | target test accuracy |
|---|---|
{rows}
"""
