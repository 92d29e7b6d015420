"""Running a search from a configuration: the checks before any work, the data, the space, the
supernet (trained or reused), the study and its setup record, the supernet check, the hardware
evaluator, then the search loop of the strategy's kind (sampler, gradient, NNI); and the
evaluator a finished study was scored with, rebuilt (:func:`rebuild`) for exports and
re-evaluation. The spaces and strategies a configuration names come from registries the caller
passes (:mod:`nasopt.api` passes the shipped and installed ones)."""
from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import optuna
import torch

from nasopt.compression.packed import SIZE_FORMAT
from nasopt.core.config import Config
from nasopt.core.data import Dataset, load_dataset
from nasopt.core.errors import NasoptError
from nasopt.core.objectives import Constraint, Objective, get_constraints, get_objectives
from nasopt.core.scores import (
    BUILTIN, HIGHER_IS_BETTER, REGRESSION, load_metric, metric_from_record,
)
from nasopt.core.space import SearchSpace, space_from_description
from nasopt.core.space_import import Spaces
from nasopt.core.strategy import Strategy, attach_run_folder
from nasopt.search import sanity as _sanity
from nasopt.search import study as _study
from nasopt.search.evaluate import SCORING, Evaluator
from nasopt.search.loop import run_search
from nasopt.search.tabular import TabularEvaluator, table_name
from nasopt.supernet.elastic import Supernet, load_weights, train_supernet

Log = Callable[[str], None]


@dataclass
class SearchOutcome:
    study: optuna.Study
    space: SearchSpace
    supernet_path: Path | None  # None in tabular mode
    new_trials: int
    supernet_s: float = 0.0  # seconds spent training (or loading) the supernet in this call
    #: the supernet check (nasopt.search.sanity.measure: validation accuracy of the largest and smallest
    #: subnets, the majority-class rate); None in tabular mode
    sanity: dict | None = None
    #: one line per problem found (supernet or best trial near chance), with what to try
    warnings: list[str] = dataclasses.field(default_factory=list)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise NasoptError("CUDA was asked for but is not available; use --device cpu or auto")
    try:
        return torch.device(name)
    except RuntimeError:
        raise NasoptError(f"unknown device {name!r}; use auto, cpu or cuda") from None


def cpu_contention(device: torch.device, threads: int, cores: int | None,
                   busy: Callable[[], int | None]) -> str | None:
    """One line when torch's CPU threads will compete for the ``cores`` this process may use
    with the busy processes ``busy()`` counts (None where the OS does not say; asked only when
    the answer matters). Two threads beside one busy process measured ~25x slower per supernet
    step on 2 cores than one thread: the threads wait on each other."""
    if device.type != "cpu" or threads <= 1 or not cores:
        return None
    others = busy()
    if not others:
        return None
    if threads <= max(1, cores - others):
        return None
    return (f"note: {others} other busy process(es) share this machine's {cores} cores and "
            f"torch uses {threads} threads, which can run many times slower than one when they "
            f"wait on each other; OMP_NUM_THREADS=1 (or `threads = 1` in a `nasopt run` "
            f"config) avoids it")


def busy_others(samples: int = 5, every: float = 0.05) -> int | None:
    """Runnable tasks besides this one, the least over a few samples of ``/proc/loadavg``
    (a process busy throughout is in every sample, a passing one is not); None off Linux."""
    least = None
    for i in range(samples):
        try:
            running = int(Path("/proc/loadavg").read_text().split()[3].split("/")[0])
        except (OSError, ValueError, IndexError):
            return None
        least = running - 1 if least is None else min(least, running - 1)
        if i + 1 < samples:
            time.sleep(every)
    return max(0, least)


def usable_cores() -> int | None:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on every OS
        return os.cpu_count()


def make_space(spaces: Spaces, name: str, data: Dataset, restrict: dict | None = None
               ) -> SearchSpace:
    """The space ``name`` (found in ``spaces``) for ``data``'s samples, restricted."""
    if name not in spaces:
        hint = (f"; a class in a file is named {name}:ClassName" if name.endswith(".py") else "")
        raise NasoptError(f"unknown space {name!r}; known: {', '.join(spaces)}{hint}")
    space = spaces[name](data.input_shape, data.num_classes)
    return space.restrict(restrict) if restrict else space


def load_data(cfg: Config) -> Dataset:
    d = cfg.data
    return load_dataset(d.dataset, seed=d.seed, val_fraction=d.val_fraction,
                        test_fraction=d.test_fraction, label_column=d.label_column, task=d.task)


def open_storage(url: str | None, run_dir: str | Path = "runs",
                 heartbeat: int | None = None) -> optuna.storages.BaseStorage:
    return _study.open_storage(_study.resolve_storage(url, run_dir), heartbeat)


def search(cfg: Config, spaces: Spaces, strategies: Mapping[str, Strategy], *,
           show_progress: bool = True, log: Log = lambda s: None,
           heartbeat: int | None = None) -> SearchOutcome:
    """Train (or reuse) the supernet, then search; continues the study if it exists.

    Any number of processes may call this with the same storage and study: they share the
    search (:mod:`nasopt.search.workers`); ``heartbeat`` is the seconds between heartbeats of a running
    trial on RDB storages (a killed worker's trial is retried after 3 of them).

    In tabular mode (``search.table`` set) accuracy is read from the table instead: no dataset is
    loaded and no supernet trained."""
    s = cfg.search
    if s.strategy not in strategies:
        raise NasoptError(f"unknown strategy {s.strategy!r}; known: {', '.join(strategies)}")
    strategy = strategies[s.strategy]
    if strategy.kind == "nni":  # the optional extra is checked before any work
        from nasopt.strategies.nni_bridge import import_nni
        import_nni()
    gradient = strategy.kind == "gradient"  # not a sampler: see nasopt.gradient.run
    if gradient and s.table is not None:
        raise NasoptError(f"strategy {s.strategy!r} searches by gradient on a trained supernet; "
                          f"tabular mode (--table) has none: use a sampling strategy")
    if gradient:
        from nasopt.gradient.relaxation import check_space
        check_space(spaces[s.space])
    user = load_metric(s.metric) if s.metric is not None else None  # before any work
    # (scored on every trial; an objective or a budget may name it)
    profile = _hardware_profile(s, log)
    constraints = get_constraints({**(profile.limits if profile else {}), **s.budgets}, user)
    if profile is not None:
        profile.check_budgets({c.name: c.limit for c in constraints})
    objectives = get_objectives(s.objectives, {c.name: c.limit for c in constraints}, user)
    if s.trials < 1:
        raise NasoptError(f"search.trials must be at least 1, got {s.trials}")
    if s.timeout is not None and s.timeout <= 0:
        raise NasoptError(f"search.timeout must be positive seconds, got {s.timeout}")
    if s.table is not None:
        scored = [n for n in [*s.objectives, *(c.name for c in constraints)]
                  if n in HIGHER_IS_BETTER and n != "accuracy"]  # the table holds accuracy
        if scored or user is not None:
            raise NasoptError(f"tabular mode reads accuracy from the table; "
                              f"{scored or [user.name]} need the models' outputs (as objectives, "
                              f"budgets or --metric): search a supernet space, or use accuracy")
        if profile is not None:
            raise NasoptError("tabular mode has no trained networks to time or measure; drop "
                              "--hardware and --max-latency/--max-sram with --table")
        return _search_table(cfg, spaces, strategy, objectives, constraints, show_progress,
                             log, heartbeat)
    if s.space in spaces and not spaces[s.space].weight_sharing:
        raise NasoptError(f"space {s.space!r} has no weight-sharing supernet; search it in "
                          f"tabular mode: --table [PATH.csv] (see `nasopt search --help`)")
    device = resolve_device(cfg.device)
    data = load_data(cfg)
    if gradient:
        from nasopt.core.task import require_classification
        require_classification(data, f"gradient search ({s.strategy})")
    _check_task_budgets(data, constraints)
    names = _task_objectives(data, s.objectives, log)
    if list(names) != list(s.objectives):
        cfg = dataclasses.replace(cfg, search=dataclasses.replace(s, objectives=tuple(names)))
        s = cfg.search
        objectives = get_objectives(s.objectives, {c.name: c.limit for c in constraints}, user)
    space = make_space(spaces, s.space, data, dict(s.restrict))
    log(f"{data.summary()}; space {space.name}: {space.size():,} archs; device {device}")
    hardware = _hardware_setup(space, profile, constraints, cfg.run_dir, log)
    storage = open_storage(s.storage, cfg.run_dir, heartbeat)
    name = s.study or f"{space.name}-{data.name}"
    # the task as found (a data file may state it): every later command reloads the data so
    setup = {"space": space.describe(), "data": {**dataclasses.asdict(cfg.data), "task": data.task},
             "data_fingerprint": data.fingerprint,
             "preprocess": data.preprocess.to_dict(),  # what the loader did to raw samples
             "supernet": dataclasses.asdict(cfg.supernet.for_space(space)),
             "eval": dataclasses.asdict(cfg.eval),
             "packed_format": SIZE_FORMAT,  # the size objective counts this format's bytes
             "scoring": SCORING,  # how a trial's model is calibrated and compressed
             "objectives": list(s.objectives),
             "budgets": {c.name: c.limit for c in constraints}}
    if user is not None:  # found again by every command and worker
        setup["metric"] = user.record()
    if hardware is not None:
        setup["hardware"] = hardware[1]
    # check (or create) the study before spending time on the supernet
    existing = _study.open_study(storage, name, setup, [o.direction for o in objectives])
    # a continued study gets fresh draws: the sampler seed depends on the trials already there
    sampler = (None if strategy.kind != "sampler" else
               strategy.make_sampler(space, s.seed * 7919 + len(existing.trials)))
    attach_run_folder(sampler, cfg.run_dir, name)  # REINFORCE saves its controller there
    data = data.to(device)
    busy = cpu_contention(device, torch.get_num_threads(), usable_cores(), busy_others)
    if busy:
        log(busy)
    start = time.perf_counter()
    supernet, path = train_supernet(space, data, cfg.supernet, Path(cfg.run_dir) / "supernets",
                                    device=device, show_progress=show_progress, log=log)
    supernet_s = time.perf_counter() - start
    study = optuna.load_study(study_name=name, storage=storage, sampler=sampler)
    evaluator = Evaluator(space, supernet, data, cfg.eval.calib_samples, metric=user)
    check = _sanity.measure(evaluator, cfg.supernet.resolve(len(data.x_train)).epochs)
    log(_sanity.summary(check))
    for line in _sanity.warnings(check):
        log(f"warning: {line}")
    study.set_user_attr(_study.SETUP_ATTR, {**setup, "supernet_path": str(path.resolve()),
                                            _sanity.KEY: check})
    _masked(cfg).save(Path(cfg.run_dir) / "configs" / f"{name}.json")
    if hardware is not None:
        evaluator = hardware[0](evaluator)
    if gradient:
        from nasopt.gradient.run import run_gradient
        new = run_gradient(study, space, supernet, path, data, evaluator, objectives, constraints,
                           variant=s.strategy, trials=s.trials, seed=s.seed, run_dir=cfg.run_dir,
                           timeout=s.timeout, show_progress=show_progress,
                           settings=cfg.gradient, log=log,
                           latency_table=None if hardware is None else hardware[2],
                           sram_dtype=(profile.dtype if profile is not None
                                       and profile.metrics.get("sram") == "counted" else None))
        return SearchOutcome(study, space, path, new, supernet_s, check,
                             _sanity.warnings(check, _sanity.best_trial(study))
                         + _sanity.metric_warnings(check, study))
    new = _run_trials(study, space, evaluator, objectives, s, strategy, constraints,
                      show_progress, s.seed * 7919 + len(existing.trials))
    return SearchOutcome(study, space, path, new, supernet_s, check,
                         _sanity.warnings(check, _sanity.best_trial(study))
                         + _sanity.metric_warnings(check, study))


#: the objectives that score class predictions, and those that score regression outputs
_CLASS_SCORES = (*BUILTIN, "mnasnet")
_REGRESSION_SCORES = tuple(REGRESSION)


def _task_objectives(data: Dataset, names: tuple[str, ...], log: Log) -> tuple[str, ...]:
    """The objectives for ``data``'s task: a regression dataset turns the default objectives
    (accuracy, size) into (mae, size); any other mismatch is one clear error."""
    regression = data.task == "regression"
    wrong = [n for n in names if n in (_CLASS_SCORES if regression else _REGRESSION_SCORES)]
    if not wrong:
        return names
    if regression and tuple(names) == Config().search.objectives:
        log("regression data: objectives mae, size (name others with --objectives)")
        return ("mae", *names[1:])
    if regression:
        raise NasoptError(f"{data.name} is a regression dataset; the objective(s) {wrong} score "
                          f"classes: use mae or rmse, e.g. --objectives mae,size")
    raise NasoptError(f"{data.name} is a classification dataset; the objective(s) {wrong} score "
                      f"regression outputs: use accuracy, balanced_accuracy or f1, or load the "
                      f"data with --task regression")


def _check_task_budgets(data: Dataset, constraints: list[Constraint]) -> None:
    """A budget on a score the data's task does not produce is one clear error."""
    regression = data.task == "regression"
    wrong = [c.name for c in constraints
             if c.name in (_CLASS_SCORES if regression else _REGRESSION_SCORES)]
    if wrong:
        raise NasoptError(f"{data.name} is a {data.task} dataset; the budget(s) on {wrong} "
                          f"score {'classes' if regression else 'regression outputs'}: drop "
                          f"them or name {'mae or rmse' if regression else 'accuracy, f1 or balanced_accuracy'}")


def _masked(cfg: Config) -> Config:
    """The config as written to disk: the storage URL without its password."""
    if cfg.search.storage is None:
        return cfg
    return dataclasses.replace(cfg, search=dataclasses.replace(
        cfg.search, storage=_study.mask_url(cfg.search.storage)))


def _hardware_profile(s, log: Log):  # noqa: ANN001, ANN202
    """The search's hardware profile: ``search.hardware``, or ``cpu-ort`` when a latency or
    sram budget is given without one; None otherwise."""
    from nasopt.hardware.profile import load_profile
    name = s.hardware
    if name is None and ({"latency", "sram"} & set(s.budgets)):
        name = "cpu-ort"
        log("hardware profile: cpu-ort (the default for --max-latency / --max-sram; choose one "
            "with --hardware)")
    return None if name is None else load_profile(name)


def _hardware_setup(space: SearchSpace, profile, constraints: list[Constraint],  # noqa: ANN001
                    run_dir: str, log: Log):  # noqa: ANN202
    """(evaluator wrapper, setup record, latency table or None) for a search with a hardware
    profile, after checking that its budgets are possible; None without a profile."""
    if profile is None:
        return None
    from nasopt.hardware import evaluate as hardware_eval, lut
    table = path = None
    if profile.metrics.get("latency") == "predicted":
        table = hardware_eval.latency_table(space, profile, run_dir, log)
        path = lut.table_path(run_dir, space, profile)
    hardware_eval.check_possible(space, profile, constraints, table)
    log(f"hardware profile {profile.name}: {profile.description}")
    wrap = lambda evaluate: hardware_eval.HardwareEvaluator(evaluate, space, profile, table)  # noqa: E731
    return wrap, hardware_eval.setup_record(profile, table, path), table


def _run_trials(study: optuna.Study, space: SearchSpace, evaluator, objectives, s,  # noqa: ANN001
                strategy: Strategy, constraints: list[Constraint], show_progress: bool,
                seed: int) -> int:
    """The search loop of a sampling strategy, or of an NNI strategy
    (:mod:`nasopt.strategies.nni_bridge`)."""
    attrs = {"strategy": s.strategy, "seed": s.seed}
    if strategy.kind == "nni":
        from nasopt.strategies.nni_bridge import run_nni_search
        return run_nni_search(study, space, evaluator, objectives, s.trials, s.strategy, seed,
                              s.timeout, show_progress, attrs, constraints)
    return run_search(study, space, evaluator, objectives, s.trials, s.timeout, show_progress,
                      trial_attrs=attrs, constraints=constraints)


def _search_table(cfg: Config, spaces: Spaces, strategy: Strategy, objectives: list[Objective],
                  constraints: list[Constraint], show_progress: bool, log: Log,
                  heartbeat: int | None = None) -> SearchOutcome:
    """Tabular mode: the same search loop, scored by a :class:`TabularEvaluator`."""
    s = cfg.search
    if s.space not in spaces:
        raise NasoptError(f"unknown space {s.space!r}; known: {', '.join(spaces)}")
    table_input = spaces[s.space].table_input  # the tabulated networks' input
    if table_input is None:
        raise NasoptError(f"space {s.space!r} has no tabular mode; drop --table, or use a space "
                          f"with one (nb201)")
    space = spaces[s.space](*table_input)
    space = space.restrict(dict(s.restrict)) if s.restrict else space
    evaluator = TabularEvaluator(space, s.table, s.table_metric)
    log(f"table {evaluator.path}, column {s.table_metric}; space {space.name}: "
        f"{space.size():,} archs")
    storage = open_storage(s.storage, cfg.run_dir, heartbeat)
    name = s.study or f"{space.name}-{table_name(evaluator.path)}"
    setup = {"space": space.describe(), "table": str(evaluator.path),
             "table_fingerprint": evaluator.fingerprint, "table_metric": s.table_metric,
             "objectives": list(s.objectives),
             "budgets": {c.name: c.limit for c in constraints}}
    existing = _study.open_study(storage, name, setup, [o.direction for o in objectives])
    sampler = (None if strategy.kind != "sampler" else
               strategy.make_sampler(space, s.seed * 7919 + len(existing.trials)))
    attach_run_folder(sampler, cfg.run_dir, name)  # REINFORCE saves its controller there
    study = optuna.load_study(study_name=name, storage=storage, sampler=sampler)
    study.set_user_attr(_study.SETUP_ATTR, setup)  # records the table's path as found this time
    _masked(cfg).save(Path(cfg.run_dir) / "configs" / f"{name}.json")
    new = _run_trials(study, space, evaluator, objectives, s, strategy, constraints,
                      show_progress, s.seed * 7919 + len(existing.trials))
    return SearchOutcome(study, space, None, new)


def rebuild(study: optuna.Study, spaces: Spaces, device: str = "cpu"
            ) -> tuple[Evaluator, Dataset]:
    """The evaluator a study was scored with (same data split, supernet and calibration)."""
    setup = _study.setup_of(study)
    if "table" in setup:
        raise NasoptError(f"study {study.study_name!r} was scored from the table "
                          f"{setup['table']}: it has no trained weights to export or re-evaluate;"
                          f" build a trial's arch with the space's build(arch) and train it")
    data_cfg = setup["data"]
    data = load_dataset(data_cfg["dataset"], seed=data_cfg["seed"],
                        val_fraction=data_cfg["val_fraction"],
                        test_fraction=data_cfg["test_fraction"],
                        label_column=data_cfg["label_column"], task=data_cfg.get("task"))
    if data.fingerprint != setup["data_fingerprint"]:
        raise NasoptError(f"the dataset {data_cfg['dataset']!r} has changed since study "
                          f"{study.study_name!r} was run; its trials cannot be reproduced")
    space = space_from_description(setup["space"], spaces)
    path = Path(setup["supernet_path"])
    if not path.exists():
        raise NasoptError(f"the supernet checkpoint {path} of study {study.study_name!r} is "
                          f"missing; re-run the same `nasopt search` command to retrain it")
    from nasopt.core import checkpoint
    supernet = Supernet(space).to(device)
    load_weights(supernet, checkpoint.load(path, device), path)
    data = data.to(device)
    metric = metric_from_record(setup["metric"]) if "metric" in setup else None
    return Evaluator(space, supernet.eval(), data, setup["eval"]["calib_samples"],
                     metric=metric, scoring=setup.get("scoring", 1)), data
