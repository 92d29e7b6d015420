"""The Python API: a thin facade that wires the engine to the registries of spaces and
strategies (the shipped ones and those installed packages offer).

>>> from nasopt import api
>>> cfg = api.load_config(overrides=["data.dataset=digits", "search.space=mobilenet"])
>>> outcome = api.search(cfg)
>>> api.pareto(outcome.study)                       # a pandas DataFrame
>>> api.export(outcome.study, trial=3, out="my_model")
>>> model = api.load("my_model")
"""
from __future__ import annotations

from collections import ChainMap
from collections.abc import Callable
from pathlib import Path

import optuna
import pandas as pd
import torch
from torch import nn

from nasopt.compression.packed import SIZE_FORMAT
from nasopt.core.config import Config, load_config
from nasopt.core.data import Dataset, load_dataset
from nasopt.core.errors import NasoptError
from nasopt.core.space import SearchSpace, space_from_description
from nasopt.core.space_import import Spaces
from nasopt.core.strategy import Strategies
from nasopt.deploy import export as _export
from nasopt.inspection import tables as _inspection
from nasopt.search import run as _run
from nasopt.search import study as _study
from nasopt.search.evaluate import Evaluator
from nasopt.search.run import SearchOutcome
from nasopt.spaces import SPACES as SHIPPED_SPACES
from nasopt.strategies import GRADIENT_STRATEGIES, NNI_STRATEGIES
from nasopt.strategies import STRATEGIES as SHIPPED_STRATEGIES

#: every space by name: the shipped ones, installed entry points (group ``nasopt.spaces``) and,
#: as keys, import specs of a user's own class (``path/file.py:Class``, ``module:Class``)
SPACES = Spaces(SHIPPED_SPACES)
#: every sampling strategy by name: the shipped ones, then installed entry points (group
#: ``nasopt.strategies``)
STRATEGIES = Strategies(SHIPPED_STRATEGIES)
#: every strategy a search can name, of every kind (a ChainMap lists its last map first:
#: samplers, then gradient, then NNI strategies)
_EVERY_STRATEGY = ChainMap(NNI_STRATEGIES, GRADIENT_STRATEGIES, STRATEGIES)

__all__ = ["Config", "load_config", "SearchOutcome", "search", "load_data", "load_dataset",
           "resolve_device", "space_from_description", "open_storage", "studies", "open_study",
           "pareto", "trials", "compare", "importance", "export", "load", "make_space", "SPACES",
           "STRATEGIES", "GRADIENT_STRATEGIES", "NNI_STRATEGIES"]

Log = Callable[[str], None]


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when present), ``cpu``, ``cuda``, ``cuda:N``."""
    return _run.resolve_device(name)


def make_space(name: str, data: Dataset, restrict: dict | None = None) -> SearchSpace:
    """The space ``name`` (a shipped or installed name, or an import spec) for ``data``."""
    return _run.make_space(SPACES, name, data, restrict)


def load_data(cfg: Config) -> Dataset:
    """The dataset of ``cfg.data``, with its fixed, seeded splits."""
    return _run.load_data(cfg)


def open_storage(url: str | None, run_dir: str | Path = "runs",
                 heartbeat: int | None = None) -> optuna.storages.BaseStorage:
    return _study.open_storage(_study.resolve_storage(url, run_dir), heartbeat)


def search(cfg: Config, *, show_progress: bool = True, log: Log = lambda s: None,
           heartbeat: int | None = None) -> SearchOutcome:
    """Train (or reuse) the supernet, then search; continues the study if it exists (see
    :func:`nasopt.search.run.search`).

    Any number of processes may call this with the same storage and study: they share the
    search (:mod:`nasopt.search.workers`); ``heartbeat`` is the seconds between heartbeats of a
    running trial on RDB storages (a killed worker's trial is retried after 3 of them).

    In tabular mode (``search.table`` set) accuracy is read from the table instead: no dataset is
    loaded and no supernet trained."""
    return _run.search(cfg, SPACES, _EVERY_STRATEGY, show_progress=show_progress, log=log,
                       heartbeat=heartbeat)


def studies(storage: str | None = None, run_dir: str | Path = "runs") -> pd.DataFrame:
    """The studies in a storage (as `nasopt studies list`)."""
    return _study.list_studies(_study.open_existing_storage(storage, run_dir))


def open_study(name: str, storage: str | None = None, run_dir: str | Path = "runs") -> optuna.Study:
    """An existing nasopt study by name (as `nasopt studies show NAME`)."""
    return _study.load_study(_study.open_existing_storage(storage, run_dir), name)


def trials(study: optuna.Study, pareto_only: bool = False) -> pd.DataFrame:
    """Every trial (or the Pareto set's) with state, Pareto and feasible marks: flat, typed
    columns (see :mod:`nasopt.inspection.tables`), constraint values too."""
    return _inspection.trials_table(study, pareto_only)


def pareto(study: optuna.Study) -> pd.DataFrame:
    """The feasible Pareto set, best accuracy first (as `nasopt studies pareto`)."""
    return _inspection.pareto_table(study)


def compare(studies: list[optuna.Study], cost: str | None = None,
            reference: str | float | None = None) -> pd.DataFrame:
    """Studies and their strategies side by side (as `nasopt studies compare`); the frame's
    ``attrs["hypervolume"]`` says how the hypervolume column was computed."""
    frame, setting = _inspection.compare(studies, cost, reference)
    frame.attrs["hypervolume"] = setting.describe()
    return frame


def importance(study: optuna.Study) -> pd.Series:
    """fANOVA importance of each gene for accuracy (seeded), as `nasopt studies plot --kind
    importance` draws it."""
    return _inspection.importance(study)


def rebuild(study: optuna.Study, device: str = "cpu") -> tuple[Evaluator, Dataset]:
    """The evaluator a study was scored with (same data split, supernet and calibration)."""
    return _run.rebuild(study, SPACES, device)


def best_trial(study: optuna.Study) -> int:
    """The number of the best feasible completed trial (all the study's constraints met) by the
    study's quality metric (:func:`nasopt.search.study.quality_metric`: accuracy unless an
    objective names balanced_accuracy, f1 or a user's metric; ties: the smaller packed size):
    ``nasopt run``'s ``pick.rule = "best"``."""
    from nasopt.pipeline import PickConfig, pick_trial
    if not _study.completed(study):
        raise NasoptError(f"study {study.study_name!r} has no completed trial yet; run the "
                          f"search first (see `nasopt studies show {study.study_name}`)")
    return pick_trial(study, PickConfig(rule="best"))


def export(study: optuna.Study, trial: int | str, out: str | Path,
           formats: tuple[str, ...] = _export.FORMATS, force: bool = False) -> Path:
    """Export trial ``trial`` of ``study`` to the folder ``out`` (see :mod:`nasopt.deploy.export`).

    ``trial``: a trial number, or ``"best"`` (:func:`best_trial`; ``model.json``'s ``trial``
    says which). ``out`` must be new or hold no files unless ``force`` (checked before any work,
    as `nasopt export --force`): then the nasopt files there are replaced, others kept.

    The weights are the supernet's, inherited (BN recalibrated), not retrained: ``model.json``
    records ``"weights": "inherited"``; `nasopt finetune`, `nasopt distill` or `nasopt run`
    train them. Every model file takes raw samples (the dataset's preprocessing is applied
    inside; ``model.json``'s ``input`` says the layout)."""
    picked = trial == "best"
    if picked:
        trial = best_trial(study)
    elif isinstance(trial, bool) or not isinstance(trial, int):
        raise NasoptError(f"trial must be a trial number or 'best', got {trial!r}")
    found = [t for t in study.get_trials(deepcopy=False) if t.number == trial]
    if not found:
        raise NasoptError(f"study {study.study_name!r} has no trial {trial} "
                          f"(it has {len(study.trials)} trials, numbered from 0)")
    t = found[0]
    if t.state != optuna.trial.TrialState.COMPLETE:
        raise NasoptError(f"trial {trial} of study {study.study_name!r} is {t.state.name}, not "
                          f"COMPLETE; export a completed trial (see `nasopt studies show`)")
    out = _export.check_out(out, force)  # before any work
    evaluator, data = rebuild(study)
    arch = evaluator.space.validate(t.params)
    recorded = dict(t.user_attrs.get("metrics", {}))
    if (_study.setup_of(study).get("packed_format", 1) < SIZE_FORMAT
            and recorded.get("compressed_bytes") is not None):  # sized without the checksum
        from nasopt.compression.packed import CHECKSUM_BYTES
        recorded["compressed_bytes"] += CHECKSUM_BYTES
    again = evaluator(arch).to_dict()
    scored = [k for k in ("accuracy", *evaluator.metrics)  # those the trial recorded
              if again.get(k) is not None and recorded.get(k) is not None]
    if (again["compressed_bytes"] != recorded.get("compressed_bytes") or not scored
            or any(abs(again[k] - recorded[k]) > 1e-9 for k in scored)):
        key = scored[0] if scored else "accuracy"
        raise NasoptError(
            f"trial {trial} cannot be reproduced here (recorded {key} {recorded.get(key)}, "
            f"{recorded.get('compressed_bytes')} B; now {again.get(key)}, "
            f"{again['compressed_bytes']} B): the supernet checkpoint or the device differs "
            f"from the search's; export where the search ran")
    model, stored = evaluator.compressed(arch)
    info = {"study": study.study_name, "trial": trial,
            **({"picked": f"best: the best feasible trial by "
                          f"{_study.quality_metric(study)[0]}"} if picked else {}),
            "quality": _study.quality_metric(study)[0],  # the study's quality metric
            "weights": _export.INHERITED,
            "weights_note": "inherited from the supernet (BN recalibrated), not retrained; "
                            "train them with `nasopt finetune`, `nasopt distill` or `nasopt run`",
            "metrics": t.user_attrs.get("metrics"),
            "dataset": _study.setup_of(study)["data"]}
    samples = None
    if any(f.startswith("onnx") or f == "c" for f in formats):  # calibrate on train, verify
        # on val (ONNX: the first CALIB_SAMPLES training samples; C: all of them)
        samples = (evaluator.calibration_samples.cpu(), data.x_val.cpu(), data.y_val.cpu())
    return _export.export_model(model, stored, arch, evaluator.space, out, info, SPACES,
                                formats, samples, data.preprocess)


def load(path: str | Path, raw_input: bool = True) -> nn.Module:
    """Load an export folder (or its model.packed) back into a standalone ``nn.Module`` (eval
    mode) that takes raw samples: the preprocessing ``model.json`` records is applied inside
    (``raw_input=False``: the bare network, taking preprocessed inputs)."""
    return _export.load(path, SPACES, raw_input)
