"""Configuration: frozen dataclasses, loaded from TOML plus typed ``--set section.key=value``
overrides, passed down explicitly. The resolved config is written next to every run's results."""
from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nasopt.core.errors import NasoptError
from nasopt.core.names import check_plain_name


#: tabular mode's default table (a table shipped inside the package, nasopt/tables/) and accuracy
#: column; see nasopt.search.tabular
DEFAULT_TABLE = "nb201_cifar10"
DEFAULT_METRIC = "cifar10_test_acc"


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "mnist1d"
    seed: int = 0
    val_fraction: float = 0.15
    test_fraction: float = 0.2
    label_column: str = "label"
    #: "regression" for float targets; None: as the data file says, else classification
    task: str | None = None

    def __post_init__(self) -> None:
        if self.seed < 0:
            raise NasoptError(f"data.seed must be 0 or more, got {self.seed}")
        if self.task not in (None, "classification", "regression"):
            raise NasoptError(f"data.task must be classification or regression, got "
                              f"{self.task!r}")

#: the default supernet recipe's length (SupernetConfig.resolve): DEFAULT_EPOCHS passes over the
#: training split, at most MAX_STEPS optimizer steps (whole epochs, rounded down at the cap), at
#: least MIN_STEPS (rounded up). scikit-learn's digits (1,222 training images) train 1,000 steps
#: and MNIST-1D (3,400) 2,700 as before; Fashion-MNIST (51,000) 5,985 (15 epochs) where 100
#: epochs were 39,900. Fewer epochs on MNIST-1D cost ranking quality (results/supernet_mnist1d.md:
#: Kendall tau 0.785 at 100 epochs, 0.594 at 60, 0.549 at 40).
DEFAULT_EPOCHS = 100
MIN_STEPS = 300
MAX_STEPS = 6000
#: without an explicit warmup_epochs, the largest subnet trains alone for this share of the epochs
WARMUP_SHARE = 0.2


@dataclass(frozen=True)
class SupernetConfig:
    """The supernet's training recipe. Its length: ``epochs`` (passes over the training split)
    or ``steps`` (optimizer steps, rounded up to whole epochs), at most one of them; with
    neither, :meth:`resolve` sizes it by the training set (``DEFAULT_EPOCHS``, kept within
    ``MIN_STEPS``..``MAX_STEPS``). The resolved recipe keys the cached checkpoint."""

    epochs: int | None = None
    steps: int | None = None
    #: largest subnet only, then channels are sorted by L1 importance; None: a fifth of the
    #: epochs (rounded)
    warmup_epochs: int | None = None
    batch_size: int = 128
    lr: float = 0.003
    weight_decay: float = 0.0
    n_random: int = 4  # random subnets per sandwich step, besides largest and smallest
    kd_temperature: float = 1.0
    seed: int = 0
    #: the random subnets of each sandwich step also draw compression genes and train under them
    #: (fake quantization, pruning masks, factorized weights: nasopt.supernet.compressed);
    #: False: float training, compression applied only after the fact
    compression_aware: bool = True
    #: the probability that a random subnet of a step trains compressed (else float); None:
    #: the search space's own (``SearchSpace.compressed_share``)
    compressed_share: float | None = None
    #: processes that share each sandwich step's subnets on a CPU (nasopt.supernet.split), one
    #: intra-op thread each; None: one per thread torch has (at most n_random + 2), 1: one
    #: process with all threads. The same recipe either way: not part of the checkpoint key
    processes: int | None = None

    def __post_init__(self) -> None:
        _positive("supernet", batch_size=self.batch_size, lr=self.lr,
                  kd_temperature=self.kd_temperature)
        if self.epochs is not None and self.steps is not None:
            raise NasoptError(f"supernet.epochs ({self.epochs}) and supernet.steps "
                              f"({self.steps}) are both set; set one of them (to replace a "
                              f"config file's epochs: --set supernet.epochs=none --set "
                              f"supernet.steps={self.steps})")
        if self.compressed_share is not None and not 0.0 <= self.compressed_share <= 1.0:
            raise NasoptError(f"supernet.compressed_share is the probability that a random "
                              f"subnet trains compressed: give a number from 0 to 1, got "
                              f"{self.compressed_share}")
        if self.processes is not None and self.processes < 1:
            raise NasoptError(f"supernet.processes must be a positive number of processes "
                              f"(1: train in one process), got {self.processes}")
        if self.steps is not None and self.steps < 1:
            raise NasoptError(f"supernet.steps must be a positive number of optimizer steps, "
                              f"got {self.steps}")
        if ((self.epochs or 0) < 0 or (self.warmup_epochs or 0) < 0 or self.n_random < 0
                or self.seed < 0):
            raise NasoptError("supernet.epochs, warmup_epochs, n_random and seed must not be "
                              "negative")

    def steps_per_epoch(self, n_train: int) -> int:
        return max(1, math.ceil(n_train / self.batch_size))

    def resolve(self, n_train: int, space: Any = None) -> "SupernetConfig":
        """This recipe for a training split of ``n_train`` samples: whole ``epochs`` and
        ``warmup_epochs``, ``steps`` None. Explicit epochs are kept; steps become the epochs
        that hold them (rounded up); with neither, ``DEFAULT_EPOCHS`` within
        ``MIN_STEPS``..``MAX_STEPS`` steps. With ``space`` (a search space), an unset
        ``compressed_share`` becomes the space's."""
        per_epoch = self.steps_per_epoch(n_train)
        if self.epochs is not None:
            epochs = self.epochs
        elif self.steps is not None:
            epochs = math.ceil(self.steps / per_epoch)
        else:
            epochs = min(max(DEFAULT_EPOCHS, math.ceil(MIN_STEPS / per_epoch)),
                         max(1, MAX_STEPS // per_epoch))
        warmup = (round(epochs * WARMUP_SHARE) if self.warmup_epochs is None
                  else self.warmup_epochs)
        recipe = self if space is None else self.for_space(space)
        return dataclasses.replace(recipe, epochs=epochs, steps=None, warmup_epochs=warmup)

    def for_space(self, space: Any) -> "SupernetConfig":
        """This recipe with an unset ``compressed_share`` set to ``space``'s
        (``SearchSpace.compressed_share``)."""
        if self.compressed_share is not None:
            return self
        return dataclasses.replace(self, compressed_share=space.compressed_share)

    def describe(self, n_train: int) -> str:
        """One line: the resolved length and where it came from."""
        r = self.resolve(n_train)
        source = ("set by supernet.epochs" if self.epochs is not None else
                  f"supernet.steps={self.steps}, rounded up to whole epochs"
                  if self.steps is not None else
                  f"sized by the data: {DEFAULT_EPOCHS} epochs within {MIN_STEPS}..{MAX_STEPS} "
                  f"steps; set supernet.steps or supernet.epochs to change it")
        return (f"{r.epochs} epochs = {r.epochs * self.steps_per_epoch(n_train)} steps of "
                f"{self.batch_size} ({source}), the first {r.warmup_epochs} on the largest "
                f"subnet alone")


def _positive(section: str, **values: float) -> None:
    for key, value in values.items():
        if value <= 0:
            raise NasoptError(f"{section}.{key} must be positive, got {value}")


@dataclass(frozen=True)
class EvalConfig:
    calib_samples: int = 1024  # training samples used to recalibrate BatchNorm per subnet


@dataclass(frozen=True)
class SearchConfig:
    space: str = "conv1d"
    strategy: str = "predictor"
    trials: int = 50  # total finished trials the study should hold
    timeout: float | None = None  # seconds for this invocation
    seed: int = 0
    study: str | None = None  # default: "<space>-<dataset>"
    storage: str | None = None  # default: sqlite file in run_dir
    objectives: tuple[str, ...] = ("accuracy", "size")
    #: a user's metric function (path/file.py:func or package.module:func, nasopt.core.scores):
    #: scored on every trial; an objective may name it
    metric: str | None = None
    restrict: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)
    #: limits, e.g. {size = "4KB", macs = "2M"}: constraints satisfied when value <= limit
    budgets: Mapping[str, str] = field(default_factory=dict)
    #: hardware profile (nasopt.hardware.profile): a shipped name (cpu-ort, cpu-ort-int8, mcu, cortex-m4) or a
    #: .toml path; adds latency / sram metrics and the profile's limits as budgets
    hardware: str | None = None
    # tabular mode: accuracy read from this CSV (nasopt.search.tabular); no dataset, no supernet
    table: str | None = None
    table_metric: str = DEFAULT_METRIC  # the table's accuracy column, in percent

    def __post_init__(self) -> None:
        if self.study is not None:  # also a file name: RUN_DIR/configs/STUDY.json
            check_plain_name(self.study, "study name", "--study conv1d-mnist1d-4kb")
        if self.seed < 0:
            raise NasoptError(f"search.seed must be 0 or more, got {self.seed}")
        if self.trials < 0:
            raise NasoptError(f"search.trials must be 0 or more, got {self.trials}")


@dataclass(frozen=True)
class GradientConfig:
    """The gradient strategies (``darts``, ``gdas``; nasopt.gradient.run, nasopt.gradient.search)."""

    epochs: int = 8
    lr_w: float = 0.001  # Adam, the relaxed copy of the supernet's weights (train split)
    lr_alpha: float = 0.05  # Adam, the architecture logits (validation split)
    batch_size: int = 128
    #: cost weight of lam * log E[size] without a size budget (default 0.5 when size is an
    #: objective); with --max-size the budget is the target of a Lagrangian instead
    lam: float | None = None
    dual_lr: float = 0.05  # step of the Lagrange multiplier toward the size target
    tau: tuple[float, float] = (5.0, 0.2)  # GDAS Gumbel temperature, first and last epoch
    max_batches: int | None = None  # cap on steps per epoch (tests, quick looks)

    def __post_init__(self) -> None:
        _positive("gradient", epochs=self.epochs, lr_w=self.lr_w, lr_alpha=self.lr_alpha,
                  batch_size=self.batch_size, dual_lr=self.dual_lr)


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    supernet: SupernetConfig = field(default_factory=SupernetConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    gradient: GradientConfig = field(default_factory=GradientConfig)
    run_dir: str = "runs"
    device: str = "auto"

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self), default=list))

    def save(self, path: Path) -> None:
        """Atomically (temp file + rename): a process killed while writing leaves the old file."""
        from nasopt.core.checkpoint import atomic_write_bytes
        atomic_write_bytes(Path(path), (json.dumps(self.to_dict(), indent=2) + "\n").encode())


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults, updated by a TOML file, updated by ``section.key=value`` overrides."""
    return _build(Config, load_raw(path, overrides), "")


def load_raw(path: str | Path | None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The TOML file at ``path`` (none: empty) as a dict, updated by ``section.key=value``
    overrides; :func:`_build` turns it into a config dataclass of any shape."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise NasoptError(f"config file {p} does not exist; check the path")
        if p.is_dir():
            raise NasoptError(f"config {p} is a folder, not a TOML file; give the file's path")
        try:
            raw = tomllib.loads(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise NasoptError(f"config file {p} is not text (not UTF-8); give a TOML file") from None
        except tomllib.TOMLDecodeError as exc:
            raise NasoptError(f"config file {p} is not valid TOML: {exc}") from None
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise NasoptError(f"bad override {item!r}; write it as section.key=value")
        node = raw
        *parents, last = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise NasoptError(f"override {item!r}: {part!r} is not a section")
        node[last] = _parse_value(value.strip())
    return raw


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare string


def _build(cls: type, raw: Mapping[str, Any], where: str) -> Any:
    if not isinstance(raw, Mapping):
        name = where.rstrip(".")
        raise NasoptError(f"config key {name!r} must be a section ([{name}] with keys under it), "
                          f"got {raw!r}" if name else "the config must be a TOML table of keys")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise NasoptError(f"unknown config key(s) {[where + k for k in unknown]}; "
                          f"known in {where or 'top level'}: {', '.join(fields)}")
    values = {}
    for name, value in raw.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value, f"{where}{name}.")
        else:
            values[name] = _coerce(hint, value, where + name)
    return cls(**values)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None or (isinstance(value, str) and value.lower() == "none"):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except NasoptError as exc:
                errors.append(str(exc))
        raise NasoptError(errors[0] if errors else f"bad value for {key}")
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise NasoptError(f"config key {key} takes a list, got {value!r}")
        return tuple(value)
    if origin in (Mapping, dict) or hint is Mapping:
        if not isinstance(value, Mapping):
            raise NasoptError(f"config key {key} takes a table, got {value!r}")
        if args and args[1] is str:
            return {k: str(v) for k, v in value.items()}
        return {k: tuple(v) if isinstance(v, (list, tuple)) else (v,) for k, v in value.items()}
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise NasoptError(f"config key {key} takes true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise NasoptError(f"config key {key} takes an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise NasoptError(f"config key {key} takes a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise NasoptError(f"config key {key} takes a string, got {value!r}")
    return value
